//! Checksums of stored tensors: the CRC-32C of every [`BLOCK`]-byte block of a tensor's
//! bytes (its regions taken in order, whatever their number), computed on the device when
//! the tensor is offloaded and again on the bytes read back, before they are handed out.
//!
//! Blocks, not one CRC per tensor, because the device computes many small CRCs at once far
//! faster than one long one, and comparing lists needs no arithmetic. A region boundary
//! inside a block cuts it into pieces whose CRCs are combined on the host
//! ([`crc32c::crc32c_combine`]); that happens at most once per region. The lists cost
//! 4 bytes of host memory per 32 KiB stored (12.5 MiB per 100 GiB).
//!
//! [`Plan`] builds the pieces of one device call ([`Device::crc32c`](crate::Device::crc32c))
//! covering several tensors and folds the CRCs it returns into one [`Sums`] per tensor.

use crate::memory::DevicePtr;

/// Bytes covered by one CRC: 32 KiB.
pub const BLOCK: u64 = 32 << 10;

/// The block CRCs of one tensor's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sums(Box<[u32]>);

impl Sums {
    #[cfg(test)]
    /// The CRCs, one per block (the last block may be shorter).
    pub fn blocks(&self) -> &[u32] {
        &self.0
    }

    /// The first block where `found` differs from `self`, with both CRCs; `None` when equal.
    /// Lists of different lengths differ at the first block one of them lacks (its CRC is
    /// then given as 0).
    pub fn first_mismatch(&self, found: &Sums) -> Option<Mismatch> {
        let n = self.0.len().max(found.0.len());
        (0..n).find_map(|i| {
            let (want, got) = (self.0.get(i).copied(), found.0.get(i).copied());
            (want != got).then(|| Mismatch {
                block: i as u64,
                expected: want.unwrap_or(0),
                found: got.unwrap_or(0),
            })
        })
    }

    #[cfg(test)]
    /// Host memory the list takes, in bytes.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.0)
    }
}

/// Where two [`Sums`] first differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The block (its bytes start at `block * BLOCK` in the tensor).
    pub block: u64,
    /// The CRC written.
    pub expected: u32,
    /// The CRC of the bytes read back.
    pub found: u32,
}

/// One piece: a run of device memory inside one block of one tensor.
#[derive(Clone, Copy, Debug)]
struct Piece {
    /// Starts a new block (otherwise it continues the previous piece's block).
    starts_block: bool,
    len: u64,
}

/// The pieces of one device CRC call covering several tensors, and how to fold them back.
#[derive(Debug, Default)]
pub struct Plan {
    mem: Vec<(DevicePtr, u64)>,
    pieces: Vec<Piece>,
    /// For each tensor, its first piece (its pieces run to the next tensor's first).
    tensors: Vec<usize>,
}

impl Plan {
    /// An empty plan.
    pub fn new() -> Self {
        Plan::default()
    }

    /// Adds one tensor whose bytes are `ranges` (device address, length) in order; empty
    /// ranges are skipped. Tensors are numbered from 0 in the order they are added.
    pub fn add(&mut self, ranges: impl IntoIterator<Item = (DevicePtr, u64)>) {
        self.tensors.push(self.pieces.len());
        let mut in_block = 0; // bytes of the current block already cut
        for (mut ptr, mut len) in ranges {
            while len > 0 {
                let take = len.min(BLOCK - in_block);
                self.mem.push((ptr, take));
                self.pieces.push(Piece {
                    starts_block: in_block == 0,
                    len: take,
                });
                in_block = (in_block + take) % BLOCK;
                ptr += take;
                len -= take;
            }
        }
    }

    /// The pieces to hand to [`Device::crc32c`](crate::Device::crc32c).
    pub fn pieces(&self) -> &[(DevicePtr, u64)] {
        &self.mem
    }

    #[cfg(test)]
    /// Tensors added.
    pub fn tensors(&self) -> usize {
        self.tensors.len()
    }

