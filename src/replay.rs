//! The DATA receive replay window (§7: at least 1024 sequence numbers).
//!
//! A ring of bits in the style of RFC 6479 / WireGuard: the newest sequence number seen and a
//! bitmap of the `WINDOW` before it. Update only after the AEAD has verified the packet, so a
//! forged sequence number never moves the window.
#![forbid(unsafe_code)]

const WORDS: usize = 32;
const WORD_BITS: u64 = 64;
const RING_BITS: u64 = WORDS as u64 * WORD_BITS;
/// Sequence numbers older than `newest - WINDOW` are refused. One word of the ring is kept
/// as slack so a jump forward clears whole words.
pub const WINDOW: u64 = RING_BITS - WORD_BITS;
const _: () = assert!(WINDOW >= 1024, "PROTOCOL.md §7 asks for at least 1024");

#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    /// Newest sequence number accepted plus one; 0 means none yet.
    next: u64,
    ring: [u64; WORDS],
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// Would `seq` be accepted (not too old, not seen)?
    pub fn check(&self, seq: u64) -> bool {
        if seq >= self.next {
            return seq != u64::MAX;
        }
        if self.next - 1 - seq >= WINDOW {
            return false;
        }
        let (word, bit) = Self::position(seq);
        self.ring[word] & bit == 0
    }

    /// Accepts `seq` if `check` allows it and records it. Returns whether it was accepted.
    pub fn accept(&mut self, seq: u64) -> bool {
        if !self.check(seq) {
            return false;
        }
        if seq >= self.next {
            // Clear the words that the window slides over.
            let old_word = self.next.checked_sub(1).map(|n| n / WORD_BITS);
            let new_word = seq / WORD_BITS;
            match old_word {
                Some(old) if new_word - old < WORDS as u64 => {
                    for w in old + 1..=new_word {
                        self.ring[(w % WORDS as u64) as usize] = 0;
                    }
                }
                _ => self.ring = [0; WORDS],
            }
            self.next = seq + 1;
        }
        let (word, bit) = Self::position(seq);
        self.ring[word] |= bit;
        true
    }

    /// The newest sequence number accepted, if any.
    pub fn newest(&self) -> Option<u64> {
        self.next.checked_sub(1)
    }

    fn position(seq: u64) -> (usize, u64) {
        (
            ((seq / WORD_BITS) % WORDS as u64) as usize,
            1u64 << (seq % WORD_BITS),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn basic() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(w.accept(3));
        assert!(!w.accept(3));
        assert!(w.accept(5 + WINDOW - 1));
        assert!(!w.check(5), "seen");
        assert!(!w.check(4), "too old");
        assert!(w.accept(1_000_000));
        assert!(!w.check(1_000_000 - WINDOW));
        assert!(w.accept(1_000_000 - WINDOW + 1));
    }

    proptest! {
        /// Against a model: accept iff never seen and within WINDOW of the newest.
        #[test]
        fn matches_model(seqs in proptest::collection::vec(0u64..5000, 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = BTreeSet::new();
            let mut newest: Option<u64> = None;
            for s in seqs {
                let fresh = !seen.contains(&s);
                let in_window = newest.is_none_or(|n| s > n || n - s < WINDOW);
                let want = fresh && in_window;
                prop_assert_eq!(w.accept(s), want, "seq {}", s);
                if want {
                    seen.insert(s);
                    newest = Some(newest.map_or(s, |n| n.max(s)));
                }
            }
        }
    }
}
