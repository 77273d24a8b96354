//! Unit tests of endpoint health: probes, lag bounds, unsynced and demoted replicas.

use super::*;

fn who() -> (String, EndpointId) {
    ("c".into(), EndpointId::new("e"))
}

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
    let (c, e) = who();
    let who = Who {
        cluster: &c,
        endpoint: &e,
    };
    let cfg = HealthConfig {
        fall: 3,
        rise: 2,
        ..HealthConfig::default()
    };
    let now = Instant::now();
    let mut h = HealthState::new(Role::Replica, now);
    let ok = || Probe::new(Role::Replica, Duration::from_millis(1));
    h.probe_failed(&refused(), &cfg, &who, now);
    h.probe_failed(&refused(), &cfg, &who, now);
    h.probe_passed(ok(), &cfg, &who, now);
    h.probe_failed(&refused(), &cfg, &who, now);
    h.probe_failed(&refused(), &cfg, &who, now);
    assert_eq!(h.health(), Health::Up, "a pass in between resets the count");
    h.probe_failed(&refused(), &cfg, &who, now);
    assert_eq!(h.health(), Health::Down);
    assert!(h
        .last_error
        .as_deref()
        .unwrap()
        .contains("connect error on e"));
    h.probe_passed(ok(), &cfg, &who, now);
    assert_eq!(h.health(), Health::Down);
    h.probe_passed(ok(), &cfg, &who, now);
    assert_eq!(h.health(), Health::Up);
    assert_eq!(h.last_error, None);
}

#[test]
fn probes_teach_role_lag_and_history() {
    let (c, e) = who();
    let who = Who {
        cluster: &c,
        endpoint: &e,
    };
    let cfg = HealthConfig {
        max_replica_lag: Some(Duration::from_secs(5)),
        ..HealthConfig::default()
    };
    let now = Instant::now();
    let mut h = HealthState::new(Role::Primary, now);
    let before = h.routing_key(&cfg, now);
    let mut p = Probe::new(Role::Replica, Duration::ZERO);
    p.lag = Some(Duration::from_secs(9));
    h.probe_passed(p, &cfg, &who, now);
    assert_eq!(h.role, Role::Replica);
    assert!(!h.lag_ok(&cfg, now));
    assert_ne!(before, h.routing_key(&cfg, now));
    let mut p = Probe::new(Role::Primary, Duration::ZERO);
    p.history = Some(History::Timeline {
        system: 1,
        timeline: 2,
        position: 10,
    });
    h.probe_passed(p.clone(), &cfg, &who, now);
    assert!(h.lag_ok(&cfg, now));
    let key = h.routing_key(&cfg, now);
    p.history = Some(History::Timeline {
        system: 1,
        timeline: 2,
        position: 99,
    });
    h.probe_passed(p.clone(), &cfg, &who, now);
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
    h.probe_passed(p, &cfg, &who, now);
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
    let (c, e) = who();
    let who = Who {
        cluster: &c,
        endpoint: &e,
    };
    let s = Duration::from_secs;
    let mut cfg = HealthConfig {
        max_replica_lag: Some(s(5)),
        ..HealthConfig::default()
    };
    let t0 = Instant::now();
    let mut h = HealthState::new(Role::Replica, t0);
    h.probe_passed(replica(true, Some(s(1))), &cfg, &who, t0);
    assert!(h.lag_ok(&cfg, t0));
    // Cut off at t0 + 1s: the lag it reports (PostgreSQL: none, since
    // nothing received is unreplayed) says nothing about the primary.
    h.probe_passed(replica(false, None), &cfg, &who, t0 + s(1));
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
    h.probe_passed(replica(true, Some(Duration::ZERO)), &cfg, &who, t0 + s(60));
    assert!(h.lag_ok(&cfg, t0 + s(60)), "streaming again");
}

