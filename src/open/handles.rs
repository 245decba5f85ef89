//! The handles a caller holds on an [`super::OpenedEngine`]: per handle, its key and
//! whether the engine still reads the memory it was offloaded from.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use spillway_runtime::engine::TensorKey;
use spillway_runtime::{Error, Result};

/// What the engine's caller knows of its live handles.
#[derive(Default)]
pub(super) struct Handles {
    /// Per handle: its key, and the flag set once the engine no longer reads its memory.
    live: HashMap<u64, (TensorKey, Arc<SourceFlag>)>,
    /// Live handles per key: handles of one key share one copy and one memory (dedup).
    per_key: HashMap<TensorKey, usize>,
}

impl Handles {
    /// The source flag of `handle`; an error for a handle that is not live.
    pub(super) fn flag(&self, handle: u64) -> Result<Arc<SourceFlag>> {
        self.live
            .get(&handle)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| Error::invalid(format!("unknown or released handle {handle}")))
    }

    /// Records a new handle of `key`, whose source is released once `flag` is set.
    pub(super) fn insert(&mut self, handle: u64, key: TensorKey, flag: Arc<SourceFlag>) {
        self.live.insert(handle, (key, flag));
        *self.per_key.entry(key).or_default() += 1;
    }

    /// Forgets `handle`; returns its source flag when it was the last handle of its key
    /// (the memory is then no one else's to wait for).
    pub(super) fn remove(&mut self, handle: u64) -> Option<Arc<SourceFlag>> {
        let (key, flag) = self.live.remove(&handle)?;
        let n = self.per_key.get_mut(&key)?;
        *n -= 1;
        if *n == 0 {
            self.per_key.remove(&key);
            Some(flag)
        } else {
            None
        }
    }
}

/// Set (by the engine's callback) once the engine no longer reads a tensor's memory.
#[derive(Default)]
pub(super) struct SourceFlag {
    set: Mutex<bool>,
    changed: Condvar,
}

impl SourceFlag {
    /// Marks the memory as no longer read.
    pub(super) fn set(&self) {
        *lock(&self.set) = true;
        self.changed.notify_all();
    }

    /// True once [`SourceFlag::set`] was called.
    pub(super) fn is_set(&self) -> bool {
        *lock(&self.set)
    }

    /// Waits until [`SourceFlag::set`] is called.
    pub(super) fn wait(&self) {
        let mut set = lock(&self.set);
        while !*set {
            set = self.changed.wait(set).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until [`SourceFlag::set`] is called or `timeout` has passed; true when set.
    pub(super) fn wait_for(&self, timeout: std::time::Duration) -> bool {
        let set = lock(&self.set);
        let (set, _) = self
            .changed
            .wait_timeout_while(set, timeout, |set| !*set)
            .unwrap_or_else(|e| e.into_inner());
        *set
    }
}

/// Locks `m`, going on past a poisoned lock (the data stays consistent: every critical
/// section here is a few plain assignments).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
