//! CRC-32C of many pieces of device memory on the GPU (`kernels/crc32c.cu`), queued on a
//! caller's stream without waiting for it: one piece-table upload (see [`super::upload`]),
//! one memset, one launch and one copy of the results into pinned memory per call, whatever
//! the number of pieces. The caller gets a [`PendingChecksums`] that reads that memory once
//! an event recorded after the copy has completed.
//!
//! Also here: the constant table the kernel reads (powers of x modulo the CRC-32C
//! polynomial, and the slice-by-16 tables), built on the host from the GF(2) arithmetic of
//! [`gf`], and the checks of a call's pieces. The tests hold a CPU model of the kernel,
//! line by line, checked against the `crc32c` crate.
//!
//! Result buffers (a device buffer the kernel xors into, and the pinned buffer it is copied
//! to) come from a small pool: a buffer goes back to the pool when its [`PendingChecksums`]
//! has been read or dropped, and is handed out again only once the event recorded after its
//! copy has completed, so a dropped, never-waited-for call can't have its buffer rewritten
//! under the copy still queued.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;
use spillway_runtime::{DevicePtr, Error, Event, PendingChecksums, Result, Stream};

use super::error::{self, DriverResultExt};
use super::kernels::{Kernel, Module};
use super::memory::{DeviceAlloc, PinnedAlloc};
use super::raw;
use super::stream::{CudaEvent, CudaStream};
use super::upload::Uploads;

/// Threads per block of `crc32c_pieces` (its `__launch_bounds__`).
pub(crate) const BLOCK: u32 = 256;
/// Warps per block.
const WARPS_PER_BLOCK: u64 = BLOCK as u64 / 32;

/// Smallest segment size [`check_segment_size`] accepts.
pub(crate) const MIN_SEGMENT: u64 = 1 << 9;
/// Largest segment size [`check_segment_size`] accepts.
pub(crate) const MAX_SEGMENT: u64 = 1 << 20;
/// The default segment: the bytes (of address space) one warp checksums before it looks for
/// its next segment.
pub(crate) const DEFAULT_SEGMENT: u64 = 1 << 13;

/// Result buffers kept at most, idle or still in use by the GPU.
const MAX_RESULT_SLOTS: usize = 16;
/// Smallest result buffer, in checksums (one page).
const MIN_RESULT_SLOT: usize = 1024;

/// `log2(bytes)` when `bytes` is a power of two in `[MIN_SEGMENT, MAX_SEGMENT]`.
pub(crate) fn check_segment_size(bytes: u64) -> Result<u32> {
    if !bytes.is_power_of_two() || !(MIN_SEGMENT..=MAX_SEGMENT).contains(&bytes) {
        return Err(Error::invalid(format!(
            "crc32c segment size {bytes} must be a power of two from {MIN_SEGMENT} to {MAX_SEGMENT} bytes"
        )));
    }
    Ok(bytes.trailing_zeros())
}

/// Arithmetic on CRC-32C registers: polynomials of degree < 32 over GF(2) modulo the
/// CRC-32C polynomial P, held reflected (bit 31 is the coefficient of x^0), as the kernel
/// holds them.
pub(crate) mod gf {
    /// P, reflected (without its x^32 term).
    pub(crate) const POLY: u32 = 0x82F6_3B78;
    /// The polynomial 1.
    pub(crate) const ONE: u32 = 0x8000_0000;
    /// The polynomial x.
    pub(crate) const X: u32 = 0x4000_0000;

    /// `a * b mod P`: for each coefficient of `a`, from x^0 (bit 31) up, adds `b` if it is
    /// set, then multiplies `b` by x. The kernel's `crc_mul`, step for step.
    pub(crate) fn mul(mut a: u32, mut b: u32) -> u32 {
        let mut p = 0u32;
        for _ in 0..32 {
            p ^= b & 0u32.wrapping_sub(a >> 31);
            a <<= 1;
            b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        }
        p
    }

    /// `c / x mod P`: undoes one multiplication by x (`(b >> 1) ^ (POLY if b & 1)`). The x^0
    /// coefficient of a product by x is set exactly when P was added.
    pub(crate) fn div_x(c: u32) -> u32 {
        if c & ONE != 0 {
            ((c ^ POLY) << 1) | 1
        } else {
            c << 1
        }
    }

    /// `base^n mod P`, by squaring.
    pub(crate) fn pow(base: u32, mut n: u64) -> u32 {
        let (mut result, mut square) = (ONE, base);
        while n != 0 {
            if n & 1 != 0 {
                result = mul(result, square);
            }
            square = mul(square, square);
            n >>= 1;
        }
        result
    }

