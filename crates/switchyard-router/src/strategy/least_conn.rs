//! Least connections: the candidate with the fewest checkouts in flight per unit
//! of weight, ties broken at random.
//!
//! Exact by construction: a pick never returns a candidate whose
//! `in_flight / weight` is higher than another candidate's at the moment the
//! loads were read.
//!
//! # Cost
//!
//! Up to [`SCAN_LIMIT`] candidates a pick scans their counters: O(n) over at
//! most 32 contiguous atomics, which is cheaper than maintaining any index, and
//! lets ties be broken uniformly at random (reservoir sampling, no allocation).
//!
//! Above that, a [`LoadTree`] (a tournament tree) holds the winner of every
//! subtree; a pick reads the root, O(1). Each change of an endpoint's in-flight
//! count reaches the tree through its [`LoadLinks`] (a core
//! [`InFlightWatcher`]) and replays the matches on the path to the root: O(log n)
//! per change, serialised by a small mutex that is never taken by a pick. Ties
//! are decided by a coin at each match, so large clusters get random but not
//! exactly uniform tie-breaking.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use switchyard_core::{InFlight, InFlightWatcher};

use super::{Load, Strategy};

/// Largest candidate set that is scanned rather than indexed.
pub const SCAN_LIMIT: usize = 32;

const NONE: u32 = u32::MAX;

/// Least connections over one candidate set.
#[derive(Debug)]
pub struct LeastConn {
    tree: Option<Arc<LoadTree>>,
}

impl LeastConn {
    /// Prepares least connections for `candidates`; builds the index above
    /// [`SCAN_LIMIT`]. The caller links the index to the candidates' counters.
    pub fn new<L: Load>(candidates: &[L]) -> Self {
        let tree = (candidates.len() > SCAN_LIMIT).then(|| Arc::new(LoadTree::new(candidates)));
        Self { tree }
    }

    /// The index, when the set is large enough to have one.
    pub fn tree(&self) -> Option<&Arc<LoadTree>> {
        self.tree.as_ref()
    }
}

impl Strategy for LeastConn {
    fn pick<L: Load>(&self, candidates: &[L]) -> Option<usize> {
        match &self.tree {
            Some(tree) => tree.winner(),
            None => scan(candidates),
        }
    }
}

/// Whether load `a` over weight `aw` is below, equal to or above `b` over `bw`.
fn compare(a: u32, aw: u32, b: u32, bw: u32) -> std::cmp::Ordering {
    (u64::from(a) * u64::from(bw.max(1))).cmp(&(u64::from(b) * u64::from(aw.max(1))))
}

fn scan<L: Load>(candidates: &[L]) -> Option<usize> {
    let mut best: Option<(usize, u32, u32)> = None;
    let mut ties = 0usize;
    for (i, c) in candidates.iter().enumerate() {
        let (load, weight) = (c.in_flight().get(), c.weight());
        match best {
            None => {
                best = Some((i, load, weight));
                ties = 1;
            }
            Some((_, bl, bw)) => match compare(load, weight, bl, bw) {
                std::cmp::Ordering::Less => {
                    best = Some((i, load, weight));
                    ties = 1;
                }
                std::cmp::Ordering::Equal => {
                    ties += 1;
                    // Reservoir sampling: each of the k tied candidates wins with 1/k.
                    if fastrand::usize(..ties) == 0 {
                        best = Some((i, load, weight));
                    }
                }
                std::cmp::Ordering::Greater => {}
            },
        }
    }
    best.map(|(i, _, _)| i)
}

/// A tournament tree over the candidates' in-flight counters.
///
/// Node `1` is the root, node `i` has children `2i` and `2i + 1`, and leaves sit
/// at `cap + index`. Every node stores the index of the least-loaded leaf below it.
///
/// The matches read a copy of each leaf's count kept next to the weights, not
/// the endpoints' own counters: at 1,024 endpoints those are 1,024 separate
/// allocations, and the 20 reads of an update's climb were 20 cache misses
/// (the 1.97 us routed least_conn checkout in BENCHMARKS.md's scale section).
/// Only the leaf that changed reads its counter.
pub struct LoadTree {
    leaves: Vec<Arc<InFlight>>,
    /// Each leaf's count as of its last update, and its weight.
    loads: Vec<AtomicU32>,
    weights: Vec<u32>,
    nodes: Vec<AtomicU32>,
    cap: usize,
    update: Mutex<()>,
}

