//! Latency weighted: peak-EWMA latency times load, power of two choices.
//!
//! As tower's `PeakEwma` with `p2c` and Finagle's aperture balancer: each
//! endpoint keeps a [`PeakEwma`] of observed latency (the wait for a connection
//! and the time it was held, fed by the checkout observer). A pick draws two
//! distinct candidates at random and takes the one with the lower cost
//!
//! ```text
//! cost = max(latency estimate, 1 µs) × (in flight + 1) / weight
//! ```
//!
//! The estimate jumps to any sample above it (a node that turns slow is avoided
//! after one slow checkout) and otherwise decays towards recent samples. Read at
//! pick time it also decays towards zero while no sample arrives, so an endpoint
//! that was avoided is tried again after a few decay periods instead of being
//! starved forever; the 1 µs floor keeps the load in the cost when every
//! estimate has decayed that far.
//!
//! # Cost
//!
//! O(1): one random draw split in two, one clock conversion, and two
//! estimates read from atomics. The two costs are compared without an `exp`
//! unless they are close (within about `δ²/2` of each other, `δ` the decay
//! periods between the two estimates' last updates, or near the floor; see
//! `b_cheaper`), where the exact comparison takes two.
//!
//! The strategy is prepared per snapshot with each candidate's in-flight
//! counter and estimate side by side (O(n)): a pick reads them directly
//! while the two candidates' weights load through their endpoints (which
//! the checkout of the one picked reads next), instead of following
//! endpoint -> state -> counter for each. At 1,024 endpoints no cache holds
//! them all, and those dependent misses, one after the other, cost more
//! than the pick's arithmetic.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use switchyard_core::InFlight;
use tokio::time::Instant;

use super::{two_distinct, Load, Strategy};

/// The lowest latency a pick assumes, in nanoseconds.
const FLOOR_NS: f64 = 1_000.0;

/// Power of two choices over peak-EWMA cost, prepared for one candidate set.
#[derive(Debug)]
pub struct Latency {
    /// What a pick reads of each candidate, in the candidates' order.
    slots: Box<[Slot]>,
}

/// One candidate's in-flight counter and estimate, read without going
/// through its endpoint.
#[derive(Debug)]
struct Slot {
    in_flight: Arc<InFlight>,
    ewma: Arc<Ewma>,
}

impl Slot {
    fn of<L: Load>(c: &L) -> Self {
        Self {
            in_flight: Arc::clone(c.in_flight()),
            ewma: Arc::clone(&c.latency().0),
        }
    }

    /// The candidate's estimate at `now_ns`, and its load: in flight + 1.
    #[inline]
    fn read(&self, now_ns: i64) -> (Estimate, f64) {
        let load = f64::from(self.in_flight.get()) + 1.0;
        (self.ewma.read(now_ns), load)
    }
}

impl Latency {
    /// The strategy for `candidates`: their counters and estimates side by
    /// side.
    pub fn new<L: Load>(candidates: &[L]) -> Self {
        Self {
            slots: candidates.iter().map(Slot::of).collect(),
        }
    }

    /// The cheaper of candidates `a` and `b` (`ca`, `cb`, their slots `sa`,
    /// `sb`) at `now_ns`, `a` on a tie.
    ///
    /// The weights are read from the candidates themselves, first: the
    /// endpoint and its state, which the checkout of the one picked reads
    /// next, load while the slots' counters and estimates do, instead of
    /// after them.
    fn cheaper<L: Load>(
        cands: (&L, &L),
        slots: (&Slot, &Slot),
        ab: (usize, usize),
        now_ns: i64,
    ) -> usize {
        let (wa, wb) = (weight(cands.0), weight(cands.1));
        let ((ea, la), (eb, lb)) = (slots.0.read(now_ns), slots.1.read(now_ns));
        // Each cost divided by its weight: cross-multiplied.
        if b_cheaper(ea, la * wb, eb, lb * wa) {
            ab.1
        } else {
            ab.0
        }
    }
}

#[inline]
fn weight<L: Load>(c: &L) -> f64 {
    f64::from(c.weight().max(1))
}

