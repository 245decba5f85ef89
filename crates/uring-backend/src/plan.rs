//! How one request is cut into pieces the kernel accepts.
//!
//! Direct I/O wants the file offset and the length to be multiples of the target's offset
//! alignment, and the memory address to be a multiple of its memory alignment. A request
//! `(offset, len, address)` may meet none of these, so [`Plan::new`] splits it into:
//!
//! - a **head**: the partial first block, when `offset` is not aligned;
//! - the **middle**: the aligned blocks in between, in chunks of at most `chunk_size`, each
//!   either [`Route::Direct`] (the kernel moves the caller's host memory itself) or
//!   [`Route::Staged`] (through a staging buffer: device memory, or host memory whose
//!   address is misaligned);
//! - a **tail**: the partial last block, when `offset + len` is not aligned.
//!
//! Head and tail are always staged: a write reads the block, patches in the request's bytes
//! and writes the block back (read-modify-write, under a lock on the block so that other
//! writes sharing it do not undo each other's bytes); a read reads the block and copies out
//! the wanted bytes. All of this is pure arithmetic, tested without a kernel.

/// How a piece's bytes travel between the request's memory and the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The kernel reads or writes the request's (host) memory itself.
    Direct,
    /// Through a registered staging buffer, filled or drained by a memcpy (host memory) or a
    /// stream copy (device memory).
    Staged,
}

/// One I/O of a plan: an aligned range of the file, and the part of it that belongs to the
/// request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// How the bytes travel.
    pub route: Route,
    /// Start of the I/O in the file (aligned).
    pub file_offset: u64,
    /// Length of the I/O (aligned, at most the chunk size).
    pub io_len: usize,
    /// The request's bytes begin this far into the I/O.
    pub skip: usize,
    /// ...and this far into the request's memory.
    pub mem_offset: usize,
    /// Number of the request's bytes in this piece.
    pub len: usize,
}

impl Piece {
    /// True when the request covers only part of the I/O: a write must then read the block
    /// first (read-modify-write).
    pub fn is_partial(&self) -> bool {
        self.skip != 0 || self.len != self.io_len
    }

    /// Bytes a read of this piece must obtain before end-of-file for the request's bytes to
    /// be complete.
    pub fn needed_for_read(&self) -> usize {
        self.skip + self.len
    }
}

/// Everything [`Plan::new`] needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanInput {
    /// Byte offset of the request in the file.
    pub offset: u64,
    /// Length of the request (at least 1).
    pub len: usize,
    /// Address of the request's memory.
    pub mem_addr: u64,
    /// Whether the kernel may access the memory itself (host memory). Device memory is
    /// always staged.
    pub kernel_accessible: bool,
    /// Required alignment of file offsets and lengths (a power of two).
    pub offset_align: usize,
    /// Required alignment of memory addresses (a power of two).
    pub mem_align: usize,
    /// Largest I/O: a multiple of both alignments.
    pub chunk_size: usize,
}

/// The aligned middle of a request, cut into chunks on demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Middle {
    route: Route,
    file_offset: u64,
    mem_offset: usize,
    len: usize,
    chunk_size: usize,
    chunks: usize,
}

impl Middle {
    fn chunk(&self, i: usize) -> Piece {
        let start = i * self.chunk_size;
        let len = self.chunk_size.min(self.len - start);
        Piece {
            route: self.route,
            file_offset: self.file_offset + start as u64,
            io_len: len,
            skip: 0,
            mem_offset: self.mem_offset + start,
            len,
        }
    }
}

/// The pieces of one request, in file order: head, middle chunks, tail. Pieces are computed
/// on demand, so a plan is small however large the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    head: Option<Piece>,
    middle: Middle,
    tail: Option<Piece>,
}

const fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

const fn align_up(x: u64, align: u64) -> u64 {
    align_down(x + align - 1, align)
}

