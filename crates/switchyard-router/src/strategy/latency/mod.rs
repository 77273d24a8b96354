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
//! O(1): one random draw split in two and two [`LoadCell`]s read, a cache
//! line each. The time matters only through the floor: the decay of two
//! estimates at one rate scales both costs alike. So when the estimates'
//! comparison and the loads' agree, that is the answer at any time, and the
//! pick converts no clock reading (see `b_cheaper_seen`). Otherwise the
//! costs are compared at the caller's clock reading, without an `exp`
//! unless they are close (within about `δ²/2` of each other, `δ` the decay
//! periods between the two estimates' last updates, or near the floor; see
//! `b_cheaper`), where the exact comparison takes two.
//!
//! The strategy is prepared per snapshot with the candidates' cells side by
//! side (O(n)): a pick reads each candidate's weight, load and estimate in
//! one line, instead of following endpoint -> state -> counter. At 1,024
//! endpoints no cache holds them all, and those dependent misses, one after
//! the other, cost more than the pick's arithmetic.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::{two_distinct, Load, LoadCell, Strategy};

/// The lowest latency a pick assumes, in nanoseconds.
const FLOOR_NS: f64 = 1_000.0;

/// Power of two choices over peak-EWMA cost, prepared for one candidate set.
#[derive(Debug)]
pub struct Latency {
    /// The candidates' cells, in their order.
    cells: Box<[Arc<LoadCell>]>,
}

impl Latency {
    /// The strategy for `candidates`: their cells side by side.
    pub fn new<L: Load>(candidates: &[L]) -> Self {
        Self {
            cells: candidates.iter().map(|c| Arc::clone(c.cell())).collect(),
        }
    }

    /// The cheaper of candidates `a` and `b` (their cells `ca`, `cb`) at
    /// `now`, `a` on a tie.
    fn cheaper((ca, cb): (&LoadCell, &LoadCell), (a, b): (usize, usize), now: Instant) -> usize {
        let (sa, sb) = (Seen::of(ca), Seen::of(cb));
        // Each cost divided by its weight: cross-multiplied.
        let (ma, mb) = (sa.load * sb.weight, sb.load * sa.weight);
        if b_cheaper_seen(sa, ma, sb, mb, || clock_ns(now)) {
            b
        } else {
            a
        }
    }
}

/// What a pick reads of one candidate's cell, each atomic once.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The estimate at its last update, in nanoseconds.
    raw: f64,
    /// [`clock_ns`] of that update.
    updated_ns: i64,
    /// Decay periods per nanosecond.
    rate: f64,
    /// In flight + 1.
    load: f64,
    weight: f64,
}

impl Seen {
    #[inline]
    fn of(cell: &LoadCell) -> Self {
        let ewma = cell.latency();
        Self {
            raw: ewma.raw(),
            updated_ns: ewma.updated_ns.load(Ordering::Acquire),
            rate: ewma.rate(),
            load: f64::from(cell.in_flight().get()) + 1.0,
            weight: f64::from(cell.weight()),
        }
    }

    /// The estimate at `now_ns`.
    #[inline]
    fn estimate(&self, now_ns: i64) -> Estimate {
        Estimate::new(self.raw, age(now_ns, self.updated_ns, self.rate))
    }
}

/// Decay periods from `updated_ns` to `now_ns`, at least 0.
#[inline]
fn age(now_ns: i64, updated_ns: i64, rate: f64) -> f64 {
    now_ns.saturating_sub(updated_ns).max(0) as f64 * rate
}