    /// x^8: feeding one zero byte multiplies a register by it.
    pub(crate) fn x8() -> u32 {
        pow(X, 8)
    }

    /// x^(-8): its inverse (x is invertible since P has a constant term).
    pub(crate) fn x8_inv() -> u32 {
        pow(div_x(ONE), 8)
    }

    /// x^(8 n): what feeding `n` zero bytes multiplies a register by.
    pub(crate) fn shift(n: u64) -> u32 {
        pow(x8(), n)
    }

    /// x^(-8 n): the inverse of [`shift`]`(n)`.
    #[cfg(test)]
    pub(crate) fn unshift(n: u64) -> u32 {
        pow(x8_inv(), n)
    }
}

/// Layout of the kernel's constant table, in 32-bit words: the `CRC_*_AT` lines of
/// `kernels/crc32c.cu` (a test checks they agree).
pub(crate) mod layout {
    /// `T[16][256]`: `T[p][v] = v * x^(8 (512 - p))`, the slice-by-16 tables that also step
    /// over the 496 bytes of the other lanes' blocks of a row.
    pub(crate) const SKIP_AT: usize = 0;
    /// Words of the slice-by-16 tables.
    pub(crate) const SKIP_WORDS: usize = 16 * 256;
    /// `[1024]`: `x^(-8 e)`.
    pub(crate) const INV_AT: usize = SKIP_AT + SKIP_WORDS;
    /// Entries of the `x^(-8 e)` table.
    pub(crate) const INV_LEN: usize = 1024;
    /// `[16]`: `0xFFFFFFFF * x^(-8 o)`.
    pub(crate) const INIT_AT: usize = INV_AT + INV_LEN;
    /// `[8][256]`: `x^(8 v 256^k)` at `256 k + v`.
    pub(crate) const POW_AT: usize = INIT_AT + 16;
    /// Words of the whole table.
    pub(crate) const WORDS: usize = POW_AT + 8 * 256;
}

/// Row of 32 lanes' 16-byte blocks.
const ROW: u64 = 512;

/// The constant table of `kernels/crc32c.cu` (see [`layout`]).
pub(crate) fn constants() -> Vec<u32> {
    use layout::*;
    let mut t = vec![0u32; WORDS];
    for p in 0..16 {
        // Feeding byte v then 15 - p more bytes of the block and 496 bytes of zeros:
        // v * x^8 * x^(8 (511 - p)).
        let k = gf::shift(ROW - p as u64);
        // v * k is linear in v: combine the products of v's bits.
        let bits: Vec<u32> = (0..8).map(|bit| gf::mul(1 << bit, k)).collect();
        for v in 0..256usize {
            t[SKIP_AT + 256 * p + v] = (0..8)
                .filter(|bit| v >> bit & 1 != 0)
                .fold(0, |acc, bit| acc ^ bits[bit]);
        }
    }
    let x8_inv = gf::x8_inv();
    let mut inv = gf::ONE;
    for e in 0..INV_LEN {
        t[INV_AT + e] = inv;
        inv = gf::mul(inv, x8_inv);
    }
    for o in 0..16 {
        t[INIT_AT + o] = gf::mul(u32::MAX, t[INV_AT + o]);
    }
    for k in 0..8 {
        // x^(8 * 256^k), then its powers v = 0..255.
        let step = gf::shift(1u64 << (8 * k));
        let mut power = gf::ONE;
        for v in 0..256 {
            t[POW_AT + 256 * k + v] = power;
            power = gf::mul(power, step);
        }
    }
    t
}

/// Segments of the piece at `ptr` of `len` bytes: address-aligned runs of `1 << shift`
/// bytes it touches (none when empty).
pub(crate) fn segment_count(ptr: DevicePtr, len: u64, shift: u32) -> u64 {
    if len == 0 {
        return 0;
    }
    (ptr.saturating_add(len - 1) >> shift) - (ptr >> shift) + 1
}

/// Words of the piece table of `n` pieces: `first_seg[n + 1]`, `addrs[n]`, `lens[n]`.
pub(crate) fn table_words(n: usize) -> usize {
    3 * n + 1
}

