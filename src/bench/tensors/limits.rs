//! The bounds of the tensors workload, checked before anything is allocated: a source and
//! a destination arena must fit in the memory they live in (GPU or host), beside the
//! engine's staging memory and some headroom. (The storage is the engine builder's to
//! account, per filesystem: see [`crate::open::OpenError::Capacity`].)

use spillway_runtime::{Error, Result};

use crate::select::Memory;
use crate::size::format_size;

/// Memory always left free: at least this much…
const MIN_HEADROOM: u64 = 512 << 20;
/// …or this fraction of what is available, whichever is more.
const HEADROOM_FRACTION: u64 = 10;

/// How much of a memory a run may use, and where the figure came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Available {
    /// Bytes available now.
    pub bytes: u64,
    /// What they are, for messages ("MemAvailable in /proc/meminfo").
    pub source: String,
}

/// Checks that `arenas` bytes (both arenas) fit in `memory` beside `staging` bytes of engine
/// staging. Returns notes for the report (e.g. that the memory could not be measured).
pub fn check(memory: &Memory, arenas: u64, staging: u64) -> Result<Vec<String>> {
    let available = match available(memory) {
        Ok(a) => a,
        Err(why) => {
            return Ok(vec![format!(
                "free {} memory unknown ({why}): the memory bound was not checked",
                memory.name()
            )])
        }
    };
    let headroom = MIN_HEADROOM.max(available.bytes / HEADROOM_FRACTION);
    let usable = available.bytes.saturating_sub(staging).saturating_sub(headroom);
    if arenas > usable {
        return Err(Error::invalid(format!(
            "the tensors workload needs {} of {} memory (a source and a destination arena of {} each), but only {} may be used ({} {}, less {} of engine staging and {} of headroom); lower --tensors or --max-size (or --staging)",
            format_size(arenas),
            memory.name(),
            format_size(arenas / 2),
            format_size(usable),
            format_size(available.bytes),
            available.source,
            format_size(staging),
            format_size(headroom),
        )));
    }
    Ok(Vec::new())
}

/// The memory available now in `memory`.
fn available(memory: &Memory) -> std::result::Result<Available, String> {
    match memory {
        Memory::Host => {
            let text = std::fs::read_to_string("/proc/meminfo")
                .map_err(|e| format!("reading /proc/meminfo: {e}"))?;
            let bytes = mem_available(&text).ok_or("no MemAvailable line in /proc/meminfo")?;
            Ok(Available {
                bytes,
                source: "MemAvailable in /proc/meminfo".into(),
            })
        }
        Memory::Gpu(gpu) => match gpu.context().mem_get_info() {
            Ok((free, _total)) => Ok(Available {
                bytes: free as u64,
                source: format!("free on GPU {} (cuMemGetInfo)", gpu.ordinal()),
            }),
            Err(e) => {
                tracing::debug!("cuMemGetInfo failed ({e}); using the GPU's total memory");
                Ok(Available {
                    bytes: gpu.gpu_info().total_memory,
                    source: format!("total on GPU {}", gpu.ordinal()),
                })
            }
        },
    }
}

/// The `MemAvailable` figure of a /proc/meminfo text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line["MemAvailable:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal:       24000000 kB\nMemFree:        1000 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(mem_available(text), Some(22_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn arenas_beyond_host_memory_are_refused_with_the_flags_to_change() {
        let err = check(&Memory::Host, u64::MAX / 2, 512 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tensors") && err.contains("--max-size"), "{err}");
        assert!(check(&Memory::Host, 1 << 20, 1 << 20).unwrap().is_empty());
    }
}