/// Whether `b`'s cost (estimate × `mb`) is below `a`'s (estimate × `ma`)
/// now, reading the time (`now_ns`) only when the answer depends on it.
///
/// With one decay rate for both, the time cancels out of the comparison of
/// the decayed estimates: `raw_b·e^-(t−u_b)/τ·mb < raw_a·e^-(t−u_a)/τ·ma`
/// is the same test at every `t`. Only the floor brings the time back in,
/// and it cannot change an answer the loads give too: when the estimates'
/// comparison and the loads' (`mb < ma`, what decides once both are
/// floored) agree, the floored costs agree with them at any time, so
/// neither the clock conversion nor the estimates' bounds are needed.
/// (Say `b` wins both. Both above the floor, or both on it, the two
/// comparisons are the answer. `a` floored alone: `est_b·mb < est_a·ma <
/// floor·ma`. `b` floored alone: `floor·mb < floor·ma ≤ est_a·ma`. The
/// same inequalities, not strict, give `a` when `a` wins both.) When they
/// disagree, or the rates differ (a reload mid-way), the costs are
/// compared at `now_ns`: by the estimates' comparison already made if both
/// are still above the floor, else as [`b_cheaper`] does.
#[inline]
fn b_cheaper_seen(a: Seen, ma: f64, b: Seen, mb: f64, now_ns: impl FnOnce() -> i64) -> bool {
    let by_estimate = if a.rate == b.rate {
        // `age_a − age_b`, whatever now is.
        let d = b.updated_ns.saturating_sub(a.updated_ns) as f64 * a.rate;
        let by_estimate = ratio_b_cheaper(a.raw * ma, b.raw * mb, d);
        if by_estimate == (mb < ma) {
            return by_estimate;
        }
        Some(by_estimate)
    } else {
        None
    };
    let now = now_ns();
    let (ea, eb) = (a.estimate(now), b.estimate(now));
    match by_estimate {
        // Both above the floor now: the estimates' comparison, already made.
        Some(answer) if ea.above_floor() && eb.above_floor() => answer,
        _ => b_cheaper(ea, ma, eb, mb),
    }
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
/// usual case), their ratio decides ([`ratio_b_cheaper`]), however old the
/// two estimates are. Near the floor, each estimate's bounds decide unless
/// the costs are close. Only then are the `exp`s taken.
#[inline]
fn b_cheaper(a: Estimate, ma: f64, b: Estimate, mb: f64) -> bool {
    if a.above_floor() && b.above_floor() {
        return ratio_b_cheaper(a.raw * ma, b.raw * mb, a.age - b.age);
    }
    if b.lower() * mb >= a.upper() * ma {
        return false;
    }
    if b.upper() * mb < a.lower() * ma {
        return true;
    }
    b.value() * mb < a.value() * ma
}

/// Whether `big_b · e^δ < big_a`: `b`'s decayed cost below `a`'s, with
/// `big_x = raw_x · m_x` and `δ = age_a − age_b`, floors aside.
///
/// `1 + δ ≤ e^δ ≤ 1 / (1 − δ)` (`δ < 1`) decides unless the costs are
/// within about `δ²/2` of each other; only then is `e^δ` taken.
#[inline]
fn ratio_b_cheaper(big_a: f64, big_b: f64, d: f64) -> bool {
    if big_b * (1.0 + d) >= big_a {
        return false;
    }
    if d < 1.0 && big_b < big_a * (1.0 - d) {
        return true;
    }
    big_b * d.exp() < big_a
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
                let cells: (&LoadCell, &LoadCell) = match (self.cells.get(a), self.cells.get(b)) {
                    (Some(ca), Some(cb)) if self.cells.len() == n => (ca, cb),
                    // Not the set the strategy was prepared for: the
                    // candidates' own cells.
                    _ => (candidates.get(a)?.cell(), candidates.get(b)?.cell()),
                };
                Some(Self::cheaper(cells, (a, b), now))
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
/// atomic too, so a configuration reload can change it in place. An
/// endpoint's estimate lives in its [`LoadCell`], which a [`Latency`]
/// strategy reads directly.
#[derive(Debug)]
pub struct PeakEwma {
    estimate: AtomicU64,
    /// [`clock_ns`] of the last update.
    updated_ns: AtomicI64,
    /// The decay rate, one over the time constant in nanoseconds, as `f64`
    /// bits (a multiplication where a division was).
    rate: AtomicU64,
}

impl PeakEwma {
    /// Decay periods since the last update, at least 0.
    #[inline]
    fn age(&self, now_ns: i64) -> f64 {
        age(now_ns, self.updated_ns.load(Ordering::Acquire), self.rate())
    }

    #[inline]
    fn raw(&self) -> f64 {
        f64::from_bits(self.estimate.load(Ordering::Acquire))
    }

    /// Decay periods per nanosecond.
    #[inline]
    fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }
}

fn rate(decay: Duration) -> u64 {
    (1.0 / nanos(decay).max(1.0)).to_bits()
}

impl PeakEwma {
    /// An estimate starting at `initial` that forgets with time constant `decay`.
    pub fn new(decay: Duration, initial: Duration) -> Self {
        Self {
            estimate: AtomicU64::new(nanos(initial).to_bits()),
            updated_ns: AtomicI64::new(clock_ns(Instant::now())),
            rate: AtomicU64::new(rate(decay)),
        }
    }

    /// Changes the time constant; the estimate so far is kept.
    pub fn set_decay(&self, decay: Duration) {
        self.rate.store(rate(decay), Ordering::Relaxed);
    }

    /// Records one latency sample.
    pub fn observe(&self, sample: Duration) {
        self.observe_at(sample, Instant::now());
    }

    /// Records one latency sample taken at `at` (a clock read the caller
    /// already made).
    #[inline]
    pub fn observe_at(&self, sample: Duration, at: Instant) {
        // A zero sample (a checkout that did not wait) is skipped: it never
        // raises the peak, and folding it in would only decay the estimate to
        // `at`, which every read does anyway (`e^-a/τ · e^-b/τ = e^-(a+b)/τ`),
        // so readers see the same value. What changes is the next non-zero
        // sample's weight, which then counts from the last wait instead of
        // the last checkout. It saves an `exp` and two atomics per checkout,
        // and the skip is inlined into the caller: no call at all.
        if !sample.is_zero() {
            self.fold(sample, at);
        }
    }

    /// Folds a non-zero sample in (see [`observe_at`](Self::observe_at)).
    fn fold(&self, sample: Duration, at: Instant) {
        let now = clock_ns(at);
        let sample = nanos(sample);
        let decay = (-self.age(now)).exp();
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
        self.raw() * (-self.age(clock_ns(now))).exp()
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
mod tests;
