//! [`CudaDevice`]: the runtime's [`Device`] on one GPU, in that GPU's primary context.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaContext;
use spillway_runtime::{
    Device, DeviceBuffer, DeviceInfo, DeviceKind, DevicePtr, Error, HostRegistration, PackPiece,
    PendingChecksums, PinnedBuffer, Result, Stream,
};

use super::crc::{self, CrcKernels};
use super::error::{self, DriverResultExt};
use super::launch::PatternKernels;
use super::memory::{self, DeviceAlloc, PinnedAlloc};
use super::pack::PackKernels;
use super::pack_table;
use super::probe::{self, GpuInfo};
use super::raw;
use super::stream::CudaStream;

/// One GPU, attached through its *primary context* — the context the CUDA runtime (and so
/// PyTorch) uses — so memory and streams are shared with the framework.
///
/// Every method binds the context to the calling thread first, so a `CudaDevice` works from
/// any thread. Kernels are loaded on first use.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    gpu: GpuInfo,
    sm_count: u32,
    /// The pattern kernels, loaded on first use; the lock also serializes their launches.
    kernels: Mutex<Option<PatternKernels>>,
    /// The pack kernels, loaded on first use (the lock is held only to load them).
    pack_kernels: Mutex<Option<Arc<PackKernels>>>,
    /// log2 of the pack kernels' tile size.
    pack_tile_shift: AtomicU32,
    /// The CRC-32C kernel, loaded on first use (the lock is held only to load it).
    crc_kernels: Mutex<Option<Arc<CrcKernels>>>,
    /// log2 of the CRC-32C kernel's segment size.
    crc_segment_shift: AtomicU32,
}

impl CudaDevice {
    /// Attaches to GPU `ordinal`'s primary context (retained with
    /// cuDevicePrimaryCtxRetain, released when the last user drops).
    ///
    /// Never panics. Errors: [`Error::Unavailable`] when there is no libcuda (with what to
    /// install), when the driver cannot initialize, or when it sees no GPU;
    /// [`Error::InvalidArgument`] when `ordinal` is not one of the GPUs, naming how many
    /// there are.
    pub fn new(ordinal: usize) -> Result<Arc<CudaDevice>> {
        match std::panic::catch_unwind(|| Self::attach(ordinal)) {
            Ok(result) => result,
            Err(panic) => Err(Error::Device(format!(
                "attaching to GPU {ordinal} failed: {}",
                probe::panic_message(&*panic)
            ))),
        }
    }