impl Plan {
    /// Plans a request. The alignments must be powers of two and `chunk_size` a non-zero
    /// multiple of both (the backend checks this when it opens a target).
    pub fn new(input: PlanInput) -> Plan {
        let PlanInput {
            offset,
            len,
            mem_addr,
            kernel_accessible,
            offset_align,
            mem_align,
            chunk_size,
        } = input;
        debug_assert!(offset_align.is_power_of_two() && mem_align.is_power_of_two());
        debug_assert!(chunk_size >= offset_align && chunk_size % offset_align == 0);
        debug_assert!(chunk_size % mem_align == 0);
        debug_assert!(len > 0);

        let align = offset_align as u64;
        let end = offset + len as u64;
        let first_block = align_down(offset, align);
        let middle_start = align_up(offset, align);
        let middle_end = align_down(end, align);

        let partial = |file_offset: u64, skip: u64, mem_offset: u64, len: u64| Piece {
            route: Route::Staged,
            file_offset,
            io_len: offset_align,
            skip: skip as usize,
            mem_offset: mem_offset as usize,
            len: len as usize,
        };

        if middle_start > middle_end {
            // The whole request lies inside one block, touching neither of its edges.
            return Plan {
                head: Some(partial(first_block, offset - first_block, 0, len as u64)),
                middle: Middle {
                    route: Route::Staged,
                    file_offset: middle_start,
                    mem_offset: len,
                    len: 0,
                    chunk_size,
                    chunks: 0,
                },
                tail: None,
            };
        }

        let head = (offset < middle_start)
            .then(|| partial(first_block, offset - first_block, 0, middle_start - offset));
        let tail = (middle_end < end).then(|| partial(middle_end, 0, middle_end - offset, end - middle_end));

        let middle_mem_offset = (middle_start - offset) as usize;
        let middle_len = (middle_end - middle_start) as usize;
        let aligned_memory = (mem_addr + middle_mem_offset as u64).is_multiple_of(mem_align as u64);
        let route = if kernel_accessible && aligned_memory {
            Route::Direct
        } else {
            Route::Staged
        };
        Plan {
            head,
            middle: Middle {
                route,
                file_offset: middle_start,
                mem_offset: middle_mem_offset,
                len: middle_len,
                chunk_size,
                chunks: middle_len.div_ceil(chunk_size),
            },
            tail,
        }
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.head.is_some() as usize + self.middle.chunks + self.tail.is_some() as usize
    }

    /// True when the plan has no piece (never, for a request of at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Piece `i` (`i < self.len()`), in file order.
    pub fn piece(&self, i: usize) -> Piece {
        let mut i = i;
        if let Some(head) = self.head {
            if i == 0 {
                return head;
            }
            i -= 1;
        }
        if i < self.middle.chunks {
            return self.middle.chunk(i);
        }
        debug_assert_eq!(i, self.middle.chunks);
        self.tail.expect("piece index out of range")
    }

