//! [`EngineConfig`]: every setting of the offload engine, with its default.

use std::time::Duration;

use crate::error::{Error, Result};

/// Settings of the offload engine. `EngineConfig::default()` suits a single GPU training a
/// model of a few billion parameters; every field says what it bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Alignment of every extent, and of every piece inside a packed extent (bytes, a power
    /// of two from 512 B to 1 GiB; 4096 suits every NVMe namespace and O_DIRECT
    /// filesystem). Default 4 KiB.
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
    /// Keep a CRC-32C of every 32 KiB of each stored tensor,
    /// computed on the device from the tensor's memory when it is written, and check the
    /// bytes read back against it before a fetch hands them out: a prefetched extent that
    /// fails is dropped and read again by the fetch; a fetch that reads bytes that fail
    /// returns [`Error::Corrupt`]. Costs a device pass over every byte written and read
    /// and 4 bytes of host memory per 32 KiB stored. Default off.
    pub checksums: bool,
    /// The largest storage request a tensor's write or a fetch's read from storage is
    /// submitted as: a larger one is cut at the multiples of this size (in the target's
    /// offsets), so that a backend with several threads (io_uring rings, cuFile workers,
    /// NVMe queue pairs) moves the pieces of one large tensor side by side. Rounded up to a
    /// multiple of `alignment` ([`EngineConfig::io_split_unit`]); 0 never cuts. Default
    /// 64 MiB.
    pub io_split_bytes: u64,
}

/// The least [`EngineConfig::alignment`] may be: the smallest sector of any storage.
const MIN_ALIGNMENT: u64 = 512;

/// The most [`EngineConfig::alignment`] may be: 1 GiB. No storage asks for more (NVMe
/// namespaces and O_DIRECT filesystems ask for 512 B or 4 KiB), every extent and packed
/// piece is rounded up to it, and the staging memory must hold two units of it.
const MAX_ALIGNMENT: u64 = 1 << 30;

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
            checksums: false,
            io_split_bytes: 64 << 20,
        }
    }
}

/// Which of the sizes inside the staging memory a caller set itself (the others are their
/// defaults, which [`EngineConfig::fit_to_staging`] may shrink).
#[derive(Clone, Copy, Debug, Default)]
pub struct SetSizes {
    /// `prefetch_bytes` was given.
    pub prefetch_bytes: bool,
    /// `pack_extent_bytes` was given.
    pub pack_extent_bytes: bool,
    /// `pack_threshold` was given.
    pub pack_threshold: bool,
}

impl EngineConfig {
    /// The one rule for the sizes that live in the staging memory, whoever opens the engine
    /// (CLI, Python, C, Rust): `prefetch_bytes` is at most `staging_bytes`,
    /// `pack_extent_bytes` at most half of it, `pack_threshold` at most `pack_extent_bytes`.
    /// A size the caller left at its default shrinks to fit a smaller staging memory
    /// (prefetch and pack extent to half of it, the threshold to the extent); a size the
    /// caller gave is kept as given, and [`validate`](Self::validate) refuses it if it does
    /// not fit.
    pub fn fit_to_staging(&mut self, set: SetSizes) {
        let half = self.staging_bytes / 2;
        if !set.prefetch_bytes {
            self.prefetch_bytes = self.prefetch_bytes.min(half);
        }
        if !set.pack_extent_bytes {
            self.pack_extent_bytes = self.pack_extent_bytes.min(half);
        }
        if !set.pack_threshold {
            self.pack_threshold = self.pack_threshold.min(self.pack_extent_bytes);
        }
    }

    /// The size storage requests are cut at: `io_split_bytes` rounded up to a multiple of
    /// `alignment` (so that every cut falls on an aligned offset), 0 for none.
    pub fn io_split_unit(&self) -> u64 {
        match self.io_split_bytes {
            0 => 0,
            n => n.div_ceil(self.alignment).saturating_mul(self.alignment),
        }
    }

