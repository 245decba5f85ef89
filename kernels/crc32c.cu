// CRC-32C of many pieces of device memory in one launch: out[i] = the CRC-32C (Castagnoli:
// reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF, the value the
// `crc32c` crate gives) of bytes [addrs[i], addrs[i] + lens[i]), for every piece i < n.
// Pieces may start at any byte, have any length (0 included) and overlap. It computes
// exactly what HostDevice::crc32c (crates/runtime/src/host.rs) computes on the CPU.
//
// Arithmetic. A CRC register is a polynomial of degree < 32 over GF(2), held reflected (bit
// 31 is the coefficient of x^0, so 0x80000000 is 1). Feeding bytes is linear: with reg(r, M)
// the register after feeding message M to register r,
//     reg(r, A ++ B) = reg(r, A) * x^(8 |B|)  xor  reg(0, B)      (mod P),
// and zero bytes fed to a zero register leave it zero. So a piece's register is the XOR of
// its parts' registers, each multiplied by x^(8 * the number of piece bytes after it).
// crc_mul multiplies two registers mod P (32 shift-and-xor steps). The powers of x the kernel
// needs come in `consts`, a table the host computes once per GPU (src/cuda/crc.rs, which
// also holds a CPU model of this kernel, line by line, tested against the crate).
//
// Work split. Each piece is cut at multiples of 2^seg_shift bytes of *address* (so the inner
// segments of a long piece are aligned and full; only its first and last can be partial).
// The host uploads per piece its address, its length and the prefix sum of the pieces'
// segment counts (first_seg[i], with first_seg[n] the total); each warp takes one segment at
// a time, alone (warps never wait for each other, so any grid and any block of a multiple of
// 32 threads, up to the launch bound, is correct; the launch code picks a grid that fills the
// GPU and the warps stride over the segments), and finds its piece with the same
// warp-cooperative search as pack.cu (sp_warp_upper_bound, in warp.cuh).
//
// One segment [start, end), one warp. The segment is covered by the 16-byte aligned blocks
// from base = start rounded down to 16, in rows of 32 blocks (512 bytes); lane l takes block
// l of every row, so a row is one coalesced 512-byte load. Each lane keeps a register r and,
// for each of its blocks, with b_p the p-th byte of the block xor r (r xored into its first
// four bytes),
//     r = T[0][b_0] ^ T[1][b_1] ^ ... ^ T[15][b_15],   T[p][v] = v * x^(8 (512 - p)):
// slice-by-16, with tables that also step over the 496 bytes of the other lanes' blocks in
// the row, which count as zeros for this lane. The 16 tables (16 KiB) are copied from
// `consts` into shared memory once per block. Bytes outside [start, end) in the first and
// last blocks count as zeros too. After `rows` rows the register of lane l stands 16 l bytes
// past the end of the rows, rows_end = base + 512 rows, so lane l multiplies it by
// x^(-8 (rows_end - end + 16 l)) (a table of x^(-8 e), e < 1024) to stand at the segment's
// end, and the XOR of the 32 registers is the register of the segment's bytes. A piece's first
// segment starts lane 0 at 0xFFFFFFFF * x^(-8 (start - base)): the initial value, moved back
// to `base` over the zero bytes before the piece. Lane 0 then multiplies the segment's
// register by x^(8 d), d = the piece bytes after the segment, one table entry per non-zero
// byte of d (x^(8 v 256^k) for byte k of value v), xors in the final 0xFFFFFFFF when d = 0
// (the piece's last segment) and atomically xors the result into out[i], which the host
// zeroed. XOR is exact and commutative, so the result does not depend on the order in which
// segments finish. A piece of length 0 has no segment: it keeps 0, the CRC-32C of nothing,
// and its memory is not read.
//
// Loads. A block that lies wholly inside [start, end) is loaded as one 16-byte vector; the at
// most two other blocks of a segment are loaded byte by byte, and only their bytes inside
// [start, end). So no load touches a byte outside its piece: stricter than pack.cu's rule
// (word loads may reach before a source's first byte within that byte's aligned word, never
// past its last byte), and a memory checker sees no access out of range whatever the pieces'
// alignments and lengths. Each lane keeps CRC_UNROLL blocks in flight before it uses them.
//
// Shared memory is written only before the kernel's one __syncthreads(), which every thread
// of the block reaches, and only read after it: there is no shared-memory race.
//
// Speed: one shared-memory lookup per byte (with random bank conflicts) bounds it; the
// per-segment combining costs a few hundred instructions, small next to the 16 rows of a
// default 8 KiB segment. On an H200, 64 MiB as 2048 pieces of 32 KiB ran at about 1 TB/s
// (half the rate of a device-to-device copy of the same size, 20 times PCIe's), and as one
// piece a little faster (crc32c_bandwidth in tests/gpu_crc.rs).
//
// The file includes only warp.cuh (the warp helpers it shares with pack.cu), which build.rs
// pastes in, so the source NVRTC compiles is self-contained.

