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
//! | [`LeastConn`] | O(n) exact scan up to [`least_conn::SCAN_LIMIT`] candidates, O(1) above: two random candidates compared | the candidates' [`LoadCell`]s side by side, O(n) |
//! | [`WeightedRoundRobin`] | O(1): one atomic increment and an index | the interleaved cycle, O(W·k) for a cycle of W picks over k distinct weights |
//! | [`Latency`] | O(1): two random candidates compared | the candidates' [`LoadCell`]s side by side, O(n) |
//!
//! No pick takes a lock or allocates.

pub mod latency;
pub mod least_conn;
pub mod round_robin;
pub mod weighted_rr;

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::InFlight;
use tokio::time::Instant;

pub use latency::{Latency, PeakEwma};
pub use least_conn::LeastConn;
pub use round_robin::RoundRobin;
pub use weighted_rr::WeightedRoundRobin;

use crate::config::StrategyKind;

/// What every strategy reads of one endpoint: its weight, its checkouts in
/// flight and its latency estimate, in one cache line.
///
/// An endpoint owns its cell. A strategy prepared for a large candidate set
/// keeps the cells side by side ([`LeastConn`], [`Latency`]), so a sampled
/// pick reads one line per candidate instead of following endpoint, state
/// and counter, each a miss once no cache holds 1,024 endpoints; and the
/// candidate it picks has that line loaded for its checkout, which counts
/// itself in the same cell.
#[derive(Debug)]
#[repr(align(64))]
pub struct LoadCell {
    weight: AtomicU32,
    in_flight: InFlight,
    latency: PeakEwma,
}

impl LoadCell {
    /// A cell of weight `weight` (at least 1), nothing in flight, and a
    /// latency estimate starting at `initial` that forgets with time
    /// constant `decay`.
    pub fn new(weight: u32, decay: Duration, initial: Duration) -> Self {
        Self {
            weight: AtomicU32::new(weight.max(1)),
            in_flight: InFlight::new(),
            latency: PeakEwma::new(decay, initial),
        }
    }

    /// Relative share of traffic, at least 1.
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Changes the weight (at least 1); every pick reads it at once.
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// Checkouts in flight on the endpoint, waiting ones included.
    #[inline]
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// The endpoint's peak-EWMA latency estimate.
    #[inline]
    pub fn latency(&self) -> &PeakEwma {
        &self.latency
    }
}

/// What a strategy may read about one candidate: its [`LoadCell`].
pub trait Load {
    /// The candidate's weight, load and latency.
    fn cell(&self) -> &Arc<LoadCell>;
}

impl<L: Load + ?Sized> Load for Arc<L> {
    #[inline]
    fn cell(&self) -> &Arc<LoadCell> {
        (**self).cell()
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
                let weights: Vec<u32> = candidates.iter().map(|c| c.cell().weight()).collect();
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

    /// A candidate of its own: its cell and nothing else.
    #[derive(Debug)]
    pub struct FakeLoad(pub Arc<LoadCell>);

    impl FakeLoad {
        pub fn new(weight: u32) -> Self {
            Self(Arc::new(LoadCell::new(
                weight,
                Duration::from_secs(10),
                Duration::from_millis(1),
            )))
        }
    }

    impl std::ops::Deref for FakeLoad {
        type Target = LoadCell;

        fn deref(&self) -> &LoadCell {
            &self.0
        }
    }

    impl Load for FakeLoad {
        fn cell(&self) -> &Arc<LoadCell> {
            &self.0
        }
    }

    pub fn loads(weights: &[u32]) -> Vec<FakeLoad> {
        weights.iter().map(|&w| FakeLoad::new(w)).collect()
    }
}
