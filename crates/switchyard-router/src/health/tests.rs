//! Unit tests of endpoint health: probes, lag bounds, unsynced and demoted replicas.

use super::*;
use switchyard_core::EndpointId;

fn refused() -> Error {
    Error::backend(
        &EndpointId::new("e"),
        None,
        switchyard_core::BackendErrorKind::Connect,
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    )
}

#[test]
fn fall_and_rise_count_consecutive_probes() {
    let cfg = HealthConfig {
        fall: 3,
        rise: 2,
        ..HealthConfig::default()
    };
    let now = Instant::now();
    let mut h = HealthState::new(Role::Replica, now);
    let ok = || Probe::new(Role::Replica, Duration::from_millis(1));
    h.on(Event::ProbeFailed(refused()), &cfg, now);
    h.on(Event::ProbeFailed(refused()), &cfg, now);
    h.on(Event::ProbePassed(ok()), &cfg, now);
    h.on(Event::ProbeFailed(refused()), &cfg, now);
    h.on(Event::ProbeFailed(refused()), &cfg, now);
    assert_eq!(h.health(), Health::Up, "a pass in between resets the count");
    h.on(Event::ProbeFailed(refused()), &cfg, now);
    assert_eq!(h.health(), Health::Down);
    assert!(h
        .last_error
        .as_deref()
        .unwrap()
        .contains("connect error on e"));
    h.on(Event::ProbePassed(ok()), &cfg, now);
    assert_eq!(h.health(), Health::Down);
    h.on(Event::ProbePassed(ok()), &cfg, now);
    assert_eq!(h.health(), Health::Up);
    assert_eq!(h.last_error, None);
}

#[test]
fn probes_teach_role_lag_and_history() {
    let cfg = HealthConfig {
        max_replica_lag: Some(Duration::from_secs(5)),
        ..HealthConfig::default()
    };
    let now = Instant::now();
    let mut h = HealthState::new(Role::Primary, now);
    let before = h.routing_key(&cfg, now);
    let mut p = Probe::new(Role::Replica, Duration::ZERO);
    p.lag = Some(Duration::from_secs(9));
    h.on(Event::ProbePassed(p), &cfg, now);
    assert_eq!(h.role, Role::Replica);
    assert!(!h.lag_ok(&cfg, now));
    assert_ne!(before, h.routing_key(&cfg, now));
    let mut p = Probe::new(Role::Primary, Duration::ZERO);
    p.history = Some(History::Timeline {
        system: 1,
        timeline: 2,
        position: 10,
    });
    h.on(Event::ProbePassed(p.clone()), &cfg, now);
    assert!(h.lag_ok(&cfg, now));
    let key = h.routing_key(&cfg, now);
    p.history = Some(History::Timeline {
        system: 1,
        timeline: 2,
        position: 99,
    });
    h.on(Event::ProbePassed(p.clone()), &cfg, now);
    assert_eq!(
        key,
        h.routing_key(&cfg, now),
        "a position alone changes no routing"
    );
    p.history = Some(History::Timeline {
        system: 1,
        timeline: 3,
        position: 0,
    });
    h.on(Event::ProbePassed(p), &cfg, now);
    assert_ne!(key, h.routing_key(&cfg, now), "a new timeline does");
}

fn replica(streaming: bool, lag: Option<Duration>) -> Probe {
    let mut p = Probe::new(Role::Replica, Duration::ZERO);
    p.streaming = Some(streaming);
    p.lag = lag;
    p
}

