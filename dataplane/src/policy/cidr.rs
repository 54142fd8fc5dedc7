//! Sets of IPv4 addresses given as `ipBlock`s (a CIDR minus `except` CIDRs), unioned.
//!
//! Built off the hot path as disjoint intervals, then decomposed into the minimal set of disjoint
//! prefixes and stored per prefix length as hash sets of network addresses: a lookup probes one
//! hash set per prefix length present (longest first), never the list of blocks.

use ahash::AHashSet;
use std::net::Ipv4Addr;

/// A union of `ipBlock`s.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct CidrSet {
    /// Sorted, disjoint, non-adjacent inclusive intervals (build-time form, used to union sets).
    intervals: Vec<(u32, u32)>,
    /// Per prefix length present, longest first: (mask, network addresses).
    lpm: Vec<(u32, AHashSet<u32>)>,
}

impl std::fmt::Debug for CidrSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.intervals
                    .iter()
                    .map(|&(a, b)| format!("{}-{}", Ipv4Addr::from(a), Ipv4Addr::from(b))),
            )
            .finish()
    }
}

impl CidrSet {
    /// The addresses of `net/len` except those in each `except` prefix.
    pub(crate) fn block(net: u32, len: u8, except: &[(u32, u8)]) -> Self {
        let (lo, hi) = range(net, len);
        let mut ex: Vec<(u32, u32)> = except.iter().map(|&(n, l)| range(n, l)).collect();
        ex.sort_unstable();
        let mut out = Vec::new();
        let mut cur = u64::from(lo);
        for (elo, ehi) in ex {
            let (elo, ehi) = (u64::from(elo), u64::from(ehi));
            if ehi < cur {
                continue;
            }
            if elo > cur {
                out.push((cur as u32, (elo - 1).min(u64::from(hi)) as u32));
            }
            cur = cur.max(ehi + 1);
            if cur > u64::from(hi) {
                break;
            }
        }
        if cur <= u64::from(hi) {
            out.push((cur as u32, hi));
        }
        Self::from_intervals(out)
    }

    /// The set as sorted, disjoint inclusive intervals.
    pub(crate) fn intervals(&self) -> &[(u32, u32)] {
        &self.intervals
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.intervals.is_empty()
    }

    /// Adds every address of `other`.
    pub(crate) fn union_with(&mut self, other: &CidrSet) {
        if other.is_empty() {
            return;
        }
        let mut all = std::mem::take(&mut self.intervals);
        all.extend_from_slice(&other.intervals);
        *self = Self::from_intervals(all);
    }

    fn from_intervals(mut iv: Vec<(u32, u32)>) -> Self {
        iv.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(iv.len());
        for (lo, hi) in iv {
            if let Some(last) = merged.last_mut()
                && u64::from(lo) <= u64::from(last.1) + 1
            {
                last.1 = last.1.max(hi);
                continue;
            }
            merged.push((lo, hi));
        }
        let mut by_len: Vec<AHashSet<u32>> = vec![AHashSet::new(); 33];
        for &(lo, hi) in &merged {
            prefixes(lo, hi, |net, len| {
                by_len[len as usize].insert(net);
            });
        }
        let lpm = by_len
            .into_iter()
            .enumerate()
            .rev()
            .filter(|(_, s)| !s.is_empty())
            .map(|(len, s)| (mask(len as u8), s))
            .collect();
        Self {
            intervals: merged,
            lpm,
        }
    }

    /// Whether `ip` is in the set. One hash probe per prefix length present.
    #[inline]
    pub(crate) fn contains(&self, ip: u32) -> bool {
        self.lpm.iter().any(|(m, nets)| nets.contains(&(ip & m)))
    }
}

/// Calls `f(network, prefix_len)` for the minimal disjoint prefixes covering `[lo, hi]`.
fn prefixes(lo: u32, hi: u32, mut f: impl FnMut(u32, u8)) {
    let mut cur = u64::from(lo);
    let end = u64::from(hi);
    while cur <= end {
        // Largest aligned block starting at cur that fits in [cur, end].
        let mut size_log = if cur == 0 {
            32
        } else {
            cur.trailing_zeros().min(32)
        };
        while size_log > 0 && cur + (1u64 << size_log) - 1 > end {
            size_log -= 1;
        }
        f(cur as u32, (32 - size_log) as u8);
        cur += 1u64 << size_log;
    }
}

