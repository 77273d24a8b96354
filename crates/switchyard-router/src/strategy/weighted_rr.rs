//! Smooth weighted round robin: exact proportions, no bursts.
//!
//! This is nginx's algorithm: on every pick each candidate's `current` grows by
//! its weight, the candidate with the highest `current` (the first on ties) is
//! picked and its `current` drops by the total weight `W`. Each candidate gets
//! exactly `wᵢ` picks in every cycle of `W`, spread evenly (weights 5:1:1 give
//! `a a b a c a a`, not `a a a a a b c`).
//!
//! The sequence only depends on the weights, so it is computed once per snapshot
//! and a pick indexes it with an atomic counter, instead of taking a lock to
//! update every candidate's `current` as nginx does.
//!
//! # Cost
//!
//! A pick is one relaxed atomic increment and an index into the cycle: O(1),
//! lock-free, no allocation. Building the cycle is O(W·k + n log n) for `k`
//! distinct weights (see [`smooth`]), done off the pick path. Weights are divided by their greatest common divisor first; should
//! `W·n` still exceed [`MAX_BUILD`], the weights are scaled down to fit, which
//! keeps proportions within `n / W` (weights are at most
//! [`MAX_WEIGHT`](crate::config::MAX_WEIGHT), so this takes more than 100
//! endpoints of unequal weight).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Load, Strategy};

/// Most steps (cycle length times candidates) a cycle may take; the build
/// itself takes fewer (cycle length times distinct weights).
pub const MAX_BUILD: u64 = 1 << 24;

/// Smooth weighted round robin over one candidate set.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    cycle: Box<[u32]>,
    next: AtomicUsize,
}

