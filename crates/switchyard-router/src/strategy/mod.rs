//! Balancing strategies: which candidate endpoint serves the next checkout.
//!
//! Each strategy lives in its own module behind one small trait, [`Strategy`],
//! as tower keeps `p2c` apart from the load measures it consumes. A strategy is
//! built once per candidate set whenever the cluster's snapshot changes (health,
//! role, weights, topology), which is where any preparation cost goes; a pick
//! then reads the prepared state and the candidates' [`Load`] only.
//!
//! | strategy | pick cost | prepared per snapshot |
//! |---|---|---|
//! | [`RoundRobin`] | O(1): one atomic increment | nothing |
//! | [`LeastConn`] | O(n) exact scan up to [`least_conn::SCAN_LIMIT`] candidates, O(1) above: two random candidates compared | above the limit, the candidates' counters side by side, O(n) |
//! | [`WeightedRoundRobin`] | O(1): one atomic increment and an index | the interleaved cycle, O(W·k) for a cycle of W picks over k distinct weights |
//! | [`Latency`] | O(1): two random candidates compared | each candidate's counter and estimate side by side, O(n) |
//!
//! No pick takes a lock or allocates.

pub mod latency;
pub mod least_conn;
pub mod round_robin;
pub mod weighted_rr;

use std::fmt;
use std::sync::Arc;

use switchyard_core::InFlight;
use tokio::time::Instant;

pub use latency::{Latency, PeakEwma};
pub use least_conn::LeastConn;
pub use round_robin::RoundRobin;
pub use weighted_rr::WeightedRoundRobin;

use crate::config::StrategyKind;

/// What a strategy may read about one candidate: its load view.
pub trait Load {
    /// Relative share of traffic, at least 1.
    fn weight(&self) -> u32;
    /// Checkouts in flight on the endpoint, waiting ones included.
    fn in_flight(&self) -> &Arc<InFlight>;
    /// The endpoint's peak-EWMA latency estimate.
    fn latency(&self) -> &PeakEwma;
}

impl<L: Load + ?Sized> Load for Arc<L> {
    fn weight(&self) -> u32 {
        (**self).weight()
    }
    fn in_flight(&self) -> &Arc<InFlight> {
        (**self).in_flight()
    }
    fn latency(&self) -> &PeakEwma {
        (**self).latency()
    }
}

/// Picks one of a candidate set.
///
/// Implementations are built for one candidate set (the `new` of each module)
/// and must be cheap to call from many tasks at once: atomics and a thread-local
/// RNG, no lock, no allocation.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// The index of the candidate to use, `None` only when `candidates` is empty.
    ///
    /// `candidates` is the same slice the strategy was built for.
    fn pick<L: Load>(&self, candidates: &[L]) -> Option<usize>;

    /// [`pick`](Self::pick) at `now`, for a caller that has just read the
    /// clock: a strategy that needs the time (latency decay) reads no clock
    /// of its own.
    fn pick_at<L: Load>(&self, candidates: &[L], now: Instant) -> Option<usize> {
        let _ = now;
        self.pick(candidates)
    }
}

/// One of the built-in strategies, prepared for one candidate set.
#[derive(Debug)]
pub enum Picker {
    /// See [`RoundRobin`].
    RoundRobin(RoundRobin),
    /// See [`LeastConn`].
    LeastConn(LeastConn),
    /// See [`WeightedRoundRobin`].
    WeightedRoundRobin(WeightedRoundRobin),
    /// See [`Latency`].
    Latency(Latency),
}

impl Picker {
    /// Prepares `kind` for `candidates`.
    pub fn new<L: Load>(kind: StrategyKind, candidates: &[L]) -> Self {
        match kind {
            StrategyKind::RoundRobin => Picker::RoundRobin(RoundRobin::new()),
            StrategyKind::LeastConn => Picker::LeastConn(LeastConn::new(candidates)),
            StrategyKind::WeightedRoundRobin => {
                let weights: Vec<u32> = candidates.iter().map(Load::weight).collect();
                Picker::WeightedRoundRobin(WeightedRoundRobin::new(&weights))
            }
            StrategyKind::Latency => Picker::Latency(Latency::new(candidates)),
        }
    }
}

impl Strategy for Picker {
    fn pick<L: Load>(&self, candidates: &[L]) -> Option<usize> {
        match self {
            Picker::RoundRobin(s) => s.pick(candidates),
            Picker::LeastConn(s) => s.pick(candidates),
            Picker::WeightedRoundRobin(s) => s.pick(candidates),
            Picker::Latency(s) => s.pick(candidates),
        }
    }

    fn pick_at<L: Load>(&self, candidates: &[L], now: Instant) -> Option<usize> {
        match self {
            Picker::Latency(s) => s.pick_at(candidates, now),
            _ => self.pick(candidates),
        }
    }
}

/// Two distinct indices below `n` (at least 2), uniformly at random: the draw
/// of the power of two choices.
///
/// One 64-bit draw, its halves scaled to `n` and `n - 1` by a multiply and a
/// shift (Lemire's reduction without the rejection step): each index's
/// probability is within `n / 2³²` of uniform (2.4·10⁻⁷ at 1,024
/// candidates), for one thread-local RNG access instead of two.
#[inline]
pub(crate) fn two_distinct(n: usize) -> (usize, usize) {
    let (a, mut b) = match u64::try_from(n) {
        Ok(n64) if n64 <= 1 << 32 => {
            let r = fastrand::u64(..);
            let scale = |half: u64, m: u64| ((half * m) >> 32) as usize;
            (scale(r & 0xffff_ffff, n64), scale(r >> 32, n64 - 1))
        }
        _ => (fastrand::usize(..n), fastrand::usize(..n - 1)),
    };
    if b >= a {
        b += 1;
    }
    (a, b)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A candidate with settable load, for the strategies' own tests.

    use super::*;

    #[derive(Debug)]
    pub struct FakeLoad {
        pub weight: u32,
        pub in_flight: Arc<InFlight>,
        pub ewma: PeakEwma,
    }

    impl FakeLoad {
        pub fn new(weight: u32) -> Self {
            Self {
                weight,
                in_flight: Arc::new(InFlight::new()),
                ewma: PeakEwma::new(
                    std::time::Duration::from_secs(10),
                    std::time::Duration::from_millis(1),
                ),
            }
        }
    }

    impl Load for FakeLoad {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn in_flight(&self) -> &Arc<InFlight> {
            &self.in_flight
        }
        fn latency(&self) -> &PeakEwma {
            &self.ewma
        }
    }

    pub fn loads(weights: &[u32]) -> Vec<FakeLoad> {
        weights.iter().map(|&w| FakeLoad::new(w)).collect()
    }
}