/// An estimate read at pick time, `max(raw · e^-age, floor)`, with bounds
/// (`1 − age ≤ e^-age ≤ 1 − age + age²/2` for `age` ≥ 0) that decide most
/// comparisons before any `exp` is taken.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    raw: f64,
    age: f64,
    /// `raw · (1 − age)`: at most the decayed estimate, before the floor.
    low: f64,
    /// `raw · (1 − age + age²/2)`: at least the decayed estimate.
    high: f64,
}

impl Estimate {
    /// `raw` nanoseconds `age` decay periods ago (`age` ≥ 0).
    #[inline]
    fn new(raw: f64, age: f64) -> Self {
        let low = raw * (1.0 - age);
        Self {
            raw,
            age,
            low,
            high: low + raw * age * age * 0.5,
        }
    }

    /// The floored estimate is at least this.
    #[inline]
    fn lower(&self) -> f64 {
        self.low.max(FLOOR_NS)
    }

    /// The floored estimate is at most this.
    #[inline]
    fn upper(&self) -> f64 {
        self.high.max(FLOOR_NS)
    }

    /// Whether decay has certainly not brought it down to the floor: a lower
    /// bound of `raw · e^-age` is at least the floor, `raw · (1 − age)` or,
    /// for an old estimate, `raw · 2^-(⌊age·log₂e⌋ + 1)`.
    #[inline]
    fn above_floor(&self) -> bool {
        if self.low >= FLOOR_NS {
            return true;
        }
        // Saturating: a huge age gives a huge `k`, and no bound.
        let k = ((self.age * std::f64::consts::LOG2_E) as u64).saturating_add(1);
        k < 1023 && self.raw * f64::from_bits((1023 - k) << 52) >= FLOOR_NS
    }

    /// The floored estimate itself (an `exp`, unless the bounds meet).
    fn value(&self) -> f64 {
        if self.upper() <= FLOOR_NS {
            FLOOR_NS
        } else {
            (self.raw * (-self.age).exp()).max(FLOOR_NS)
        }
    }
}

/// Whether `b`'s cost (estimate × `mb`) is below `a`'s (estimate × `ma`).
///
/// The same answer as comparing `max(raw · e^-age, floor) × m` for both, but
/// with no `exp` unless the two costs are close. Both above the floor (the
/// usual case), their ratio decides: `b` is cheaper iff `B·e^δ < A`, with
/// `A = raw_a·ma`, `B = raw_b·mb` and `δ = age_a − age_b`, and
/// `1 + δ ≤ e^δ ≤ 1 / (1 − δ)` (`δ < 1`) decides unless the costs are within
/// about `δ²/2` of each other, however old the two estimates are. Near the
/// floor, each estimate's bounds decide unless the costs are close. Only
/// then are the `exp`s taken.
#[inline]
fn b_cheaper(a: Estimate, ma: f64, b: Estimate, mb: f64) -> bool {
    if a.above_floor() && b.above_floor() {
        let (big_a, big_b, d) = (a.raw * ma, b.raw * mb, a.age - b.age);
        if big_b * (1.0 + d) >= big_a {
            return false;
        }
        if d < 1.0 && big_b < big_a * (1.0 - d) {
            return true;
        }
        return big_b * d.exp() < big_a;
    }
    if b.lower() * mb >= a.upper() * ma {
        return false;
    }
    if b.upper() * mb < a.lower() * ma {
        return true;
    }
    b.value() * mb < a.value() * ma
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
                let now_ns = clock_ns(now);
                let cands = (candidates.get(a)?, candidates.get(b)?);
                if let (true, Some(sa), Some(sb)) =
                    (self.slots.len() == n, self.slots.get(a), self.slots.get(b))
                {
                    return Some(Self::cheaper(cands, (sa, sb), (a, b), now_ns));
                }
                // Not the set the strategy was prepared for: the candidates'
                // own counters and estimates.
                let slots = (&Slot::of(cands.0), &Slot::of(cands.1));
                Some(Self::cheaper(cands, slots, (a, b), now_ns))
            }
        }
    }
}

