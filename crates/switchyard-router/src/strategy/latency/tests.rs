//! The latency strategy's tests: the estimate, the prepared pick, and the
//! exp-free comparison against the direct formula.

use super::*;
use crate::strategy::testing::loads;
use tokio::time::advance;

const MS: Duration = Duration::from_millis(1);

/// Two candidates of weight 1, the first estimated at 1ms, the second at
/// 500ms.
fn fast_and_slow() -> Vec<crate::strategy::testing::FakeLoad> {
    let cands = loads(&[1, 1]);
    cands[0].latency().observe(MS);
    cands[1].latency().observe(500 * MS);
    cands
}

/// How often each of `cands` is picked in `n` picks.
fn tally<L: Load>(latency: &Latency, cands: &[L], n: u32) -> Vec<u32> {
    let mut counts = vec![0; cands.len()];
    for _ in 0..n {
        counts[latency.pick(cands).unwrap()] += 1;
    }
    counts
}

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
        cands[i].latency().observe(rtt);
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
    let cands = fast_and_slow();
    let latency = Latency::new(&cands);
    assert_eq!(latency.pick(&cands), Some(0));
    // Keep 0 busy and let 1's estimate decay for a minute: 500ms·e^-6 ≈ 1.2ms,
    // below 0's estimate times its load.
    let _busy = cands[0].in_flight.enter();
    advance(Duration::from_secs(60)).await;
    cands[0].latency().observe(MS);
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
    // 1 × 1 / 1 against 1 × (2 + 1) / 4: the heavier one, though busier.
    let _busy = [cands[1].in_flight.enter(), cands[1].in_flight.enter()];
    assert_eq!(tally(&latency, &cands, 200), [0, 200]);
    // Against (4 + 1) / 4: the lighter one.
    let _busier = [cands[1].in_flight.enter(), cands[1].in_flight.enter()];
    assert_eq!(tally(&latency, &cands, 200), [200, 0]);
    // The weights are read at pick time: a candidate reweighted weighs
    // its new weight at once.
    cands[1].set_weight(8);
    assert_eq!(tally(&latency, &cands, 200), [0, 200], "1 against 5 / 8");
}

