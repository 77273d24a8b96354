//! Latency weighted: peak-EWMA latency times load, power of two choices.
//!
//! As tower's `PeakEwma` with `p2c` and Finagle's aperture balancer: each
//! endpoint keeps a [`PeakEwma`] of observed latency (the wait for a connection
//! and the time it was held, fed by the checkout observer). A pick draws two
//! distinct candidates at random and takes the one with the lower cost
//!
//! ```text
//! cost = latency estimate × (in flight + 1) / weight
//! ```
//!
//! The estimate jumps to any sample above it (a node that turns slow is avoided
//! after one slow checkout) and otherwise decays towards recent samples. Read at
//! pick time it also decays towards zero while no sample arrives, so an endpoint
//! that was avoided is tried again after a few decay periods instead of being
//! starved forever.
//!
//! # Cost
//!
//! O(1): two random draws and two estimates read from atomics (one `exp` each).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{two_distinct, Load, Strategy};

/// Power of two choices over peak-EWMA cost.
#[derive(Debug, Default)]
pub struct Latency;

impl Latency {
    /// The strategy; it keeps no state of its own.
    pub fn new() -> Self {
        Self
    }
}

fn cost<L: Load>(c: &L, now: Instant) -> f64 {
    let load = f64::from(c.in_flight().get()) + 1.0;
    c.latency_ns(now) * load / f64::from(c.weight().max(1))
}

impl Strategy for Latency {
    fn pick<L: Load>(&self, candidates: &[L]) -> Option<usize> {
        self.pick_at(candidates, Instant::now())
    }

    fn pick_at<L: Load>(&self, candidates: &[L], now: Instant) -> Option<usize> {
        match candidates.len() {
            0 => None,
            1 => Some(0),
            n => {
                let (a, b) = two_distinct(n);
                let (ca, cb) = match (candidates.get(a), candidates.get(b)) {
                    (Some(x), Some(y)) => (cost(x, now), cost(y, now)),
                    _ => return Some(a),
                };
                Some(if cb < ca { b } else { a })
            }
        }
    }
}

/// A peak exponentially weighted moving average of latency, lock-free.
///
/// The estimate (nanoseconds, as `f64` bits) and the time of its last update are
/// two atomics; an update is a compare-and-swap loop on the estimate, so
/// concurrent samples are never lost, only ordered arbitrarily. The decay is an
/// atomic too, so a configuration reload can change it in place.
#[derive(Debug)]
pub struct PeakEwma {
    estimate: AtomicU64,
    updated_ns: AtomicU64,
    epoch: Instant,
    /// The time constant in nanoseconds, as `f64` bits.
    decay_ns: AtomicU64,
}

impl PeakEwma {
    /// An estimate starting at `initial` that forgets with time constant `decay`.
    pub fn new(decay: Duration, initial: Duration) -> Self {
        Self {
            estimate: AtomicU64::new(nanos(initial).to_bits()),
            updated_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            decay_ns: AtomicU64::new(nanos(decay).max(1.0).to_bits()),
        }
    }

