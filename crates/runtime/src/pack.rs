//! Packing: many small tensor pieces gathered into one extent (and scattered back), so that
//! storage sees a few large aligned writes instead of many small unaligned ones.
//!
//! A [`PackPiece`] pairs a region of tensor memory with a place in an extent. A **pack**
//! copies every piece's tensor bytes into the extent and zeroes every extent byte no piece
//! covers (alignment padding never carries stale memory to storage). An **unpack** copies
//! the pieces back out. [`Device::pack`](crate::Device::pack) and
//! [`Device::unpack`](crate::Device::unpack) do either in one launch on a stream; the CUDA
//! kernels live in `kernels/pack.cu`, and [`pack_host`] / [`unpack_host`] here are the CPU
//! implementation, used by the host device and as the reference in tests.

use crate::error::{Error, Result};
use crate::memory::DevicePtr;

/// One piece of a pack or unpack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PackPiece {
    /// Tensor memory: the source of a pack, the destination of an unpack.
    pub mem: DevicePtr,
    /// Byte offset of the piece inside the extent.
    pub offset: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
}

impl PackPiece {
    /// End offset of the piece inside the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Checks a pack layout: pieces non-empty, sorted by offset, not overlapping, and inside an
/// extent of `extent_len` bytes. Says which piece is wrong and how.
pub fn check_pack_layout(pieces: &[PackPiece], extent_len: u64) -> Result<()> {
    let mut prev_end = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        if p.len == 0 {
            return Err(Error::invalid(format!("pack piece {i} is empty")));
        }
        let end = p.offset.checked_add(p.len).ok_or_else(|| {
            Error::invalid(format!(
                "pack piece {i} overflows (offset {} + len {})",
                p.offset, p.len
            ))
        })?;
        if p.offset < prev_end {
            return Err(Error::invalid(format!(
                "pack piece {i} at offset {} overlaps or precedes the previous piece (which ends at {prev_end}); pieces must be sorted and disjoint",
                p.offset
            )));
        }
        if end > extent_len {
            return Err(Error::invalid(format!(
                "pack piece {i} ends at {end}, past the end of the {extent_len}-byte extent"
            )));
        }
        prev_end = end;
    }
    Ok(())
}

/// Checks an unpack layout: pieces non-empty and inside an extent of `extent_len` bytes
/// (extent ranges may repeat: one stored piece can be scattered to several places).
pub fn check_unpack_layout(pieces: &[PackPiece], extent_len: u64) -> Result<()> {
    for (i, p) in pieces.iter().enumerate() {
        if p.len == 0 {
            return Err(Error::invalid(format!("unpack piece {i} is empty")));
        }
        match p.offset.checked_add(p.len) {
            Some(end) if end <= extent_len => {}
            _ => {
                return Err(Error::invalid(format!(
                    "unpack piece {i} ({} bytes at offset {}) reaches past the end of the {extent_len}-byte extent",
                    p.len, p.offset
                )))
            }
        }
    }
    Ok(())
}

/// Packs on the CPU: copies each piece's memory into `extent` at its offset and zeroes the
/// bytes no piece covers. The layout must pass [`check_pack_layout`].
///
/// # Safety
/// Every `piece.mem` must be a host address valid for reads of `piece.len` bytes, not
/// overlapping `extent`.
pub unsafe fn pack_host(extent: &mut [u8], pieces: &[PackPiece]) -> Result<()> {
    check_pack_layout(pieces, extent.len() as u64)?;
    let mut covered = 0usize;
    for p in pieces {
        let (off, len) = (p.offset as usize, p.len as usize);
        extent[covered..off].fill(0);
        // SAFETY: the caller promises `mem` is readable for `len` bytes and disjoint from
        // `extent`; the destination range is in bounds (checked layout).
        let src = unsafe { std::slice::from_raw_parts(p.mem as *const u8, len) };
        extent[off..off + len].copy_from_slice(src);
        covered = off + len;
    }
    extent[covered..].fill(0);
    Ok(())
}

/// Unpacks on the CPU: copies each piece's bytes from `extent` to its memory. The layout
/// must pass [`check_unpack_layout`].
///
/// # Safety
/// Every `piece.mem` must be a host address valid for writes of `piece.len` bytes, the
/// pieces' memory must not overlap each other or `extent`.
pub unsafe fn unpack_host(extent: &[u8], pieces: &[PackPiece]) -> Result<()> {
    check_unpack_layout(pieces, extent.len() as u64)?;
    for p in pieces {
        let (off, len) = (p.offset as usize, p.len as usize);
        // SAFETY: the caller promises `mem` is writable for `len` bytes and disjoint from
        // `extent` and the other pieces.
        let dst = unsafe { std::slice::from_raw_parts_mut(p.mem as *mut u8, len) };
        dst.copy_from_slice(&extent[off..off + len]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(mem: &[u8], offset: u64) -> PackPiece {
        PackPiece {
            mem: mem.as_ptr() as u64,
            offset,
            len: mem.len() as u64,
        }
    }

    #[test]
    fn pack_zeroes_padding_and_unpack_restores() {
        let a = vec![1u8; 5];
        let b = vec![2u8; 4097];
        let pieces = [piece(&a, 0), piece(&b, 4096)];
        let mut extent = vec![0xAAu8; 3 * 4096];
        // SAFETY: the pieces point at live vectors disjoint from `extent`.
        unsafe { pack_host(&mut extent, &pieces).unwrap() };
        assert_eq!(&extent[..5], &[1; 5]);
        assert!(extent[5..4096].iter().all(|&x| x == 0));
        assert!(extent[4096..8193].iter().all(|&x| x == 2));
        assert!(extent[8193..].iter().all(|&x| x == 0));

        let mut a2 = vec![0u8; 5];
        let mut b2 = vec![0u8; 4097];
        let back = [piece(&a2, 0), piece(&b2, 4096)];
        let back = [
            PackPiece {
                mem: a2.as_mut_ptr() as u64,
                ..back[0]
            },
            PackPiece {
                mem: b2.as_mut_ptr() as u64,
                ..back[1]
            },
        ];
        // SAFETY: the pieces point at live, disjoint vectors.
        unsafe { unpack_host(&extent, &back).unwrap() };
        assert_eq!((a2, b2), (a, b));
    }

    #[test]
    fn bad_layouts_are_named() {
        let a = vec![1u8; 10];
        let overlap = [piece(&a, 0), piece(&a, 5)];
        let e = check_pack_layout(&overlap, 100).unwrap_err().to_string();
        assert!(e.contains("piece 1") && e.contains("overlaps"), "{e}");
        let past = [piece(&a, 95)];
        let e = check_pack_layout(&past, 100).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
        let e = check_unpack_layout(&past, 100).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
        let empty = [PackPiece {
            mem: 0,
            offset: 0,
            len: 0,
        }];
        assert!(check_pack_layout(&empty, 100).is_err());
    }
}
