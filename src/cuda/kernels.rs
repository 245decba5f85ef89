//! The GPU kernels of `kernels/*.cu`, embedded in this binary by `build.rs`, and loading
//! them into a GPU's context.
//!
//! Each module is embedded as CUDA C source and, when the build found nvcc, also as PTX.
//! Loading prefers the PTX (the driver JIT-compiles it for the GPU). Without PTX — or when
//! the driver rejects it (a PTX newer than the driver, or an architecture newer than the
//! GPU) — the source is compiled by NVRTC for the GPU's architecture, on first use (see
//! [`nvrtc`]).

use std::ffi::CString;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::{CUfunction, CUmodule, CUresult};
use cudarc::driver::CudaContext;
use spillway_runtime::{Error, Result};

use super::error::{self, DriverResultExt};
use super::nvrtc::{self, Code};
use super::raw;

/// One kernel file as embedded by `build.rs`.
#[derive(Debug)]
pub(crate) struct EmbeddedModule {
    /// The file's stem: "pattern" for kernels/pattern.cu.
    pub(crate) name: &'static str,
    /// The CUDA C source.
    pub(crate) source: &'static str,
    /// PTX from nvcc, when the build had it.
    pub(crate) ptx: Option<&'static str>,
    /// The virtual architecture of that PTX ("compute_75").
    pub(crate) ptx_arch: Option<&'static str>,
}

// `KERNEL_BUILD` and `MODULES`, written by build.rs.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// How the kernels were built into this binary, e.g. "PTX from nvcc 12.4 (compute_75; the
/// driver JIT-compiles it for the GPU)" or "CUDA C source, compiled by NVRTC at first use (no
/// nvcc found at build time)".
pub fn kernel_build() -> &'static str {
    KERNEL_BUILD
}

/// The embedded module `name`.
fn embedded(name: &str) -> Result<&'static EmbeddedModule> {
    MODULES
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| Error::Device(format!("kernels/{name}.cu is not embedded in this build")))
}

/// A module loaded into a GPU's context, unloaded on drop.
pub(crate) struct Module {
    ctx: Arc<CudaContext>,
    gpu: usize,
    name: &'static str,
    module: CUmodule,
    origin: String,
}

// SAFETY: a CUmodule handle may be used from any thread; it is unloaded only in drop.
unsafe impl Send for Module {}
// SAFETY: looking up functions is a thread-safe driver call.
unsafe impl Sync for Module {}

impl Module {
    /// Loads embedded module `name` for a GPU of compute capability `cc`.
    pub(crate) fn load(ctx: &Arc<CudaContext>, gpu: usize, cc: (u32, u32), name: &str) -> Result<Module> {
        let _span = tracing::debug_span!("cuda_load_module", gpu, module = name).entered();
        let embedded = embedded(name)?;
        raw::bind(ctx).on_gpu("cuCtxSetCurrent", gpu)?;
        let module = |module, origin| Module {
            ctx: ctx.clone(),
            gpu,
            name: embedded.name,
            module,
            origin,
        };

        let mut ptx_failure = None;
        if let Some(ptx) = embedded.ptx {
            let arch = embedded.ptx_arch.unwrap_or("?");
            let text = CString::new(ptx).map_err(|_| {
                Error::Device(format!("the embedded PTX of kernels/{name}.cu holds a NUL byte"))
            })?;
            match raw::module_load_ptx(&text) {
                Ok(m) => return Ok(module(m, format!("PTX for {arch} built by nvcc"))),
                Err(e) if nvrtc_may_help(e) => {
                    let failure = error::driver(
                        &format!(
                            "loading the nvcc-built PTX ({arch}) of kernels/{name}.cu (cuModuleLoadData)"
                        ),
                        Some(gpu),
                        e,
                    );
                    tracing::warn!("{failure}; compiling the source with NVRTC instead");
                    ptx_failure = Some(failure);
                }
                Err(e) => {
                    return Err(error::driver(
                        &format!("loading kernels/{name}.cu (cuModuleLoadData)"),
                        Some(gpu),
                        e,
                    ))
                }
            }
        }

        let compiled = nvrtc::compile(name, embedded.source, cc).map_err(|e| match &ptx_failure {
            Some(first) => Error::Device(format!(
                "{first}; compiling the source with NVRTC instead failed too: {e}"
            )),
            None => e,
        })?;
        let (kind, loaded) = match &compiled.code {
            Code::Cubin(cubin) => ("CUBIN", raw::module_load_cubin(cubin)),
            Code::Ptx(ptx) => ("PTX", raw::module_load_ptx(ptx)),
        };
        let origin = format!(
            "{kind} for {} compiled by NVRTC {}.{}",
            compiled.target, compiled.version.0, compiled.version.1
        );
        match loaded {
            Ok(m) => Ok(module(m, origin)),
            Err(e) => Err(error::driver(
                &format!("loading kernels/{name}.cu ({origin}) (cuModuleLoadData)"),
                Some(gpu),
                e,
            )),
        }
    }

    /// The kernel `name` of this module, valid while the module lives.
    pub(crate) fn function(&self, name: &str) -> Result<CUfunction> {
        let c_name = CString::new(name).map_err(|_| Error::invalid(format!("bad kernel name {name:?}")))?;
        raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)?;
        // SAFETY: the module is loaded, and stays loaded as long as `self` (callers keep the
        // module alongside its functions).
        unsafe { raw::module_function(self.module, &c_name) }.on_gpu(
            &format!("looking up kernel {name} in kernels/{}.cu", self.name),
            self.gpu,
        )
    }

    /// Where the loaded code came from: "PTX for compute_75 built by nvcc", "CUBIN for
    /// sm_90 compiled by NVRTC 12.4".
    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }
}

/// Errors of loading nvcc-built PTX that compiling the source with NVRTC may avoid.
fn nvrtc_may_help(e: DriverError) -> bool {
    matches!(
        e.0,
        CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
            | CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
            | CUresult::CUDA_ERROR_INVALID_PTX
            | CUresult::CUDA_ERROR_INVALID_IMAGE
    )
}

/// One kernel of a loaded module and the most blocks of it worth launching at once (what
/// fits on the GPU: the SM count times the blocks of `block` threads one SM holds).
#[derive(Debug)]
pub(crate) struct Kernel {
    pub(crate) f: CUfunction,
    pub(crate) max_blocks: u32,
}

impl Kernel {
    /// Kernel `name` of `module`, launched in blocks of `block` threads on a GPU with
    /// `sm_count` SMs.
    pub(crate) fn new(module: &Module, gpu: usize, name: &str, block: u32, sm_count: u32) -> Result<Kernel> {
        let f = module.function(name)?;
        // SAFETY: `f` belongs to `module`, which is loaded.
        let per_sm = unsafe { raw::occupancy_max_blocks(f, block) }.on_gpu(
            &format!("cuOccupancyMaxActiveBlocksPerMultiprocessor({name})"),
            gpu,
        )?;
        Ok(Kernel {
            f,
            max_blocks: sm_count.max(1) * per_sm.max(1),
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let what = format!("cuModuleUnload({})", self.name);
        error::release_logged(&self.ctx, self.gpu, &what, || {
            // SAFETY: loaded in `load`, unloaded only here; owners of its functions finish
            // their launches before dropping the module.
            unsafe { raw::module_unload(self.module) }
        });
    }
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Module(kernels/{}.cu on GPU {}: {})",
            self.name, self.gpu, self.origin
        )
    }
}
