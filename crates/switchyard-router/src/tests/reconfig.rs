//! Live reconfiguration: `set_config`, `replace_endpoint`, `replace_backend`
//! and `close` while the cluster runs.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::noop::NoopBackend;
use switchyard_core::{EndpointId, Error, Intent, Role};
use tokio::time::Instant;

use super::*;
use crate::health::Health;
use crate::{ReadPreference, StrategyKind};

/// `config()` with other health settings.
fn with_health(interval_ms: u64, timeout_ms: u64, fall: u32) -> ClusterConfig {
    let mut c = config();
    c.health.interval = Duration::from_millis(interval_ms);
    c.health.timeout = Duration::from_millis(timeout_ms);
    c.health.fall = fall;
    c
}

#[tokio::test(start_paused = true)]
async fn a_new_health_interval_changes_the_probe_rate_at_once() {
    let (cluster, b) = cluster(0, config()).await;
    assert_eq!(b[0].counters().probes, 1, "probed at build");
    run_for(Duration::from_secs(10)).await;
    assert_eq!(b[0].counters().probes, 11, "one a second");

    // Faster: the probe already scheduled (a second after the last) moves to
    // 200 ms after the last.
    run_for(Duration::from_millis(500)).await;
    cluster.set_config(with_health(200, 100, 2)).unwrap();
    settle().await;
    assert_eq!(
        b[0].counters().probes,
        12,
        "500 ms since the last probe: due at once"
    );
    run_for(Duration::from_secs(10)).await;
    assert_eq!(b[0].counters().probes, 62, "five a second");
    assert_eq!(cluster.config().health.interval, Duration::from_millis(200));

    // Slower: nothing until five seconds after the last probe.
    cluster.set_config(with_health(5000, 500, 2)).unwrap();
    run_for(Duration::from_millis(4900)).await;
    assert_eq!(b[0].counters().probes, 62);
    run_for(Duration::from_millis(200)).await;
    assert_eq!(b[0].counters().probes, 63);
}

#[tokio::test(start_paused = true)]
async fn a_new_fall_changes_when_an_endpoint_goes_down() {
    let (cluster, b) = cluster(1, config()).await;
    cluster.set_config(with_health(1000, 500, 4)).unwrap();
    b[1].set_down(true);
    for n in 1..=3 {
        run_for(Duration::from_secs(1)).await;
        assert_eq!(
            status_of(&cluster, "r1").health,
            Health::Up,
            "after {n} failures, fall 4 (it was 2)"
        );
    }
    run_for(Duration::from_secs(1)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::Down);

    // Back up, then down again with fall 1: the first failure is enough.
    b[1].set_down(false);
    run_for(Duration::from_secs(2)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::Up);
    cluster.set_config(with_health(1000, 500, 1)).unwrap();
    b[1].set_down(true);
    run_for(Duration::from_secs(1)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::Down);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_config_is_rejected_with_every_problem_and_the_old_one_stays() {
    let (cluster, b) = cluster(1, config()).await;
    let before = cluster.config();
    let mut bad = config();
    bad.health.fall = 0;
    bad.health.timeout = Duration::ZERO;
    bad.retry.max_attempts = 0;
    bad.failover_timeout = Duration::from_secs(60);
    bad.strategy = StrategyKind::RoundRobin;
    let err = cluster.set_config(bad).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    for path in [
        "clusters.test.health.fall: ",
        "clusters.test.health.timeout: ",
        "clusters.test.retry.max_attempts: ",
        "clusters.test.failover_timeout: ",
    ] {
        assert!(text.contains(path), "{path} missing in {text}");
    }
    assert_eq!(cluster.config(), before);
    assert_eq!(cluster.status().strategy, StrategyKind::LeastConn);
    let probes = b[1].counters().probes;
    run_for(Duration::from_secs(3)).await;
    assert_eq!(
        b[1].counters().probes,
        probes + 3,
        "still one probe a second"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_checkout_timeout_applies_to_the_next_checkout() {
    let (cluster, b) = cluster(0, config()).await;
    b[0].set_acquire_delay(Duration::from_secs(60));
    let started = Instant::now();
    let err = cluster.checkout(Intent::Write, None).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(5));

    // One starts under the old timeout; the change comes while it waits.
    let in_flight = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = cluster.checkout(Intent::Write, None).await;
            (result.is_err(), started.elapsed())
        })
    };
    settle().await;
    let mut c = config();
    c.checkout_timeout = Duration::from_secs(2);
    c.failover_timeout = Duration::from_secs(1);
    cluster.set_config(c).unwrap();
    let started = Instant::now();
    let err = cluster.checkout(Intent::Write, None).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(2), "the new timeout");
    assert_eq!(
        in_flight.await.unwrap(),
        (true, Duration::from_secs(5)),
        "a checkout under way keeps its deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn read_preference_and_strategy_change_with_the_config() {
    let (cluster, _) = cluster(1, config()).await;
    assert_eq!(served_by(&cluster, Intent::Read, 10).await, ["r1"]);
    let mut c = config();
    c.read_preference = ReadPreference::Any;
    c.strategy = StrategyKind::RoundRobin;
    cluster.set_config(c).unwrap();
    let reads = tally(&cluster, Intent::Read, 10).await;
    assert_eq!((reads["p"], reads["r1"]), (5, 5));
    let status = cluster.status();
    assert_eq!(status.strategy, StrategyKind::RoundRobin);
    assert_eq!(status.read_preference, ReadPreference::Any);
    // set_strategy updates the configuration in force too.
    cluster.set_strategy(StrategyKind::Latency);
    assert_eq!(cluster.config().strategy, StrategyKind::Latency);
    assert_eq!(cluster.config().read_preference, ReadPreference::Any);
}