/// Writes the piece table of `pieces` for segments of `1 << shift` bytes into `out`
/// ([`table_words`] long) and returns the total segment count.
pub(crate) fn fill_table(pieces: &[(DevicePtr, u64)], shift: u32, out: &mut [u64]) -> u64 {
    let n = pieces.len();
    debug_assert_eq!(out.len(), table_words(n));
    let (first, rest) = out.split_at_mut(n + 1);
    let (addrs, lens) = rest.split_at_mut(n);
    let mut segments = 0u64;
    for (i, &(ptr, len)) in pieces.iter().enumerate() {
        first[i] = segments;
        segments += segment_count(ptr, len, shift);
        addrs[i] = ptr;
        lens[i] = len;
    }
    first[n] = segments;
    segments
}

/// Blocks of [`BLOCK`] threads for `segments` segments, one warp per segment, at most
/// `max_blocks` (the warps then stride over the segments).
pub(crate) fn grid(segments: u64, max_blocks: u32) -> u32 {
    segments
        .div_ceil(WARPS_PER_BLOCK)
        .clamp(1, u64::from(max_blocks.max(1))) as u32
}

/// Checks that every non-empty piece lies within one device allocation of the GPU, so that
/// a bad pointer is an [`Error::InvalidArgument`] naming the piece rather than a kernel
/// fault that would wreck the context.
///
/// The pieces are visited in address order and the allocation found for one is remembered:
/// each allocation is looked up (cuMemGetAddressRange) once, however many pieces lie in it,
/// and a call over thousands of pieces of a few tensors costs a few driver calls.
pub(crate) fn check_pieces(ctx: &CudaContext, gpu: usize, pieces: &[(DevicePtr, u64)]) -> Result<()> {
    let mut order: Vec<usize> = (0..pieces.len()).filter(|&i| pieces[i].1 != 0).collect();
    order.sort_unstable_by_key(|&i| pieces[i].0);
    if order.is_empty() {
        return Ok(());
    }
    raw::bind(ctx).on_gpu("cuCtxSetCurrent", gpu)?;
    // [base, end) of the allocation looked up last.
    let mut known: Option<(u64, u64)> = None;
    for i in order {
        let (ptr, len) = pieces[i];
        let end = ptr.checked_add(len).ok_or_else(|| {
            Error::invalid(format!(
                "crc32c piece {i}: memory at {ptr:#x} of {len} bytes wraps around the address space"
            ))
        })?;
        if matches!(known, Some((base, alloc_end)) if base <= ptr && end <= alloc_end) {
            continue;
        }
        let (base, size) = raw::mem_address_range(ptr).map_err(|e| {
            Error::invalid(format!(
                "crc32c piece {i}: {ptr:#x} is not device memory of GPU {gpu} (cuMemGetAddressRange: {})",
                error::describe(e)
            ))
        })?;
        let alloc_end = base.saturating_add(size as u64);
        if end > alloc_end {
            return Err(Error::invalid(format!(
                "crc32c piece {i}: [{ptr:#x}, +{len}) runs past the end of its allocation [{base:#x}, +{size}) \
                 on GPU {gpu}"
            )));
        }
        known = Some((base, alloc_end));
    }
    Ok(())
}

/// A device buffer the kernel xors checksums into, the pinned buffer they are copied to, both
/// of `cap` checksums, and the event after the last work that used them.
struct ResultSlot {
    cap: usize,
    dev: DeviceAlloc,
    host: PinnedAlloc,
    /// Complete once the last memset, kernel and copy that used the buffers are done (an
    /// event that was never recorded counts as complete).
    done: CudaEvent,
}

impl ResultSlot {
    fn new(ctx: &Arc<CudaContext>, gpu: usize, n: usize) -> Result<ResultSlot> {
        let cap = n.max(MIN_RESULT_SLOT).next_power_of_two();
        let bytes = cap * std::mem::size_of::<u32>();
        Ok(ResultSlot {
            cap,
            dev: DeviceAlloc::new(ctx, gpu, bytes)?,
            host: PinnedAlloc::new(ctx, gpu, bytes)?,
            done: CudaEvent::new(ctx, gpu)?,
        })
    }

    /// True once nothing queued uses the buffers. An error (a broken context) counts as idle:
    /// nothing will run on the GPU any more.
    fn idle(&self) -> bool {
        self.done.query().unwrap_or(true)
    }
}

impl Drop for ResultSlot {
    fn drop(&mut self) {
        // The buffers are freed after this (fields drop after `drop`): wait until no kernel
        // or copy still uses them.
        if let Err(e) = self.done.synchronize() {
            tracing::warn!("waiting for a crc32c result copy before freeing its buffers: {e}");
        }
    }
}

