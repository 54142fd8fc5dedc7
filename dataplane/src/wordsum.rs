//! Fast ones'-complement sums for bulk payload: the checksum work of software TSO
//! ([`crate::segment`]) and of checksum verification in GRO ([`crate::coalesce`]).
//!
//! [`crate::checksum::Checksum`] reads big-endian 16-bit words, which is clear but slow on long
//! payloads. [`WordSum`] reads 32-bit words in the machine's own byte order into a 64-bit
//! accumulator, which the compiler vectorises, and converts to network order once at the end:
//! RFC 1071 section 2(B), the ones'-complement sum is independent of byte order. Its copy form
//! [`WordSum::copy_from`] moves payload and sums it in one pass over the bytes.
//!
//! A stream may be fed in pieces of any length: a piece that starts at an odd offset of the
//! stream has its sum byte-swapped before it is added (RFC 1071 section 2(B) again), so the
//! result is the same as for the stream summed in one piece.
//!
//! Pure arithmetic; nothing here panics or allocates.

/// A running ones'-complement sum over a byte stream fed in pieces.
#[derive(Clone, Copy, Debug, Default)]
pub struct WordSum {
    /// Sum of the pieces, each already folded and swapped into place, in native byte order.
    acc: u64,
    /// Whether an odd number of bytes has been added so far.
    odd: bool,
}

impl WordSum {
    /// An empty sum.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add the next piece of the stream.
    #[inline]
    pub fn add(&mut self, data: &[u8]) {
        let s = sum_native(data);
        self.push(s, data.len());
    }

    /// Copy `src` into `dst` (which must be as long: else only the shorter length is copied and
    /// summed) and add the copied bytes as the next piece of the stream, in one pass.
    #[inline]
    pub fn copy_from(&mut self, dst: &mut [u8], src: &[u8]) {
        let n = dst.len().min(src.len());
        let s = copy_sum_native(&mut dst[..n], &src[..n]);
        self.push(s, n);
    }

    fn push(&mut self, s: u64, len: usize) {
        let s = if self.odd {
            u64::from(fold_native(s).swap_bytes())
        } else {
            s
        };
        // Each piece adds less than 2^49 (at most 2^32 words under 2^17 each): no overflow for
        // any stream a frame can carry.
        self.acc += s;
        self.odd ^= len & 1 == 1;
    }

    /// The folded sum as a network-order value, comparable with
    /// [`crate::checksum::Checksum::fold`] (not complemented).
    pub fn fold(&self) -> u16 {
        u16::from_be_bytes(fold_native(self.acc).to_ne_bytes())
    }
}

/// Fold a native-order sum to 16 bits.
fn fold_native(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Bytes per step of the bulk loops: 8 native 32-bit words into 8 accumulators, which the
/// compiler turns into two vector lanes' worth of zero-extending adds (measured fastest of the
/// safe variants on this machine: 16-byte blocks, one load per block, 64-bit add-with-carry).
const BLOCK: usize = 32;

/// Sum `data` as native-order 32-bit words (a trailing 1..3 bytes as 16-bit words and a last
/// byte padded with zero, each at its even offset), unfolded.
#[inline]
fn sum_native(data: &[u8]) -> u64 {
    let mut acc = [0u64; BLOCK / 4];
    let mut blocks = data.chunks_exact(BLOCK);
    for b in &mut blocks {
        add_block(&mut acc, b);
    }
    acc.iter().sum::<u64>() + sum_tail(blocks.remainder())
}

/// As [`sum_native`], writing each block to `dst` as it is read.
#[inline]
fn copy_sum_native(dst: &mut [u8], src: &[u8]) -> u64 {
    let mut acc = [0u64; BLOCK / 4];
    let mut d = dst.chunks_exact_mut(BLOCK);
    let mut s = src.chunks_exact(BLOCK);
    for (db, sb) in (&mut d).zip(&mut s) {
        db.copy_from_slice(sb);
        add_block(&mut acc, sb);
    }
    let rest = s.remainder();
    d.into_remainder().copy_from_slice(rest);
    acc.iter().sum::<u64>() + sum_tail(rest)
}

#[inline(always)]
fn add_block(acc: &mut [u64; BLOCK / 4], b: &[u8]) {
    for (i, a) in acc.iter_mut().enumerate() {
        *a += u64::from(u32::from_ne_bytes([
            b[4 * i],
            b[4 * i + 1],
            b[4 * i + 2],
            b[4 * i + 3],
        ]));
    }
}

/// The sum of fewer than [`BLOCK`] bytes that start at an even offset.
#[inline]
fn sum_tail(rest: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut words = rest.chunks_exact(4);
    for w in &mut words {
        s += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut halves = words.remainder().chunks_exact(2);
    for w in &mut halves {
        s += u64::from(u16::from_ne_bytes([w[0], w[1]]));
    }
    if let [b] = halves.remainder() {
        s += u64::from(u16::from_ne_bytes([*b, 0]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::Checksum;
    use proptest::prelude::*;

    fn reference(data: &[u8]) -> u16 {
        let mut c = Checksum::new();
        c.add_bytes(data);
        c.fold()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Any split of a stream into pieces, summed or copied, folds to the reference sum.
        #[test]
        fn pieces_sum_like_the_reference(data in proptest::collection::vec(any::<u8>(), 0..300),
                                         cuts in proptest::collection::vec(0usize..300, 0..6)) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort_unstable();
            let mut summed = WordSum::new();
            let mut copied = WordSum::new();
            let mut out = vec![0u8; data.len()];
            for w in cuts.windows(2) {
                summed.add(&data[w[0]..w[1]]);
                copied.copy_from(&mut out[w[0]..w[1]], &data[w[0]..w[1]]);
            }
            prop_assert_eq!(summed.fold(), reference(&data));
            prop_assert_eq!(copied.fold(), reference(&data));
            prop_assert_eq!(out, data);
        }
    }

    #[test]
    fn large_all_ones_stream_does_not_overflow() {
        let data = vec![0xffu8; 65535];
        let mut s = WordSum::new();
        for c in data.chunks(777) {
            s.add(c);
        }
        assert_eq!(s.fold(), reference(&data));
    }
}