    /// Folds the CRCs of [`Plan::pieces`] (in the same order) into one [`Sums`] per
    /// tensor, in the order they were added. `None` when `crcs` has the wrong length.
    pub fn fold(&self, crcs: &[u32]) -> Option<Vec<Sums>> {
        if crcs.len() != self.pieces.len() {
            return None;
        }
        let ends = self.tensors.iter().skip(1).copied().chain([self.pieces.len()]);
        let sums = self
            .tensors
            .iter()
            .zip(ends)
            .map(|(&first, end)| {
                let mut blocks: Vec<u32> = Vec::new();
                for (piece, &crc) in self.pieces[first..end].iter().zip(&crcs[first..end]) {
                    match blocks.last_mut() {
                        Some(acc) if !piece.starts_block => {
                            *acc = crc32c::crc32c_combine(*acc, crc, piece.len as usize)
                        }
                        _ => blocks.push(crc),
                    }
                }
                Sums(blocks.into_boxed_slice())
            })
            .collect();
        Some(sums)
    }
}

#[cfg(test)]
/// The [`Sums`] of host bytes (what the device computes for the same bytes).
pub fn sums_of(bytes: &[u8]) -> Sums {
    Sums(bytes.chunks(BLOCK as usize).map(crc32c::crc32c).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRCs of the plan's pieces computed on host memory (addresses are host pointers).
    fn host_crcs(plan: &Plan) -> Vec<u32> {
        plan.pieces()
            .iter()
            .map(|&(ptr, len)| {
                // SAFETY: the tests build plans over slices of live vectors.
                crc32c::crc32c(unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) })
            })
            .collect()
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn sums_do_not_depend_on_how_the_bytes_are_split() {
        let bytes = data(5 * BLOCK as usize + 777, 3);
        let whole = sums_of(&bytes);
        assert_eq!(whole.blocks().len(), 6);
        // The same bytes cut into regions at odd places, some empty, some across blocks.
        for cuts in [
            vec![
                0,
                1,
                BLOCK as usize,
                BLOCK as usize + 1,
                3 * BLOCK as usize - 5,
                bytes.len(),
            ],
            vec![0, 100, 100, 70_000, bytes.len()],
            vec![0, bytes.len()],
        ] {
            let mut plan = Plan::new();
            plan.add(
                cuts.windows(2)
                    .map(|w| (bytes[w[0]..].as_ptr() as DevicePtr, (w[1] - w[0]) as u64)),
            );
            let sums = plan.fold(&host_crcs(&plan)).unwrap();
            assert_eq!(sums, vec![whole.clone()], "cuts {cuts:?}");
        }
    }

    #[test]
    fn several_tensors_fold_separately() {
        let (a, b, empty) = (data(BLOCK as usize * 2 + 1, 1), data(10, 2), Vec::<u8>::new());
        let mut plan = Plan::new();
        plan.add([(a.as_ptr() as DevicePtr, a.len() as u64)]);
        plan.add([(empty.as_ptr() as DevicePtr, 0)]);
        plan.add([(b.as_ptr() as DevicePtr, 4), (b[4..].as_ptr() as DevicePtr, 6)]);
        assert_eq!(plan.tensors(), 3);
        let sums = plan.fold(&host_crcs(&plan)).unwrap();
        assert_eq!(sums, vec![sums_of(&a), sums_of(&empty), sums_of(&b)]);
        assert!(plan.fold(&[1, 2]).is_none(), "a wrong number of CRCs is refused");
    }

    #[test]
    fn a_flipped_byte_is_found_in_its_block() {
        let mut bytes = data(3 * BLOCK as usize, 9);
        let good = sums_of(&bytes);
        assert_eq!(good.first_mismatch(&good), None);
        bytes[BLOCK as usize + 17] ^= 0x40;
        let bad = sums_of(&bytes);
        let m = good.first_mismatch(&bad).expect("differs");
        assert_eq!(m.block, 1);
        assert_eq!((m.expected, m.found), (good.blocks()[1], bad.blocks()[1]));
        let short = sums_of(&bytes[..BLOCK as usize]);
        assert_eq!(good.first_mismatch(&short).map(|m| m.block), Some(1));
        assert_eq!(good.heap_bytes(), 12);
    }
}