/// The result slots of one GPU: idle ones, and ones given back while their work may still run.
struct ResultPool {
    ctx: Arc<CudaContext>,
    gpu: usize,
    /// Slots not handed out, oldest use first.
    slots: Mutex<VecDeque<ResultSlot>>,
}

impl ResultPool {
    /// A slot for `n` checksums, idle, on loan until the lease drops: a pooled one if one is
    /// idle and big enough, else a new one. With [`MAX_RESULT_SLOTS`] pooled and none usable,
    /// waits for the oldest (holding the pool's lock), which bounds the memory held by calls
    /// dropped before their work ran.
    fn lease(pool: &Arc<ResultPool>, n: usize) -> Result<Lease> {
        let slot = pool.acquire(n)?;
        Ok(Lease {
            pool: pool.clone(),
            slot: Some(slot),
        })
    }

    fn acquire(&self, n: usize) -> Result<ResultSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = slots.iter().position(|s| s.cap >= n && s.idle()) {
            if let Some(slot) = slots.remove(i) {
                return Ok(slot);
            }
        }
        // Idle slots too small for this call would only get in the way: free them.
        slots.retain(|s| s.cap >= n || !s.idle());
        if slots.len() >= MAX_RESULT_SLOTS {
            if let Some(oldest) = slots.pop_front() {
                if oldest.cap >= n {
                    oldest.done.synchronize()?;
                    return Ok(oldest);
                }
                drop(oldest); // waits for its event
            }
        }
        drop(slots);
        ResultSlot::new(&self.ctx, self.gpu, n)
    }

    /// Puts a slot back, as the most recently used; idle slots beyond [`MAX_RESULT_SLOTS`] are
    /// freed.
    fn release(&self, slot: ResultSlot) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.push_back(slot);
        while slots.len() > MAX_RESULT_SLOTS {
            match slots.iter().position(ResultSlot::idle) {
                Some(i) => drop(slots.remove(i)),
                None => break,
            }
        }
    }
}

/// A result slot on loan to one call; goes back to the pool when dropped (read or not).
struct Lease {
    pool: Arc<ResultPool>,
    /// `None` only once the slot was leaked (see [`Lease::queue`]).
    slot: Option<ResultSlot>,
}

impl Lease {
    /// Runs `queue`, which queues work using the slot's buffers on `stream`, then records the
    /// slot's event after it, whether or not `queue` succeeded (it may have queued part of its
    /// work). If the event can't be recorded, the stream is waited for; if even that fails,
    /// the buffers may still be in use, so they are leaked rather than reused or freed.
    fn queue(&mut self, stream: &CudaStream, queue: impl FnOnce(&ResultSlot) -> Result<()>) -> Result<()> {
        let Some(slot) = self.slot.as_ref() else {
            return Err(Error::Device("crc32c result buffers already lost".into()));
        };
        let queued = queue(slot);
        if let Err(record_error) = slot.done.record_on(stream) {
            if let Err(e) = stream.synchronize() {
                tracing::error!(
                    gpu = self.pool.gpu,
                    "leaking a crc32c result slot of {} checksums ({record_error}; then {e})",
                    slot.cap
                );
                std::mem::forget(self.slot.take());
            }
            // The caller's own error, if any, says more than the event's.
            return queued.and(Err(record_error));
        }
        queued
    }

    /// The first `n` checksums of the pinned buffer, once the copy into it has completed.
    fn read(self, n: usize) -> Result<Vec<u32>> {
        let Some(slot) = self.slot.as_ref() else {
            return Err(Error::Device("crc32c result buffers were lost".into()));
        };
        // Complete already when called from PendingChecksums::wait (which waited for an event
        // recorded after this one); waiting here keeps the read safe whoever calls it.
        slot.done.synchronize()?;
        let mut sums = vec![0u32; n];
        // SAFETY: the pinned buffer is page-aligned and holds `cap >= n` u32s; the copy that
        // wrote it has completed (above) and nothing else writes it while this lease holds
        // the slot; `sums` is a separate allocation of `n` u32s.
        unsafe { std::ptr::copy_nonoverlapping(slot.host.as_mut_ptr().cast::<u32>(), sums.as_mut_ptr(), n) };
        Ok(sums)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.release(slot);
        }
    }
}

/// The CRC-32C kernel of one GPU, its constant table, and the slots its piece tables and
/// results go through.
pub(crate) struct CrcKernels {
    // Dropped first: dropping the table slots waits for every queued kernel that read a table,
    // so the constants and the module below are not freed under a running kernel.
    uploads: Uploads,
    results: Arc<ResultPool>,
    consts: DeviceAlloc,
    ctx: Arc<CudaContext>,
    gpu: usize,
    kernel: Kernel,
    module: Module,
}

