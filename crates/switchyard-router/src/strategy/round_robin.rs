//! Round robin: each candidate in turn, ignoring weights.
//!
//! # Cost
//!
//! O(1): one relaxed atomic increment and a modulo. A fresh snapshot starts the
//! rotation at a random candidate, so frequent rebuilds do not favour the first.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Load, Strategy};

/// Round robin over one candidate set.
#[derive(Debug)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A rotation starting at a random candidate.
    pub fn new() -> Self {
        Self {
            next: AtomicUsize::new(fastrand::usize(..1 << 16)),
        }
    }
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for RoundRobin {
    fn pick<L: Load>(&self, candidates: &[L]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % candidates.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::loads;

    #[test]
    fn every_candidate_gets_exactly_its_turn() {
        fastrand::seed(1);
        let cands = loads(&[1, 2, 5]);
        let rr = RoundRobin::new();
        let mut counts = [0u32; 3];
        let mut last = None;
        for _ in 0..30_000 {
            let i = rr.pick(&cands).unwrap();
            assert_ne!(Some(i), last, "round robin never repeats with 3 candidates");
            last = Some(i);
            counts[i] += 1;
        }
        assert_eq!(counts, [10_000; 3]);
        assert_eq!(rr.pick(&loads(&[])), None);
    }
}
