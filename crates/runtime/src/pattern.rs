//! The deterministic test pattern: byte `o` of the pattern for `seed` is a pure function of
//! `(seed, o)`, so a writer and a verifier that agree on the seed need not share buffers,
//! and the GPU kernels (`kernels/pattern.cu`) can be checked against this CPU reference.
//!
//! Word `w = o / 8` is `splitmix64(seed ^ (w * 0x9E3779B97F4A7C15))`, stored little-endian;
//! byte `o` is byte `o % 8` of that word.

/// The splitmix64 finaliser.
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 8-byte word `w` of the pattern for `seed`.
#[inline]
pub fn word(seed: u64, w: u64) -> u64 {
    splitmix64(seed ^ w.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Byte `offset` of the pattern for `seed`.
#[inline]
pub fn byte(seed: u64, offset: u64) -> u8 {
    word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Fills `dst` with the pattern, `dst[0]` being byte `offset`.
pub fn fill(dst: &mut [u8], seed: u64, offset: u64) {
    let mut i = 0usize;
    // Head up to a word boundary of the pattern.
    while i < dst.len() && !(offset + i as u64).is_multiple_of(8) {
        dst[i] = byte(seed, offset + i as u64);
        i += 1;
    }
    let mut w = (offset + i as u64) / 8;
    let mut chunks = dst[i..].chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word(seed, w).to_le_bytes());
        w += 1;
    }
    let rem = chunks.into_remainder();
    let bytes = word(seed, w).to_le_bytes();
    rem.copy_from_slice(&bytes[..rem.len()]);
}

/// Counts the bytes of `src` that differ from the pattern, `src[0]` being byte `offset`.
pub fn count_mismatches(src: &[u8], seed: u64, offset: u64) -> u64 {
    let mut expected = vec![0u8; src.len().min(1 << 20)];
    let mut bad = 0u64;
    let mut done = 0usize;
    while done < src.len() {
        let n = expected.len().min(src.len() - done);
        fill(&mut expected[..n], seed, offset + done as u64);
        bad += src[done..done + n]
            .iter()
            .zip(&expected[..n])
            .filter(|(a, b)| a != b)
            .count() as u64;
        done += n;
    }
    bad
}

/// The position of the first byte of `src` that differs from the pattern, if any.
pub fn first_mismatch(src: &[u8], seed: u64, offset: u64) -> Option<usize> {
    src.iter()
        .enumerate()
        .find(|(i, b)| **b != byte(seed, offset + *i as u64))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_agrees_with_byte_at_every_alignment() {
        for offset in 0..17u64 {
            for len in [0usize, 1, 7, 8, 9, 63, 100] {
                let mut buf = vec![0u8; len];
                fill(&mut buf, 42, offset);
                for (i, b) in buf.iter().enumerate() {
                    assert_eq!(*b, byte(42, offset + i as u64), "offset {offset} len {len} i {i}");
                }
                assert_eq!(count_mismatches(&buf, 42, offset), 0);
            }
        }
    }

    #[test]
    fn mismatches_are_counted_and_located() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 7, 100);
        buf[10] ^= 1;
        buf[4000] ^= 0xff;
        assert_eq!(count_mismatches(&buf, 7, 100), 2);
        assert_eq!(first_mismatch(&buf, 7, 100), Some(10));
        assert_eq!(
            count_mismatches(&buf, 8, 100),
            4096 - count_equal_by_chance(&buf, 8, 100)
        );
    }

    fn count_equal_by_chance(buf: &[u8], seed: u64, offset: u64) -> u64 {
        buf.iter()
            .enumerate()
            .filter(|(i, b)| **b == byte(seed, offset + *i as u64))
            .count() as u64
    }

    #[test]
    fn seeds_give_different_data() {
        let mut a = vec![0u8; 64];
        let mut b = vec![0u8; 64];
        fill(&mut a, 1, 0);
        fill(&mut b, 2, 0);
        assert_ne!(a, b);
    }
}
