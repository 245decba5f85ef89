//! [`BlockLocks`]: the blocks of the backend's files that a read-modify-write is rewriting.
//!
//! A write that covers only part of a block reads the whole block, patches in its bytes and
//! writes the whole block back. Two such writes to the same block, even of disjoint bytes,
//! must not overlap in time: both would read the old block and the second write-back would
//! undo the first's bytes. So a read-modify-write piece takes the lock on its block before
//! its read and gives it back once its write has completed or failed (or the piece was
//! abandoned), whichever worker runs it. Aligned pieces never lock: they cover whole blocks,
//! so any other write to those blocks overlaps their bytes and is not ordered anyway.
//!
//! Taking a lock never blocks. A worker whose piece finds its block locked leaves the piece
//! unstarted and registers its [`WakeSignal`]; releasing the lock signals every worker that
//! registered, so a worker with nothing else to do sleeps until the block is free.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::wake::WakeSignal;

/// The file a target is, so that a file opened as two targets shares its locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileIdentity {
    /// A file, by the device it lives on and its inode.
    File {
        /// `st_dev`.
        device: u64,
        /// `st_ino`.
        inode: u64,
    },
    /// A block device, by its device number (any node that names it is the same disk).
    BlockDevice {
        /// `st_rdev`.
        rdev: u64,
    },
}

impl FileIdentity {
    /// The identity of an open file (one `fstat`).
    pub fn of(file: &File) -> io::Result<FileIdentity> {
        let meta = file.metadata()?;
        Ok(if meta.file_type().is_block_device() {
            FileIdentity::BlockDevice { rdev: meta.rdev() }
        } else {
            FileIdentity::File {
                device: meta.dev(),
                inode: meta.ino(),
            }
        })
    }
}

/// One block of one file: what a read-modify-write locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// The file.
    pub file: FileIdentity,
    /// Byte offset of the block's first byte (a multiple of the target's alignment).
    pub offset: u64,
}

/// The locked blocks of one backend, shared by all its workers.
#[derive(Debug, Default)]
pub struct BlockLocks {
    /// Each locked block, with the workers to wake when it is released.
    locked: Mutex<HashMap<BlockKey, Vec<Arc<WakeSignal>>>>,
}

impl BlockLocks {
    /// Takes the lock on `key`, or, when another piece holds it, registers `waiter` to be
    /// signalled when it is released and returns `None`. The lock is held until the guard
    /// drops.
    pub fn try_lock(self: &Arc<Self>, key: BlockKey, waiter: &Arc<WakeSignal>) -> Option<BlockGuard> {
        let mut locked = self.lock();
        if let Some(waiters) = locked.get_mut(&key) {
            if !waiters.iter().any(|w| Arc::ptr_eq(w, waiter)) {
                waiters.push(waiter.clone());
            }
            return None;
        }
        locked.insert(key, Vec::new());
        Some(BlockGuard {
            locks: self.clone(),
            key,
        })
    }

    /// Number of locked blocks.
    #[cfg(test)]
    pub fn locked_count(&self) -> usize {
        self.lock().len()
    }

    /// Releases `key` and wakes the workers waiting for it.
    fn release(&self, key: BlockKey) {
        let waiters = self.lock().remove(&key);
        debug_assert!(waiters.is_some(), "block lock {key:?} released but not held");
        // Signalled after the mutex is dropped: a woken worker finds the block free.
        for waiter in waiters.into_iter().flatten() {
            waiter.notify();
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<BlockKey, Vec<Arc<WakeSignal>>>> {
        // The map stays consistent even if a holder panicked: every change is one insert or
        // one remove.
        self.locked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A held block lock; dropping it releases the block.
#[derive(Debug)]
pub struct BlockGuard {
    locks: Arc<BlockLocks>,
    key: BlockKey,
}

impl Drop for BlockGuard {
    fn drop(&mut self) {
        self.locks.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(inode: u64, offset: u64) -> BlockKey {
        BlockKey {
            file: FileIdentity::File { device: 1, inode },
            offset,
        }
    }

    fn signal() -> Arc<WakeSignal> {
        Arc::new(WakeSignal::new().unwrap())
    }

    #[test]
    fn a_block_is_locked_once_and_released_on_drop() {
        let locks = Arc::new(BlockLocks::default());
        let waiter = signal();
        let guard = locks.try_lock(key(1, 0), &waiter).unwrap();
        assert!(locks.try_lock(key(1, 0), &waiter).is_none());
        // Other blocks, and the same offset of other files, are independent.
        let other_block = locks.try_lock(key(1, 4096), &waiter).unwrap();
        let other_file = locks.try_lock(key(2, 0), &waiter).unwrap();
        assert_eq!(locks.locked_count(), 3);
        drop(guard);
        let again = locks.try_lock(key(1, 0), &waiter).unwrap();
        drop((again, other_block, other_file));
        assert_eq!(locks.locked_count(), 0);
    }

    #[test]
    fn releasing_wakes_each_waiter_once() {
        let locks = Arc::new(BlockLocks::default());
        let (holder, first, second) = (signal(), signal(), signal());
        let guard = locks.try_lock(key(1, 0), &holder).unwrap();
        assert!(locks.try_lock(key(1, 0), &first).is_none());
        assert!(locks.try_lock(key(1, 0), &first).is_none());
        assert!(locks.try_lock(key(1, 0), &second).is_none());
        assert!(!first.take() && !second.take());
        drop(guard);
        assert!(first.take() && second.take() && !holder.take());
        // The waiters were forgotten with the lock: a later release wakes nobody.
        drop(locks.try_lock(key(1, 0), &holder).unwrap());
        assert!(!first.take() && !second.take());
    }

    #[test]
    fn a_file_is_identified_by_its_inode() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let identity = |p: &std::path::Path| FileIdentity::of(&File::open(p).unwrap()).unwrap();
        assert_eq!(identity(&a), identity(&a));
        assert_ne!(identity(&a), identity(&b));
    }
}
