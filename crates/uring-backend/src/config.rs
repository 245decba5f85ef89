//! [`UringConfig`]: how many rings, how deep, how big the chunks and staging buffers are.

use spillway_runtime::{Error, Result};

/// Staging memory one ring allocates at most when the number of staging buffers is chosen
/// automatically.
pub const AUTO_STAGING_BYTES_PER_RING: usize = 64 << 20;

/// The largest chunk: one registered buffer may not exceed 1 GiB, and an SQE length is a u32.
pub const MAX_CHUNK_SIZE: usize = 1 << 30;

/// Chunks are a multiple of this, so that they are a multiple of every direct-I/O alignment
/// a target reports in practice (512 or 4096 bytes).
pub const CHUNK_GRANULE: usize = 4096;

/// The most I/Os one ring keeps in flight.
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// The most staging buffers one ring registers (the kernel's limit on an iovec array).
pub const MAX_STAGING_BUFFERS: usize = 1024;

/// Tuning of the io_uring backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UringConfig {
    /// Most I/Os in flight per ring.
    pub queue_depth: u32,
    /// Number of rings, each driven by its own worker thread.
    pub threads: usize,
    /// Requests larger than this are split into chunks of this size; it is also the size of
    /// one staging buffer. A multiple of 4096 bytes.
    pub chunk_size: usize,
    /// Staging buffers per ring. `0` chooses automatically: `queue_depth`, capped so that one
    /// ring's staging memory stays within 64 MiB (see [`UringConfig::staging_buffers_per_ring`]).
    pub staging_buffers: usize,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig {
            queue_depth: spillway_runtime::DEFAULT_QUEUE_DEPTH,
            threads: 1,
            chunk_size: 1 << 20,
            staging_buffers: 0,
        }
    }
}

impl UringConfig {
    /// The number of staging buffers each ring gets: `staging_buffers` when set, otherwise
    /// `queue_depth` capped so that the ring's staging memory stays within 64 MiB (at least
    /// one buffer).
    pub fn staging_buffers_per_ring(&self) -> usize {
        if self.staging_buffers > 0 {
            return self.staging_buffers;
        }
        let cap = (AUTO_STAGING_BYTES_PER_RING / self.chunk_size.max(1)).max(1);
        (self.queue_depth as usize).clamp(1, cap).min(MAX_STAGING_BUFFERS)
    }

    /// Checks that the values are usable, saying which one is not and why.
    pub fn validate(&self) -> Result<()> {
        if self.queue_depth == 0 || self.queue_depth > MAX_QUEUE_DEPTH {
            return Err(Error::invalid(format!(
                "io_uring queue depth {} is out of range: use 1 to {MAX_QUEUE_DEPTH}",
                self.queue_depth
            )));
        }
        if self.threads == 0 {
            return Err(Error::invalid(
                "io_uring backend needs at least one thread (ring)",
            ));
        }
        if self.chunk_size == 0
            || !self.chunk_size.is_multiple_of(CHUNK_GRANULE)
            || self.chunk_size > MAX_CHUNK_SIZE
        {
            return Err(Error::invalid(format!(
                "io_uring chunk size {} must be a non-zero multiple of {CHUNK_GRANULE} bytes, at most {MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        if self.staging_buffers > MAX_STAGING_BUFFERS {
            return Err(Error::invalid(format!(
                "{} staging buffers per ring is too many for io_uring: use at most {MAX_STAGING_BUFFERS}",
                self.staging_buffers
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_stage_a_chunk_per_request_in_flight() {
        let config = UringConfig::default();
        config.validate().unwrap();
        assert_eq!(config.queue_depth, spillway_runtime::DEFAULT_QUEUE_DEPTH);
        assert_eq!(config.staging_buffers_per_ring(), 16, "16 MiB of 1 MiB chunks");
    }

    #[test]
    fn automatic_staging_is_capped_at_64_mib() {
        let config = UringConfig {
            queue_depth: 128,
            chunk_size: 4 << 20,
            ..UringConfig::default()
        };
        assert_eq!(config.staging_buffers_per_ring(), 16);
        let huge = UringConfig {
            chunk_size: 256 << 20,
            ..UringConfig::default()
        };
        assert_eq!(huge.staging_buffers_per_ring(), 1);
    }

    #[test]
    fn an_explicit_count_is_kept() {
        let config = UringConfig {
            staging_buffers: 3,
            ..UringConfig::default()
        };
        assert_eq!(config.staging_buffers_per_ring(), 3);
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |c: UringConfig| c.validate().unwrap_err().to_string();
        assert!(bad(UringConfig {
            queue_depth: 0,
            ..UringConfig::default()
        })
        .contains("queue depth"));
        assert!(bad(UringConfig {
            threads: 0,
            ..UringConfig::default()
        })
        .contains("thread"));
        assert!(bad(UringConfig {
            chunk_size: 1000,
            ..UringConfig::default()
        })
        .contains("chunk size"));
    }
}
