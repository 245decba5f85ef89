//! Physical Region Pages ("Physical Region Page Entry and List") and the splitting of a
//! request into commands the controller accepts ("Maximum Data Transfer Size" in Identify
//! Controller).
//!
//! A command's data is described by PRP1 and PRP2:
//!
//! - PRP1 is the address of the first byte; it may start anywhere in its memory page
//!   (dword aligned), and the data continues to the end of that page;
//! - when the data ends in the next page, PRP2 is that page's address;
//! - when it touches more pages, PRP2 points to a PRP list: page-aligned addresses of the
//!   remaining pages, 8 bytes each. A list fills at most one memory page; when more entries
//!   are needed, the last entry of a full list page points to the next list page instead.
//!
//! [`build`] produces these from a function that maps a byte offset of the transfer to its
//! IOVA, and from list pages the caller has allocated (see [`list_pages_needed`]).
//! [`split_by_mdts`] cuts a block-aligned request into commands of at most MDTS bytes.

use std::ops::Range;

use thiserror::Error;

use crate::nvme::cmd::MAX_BLOCKS_PER_COMMAND;

/// Size of one PRP entry in bytes.
pub const PRP_ENTRY_SIZE: u64 = 8;

/// Errors describing memory with PRPs or splitting a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PrpError {
    /// A page size that is not a power of two of at least 16 bytes.
    #[error("memory page size {bytes} is not a power of two of at least 16 bytes")]
    PageSize {
        /// The size given.
        bytes: u64,
    },
    /// A transfer of no bytes.
    #[error("a transfer needs at least one byte")]
    ZeroLength,
    /// The first byte's address is not dword aligned (PRP entries have bits 1:0 clear).
    #[error("the data starts at IOVA {iova:#x}, which is not 4-byte aligned as a PRP entry requires")]
    Unaligned {
        /// The address of the first byte.
        iova: u64,
    },
    /// A page after the first does not start on a page boundary: the memory is not
    /// contiguous within pages, or the mapping is wrong.
    #[error(
        "byte {offset} of the transfer starts a memory page but maps to IOVA {iova:#x}, \
         which is not aligned to the {page_size}-byte page size"
    )]
    PageUnaligned {
        /// Offset in the transfer.
        offset: u64,
        /// Its IOVA.
        iova: u64,
        /// The memory page size.
        page_size: u64,
    },
    /// A PRP list page whose address is not page aligned.
    #[error("PRP list page at IOVA {iova:#x} is not aligned to the {page_size}-byte page size")]
    ListPageUnaligned {
        /// The list page's address.
        iova: u64,
        /// The memory page size.
        page_size: u64,
    },
    /// Fewer PRP list pages than the transfer needs.
    #[error("the transfer needs {needed} PRP list pages, {given} were provided")]
    NotEnoughListPages {
        /// Pages needed.
        needed: usize,
        /// Pages provided.
        given: usize,
    },
}

