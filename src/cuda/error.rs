//! Mapping CUDA driver errors to the runtime's [`Error`], with the call that failed, the
//! GPU it failed on and, for the errors users can act on, what to do.

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::CUresult;
use spillway_runtime::{Error, Result};

/// "CUDA_ERROR_OUT_OF_MEMORY (out of memory)".
pub(crate) fn describe(e: DriverError) -> String {
    let name = format!("{:?}", e.0);
    match e.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// What a user can do about an error, when there is something.
fn hint(code: CUresult) -> &'static str {
    match code {
        CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            ": the kernels' PTX is newer than this driver understands; update the NVIDIA driver, or \
             rebuild with an older CUDA toolkit (or with SPILLWAY_NO_NVCC=1 and an NVRTC no newer \
             than the driver on LD_LIBRARY_PATH)"
        }
        CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU | CUresult::CUDA_ERROR_INVALID_PTX => {
            ": the embedded kernels were built for a newer GPU architecture than this one; rebuild \
             with SPILLWAY_NVCC_ARCH=compute_<yours> or SPILLWAY_NO_NVCC=1"
        }
        CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
            ": the libcuda in use does not match the NVIDIA kernel driver; reinstall the driver, or \
             take the CUDA forward-compatibility libraries off LD_LIBRARY_PATH"
        }
        CUresult::CUDA_ERROR_STUB_LIBRARY => {
            ": the libcuda loaded is the CUDA toolkit's stub library, not the driver's; take the \
             toolkit's lib64/stubs directory off LD_LIBRARY_PATH"
        }
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS | CUresult::CUDA_ERROR_LAUNCH_FAILED => {
            ": device work touched memory it must not; the GPU context is unusable from now on \
             and the process must be restarted"
        }
        CUresult::CUDA_ERROR_NO_DEVICE => {
            ": the driver sees no GPU; check `nvidia-smi`, the /dev/nvidia* device files and \
             CUDA_VISIBLE_DEVICES"
        }
        _ => "",
    }
}

/// [`describe`], followed by what to do about it when there is something.
pub(crate) fn explain(e: DriverError) -> String {
    format!("{}{}", describe(e), hint(e.0))
}

/// An [`Error::Device`] saying which call failed on which GPU, and why.
pub(crate) fn driver(call: &str, gpu: Option<usize>, e: DriverError) -> Error {
    let on = gpu.map(|g| format!(" on GPU {g}")).unwrap_or_default();
    Error::Device(format!("{call} failed{on}: {}", explain(e)))
}

/// Like [`driver`], but an out-of-memory error becomes [`Error::OutOfMemory`].
pub(crate) fn alloc(kind: &'static str, bytes: usize, call: &str, gpu: usize, e: DriverError) -> Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory { kind, bytes }
    } else {
        driver(call, Some(gpu), e)
    }
}

/// Attaches context to a driver result.
pub(crate) trait DriverResultExt<T> {
    /// Maps the error with [`driver`], naming the call and the GPU.
    fn on_gpu(self, call: &str, gpu: usize) -> Result<T>;
}

impl<T> DriverResultExt<T> for std::result::Result<T, DriverError> {
    fn on_gpu(self, call: &str, gpu: usize) -> Result<T> {
        self.map_err(|e| driver(call, Some(gpu), e))
    }
}

/// Runs a release call (free, unregister, unload) from a `Drop` with `ctx` bound to the
/// thread; a failure is logged, never raised, since drops cannot fail.
pub(crate) fn release_logged(
    ctx: &cudarc::driver::CudaContext,
    gpu: usize,
    what: &str,
    release: impl FnOnce() -> std::result::Result<(), DriverError>,
) {
    if let Err(e) = super::raw::bind(ctx).and_then(|()| release()) {
        tracing::warn!(gpu, "{what} failed: {}", describe(e));
    }
}
