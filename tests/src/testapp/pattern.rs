//! The deterministic byte stream that clients send and check the echo against.

/// An xorshift64 stream of bytes; two instances with the same seed yield the
/// same bytes however the output is cut into chunks.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        // splitmix64 spreads nearby seeds (ports, indexes) and never yields the
        // all-zero state on which xorshift would be stuck.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self {
            state: z | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// Writes the next `out.len()` bytes of the stream into `out`.
    pub fn fill(&mut self, out: &mut [u8]) {
        let take = out.len().min(8 - self.used);
        out[..take].copy_from_slice(&self.word[self.used..self.used + take]);
        self.used += take;
        let mut words = out[take..].chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word().to_le_bytes();
            rest.copy_from_slice(&self.word[..rest.len()]);
            self.used = rest.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let mut whole = vec![0; 1000];
        Pattern::new(7).fill(&mut whole);

        let mut pieces = vec![0; 1000];
        let mut pattern = Pattern::new(7);
        let mut at = 0;
        for len in [0, 1, 3, 8, 5, 13, 64, 2, 100].iter().cycle() {
            let end = (at + len).min(pieces.len());
            pattern.fill(&mut pieces[at..end]);
            at = end;
            if at == pieces.len() {
                break;
            }
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn seeds_give_different_streams() {
        let (mut a, mut b) = ([0; 64], [0; 64]);
        Pattern::new(1).fill(&mut a);
        Pattern::new(2).fill(&mut b);
        assert_ne!(a, b);
    }
}
