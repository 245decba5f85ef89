//! Setting up one io_uring: the ring itself, its registered staging buffers, and what to
//! tell the user when the kernel refuses.

use std::io;

use io_uring::IoUring;
use spillway_runtime::{Device, Error, Result};

use crate::staging::StagingPool;

/// A ring and the staging buffers registered with it.
///
/// Field order matters: the ring is dropped (and the buffers unregistered) before the
/// buffers are freed.
pub struct Ring {
    /// The io_uring instance.
    pub uring: IoUring,
    /// The staging buffers; registered with `uring` when `fixed_buffers` is true.
    pub staging: StagingPool,
    /// Whether the staging buffers are registered (use `ReadFixed` / `WriteFixed`).
    pub fixed_buffers: bool,
    /// Why they are not registered, when they are not.
    pub fixed_buffers_error: Option<String>,
    /// Whether the kernel takes a timeout when waiting (`IORING_FEAT_EXT_ARG`, Linux 5.11).
    pub timed_wait: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("entries", &self.uring.params().sq_entries())
            .field("staging", &self.staging)
            .field("fixed_buffers", &self.fixed_buffers)
            .field("timed_wait", &self.timed_wait)
            .finish()
    }
}

impl Ring {
    /// A ring with room for `queue_depth` I/Os plus the worker's wake-up poll, and
    /// `buffers` staging buffers of `buffer_size` bytes from `device`, registered as fixed
    /// buffers. The ring is created first, so a kernel without io_uring is reported before
    /// any memory is pinned.
    ///
    /// When the kernel refuses the registration (old kernels reject memory that is not
    /// anonymous, such as some pinned allocations of a GPU driver; or the locked-memory
    /// limit is too low), the ring still works with plain reads and writes from the same
    /// buffers, and the reason is logged and kept for reports.
    pub fn new(queue_depth: u32, device: &dyn Device, buffers: usize, buffer_size: usize) -> Result<Ring> {
        let entries = (queue_depth + 1).next_power_of_two();
        let uring = create(entries)?;
        let timed_wait = uring.params().is_feature_ext_arg();
        let staging = StagingPool::new(device, buffers, buffer_size)?;
        let iovecs = staging.iovecs();
        // SAFETY: the iovecs describe the pool's live buffers; the pool is stored next to the
        // ring and outlives it (see the field order of `Ring`).
        let registered = unsafe { uring.submitter().register_buffers(&iovecs) };
        let fixed_buffers_error = registered.err().map(|e| {
            let reason = registration_error(&e, staging.count(), staging.buffer_size());
            tracing::warn!("{reason}; staging buffers are used without registration");
            reason
        });
        Ok(Ring {
            uring,
            staging,
            fixed_buffers: fixed_buffers_error.is_none(),
            fixed_buffers_error,
            timed_wait,
        })
    }
}

/// Creates a ring of `entries` entries, mapping the kernel's refusals to
/// [`Error::Unavailable`].
pub fn create(entries: u32) -> Result<IoUring> {
    IoUring::builder()
        .build(entries)
        .map_err(|e| match unavailable_reason(&e) {
            Some(reason) => Error::Unavailable {
                what: "io_uring".into(),
                reason,
            },
            None => Error::io(format!("creating an io_uring with {entries} entries"), e),
        })
}

/// Is io_uring usable on this kernel? Creates and drops a tiny ring.
pub fn probe() -> std::result::Result<(), String> {
    match IoUring::new(2) {
        Ok(_) => Ok(()),
        Err(e) => Err(unavailable_reason(&e).unwrap_or_else(|| format!("creating a test ring failed: {e}"))),
    }
}

/// Why io_uring is unavailable, when `err` (from `io_uring_setup`) says it is.
fn unavailable_reason(err: &io::Error) -> Option<String> {
    match err.raw_os_error() {
        Some(libc::ENOSYS) => Some(
            "the kernel does not provide io_uring (ENOSYS): it is older than 5.1 or built without CONFIG_IO_URING; use a newer kernel or another backend"
                .into(),
        ),
        Some(libc::EPERM) => Some(format!(
            "the kernel refused to create an io_uring (EPERM): it is disabled by the sysctl kernel.io_uring_disabled{} or blocked by a seccomp profile (containers often block it); set kernel.io_uring_disabled=0, allow io_uring_setup in the container, or use another backend",
            sysctl_value()
        )),
        _ => None,
    }
}

fn sysctl_value() -> String {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|v| format!(" (currently {})", v.trim()))
        .unwrap_or_default()
}

fn registration_error(err: &io::Error, count: usize, size: usize) -> String {
    let hint = match err.raw_os_error() {
        Some(libc::ENOMEM) => ": the locked-memory limit (ulimit -l, RLIMIT_MEMLOCK) is too low for them; raise it, or use fewer or smaller staging buffers",
        Some(libc::EOPNOTSUPP) | Some(libc::EFAULT) => ": the kernel cannot pin this memory (file-backed, such as a GPU driver's own pinned allocation, on kernels before 6.x); anonymous memory page-locked for the GPU avoids this",
        _ => "",
    };
    format!("registering {count} staging buffers of {size} bytes with io_uring failed ({err}){hint}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_runtime::HostDevice;

    #[test]
    fn probe_succeeds_here() {
        probe().unwrap();
    }

    #[test]
    fn staging_buffers_are_registered() {
        let ring = Ring::new(8, &HostDevice::new(), 4, 1 << 16).unwrap();
        assert!(ring.fixed_buffers, "{:?}", ring.fixed_buffers_error);
        assert!(ring.uring.params().sq_entries() >= 9);
    }

    #[test]
    fn refusals_say_what_to_do() {
        let eperm = unavailable_reason(&io::Error::from_raw_os_error(libc::EPERM)).unwrap();
        assert!(
            eperm.contains("io_uring_disabled") && eperm.contains("seccomp"),
            "{eperm}"
        );
        let enosys = unavailable_reason(&io::Error::from_raw_os_error(libc::ENOSYS)).unwrap();
        assert!(enosys.contains("5.1"), "{enosys}");
        assert!(unavailable_reason(&io::Error::from_raw_os_error(libc::ENOMEM)).is_none());
    }
}
