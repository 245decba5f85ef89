//! Launching the test-pattern kernels (`kernels/pattern.cu`): `fill_pattern` and
//! `count_pattern_mismatches`, on a stream of their own, waiting until they are done.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUfunction};
use cudarc::driver::CudaContext;
use spillway_runtime::Result;

use super::error::DriverResultExt;
use super::kernels::Module;
use super::memory::{self, DeviceAlloc};
use super::raw;
use super::stream::CudaStream;

/// Threads per block.
const BLOCK: u32 = 256;
/// Resident blocks per SM worth launching for a grid-stride loop.
const BLOCKS_PER_SM: u32 = 8;

/// The pattern kernels of one GPU, with their stream and the mismatch counter.
pub(crate) struct PatternKernels {
    ctx: Arc<CudaContext>,
    gpu: usize,
    module: Module,
    fill: CUfunction,
    count: CUfunction,
    stream: CudaStream,
    counter: DeviceAlloc,
    max_blocks: u32,
}

// SAFETY: CUfunction handles may be used from any thread; they stay valid while `module`
// (owned alongside them) is loaded.
unsafe impl Send for PatternKernels {}

impl PatternKernels {
    /// Loads the kernels for a GPU of compute capability `cc` with `sm_count` SMs.
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: usize, cc: (u32, u32), sm_count: u32) -> Result<Self> {
        let module = Module::load(ctx, gpu, cc, "pattern")?;
        let fill = module.function("fill_pattern")?;
        let count = module.function("count_pattern_mismatches")?;
        tracing::debug!(gpu, origin = module.origin(), "loaded the pattern kernels");
        Ok(PatternKernels {
            ctx: ctx.clone(),
            gpu,
            fill,
            count,
            stream: CudaStream::new(ctx, gpu)?,
            counter: DeviceAlloc::new(ctx, gpu, std::mem::size_of::<u64>())?,
            max_blocks: sm_count.max(1) * BLOCKS_PER_SM,
            module,
        })
    }

    /// Where the kernels' code came from (see [`Module::origin`]).
    pub(crate) fn origin(&self) -> &str {
        self.module.origin()
    }

    /// Fills `[dst, dst + len)` with the pattern for `seed` starting at pattern byte
    /// `offset`, and waits.
    pub(crate) fn fill(&self, dst: CUdeviceptr, len: usize, seed: u64, offset: u64) -> Result<()> {
        let _span =
            tracing::debug_span!("cuda_fill_pattern", gpu = self.gpu, dst, len, seed, offset).entered();
        if len == 0 {
            return Ok(());
        }
        self.check_region("fill_pattern", dst, len)?;
        let (mut p_dst, mut p_len, mut p_seed, mut p_offset) = (dst, len as u64, seed, offset);
        let mut params = [
            &mut p_dst as *mut u64 as *mut c_void,
            &mut p_len as *mut u64 as *mut c_void,
            &mut p_seed as *mut u64 as *mut c_void,
            &mut p_offset as *mut u64 as *mut c_void,
        ];
        let grid = self.grid(len);
        // SAFETY: `fill` belongs to `self.module`, which is loaded; `params` matches the
        // kernel's (u8*, u64, u64, u64) signature and the values outlive the call; the region
        // lies within one live allocation (checked above) and the caller keeps it alive, as
        // we wait for the kernel before returning; the stream is live.
        unsafe { raw::launch(self.fill, grid, BLOCK, self.stream.cu_stream(), &mut params) }
            .on_gpu("launching fill_pattern (cuLaunchKernel)", self.gpu)?;
        self.wait("fill_pattern")
    }

    /// Counts the bytes of `[src, src + len)` that differ from the pattern, and waits.
    pub(crate) fn count_mismatches(
        &self,
        src: CUdeviceptr,
        len: usize,
        seed: u64,
        offset: u64,
    ) -> Result<u64> {
        let _span = tracing::debug_span!(
            "cuda_count_pattern_mismatches",
            gpu = self.gpu,
            src,
            len,
            seed,
            offset
        )
        .entered();
        if len == 0 {
            return Ok(0);
        }
        self.check_region("count_pattern_mismatches", src, len)?;
        let stream = self.stream.cu_stream();
        let counter = self.counter.ptr();
        // SAFETY: the counter is a live 8-byte device allocation used only under the
        // device's kernel lock (held by our caller); the stream is live.
        unsafe { raw::memset_d8_async(counter, 0, std::mem::size_of::<u64>(), stream) }
            .on_gpu("zeroing the mismatch counter (cuMemsetD8Async)", self.gpu)?;
        let (mut p_src, mut p_len, mut p_seed, mut p_offset, mut p_count) =
            (src, len as u64, seed, offset, counter);
        let mut params = [
            &mut p_src as *mut u64 as *mut c_void,
            &mut p_len as *mut u64 as *mut c_void,
            &mut p_seed as *mut u64 as *mut c_void,
            &mut p_offset as *mut u64 as *mut c_void,
            &mut p_count as *mut u64 as *mut c_void,
        ];
        // SAFETY: as in `fill`, for the (const u8*, u64, u64, u64, u64*) signature; the
        // counter is live device memory.
        unsafe { raw::launch(self.count, self.grid(len), BLOCK, stream, &mut params) }
            .on_gpu("launching count_pattern_mismatches (cuLaunchKernel)", self.gpu)?;
        let mut mismatches: u64 = 0;
        // SAFETY: `mismatches` is valid for 8 bytes of writes and outlives the copy, because
        // `wait` below blocks until the stream is idle before it is read.
        unsafe {
            raw::memcpy_dtoh_async(
                &mut mismatches as *mut u64 as *mut u8,
                counter,
                std::mem::size_of::<u64>(),
                stream,
            )
        }
        .on_gpu("reading the mismatch counter (cuMemcpyDtoHAsync)", self.gpu)?;
        self.wait("count_pattern_mismatches")?;
        Ok(mismatches)
    }

    /// Blocks for a grid-stride loop over `len` bytes: enough for one 8-byte word per
    /// thread, at most `max_blocks`.
    fn grid(&self, len: usize) -> u32 {
        let words = (len as u64) / 8 + 1;
        let needed = words.div_ceil(u64::from(BLOCK));
        needed.clamp(1, u64::from(self.max_blocks)) as u32
    }

    /// Checks that `[ptr, ptr + len)` lies within one device allocation, so a bad pointer
    /// is an error rather than a kernel fault that would wreck the context.
    fn check_region(&self, kernel: &str, ptr: CUdeviceptr, len: usize) -> Result<()> {
        memory::check_device_region(&self.ctx, self.gpu, kernel, ptr, len as u64)
    }

    /// Waits for the stream, naming the kernel in the error.
    fn wait(&self, kernel: &str) -> Result<()> {
        // SAFETY: the stream is live.
        unsafe { raw::stream_synchronize(self.stream.cu_stream()) }
            .on_gpu(&format!("{kernel} (cuStreamSynchronize)"), self.gpu)
    }
}

impl Drop for PatternKernels {
    fn drop(&mut self) {
        // The module must not be unloaded under a running kernel. Every method waits before
        // returning, so this only matters after an error.
        if let Err(e) = self.wait("pattern kernels") {
            tracing::warn!(gpu = self.gpu, "{e}");
        }
    }
}

impl fmt::Debug for PatternKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PatternKernels({:?}, max {} blocks)",
            self.module, self.max_blocks
        )
    }
}
