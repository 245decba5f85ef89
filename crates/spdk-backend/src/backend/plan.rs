//! How one request becomes commands: cut into chunks that fit a staging buffer, each
//! covering whole blocks on the namespace. A request that starts or ends inside a block
//! gets chunks whose window is wider than its data; a write of such a chunk must read the
//! window first (read-modify-write).

/// One piece of a request: a window of whole blocks on the namespace and where the
/// request's bytes sit in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// First block of the window.
    pub lba: u64,
    /// Bytes of the window (whole blocks, at most the chunk size).
    pub window: usize,
    /// Bytes of the window before the request's data.
    pub head: usize,
    /// Where this chunk's data starts in the request's memory.
    pub mem_offset: usize,
    /// Bytes of the request's data in this chunk.
    pub len: usize,
}

impl Chunk {
    /// Whether the data leaves part of the window uncovered, so that a write must read the
    /// window first.
    pub fn is_partial(&self) -> bool {
        self.head != 0 || self.len != self.window
    }
}

/// Cuts the byte range `[offset, offset + len)` into chunks of at most `chunk` bytes of
/// whole `block`-byte blocks. `block` is a power of two, `chunk` a non-zero multiple of
/// it. Every chunk after the first starts on a block boundary.
pub fn chunks(offset: u64, len: usize, block: usize, chunk: usize) -> Vec<Chunk> {
    debug_assert!(block.is_power_of_two() && chunk >= block && chunk.is_multiple_of(block));
    let (block, chunk_bytes) = (block as u64, chunk as u64);
    let end = offset + len as u64;
    let mut out = Vec::with_capacity((len / chunk) + 2);
    let mut pos = offset;
    while pos < end {
        let start = pos - pos % block;
        let window_end = (start + chunk_bytes).min(end.div_ceil(block) * block);
        let data_end = end.min(window_end);
        out.push(Chunk {
            lba: start / block,
            window: (window_end - start) as usize,
            head: (pos - start) as usize,
            mem_offset: (pos - offset) as usize,
            len: (data_end - pos) as usize,
        });
        pos = data_end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aligned_requests_are_cut_at_the_chunk_size() {
        let c = chunks(4096, 3 << 20, 512, 1 << 20);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|c| !c.is_partial() && c.window == 1 << 20));
        assert_eq!(c[0].lba, 8);
        assert_eq!(c[1].lba, 8 + 2048);
        assert_eq!(c[2].mem_offset, 2 << 20);
    }

    #[test]
    fn an_unaligned_request_widens_its_first_and_last_windows() {
        let c = chunks(100, 1000, 512, 4096);
        assert_eq!(
            c,
            vec![Chunk {
                lba: 0,
                window: 1536,
                head: 100,
                mem_offset: 0,
                len: 1000
            }]
        );
        assert!(c[0].is_partial());
        let c = chunks(4000, 5000, 512, 4096);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].lba, c[0].window, c[0].head, c[0].len), (7, 4096, 416, 3680));
        assert_eq!((c[1].lba, c[1].window, c[1].head, c[1].len), (15, 1536, 0, 1320));
    }

    #[test]
    fn nothing_for_an_empty_request() {
        assert!(chunks(512, 0, 512, 4096).is_empty());
    }

    proptest! {
        #[test]
        fn chunks_cover_the_request_once_in_whole_blocks(
            offset in 0u64..1 << 20,
            len in 1usize..300_000,
            block_shift in 9u32..13,
            chunk_blocks in 1usize..64,
        ) {
            let block = 1usize << block_shift;
            let chunk = block * chunk_blocks;
            let c = chunks(offset, len, block, chunk);
            let mut expect_mem = 0;
            for ch in &c {
                prop_assert_eq!(ch.mem_offset, expect_mem);
                prop_assert!(ch.window % block == 0 && ch.window <= chunk && ch.window > 0);
                prop_assert!(ch.head + ch.len <= ch.window);
                prop_assert!(ch.len > 0);
                prop_assert_eq!(ch.lba * block as u64 + ch.head as u64, offset + ch.mem_offset as u64);
                expect_mem += ch.len;
            }
            prop_assert_eq!(expect_mem, len);
            // Only the first chunk may start inside a block, only the last end inside one.
            for ch in c.iter().skip(1) {
                prop_assert_eq!(ch.head, 0);
            }
            for ch in c.iter().take(c.len().saturating_sub(1)) {
                prop_assert_eq!(ch.head + ch.len, ch.window);
            }
        }
    }
}