impl LoadTree {
    /// Builds the tree over `candidates`' current loads.
    pub fn new<L: Load>(candidates: &[L]) -> Self {
        let cap = candidates.len().next_power_of_two().max(1);
        let nodes = (0..2 * cap)
            .map(|i| {
                let leaf = i.checked_sub(cap).filter(|l| *l < candidates.len());
                AtomicU32::new(leaf.and_then(|l| u32::try_from(l).ok()).unwrap_or(NONE))
            })
            .collect();
        let tree = Self {
            leaves: candidates
                .iter()
                .map(|c| Arc::clone(c.in_flight()))
                .collect(),
            loads: candidates
                .iter()
                .map(|c| AtomicU32::new(c.in_flight().get()))
                .collect(),
            weights: candidates.iter().map(Load::weight).collect(),
            nodes,
            cap,
            update: Mutex::new(()),
        };
        tree.refresh();
        tree
    }

    /// The least-loaded leaf.
    pub fn winner(&self) -> Option<usize> {
        match self.nodes.get(1).map(|n| n.load(Ordering::Acquire)) {
            Some(NONE) | None => None,
            Some(w) => Some(w as usize),
        }
    }

    /// Replays the matches from `leaf` up to the root after its load changed.
    ///
    /// The climb stops at the first match whose winner is neither changed nor
    /// `leaf`: every match above it saw the same winner at the same load. So a
    /// release (the load going down) usually replays one or two matches, and
    /// only a checkout of the current winner climbs to the root.
    pub fn update(&self, leaf: usize) {
        let _serial = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.copy_load(leaf) {
            return;
        }
        let leaf_index = u32::try_from(leaf).unwrap_or(NONE);
        let mut node = (self.cap + leaf) / 2;
        while node >= 1 {
            let (before, after) = self.replay(node);
            if before == after && after != leaf_index {
                break;
            }
            node /= 2;
        }
    }

    /// Replays every match, e.g. after the tree was linked to live counters.
    pub fn refresh(&self) {
        let _serial = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        for leaf in 0..self.leaves.len() {
            self.copy_load(leaf);
        }
        for node in (1..self.cap).rev() {
            self.replay(node);
        }
    }

    /// Replays the match at `node`: its winner before and after.
    fn replay(&self, node: usize) -> (u32, u32) {
        let (Some(left), Some(right), Some(slot)) = (
            self.nodes.get(2 * node),
            self.nodes.get(2 * node + 1),
            self.nodes.get(node),
        ) else {
            return (NONE, NONE);
        };
        let (a, b) = (left.load(Ordering::Acquire), right.load(Ordering::Acquire));
        let winner = match (self.load_of(a), self.load_of(b)) {
            (None, _) => b,
            (_, None) => a,
            (Some((la, wa)), Some((lb, wb))) => match compare(la, wa, lb, wb) {
                std::cmp::Ordering::Less => a,
                std::cmp::Ordering::Greater => b,
                std::cmp::Ordering::Equal if fastrand::bool() => a,
                std::cmp::Ordering::Equal => b,
            },
        };
        // Only updates write the nodes, one at a time (the mutex).
        let before = slot.load(Ordering::Relaxed);
        if before != winner {
            slot.store(winner, Ordering::Release);
        }
        (before, winner)
    }

    /// Copies `leaf`'s counter into the tree; false when it did not change
    /// (another update already saw this value).
    fn copy_load(&self, leaf: usize) -> bool {
        match (self.leaves.get(leaf), self.loads.get(leaf)) {
            (Some(count), Some(copy)) => {
                let now = count.get();
                let changed = copy.load(Ordering::Relaxed) != now;
                copy.store(now, Ordering::Relaxed);
                changed
            }
            _ => false,
        }
    }

    fn load_of(&self, leaf: u32) -> Option<(u32, u32)> {
        let leaf = leaf as usize;
        let load = self.loads.get(leaf)?.load(Ordering::Relaxed);
        Some((load, *self.weights.get(leaf)?))
    }
}

impl fmt::Debug for LoadTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadTree")
            .field("leaves", &self.leaves.len())
            .field("winner", &self.winner())
            .finish()
    }
}