impl WeightedRoundRobin {
    /// Precomputes the interleaved cycle for `weights`.
    pub fn new(weights: &[u32]) -> Self {
        Self {
            cycle: cycle(weights).into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    /// The precomputed cycle of candidate indices.
    #[cfg(test)]
    pub fn cycle(&self) -> &[u32] {
        &self.cycle
    }
}

impl Strategy for WeightedRoundRobin {
    fn pick<L: Load>(&self, candidates: &[L]) -> Option<usize> {
        if self.cycle.is_empty() || candidates.is_empty() {
            return None;
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.cycle.len();
        self.cycle
            .get(slot)
            .map(|&i| i as usize)
            .filter(|&i| i < candidates.len())
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn cycle(weights: &[u32]) -> Vec<u32> {
    let n = weights.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    let mut w: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
    let g = w.iter().copied().fold(0, gcd).max(1);
    w.iter_mut().for_each(|x| *x /= g);
    let total: u64 = w.iter().sum();
    let max_total = (MAX_BUILD / n).max(n);
    if total > max_total {
        w.iter_mut()
            .for_each(|x| *x = (*x * max_total / total).max(1));
    }
    let weights: Vec<i64> = w.iter().map(|&x| x as i64).collect();
    smooth(&weights)
}

/// nginx's smooth weighted round robin over `weights`, one whole cycle.
///
/// After `t` steps a candidate's `current` is `t·w − W·p`, with `p` its picks
/// so far. Among candidates of equal weight the highest `current` is the one
/// picked least, the first in index order on ties, so they are picked in
/// turn: only each weight's next candidate in turn can win a step, and a step
/// compares one candidate per distinct weight. O(W·k) for `k` distinct
/// weights, instead of nginx's O(W·n) (a 1,024-endpoint cluster of weights 1
/// to 4 builds its 2,560-pick cycle in about 10,000 comparisons, not 2.6
/// million, and a new cluster builds it once per endpoint's first probe).
fn smooth(weights: &[i64]) -> Vec<u32> {
    let total: i64 = weights.iter().sum();
    let mut by_weight: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for (i, &w) in weights.iter().enumerate() {
        by_weight
            .entry(w)
            .or_default()
            .push(u32::try_from(i).unwrap_or(u32::MAX));
    }
    // Per distinct weight: the weight, its candidates in index order, and how
    // many picks they had together.
    let mut classes: Vec<(i64, Vec<u32>, i64)> = by_weight
        .into_iter()
        .map(|(w, members)| (w, members, 0))
        .collect();
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for t in 1..=total {
        // The winner so far: its `current`, index and class.
        let mut best: Option<(i64, u32, usize)> = None;
        for (class, (w, members, picks)) in classes.iter().enumerate() {
            let len = members.len().max(1) as i64;
            let Some(&next) = members.get((*picks % len) as usize) else {
                continue;
            };
            let current = t * w - total * (*picks / len);
            let wins = best.is_none_or(|(bc, bi, _)| current > bc || (current == bc && next < bi));
            if wins {
                best = Some((current, next, class));
            }
        }
        let Some((_, next, class)) = best else {
            break;
        };
        if let Some((_, _, picks)) = classes.get_mut(class) {
            *picks += 1;
        }
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::loads;

    fn max_run(picks: &[usize]) -> usize {
        picks
            .chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn weights_1_2_5_get_exact_shares_without_bursts() {
        let cands = loads(&[1, 2, 5]);
        let wrr = WeightedRoundRobin::new(&[1, 2, 5]);
        assert_eq!(wrr.cycle().len(), 8);
        let picks: Vec<usize> = (0..80_000).map(|_| wrr.pick(&cands).unwrap()).collect();
        let mut counts = [0u32; 3];
        picks.iter().for_each(|&i| counts[i] += 1);
        // Exact, not merely within 1%: 80,000 is ten thousand whole cycles.
        assert_eq!(counts, [10_000, 20_000, 50_000]);
        assert!(max_run(&picks) <= 2, "max run {}", max_run(&picks));
        // Every window of one cycle holds the exact proportions.
        for window in picks.windows(8).step_by(3).take(1000) {
            let fives = window.iter().filter(|&&i| i == 2).count();
            assert_eq!(fives, 5, "{window:?}");
        }
    }

    /// nginx's own loop: every candidate's `current` grows by its weight, the
    /// highest (the first on ties) is picked and loses the total.
    fn nginx(weights: &[i64]) -> Vec<u32> {
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut out = Vec::new();
        for _ in 0..total {
            let (mut best, mut highest) = (0usize, i64::MIN);
            for (i, (c, w)) in current.iter_mut().zip(weights).enumerate() {
                *c += w;
                if *c > highest {
                    (best, highest) = (i, *c);
                }
            }
            current[best] -= total;
            out.push(best as u32);
        }
        out
    }

    #[test]
    fn the_cycle_is_nginx_s_sequence() {
        let fixed: [&[i64]; 7] = [
            &[1],
            &[5, 1, 1],
            &[1, 1, 10],
            &[3, 3, 3],
            &[2, 7, 2, 7, 1],
            &[4, 3, 2, 1, 1, 2, 3, 4],
            &[1, 1000, 1, 999],
        ];
        for weights in fixed {
            assert_eq!(smooth(weights), nginx(weights), "{weights:?}");
        }
        fastrand::seed(9);
        for _ in 0..300 {
            let n = fastrand::usize(1..40);
            let top = fastrand::i64(1..=12);
            let weights: Vec<i64> = (0..n).map(|_| fastrand::i64(1..=top)).collect();
            assert_eq!(smooth(&weights), nginx(&weights), "{weights:?}");
        }
        // The scale bench's cluster: 1,024 endpoints of weights 1 to 4.
        let weights: Vec<i64> = (0..1024).map(|i| 1 + i % 4).collect();
        assert_eq!(smooth(&weights), nginx(&weights));
    }

    #[test]
    fn matches_nginx_for_5_1_1() {
        let wrr = WeightedRoundRobin::new(&[5, 1, 1]);
        assert_eq!(wrr.cycle(), &[0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn heavy_skew_is_spread_evenly() {
        let wrr = WeightedRoundRobin::new(&[1, 1, 10]);
        let c: Vec<usize> = wrr.cycle().iter().map(|&i| i as usize).collect();
        assert_eq!(c.len(), 12);
        assert!(max_run(&[c.clone(), c.clone()].concat()) <= 7, "{c:?}");
        let ones: Vec<usize> = c
            .iter()
            .enumerate()
            .filter(|(_, &i)| i != 2)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(ones.len(), 2);
        assert!(ones[1] - ones[0] >= 4, "light endpoints bunched: {c:?}");
    }

    #[test]
    fn weights_are_reduced_and_bounded() {
        assert_eq!(WeightedRoundRobin::new(&[100, 200, 500]).cycle().len(), 8);
        let big = WeightedRoundRobin::new(&vec![999; 200]);
        assert_eq!(big.cycle().len(), 200, "equal weights reduce to one each");
        let skew: Vec<u32> = (1..=200).collect();
        assert!(WeightedRoundRobin::new(&skew).cycle().len() as u64 * 200 <= MAX_BUILD);
        assert_eq!(WeightedRoundRobin::new(&[]).pick(&loads(&[])), None);
    }
}
