//! Launching the pack and unpack kernels of `kernels/pack.cu` on a caller's stream: one
//! piece-table upload (see [`super::upload`]) and one kernel launch per call, whatever the
//! number of pieces, without waiting for the GPU.
//!
//! The callers ([`super::CudaDevice`]'s `pack` and `unpack`) have checked the stream, the
//! layout and the extent; this module builds the table, sizes the grid and launches.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use spillway_runtime::{DevicePtr, PackPiece, Result};

use super::error::DriverResultExt;
use super::kernels::{Kernel, Module};
use super::pack_table::{self, TableArrays, BLOCK};
use super::raw;
use super::stream::CudaStream;
use super::upload::Uploads;

/// The pack and unpack kernels of one GPU, with the slots their piece tables go through.
pub(crate) struct PackKernels {
    // Dropped first: dropping the slots waits for every queued kernel that read a table, so
    // the module below is not unloaded under a running kernel.
    uploads: Uploads,
    ctx: Arc<CudaContext>,
    gpu: usize,
    pack: Kernel,
    unpack: Kernel,
    module: Module,
}

// SAFETY: CUfunction handles may be used from any thread; they stay valid while `module`
// (owned alongside them) is loaded. The upload slots are behind a mutex.
unsafe impl Send for PackKernels {}
// SAFETY: as above; launching is thread-safe, and every `&self` method only queues work.
unsafe impl Sync for PackKernels {}

impl PackKernels {
    /// Loads the kernels for a GPU of compute capability `cc` with `sm_count` SMs.
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: usize, cc: (u32, u32), sm_count: u32) -> Result<Self> {
        let module = Module::load(ctx, gpu, cc, "pack")?;
        let pack = Kernel::new(&module, gpu, "pack_pieces", BLOCK, sm_count)?;
        let unpack = Kernel::new(&module, gpu, "unpack_pieces", BLOCK, sm_count)?;
        tracing::debug!(
            gpu,
            origin = module.origin(),
            pack_blocks = pack.max_blocks,
            unpack_blocks = unpack.max_blocks,
            "loaded the pack kernels"
        );
        Ok(PackKernels {
            uploads: Uploads::new(ctx, gpu),
            ctx: ctx.clone(),
            gpu,
            pack,
            unpack,
            module,
        })
    }

    /// Queues on `stream` the gather of `pieces` into `[extent, extent + extent_len)`, zeroing
    /// every byte no piece covers, with tiles of `1 << tile_shift` bytes.
    ///
    /// # Safety
    /// [`spillway_runtime::Device::pack`]'s contract; the layout has passed
    /// `check_pack_layout` and `stream` belongs to this GPU.
    pub(crate) unsafe fn pack(
        &self,
        stream: &CudaStream,
        extent: DevicePtr,
        extent_len: u64,
        pieces: &[PackPiece],
        tile_shift: u32,
    ) -> Result<()> {
        if extent_len == 0 {
            return Ok(());
        }
        raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)?;
        if pieces.is_empty() {
            // SAFETY: the extent is live device memory until the stream has passed this point
            // (the caller's contract); the stream is live.
            return unsafe { raw::memset_d8_async(extent, 0, extent_len as usize, stream.cu_stream()) }
                .on_gpu("zeroing an extent with no pieces (cuMemsetD8Async)", self.gpu);
        }
        let n = pieces.len();
        let tiles = pack_table::tile_count(extent_len, tile_shift);
        let grid = pack_table::grid(tiles, self.pack.max_blocks);
        self.uploads.with_table(
            stream,
            pack_table::pack_words(n),
            |words| pack_table::fill_pack(pieces, words),
            |table| {
                let a = TableArrays::pack(table, n);
                let (mut p_extent, mut p_len, mut p_ends, mut p_offs, mut p_mems, mut p_n) =
                    (extent, extent_len, a.keys, a.offs, a.mems, n as u64);
                let mut p_shift = tile_shift;
                let mut params = [
                    &mut p_extent as *mut u64 as *mut c_void,
                    &mut p_len as *mut u64 as *mut c_void,
                    &mut p_ends as *mut u64 as *mut c_void,
                    &mut p_offs as *mut u64 as *mut c_void,
                    &mut p_mems as *mut u64 as *mut c_void,
                    &mut p_n as *mut u64 as *mut c_void,
                    &mut p_shift as *mut u32 as *mut c_void,
                ];
                // SAFETY: `pack` belongs to `self.module`, which is loaded; `params` matches
                // pack_pieces(u8*, u64, const u64*, const u64*, const u64*, u64, u32) and the
                // values outlive the call; the table is queued for upload ahead of the kernel on
                // the same stream and kept until the event recorded after it; the extent and the
                // pieces' memory stay valid until the kernel completes (the caller's contract).
                unsafe { raw::launch(self.pack.f, grid, BLOCK, stream.cu_stream(), &mut params) }
                    .on_gpu("launching pack_pieces (cuLaunchKernel)", self.gpu)
            },
        )
    }

    /// Queues on `stream` the scatter of `[extent, extent + extent_len)` into `pieces`, with
    /// tiles of `1 << tile_shift` bytes.
    ///
    /// # Safety
    /// [`spillway_runtime::Device::unpack`]'s contract; the layout has passed
    /// `check_unpack_layout` and `stream` belongs to this GPU.
    pub(crate) unsafe fn unpack(
        &self,
        stream: &CudaStream,
        extent: DevicePtr,
        pieces: &[PackPiece],
        tile_shift: u32,
    ) -> Result<()> {
        if pieces.is_empty() {
            return Ok(());
        }
        raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)?;
        let n = pieces.len();
        let tiles: u64 = pieces
            .iter()
            .map(|p| pack_table::tile_count(p.len, tile_shift))
            .sum();
        let grid = pack_table::grid(tiles, self.unpack.max_blocks);
        self.uploads.with_table(
            stream,
            pack_table::unpack_words(n),
            |words| {
                pack_table::fill_unpack(pieces, tile_shift, words);
            },
            |table| {
                let a = TableArrays::unpack(table, n);
                let (mut p_extent, mut p_first, mut p_offs, mut p_mems, mut p_lens) =
                    (extent, a.keys, a.offs, a.mems, a.lens);
                let (mut p_n, mut p_tiles, mut p_shift) = (n as u64, tiles, tile_shift);
                let mut params = [
                    &mut p_extent as *mut u64 as *mut c_void,
                    &mut p_first as *mut u64 as *mut c_void,
                    &mut p_offs as *mut u64 as *mut c_void,
                    &mut p_mems as *mut u64 as *mut c_void,
                    &mut p_lens as *mut u64 as *mut c_void,
                    &mut p_n as *mut u64 as *mut c_void,
                    &mut p_tiles as *mut u64 as *mut c_void,
                    &mut p_shift as *mut u32 as *mut c_void,
                ];
                // SAFETY: as in `pack`, for unpack_pieces(const u8*, const u64*, const u64*,
                // const u64*, const u64*, u64, u64, u32).
                unsafe { raw::launch(self.unpack.f, grid, BLOCK, stream.cu_stream(), &mut params) }
                    .on_gpu("launching unpack_pieces (cuLaunchKernel)", self.gpu)
            },
        )
    }

    /// Where the kernels' code came from (see [`Module::origin`]).
    pub(crate) fn origin(&self) -> &str {
        self.module.origin()
    }
}

impl fmt::Debug for PackKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PackKernels({:?}, max {}/{} blocks, {:?})",
            self.module, self.pack.max_blocks, self.unpack.max_blocks, self.uploads
        )
    }
}