    /// Changes the time constant; the estimate so far is kept.
    pub fn set_decay(&self, decay: Duration) {
        self.decay_ns
            .store(nanos(decay).max(1.0).to_bits(), Ordering::Relaxed);
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn decay_factor(&self, now_ns: u64) -> f64 {
        let elapsed = now_ns.saturating_sub(self.updated_ns.load(Ordering::Acquire));
        let decay_ns = f64::from_bits(self.decay_ns.load(Ordering::Relaxed));
        (-(elapsed as f64) / decay_ns).exp()
    }

    /// Records one latency sample.
    pub fn observe(&self, sample: Duration) {
        self.observe_at(sample, Instant::now());
    }

    /// Records one latency sample taken at `at` (a clock read the caller
    /// already made).
    pub fn observe_at(&self, sample: Duration, at: Instant) {
        // A zero sample (a checkout that did not wait) is skipped: it never
        // raises the peak, and folding it in would only decay the estimate to
        // `at`, which every read does anyway (`e^-a/τ · e^-b/τ = e^-(a+b)/τ`),
        // so readers see the same value. What changes is the next non-zero
        // sample's weight, which then counts from the last wait instead of
        // the last checkout. It saves an `exp` and two atomics per checkout.
        if sample.is_zero() {
            return;
        }
        let now = self.since_epoch(at);
        let sample = nanos(sample);
        let decay = self.decay_factor(now);
        let mut current = self.estimate.load(Ordering::Acquire);
        loop {
            let old = f64::from_bits(current);
            let next = if sample > old {
                sample
            } else {
                old * decay + sample * (1.0 - decay)
            };
            match self.estimate.compare_exchange_weak(
                current,
                next.to_bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        self.updated_ns.fetch_max(now, Ordering::AcqRel);
    }

    /// The estimate in nanoseconds, decayed towards zero for the time since the
    /// last sample.
    pub fn estimate_ns(&self, now: Instant) -> f64 {
        let raw = f64::from_bits(self.estimate.load(Ordering::Acquire));
        raw * self.decay_factor(self.since_epoch(now))
    }

    /// The estimate as a duration.
    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.estimate_ns(now) as u64)
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::loads;
    use tokio::time::advance;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn the_estimate_peaks_then_decays() {
        let e = PeakEwma::new(Duration::from_secs(10), MS);
        e.observe(100 * MS);
        assert_eq!(e.estimate(Instant::now()), 100 * MS);
        // A lower sample after one decay period keeps 1/e of the old estimate.
        advance(Duration::from_secs(10)).await;
        e.observe(MS);
        let want = 100.0 / std::f64::consts::E + (1.0 - 1.0 / std::f64::consts::E);
        let got = e.estimate_ns(Instant::now()) / 1e6;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Without samples, the read-time estimate falls towards zero.
        advance(Duration::from_secs(20)).await;
        let idle = e.estimate_ns(Instant::now()) / 1e6;
        assert!((idle - got * (-2.0f64).exp()).abs() < 1e-6, "{idle}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_decay_applies_to_the_estimate_in_place() {
        let e = PeakEwma::new(Duration::from_secs(10), MS);
        e.observe(100 * MS);
        e.set_decay(Duration::from_secs(1));
        advance(Duration::from_secs(1)).await;
        let got = e.estimate_ns(Instant::now()) / 1e6;
        let want = 100.0 / std::f64::consts::E;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_moves_away_from_an_endpoint_that_turns_slow() {
        fastrand::seed(3);
        let cands = loads(&[1, 1, 1, 1]);
        let pick_and_observe = |slow: Option<usize>| {
            let i = Latency.pick(&cands).unwrap();
            let rtt = if Some(i) == slow { 200 * MS } else { MS };
            cands[i].ewma.observe(rtt);
            i
        };
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            counts[pick_and_observe(None)] += 1;
            advance(MS).await;
        }
        assert!(
            counts.iter().all(|&c| c > 800),
            "balanced while equal: {counts:?}"
        );

        // Endpoint 2 turns slow: after the first slow checkout it loses every
        // comparison, so it sees at most one more pick in the next thousand.
        let mut slow_picks = 0;
        let mut learned_after = None;
        for n in 0..1000 {
            if pick_and_observe(Some(2)) == 2 {
                slow_picks += 1;
                learned_after.get_or_insert(n);
            }
            advance(MS).await;
        }
        let learned_after = learned_after.expect("the slow endpoint is drawn at some point");
        assert!(
            learned_after < 20,
            "first slow pick after {learned_after} picks"
        );
        assert_eq!(
            slow_picks, 1,
            "picks of the slow endpoint after it turned slow"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_slow_endpoint_is_retried_after_decay() {
        fastrand::seed(5);
        let cands = loads(&[1, 1]);
        cands[0].ewma.observe(MS);
        cands[1].ewma.observe(500 * MS);
        assert_eq!(Latency.pick(&cands), Some(0));
        // Keep 0 busy and let 1's estimate decay for a minute: 500ms·e^-6 ≈ 1.2ms,
        // below 0's estimate times its load.
        let _busy = cands[0].in_flight.enter();
        advance(Duration::from_secs(60)).await;
        cands[0].ewma.observe(MS);
        assert_eq!(Latency.pick(&cands), Some(1));
    }
}
