//! [`Space`]: the storage space of the engine's targets, and whether it ran out.
//!
//! Invariants:
//! - Each extent allocated here belongs to one group ([`Group::extent`](super::groups::Group::extent)),
//!   from the start of its write until the group is freed or given up on; freeing it tells
//!   the backend its bytes are not needed any more.
//! - `full` says the last allocation found no room: the warning is given once per episode
//!   of full storage, not once per extent.

use crate::backend::Backend;
use crate::extents::{Extent, ExtentAllocator, SpaceUsage};

/// Why [`Space::alloc`] gave no extent (already reported).
pub(crate) enum NoExtent {
    /// The targets are full.
    Full,
    /// The allocator failed.
    Failed,
}

/// Storage space and its allocator.
pub(crate) struct Space {
    alloc: ExtentAllocator,
    /// Storage was found full at the last allocation (the warning is given once).
    full: bool,
}

impl Space {
    /// Space handed out by `alloc` (its targets added).
    pub(crate) fn new(alloc: ExtentAllocator) -> Self {
        Space { alloc, full: false }
    }

    /// An extent of `len` bytes; when there is none, says why (and warns once about full
    /// storage).
    pub(crate) fn alloc(&mut self, len: u64) -> Result<Extent, NoExtent> {
        match self.alloc.alloc(len) {
            Ok(Ok(extent)) => {
                self.full = false;
                Ok(extent)
            }
            Ok(Err(full)) => {
                // Said once per episode of full storage, not once per extent.
                if !std::mem::replace(&mut self.full, true) {
                    tracing::warn!("{full}; tensors stay in GPU memory until space is freed");
                }
                Err(NoExtent::Full)
            }
            Err(e) => {
                tracing::error!("allocating an extent: {e}");
                Err(NoExtent::Failed)
            }
        }
    }

    /// Gives an extent's storage space back, telling `backend` its bytes are not needed
    /// (a host tier in front of storage then drops them instead of writing them out).
    pub(crate) fn free(&mut self, extent: Extent, backend: &dyn Backend) {
        if let Err(e) = self.alloc.free(extent) {
            tracing::error!("freeing extent {extent:?}: {e}");
        }
        backend.discard(extent.target, extent.offset, extent.len);
    }

    /// Storage space in use, and the allocator's view of it.
    pub(crate) fn usage(&self) -> SpaceUsage {
        self.alloc.usage()
    }
}
