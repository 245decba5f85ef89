// Pack and unpack kernels: gather many pieces of tensor memory into one extent (zeroing
// every extent byte no piece covers), and scatter an extent back out to the pieces. They
// compute exactly the CPU reference in crates/runtime/src/pack.rs (pack_host, unpack_host).
//
// Work is split into fixed-size tiles of 2^tile_shift bytes, and each warp works on one
// tile at a time, alone (warps never wait for each other, so any grid and any block size
// that is a multiple of 32 is correct; the launch code picks a grid that fills the GPU and
// the warps stride over the tiles):
//
// - pack is destination-driven: tile t is bytes [t << tile_shift, (t + 1) << tile_shift)
//   of the extent. The warp finds the first piece that ends after the tile's start in the
//   sorted table of piece ends, then walks the pieces overlapping the tile, copying each
//   overlap and zeroing the gaps between them and after the last one. Every extent byte
//   belongs to exactly one tile, so every byte is written exactly once.
// - unpack is source-driven: piece i is cut into ceil(len_i / tile) tiles, and the launch
//   code uploads the prefix sum of those counts (first_tile[i], with first_tile[n] the total).
//   Global tile g belongs to the piece i with first_tile[i] <= g < first_tile[i + 1], which
//   the warp finds in the prefix sums. Pieces may come in any order and may read the same
//   extent bytes; their destinations are disjoint, so again every byte is written once.
//
// Both searches are warp-cooperative (sp_warp_upper_bound, in warp.cuh): 32 lanes probe 32
// evenly spaced keys at once and a ballot picks the bucket holding the answer, so 100k pieces
// take 4 rounds, not 17.
//
// Each copy (a piece's overlap with a tile) is done by all 32 lanes: a byte-wise head up to
// the first 16-byte-aligned destination address, a body of aligned 16-byte stores and a
// byte-wise tail. The body's loads depend on the source's alignment relative to the
// destination: 16-byte loads when the two are congruent mod 16, 8- or 4-byte loads when they
// are congruent mod 8 or 4, and otherwise aligned 4-byte loads funnel-shifted into place.
// Those word loads never reach past the source's last byte (the last chunk is left to the
// byte-wise tail when its last word would), and reach before its first byte only within that
// byte's aligned word, which lies in the same allocation: a memory checker sees no access out
// of range. The alignment class is the same for the whole body, so lanes never diverge on it.
// Each lane keeps SP_UNROLL 16-byte loads in flight before it stores them.
//
// The file includes only warp.cuh (the warp helpers it shares with crc32c.cu), which build.rs
// pastes in, so the source NVRTC compiles is self-contained.

#include "warp.cuh"

// 16-byte chunks each lane loads before storing them.
#define SP_UNROLL 8

// Body copies: dst[i] = the 16 source bytes of chunk i, for i in [0, n), by the 32 lanes of
// a warp. `dst` is 16-byte aligned; the source's alignment differs per variant.

// Source 16-byte aligned.
__device__ __forceinline__ void sp_body_v16(uint4* __restrict__ dst, const uint4* __restrict__ src, sp_u64 n,
                                            unsigned lane) {
    for (sp_u64 base = lane; base < n; base += SP_WARP * SP_UNROLL) {
        uint4 v[SP_UNROLL];
#pragma unroll
        for (int k = 0; k < SP_UNROLL; ++k) {
            const sp_u64 i = base + k * SP_WARP;
            if (i < n) {
                v[k] = src[i];
            }
        }
#pragma unroll
        for (int k = 0; k < SP_UNROLL; ++k) {
            const sp_u64 i = base + k * SP_WARP;
            if (i < n) {
                dst[i] = v[k];
            }
        }
    }
}

// Source 8-byte aligned.
__device__ __forceinline__ void sp_body_v8(uint4* __restrict__ dst, const uint2* __restrict__ src, sp_u64 n,
                                           unsigned lane) {
    for (sp_u64 base = lane; base < n; base += SP_WARP * SP_UNROLL) {
        uint4 v[SP_UNROLL];
#pragma unroll
        for (int k = 0; k < SP_UNROLL; ++k) {
            const sp_u64 i = base + k * SP_WARP;
            if (i < n) {
                const uint2 a = src[2 * i];
                const uint2 b = src[2 * i + 1];
                v[k] = make_uint4(a.x, a.y, b.x, b.y);
            }
        }
#pragma unroll
        for (int k = 0; k < SP_UNROLL; ++k) {
            const sp_u64 i = base + k * SP_WARP;
            if (i < n) {
                dst[i] = v[k];
            }
        }
    }
}