#[test]
fn a_replica_that_stops_streaming_serves_only_while_its_staleness_is_bounded() {
    let s = Duration::from_secs;
    let mut cfg = HealthConfig {
        max_replica_lag: Some(s(5)),
        ..HealthConfig::default()
    };
    let t0 = Instant::now();
    let mut h = HealthState::new(Role::Replica, t0);
    h.on(Event::ProbePassed(replica(true, Some(s(1)))), &cfg, t0);
    assert!(h.lag_ok(&cfg, t0));
    // Cut off at t0 + 1s: the lag it reports (PostgreSQL: none, since
    // nothing received is unreplayed) says nothing about the primary.
    h.on(Event::ProbePassed(replica(false, None)), &cfg, t0 + s(1));
    assert!(h.lag_ok(&cfg, t0 + s(4)), "1s behind at t0, +4s: within 5s");
    assert!(!h.lag_ok(&cfg, t0 + s(5)), "1s + 5s is over the limit");
    cfg.detached_grace = Some(s(2));
    assert!(h.lag_ok(&cfg, t0 + s(2)));
    assert!(!h.lag_ok(&cfg, t0 + s(3)), "the grace is shorter");
    cfg.max_replica_lag = None;
    assert!(
        h.lag_ok(&cfg, t0 + s(3600)),
        "no limit: any lag is accepted"
    );
    cfg.max_replica_lag = Some(s(5));
    h.on(
        Event::ProbePassed(replica(true, Some(Duration::ZERO))),
        &cfg,
        t0 + s(60),
    );
    assert!(h.lag_ok(&cfg, t0 + s(60)), "streaming again");
}

#[test]
fn a_replica_never_seen_streaming_has_unknown_lag() {
    let cfg = HealthConfig {
        max_replica_lag: Some(Duration::from_secs(5)),
        ..HealthConfig::default()
    };
    let t0 = Instant::now();
    let mut orphan = HealthState::new(Role::Replica, t0);
    orphan.on(Event::ProbePassed(replica(false, None)), &cfg, t0);
    assert!(
        !orphan.lag_ok(&cfg, t0),
        "an orphaned standby from the start"
    );
    // A Redis replica says how long its link has been down.
    let mut linkless = HealthState::new(Role::Replica, t0);
    linkless.on(
        Event::ProbePassed(replica(false, Some(Duration::from_secs(2)))),
        &cfg,
        t0,
    );
    assert!(linkless.lag_ok(&cfg, t0));
    linkless.on(
        Event::ProbePassed(replica(false, Some(Duration::from_secs(9)))),
        &cfg,
        t0,
    );
    assert!(!linkless.lag_ok(&cfg, t0));
}

fn probe(role: Role, streaming: Option<bool>, lag: Option<Duration>, unsynced: bool) -> Probe {
    let mut p = Probe::new(role, Duration::ZERO);
    p.streaming = streaming;
    p.lag = lag;
    p.unsynced = unsynced;
    p
}

/// A Redis node restarted empty, or a demoted master, while its first
/// sync runs: link down, data no copy of the master's. No reads, with or
/// without a lag limit, until a probe sees it synced and streaming.
#[tokio::test(start_paused = true)]
async fn an_unsynced_replica_serves_no_reads_even_without_a_lag_limit() {
    let s = Duration::from_secs;
    let mut cfg = HealthConfig {
        max_replica_lag: None,
        ..HealthConfig::default()
    };
    let mut h = HealthState::new(Role::Replica, Instant::now());
    h.on(
        Event::ProbePassed(probe(Role::Replica, Some(true), None, false)),
        &cfg,
        Instant::now(),
    );
    assert!(h.lag_ok(&cfg, Instant::now()));
    tokio::time::advance(s(1)).await;
    // Restarted: the link was never up since (Redis reports the lag as
    // "never linked", and a full sync follows).
    h.on(
        Event::ProbePassed(probe(Role::Replica, Some(false), Some(s(1 << 32)), true)),
        &cfg,
        Instant::now(),
    );
    assert!(!h.lag_ok(&cfg, Instant::now()), "no limit, still no reads");
    cfg.max_replica_lag = Some(s(5));
    assert!(!h.lag_ok(&cfg, Instant::now()));
    tokio::time::advance(s(2)).await;
    // The resync: the link is down for 0 s, but the data set is being replaced.
    h.on(
        Event::ProbePassed(probe(Role::Replica, Some(false), Some(s(0)), true)),
        &cfg,
        Instant::now(),
    );
    assert!(!h.lag_ok(&cfg, Instant::now()));
    cfg.max_replica_lag = None;
    assert!(!h.lag_ok(&cfg, Instant::now()));
    tokio::time::advance(s(1)).await;
    h.on(
        Event::ProbePassed(probe(Role::Replica, Some(true), None, false)),
        &cfg,
        Instant::now(),
    );
    assert!(h.lag_ok(&cfg, Instant::now()), "synced");
    cfg.max_replica_lag = Some(s(5));
    assert!(h.lag_ok(&cfg, Instant::now()));
}

