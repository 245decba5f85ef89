//! The piece tables the pack and unpack kernels of `kernels/pack.cu` read, built on the
//! host, and the sizes that go with them (tiles, grids). Nothing here touches the GPU.
//!
//! A table is a run of `u64` words, uploaded in one copy, made of arrays of one value per
//! piece (structure of arrays, so that the kernels' searches touch only the keys):
//!
//! - pack: `ends[n]`, `offs[n]`, `mems[n]` (`ends` is sorted because the pieces are);
//! - unpack: `first_tile[n + 1]`, `offs[n]`, `mems[n]`, `lens[n]`, where `first_tile` is the
//!   prefix sum of each piece's tile count and `first_tile[n]` the total.

use spillway_runtime::{DevicePtr, Error, PackPiece, Result};

/// Smallest tile size [`check_tile_size`] accepts.
pub(crate) const MIN_TILE: u64 = 1 << 10;
/// Largest tile size [`check_tile_size`] accepts.
pub(crate) const MAX_TILE: u64 = 1 << 24;
/// The default tile: bytes of extent (pack) or of a piece (unpack) one warp copies before it
/// looks for its next tile.
pub(crate) const DEFAULT_TILE: u64 = 1 << 14;

/// Threads per block of both kernels (their `__launch_bounds__`).
pub(crate) const BLOCK: u32 = 256;
/// Warps per block.
const WARPS_PER_BLOCK: u64 = BLOCK as u64 / 32;

/// `log2(bytes)` when `bytes` is a power of two in `[MIN_TILE, MAX_TILE]`.
pub(crate) fn check_tile_size(bytes: u64) -> Result<u32> {
    if !bytes.is_power_of_two() || !(MIN_TILE..=MAX_TILE).contains(&bytes) {
        return Err(Error::invalid(format!(
            "pack tile size {bytes} must be a power of two from {MIN_TILE} to {MAX_TILE} bytes"
        )));
    }
    Ok(bytes.trailing_zeros())
}

/// The words of a pack table of `n` pieces.
pub(crate) fn pack_words(n: usize) -> usize {
    3 * n
}

/// The words of an unpack table of `n` pieces.
pub(crate) fn unpack_words(n: usize) -> usize {
    4 * n + 1
}

/// Where the arrays of a table uploaded to `base` start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableArrays {
    /// `ends` (pack) or `first_tile` (unpack): the searched keys.
    pub(crate) keys: DevicePtr,
    /// `offs`.
    pub(crate) offs: DevicePtr,
    /// `mems`.
    pub(crate) mems: DevicePtr,
    /// `lens` (unpack only; equal to `mems` + n words for pack, and unused).
    pub(crate) lens: DevicePtr,
}

impl TableArrays {
    /// The arrays of a pack table of `n` pieces at `base`.
    pub(crate) fn pack(base: DevicePtr, n: usize) -> Self {
        let n = n as u64 * 8;
        TableArrays {
            keys: base,
            offs: base + n,
            mems: base + 2 * n,
            lens: base + 3 * n,
        }
    }

    /// The arrays of an unpack table of `n` pieces at `base`.
    pub(crate) fn unpack(base: DevicePtr, n: usize) -> Self {
        let keys = (n as u64 + 1) * 8;
        let n = n as u64 * 8;
        TableArrays {
            keys: base,
            offs: base + keys,
            mems: base + keys + n,
            lens: base + keys + 2 * n,
        }
    }
}

/// Writes the pack table of `pieces` into `out` ([`pack_words`] long). The layout must have
/// passed `check_pack_layout`.
pub(crate) fn fill_pack(pieces: &[PackPiece], out: &mut [u64]) {
    let n = pieces.len();
    debug_assert_eq!(out.len(), pack_words(n));
    let (ends, rest) = out.split_at_mut(n);
    let (offs, mems) = rest.split_at_mut(n);
    for (i, p) in pieces.iter().enumerate() {
        ends[i] = p.end();
        offs[i] = p.offset;
        mems[i] = p.mem;
    }
}

/// Writes the unpack table of `pieces` for tiles of `1 << tile_shift` bytes into `out`
/// ([`unpack_words`] long) and returns the total tile count. The layout must have passed
/// `check_unpack_layout` (no empty piece).
pub(crate) fn fill_unpack(pieces: &[PackPiece], tile_shift: u32, out: &mut [u64]) -> u64 {
    let n = pieces.len();
    debug_assert_eq!(out.len(), unpack_words(n));
    let (first, rest) = out.split_at_mut(n + 1);
    let (offs, rest) = rest.split_at_mut(n);
    let (mems, lens) = rest.split_at_mut(n);
    let mut tiles = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        first[i] = tiles;
        tiles += tile_count(p.len, tile_shift);
        offs[i] = p.offset;
        mems[i] = p.mem;
        lens[i] = p.len;
    }
    first[n] = tiles;
    tiles
}

/// Tiles of `1 << tile_shift` bytes needed for `len` bytes.
pub(crate) fn tile_count(len: u64, tile_shift: u32) -> u64 {
    (len >> tile_shift) + u64::from(len & ((1u64 << tile_shift) - 1) != 0)
}

/// Blocks of [`BLOCK`] threads for `tiles` tiles, one warp per tile, at most `max_blocks`
/// (what fits on the GPU at once; the warps then stride over the tiles).
pub(crate) fn grid(tiles: u64, max_blocks: u32) -> u32 {
    tiles
        .div_ceil(WARPS_PER_BLOCK)
        .clamp(1, u64::from(max_blocks.max(1))) as u32
}