#[test]
fn a_replica_never_seen_streaming_has_unknown_lag() {
    let (c, e) = who();
    let who = Who {
        cluster: &c,
        endpoint: &e,
    };
    let cfg = HealthConfig {
        max_replica_lag: Some(Duration::from_secs(5)),
        ..HealthConfig::default()
    };
    let t0 = Instant::now();
    let mut orphan = HealthState::new(Role::Replica, t0);
    orphan.probe_passed(replica(false, None), &cfg, &who, t0);
    assert!(
        !orphan.lag_ok(&cfg, t0),
        "an orphaned standby from the start"
    );
    // A Redis replica says how long its link has been down.
    let mut linkless = HealthState::new(Role::Replica, t0);
    linkless.probe_passed(replica(false, Some(Duration::from_secs(2))), &cfg, &who, t0);
    assert!(linkless.lag_ok(&cfg, t0));
    linkless.probe_passed(replica(false, Some(Duration::from_secs(9))), &cfg, &who, t0);
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
    let (c, e) = who();
    let who = Who {
        cluster: &c,
        endpoint: &e,
    };
    let s = Duration::from_secs;
    let mut cfg = HealthConfig {
        max_replica_lag: None,
        ..HealthConfig::default()
    };
    let mut h = HealthState::new(Role::Replica, Instant::now());
    h.probe_passed(
        probe(Role::Replica, Some(true), None, false),
        &cfg,
        &who,
        Instant::now(),
    );
    assert!(h.lag_ok(&cfg, Instant::now()));
    tokio::time::advance(s(1)).await;
    // Restarted: the link was never up since (Redis reports the lag as
    // "never linked", and a full sync follows).
    h.probe_passed(
        probe(Role::Replica, Some(false), Some(s(1 << 32)), true),
        &cfg,
        &who,
        Instant::now(),
    );
    assert!(!h.lag_ok(&cfg, Instant::now()), "no limit, still no reads");
    cfg.max_replica_lag = Some(s(5));
    assert!(!h.lag_ok(&cfg, Instant::now()));
    tokio::time::advance(s(2)).await;
    // The resync: the link is down for 0 s, but the data set is being replaced.
    h.probe_passed(
        probe(Role::Replica, Some(false), Some(s(0)), true),
        &cfg,
        &who,
        Instant::now(),
    );
    assert!(!h.lag_ok(&cfg, Instant::now()));
    cfg.max_replica_lag = None;
    assert!(!h.lag_ok(&cfg, Instant::now()));
    tokio::time::advance(s(1)).await;
    h.probe_passed(
        probe(Role::Replica, Some(true), None, false),
        &cfg,
        &who,
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
    let (c, e) = who();
    let who = Who {
        cluster: &c,
        endpoint: &e,
    };
    let s = Duration::from_secs;
    let mut cfg = HealthConfig {
        max_replica_lag: Some(s(5)),
        ..HealthConfig::default()
    };
    let mut h = HealthState::new(Role::Primary, Instant::now());
    h.probe_passed(
        probe(Role::Primary, None, None, false),
        &cfg,
        &who,
        Instant::now(),
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    h.probe_passed(
        probe(Role::Replica, Some(false), Some(s(0)), false),
        &cfg,
        &who,
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
    h.probe_passed(
        probe(Role::Replica, Some(true), None, false),
        &cfg,
        &who,
        Instant::now(),
    );
    assert!(
        h.lag_ok(&cfg, Instant::now()),
        "streaming from its new primary"
    );
    tokio::time::advance(s(1)).await;
    // Cut off again: now the usual bound applies (seen streaming 1 s ago).
    h.probe_passed(
        probe(Role::Replica, Some(false), Some(s(0)), false),
        &cfg,
        &who,
        Instant::now(),
    );
    assert!(h.lag_ok(&cfg, Instant::now()));
    tokio::time::advance(s(5)).await;
    assert!(!h.lag_ok(&cfg, Instant::now()), "6 s since it streamed");
}
