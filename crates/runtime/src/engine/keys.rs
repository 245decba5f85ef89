//! [`TensorKey`] and [`Handle`]: how a caller names a tensor's bytes, and its claim on the
//! engine's copy of them.

/// Names the bytes of one tensor storage at one point in time: a storage whose contents
/// change must be offloaded under a new `version`, so it is never confused with its old
/// contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorKey {
    /// The storage's identity (e.g. its data pointer or a framework id).
    pub storage: u64,
    /// The storage's version counter.
    pub version: u64,
}

impl TensorKey {
    /// The key of `storage` at `version`.
    pub fn new(storage: u64, version: u64) -> Self {
        TensorKey { storage, version }
    }
}

/// One offload's claim on a stored tensor. Release it with [`Engine::release`](super::Engine::release).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub u64);
