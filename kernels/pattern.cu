// Test-pattern kernels: fill device memory with spillway's deterministic pattern, and
// count the bytes of a region that differ from it. They compute exactly the CPU reference
// in crates/runtime/src/pattern.rs:
//
//   word w of the pattern for `seed` = splitmix64(seed ^ (w * 0x9E3779B97F4A7C15)),
//   stored little-endian; byte o of the pattern is byte o % 8 of word o / 8.
//
// The region may start at any address and at any pattern offset. Each kernel splits it
// into a byte-wise head (up to the first 8-byte-aligned address), a body of aligned 8-byte
// words and a byte-wise tail (fewer than 8 bytes). A body word at pattern offset p is made
// of pattern words p / 8 and p / 8 + 1 funnel-shifted by p % 8 bytes, which is the same
// shift for every body word of one launch, so warps never diverge on it.
//
// Both kernels use grid-stride loops throughout and are correct for any grid and any block
// size that is a multiple of 32. The file includes no headers, so NVRTC compiles it as it is.

typedef unsigned char sw_u8;
typedef unsigned long long sw_u64;

#define SW_GOLDEN 0x9E3779B97F4A7C15ULL

__device__ __forceinline__ sw_u64 sw_splitmix64(sw_u64 z) {
    z += SW_GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Word w of the pattern.
__device__ __forceinline__ sw_u64 sw_word(sw_u64 seed, sw_u64 w) {
    return sw_splitmix64(seed ^ (w * SW_GOLDEN));
}

// Byte o of the pattern.
__device__ __forceinline__ sw_u8 sw_byte(sw_u64 seed, sw_u64 o) {
    return (sw_u8)(sw_word(seed, o >> 3) >> ((o & 7) * 8));
}

// The 8 pattern bytes starting at pattern offset p (any p), as a little-endian word.
// `shift` is (p % 8) * 8, passed in because it is the same for a whole body.
__device__ __forceinline__ sw_u64 sw_bytes8(sw_u64 seed, sw_u64 p, unsigned shift) {
    sw_u64 w = p >> 3;
    sw_u64 lo = sw_word(seed, w);
    if (shift == 0) {
        return lo;
    }
    return (lo >> shift) | (sw_word(seed, w + 1) << (64 - shift));
}

// Number of non-zero bytes of x.
__device__ __forceinline__ unsigned sw_nonzero_bytes(sw_u64 x) {
    x |= x >> 4;
    x |= x >> 2;
    x |= x >> 1;
    return (unsigned)__popcll(x & 0x0101010101010101ULL);
}

// How a region [addr, addr + len) splits into head, aligned body and tail.
struct sw_split {
    sw_u64 head;      // bytes before the first 8-byte-aligned address (<= 7)
    sw_u64 words;     // aligned 8-byte words of the body
    sw_u64 body_end;  // head + 8 * words: where the tail starts
    sw_u64 tail;      // bytes after the body (<= 7)
};

__device__ __forceinline__ sw_split sw_split_region(const void* addr, sw_u64 len) {
    sw_split s;
    s.head = (8 - ((sw_u64)addr & 7)) & 7;
    if (s.head > len) {
        s.head = len;
    }
    s.words = (len - s.head) >> 3;
    s.body_end = s.head + s.words * 8;
    s.tail = len - s.body_end;
    return s;
}

// dst[i] = pattern byte (offset + i) for i in [0, len).
extern "C" __global__ void fill_pattern(sw_u8* __restrict__ dst, sw_u64 len, sw_u64 seed, sw_u64 offset) {
    const sw_u64 tid = (sw_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const sw_u64 stride = (sw_u64)gridDim.x * blockDim.x;
    const sw_split s = sw_split_region(dst, len);

    // Head and tail: at most 7 bytes each (loops only so any launch shape is correct).
    for (sw_u64 i = tid; i < s.head; i += stride) {
        dst[i] = sw_byte(seed, offset + i);
    }
    for (sw_u64 i = tid; i < s.tail; i += stride) {
        dst[s.body_end + i] = sw_byte(seed, offset + s.body_end + i);
    }

    sw_u64* __restrict__ body = (sw_u64*)(dst + s.head);
    const sw_u64 p0 = offset + s.head;
    const unsigned shift = (unsigned)(p0 & 7) * 8;
    for (sw_u64 i = tid; i < s.words; i += stride) {
        body[i] = sw_bytes8(seed, p0 + i * 8, shift);
    }
}

// *count += the number of i in [0, len) with src[i] != pattern byte (offset + i).
// The caller zeroes *count before the launch.
extern "C" __global__ void count_pattern_mismatches(const sw_u8* __restrict__ src, sw_u64 len, sw_u64 seed,
                                                    sw_u64 offset, sw_u64* __restrict__ count) {
    const sw_u64 tid = (sw_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const sw_u64 stride = (sw_u64)gridDim.x * blockDim.x;
    const sw_split s = sw_split_region(src, len);
    sw_u64 bad = 0;

    for (sw_u64 i = tid; i < s.head; i += stride) {
        bad += src[i] != sw_byte(seed, offset + i);
    }
    for (sw_u64 i = tid; i < s.tail; i += stride) {
        bad += src[s.body_end + i] != sw_byte(seed, offset + s.body_end + i);
    }

    const sw_u64* __restrict__ body = (const sw_u64*)(src + s.head);
    const sw_u64 p0 = offset + s.head;
    const unsigned shift = (unsigned)(p0 & 7) * 8;
    for (sw_u64 i = tid; i < s.words; i += stride) {
        bad += sw_nonzero_bytes(body[i] ^ sw_bytes8(seed, p0 + i * 8, shift));
    }

    // Every thread of the block reaches this point, so full-warp shuffles are safe.
    for (int delta = 16; delta > 0; delta >>= 1) {
        bad += __shfl_down_sync(0xffffffffu, bad, delta);
    }
    if ((threadIdx.x & 31) == 0 && bad != 0) {
        atomicAdd(count, bad);
    }
}