#include "warp.cuh"

// The CRC-32C polynomial, reflected.
#define CRC_POLY 0x82f63b78u
// Blocks each lane loads before it feeds them to its register.
#define CRC_UNROLL 4

// Layout of `consts`, in 32-bit words; src/cuda/crc.rs builds it with the same offsets
// (a test there reads these lines).
// T[16][256]: T[p][v] = v * x^(8 (512 - p)).
#define CRC_SKIP_AT 0
#define CRC_SKIP_WORDS 4096
// [1024]: x^(-8 e).
#define CRC_INV_AT 4096
// [16]: 0xFFFFFFFF * x^(-8 o).
#define CRC_INIT_AT 5120
// [8][256]: x^(8 v 256^k) at 256 k + v.
#define CRC_POW_AT 5136
#define CRC_CONST_WORDS 7184

// a * b mod P, both reflected: for each coefficient of a, from x^0 (bit 31) up, add b if it
// is set, then multiply b by x.
__device__ __forceinline__ sp_u32 crc_mul(sp_u32 a, sp_u32 b) {
    sp_u32 p = 0;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
        p ^= b & (0u - (a >> 31));
        a <<= 1;
        b = (b >> 1) ^ (CRC_POLY & (0u - (b & 1u)));
    }
    return p;
}

// T[p][x] of the tables in shared memory (16 tables of 256 words, one after the other).
#define CRC_T(p, x) tab[(p) * 256 + (x)]

// Feeds the 16-byte block v (bytes in little-endian order: byte 0 is the low byte of v.x) to
// register r, followed by the 496 zero bytes that stand for the other lanes' blocks.
__device__ __forceinline__ sp_u32 crc_block(const sp_u32* __restrict__ tab, sp_u32 r, uint4 v) {
    const sp_u32 w = v.x ^ r;
    return CRC_T(0, w & 0xffu) ^ CRC_T(1, (w >> 8) & 0xffu) ^ CRC_T(2, (w >> 16) & 0xffu) ^ CRC_T(3, w >> 24) ^
           CRC_T(4, v.y & 0xffu) ^ CRC_T(5, (v.y >> 8) & 0xffu) ^ CRC_T(6, (v.y >> 16) & 0xffu) ^
           CRC_T(7, v.y >> 24) ^ CRC_T(8, v.z & 0xffu) ^ CRC_T(9, (v.z >> 8) & 0xffu) ^
           CRC_T(10, (v.z >> 16) & 0xffu) ^ CRC_T(11, v.z >> 24) ^ CRC_T(12, v.w & 0xffu) ^
           CRC_T(13, (v.w >> 8) & 0xffu) ^ CRC_T(14, (v.w >> 16) & 0xffu) ^ CRC_T(15, v.w >> 24);
}

// The 16 bytes at `blk` (16-byte aligned), with every byte outside [start, end) read as zero
// and not loaded: byte loads of the bytes inside only.
__device__ __noinline__ uint4 crc_load_partial(sp_u64 blk, sp_u64 start, sp_u64 end) {
    sp_u64 lo = 0, hi = 0;
    for (unsigned k = 0; k < 16; ++k) {
        const sp_u64 at = blk + k;
        if (at >= start && at < end) {
            const sp_u64 byte = *(const sp_u8*)at;
            if (k < 8) {
                lo |= byte << (8 * k);
            } else {
                hi |= byte << (8 * (k - 8));
            }
        }
    }
    return make_uint4((sp_u32)lo, (sp_u32)(lo >> 32), (sp_u32)hi, (sp_u32)(hi >> 32));
}