/// Errors splitting a request with [`split_by_mdts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SplitError {
    /// A block size that is not a power of two.
    #[error("block size {block_size} is not a power of two")]
    BlockSize {
        /// The size given.
        block_size: u32,
    },
    /// A request that does not start or end on a block boundary, or is empty.
    #[error(
        "request of {len} bytes at byte {offset} is not a non-empty whole number of {block_size}-byte blocks"
    )]
    Unaligned {
        /// Byte offset in the namespace.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The block size.
        block_size: u32,
    },
    /// A maximum transfer smaller than one block.
    #[error("maximum transfer of {max_transfer} bytes is smaller than one {block_size}-byte block")]
    MaxTransfer {
        /// The limit given.
        max_transfer: u64,
        /// The block size.
        block_size: u32,
    },
    /// A request past the end of the 64-bit byte space.
    #[error("request of {len} bytes at byte {offset} overflows 64 bits")]
    Overflow {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// The host memory page size the controller was configured with (CC.MPS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSize(u64);

impl PageSize {
    /// 4 KiB, the smallest page size controllers support (MPS = 0).
    pub const KIB4: PageSize = PageSize(4096);

    /// A page size of `bytes`, a power of two. Controllers use 4 KiB and up; sizes down to
    /// 16 bytes (two PRP entries per list page) are accepted so that the list arithmetic
    /// can be exercised at small scale.
    pub fn new(bytes: u64) -> Result<Self, PrpError> {
        if bytes.is_power_of_two() && bytes >= 2 * PRP_ENTRY_SIZE {
            Ok(PageSize(bytes))
        } else {
            Err(PrpError::PageSize { bytes })
        }
    }

    /// The page size for a CC.MPS value: `2 ^ (12 + mps)`.
    pub fn from_mps(mps: u8) -> Self {
        PageSize(crate::nvme::regs::page_size_from_mps(mps))
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// PRP entries that fit in one list page.
    pub const fn entries_per_list_page(self) -> u64 {
        self.0 / PRP_ENTRY_SIZE
    }

    const fn offset(self, addr: u64) -> u64 {
        addr & (self.0 - 1)
    }
}

/// One PRP list page: where it lives and the entries to write into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrpListPage {
    /// The list page's IOVA (page aligned).
    pub iova: u64,
    /// Its entries in order: page addresses of data, and, when another list page follows,
    /// that page's address as the last entry.
    pub entries: Vec<u64>,
}

impl PrpListPage {
    /// The entries as the little-endian bytes to copy to the start of the list page.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }
}

/// A transfer's data pointer: PRP1, PRP2 and the list pages PRP2 may point to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prps {
    /// PRP1: the address of the first byte.
    pub prp1: u64,
    /// PRP2: 0 when the data fits in the first page, the second page's address when it
    /// ends there, else the address of the first PRP list page.
    pub prp2: u64,
    /// The PRP list pages to write before submitting, in chain order (empty unless the data
    /// touches three pages or more).
    pub list: Vec<PrpListPage>,
}

/// The number of memory pages a transfer of `len` bytes touches when its first byte is at
/// `first_iova`.
pub fn pages_touched(first_iova: u64, len: u64, page: PageSize) -> u64 {
    if len == 0 {
        return 0;
    }
    let first_len = (page.bytes() - page.offset(first_iova)).min(len);
    1 + (len - first_len).div_ceil(page.bytes())
}

/// The number of PRP list pages a transfer of `len` bytes at `first_iova` needs: 0 for up to
/// two pages; otherwise enough that every full list page but the last gives its last entry
/// to the chain pointer.
pub fn list_pages_needed(first_iova: u64, len: u64, page: PageSize) -> usize {
    let pages = pages_touched(first_iova, len, page);
    if pages <= 2 {
        return 0;
    }
    let entries = pages - 1;
    let per_page = page.entries_per_list_page();
    // k pages hold k * (per_page - 1) + 1 entries.
    (entries - 1).div_ceil(per_page - 1) as usize
}

/// Describes a transfer of `len` bytes with PRPs.
///
/// `iova_at(offset)` gives the IOVA of byte `offset` of the transfer; it is called for
/// offset 0 and for the offset of each page boundary the data crosses, and each of those
/// must map to a page-aligned IOVA (memory must be contiguous within each memory page).
/// `list_pages` are page-aligned IOVAs of pages the caller owns, used in order for the PRP
/// list; [`list_pages_needed`] says how many are needed (extra ones are left unused).
pub fn build(
    len: u64,
    page: PageSize,
    iova_at: impl Fn(u64) -> u64,
    list_pages: &[u64],
) -> Result<Prps, PrpError> {
    if len == 0 {
        return Err(PrpError::ZeroLength);
    }
    let ps = page.bytes();
    let prp1 = iova_at(0);
    if prp1 & 0x3 != 0 {
        return Err(PrpError::Unaligned { iova: prp1 });
    }
    let first_len = (ps - page.offset(prp1)).min(len);
    let rest = len - first_len;
    let data_entries = rest.div_ceil(ps);
    let data_page = |i: u64| {
        let offset = first_len + i * ps;
        let iova = iova_at(offset);
        if page.offset(iova) == 0 {
            Ok(iova)
        } else {
            Err(PrpError::PageUnaligned {
                offset,
                iova,
                page_size: ps,
            })
        }
    };
    match data_entries {
        0 => {
            return Ok(Prps {
                prp1,
                prp2: 0,
                list: Vec::new(),
            })
        }
        1 => {
            return Ok(Prps {
                prp1,
                prp2: data_page(0)?,
                list: Vec::new(),
            })
        }
        _ => {}
    }
    let needed = list_pages_needed(prp1, len, page);
    if list_pages.len() < needed {
        return Err(PrpError::NotEnoughListPages {
            needed,
            given: list_pages.len(),
        });
    }
    let list_iovas = &list_pages[..needed];
    if let Some(&iova) = list_iovas.iter().find(|&&iova| page.offset(iova) != 0) {
        return Err(PrpError::ListPageUnaligned { iova, page_size: ps });
    }
    let per_page = page.entries_per_list_page();
    let mut list = Vec::with_capacity(needed);
    let mut next = 0u64;
    for (k, &iova) in list_iovas.iter().enumerate() {
        let left = data_entries - next;
        let chained = left > per_page;
        let take = if chained { per_page - 1 } else { left };
        let mut entries = Vec::with_capacity((take + u64::from(chained)) as usize);
        for i in next..next + take {
            entries.push(data_page(i)?);
        }
        next += take;
        if chained {
            entries.push(list_iovas[k + 1]);
        }
        list.push(PrpListPage { iova, entries });
    }
    debug_assert_eq!(next, data_entries);
    Ok(Prps {
        prp1,
        prp2: list_iovas[0],
        list,
    })
}