// SAFETY: a CUfunction handle may be used from any thread; it stays valid while `module`
// (owned alongside it) is loaded. The slot pools are behind mutexes.
unsafe impl Send for CrcKernels {}
// SAFETY: as above; launching is thread-safe, and every `&self` method only queues work.
unsafe impl Sync for CrcKernels {}

impl CrcKernels {
    /// Loads the kernel for a GPU of compute capability `cc` with `sm_count` SMs, and uploads
    /// its constant table (waiting for that copy).
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: usize, cc: (u32, u32), sm_count: u32) -> Result<Self> {
        let module = Module::load(ctx, gpu, cc, "crc32c")?;
        let kernel = Kernel::new(&module, gpu, "crc32c_pieces", BLOCK, sm_count)?;
        let table = constants();
        let bytes = table.len() * std::mem::size_of::<u32>();
        let consts = DeviceAlloc::new(ctx, gpu, bytes)?;
        let stream = CudaStream::new(ctx, gpu)?;
        // SAFETY: `consts` is a live device allocation of `bytes` bytes and `table` a host
        // buffer of as many; both outlive the copy, which the synchronize below waits for.
        unsafe { raw::memcpy_htod_async(consts.ptr(), table.as_ptr().cast(), bytes, stream.cu_stream()) }
            .on_gpu("uploading the crc32c constants (cuMemcpyHtoDAsync)", gpu)?;
        stream.synchronize()?;
        tracing::debug!(
            gpu,
            origin = module.origin(),
            max_blocks = kernel.max_blocks,
            "loaded the crc32c kernel"
        );
        Ok(CrcKernels {
            uploads: Uploads::new(ctx, gpu),
            results: Arc::new(ResultPool {
                ctx: ctx.clone(),
                gpu,
                slots: Mutex::new(VecDeque::new()),
            }),
            consts,
            ctx: ctx.clone(),
            gpu,
            kernel,
            module,
        })
    }

    /// Queues on `stream` the CRC-32C of each of `pieces` with segments of `1 << seg_shift`
    /// bytes, and returns them pending.
    ///
    /// # Safety
    /// [`spillway_runtime::Device::crc32c`]'s contract; the pieces have passed
    /// [`check_pieces`], at least one is not empty, and `stream` belongs to this GPU.
    pub(crate) unsafe fn checksums(
        &self,
        stream: &CudaStream,
        pieces: &[(DevicePtr, u64)],
        seg_shift: u32,
    ) -> Result<PendingChecksums> {
        raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)?;
        let n = pieces.len();
        let segments: u64 = pieces
            .iter()
            .map(|&(ptr, len)| segment_count(ptr, len, seg_shift))
            .sum();
        let grid = grid(segments, self.kernel.max_blocks);
        let out_bytes = n * std::mem::size_of::<u32>();
        let mut lease = ResultPool::lease(&self.results, n)?;
        self.uploads.with_table(
            stream,
            table_words(n),
            |words| {
                fill_table(pieces, seg_shift, words);
            },
            |table| {
                lease.queue(stream, |slot| {
                    let (out, s) = (slot.dev.ptr(), stream.cu_stream());
                    // SAFETY: `out` is the slot's device buffer of `cap >= n` u32s, not reused
                    // before the event `queue` records after this work; the stream is live.
                    unsafe { raw::memset_d8_async(out, 0, out_bytes, s) }
                        .on_gpu("zeroing the crc32c results (cuMemsetD8Async)", self.gpu)?;
                    let first = table;
                    let addrs = table + (n as u64 + 1) * 8;
                    let lens = addrs + n as u64 * 8;
                    let (mut p_first, mut p_addrs, mut p_lens) = (first, addrs, lens);
                    let (mut p_n, mut p_segments, mut p_shift) = (n as u64, segments, seg_shift);
                    let (mut p_consts, mut p_out) = (self.consts.ptr(), out);
                    let mut params = [
                        &mut p_first as *mut u64 as *mut c_void,
                        &mut p_addrs as *mut u64 as *mut c_void,
                        &mut p_lens as *mut u64 as *mut c_void,
                        &mut p_n as *mut u64 as *mut c_void,
                        &mut p_segments as *mut u64 as *mut c_void,
                        &mut p_shift as *mut u32 as *mut c_void,
                        &mut p_consts as *mut u64 as *mut c_void,
                        &mut p_out as *mut u64 as *mut c_void,
                    ];
                    // SAFETY: `f` belongs to `self.module`, which is loaded; `params` matches
                    // crc32c_pieces(const u64*, const u64*, const u64*, u64, u64, u32,
                    // const u32*, u32*) and the values outlive the call; the table is queued
                    // for upload ahead of the kernel on the same stream and kept until the
                    // event recorded after this work; the constants live as long as `self`;
                    // the pieces' memory stays valid until the kernel completes (the caller's
                    // contract) and was checked to lie in device allocations.
                    unsafe { raw::launch(self.kernel.f, grid, BLOCK, s, &mut params) }
                        .on_gpu("launching crc32c_pieces (cuLaunchKernel)", self.gpu)?;
                    // SAFETY: both buffers belong to the slot (`cap >= n` u32s each), which is
                    // not handed out again before the event recorded after this copy.
                    unsafe { raw::memcpy_dtoh_async(slot.host.as_mut_ptr(), out, out_bytes, s) }
                        .on_gpu("reading the crc32c results (cuMemcpyDtoHAsync)", self.gpu)
                })
            },
        )?;
        let done = stream.record_event()?;
        Ok(PendingChecksums::new(Box::new(done), move || lease.read(n)))
    }

    /// Where the kernel's code came from (see [`Module::origin`]).
    pub(crate) fn origin(&self) -> &str {
        self.module.origin()
    }
}