    /// All pieces, in file order.
    pub fn pieces(&self) -> impl Iterator<Item = Piece> + '_ {
        (0..self.len()).map(|i| self.piece(i))
    }

    /// The route of the aligned middle (`None` when the request has no aligned middle).
    pub fn middle_route(&self) -> Option<Route> {
        (self.middle.chunks > 0).then_some(self.middle.route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(offset: u64, len: usize, mem_addr: u64, kernel_accessible: bool) -> PlanInput {
        PlanInput {
            offset,
            len,
            mem_addr,
            kernel_accessible,
            offset_align: 4096,
            mem_align: 512,
            chunk_size: 1 << 20,
        }
    }

    #[test]
    fn an_aligned_host_request_goes_direct_in_chunks() {
        let plan = Plan::new(input(8192, (3 << 20) + 4096, 0x10000, true));
        let pieces: Vec<_> = plan.pieces().collect();
        assert_eq!(pieces.len(), 4);
        assert!(pieces.iter().all(|p| p.route == Route::Direct && !p.is_partial()));
        assert_eq!(pieces[3].io_len, 4096);
        assert_eq!(pieces[3].file_offset, 8192 + (3 << 20));
    }

    #[test]
    fn device_memory_is_staged() {
        let plan = Plan::new(input(0, 1 << 20, 0x10000, false));
        assert_eq!(plan.middle_route(), Some(Route::Staged));
        assert_eq!(plan.len(), 1);
    }

    #[test]
    fn a_misaligned_address_is_staged() {
        let plan = Plan::new(input(0, 8192, 0x10001, true));
        assert_eq!(plan.middle_route(), Some(Route::Staged));
    }

    #[test]
    fn one_byte_inside_a_block_is_one_partial_piece() {
        let plan = Plan::new(input(1, 1, 0x10000, true));
        let pieces: Vec<_> = plan.pieces().collect();
        assert_eq!(
            pieces,
            vec![Piece {
                route: Route::Staged,
                file_offset: 0,
                io_len: 4096,
                skip: 1,
                mem_offset: 0,
                len: 1
            }]
        );
        assert_eq!(pieces[0].needed_for_read(), 2);
    }

    #[test]
    fn head_middle_and_tail() {
        // 4095..12287: a head of 1 byte, one aligned block, a tail of 4095 bytes.
        let plan = Plan::new(input(4095, 8192, 0x10000, true));
        let pieces: Vec<_> = plan.pieces().collect();
        assert_eq!(pieces.len(), 3);
        assert_eq!(
            (pieces[0].file_offset, pieces[0].skip, pieces[0].len),
            (0, 4095, 1)
        );
        // The middle's memory starts one byte into the request: misaligned, so staged.
        assert_eq!(pieces[1].route, Route::Staged);
        assert_eq!(
            (pieces[1].file_offset, pieces[1].mem_offset, pieces[1].len),
            (4096, 1, 4096)
        );
        assert_eq!(
            (pieces[2].file_offset, pieces[2].mem_offset, pieces[2].len),
            (8192, 4097, 4095)
        );
        assert!(pieces[2].is_partial());
    }

    #[test]
    fn an_unaligned_offset_can_still_have_a_direct_middle() {
        // Memory one byte before an aligned address: the middle's memory is aligned.
        let plan = Plan::new(input(4095, 1 + 8192, 0x10000 - 1, true));
        assert_eq!(plan.middle_route(), Some(Route::Direct));
    }

    fn alignment() -> impl Strategy<Value = (usize, usize)> {
        prop_oneof![
            Just((1, 1)),
            Just((512, 4)),
            Just((512, 512)),
            Just((4096, 512)),
            Just((4096, 4096))
        ]
    }

    proptest! {
        #[test]
        fn pieces_cover_the_request_exactly(
            offset in 0u64..(1 << 22),
            len in 1usize..(1 << 22),
            mem_addr in 0u64..(1 << 16),
            kernel_accessible in any::<bool>(),
            (offset_align, mem_align) in alignment(),
            chunk_blocks in 1usize..64,
        ) {
            let chunk_size = 4096 * chunk_blocks;
            let plan = Plan::new(PlanInput {
                offset, len, mem_addr, kernel_accessible, offset_align, mem_align, chunk_size,
            });
            prop_assert!(!plan.is_empty());
            let mut covered = 0usize;
            let mut partials = 0;
            for piece in plan.pieces() {
                // Contiguous, in order, with no gap or overlap.
                prop_assert_eq!(piece.mem_offset, covered);
                prop_assert!(piece.len > 0);
                covered += piece.len;
                // The I/O is aligned, no larger than a chunk, and holds the request's bytes
                // at the right place.
                prop_assert_eq!(piece.file_offset % offset_align as u64, 0);
                prop_assert_eq!(piece.io_len % offset_align, 0);
                prop_assert!(piece.io_len > 0 && piece.io_len <= chunk_size);
                prop_assert!(piece.skip + piece.len <= piece.io_len);
                prop_assert_eq!(piece.file_offset + piece.skip as u64, offset + piece.mem_offset as u64);
                match piece.route {
                    Route::Direct => {
                        prop_assert!(kernel_accessible);
                        prop_assert!(!piece.is_partial());
                        prop_assert_eq!((mem_addr + piece.mem_offset as u64) % mem_align as u64, 0);
                    }
                    Route::Staged => {
                        if piece.is_partial() {
                            // Read-modify-write touches a single block.
                            prop_assert_eq!(piece.io_len, offset_align);
                            partials += 1;
                        }
                    }
                }
            }
            prop_assert_eq!(covered, len);
            prop_assert!(partials <= 2);
            let direct_possible =
                kernel_accessible && offset % offset_align as u64 == 0 && mem_addr % mem_align as u64 == 0;
            if direct_possible && len >= offset_align {
                prop_assert_eq!(plan.middle_route(), Some(Route::Direct));
            }
        }
    }
}