/// One command's share of a request cut by [`split_by_mdts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// First logical block.
    pub lba: u64,
    /// Number of blocks (1..=65536), to pass to [`Command::read`] or [`Command::write`].
    ///
    /// [`Command::read`]: crate::nvme::cmd::Command::read
    /// [`Command::write`]: crate::nvme::cmd::Command::write
    pub blocks: u32,
    /// The chunk's bytes as offsets into the request (0 is the request's first byte).
    pub bytes: Range<u64>,
}

/// Iterator over the chunks of a request; see [`split_by_mdts`].
#[derive(Clone, Debug)]
pub struct Split {
    first_lba: u64,
    done: u64,
    len: u64,
    chunk_bytes: u64,
    block_shift: u32,
}

impl Iterator for Split {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        if self.done == self.len {
            return None;
        }
        let n = self.chunk_bytes.min(self.len - self.done);
        let chunk = Chunk {
            lba: self.first_lba + (self.done >> self.block_shift),
            blocks: (n >> self.block_shift) as u32,
            bytes: self.done..self.done + n,
        };
        self.done += n;
        Some(chunk)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.len - self.done).div_ceil(self.chunk_bytes) as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Split {}

/// Cuts a request of `len` bytes at byte `offset` of a namespace with `block_size`-byte
/// blocks into commands of at most `max_transfer` bytes (MDTS, see
/// [`ControllerInfo::max_transfer_bytes`]; `None` for no limit) and at most 65536 blocks
/// (the NLB field's limit), each a whole number of blocks. Every chunk but the last is the
/// same size.
///
/// [`ControllerInfo::max_transfer_bytes`]: crate::nvme::identify::ControllerInfo::max_transfer_bytes
pub fn split_by_mdts(
    offset: u64,
    len: u64,
    max_transfer: Option<u64>,
    block_size: u32,
) -> Result<Split, SplitError> {
    if !block_size.is_power_of_two() {
        return Err(SplitError::BlockSize { block_size });
    }
    let bs = u64::from(block_size);
    if len == 0 || !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(SplitError::Unaligned {
            offset,
            len,
            block_size,
        });
    }
    if offset.checked_add(len).is_none() {
        return Err(SplitError::Overflow { offset, len });
    }
    let max_blocks = match max_transfer {
        Some(max) if max < bs => {
            return Err(SplitError::MaxTransfer {
                max_transfer: max,
                block_size,
            })
        }
        Some(max) => (max / bs).min(u64::from(MAX_BLOCKS_PER_COMMAND)),
        None => u64::from(MAX_BLOCKS_PER_COMMAND),
    };
    let block_shift = block_size.trailing_zeros();
    Ok(Split {
        first_lba: offset >> block_shift,
        done: 0,
        len,
        chunk_bytes: max_blocks << block_shift,
        block_shift,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Interprets PRP1/PRP2 and the list pages the way a controller does, returning the
    /// (IOVA, length) segments of the transfer.
    fn walk(prps: &Prps, len: u64, page: PageSize) -> Vec<(u64, u64)> {
        let ps = page.bytes();
        let lists: HashMap<u64, &[u64]> = prps.list.iter().map(|l| (l.iova, l.entries.as_slice())).collect();
        let mut segs = Vec::new();
        let first = (ps - prps.prp1 % ps).min(len);
        segs.push((prps.prp1, first));
        let mut left = len - first;
        if left == 0 {
            return segs;
        }
        if left <= ps {
            segs.push((prps.prp2, left));
            return segs;
        }
        let per_page = page.entries_per_list_page() as usize;
        let mut list = lists[&prps.prp2];
        let mut i = 0;
        while left > 0 {
            assert!(i < list.len(), "list page ran out of entries");
            if i == per_page - 1 && left > ps {
                list = lists[&list[i]];
                i = 0;
                continue;
            }
            let n = left.min(ps);
            segs.push((list[i], n));
            left -= n;
            i += 1;
        }
        assert_eq!(i, list.len(), "unused entries in the last list page");
        segs
    }

    fn contiguous(base: u64) -> impl Fn(u64) -> u64 {
        move |off| base + off
    }

    fn list_pool(page: PageSize, n: u64) -> Vec<u64> {
        (0..n).map(|k| 0x8000_0000 + k * page.bytes()).collect()
    }

    #[test]
    fn page_size() {
        assert_eq!(PageSize::from_mps(0), PageSize::KIB4);
        assert_eq!(PageSize::from_mps(4).bytes(), 65536);
        assert_eq!(PageSize::KIB4.entries_per_list_page(), 512);
        assert_eq!(PageSize::new(3000), Err(PrpError::PageSize { bytes: 3000 }));
        assert_eq!(PageSize::new(8), Err(PrpError::PageSize { bytes: 8 }));
        assert!(PageSize::new(16).is_ok());
    }

    #[test]
    fn one_page() {
        let p = build(4096, PageSize::KIB4, contiguous(0x10_0000), &[]).unwrap();
        assert_eq!(
            p,
            Prps {
                prp1: 0x10_0000,
                prp2: 0,
                list: vec![]
            }
        );
        let small = build(512, PageSize::KIB4, contiguous(0x10_0200), &[]).unwrap();
        assert_eq!((small.prp1, small.prp2), (0x10_0200, 0));
        // Ends exactly at the page's end.
        let tail = build(0x100, PageSize::KIB4, contiguous(0x10_0F00), &[]).unwrap();
        assert_eq!((tail.prp1, tail.prp2), (0x10_0F00, 0));
    }

    #[test]
    fn two_pages() {
        let p = build(8192, PageSize::KIB4, contiguous(0x10_0000), &[]).unwrap();
        assert_eq!(
            p,
            Prps {
                prp1: 0x10_0000,
                prp2: 0x10_1000,
                list: vec![]
            }
        );
        // Unaligned start crossing one boundary: PRP2 is the second page.
        let u = build(4096, PageSize::KIB4, contiguous(0x10_0800), &[]).unwrap();
        assert_eq!(
            u,
            Prps {
                prp1: 0x10_0800,
                prp2: 0x10_1000,
                list: vec![]
            }
        );
    }

    #[test]
    fn scattered_pages() {
        // Pages of the buffer at unrelated IOVAs.
        let pages = [0x5000u64, 0x2000, 0x9000, 0x1000];
        let map = |off: u64| pages[(off / 4096) as usize] + off % 4096;
        let p = build(4 * 4096, PageSize::KIB4, map, &[0xA000]).unwrap();
        assert_eq!(p.prp1, 0x5000);
        assert_eq!(p.prp2, 0xA000);
        assert_eq!(
            p.list,
            vec![PrpListPage {
                iova: 0xA000,
                entries: vec![0x2000, 0x9000, 0x1000]
            }]
        );
    }

    #[test]
    fn three_pages_use_a_list() {
        let pool = list_pool(PageSize::KIB4, 1);
        let p = build(3 * 4096, PageSize::KIB4, contiguous(0x10_0000), &pool).unwrap();
        assert_eq!(p.prp1, 0x10_0000);
        assert_eq!(p.prp2, pool[0]);
        assert_eq!(p.list.len(), 1);
        assert_eq!(p.list[0].entries, vec![0x10_1000, 0x10_2000]);
        let bytes = p.list[0].to_bytes();
        assert_eq!(bytes.len(), 16);
        assert_eq!(&bytes[0..8], &0x10_1000u64.to_le_bytes());
    }

    #[test]
    fn unaligned_start_with_list() {
        // 8 KiB starting 4 bytes into a page touches 3 pages.
        let pool = list_pool(PageSize::KIB4, 1);
        let p = build(8192, PageSize::KIB4, contiguous(0x10_0004), &pool).unwrap();
        assert_eq!(p.prp1, 0x10_0004);
        assert_eq!(p.list[0].entries, vec![0x10_1000, 0x10_2000]);
        assert_eq!(
            walk(&p, 8192, PageSize::KIB4),
            vec![(0x10_0004, 4092), (0x10_1000, 4096), (0x10_2000, 4)]
        );
    }

    #[test]
    fn list_fills_exactly_one_page() {
        // 512 list entries fit one 4 KiB list page: no chaining, all are data.
        let len = 513 * 4096;
        assert_eq!(list_pages_needed(0, len, PageSize::KIB4), 1);
        let pool = list_pool(PageSize::KIB4, 2);
        let p = build(len, PageSize::KIB4, contiguous(0x100_0000), &pool).unwrap();
        assert_eq!(p.list.len(), 1);
        assert_eq!(p.list[0].entries.len(), 512);
        assert_eq!(*p.list[0].entries.last().unwrap(), 0x100_0000 + 512 * 4096);
    }

    #[test]
    fn list_chains_at_4k() {
        // 513 list entries: 511 data + chain pointer, then 2 data entries.
        let len = 514 * 4096;
        assert_eq!(list_pages_needed(0, len, PageSize::KIB4), 2);
        let pool = list_pool(PageSize::KIB4, 2);
        let p = build(len, PageSize::KIB4, contiguous(0x100_0000), &pool).unwrap();
        assert_eq!(p.list.len(), 2);
        assert_eq!(p.list[0].entries.len(), 512);
        assert_eq!(p.list[0].entries[511], pool[1]);
        assert_eq!(
            p.list[1].entries,
            vec![0x100_0000 + 512 * 4096, 0x100_0000 + 513 * 4096]
        );
        let segs = walk(&p, len, PageSize::KIB4);
        assert_eq!(segs.len(), 514);
        assert!(segs.iter().all(|&(_, n)| n == 4096));
    }

    #[test]
    fn list_chains_with_small_pages() {
        // 32-byte pages: 4 entries per list page. Three list pages hold at most 3 + 3 + 4 = 10
        // entries, so 12 data pages (PRP1 plus 11 list entries) need a fourth:
        // [3 + next] [3 + next] [3 + next] [2].
        let page = PageSize::new(32).unwrap();
        let len = 12 * 32;
        assert_eq!(list_pages_needed(0x1000, len, page), 4);
        let pool = list_pool(page, 4);
        let p = build(len, page, contiguous(0x1000), &pool).unwrap();
        let shape: Vec<usize> = p.list.iter().map(|l| l.entries.len()).collect();
        assert_eq!(shape, vec![4, 4, 4, 2]);
        assert_eq!(p.list[0].entries, vec![0x1020, 0x1040, 0x1060, pool[1]]);
        assert_eq!(p.list[1].entries, vec![0x1080, 0x10A0, 0x10C0, pool[2]]);
        assert_eq!(p.list[2].entries, vec![0x10E0, 0x1100, 0x1120, pool[3]]);
        assert_eq!(p.list[3].entries, vec![0x1140, 0x1160]);
        let segs = walk(&p, len, page);
        let expect: Vec<(u64, u64)> = (0..12).map(|i| (0x1000 + 32 * i, 32)).collect();
        assert_eq!(segs, expect);
        // 10 entries fit three list pages exactly: the last holds 4 data entries.
        assert_eq!(list_pages_needed(0x1000, 11 * 32, page), 3);
        let p = build(11 * 32, page, contiguous(0x1000), &pool).unwrap();
        let shape: Vec<usize> = p.list.iter().map(|l| l.entries.len()).collect();
        assert_eq!(shape, vec![4, 4, 4]);
    }

    #[test]
    fn errors() {
        let pool = list_pool(PageSize::KIB4, 4);
        assert_eq!(
            build(0, PageSize::KIB4, contiguous(0), &pool),
            Err(PrpError::ZeroLength)
        );
        assert_eq!(
            build(8, PageSize::KIB4, contiguous(0x1002), &pool),
            Err(PrpError::Unaligned { iova: 0x1002 })
        );
        // The second page does not start on a boundary.
        let bad = |off: u64| if off < 4096 { 0x1000 + off } else { 0x9_0010 + off };
        assert_eq!(
            build(8192, PageSize::KIB4, bad, &pool),
            Err(PrpError::PageUnaligned {
                offset: 4096,
                iova: 0x9_0010 + 4096,
                page_size: 4096
            })
        );
        assert_eq!(
            build(3 * 4096, PageSize::KIB4, contiguous(0x10_0000), &[]),
            Err(PrpError::NotEnoughListPages { needed: 1, given: 0 })
        );
        assert_eq!(
            build(3 * 4096, PageSize::KIB4, contiguous(0x10_0000), &[0x8_0008]),
            Err(PrpError::ListPageUnaligned {
                iova: 0x8_0008,
                page_size: 4096
            })
        );
        let msg = build(8, PageSize::KIB4, contiguous(0x1001), &pool)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("0x1001") && msg.contains("4-byte"), "{msg}");
    }

    #[test]
    fn pages_touched_counts() {
        let p = PageSize::KIB4;
        assert_eq!(pages_touched(0, 0, p), 0);
        assert_eq!(pages_touched(0, 1, p), 1);
        assert_eq!(pages_touched(0, 4096, p), 1);
        assert_eq!(pages_touched(0, 4097, p), 2);
        assert_eq!(pages_touched(4092, 8, p), 2);
        assert_eq!(pages_touched(4092, 4, p), 1);
        assert_eq!(pages_touched(4092, 8192, p), 3);
    }

    fn chunks(offset: u64, len: u64, max: Option<u64>, bs: u32) -> Vec<(u64, u32, Range<u64>)> {
        split_by_mdts(offset, len, max, bs)
            .unwrap()
            .map(|c| (c.lba, c.blocks, c.bytes))
            .collect()
    }

    #[test]
    fn split_exact_multiple() {
        let c = chunks(0, 256 * 1024, Some(128 * 1024), 512);
        assert_eq!(c, vec![(0, 256, 0..131072), (256, 256, 131072..262144)]);
    }

    #[test]
    fn split_with_remainder() {
        let c = chunks(4096 * 10, 3 * 4096 + 4096, Some(8192), 4096);
        assert_eq!(c, vec![(10, 2, 0..8192), (12, 2, 8192..16384)]);
        let c = chunks(4096 * 10, 5 * 4096, Some(8192), 4096);
        assert_eq!(
            c,
            vec![(10, 2, 0..8192), (12, 2, 8192..16384), (14, 1, 16384..20480)]
        );
        assert_eq!(split_by_mdts(0, 5 * 4096, Some(8192), 4096).unwrap().len(), 3);
    }

    #[test]
    fn split_rounds_mdts_down_to_blocks() {
        // A limit that is not a multiple of the block size: chunks hold whole blocks.
        let c = chunks(0, 4 * 4096, Some(6000), 4096);
        assert_eq!(c.len(), 4);
        assert!(c.iter().all(|(_, n, r)| *n == 1 && r.end - r.start == 4096));
    }

    #[test]
    fn split_without_limit_respects_nlb() {
        let c = chunks(512, 70_000 * 512, None, 512);
        assert_eq!(
            c,
            vec![
                (1, 65536, 0..65536 * 512),
                (65537, 4464, 65536 * 512..70_000 * 512)
            ]
        );
        // A huge MDTS is capped by NLB too.
        assert_eq!(chunks(0, 65537 * 4096, Some(1 << 40), 4096).len(), 2);
    }

    #[test]
    fn split_errors() {
        assert_eq!(
            split_by_mdts(0, 4096, None, 1000).unwrap_err(),
            SplitError::BlockSize { block_size: 1000 }
        );
        assert_eq!(
            split_by_mdts(100, 512, None, 512).unwrap_err(),
            SplitError::Unaligned {
                offset: 100,
                len: 512,
                block_size: 512
            }
        );
        assert_eq!(
            split_by_mdts(0, 700, None, 512).unwrap_err(),
            SplitError::Unaligned {
                offset: 0,
                len: 700,
                block_size: 512
            }
        );
        assert!(split_by_mdts(0, 0, None, 512).is_err());
        assert_eq!(
            split_by_mdts(0, 4096, Some(2048), 4096).unwrap_err(),
            SplitError::MaxTransfer {
                max_transfer: 2048,
                block_size: 4096
            }
        );
        assert_eq!(
            split_by_mdts(u64::MAX - 511, 1024, None, 512).unwrap_err(),
            SplitError::Overflow {
                offset: u64::MAX - 511,
                len: 1024
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The PRPs cover exactly the bytes asked, in order, every entry after PRP1 page
        /// aligned, with the number of list pages predicted.
        #[test]
        fn prps_cover_the_transfer(
            shift in 4u32..=12,
            first_dwords in 0u64..1024,
            len_pages in 0u64..1200,
            len_extra in 0u64..4096,
        ) {
            let page = PageSize::new(1 << shift).unwrap();
            let ps = page.bytes();
            let first_off = (first_dwords * 4) % ps;
            let len = (len_pages * ps + len_extra % ps).max(1);
            // Scatter the buffer's pages: page i of the buffer lives at page (i ^ 5) of the
            // region.
            let base = 0x4000_0000u64;
            let map = |off: u64| {
                let abs = first_off + off;
                base + ((abs / ps) ^ 5) * ps + abs % ps
            };
            let needed = list_pages_needed(map(0), len, page);
            let pool = list_pool(page, needed as u64 + 1);
            let prps = build(len, page, map, &pool).unwrap();
            prop_assert_eq!(prps.list.len(), needed);
            for l in &prps.list {
                prop_assert_eq!(l.iova % ps, 0);
                prop_assert!(l.entries.len() as u64 <= page.entries_per_list_page());
                prop_assert!(l.entries.iter().all(|e| e % ps == 0));
            }
            let segs = walk(&prps, len, page);
            prop_assert_eq!(segs.len() as u64, pages_touched(map(0), len, page));
            prop_assert_eq!(segs.iter().map(|s| s.1).sum::<u64>(), len);
            let mut off = 0;
            for (i, &(iova, n)) in segs.iter().enumerate() {
                prop_assert_eq!(iova, map(off));
                if i > 0 {
                    prop_assert_eq!(iova % ps, 0);
                }
                off += n;
            }
        }

        /// Chunks tile the request: contiguous, block aligned, within limits.
        #[test]
        fn split_tiles_the_request(
            lbads in 9u32..=13,
            first_block in 0u64..1_000_000,
            blocks in 1u64..300_000,
            mdts_blocks in proptest::option::of(1u64..100_000),
        ) {
            let bs = 1u32 << lbads;
            let max = mdts_blocks.map(|b| b * u64::from(bs) + 7);
            let (offset, len) = (first_block * u64::from(bs), blocks * u64::from(bs));
            let chunks: Vec<Chunk> = split_by_mdts(offset, len, max, bs).unwrap().collect();
            let mut next_byte = 0;
            let mut next_lba = first_block;
            for c in &chunks {
                prop_assert_eq!(c.bytes.start, next_byte);
                prop_assert_eq!(c.lba, next_lba);
                prop_assert!(c.blocks >= 1 && c.blocks <= MAX_BLOCKS_PER_COMMAND);
                prop_assert_eq!(c.bytes.end - c.bytes.start, u64::from(c.blocks) * u64::from(bs));
                if let Some(m) = max {
                    prop_assert!(c.bytes.end - c.bytes.start <= m);
                }
                next_byte = c.bytes.end;
                next_lba += u64::from(c.blocks);
            }
            prop_assert_eq!(next_byte, blocks * u64::from(bs));
        }
    }
}