impl fmt::Debug for CrcKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CrcKernels({:?}, max {} blocks, {:?})",
            self.module, self.kernel.max_blocks, self.uploads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register after feeding `data` to register `r` (no final xor), from the crate:
    /// `crc32c_append` continues a finished CRC, so undo and redo its final xor.
    fn reg(r: u32, data: &[u8]) -> u32 {
        crc32c::crc32c_append(r ^ u32::MAX, data) ^ u32::MAX
    }

    /// splitmix64.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.next() % n
            }
        }
    }

    #[test]
    fn register_arithmetic_matches_the_crate() {
        let mut rng = Rng(1);
        assert_eq!(gf::mul(gf::X, gf::div_x(gf::ONE)), gf::ONE);
        for _ in 0..200 {
            let a = rng.next() as u32;
            let b = rng.next() as u32;
            assert_eq!(gf::mul(a, gf::ONE), a);
            assert_eq!(gf::mul(a, b), gf::mul(b, a));
            let n = rng.below(1 << 40);
            assert_eq!(gf::mul(gf::shift(n), gf::unshift(n)), gf::ONE, "{n}");
        }
        // One byte fed to a zero register is the byte times x^8.
        for v in 0..=255u8 {
            assert_eq!(reg(0, &[v]), gf::mul(u32::from(v), gf::x8()));
        }
        // Feeding zeros multiplies by x^8 per byte; combining matches the crate's.
        for len in [0usize, 1, 3, 4, 17, 512, 4099] {
            let r = rng.next() as u32;
            assert_eq!(reg(r, &vec![0; len]), gf::mul(r, gf::shift(len as u64)), "{len}");
            let a: Vec<u8> = (0..rng.below(100)).map(|_| rng.next() as u8).collect();
            let b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let whole = [a.as_slice(), b.as_slice()].concat();
            let combined = gf::mul(crc32c::crc32c(&a), gf::shift(len as u64)) ^ crc32c::crc32c(&b);
            assert_eq!(combined, crc32c::crc32c(&whole));
            assert_eq!(
                combined,
                crc32c::crc32c_combine(crc32c::crc32c(&a), crc32c::crc32c(&b), len)
            );
        }
    }

    #[test]
    fn constant_tables_hold_what_the_kernel_expects() {
        use layout::*;
        let t = constants();
        assert_eq!(t.len(), WORDS);
        let mut rng = Rng(2);
        for p in 0..16 {
            for v in [0u8, 1, 0x80, 0xFF, rng.next() as u8, rng.next() as u8] {
                // Byte v at position p of a block, the rest of the block and the other lanes'
                // 496 bytes zero.
                let mut message = vec![0u8; 512 - p];
                message[0] = v;
                assert_eq!(t[SKIP_AT + 256 * p + v as usize], reg(0, &message), "T[{p}][{v}]");
            }
        }
        for e in [0usize, 1, 15, 16, 511, 1007, 1023] {
            assert_eq!(
                gf::mul(t[INV_AT + e], gf::shift(e as u64)),
                gf::ONE,
                "x^-8e, e = {e}"
            );
        }
        for o in 0..16 {
            // Feeding o zero bytes from the moved initial value gives the initial value back.
            assert_eq!(
                reg(t[INIT_AT + o], &vec![0; o]),
                u32::MAX,
                "init moved back {o} bytes"
            );
        }
        for k in 0..8 {
            for v in [0u64, 1, 2, 255, rng.below(256)] {
                let n = v << (8 * k);
                assert_eq!(t[POW_AT + 256 * k + v as usize], gf::shift(n), "x^8n, n = {n:#x}");
            }
        }
    }

    /// The integer after `#define NAME` in the kernel source.
    fn define(source: &str, name: &str) -> usize {
        let line = source
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("kernels/crc32c.cu has no #define {name}"));
        line.split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("cannot read {line:?}"))
    }

    #[test]
    fn the_kernel_source_agrees_on_the_layout_and_the_block() {
        let source = include_str!("../../kernels/crc32c.cu");
        assert_eq!(define(source, "CRC_SKIP_AT"), layout::SKIP_AT);
        assert_eq!(define(source, "CRC_SKIP_WORDS"), layout::SKIP_WORDS);
        assert_eq!(define(source, "CRC_INV_AT"), layout::INV_AT);
        assert_eq!(define(source, "CRC_INIT_AT"), layout::INIT_AT);
        assert_eq!(define(source, "CRC_POW_AT"), layout::POW_AT);
        assert_eq!(define(source, "CRC_CONST_WORDS"), layout::WORDS);
        assert!(
            source.contains(&format!("__launch_bounds__({BLOCK})")),
            "the kernel's launch bound must be BLOCK = {BLOCK}"
        );
        // The file may include headers of kernels/; build.rs pastes them in, so the source
        // embedded for NVRTC has no include left.
        let embedded = crate::cuda::kernels::MODULES
            .iter()
            .find(|m| m.name == "crc32c")
            .expect("kernels/crc32c.cu is embedded");
        assert!(
            !embedded.source.contains("#include"),
            "NVRTC compiles the embedded source without headers"
        );
    }

    // A CPU model of kernels/crc32c.cu, line by line, for one segment: memory is `mem`, at
    // addresses [0, mem.len()).

    /// crc_load_partial.
    fn load_partial(mem: &[u8], blk: u64, start: u64, end: u64) -> [u32; 4] {
        let (mut lo, mut hi) = (0u64, 0u64);
        for k in 0..16u64 {
            let at = blk + k;
            if at >= start && at < end {
                let byte = u64::from(mem[at as usize]);
                if k < 8 {
                    lo |= byte << (8 * k);
                } else {
                    hi |= byte << (8 * (k - 8));
                }
            }
        }
        [lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32]
    }

    /// The 16-byte vector load.
    fn load_vector(mem: &[u8], blk: u64) -> [u32; 4] {
        let b = &mem[blk as usize..blk as usize + 16];
        std::array::from_fn(|i| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]))
    }

    /// crc_block.
    fn block(tab: &[u32], r: u32, v: [u32; 4]) -> u32 {
        let w = [v[0] ^ r, v[1], v[2], v[3]];
        (0..16).fold(0, |acc, p| {
            acc ^ tab[p * 256 + ((w[p / 4] >> (8 * (p % 4))) & 0xff) as usize]
        })
    }

    /// What the warp given segment `t` of piece (`a`, `len`) xors into the piece's result.
    fn model_segment(consts: &[u32], mem: &[u8], a: u64, len: u64, t: u64, seg_shift: u32) -> u32 {
        use layout::*;
        let tab = &consts[SKIP_AT..SKIP_AT + SKIP_WORDS];
        let b = a + len;
        let seg_start = ((a >> seg_shift) + t) << seg_shift;
        let seg_end = seg_start + (1u64 << seg_shift);
        let start = a.max(seg_start);
        let end = b.min(seg_end);
        let base = start & !15;
        let rows = ((end - base + 15) >> 4).div_ceil(32);
        let rows_end = base + (rows << 9);
        let mut lanes = [0u32; 32];
        for (lane, out) in lanes.iter_mut().enumerate() {
            let lane = lane as u64;
            let mut r = if t == 0 && lane == 0 {
                consts[INIT_AT + (start & 15) as usize]
            } else {
                0
            };
            let mine = base + 16 * lane;
            for row in 0..rows {
                let blk = mine + (row << 9);
                let v = if blk >= end {
                    [0; 4]
                } else if blk >= start && blk + 16 <= end {
                    load_vector(mem, blk)
                } else {
                    load_partial(mem, blk, start, end)
                };
                r = block(tab, r, v);
            }
            *out = gf::mul(r, consts[INV_AT + (rows_end - end + 16 * lane) as usize]);
        }
        let mut r = lanes.iter().fold(0, |acc, l| acc ^ l);
        let after = b - end;
        for k in 0..8 {
            let byte = ((after >> (8 * k)) & 0xff) as usize;
            if byte != 0 {
                r = gf::mul(r, consts[POW_AT + 256 * k + byte]);
            }
        }
        if after == 0 {
            r ^= u32::MAX;
        }
        r
    }

    /// The kernel's output for `pieces` (offsets into `mem`), from the model and the table the
    /// host uploads.
    fn model(consts: &[u32], mem: &[u8], pieces: &[(u64, u64)], seg_shift: u32) -> Vec<u32> {
        let mut table = vec![0u64; table_words(pieces.len())];
        let segments = fill_table(pieces, seg_shift, &mut table);
        let n = pieces.len();
        let (first, rest) = table.split_at(n + 1);
        let (addrs, lens) = rest.split_at(n);
        let mut out = vec![0u32; n];
        for g in 0..segments {
            // The search's answer: the last piece whose first segment is <= g.
            let i = first.partition_point(|&f| f <= g) - 1;
            out[i] ^= model_segment(consts, mem, addrs[i], lens[i], g - first[i], seg_shift);
        }
        out
    }

    #[test]
    fn the_kernel_model_matches_the_crate() {
        let consts = constants();
        let mut rng = Rng(3);
        let mem: Vec<u8> = (0..40_000).map(|_| rng.next() as u8).collect();
        let mut pieces: Vec<(u64, u64)> = vec![
            (0, 0),
            (5, 0),
            (0, 1),
            (15, 1),
            (15, 2),
            (16, 16),
            (17, 15),
            (32, 512),
            (31, 514),
            (4095, 1),
            (4095, 2),
            (4096, 4096),
            (1000, 9000),
            (0, 40_000),
            (39_999, 1),
        ];
        for _ in 0..300 {
            let len = match rng.below(4) {
                0 => rng.below(40),
                1 => rng.below(600),
                _ => rng.below(20_000),
            };
            let a = rng.below(40_000 - len);
            pieces.push((a, len));
        }
        let want: Vec<u32> = pieces
            .iter()
            .map(|&(a, len)| crc32c::crc32c(&mem[a as usize..(a + len) as usize]))
            .collect();
        for seg_shift in [9, 10, 12, 13, 16] {
            let got = model(&consts, &mem, &pieces, seg_shift);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "piece {i} {:?}, segments of {} bytes",
                    pieces[i],
                    1 << seg_shift
                );
            }
        }
    }

    #[test]
    fn segments_are_address_aligned_runs() {
        assert_eq!(segment_count(0, 0, 13), 0);
        assert_eq!(segment_count(12345, 0, 13), 0);
        assert_eq!(segment_count(0, 1, 13), 1);
        assert_eq!(segment_count(0, 8192, 13), 1);
        assert_eq!(segment_count(0, 8193, 13), 2);
        assert_eq!(segment_count(8191, 2, 13), 2);
        assert_eq!(segment_count(100, 32 << 10, 13), 5);
        assert_eq!(segment_count(8192, 32 << 10, 13), 4);
        let pieces = [(100u64, 10u64), (7, 0), (8000, 400), (1 << 20, 1 << 20)];
        let mut table = vec![u64::MAX; table_words(pieces.len())];
        let total = fill_table(&pieces, 13, &mut table);
        assert_eq!(total, 1 + 2 + 128);
        assert_eq!(
            table,
            [0, 1, 1, 3, 131, 100, 7, 8000, 1 << 20, 10, 0, 400, 1 << 20]
        );
        assert_eq!(grid(0, 100), 1);
        assert_eq!(grid(8, 100), 1);
        assert_eq!(grid(9, 100), 2);
        assert_eq!(grid(1 << 30, 100), 100);
    }

    #[test]
    fn segment_sizes_are_powers_of_two_in_range() {
        assert_eq!(check_segment_size(DEFAULT_SEGMENT).unwrap(), 13);
        assert_eq!(check_segment_size(MIN_SEGMENT).unwrap(), 9);
        assert_eq!(check_segment_size(MAX_SEGMENT).unwrap(), 20);
        for bad in [0, 1, 256, 3000, 1 << 21, u64::MAX] {
            let e = check_segment_size(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e:?}");
        }
    }
}
