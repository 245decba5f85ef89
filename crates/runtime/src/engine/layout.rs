//! Where bytes go: the layout of tensors inside an extent, and the copy plan between a
//! tensor's stored pieces and the caller's buffers. Pure functions, tested on their own.

use crate::memory::DevicePtr;
use crate::pack::PackPiece;
use crate::{Error, Result};

/// A piece of device memory: a tensor's source region or a fetch destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// First byte.
    pub ptr: DevicePtr,
    /// Length in bytes.
    pub len: u64,
}

impl Region {
    /// A region of `len` bytes at `ptr`.
    pub fn new(ptr: DevicePtr, len: u64) -> Self {
        Region { ptr, len }
    }
}

/// Total length of `regions`. Saturates instead of overflowing; [`check_regions`] refuses
/// regions whose total does not fit 64 bits before any of them is used.
pub fn total_len(regions: &[Region]) -> u64 {
    regions.iter().fold(0u64, |sum, r| sum.saturating_add(r.len))
}

/// Checks regions a caller hands the engine (`what` names them: "offload region", "fetch
/// region"): none of a non-zero length may start at address 0 (memory there is never the
/// caller's: the copy would crash a worker thread), none may pass the end of the address
/// space, and their lengths must add up within 64 bits. Returns their total length.
pub fn check_regions(what: &str, regions: &[Region]) -> Result<u64> {
    let mut total = 0u64;
    for (i, r) in regions.iter().enumerate() {
        if r.len == 0 {
            continue;
        }
        if r.ptr == 0 {
            return Err(Error::invalid(format!(
                "{what} {i} has address 0 (a null pointer) and length {}: pass the address of the tensor's memory",
                r.len
            )));
        }
        if r.ptr.checked_add(r.len).is_none() {
            return Err(Error::invalid(format!(
                "{what} {i} at address {:#x} with length {} passes the end of the address space: pass the tensor's real length",
                r.ptr, r.len
            )));
        }
        total = total.checked_add(r.len).ok_or_else(|| {
            Error::invalid(format!(
                "the lengths of the {what}s add up to more than 2^64 bytes (at region {i}, of length {}): pass the tensor's real lengths",
                r.len
            ))
        })?;
    }
    Ok(total)
}

/// A contiguous run of a tensor's bytes somewhere: at an address (`at` is a pointer) or
/// inside an extent (`at` is an offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Address or offset of the first byte.
    pub at: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One copy of a plan: `len` bytes from `src` (address or extent offset) to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyStep {
    /// Source address or extent offset.
    pub src: u64,
    /// Destination address.
    pub dst: DevicePtr,
    /// Length in bytes.
    pub len: u64,
}

/// Lays out `regions` (of one tensor) from `start`, each region at an aligned offset.
/// Returns the segments (extent offsets) and the offset where the next tensor may start.
pub fn place(regions: &[Region], start: u64, align: u64) -> (Vec<Segment>, u64) {
    let mut at = start;
    let segments = regions
        .iter()
        .filter(|r| r.len > 0)
        .map(|r| {
            let s = Segment { at, len: r.len };
            at += r.len.div_ceil(align) * align;
            s
        })
        .collect();
    (segments, at)
}

/// The pack pieces that gather `regions` into the places `segments` (from [`place`]).
pub fn pack_pieces<'a>(
    regions: &'a [Region],
    segments: &'a [Segment],
) -> impl Iterator<Item = PackPiece> + 'a {
    regions
        .iter()
        .filter(|r| r.len > 0)
        .zip(segments)
        .map(|(r, s)| PackPiece {
            mem: r.ptr,
            offset: s.at,
            len: r.len,
        })
}