/// The trees an endpoint's load is a leaf of: the [`InFlightWatcher`] that keeps
/// them current.
///
/// The cluster relinks every endpoint when it builds a snapshot and then
/// [`refresh`](LoadTree::refresh)es the new trees, so a change that raced the
/// relinking is still seen.
#[derive(Default)]
pub struct LoadLinks {
    trees: ArcSwap<Vec<(Arc<LoadTree>, usize)>>,
    /// Whether `trees` is non-empty: the endpoints of a cluster that keeps no
    /// tree (every strategy but least connections over more than
    /// [`SCAN_LIMIT`] candidates) pay one relaxed load per change, not an
    /// `ArcSwap` load.
    linked: AtomicBool,
}

impl LoadLinks {
    /// Replaces the trees this endpoint is a leaf of, with its leaf index in each.
    ///
    /// A change that races this call may miss the new trees; the caller
    /// refreshes them after relinking.
    pub fn set(&self, trees: Vec<(Arc<LoadTree>, usize)>) {
        let linked = !trees.is_empty();
        self.trees.store(Arc::new(trees));
        self.linked.store(linked, Ordering::Release);
    }
}

impl InFlightWatcher for LoadLinks {
    fn changed(&self) {
        if !self.linked.load(Ordering::Acquire) {
            return;
        }
        let trees = self.trees.load();
        for (tree, leaf) in trees.iter() {
            tree.update(*leaf);
        }
    }
}

impl fmt::Debug for LoadLinks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadLinks")
            .field("trees", &self.trees.load().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::{loads, FakeLoad};

    fn link(cands: &[FakeLoad], lc: &LeastConn) {
        if let Some(tree) = lc.tree() {
            for (i, c) in cands.iter().enumerate() {
                c.links.set(vec![(Arc::clone(tree), i)]);
            }
            tree.refresh();
        }
    }

    /// Picks `picks` times, holding every checkout, and checks each pick against
    /// the loads it saw.
    fn never_busier(weights: &[u32], picks: usize) -> Vec<u32> {
        fastrand::seed(7);
        let cands = loads(weights);
        let lc = LeastConn::new(&cands);
        link(&cands, &lc);
        let mut held = Vec::new();
        for _ in 0..picks {
            let i = lc.pick(&cands).unwrap();
            let mine = (cands[i].in_flight.get(), cands[i].weight);
            for c in &cands {
                let other = (c.in_flight.get(), c.weight);
                assert_ne!(
                    compare(other.0, other.1, mine.0, mine.1),
                    std::cmp::Ordering::Less,
                    "picked {i} at {mine:?} while a candidate was at {other:?}"
                );
            }
            held.push(cands[i].in_flight.enter());
            // Release one in five at random, so loads go down as well as up.
            if fastrand::u8(..5) == 0 && !held.is_empty() {
                held.swap_remove(fastrand::usize(..held.len()));
            }
        }
        cands.iter().map(|c| c.in_flight.get()).collect()
    }

    #[test]
    fn small_sets_never_pick_a_busier_endpoint() {
        let finals = never_busier(&[1, 2, 5], 4000);
        // Weighted by 1:2:5, the held loads stay within one unit of proportion.
        let total: u32 = finals.iter().sum();
        for (load, w) in finals.iter().zip([1u32, 2, 5]) {
            let fair = f64::from(total) * f64::from(w) / 8.0;
            assert!(
                (f64::from(*load) - fair).abs() <= f64::from(w),
                "{finals:?}"
            );
        }
    }

    #[test]
    fn large_sets_use_the_tree_and_never_pick_a_busier_endpoint() {
        let weights: Vec<u32> = (0..100).map(|i| 1 + i % 3).collect();
        let cands = loads(&weights);
        assert!(LeastConn::new(&cands).tree().is_some());
        never_busier(&weights, 5000);
    }

    #[test]
    fn ties_are_broken_at_random() {
        fastrand::seed(11);
        let cands = loads(&[1, 1, 1, 1]);
        let lc = LeastConn::new(&cands);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[lc.pick(&cands).unwrap()] += 1;
        }
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn the_tree_follows_releases() {
        let cands = loads(&[1; 40]);
        let lc = LeastConn::new(&cands);
        link(&cands, &lc);
        let held: Vec<_> = cands.iter().map(|c| c.in_flight.enter()).collect();
        let mut held: Vec<_> = held.into_iter().map(Some).collect();
        held[17] = None;
        assert_eq!(lc.pick(&cands), Some(17));
        held[3] = None;
        let _again = cands[17].in_flight.enter();
        assert_eq!(lc.pick(&cands), Some(3));
        assert_eq!(
            LeastConn::new(&Vec::<FakeLoad>::new()).pick(&Vec::<FakeLoad>::new()),
            None
        );
    }
}