    fn attach(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let _span = tracing::debug_span!("cuda_attach", gpu = ordinal).entered();
        probe::init()?;
        let count = raw::device_count().map_err(|e| error::driver("cuDeviceGetCount", None, e))?;
        if count == 0 {
            return Err(probe::unavailable(format!(
                "the NVIDIA driver sees no GPU{}",
                probe::visible_devices_note()
            )));
        }
        if ordinal >= count {
            return Err(Error::InvalidArgument(format!(
                "GPU {ordinal} requested but this machine has {}{}",
                gpu_list(count),
                probe::visible_devices_note()
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            error::driver(
                "attaching to the primary context (cuDevicePrimaryCtxRetain)",
                Some(ordinal),
                e,
            )
        })?;
        let gpu = probe::gpu_info(ordinal).on_gpu("querying the GPU", ordinal)?;
        let sm_count = raw::device_attribute(
            ctx.cu_device(),
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .on_gpu("cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)", ordinal)?;
        tracing::debug!(
            gpu = ordinal,
            name = %gpu.name,
            pci = %gpu.pci_bus_id,
            sm_count,
            "attached to the primary context"
        );
        Ok(Arc::new(CudaDevice {
            ctx,
            gpu,
            sm_count: sm_count.max(1) as u32,
            kernels: Mutex::new(None),
            pack_kernels: Mutex::new(None),
            pack_tile_shift: AtomicU32::new(pack_table::DEFAULT_TILE.trailing_zeros()),
            crc_kernels: Mutex::new(None),
            crc_segment_shift: AtomicU32::new(crc::DEFAULT_SEGMENT.trailing_zeros()),
        }))
    }

    /// The GPU's CUDA ordinal.
    pub fn ordinal(&self) -> usize {
        self.gpu.ordinal
    }

    /// Checks that `[ptr, ptr+len)` lies inside one allocation of this GPU's memory, naming
    /// `what` in the error otherwise.
    pub fn check_region(&self, what: &str, ptr: u64, len: u64) -> Result<()> {
        memory::check_device_region(&self.ctx, self.gpu.ordinal, what, ptr, len)
    }

    /// The GPU's primary context (for threads that call CUDA themselves, e.g. cuFile's).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The GPU's name, memory, compute capability and PCI address.
    pub fn gpu_info(&self) -> &GpuInfo {
        &self.gpu
    }

    /// A new stream, as its concrete type (for callers that need the raw `CUstream`).
    pub fn cuda_stream(&self) -> Result<CudaStream> {
        CudaStream::new(&self.ctx, self.gpu.ordinal)
    }

    /// Loads the kernels if they are not yet, and says where their code came from: "PTX for
    /// compute_75 built by nvcc" or "PTX for compute_90 compiled by NVRTC 12.4".
    pub fn kernel_origin(&self) -> Result<String> {
        self.with_kernels(|k| Ok(k.origin().to_string()))
    }

    /// Loads the pack kernels if they are not yet, and says where their code came from (as
    /// [`CudaDevice::kernel_origin`] does for the pattern kernels).
    pub fn pack_kernel_origin(&self) -> Result<String> {
        Ok(self.pack_kernels()?.origin().to_string())
    }

    /// The tile size of the pack and unpack kernels, in bytes: how much of the extent
    /// (pack) or of one piece (unpack) one warp copies before it looks up its next tile.
    /// 16 KiB unless [`CudaDevice::set_pack_tile_size`] changed it.
    pub fn pack_tile_size(&self) -> u64 {
        1 << self.pack_tile_shift.load(Ordering::Relaxed)
    }

    /// Sets the tile size of later packs and unpacks (a tuning knob: any size gives the same
    /// bytes). [`Error::InvalidArgument`] unless `bytes` is a power of two from 1 KiB to 16 MiB.
    pub fn set_pack_tile_size(&self, bytes: u64) -> Result<()> {
        let shift = pack_table::check_tile_size(bytes)?;
        self.pack_tile_shift.store(shift, Ordering::Relaxed);
        Ok(())
    }

    /// Loads the CRC-32C kernel if it is not yet, and says where its code came from (as
    /// [`CudaDevice::kernel_origin`] does for the pattern kernels).
    pub fn crc_kernel_origin(&self) -> Result<String> {
        Ok(self.crc_kernels()?.origin().to_string())
    }

    /// The segment size of the CRC-32C kernel, in bytes: pieces are cut at multiples of it
    /// (of address), and one warp checksums one segment before it looks up its next. 8 KiB
    /// unless [`CudaDevice::set_crc_segment_size`] changed it.
    pub fn crc_segment_size(&self) -> u64 {
        1 << self.crc_segment_shift.load(Ordering::Relaxed)
    }

    /// Sets the segment size of later CRC-32C calls (a tuning knob: any size gives the same
    /// checksums). [`Error::InvalidArgument`] unless `bytes` is a power of two from 512 bytes
    /// to 1 MiB.
    pub fn set_crc_segment_size(&self, bytes: u64) -> Result<()> {
        let shift = crc::check_segment_size(bytes)?;
        self.crc_segment_shift.store(shift, Ordering::Relaxed);
        Ok(())
    }

    /// The CRC-32C kernel, loaded on first use.
    fn crc_kernels(&self) -> Result<Arc<CrcKernels>> {
        loaded_once(&self.crc_kernels, || {
            CrcKernels::new(
                &self.ctx,
                self.gpu.ordinal,
                self.gpu.compute_capability,
                self.sm_count,
            )
        })
    }

    /// The pack kernels, loaded on first use.
    fn pack_kernels(&self) -> Result<Arc<PackKernels>> {
        loaded_once(&self.pack_kernels, || {
            PackKernels::new(
                &self.ctx,
                self.gpu.ordinal,
                self.gpu.compute_capability,
                self.sm_count,
            )
        })
    }

    /// `stream` as a stream of this GPU, or an [`Error::InvalidArgument`] saying why not.
    fn own_stream<'s>(&self, op: &str, stream: &'s dyn Stream) -> Result<&'s CudaStream> {
        let cuda = stream.as_any().downcast_ref::<CudaStream>().ok_or_else(|| {
            Error::invalid(format!(
                "{op} on GPU {} needs one of its own streams, got {stream:?}",
                self.gpu.ordinal
            ))
        })?;
        if cuda.ordinal() != self.gpu.ordinal {
            return Err(Error::invalid(format!(
                "{op} on GPU {} got a stream of GPU {}",
                self.gpu.ordinal,
                cuda.ordinal()
            )));
        }
        Ok(cuda)
    }

    /// Runs `f` with the pattern kernels, loading them on first use.
    fn with_kernels<T>(&self, f: impl FnOnce(&PatternKernels) -> Result<T>) -> Result<T> {
        let mut slot = self.kernels.lock().unwrap_or_else(|e| e.into_inner());
        let kernels = match slot.take() {
            Some(kernels) => kernels,
            None => PatternKernels::new(
                &self.ctx,
                self.gpu.ordinal,
                self.gpu.compute_capability,
                self.sm_count,
            )?,
        };
        f(slot.insert(kernels))
    }
}

/// "1 GPU (0)", "2 GPUs (0, 1)", "8 GPUs (0 to 7)".
/// What `slot` holds, made by `load` the first time (a failed load is tried again by the
/// next caller).
fn loaded_once<T>(slot: &Mutex<Option<Arc<T>>>, load: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(loaded) = slot.as_ref() {
        return Ok(loaded.clone());
    }
    let loaded = Arc::new(load()?);
    *slot = Some(loaded.clone());
    Ok(loaded)
}

fn gpu_list(count: usize) -> String {
    match count {
        1 => "1 GPU (0)".to_string(),
        2 => "2 GPUs (0, 1)".to_string(),
        n => format!("{n} GPUs (0 to {})", n - 1),
    }
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaDevice(GPU {}: {}, {})",
            self.gpu.ordinal, self.gpu.name, self.gpu.pci_bus_id
        )
    }
}