#[tokio::test(start_paused = true)]
async fn load_decides_once_every_estimate_has_decayed_to_the_floor() {
    fastrand::seed(11);
    let cands = fast_and_slow();
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
    cands[2].latency().observe(500 * MS);
    // Prepared for the first two only (or for none): the slow third
    // still loses every comparison it is drawn into.
    for latency in [Latency::new(&cands[..2]), Latency::new(&cands[..0])] {
        let counts = tally(&latency, &cands, 300);
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

/// A candidate as a pick reads it: estimate `raw` ns last updated at
/// `updated_ns`, `rate` decay periods per ns, load and weight.
fn seen(raw: f64, updated_ns: i64, rate: f64, load: f64, weight: f64) -> Seen {
    Seen {
        raw,
        updated_ns,
        rate,
        load,
        weight,
    }
}

/// The costs of `a` and `b` at `now_ns`, by the direct formula (each load
/// times the other's weight, as the pick cross-multiplies).
fn direct_costs(a: Seen, b: Seen, now_ns: i64) -> (f64, f64) {
    let cost = |x: Seen, m: f64| {
        let age = (now_ns - x.updated_ns).max(0) as f64 * x.rate;
        direct_cost(x.raw, age, m)
    };
    (cost(a, a.load * b.weight), cost(b, b.load * a.weight))
}

#[test]
fn a_pick_reads_the_time_only_when_the_floor_can_change_its_answer() {
    fastrand::seed(29);
    let rate = 1.0 / 10e9; // a 10 s time constant
    let raw = || 10f64.powf(2.0 + 7.0 * fastrand::f64()); // 100 ns to 1 s
    let updated = || fastrand::i64(0..60_000_000_000); // within a minute
    let load = || f64::from(fastrand::u32(1..=6));
    let weight = || f64::from(fastrand::u32(1..=3));
    let (mut without_clock, mut with_clock, mut compared) = (0, 0, 0);
    for _ in 0..100_000 {
        let rate_b = if fastrand::u8(..20) == 0 {
            rate * 2.0
        } else {
            rate
        };
        let a = seen(raw(), updated(), rate, load(), weight());
        let b = seen(raw(), updated(), rate_b, load(), weight());
        let (ma, mb) = (a.load * b.weight, b.load * a.weight);
        // Any time after both updates, up to twenty decay periods on,
        // where every estimate has reached the floor.
        let latest = a.updated_ns.max(b.updated_ns);
        let now = latest + (fastrand::f64() * 200e9) as i64;
        let mut read = false;
        let got = b_cheaper_seen(a, ma, b, mb, || {
            read = true;
            now
        });
        if read {
            with_clock += 1;
        } else {
            without_clock += 1;
        }
        // The answer the clock did not decide holds at every later time.
        for t in [latest, now, latest + 400_000_000_000] {
            let (ca, cb) = direct_costs(a, b, t);
            let close = (ca - cb).abs() <= 1e-9 * ca.max(cb);
            if close || (read && t != now) {
                continue; // a tie up to rounding, or a time it was not asked
            }
            assert_eq!(got, cb < ca, "{a:?} {b:?} at {t}");
            compared += 1;
        }
    }
    // Most random pairs agree (the cheaper estimate is the less loaded, or
    // the floor decides both ways alike); each kind is exercised.
    assert!(
        without_clock > 40_000 && with_clock > 10_000,
        "{without_clock} / {with_clock}"
    );
    assert!(compared > 150_000, "{compared}");
}

#[test]
fn equal_idle_candidates_are_picked_without_the_clock() {
    // What every idle cluster's pick sees: the same estimate, updated at
    // about the same time, nothing in flight. The weights decide.
    let rate = 1.0 / 10e9;
    let a = seen(1e6, 1_000, rate, 1.0, 1.0);
    let b = seen(1e6, 1_020, rate, 1.0, 2.0);
    let never = || -> i64 { panic!("the clock was read") };
    assert!(b_cheaper_seen(
        a,
        a.load * b.weight,
        b,
        b.load * a.weight,
        never
    ));
    assert!(!b_cheaper_seen(
        b,
        b.load * a.weight,
        a,
        a.load * b.weight,
        never
    ));
    // A faster estimate on the busier candidate: the time decides (the
    // floor would let the loads win), so the clock is read.
    let fast_busy = seen(2e3, 0, rate, 3.0, 1.0);
    let slow_idle = seen(1e6, 0, rate, 1.0, 1.0);
    let mut read = false;
    let early = b_cheaper_seen(slow_idle, 1.0, fast_busy, 3.0, || {
        read = true;
        0
    });
    assert!(read && early, "2 µs × 3 beats 1 ms × 1");
    // Seven periods on, 2 µs has decayed to the floor and 1 ms to 0.9 µs:
    // the loads decide.
    assert!(!b_cheaper_seen(slow_idle, 1.0, fast_busy, 3.0, || {
        70_000_000_000
    }));
}

#[test]
fn a_pick_without_the_clock_holds_at_the_extremes() {
    // A zero estimate (an initial latency of zero), estimates updated
    // thousands of decay periods apart (where `e^δ` overflows), and the
    // two at once: wherever the clock is not read, the answer is the
    // direct formula's at every later time.
    let rate = 1.0 / 10e9;
    let raws = [0.0, 500.0, 1e3, 1e6, 1e9];
    let updates = [0i64, 1, 10_000_000_000, 10_000_000_000_000, i64::MAX / 4];
    for (&ra, &rb) in raws.iter().flat_map(|a| raws.iter().map(move |b| (a, b))) {
        for (&ua, &ub) in updates
            .iter()
            .flat_map(|a| updates.iter().map(move |b| (a, b)))
        {
            for (la, lb) in [(1.0, 1.0), (1.0, 3.0), (3.0, 1.0)] {
                let a = seen(ra, ua, rate, la, 1.0);
                let b = seen(rb, ub, rate, lb, 1.0);
                let latest = ua.max(ub);
                let mut read = false;
                let got = b_cheaper_seen(a, la, b, lb, || {
                    read = true;
                    latest
                });
                let times: &[i64] = if read {
                    &[latest]
                } else {
                    &[latest, latest.saturating_add(400_000_000_000)]
                };
                for &t in times {
                    let (ca, cb) = direct_costs(a, b, t);
                    if (ca - cb).abs() <= 1e-9 * ca.max(cb) {
                        continue; // a tie: either answer
                    }
                    assert_eq!(got, cb < ca, "{a:?} {b:?} at {t}: {ca} vs {cb}");
                }
            }
        }
    }
}
