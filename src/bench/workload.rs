//! The list of I/Os one benchmark operation performs.

use spillway_runtime::pattern::splitmix64;

/// One I/O of the benchmark: `len` bytes at byte `offset` of the target (and of the buffer,
/// modulo its length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    /// Byte offset in the target.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `size` bytes cut into `block`-sized I/Os (the last one shorter if `block` does not divide
/// `size`), in order, or in a random order (each block exactly once, like fio's random map)
/// when `random` is set.
pub fn plan(size: u64, block: u64, random: bool, seed: u64) -> Vec<Io> {
    let count = size.div_ceil(block);
    let mut ios: Vec<Io> = (0..count)
        .map(|i| {
            let offset = i * block;
            Io {
                offset,
                len: block.min(size - offset),
            }
        })
        .collect();
    if random {
        shuffle(&mut ios, seed);
    }
    ios
}

/// Fisher–Yates with a splitmix64 stream: deterministic for a seed.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    for i in (1..items.len()).rev() {
        state = splitmix64(state);
        let j = (state % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_the_size_exactly_once() {
        for random in [false, true] {
            let ios = plan(10 * 4096 + 5, 4096, random, 1);
            assert_eq!(ios.len(), 11);
            let mut sorted = ios.clone();
            sorted.sort_by_key(|io| io.offset);
            let mut next = 0;
            for io in &sorted {
                assert_eq!(io.offset, next);
                next += io.len;
            }
            assert_eq!(next, 10 * 4096 + 5);
        }
    }

    #[test]
    fn random_order_differs_from_sequential() {
        let seq = plan(1 << 20, 4096, false, 3);
        let rnd = plan(1 << 20, 4096, true, 3);
        assert_ne!(seq, rnd);
        assert_eq!(rnd, plan(1 << 20, 4096, true, 3), "deterministic for a seed");
    }
}