    /// Checks that the settings fit together; a refusal names the settings involved
    /// ([`ConfigError::settings`]). Never overflows, whatever the values: arithmetic on
    /// them is checked.
    pub fn check(&self) -> std::result::Result<(), ConfigError> {
        let bad = |settings: &[&'static str], message: String| {
            Err(ConfigError {
                settings: settings.to_vec(),
                message,
            })
        };
        if !self.alignment.is_power_of_two() || !(MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&self.alignment) {
            return bad(&["alignment"], format!(
                "alignment {} must be a power of two from {MIN_ALIGNMENT} bytes to 1 GiB ({MAX_ALIGNMENT} bytes): \
                 set it to 4096, which suits every NVMe namespace and O_DIRECT filesystem, or to what the storage needs",
                self.alignment
            ));
        }
        let two_units = match self.alignment.checked_mul(2) {
            Some(n) => n,
            None => {
                return bad(
                    &["alignment"],
                    format!(
                        "alignment {} is too large: two alignment units pass 2^64 bytes; set it to 4096",
                        self.alignment
                    ),
                )
            }
        };
        if self.staging_bytes < two_units {
            return bad(
                &["staging_bytes", "alignment"],
                format!(
                "staging_bytes {} is too small: at least two alignment units ({two_units} bytes) are needed",
                self.staging_bytes,
            ),
            );
        }
        if self.prefetch_bytes > self.staging_bytes {
            return bad(
                &["prefetch_bytes", "staging_bytes"],
                format!(
                    "prefetch_bytes {} exceeds staging_bytes {}: prefetches live in the staging memory",
                    self.prefetch_bytes, self.staging_bytes
                ),
            );
        }
        if self.pack && self.pack_extent_bytes == 0 {
            return bad(&["pack_extent_bytes", "pack"],
                "pack_extent_bytes is 0: a packed extent must hold something; give it a size (16MiB suits most workloads) or turn pack off".into(),
            );
        }
        if self.pack && self.pack_extent_bytes > self.staging_bytes / 2 {
            return bad(&["pack_extent_bytes", "staging_bytes"], format!(
                "pack_extent_bytes {} must be at most half of staging_bytes {}, so that packing and writing can overlap",
                self.pack_extent_bytes, self.staging_bytes
            ));
        }
        if self.pack && self.pack_threshold > self.pack_extent_bytes {
            return bad(
                &["pack_threshold", "pack_extent_bytes"],
                format!(
                "pack_threshold {} exceeds pack_extent_bytes {}: a packed tensor must fit in a packed extent",
                self.pack_threshold, self.pack_extent_bytes
            ),
            );
        }
        if self.direct_write_bytes == 0 {
            return bad(
                &["direct_write_bytes"],
                "direct_write_bytes must be at least 1".into(),
            );
        }
        if self.io_retries > MAX_IO_RETRIES {
            return bad(&["io_retries"], format!(
                "io_retries {} exceeds {MAX_IO_RETRIES}: a request failing that often is not failing by chance",
                self.io_retries
            ));
        }
        Ok(())
    }

    /// [`check`](Self::check), its refusal as the crate's [`Error::InvalidArgument`].
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(Error::from)
    }
}