/// Maps the tensor's bytes, held in `src` segments in order, onto the `dst` regions in
/// order (both must hold the same total): one step per overlap of a source segment with a
/// destination region.
pub fn copy_plan(src: &[Segment], dst: &[Region]) -> Vec<CopyStep> {
    let mut steps = Vec::with_capacity(src.len().max(dst.len()));
    let mut d = dst.iter().filter(|r| r.len > 0);
    let mut cur = d.next().copied();
    let mut used = 0u64; // bytes of `cur` already planned
    for s in src {
        let mut done = 0u64;
        while done < s.len {
            let Some(r) = cur else { return steps };
            let n = (s.len - done).min(r.len - used);
            steps.push(CopyStep {
                src: s.at + done,
                dst: r.ptr + used,
                len: n,
            });
            done += n;
            used += n;
            if used == r.len {
                cur = d.next().copied();
                used = 0;
            }
        }
    }
    steps
}

/// `len` bytes from `offset` cut at the multiples of `unit` (0: not cut), as
/// `(skip, len)` pieces in order: the piece starts `skip` bytes into the range. Used to
/// submit one large storage request as several (the `io_split_bytes` setting).
pub fn cut_at_multiples(offset: u64, len: u64, unit: u64) -> Vec<(u64, u64)> {
    if unit == 0 || len == 0 {
        return vec![(0, len)];
    }
    let mut pieces = Vec::new();
    let mut done = 0u64;
    while done < len {
        let at = offset + done;
        let to_boundary = unit - at % unit;
        let n = to_boundary.min(len - done);
        pieces.push((done, n));
        done += n;
    }
    pieces
}

/// The segments of `regions` themselves (a tensor still in its own memory).
pub fn segments_of(regions: &[Region]) -> Vec<Segment> {
    regions
        .iter()
        .filter(|r| r.len > 0)
        .map(|r| Segment {
            at: r.ptr,
            len: r.len,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_aligns_every_region() {
        let regions = [Region::new(100, 5), Region::new(200, 0), Region::new(300, 4097)];
        let (segs, next) = place(&regions, 8192, 4096);
        assert_eq!(
            segs,
            vec![Segment { at: 8192, len: 5 }, Segment { at: 12288, len: 4097 }]
        );
        assert_eq!(next, 12288 + 8192);
        let pieces: Vec<_> = pack_pieces(&regions, &segs).collect();
        assert_eq!(pieces[1].mem, 300);
        assert_eq!(pieces[1].offset, 12288);
    }

    #[test]
    fn cuts_fall_on_multiples_of_the_unit() {
        assert_eq!(cut_at_multiples(0, 10, 0), vec![(0, 10)]);
        assert_eq!(cut_at_multiples(0, 10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(cut_at_multiples(6, 10, 4), vec![(0, 2), (2, 4), (6, 4)]);
        assert_eq!(cut_at_multiples(8, 8, 4), vec![(0, 4), (4, 4)]);
        assert_eq!(cut_at_multiples(5, 2, 16), vec![(0, 2)]);
        assert_eq!(cut_at_multiples(5, 0, 16), vec![(0, 0)]);
        // Pieces cover the range exactly, in order, each within one unit.
        for (offset, len, unit) in [(0u64, 1u64 << 20, 4096u64), (4095, 9000, 4096), (12345, 1, 7)] {
            let pieces = cut_at_multiples(offset, len, unit);
            let mut at = 0;
            for (skip, n) in pieces {
                assert_eq!(skip, at);
                assert!(n > 0 && (offset + skip) / unit == (offset + skip + n - 1) / unit);
                at += n;
            }
            assert_eq!(at, len);
        }
    }

    #[test]
    fn copy_plan_splits_at_both_boundaries() {
        let src = [Segment { at: 0, len: 10 }, Segment { at: 4096, len: 6 }];
        let dst = [Region::new(1000, 4), Region::new(2000, 12)];
        let plan = copy_plan(&src, &dst);
        assert_eq!(
            plan,
            vec![
                CopyStep {
                    src: 0,
                    dst: 1000,
                    len: 4
                },
                CopyStep {
                    src: 4,
                    dst: 2000,
                    len: 6
                },
                CopyStep {
                    src: 4096,
                    dst: 2006,
                    len: 6
                },
            ]
        );
        assert_eq!(plan.iter().map(|s| s.len).sum::<u64>(), 16);
    }
}