impl Device for CudaDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            kind: DeviceKind::Cuda,
            ordinal: self.gpu.ordinal,
            name: self.gpu.name.clone(),
            total_memory: self.gpu.total_memory,
        }
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        let _span = tracing::debug_span!("cuda_alloc", gpu = self.gpu.ordinal, len).entered();
        Ok(DeviceAlloc::new(&self.ctx, self.gpu.ordinal, len)?.into_buffer())
    }

    fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer> {
        let _span = tracing::debug_span!("cuda_alloc_pinned", gpu = self.gpu.ordinal, len).entered();
        Ok(PinnedAlloc::new(&self.ctx, self.gpu.ordinal, len)?.into_buffer(len))
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<HostRegistration> {
        let _span = tracing::debug_span!("cuda_register_host", gpu = self.gpu.ordinal, len).entered();
        // SAFETY: forwarded contract: the memory stays valid until the guard drops.
        unsafe { memory::register_host(&self.ctx, self.gpu.ordinal, ptr, len) }
    }

    fn create_stream(&self) -> Result<Arc<dyn Stream>> {
        Ok(Arc::new(self.cuda_stream()?))
    }

    fn fill_pattern(&self, dst: DevicePtr, len: usize, seed: u64, offset: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.with_kernels(|k| k.fill(dst, len, seed, offset))
    }

    fn count_pattern_mismatches(&self, src: DevicePtr, len: usize, seed: u64, offset: u64) -> Result<u64> {
        if len == 0 {
            return Ok(0);
        }
        self.with_kernels(|k| k.count_mismatches(src, len, seed, offset))
    }

    unsafe fn pack(
        &self,
        stream: &dyn Stream,
        extent: DevicePtr,
        extent_len: u64,
        pieces: &[PackPiece],
    ) -> Result<()> {
        let _span = tracing::debug_span!(
            "cuda_pack",
            gpu = self.gpu.ordinal,
            extent,
            extent_len,
            pieces = pieces.len()
        )
        .entered();
        let stream = self.own_stream("pack", stream)?;
        spillway_runtime::check_pack_layout(pieces, extent_len)?;
        if extent_len == 0 {
            return Ok(());
        }
        memory::check_device_region(&self.ctx, self.gpu.ordinal, "pack extent", extent, extent_len)?;
        pack_table::check_disjoint_from_extent("pack", pieces, extent, extent_len)?;
        let kernels = self.pack_kernels()?;
        let shift = self.pack_tile_shift.load(Ordering::Relaxed);
        // SAFETY: forwarded contract (live, disjoint memory until the stream passes the
        // kernel); the stream is this GPU's and the layout was checked above.
        unsafe { kernels.pack(stream, extent, extent_len, pieces, shift) }
    }

    unsafe fn unpack(
        &self,
        stream: &dyn Stream,
        extent: DevicePtr,
        extent_len: u64,
        pieces: &[PackPiece],
    ) -> Result<()> {
        let _span = tracing::debug_span!(
            "cuda_unpack",
            gpu = self.gpu.ordinal,
            extent,
            extent_len,
            pieces = pieces.len()
        )
        .entered();
        let stream = self.own_stream("unpack", stream)?;
        spillway_runtime::check_unpack_layout(pieces, extent_len)?;
        if pieces.is_empty() {
            return Ok(());
        }
        memory::check_device_region(&self.ctx, self.gpu.ordinal, "unpack extent", extent, extent_len)?;
        pack_table::check_disjoint_from_extent("unpack", pieces, extent, extent_len)?;
        let kernels = self.pack_kernels()?;
        let shift = self.pack_tile_shift.load(Ordering::Relaxed);
        // SAFETY: as in `pack`.
        unsafe { kernels.unpack(stream, extent, pieces, shift) }
    }

    /// The CRC-32C kernel (`kernels/crc32c.cu`) on the caller's stream: one launch for all
    /// the pieces, results copied into pinned memory, nothing waited for. Every non-empty
    /// piece must lie in one device allocation of this GPU: checked with one
    /// cuMemGetAddressRange per allocation the pieces lie in (see `crc::check_pieces`), so a
    /// bad pointer is an error rather than a fault that would wreck the context. Empty pieces
    /// are never read (their CRC is 0); a call with none but empty pieces launches nothing.
    unsafe fn crc32c(&self, stream: &dyn Stream, pieces: &[(DevicePtr, u64)]) -> Result<PendingChecksums> {
        let _span = tracing::debug_span!(
            "cuda_crc32c",
            gpu = self.gpu.ordinal,
            pieces = pieces.len(),
            bytes = pieces.iter().fold(0u64, |sum, p| sum.saturating_add(p.1))
        )
        .entered();
        let stream = self.own_stream("crc32c", stream)?;
        if pieces.is_empty() {
            return Ok(PendingChecksums::ready(Vec::new()));
        }
        crc::check_pieces(&self.ctx, self.gpu.ordinal, pieces)?;
        if pieces.iter().all(|&(_, len)| len == 0) {
            return Ok(PendingChecksums::ready(vec![0; pieces.len()]));
        }
        let kernels = self.crc_kernels()?;
        let shift = self.crc_segment_shift.load(Ordering::Relaxed);
        // SAFETY: forwarded contract (live memory, unwritten until the stream passes the
        // kernel); the stream is this GPU's and the pieces were checked above.
        unsafe { kernels.checksums(stream, pieces, shift) }
    }
}