// out[i] ^= the CRC-32C of bytes [addrs[i], addrs[i] + lens[i]) for every piece i < n (the
// host zeroes out[0, n) first). first_seg[i] is the first global segment of piece i
// (first_seg[0] = 0, sorted, n + 1 entries, first_seg[n] = segments); piece i has
// ((addrs[i] + lens[i] - 1) >> seg_shift) - (addrs[i] >> seg_shift) + 1 segments, none if
// lens[i] = 0. consts holds CRC_CONST_WORDS words laid out as above.
extern "C" __global__ void __launch_bounds__(256)
    crc32c_pieces(const sp_u64* __restrict__ first_seg, const sp_u64* __restrict__ addrs,
                  const sp_u64* __restrict__ lens, sp_u64 n, sp_u64 segments, sp_u32 seg_shift,
                  const sp_u32* __restrict__ consts, sp_u32* __restrict__ out) {
    __shared__ sp_u32 tab[CRC_SKIP_WORDS];
    for (unsigned k = threadIdx.x; k < CRC_SKIP_WORDS; k += blockDim.x) {
        tab[k] = consts[CRC_SKIP_AT + k];
    }
    __syncthreads();

    const unsigned lane = sp_lane();
    const sp_u64 stride = sp_warp_count();
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (sp_u64 g = sp_global_warp(); g < segments; g += stride) {
        // The last piece whose first segment is <= g: first_seg[0] = 0 <= g, so it exists,
        // and it is the one piece holding segment g (pieces without segments share their
        // first_seg with the next piece, so they are never the last one <= g).
        const sp_u64 i = sp_warp_upper_bound(first_seg, 0, n + 1, g, lane) - 1;
        const sp_u64 t = g - first_seg[i];  // segment t of piece i
        const sp_u64 a = addrs[i];
        const sp_u64 b = a + lens[i];
        const sp_u64 seg_start = ((a >> seg_shift) + t) << seg_shift;
        const sp_u64 seg_end = seg_start + ((sp_u64)1 << seg_shift);
        const sp_u64 start = a > seg_start ? a : seg_start;
        const sp_u64 end = b < seg_end ? b : seg_end;
        const sp_u64 base = start & ~(sp_u64)15;
        const sp_u64 rows = (((end - base + 15) >> 4) + SP_WARP - 1) / SP_WARP;

        sp_u32 r = (t == 0 && lane == 0) ? consts[CRC_INIT_AT + (start & 15)] : 0u;
        const sp_u64 mine = base + 16 * (sp_u64)lane;  // this lane's block of row 0
        for (sp_u64 row = 0; row < rows; row += CRC_UNROLL) {
            uint4 v[CRC_UNROLL];
#pragma unroll
            for (int u = 0; u < CRC_UNROLL; ++u) {
                const sp_u64 blk = mine + ((row + u) << 9);
                if (row + u >= rows || blk >= end) {
                    v[u] = zero;
                } else if (blk >= start && blk + 16 <= end) {
                    v[u] = *(const uint4*)blk;
                } else {
                    v[u] = crc_load_partial(blk, start, end);
                }
            }
#pragma unroll
            for (int u = 0; u < CRC_UNROLL; ++u) {
                if (row + u < rows) {
                    r = crc_block(tab, r, v[u]);
                }
            }
        }
        const sp_u64 rows_end = base + (rows << 9);
        // rows_end - end < 512 (the last row holds byte end - 1) and 16 lane <= 496.
        r = crc_mul(r, consts[CRC_INV_AT + (rows_end - end) + 16 * lane]);
#pragma unroll
        for (int o = SP_WARP / 2; o > 0; o >>= 1) {
            r ^= __shfl_xor_sync(SP_FULL_MASK, r, o);
        }
        if (lane == 0) {
            const sp_u64 after = b - end;
            for (int k = 0; k < 8; ++k) {
                const unsigned byte = (unsigned)(after >> (8 * k)) & 0xffu;
                if (byte != 0) {
                    r = crc_mul(r, consts[CRC_POW_AT + 256 * k + byte]);
                }
            }
            if (after == 0) {
                r ^= 0xffffffffu;
            }
            atomicXor(&out[i], r);
        }
    }
}
