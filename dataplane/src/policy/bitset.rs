//! A growable set of small integers (pod slots), one bit each.

/// A set of pod slots. Membership tests are one bounds check, one load and one shift.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Bitset {
    words: Vec<u64>,
}

impl std::fmt::Debug for Bitset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Bitset {
    /// The set `{0, .., n-1}`.
    #[cfg(test)]
    pub(crate) fn full(n: usize) -> Self {
        let mut s = Self {
            words: vec![0; n.div_ceil(64)],
        };
        for w in &mut s.words {
            *w = u64::MAX;
        }
        if !n.is_multiple_of(64)
            && let Some(last) = s.words.last_mut()
        {
            *last = (1u64 << (n % 64)) - 1;
        }
        s
    }

    #[inline]
    pub(crate) fn contains(&self, i: u32) -> bool {
        let i = i as usize;
        self.words
            .get(i >> 6)
            .is_some_and(|w| (w >> (i & 63)) & 1 == 1)
    }

    /// Sets or clears `i`; returns whether membership changed.
    pub(crate) fn set(&mut self, i: u32, on: bool) -> bool {
        let i = i as usize;
        let w = i >> 6;
        if w >= self.words.len() {
            if !on {
                return false;
            }
            self.words.resize(w + 1, 0);
        }
        let bit = 1u64 << (i & 63);
        let was = self.words[w] & bit != 0;
        if on {
            self.words[w] |= bit;
        } else {
            self.words[w] &= !bit;
        }
        was != on
    }

    /// The words, 64 members each, least significant bit first.
    #[inline]
    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub(crate) fn union_with(&mut self, other: &Bitset) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    pub(crate) fn intersect_with(&mut self, other: &Bitset) {
        for (i, a) in self.words.iter_mut().enumerate() {
            *a &= other.words.get(i).copied().unwrap_or(0);
        }
    }

    pub(crate) fn subtract(&mut self, other: &Bitset) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some((wi as u32) * 64 + b)
            })
        })
    }

    /// Drops trailing zero words so equal sets compare and hash equal.
    pub(crate) fn shrink(&mut self) {
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
        self.words.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_contains_iter() {
        let mut s = Bitset::default();
        assert!(!s.contains(3));
        assert!(s.set(3, true));
        assert!(!s.set(3, true));
        assert!(s.set(130, true));
        assert!(s.contains(130) && s.contains(3) && !s.contains(4));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 130]);
        assert!(s.set(3, false));
        assert!(!s.set(1000, false));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![130]);
    }

    #[test]
    fn full_and_ops() {
        let f = Bitset::full(70);
        assert_eq!(f.iter().count(), 70);
        assert!(f.contains(69) && !f.contains(70));
        let mut a = f.clone();
        let mut b = Bitset::default();
        b.set(5, true);
        b.set(200, true);
        a.subtract(&b);
        assert!(!a.contains(5) && a.contains(6));
        a.intersect_with(&b);
        assert!(a.is_empty());
        a.union_with(&b);
        assert!(a.contains(200));
    }
}
