// Warp helpers shared by the kernels in which each warp takes one unit of work (a tile, a
// segment) at a time, alone: pack.cu and crc32c.cu. They live here once instead of being
// copied into each kernel file.
//
// A kernel file includes this header by its file name. build.rs pastes the header in place of
// that include line, both for nvcc and for the source it embeds for NVRTC, so every embedded
// kernel source stays self-contained. This file includes no headers itself.

typedef unsigned char sp_u8;
typedef unsigned int sp_u32;
typedef unsigned long long sp_u64;

#define SP_WARP 32
#define SP_FULL_MASK 0xffffffffu

// The lane of the calling thread, its warp's index in the grid, and the grid's warp count.
__device__ __forceinline__ unsigned sp_lane() {
    return threadIdx.x & (SP_WARP - 1);
}

__device__ __forceinline__ sp_u64 sp_global_warp() {
    return ((sp_u64)blockIdx.x * blockDim.x + threadIdx.x) / SP_WARP;
}

__device__ __forceinline__ sp_u64 sp_warp_count() {
    return ((sp_u64)gridDim.x * blockDim.x) / SP_WARP;
}

// The first i in [lo, hi) with keys[i] > target, or hi if there is none; keys[lo, hi) is
// sorted ascending. All 32 lanes call it with the same arguments and get the same answer.
// Warp-cooperative: the 32 lanes probe 32 evenly spaced keys at once and a ballot picks the
// bucket holding the answer, so 100k keys take 4 rounds, not 17.
__device__ sp_u64 sp_warp_upper_bound(const sp_u64* __restrict__ keys, sp_u64 lo, sp_u64 hi, sp_u64 target,
                                      unsigned lane) {
    while (hi - lo > SP_WARP) {
        // 32 buckets of `step` keys cover [lo, hi); each lane probes the last key of its
        // bucket. The answer lies in the first bucket whose last key is above the target.
        const sp_u64 step = (hi - lo + SP_WARP - 1) / SP_WARP;
        sp_u64 probe = lo + (lane + 1) * step - 1;
        if (probe > hi - 1) {
            probe = hi - 1;
        }
        const unsigned above = __ballot_sync(SP_FULL_MASK, keys[probe] > target);
        if (above == 0) {
            return hi;
        }
        const sp_u64 k = (sp_u64)(__ffs(above) - 1);
        const sp_u64 bucket_end = lo + (k + 1) * step;
        lo += k * step;
        if (bucket_end < hi) {
            hi = bucket_end;
        }
        // keys[hi - 1] > target from here on, so the answer lies in [lo, hi).
    }
    const sp_u64 i = lo + lane;
    const unsigned above = __ballot_sync(SP_FULL_MASK, i < hi && keys[i] > target);
    return above == 0 ? hi : lo + (sp_u64)(__ffs(above) - 1);
}
