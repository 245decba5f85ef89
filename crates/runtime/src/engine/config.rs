//! [`EngineConfig`]: every setting of the offload engine, with its default.

use std::time::Duration;

use crate::error::{Error, Result};

/// Settings of the offload engine. `EngineConfig::default()` suits a single GPU training a
/// model of a few billion parameters; every field says what it bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Alignment of every extent, and of every piece inside a packed extent (bytes, a power
    /// of two; 4096 suits every NVMe namespace and O_DIRECT filesystem). Default 4 KiB.
    pub alignment: u64,
    /// Device memory the engine allocates once, at start, for packing and prefetching. The
    /// engine never allocates more, whatever the workload: work waits for space instead
    /// (backpressure). Default 512 MiB.
    pub staging_bytes: u64,
    /// Of the staging memory, how much prefetches may hold (reads in flight plus extents
    /// read but not yet fetched). The rest stays free for packing writes. Default 256 MiB.
    pub prefetch_bytes: u64,
    /// Tensors smaller than this are packed together with others into one extent; larger
    /// ones are written straight from their own memory into an extent of their own.
    /// Default 1 MiB.
    pub pack_threshold: u64,
    /// Target size of one packed extent: a packed extent is sealed and written once it
    /// holds this many bytes. Default 16 MiB.
    pub pack_extent_bytes: u64,
    /// A packed extent that has not filled up is sealed and written anyway after no
    /// offload has arrived for this long. Default 2 ms.
    pub pack_flush_delay: Duration,
    /// Bytes of unpacked (direct) writes in flight at once. Default 256 MiB.
    pub direct_write_bytes: u64,
    /// Pack small tensors together. Off, every tensor is written straight from its own
    /// memory into an extent of its own (no pack kernel): the baseline packing is
    /// measured against. Default on.
    pub pack: bool,
    /// Store a tensor only once when the same storage (same id and version) is offloaded
    /// again. Default on.
    pub dedup: bool,
    /// Record a timeline of every stage, exportable as Chrome trace JSON. Default off.
    pub timeline: bool,
    /// Most events the timeline keeps (later ones are counted and dropped). Default 1 000 000.
    pub timeline_capacity: usize,
    /// How many times a storage request that failed with an error that may be transient
    /// (EIO, EAGAIN, EINTR, ETIMEDOUT: [`Error::is_transient`]) is submitted again before
    /// the engine gives up on it: a write then keeps its tensors in their own memory, a
    /// read fails the fetch. Other errors (ENOSPC, EINVAL, a short count at the end of the
    /// target, a target that is gone) are never retried. At most [`MAX_IO_RETRIES`];
    /// 0 retries nothing. Default 3.
    pub io_retries: u32,
}

/// The most [`EngineConfig::io_retries`] may be: a request that failed this often is not
/// failing by chance, and each retry is another request to a device that is misbehaving.
pub const MAX_IO_RETRIES: u32 = 100;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            alignment: 4096,
            staging_bytes: 512 << 20,
            prefetch_bytes: 256 << 20,
            pack_threshold: 1 << 20,
            pack_extent_bytes: 16 << 20,
            pack_flush_delay: Duration::from_millis(2),
            direct_write_bytes: 256 << 20,
            pack: true,
            dedup: true,
            timeline: false,
            timeline_capacity: 1_000_000,
            io_retries: 3,
        }
    }
}

impl EngineConfig {
    /// Checks that the settings fit together, naming the one that does not.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid(format!("engine settings: {msg}")));
        if !self.alignment.is_power_of_two() || self.alignment < 512 {
            return bad(format!(
                "alignment {} must be a power of two of at least 512 bytes",
                self.alignment
            ));
        }
        if self.staging_bytes < 2 * self.alignment {
            return bad(format!(
                "staging_bytes {} is too small: at least two alignment units ({} bytes) are needed",
                self.staging_bytes,
                2 * self.alignment
            ));
        }
        if self.prefetch_bytes > self.staging_bytes {
            return bad(format!(
                "prefetch_bytes {} exceeds staging_bytes {}: prefetches live in the staging memory",
                self.prefetch_bytes, self.staging_bytes
            ));
        }
        if self.pack && self.pack_extent_bytes > self.staging_bytes / 2 {
            return bad(format!(
                "pack_extent_bytes {} must be at most half of staging_bytes {}, so that packing and writing can overlap",
                self.pack_extent_bytes, self.staging_bytes
            ));
        }
        if self.pack && self.pack_threshold > self.pack_extent_bytes {
            return bad(format!(
                "pack_threshold {} exceeds pack_extent_bytes {}: a packed tensor must fit in a packed extent",
                self.pack_threshold, self.pack_extent_bytes
            ));
        }
        if self.direct_write_bytes == 0 {
            return bad("direct_write_bytes must be at least 1".into());
        }
        if self.io_retries > MAX_IO_RETRIES {
            return bad(format!(
                "io_retries {} exceeds {MAX_IO_RETRIES}: a request failing that often is not failing by chance",
                self.io_retries
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        EngineConfig::default().validate().unwrap();
        let e = EngineConfig {
            alignment: 1000,
            ..Default::default()
        };
        assert!(e.validate().unwrap_err().to_string().contains("alignment 1000"));
        let e = EngineConfig {
            prefetch_bytes: 1 << 40,
            ..Default::default()
        };
        assert!(e.validate().unwrap_err().to_string().contains("prefetch_bytes"));
        let e = EngineConfig {
            pack_extent_bytes: 400 << 20,
            ..Default::default()
        };
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pack_extent_bytes"));
        let e = EngineConfig {
            io_retries: MAX_IO_RETRIES + 1,
            ..Default::default()
        };
        assert!(e.validate().unwrap_err().to_string().contains("io_retries"));
    }
}