/// A map from IPv4 addresses to the first of several [`CidrSet`]s (in the order given) that
/// contains them, with the value given for that set: the attribution of `ipBlock` grants.
#[derive(Clone, Debug, Default)]
pub(crate) struct CidrMap {
    /// Per prefix length present, longest first: (mask, network -> value).
    lpm: Vec<(u32, ahash::AHashMap<u32, u32>)>,
}

impl CidrMap {
    pub(crate) fn build(sets: &[(&CidrSet, u32)]) -> Self {
        let mut bounds: Vec<u64> = Vec::new();
        for (set, _) in sets {
            for &(lo, hi) in &set.intervals {
                bounds.push(u64::from(lo));
                bounds.push(u64::from(hi) + 1);
            }
        }
        bounds.sort_unstable();
        bounds.dedup();
        // Elementary segments between boundaries, each valued by the first set containing it.
        let mut segs: Vec<(u32, u32, u32)> = Vec::new();
        for w in bounds.windows(2) {
            let (lo, hi) = (w[0] as u32, (w[1] - 1) as u32);
            let value = sets.iter().find_map(|(set, v)| {
                let i = set.intervals.partition_point(|&(_, h)| h < lo);
                set.intervals
                    .get(i)
                    .is_some_and(|&(l, _)| l <= lo)
                    .then_some(*v)
            });
            let Some(v) = value else { continue };
            match segs.last_mut() {
                Some(last) if last.2 == v && u64::from(last.1) + 1 == u64::from(lo) => last.1 = hi,
                _ => segs.push((lo, hi, v)),
            }
        }
        let mut by_len: Vec<ahash::AHashMap<u32, u32>> = vec![ahash::AHashMap::new(); 33];
        for (lo, hi, v) in segs {
            prefixes(lo, hi, |net, len| {
                by_len[len as usize].insert(net, v);
            });
        }
        Self {
            lpm: by_len
                .into_iter()
                .enumerate()
                .rev()
                .filter(|(_, m)| !m.is_empty())
                .map(|(len, m)| (mask(len as u8), m))
                .collect(),
        }
    }

    /// The value of the first set containing `ip`.
    #[inline]
    pub(crate) fn get(&self, ip: u32) -> Option<u32> {
        self.lpm
            .iter()
            .find_map(|(m, nets)| nets.get(&(ip & m)).copied())
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn range(net: u32, len: u8) -> (u32, u32) {
    let m = mask(len);
    (net & m, (net & m) | !m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    #[test]
    fn block_with_except() {
        let s = CidrSet::block(
            ip("10.0.0.0"),
            8,
            &[(ip("10.1.0.0"), 16), (ip("10.2.3.4"), 32)],
        );
        assert!(s.contains(ip("10.0.0.1")));
        assert!(!s.contains(ip("10.1.2.3")));
        assert!(!s.contains(ip("10.2.3.4")));
        assert!(s.contains(ip("10.2.3.5")));
        assert!(s.contains(ip("10.255.255.255")));
        assert!(!s.contains(ip("11.0.0.0")));
    }

    #[test]
    fn map_gives_the_first_set_containing() {
        let a = CidrSet::block(ip("10.0.0.0"), 8, &[(ip("10.1.0.0"), 16)]);
        let b = CidrSet::block(ip("10.0.0.0"), 7, &[]);
        let m = CidrMap::build(&[(&a, 1), (&b, 2)]);
        assert_eq!(m.get(ip("10.0.0.1")), Some(1));
        assert_eq!(m.get(ip("10.1.2.3")), Some(2));
        assert_eq!(m.get(ip("11.255.0.1")), Some(2));
        assert_eq!(m.get(ip("12.0.0.1")), None);
        assert_eq!(CidrMap::build(&[]).get(0), None);
    }

    #[test]
    fn everything_and_union() {
        let mut s = CidrSet::block(0, 0, &[(ip("10.0.0.0"), 8)]);
        assert!(s.contains(0) && s.contains(u32::MAX) && !s.contains(ip("10.9.9.9")));
        s.union_with(&CidrSet::block(ip("10.9.0.0"), 16, &[]));
        assert!(s.contains(ip("10.9.9.9")) && !s.contains(ip("10.8.9.9")));
        let all = CidrSet::block(ip("1.2.3.4"), 0, &[]);
        assert!(all.contains(ip("255.0.0.1")));
        let none = CidrSet::block(ip("1.2.3.0"), 24, &[(ip("1.2.3.0"), 24)]);
        assert!(none.is_empty() && !none.contains(ip("1.2.3.1")));
    }
}