/// A primary's probes are no evidence of a replica streaming: a demoted
/// primary whose link is down (the engine counting from the demotion)
/// holds its own writes, so it serves no freshness reads until a probe
/// sees it streaming from its new primary.
#[tokio::test(start_paused = true)]
async fn a_demoted_primary_serves_no_freshness_reads_before_it_streams() {
    let s = Duration::from_secs;
    let mut cfg = HealthConfig {
        max_replica_lag: Some(s(5)),
        ..HealthConfig::default()
    };
    let mut h = HealthState::new(Role::Primary, Instant::now());
    h.on(
        Event::ProbePassed(probe(Role::Primary, None, None, false)),
        &cfg,
        Instant::now(),
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    h.on(
        Event::ProbePassed(probe(Role::Replica, Some(false), Some(s(0)), false)),
        &cfg,
        Instant::now(),
    );
    assert_eq!(h.role, Role::Replica);
    assert!(
        !h.lag_ok(&cfg, Instant::now()),
        "last seen a primary 100 ms ago: not a replica streaming"
    );
    cfg.max_replica_lag = None;
    assert!(
        h.lag_ok(&cfg, Instant::now()),
        "no limit: stale data accepted"
    );
    cfg.max_replica_lag = Some(s(5));
    tokio::time::advance(s(1)).await;
    h.on(
        Event::ProbePassed(probe(Role::Replica, Some(true), None, false)),
        &cfg,
        Instant::now(),
    );
    assert!(
        h.lag_ok(&cfg, Instant::now()),
        "streaming from its new primary"
    );
    tokio::time::advance(s(1)).await;
    // Cut off again: now the usual bound applies (seen streaming 1 s ago).
    h.on(
        Event::ProbePassed(probe(Role::Replica, Some(false), Some(s(0)), false)),
        &cfg,
        Instant::now(),
    );
    assert!(h.lag_ok(&cfg, Instant::now()));
    tokio::time::advance(s(5)).await;
    assert!(!h.lag_ok(&cfg, Instant::now()), "6 s since it streamed");
}

/// A transition's changes and whether it reroutes; `None`: no transition.
type Expected = Option<(Vec<Change>, bool)>;

/// Every (state, event) -> transition of the health machine, with no runtime:
/// the changes the owner logs, whether routing must be rebuilt, and the
/// health after.
#[test]
fn transitions_table() {
    use Change::*;
    let s = Duration::from_secs;
    let cfg = HealthConfig {
        fall: 2,
        rise: 2,
        eject_base: s(1),
        eject_max: s(8),
        eject_jitter: false,
        ..HealthConfig::default()
    };
    let t0 = Instant::now();
    let failed = |refused: Option<&str>| Event::CheckoutFailed {
        reason: "boom".into(),
        refused: refused.map(Into::into),
    };
    let ejected = |secs, trial_failed| Ejected {
        backoff: s(secs),
        trial_failed,
        reason: "boom".into(),
    };
    let error = refused().to_string();
    let slow = Error::ProbeTimeout {
        endpoint: EndpointId::new("e"),
        elapsed: s(1),
    };
    // States, each reached through the machine itself.
    let after = |role: Role, events: Vec<(Event, Instant)>| {
        let mut h = HealthState::new(role, t0);
        for (event, at) in events {
            h.on(event, &cfg, at);
        }
        h
    };
    let up = || {
        after(
            Role::Replica,
            vec![(Event::ProbePassed(Probe::new(Role::Replica, s(0))), t0)],
        )
    };
    let ejected_at_t0 = || vec![(failed(None), t0)];
    let half_open = |taken: bool| {
        let mut events = ejected_at_t0();
        events.push((Event::BackoffOver, t0 + s(1)));
        if taken {
            events.push((Event::TrialClaimed, t0 + s(1)));
        }
        after(Role::Replica, events)
    };
    let fails = |n: usize| {
        let events = (0..n)
            .map(|_| (Event::ProbeFailed(refused()), t0))
            .collect();
        after(Role::Replica, events)
    };
    let down_then_pass = || {
        let mut h = fails(2);
        h.on(
            Event::ProbePassed(Probe::new(Role::Replica, s(0))),
            &cfg,
            t0,
        );
        h
    };
    let pass = |role| Event::ProbePassed(Probe::new(role, s(0)));
    #[rustfmt::skip]
    let rows: Vec<(&str, HealthState, Event, Instant, Expected, Health)> = vec![
        ("up, a failed checkout", up(), failed(None), t0, Some((vec![ejected(1, false)], true)), Health::Ejected),
        ("up, a failed checkout the cluster refuses", up(), failed(Some("cap")), t0, Some((vec![EjectionRefused { why: "cap".into(), reason: "boom".into() }], false)), Health::Up),
        ("ejected, another failure", after(Role::Replica, ejected_at_t0()), failed(None), t0, None, Health::Ejected),
        ("ejected, the timer before the backoff", after(Role::Replica, ejected_at_t0()), Event::BackoffOver, t0 + Duration::from_millis(999), None, Health::Ejected),
        ("ejected, the timer at the backoff", after(Role::Replica, ejected_at_t0()), Event::BackoffOver, t0 + s(1), Some((vec![HalfOpen], true)), Health::HalfOpen),
        ("ejected, a trial asked for", after(Role::Replica, ejected_at_t0()), Event::TrialClaimed, t0, None, Health::Ejected),
        ("half-open, a trial asked for", half_open(false), Event::TrialClaimed, t0 + s(1), Some((vec![TrialTaken], false)), Health::HalfOpen),
        ("half-open and taken, a second trial asked for", half_open(true), Event::TrialClaimed, t0 + s(1), None, Health::HalfOpen),
        ("half-open and taken, the trial abandoned", half_open(true), Event::TrialAbandoned, t0 + s(1), Some((vec![TrialReturned], false)), Health::HalfOpen),
        ("half-open, an abandon with no trial out", half_open(false), Event::TrialAbandoned, t0 + s(1), None, Health::HalfOpen),
        ("half-open, the trial passed", half_open(true), Event::TrialPassed, t0 + s(1), Some((vec![Readmitted], true)), Health::Up),
        ("half-open, the trial failed (no cap applies)", half_open(true), failed(Some("cap")), t0 + s(1), Some((vec![ejected(2, true)], true)), Health::Ejected),
        ("up, a stray trial verdict", up(), Event::TrialPassed, t0, None, Health::Up),
        ("never probed, a failed probe below fall", HealthState::new(Role::Replica, t0), Event::ProbeFailed(refused()), t0, Some((vec![ProbeFailed { fails: 1, error: error.clone() }], true)), Health::Up),
        ("one failed probe, the fall-th", fails(1), Event::ProbeFailed(refused()), t0, Some((vec![Down { fails: 2, error: error.clone() }], true)), Health::Down),
        ("down, one pass below rise", fails(2), pass(Role::Replica), t0, None, Health::Down),
        ("down, the rise-th pass", down_then_pass(), pass(Role::Replica), t0, Some((vec![Up { passes: 2 }], true)), Health::Up),
        ("a replica, probed primary", up(), pass(Role::Primary), t0, Some((vec![Promoted { from: Role::Replica }], true)), Health::Up),
        ("a primary, probed replica", after(Role::Primary, vec![(pass(Role::Primary), t0)]), pass(Role::Replica), t0, Some((vec![Demoted { to: Role::Replica }], true)), Health::Up),
        ("the only primary, a slow probe", after(Role::Primary, vec![(pass(Role::Primary), t0)]), Event::ProbeSlow(slow), t0, Some((vec![SlowOnlyPrimary { again: false, error: "probe of e timed out after 1s".into() }], false)), Health::Up),
    ];
    for (name, mut state, event, at, want, health) in rows {
        let got = state.on(event, &cfg, at).map(|t| (t.changes, t.reroute));
        assert_eq!(got, want, "{name}");
        assert_eq!(state.health(), health, "{name}: health after");
    }
}