/// Checks that no piece's memory overlaps the extent `[extent, extent + extent_len)` (the
/// kernels read and write them without ordering). Says which piece overlaps.
pub(crate) fn check_disjoint_from_extent(
    op: &str,
    pieces: &[PackPiece],
    extent: DevicePtr,
    extent_len: u64,
) -> Result<()> {
    let extent_end = extent.saturating_add(extent_len);
    for (i, p) in pieces.iter().enumerate() {
        let end = p.mem.checked_add(p.len).ok_or_else(|| {
            Error::invalid(format!(
                "{op} piece {i}: memory at {:#x} of {} bytes wraps around the address space",
                p.mem, p.len
            ))
        })?;
        if p.mem < extent_end && extent < end {
            return Err(Error::invalid(format!(
                "{op} piece {i}: its memory [{:#x}, +{}) overlaps the extent [{extent:#x}, +{extent_len})",
                p.mem, p.len
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(mem: u64, offset: u64, len: u64) -> PackPiece {
        PackPiece { mem, offset, len }
    }

    #[test]
    fn tile_sizes_are_powers_of_two_in_range() {
        assert_eq!(check_tile_size(1 << 14).unwrap(), 14);
        assert_eq!(check_tile_size(MIN_TILE).unwrap(), 10);
        assert_eq!(check_tile_size(MAX_TILE).unwrap(), 24);
        for bad in [0, 1, 512, 3000, 1 << 25, u64::MAX] {
            let e = check_tile_size(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e:?}");
            assert!(e.to_string().contains("power of two"), "{e}");
        }
    }

    #[test]
    fn tile_counts_round_up() {
        assert_eq!(tile_count(1, 10), 1);
        assert_eq!(tile_count(1024, 10), 1);
        assert_eq!(tile_count(1025, 10), 2);
        assert_eq!(tile_count(64 << 20, 14), 4096);
        assert_eq!(tile_count((64 << 20) + 1, 14), 4097);
    }

    #[test]
    fn pack_table_is_ends_offsets_memories() {
        let pieces = [
            piece(0x1000, 0, 5),
            piece(0x9001, 16, 100),
            piece(0x2003, 4096, 7),
        ];
        let mut words = vec![0; pack_words(3)];
        fill_pack(&pieces, &mut words);
        assert_eq!(words, [5, 116, 4103, 0, 16, 4096, 0x1000, 0x9001, 0x2003]);
        let a = TableArrays::pack(0x10000, 3);
        assert_eq!((a.keys, a.offs, a.mems), (0x10000, 0x10018, 0x10030));
    }

    #[test]
    fn unpack_table_holds_the_tile_prefix_sum() {
        // Tiles of 1 KiB: 1 + 3 + 1 + 1 tiles.
        let pieces = [
            piece(0xA000, 0, 1024),
            piece(0xB000, 4096, 2049),
            piece(0xC000, 4096, 1),
            piece(0xD000, 8000, 1000),
        ];
        let mut words = vec![0; unpack_words(4)];
        let tiles = fill_unpack(&pieces, 10, &mut words);
        assert_eq!(tiles, 6);
        assert_eq!(&words[..5], &[0, 1, 4, 5, 6]);
        assert_eq!(&words[5..9], &[0, 4096, 4096, 8000]);
        assert_eq!(&words[9..13], &[0xA000, 0xB000, 0xC000, 0xD000]);
        assert_eq!(&words[13..], &[1024, 2049, 1, 1000]);
        let a = TableArrays::unpack(0x10000, 4);
        assert_eq!(
            (a.keys, a.offs, a.mems, a.lens),
            (0x10000, 0x10028, 0x10048, 0x10068)
        );

        let mut empty = vec![7; unpack_words(0)];
        assert_eq!(fill_unpack(&[], 14, &mut empty), 0);
        assert_eq!(empty, [0]);
    }

    #[test]
    fn grids_cover_the_tiles_up_to_what_fits() {
        assert_eq!(grid(0, 100), 1);
        assert_eq!(grid(1, 100), 1);
        assert_eq!(grid(8, 100), 1);
        assert_eq!(grid(9, 100), 2);
        assert_eq!(grid(1 << 40, 396), 396);
        assert_eq!(grid(5, 0), 1);
    }

    #[test]
    fn pieces_overlapping_the_extent_are_named() {
        let extent = 0x10_0000;
        let ok = [piece(extent - 10, 0, 10), piece(extent + 4096, 10, 5)];
        check_disjoint_from_extent("pack", &ok, extent, 4096).unwrap();
        let bad = [piece(0x1000, 0, 8), piece(extent - 10, 8, 11)];
        let e = check_disjoint_from_extent("pack", &bad, extent, 4096).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("pack piece 1") && m.contains("overlaps")),
            "{e:?}"
        );
        let inside = [piece(extent + 4095, 0, 1)];
        assert!(check_disjoint_from_extent("unpack", &inside, extent, 4096).is_err());
        let wraps = [piece(u64::MAX - 2, 0, 8)];
        let e = check_disjoint_from_extent("unpack", &wraps, extent, 4096).unwrap_err();
        assert!(e.to_string().contains("wraps"), "{e}");
    }
}