// Source 4-byte aligned.
__device__ __forceinline__ void sp_body_v4(uint4* __restrict__ dst, const sp_u32* __restrict__ src, sp_u64 n,
                                           unsigned lane) {
    for (sp_u64 base = lane; base < n; base += SP_WARP * SP_UNROLL) {
        uint4 v[SP_UNROLL];
#pragma unroll
        for (int k = 0; k < SP_UNROLL; ++k) {
            const sp_u64 i = base + k * SP_WARP;
            if (i < n) {
                const sp_u32* w = src + 4 * i;
                v[k] = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
#pragma unroll
        for (int k = 0; k < SP_UNROLL; ++k) {
            const sp_u64 i = base + k * SP_WARP;
            if (i < n) {
                dst[i] = v[k];
            }
        }
    }
}

// Source at any other alignment: `words` is the source rounded down to 4 bytes and `shift`
// (8, 16 or 24) the bits it was rounded down by. Chunk i is made of words 4i to 4i + 4.
__device__ __forceinline__ void sp_body_shift(uint4* __restrict__ dst, const sp_u32* __restrict__ words,
                                              unsigned shift, sp_u64 n, unsigned lane) {
    for (sp_u64 base = lane; base < n; base += SP_WARP * SP_UNROLL) {
        uint4 v[SP_UNROLL];
#pragma unroll
        for (int k = 0; k < SP_UNROLL; ++k) {
            const sp_u64 i = base + k * SP_WARP;
            if (i < n) {
                const sp_u32* w = words + 4 * i;
                const sp_u32 w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4];
                v[k] = make_uint4(__funnelshift_r(w0, w1, shift), __funnelshift_r(w1, w2, shift),
                                  __funnelshift_r(w2, w3, shift), __funnelshift_r(w3, w4, shift));
            }
        }
#pragma unroll
        for (int k = 0; k < SP_UNROLL; ++k) {
            const sp_u64 i = base + k * SP_WARP;
            if (i < n) {
                dst[i] = v[k];
            }
        }
    }
}

// dst[0, len) = src[0, len), by the 32 lanes of a warp; the regions do not overlap.
__device__ void sp_warp_copy(sp_u8* __restrict__ dst, const sp_u8* __restrict__ src, sp_u64 len,
                             unsigned lane) {
    sp_u64 head = (16 - ((sp_u64)dst & 15)) & 15;
    if (head > len) {
        head = len;
    }
    if (lane < head) {
        dst[lane] = src[lane];
    }
    dst += head;
    src += head;
    len -= head;
    const unsigned misalign = (unsigned)((sp_u64)src & 15);
    sp_u64 n = len / 16;
    // The funnel-shift body reads whole words: the last chunk's fifth word reaches
    // 4 - misalign % 4 bytes past the chunk. When that would be past the end of the source,
    // the last chunk goes to the tail instead, so no load leaves the source's own bytes'
    // words (which a memory checker would report, and which could leave the allocation).
    if ((misalign & 3) != 0 && n > 0 && n * 16 + 4 - (misalign & 3) > len) {
        n -= 1;
    }
    const sp_u64 tail = len - n * 16;  // < 32: one byte per lane
    if (lane < tail) {
        dst[n * 16 + lane] = src[n * 16 + lane];
    }
    if (n == 0) {
        return;
    }
    uint4* body = (uint4*)dst;
    if (misalign == 0) {
        sp_body_v16(body, (const uint4*)src, n, lane);
    } else if ((misalign & 7) == 0) {
        sp_body_v8(body, (const uint2*)src, n, lane);
    } else if ((misalign & 3) == 0) {
        sp_body_v4(body, (const sp_u32*)src, n, lane);
    } else {
        const sp_u32* words = (const sp_u32*)((sp_u64)src & ~(sp_u64)3);
        sp_body_shift(body, words, ((unsigned)(sp_u64)src & 3) * 8, n, lane);
    }
}

// dst[0, len) = 0, by the 32 lanes of a warp.
__device__ void sp_warp_zero(sp_u8* __restrict__ dst, sp_u64 len, unsigned lane) {
    sp_u64 head = (16 - ((sp_u64)dst & 15)) & 15;
    if (head > len) {
        head = len;
    }
    if (lane < head) {
        dst[lane] = 0;
    }
    dst += head;
    len -= head;
    const sp_u64 n = len / 16;
    const sp_u64 tail = len % 16;
    if (lane < tail) {
        dst[n * 16 + lane] = 0;
    }
    uint4* body = (uint4*)dst;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (sp_u64 i = lane; i < n; i += SP_WARP) {
        body[i] = zero;
    }
}

// Pack: extent[offs[i], ends[i]) = mems[i][0, ends[i] - offs[i]) for every piece i < n, and
// every other byte of extent[0, extent_len) = 0. Pieces are sorted by offset and disjoint,
// so `ends` is sorted too.
extern "C" __global__ void __launch_bounds__(256) pack_pieces(sp_u8* __restrict__ extent, sp_u64 extent_len,
                                                              const sp_u64* __restrict__ ends,
                                                              const sp_u64* __restrict__ offs,
                                                              const sp_u64* __restrict__ mems, sp_u64 n,
                                                              sp_u32 tile_shift) {
    const unsigned lane = sp_lane();
    const sp_u64 tile = (sp_u64)1 << tile_shift;
    const sp_u64 tiles = (extent_len + tile - 1) >> tile_shift;
    const sp_u64 stride = sp_warp_count();
    for (sp_u64 t = sp_global_warp(); t < tiles; t += stride) {
        const sp_u64 t0 = t << tile_shift;
        const sp_u64 t1 = t0 + tile < extent_len ? t0 + tile : extent_len;
        sp_u64 pos = t0;  // extent bytes [t0, pos) of this tile are done
        for (sp_u64 i = sp_warp_upper_bound(ends, 0, n, t0, lane); i < n; ++i) {
            const sp_u64 off = offs[i];
            if (off >= t1) {
                break;
            }
            if (off > pos) {
                sp_warp_zero(extent + pos, off - pos, lane);
                pos = off;
            }
            const sp_u64 end = ends[i] < t1 ? ends[i] : t1;
            const sp_u8* src = (const sp_u8*)mems[i] + (pos - off);
            sp_warp_copy(extent + pos, src, end - pos, lane);
            pos = end;
        }
        if (pos < t1) {
            sp_warp_zero(extent + pos, t1 - pos, lane);
        }
    }
}

// Unpack: mems[i][0, lens[i]) = extent[offs[i], offs[i] + lens[i]) for every piece i < n.
// first_tile[i] is the first global tile of piece i (first_tile[0] = 0, sorted, n + 1
// entries); tiles is first_tile[n].
extern "C" __global__ void __launch_bounds__(256) unpack_pieces(const sp_u8* __restrict__ extent,
                                                                const sp_u64* __restrict__ first_tile,
                                                                const sp_u64* __restrict__ offs,
                                                                const sp_u64* __restrict__ mems,
                                                                const sp_u64* __restrict__ lens, sp_u64 n,
                                                                sp_u64 tiles, sp_u32 tile_shift) {
    const unsigned lane = sp_lane();
    const sp_u64 tile = (sp_u64)1 << tile_shift;
    const sp_u64 stride = sp_warp_count();
    for (sp_u64 g = sp_global_warp(); g < tiles; g += stride) {
        // The last piece whose first tile is <= g. first_tile[0] = 0 <= g, so it exists.
        const sp_u64 i = sp_warp_upper_bound(first_tile, 0, n + 1, g, lane) - 1;
        const sp_u64 start = (g - first_tile[i]) << tile_shift;
        const sp_u64 rest = lens[i] - start;
        const sp_u64 len = rest < tile ? rest : tile;
        sp_warp_copy((sp_u8*)mems[i] + start, extent + offs[i] + start, len, lane);
    }
}
