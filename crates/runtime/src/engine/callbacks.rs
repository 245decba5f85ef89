//! [`Callbacks`]: the source-release callbacks of tensors whose memory the engine has let
//! go of, until they run.
//!
//! Invariant: a callback given to `offload_with_callback` runs exactly once. It waits on
//! its tensor ([`Entry::callbacks`](super::tensors::Entry::callbacks)) while the engine
//! may read the tensor's memory; then here, in `fenced`, while a copy the engine made out of
//! that memory (a forwarded fetch) may still be running; then in `due` once nothing reads
//! the memory, until [`Callbacks::take_due`] hands it over to be run outside the lock.

use std::sync::Arc;

use crate::device::Event;

use super::fenced::Fenced;

/// Called once the engine no longer reads a tensor's own memory.
pub(crate) type SourceFreeFn = Box<dyn FnOnce() + Send>;

/// Callbacks of released sources, waiting for a fence or for the lock to be released.
#[derive(Default)]
pub(crate) struct Callbacks {
    /// Source releases waiting for their fence.
    fenced: Fenced<Vec<SourceFreeFn>>,
    /// Callbacks to run once the lock is released.
    due: Vec<SourceFreeFn>,
}

impl Callbacks {
    /// `cb` may run now (once the lock is released).
    pub(crate) fn due(&mut self, cb: SourceFreeFn) {
        self.due.push(cb);
    }

    /// `callbacks` may run now (once the lock is released).
    pub(crate) fn all_due(&mut self, callbacks: Vec<SourceFreeFn>) {
        self.due.extend(callbacks);
    }

    /// `callbacks` may run once `fence` has completed.
    pub(crate) fn after_fence(&mut self, callbacks: Vec<SourceFreeFn>, fence: Arc<dyn Event>) {
        self.fenced.push(callbacks, fence);
    }

    /// True when no callback waits for a fence.
    pub(crate) fn none_fenced(&self) -> bool {
        self.fenced.is_empty()
    }

    /// Makes due the callbacks whose fences have completed.
    pub(crate) fn free_fenced(&mut self) {
        for callbacks in self.fenced.take_ready() {
            self.due.extend(callbacks);
        }
    }

    /// Takes the callbacks that may run now.
    pub(crate) fn take_due(&mut self) -> Vec<SourceFreeFn> {
        std::mem::take(&mut self.due)
    }

    /// Takes every callback, fenced or not: the engine is going away and nothing reads
    /// any tensor's memory any more.
    pub(crate) fn take_all(&mut self) -> Vec<SourceFreeFn> {
        let mut all = std::mem::take(&mut self.due);
        for cbs in self.fenced.take_all() {
            all.extend(cbs);
        }
        all
    }
}