#[tokio::test(start_paused = true)]
async fn warming_turned_on_and_off_live_starts_and_stops_the_warmers() {
    let (cluster, b) = cluster(0, config()).await;
    run_for(Duration::from_secs(3)).await;
    assert_eq!(b[0].counters().acquired, 0, "warming is off by default");

    let mut c = config();
    c.warming.enabled = true;
    c.warming.min_idle = 2;
    c.warming.interval = Duration::from_secs(1);
    cluster.set_config(c.clone()).unwrap();
    settle().await;
    // NoopBackend keeps no idle connections, so every step opens two.
    assert_eq!(b[0].counters().acquired, 2, "the first step runs at once");
    run_for(Duration::from_secs(3)).await;
    assert_eq!(b[0].counters().acquired, 8);
    // Other warming settings apply from the next step.
    c.warming.min_idle = 3;
    cluster.set_config(c.clone()).unwrap();
    run_for(Duration::from_secs(1)).await;
    assert_eq!(b[0].counters().acquired, 11);

    c.warming.enabled = false;
    cluster.set_config(c).unwrap();
    run_for(Duration::from_secs(5)).await;
    assert_eq!(b[0].counters().acquired, 11, "the warmer stopped");
    assert_eq!(b[0].counters().live, 0);
}

#[tokio::test(start_paused = true)]
async fn a_replaced_endpoint_takes_over_and_the_old_one_stops() {
    let (cluster, b) = cluster(1, config()).await;
    let held = cluster.checkout(Intent::Write, None).await.unwrap();
    let newest = Arc::new(NoopBackend::with_role("p", Role::Primary));
    cluster
        .replace_endpoint(newest.clone(), EndpointConfig::new(Role::Primary))
        .unwrap();
    settle().await;
    assert_eq!(cluster.endpoint_ids().len(), 2);
    assert_eq!(
        cluster.status().writer,
        Some(EndpointId::new("p")),
        "still the writer"
    );
    assert_eq!(
        newest.counters().probes,
        1,
        "the new endpoint is probed at once"
    );
    let acquired = newest.counters().acquired;
    let c = cluster.checkout(Intent::Write, None).await.unwrap();
    assert_eq!(
        newest.counters().acquired,
        acquired + 1,
        "writes go to the new backend"
    );
    drop(c);

    // The checkout held on the first backend finishes normally; its tasks stopped.
    assert_eq!(b[0].counters().live, 1);
    drop(held);
    settle().await;
    assert_eq!(b[0].counters().live, 0);
    let probes = b[0].counters().probes;
    run_for(Duration::from_secs(3)).await;
    assert_eq!(b[0].counters().probes, probes, "its prober stopped");

    let stranger = Arc::new(NoopBackend::with_role("zz", Role::Replica));
    let err = cluster
        .replace_endpoint(stranger.clone(), EndpointConfig::default())
        .unwrap_err();
    assert!(err.to_string().contains("no endpoint zz"), "{err}");
    assert!(cluster.replace_backend(stranger).is_err());
    let err = cluster
        .replace_endpoint(
            Arc::new(NoopBackend::new("r1")),
            EndpointConfig::default().weight(0),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("clusters.test.endpoints.r1.weight"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_url_change_starts_afresh() {
    let (cluster, b) = cluster(1, config()).await;
    b[1].set_down(true);
    run_for(Duration::from_secs(2)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::Down);
    let moved = Arc::new(NoopBackend::with_role("r1", Role::Replica));
    cluster
        .replace_endpoint(moved.clone(), EndpointConfig::new(Role::Replica).weight(3))
        .unwrap();
    let st = status_of(&cluster, "r1");
    assert_eq!(
        (st.health, st.weight, st.counters.checkouts),
        (Health::Up, 3, 0)
    );
    settle().await;
    assert_eq!(moved.counters().probes, 1, "probed at once");
}

#[tokio::test(start_paused = true)]
async fn a_new_backend_for_the_same_server_keeps_health_and_serves_at_once() {
    let (cluster, b) = cluster(1, config()).await;
    // r1 goes down; the pool in front of it changes.
    b[1].set_down(true);
    run_for(Duration::from_millis(2500)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::Down);
    let r1 = Arc::new(NoopBackend::with_role("r1", Role::Replica));
    cluster.replace_backend(r1.clone()).unwrap();
    settle().await;
    let st = status_of(&cluster, "r1");
    assert_eq!(st.health, Health::Down, "still down: health is kept");
    assert!(st.last_probe_error.is_some());
    assert_eq!(r1.counters().probes, 0, "no probe before the next interval");
    run_for(Duration::from_millis(500)).await;
    assert_eq!(r1.counters().probes, 1, "an interval after the last probe");
    run_for(Duration::from_secs(1)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::Up, "rise 2");

    // The primary's pool changes while a checkout is held on the old one.
    let held = cluster.checkout(Intent::Write, None).await.unwrap();
    let before = status_of(&cluster, "p");
    let p = Arc::new(NoopBackend::with_role("p", Role::Primary));
    cluster.replace_backend(p.clone()).unwrap();
    let st = status_of(&cluster, "p");
    assert_eq!(st.health, Health::Up);
    assert!(st.serves_writes, "serves at once");
    assert_eq!(st.counters, before.counters, "counters are kept");
    assert_eq!(st.in_flight, 1, "the held checkout still counts");
    let c = cluster.checkout(Intent::Write, None).await.unwrap();
    assert_eq!(c.endpoint().as_str(), "p");
    assert_eq!(p.counters().acquired, 1);
    drop((c, held));
    settle().await;
    assert_eq!(
        b[0].counters().live,
        0,
        "the held one went back to its pool"
    );
    assert_eq!(status_of(&cluster, "p").in_flight, 0);
    let probes = b[0].counters().probes;
    run_for(Duration::from_secs(3)).await;
    assert_eq!(b[0].counters().probes, probes, "the old prober stopped");
    assert_eq!(p.counters().probes, 3);
}

#[tokio::test(start_paused = true)]
async fn a_closed_cluster_refuses_checkouts_and_stops_its_tasks() {
    let (cluster, b) = cluster(1, config()).await;
    let held = cluster.checkout(Intent::Read, None).await.unwrap();
    let clone = cluster.clone();
    cluster.close();
    cluster.close();
    assert!(clone.is_closed());
    for intent in [Intent::Read, Intent::Write] {
        let err = clone.checkout(intent, None).await.unwrap_err();
        assert!(matches!(err, Error::Closed), "{err:?}");
    }
    assert!(matches!(
        clone.add_endpoint(Arc::new(NoopBackend::new("x")), EndpointConfig::default()),
        Err(Error::Closed)
    ));
    assert!(matches!(clone.set_config(config()), Err(Error::Closed)));
    assert!(clone.endpoint_ids().is_empty());
    drop(held);
    let probes: Vec<u64> = b.iter().map(|x| x.counters().probes).collect();
    run_for(Duration::from_secs(3)).await;
    let after: Vec<u64> = b.iter().map(|x| x.counters().probes).collect();
    assert_eq!(probes, after, "probers stopped");
    assert_eq!(b[1].counters().live, 0);
}

#[tokio::test(start_paused = true)]
async fn a_write_waiting_for_a_primary_ends_when_the_cluster_closes() {
    let (cluster, b) = cluster(1, config()).await;
    b[0].set_down(true);
    run_for(Duration::from_secs(2)).await;
    assert_eq!(cluster.status().writer, None);
    let waiting = {
        let cluster = cluster.clone();
        tokio::spawn(async move { cluster.checkout(Intent::Write, None).await.map(drop) })
    };
    settle().await;
    cluster.close();
    let err = waiting.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
}

/// The replacement is one routing change: writers on other threads never see
/// a cluster without a primary (removing then adding failed about 2% of the
/// writes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_pointing_the_primary_fails_no_write_on_a_multi_threaded_runtime() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (cluster, _) = cluster(1, config()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let cluster = cluster.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let (mut writes, mut failed) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    // Already past its deadline when it looks: a write that
                    // finds no writer fails instead of waiting for one.
                    let opts = CheckoutOptions::new().timeout(Duration::from_nanos(1));
                    writes += 1;
                    if cluster
                        .checkout_with(Intent::Write, None, opts)
                        .await
                        .is_err()
                    {
                        failed += 1;
                    }
                    tokio::task::yield_now().await;
                }
                (writes, failed)
            })
        })
        .collect();
    for _ in 0..2000 {
        let p = Arc::new(NoopBackend::with_role("p", Role::Primary));
        cluster
            .replace_endpoint(p, EndpointConfig::new(Role::Primary))
            .unwrap();
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let (writes, failed) = w.await.unwrap();
        assert!(writes > 0);
        assert_eq!(failed, 0, "of {writes} writes");
    }
}