/// Signed nanoseconds from one anchor per process: every estimate's times
/// share it, so a pick converts its clock reading once. (Signed: under
/// tokio's paused clock in tests, a runtime's clock may start before the
/// anchor was taken.)
#[inline]
fn clock_ns(at: Instant) -> i64 {
    let anchor = anchor();
    let at = at.into_std();
    match at.checked_duration_since(anchor) {
        Some(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        None => i64::try_from(anchor.duration_since(at).as_nanos()).map_or(i64::MIN, |ns| -ns),
    }
}

#[inline]
fn anchor() -> std::time::Instant {
    static ANCHOR: OnceLock<std::time::Instant> = OnceLock::new();
    *ANCHOR.get_or_init(std::time::Instant::now)
}

/// A peak exponentially weighted moving average of latency, lock-free.
///
/// The estimate (nanoseconds, as `f64` bits) and the time of its last update are
/// two atomics; an update is a compare-and-swap loop on the estimate, so
/// concurrent samples are never lost, only ordered arbitrarily. The decay is an
/// atomic too, so a configuration reload can change it in place. The atomics
/// live in one shared cell, which a [`Latency`] strategy reads directly.
#[derive(Debug)]
pub struct PeakEwma(Arc<Ewma>);

/// The atomics of a [`PeakEwma`], 24 bytes aligned to 32 so that a pick
/// reads them in one cache line.
#[derive(Debug)]
#[repr(align(32))]
struct Ewma {
    estimate: AtomicU64,
    /// [`clock_ns`] of the last update.
    updated_ns: AtomicI64,
    /// The decay rate, one over the time constant in nanoseconds, as `f64`
    /// bits (a multiplication where a division was).
    rate: AtomicU64,
}

impl Ewma {
    /// Decay periods since the last update, at least 0.
    #[inline]
    fn age(&self, now_ns: i64) -> f64 {
        let elapsed = now_ns.saturating_sub(self.updated_ns.load(Ordering::Acquire));
        elapsed.max(0) as f64 * f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    #[inline]
    fn raw(&self) -> f64 {
        f64::from_bits(self.estimate.load(Ordering::Acquire))
    }

    fn estimate_ns(&self, now_ns: i64) -> f64 {
        self.raw() * (-self.age(now_ns)).exp()
    }

    #[inline]
    fn read(&self, now_ns: i64) -> Estimate {
        Estimate::new(self.raw(), self.age(now_ns))
    }
}

fn rate(decay: Duration) -> u64 {
    (1.0 / nanos(decay).max(1.0)).to_bits()
}

impl PeakEwma {
    /// An estimate starting at `initial` that forgets with time constant `decay`.
    pub fn new(decay: Duration, initial: Duration) -> Self {
        Self(Arc::new(Ewma {
            estimate: AtomicU64::new(nanos(initial).to_bits()),
            updated_ns: AtomicI64::new(clock_ns(Instant::now())),
            rate: AtomicU64::new(rate(decay)),
        }))
    }

    /// Changes the time constant; the estimate so far is kept.
    pub fn set_decay(&self, decay: Duration) {
        self.0.rate.store(rate(decay), Ordering::Relaxed);
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
        let cell = &*self.0;
        let now = clock_ns(at);
        let sample = nanos(sample);
        let decay = (-cell.age(now)).exp();
        let mut current = cell.estimate.load(Ordering::Acquire);
        loop {
            let old = f64::from_bits(current);
            let next = if sample > old {
                sample
            } else {
                old * decay + sample * (1.0 - decay)
            };
            match cell.estimate.compare_exchange_weak(
                current,
                next.to_bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        cell.updated_ns.fetch_max(now, Ordering::AcqRel);
    }

    /// The estimate in nanoseconds, decayed towards zero for the time since the
    /// last sample.
    pub fn estimate_ns(&self, now: Instant) -> f64 {
        self.0.estimate_ns(clock_ns(now))
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
        let latency = Latency::new(&cands);
        let pick_and_observe = |slow: Option<usize>| {
            let i = latency.pick(&cands).unwrap();
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
        let latency = Latency::new(&cands);
        assert_eq!(latency.pick(&cands), Some(0));
        // Keep 0 busy and let 1's estimate decay for a minute: 500ms·e^-6 ≈ 1.2ms,
        // below 0's estimate times its load.
        let _busy = cands[0].in_flight.enter();
        advance(Duration::from_secs(60)).await;
        cands[0].ewma.observe(MS);
        assert_eq!(latency.pick(&cands), Some(1));
    }

    #[test]
    fn the_clock_is_signed_nanoseconds_from_the_anchor() {
        let anchor = anchor();
        let second = Duration::from_secs(1);
        assert_eq!(clock_ns(Instant::from_std(anchor)), 0);
        assert_eq!(clock_ns(Instant::from_std(anchor + second)), 1_000_000_000);
        // Before the anchor (a paused clock started earlier): negative.
        if let Some(before) = anchor.checked_sub(second) {
            assert_eq!(clock_ns(Instant::from_std(before)), -1_000_000_000);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_cost_is_latency_times_load_over_weight() {
        fastrand::seed(7);
        // Equal estimates; the second has four times the weight.
        let cands = loads(&[1, 4]);
        let latency = Latency::new(&cands);
        let picks = |latency: &Latency| -> [u32; 2] {
            let mut counts = [0; 2];
            for _ in 0..200 {
                counts[latency.pick(&cands).unwrap()] += 1;
            }
            counts
        };
        // 1 × 1 / 1 against 1 × (2 + 1) / 4: the heavier one, though busier.
        let _busy = [cands[1].in_flight.enter(), cands[1].in_flight.enter()];
        assert_eq!(picks(&latency), [0, 200]);
        // Against (4 + 1) / 4: the lighter one.
        let _busier = [cands[1].in_flight.enter(), cands[1].in_flight.enter()];
        assert_eq!(picks(&latency), [200, 0]);
        // The weights are read at pick time: a candidate reweighted weighs
        // its new weight at once.
        let mut reweighted = loads(&[1, 8]);
        reweighted[1].in_flight = Arc::clone(&cands[1].in_flight);
        let mut counts = [0; 2];
        for _ in 0..200 {
            counts[latency.pick(&reweighted).unwrap()] += 1;
        }
        assert_eq!(counts, [0, 200], "1 against 5 / 8");
    }

    #[tokio::test(start_paused = true)]
    async fn load_decides_once_every_estimate_has_decayed_to_the_floor() {
        fastrand::seed(11);
        let cands = loads(&[1, 1]);
        cands[0].ewma.observe(MS);
        cands[1].ewma.observe(500 * MS);
        let _busy = cands[0].in_flight.enter();
        let latency = Latency::new(&cands);
        assert_eq!(latency.pick(&cands), Some(0), "1ms × 2 against 500ms × 1");
        // Ten minutes at a 10s time constant: both far below 1µs, so both
        // cost the floor times their load, and the idle one wins. (Without
        // the floor, 500ms·e⁻⁶⁰ would still lose to 2 × 1ms·e⁻⁶⁰.)
        advance(Duration::from_secs(600)).await;
        for _ in 0..20 {
            assert_eq!(latency.pick(&cands), Some(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_it_was_not_prepared_for_is_read_directly() {
        fastrand::seed(13);
        let cands = loads(&[1, 1, 1]);
        cands[2].ewma.observe(500 * MS);
        // Prepared for the first two only (or for none): the slow third
        // still loses every comparison it is drawn into.
        for latency in [Latency::new(&cands[..2]), Latency::new(&cands[..0])] {
            let mut counts = [0u32; 3];
            for _ in 0..300 {
                counts[latency.pick(&cands).unwrap()] += 1;
            }
            assert_eq!(counts[2], 0, "{counts:?}");
            assert!(counts[0] > 100 && counts[1] > 100, "{counts:?}");
        }
    }

    /// The cost the pick compares, computed directly (an `exp` each).
    fn direct_cost(raw: f64, age: f64, m: f64) -> f64 {
        (raw * (-age).exp()).max(FLOOR_NS) * m
    }

    fn picks_b(a: (f64, f64, f64), b: (f64, f64, f64)) -> bool {
        b_cheaper(Estimate::new(a.0, a.1), a.2, Estimate::new(b.0, b.1), b.2)
    }

    #[test]
    fn the_comparison_is_the_direct_one_without_its_exps() {
        fastrand::seed(17);
        let raw = || 10f64.powf(2.0 + 7.0 * fastrand::f64()); // 100 ns to 1 s
        let age = || fastrand::f64() * [0.5, 3.0, 15.0][fastrand::usize(..3)];
        let m = || f64::from(fastrand::u32(1..=8) * fastrand::u32(1..=4));
        let mut compared = 0;
        for _ in 0..200_000 {
            let (a, b) = ((raw(), age(), m()), (raw(), age(), m()));
            let (ca, cb) = (direct_cost(a.0, a.1, a.2), direct_cost(b.0, b.1, b.2));
            if (ca - cb).abs() <= 1e-12 * ca.max(cb) {
                continue; // a tie up to rounding: either answer
            }
            assert_eq!(picks_b(a, b), cb < ca, "{a:?} vs {b:?}: {ca} vs {cb}");
            compared += 1;
        }
        assert!(compared > 190_000, "{compared}");
        // Two old estimates updated about together (never since they were
        // made): their ratio decides.
        for (ya, yb) in [(6.0, 6.001), (6.001, 6.0), (14.0, 14.0)] {
            let (a, b) = ((3e7, ya, 3.0), (3e7, yb, 2.0));
            let want = direct_cost(b.0, b.1, b.2) < direct_cost(a.0, a.1, a.2);
            assert_eq!(picks_b(a, b), want, "{ya} {yb}");
        }
        // Equal estimates and loads: the one updated longer ago is cheaper.
        assert!(picks_b((1e6, 0.1, 1.0), (1e6, 0.3, 1.0)));
        assert!(!picks_b((1e6, 0.3, 1.0), (1e6, 0.1, 1.0)));
        // Close calls, where neither bound decides and `e^δ` is taken.
        for rel in [1e-6, -1e-6, 1e-12, -1e-12] {
            let (a, delta): (f64, f64) = (1e6, 0.2);
            let b = a * (-delta).exp() * (1.0 + rel);
            let want = direct_cost(b, 0.1, 1.0) < direct_cost(a, 0.1 + delta, 1.0);
            assert_eq!(want, rel < 0.0);
            assert_eq!(picks_b((a, 0.1 + delta, 1.0), (b, 0.1, 1.0)), want, "{rel}");
        }
    }

    #[test]
    fn an_estimate_s_bounds_hold_and_meet_at_the_floor() {
        for raw in [0.0f64, 500.0, 1_000.0, 1_500.0, 2_000.0, 1e6, 3e7] {
            for age in [0.0f64, 0.01, 0.2, 0.6, 1.0, 1.7, 5.0, 40.0] {
                let e = Estimate::new(raw, age);
                let exact = (raw * (-age).exp()).max(FLOOR_NS);
                assert!(e.lower() <= exact && exact <= e.upper(), "{raw} {age}");
                if e.above_floor() {
                    assert!(raw * (-age).exp() >= FLOOR_NS, "{raw} {age}");
                }
                assert!((e.value() - exact).abs() <= 1e-9 * exact, "{raw} {age}");
            }
        }
        // At or below the floor, or decayed to it: the floor, both bounds.
        assert_eq!(Estimate::new(500.0, 0.0).upper(), FLOOR_NS);
        assert_eq!(Estimate::new(1_500.0, 1.0).upper(), FLOOR_NS);
        assert!(Estimate::new(2_000.0, 0.6).above_floor(), "1.1 µs");
        assert!(!Estimate::new(2_000.0, 0.8).above_floor(), "0.9 µs");
        assert!(Estimate::new(1e6, 0.5).above_floor());
        // Old, but far above the floor still: 30 ms six periods ago is 74 µs.
        assert!(Estimate::new(3e7, 6.0).above_floor());
        // 1.36 µs ten periods on, but its bound (0.92 µs) cannot tell.
        assert!(!Estimate::new(3e7, 10.0).above_floor());
        assert!(!Estimate::new(3e7, 1e300).above_floor());
    }
}