/// A refusal of [`EngineConfig::check`]: what is wrong, and the settings involved, by
/// their names in the settings table, the first the one the message is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The settings involved, in the order the message names them.
    pub settings: Vec<&'static str>,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    /// "engine settings: MESSAGE".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "engine settings: {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::invalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_shrink_to_a_small_staging_and_given_sizes_are_kept() {
        let mut c = EngineConfig {
            staging_bytes: 64 << 20,
            ..Default::default()
        };
        c.fit_to_staging(SetSizes::default());
        assert_eq!(
            (c.prefetch_bytes, c.pack_extent_bytes, c.pack_threshold),
            (32 << 20, 16 << 20, 1 << 20)
        );
        c.validate().unwrap();

        let mut tiny = EngineConfig {
            staging_bytes: 1 << 20,
            ..Default::default()
        };
        tiny.fit_to_staging(SetSizes::default());
        assert_eq!(
            (tiny.prefetch_bytes, tiny.pack_extent_bytes, tiny.pack_threshold),
            (512 << 10, 512 << 10, 512 << 10)
        );
        tiny.validate().unwrap();

        let mut given = EngineConfig {
            staging_bytes: 64 << 20,
            prefetch_bytes: 256 << 20,
            ..Default::default()
        };
        given.fit_to_staging(SetSizes {
            prefetch_bytes: true,
            ..Default::default()
        });
        assert_eq!(given.prefetch_bytes, 256 << 20, "a given size is kept");
        assert!(given
            .validate()
            .unwrap_err()
            .to_string()
            .contains("prefetch_bytes"));
    }

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
            pack_extent_bytes: 0,
            pack_threshold: 0,
            ..Default::default()
        };
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pack_extent_bytes is 0"));
        let e = EngineConfig {
            io_retries: MAX_IO_RETRIES + 1,
            ..Default::default()
        };
        assert!(e.validate().unwrap_err().to_string().contains("io_retries"));
    }

    #[test]
    fn requests_are_cut_at_a_multiple_of_the_alignment() {
        for (split, alignment, unit) in [
            (0, 4096, 0),
            (1000, 4096, 4096),
            (4096 + 512, 4096, 8192),
            (64 << 20, 4096, 64 << 20),
            (64 << 20, 1 << 30, 1 << 30),
            (u64::MAX, 1 << 30, u64::MAX),
        ] {
            let e = EngineConfig {
                io_split_bytes: split,
                alignment,
                ..Default::default()
            };
            assert_eq!(
                e.io_split_unit(),
                unit,
                "io_split_bytes {split}, alignment {alignment}"
            );
        }
    }

    #[test]
    fn alignments_past_the_maximum_are_refused_without_overflow() {
        for shift in 0..64 {
            let e = EngineConfig {
                alignment: 1 << shift,
                staging_bytes: u64::MAX,
                prefetch_bytes: 0,
                ..Default::default()
            };
            let ok = (MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&e.alignment);
            match e.validate() {
                Ok(()) => assert!(ok, "alignment 2^{shift} accepted"),
                Err(err) => {
                    assert!(!ok, "alignment 2^{shift}: {err}");
                    let text = err.to_string();
                    assert!(
                        text.contains(&format!("alignment {} must be", e.alignment))
                            && text.contains("1 GiB")
                            && text.contains("4096"),
                        "{text}"
                    );
                }
            }
        }
        let e = EngineConfig {
            alignment: 1 << 63,
            ..Default::default()
        };
        let text = e.validate().unwrap_err().to_string();
        assert!(text.contains("alignment 9223372036854775808"), "{text}");
        // The largest alignment needs two units of staging memory.
        let e = EngineConfig {
            alignment: MAX_ALIGNMENT,
            staging_bytes: 2 * MAX_ALIGNMENT - 1,
            prefetch_bytes: 0,
            ..Default::default()
        };
        assert!(e.validate().unwrap_err().to_string().contains("staging_bytes"));
        EngineConfig {
            staging_bytes: 2 * MAX_ALIGNMENT,
            ..e
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn the_largest_sizes_are_checked_without_overflow() {
        let e = EngineConfig {
            staging_bytes: u64::MAX,
            prefetch_bytes: u64::MAX,
            pack_extent_bytes: u64::MAX / 2,
            pack_threshold: u64::MAX / 2,
            direct_write_bytes: u64::MAX,
            ..Default::default()
        };
        e.validate().unwrap();
        let e = EngineConfig {
            pack_extent_bytes: u64::MAX / 2 + 1,
            ..e
        };
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pack_extent_bytes"));
    }
}
