//! Exact version vectors.
//!
//! A replica applies the facts of each origin strictly in sequence order (see `replica.rs`),
//! so the set of facts it has applied is exactly described by one number per origin: the
//! highest contiguous sequence applied. That makes membership (`contains`) a comparison and
//! the frontier a Raft entry records a short list. The Bloom clock (`clock.rs`) is only a
//! cheap summary of this; the version vector is the truth.

use crate::clock::NodeId;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;

/// Highest applied sequence per origin; absent origins count as 0 (sequences start at 1).
///
/// Stored as a vector sorted by origin: clusters have a handful of nodes, so a sorted vector
/// beats a map on both speed and size, and its order makes encodings deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector {
    entries: Vec<(NodeId, u64)>,
}

impl VersionVector {
    pub const fn new() -> VersionVector {
        VersionVector {
            entries: Vec::new(),
        }
    }

    /// Highest contiguous sequence seen from `origin` (0 = none).
    pub fn get(&self, origin: NodeId) -> u64 {
        match self.entries.binary_search_by_key(&origin, |e| e.0) {
            Ok(i) => self.entries[i].1,
            Err(_) => 0,
        }
    }

    /// Whether the fact `(origin, seq)` is covered.
    pub fn contains(&self, origin: NodeId, seq: u64) -> bool {
        seq != 0 && seq <= self.get(origin)
    }

    /// Raise the entry of `origin` to at least `seq`.
    pub fn raise(&mut self, origin: NodeId, seq: u64) {
        match self.entries.binary_search_by_key(&origin, |e| e.0) {
            Ok(i) => {
                if self.entries[i].1 < seq {
                    self.entries[i].1 = seq;
                }
            }
            Err(i) => {
                if seq > 0 {
                    self.entries.insert(i, (origin, seq));
                }
            }
        }
    }

    /// Advance `origin` by exactly one. The caller has checked that `seq` is the next one.
    pub fn advance(&mut self, origin: NodeId, seq: u64) {
        debug_assert_eq!(
            self.get(origin) + 1,
            seq,
            "version vectors advance contiguously"
        );
        self.raise(origin, seq);
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for &(origin, seq) in &other.entries {
            self.raise(origin, seq);
        }
    }

    /// `self >= other` pointwise: every fact `other` covers, `self` covers.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.entries.iter().all(|&(o, s)| self.get(o) >= s)
    }

    /// Causal comparison; `None` when concurrent.
    pub fn partial_cmp_causal(&self, other: &VersionVector) -> Option<Ordering> {
        match (self.dominates(other), other.dominates(self)) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) => None,
        }
    }

    /// Origins with their highest sequence, sorted by origin.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.entries.iter().copied()
    }

    /// For each origin where `self` is behind `other`, the missing range `(origin, from, to)`
    /// inclusive: what anti-entropy pulls.
    pub fn missing_from(&self, other: &VersionVector) -> Vec<(NodeId, u64, u64)> {
        other
            .entries
            .iter()
            .filter_map(|&(o, s)| {
                let have = self.get(o);
                (have < s).then_some((o, have + 1, s))
            })
            .collect()
    }

    /// Total number of facts covered.
    pub fn total(&self) -> u64 {
        self.entries.iter().map(|e| e.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    fn from_iter<T: IntoIterator<Item = (NodeId, u64)>>(iter: T) -> Self {
        let mut vv = VersionVector::new();
        for (o, s) in iter {
            vv.raise(o, s);
        }
        vv
    }
}

impl fmt::Display for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (o, s)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "n{o}:{s}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_merge_and_dominance() {
        let mut a: VersionVector = [(1, 3), (2, 1)].into_iter().collect();
        let b: VersionVector = [(2, 4), (3, 1)].into_iter().collect();
        assert_eq!(a.partial_cmp_causal(&b), None);
        assert!(a.contains(1, 3));
        assert!(!a.contains(1, 4));
        assert!(!a.contains(1, 0));
        assert_eq!(a.missing_from(&b), vec![(2, 2, 4), (3, 1, 1)]);
        a.merge(&b);
        assert_eq!(a.partial_cmp_causal(&b), Some(Ordering::Greater));
        assert_eq!(a.to_string(), "{n1:3, n2:4, n3:1}");
        assert_eq!(a.total(), 8);
    }
}
