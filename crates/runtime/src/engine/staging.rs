//! [`Staging`]: the engine's staging memory, allocated once when it starts, and the
//! extents of it in use.
//!
//! Invariants:
//! - `used` is the bytes of the extents allocated from it, never more than
//!   [`EngineConfig::staging_bytes`](super::EngineConfig::staging_bytes): work that needs
//!   more waits.
//! - Each extent allocated has one holder: a group's packed write
//!   ([`Group::write_staging`](super::groups::Group::write_staging)), a group's load
//!   ([`LoadState`](super::groups::LoadState)), a slot read ahead for a lone prefetch
//!   request ([`Slot`](super::reads::Slot)), or `fenced`, where it waits for the last copy
//!   out of it to complete before it is free.

use std::sync::Arc;

use crate::device::Event;
use crate::extents::{Extent, ExtentAllocator};
use crate::memory::{DeviceBuffer, DevicePtr};

use super::fenced::Fenced;
use super::stats::Stats;

/// Staging memory and its allocator.
pub(crate) struct Staging {
    alloc: ExtentAllocator,
    buf: DeviceBuffer,
    used: u64,
    /// Staging extents to free once their fence completes.
    fenced: Fenced<Extent>,
}

impl Staging {
    /// `buf`, handed out by `alloc` (one target the size of `buf`).
    pub(crate) fn new(buf: DeviceBuffer, alloc: ExtentAllocator) -> Self {
        Staging {
            alloc,
            buf,
            used: 0,
            fenced: Fenced::default(),
        }
    }

    /// Bytes in use.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// The device address of a staging extent.
    pub(crate) fn ptr(&self, s: Extent) -> DevicePtr {
        self.buf.ptr() + s.offset
    }

    /// `len` bytes of staging, if free now (the high-water mark counted in `stats`).
    pub(crate) fn try_alloc(&mut self, len: u64, stats: &Stats) -> Option<Extent> {
        if let Ok(Ok(s)) = self.alloc.alloc(len) {
            self.used += s.len;
            stats.staging_in_use(self.used);
            return Some(s);
        }
        None
    }

    /// Frees a staging extent.
    pub(crate) fn free(&mut self, s: Extent) {
        match self.alloc.free(s) {
            Ok(()) => self.used -= s.len,
            Err(e) => tracing::error!("freeing staging {s:?}: {e}"),
        }
    }

    /// Frees a staging extent once `fence` completes.
    pub(crate) fn free_after(&mut self, s: Extent, fence: Arc<dyn Event>) {
        self.fenced.push(s, fence);
    }

    /// True when no extent waits for a fence.
    pub(crate) fn none_fenced(&self) -> bool {
        self.fenced.is_empty()
    }

    /// Frees the extents whose fences have completed.
    pub(crate) fn free_fenced(&mut self) {
        for s in self.fenced.take_ready() {
            self.free(s);
        }
    }
}
