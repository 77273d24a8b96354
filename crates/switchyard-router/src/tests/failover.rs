use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{BackendErrorKind, Error, Intent, Role};
use tokio::time::Instant;

use super::*;
use crate::Health;

fn io_error(cluster_ep: &switchyard_core::EndpointId) -> Error {
    Error::backend(
        cluster_ep,
        None,
        BackendErrorKind::Io,
        std::io::Error::other("reset"),
    )
}

#[tokio::test(start_paused = true)]
async fn a_refused_read_is_retried_elsewhere_and_ejects_at_once() {
    fastrand::seed(1);
    let (cluster, b) = cluster(2, config()).await;
    b[1].set_down(true); // r1 refuses; probes have not noticed yet
    for _ in 0..20 {
        let c = cluster.checkout(Intent::Read, None).await.unwrap();
        assert_eq!(c.endpoint().as_str(), "r2");
    }
    let st = status_of(&cluster, "r1");
    assert_eq!(st.health, Health::Ejected);
    let ej = st.ejection.unwrap();
    assert_eq!((ej.level, ej.backoff), (1, Duration::from_secs(1)));
}

/// A failure reported on a connection counts when its checkout is dropped:
/// the very next pick, with no task run in between, no longer chooses the
/// endpoint (a caller's next checkout, a retry of `run` or `run_after`).
#[tokio::test(start_paused = true)]
async fn a_failure_reported_on_a_dropped_checkout_ejects_before_the_next_pick() {
    let (cluster, _b) = cluster(2, config()).await;
    let mut failed = cluster.checkout(Intent::Read, None).await.unwrap();
    let id = failed.endpoint().clone();
    failed.report_failure(&io_error(&id));
    drop(failed);
    for _ in 0..20 {
        let c = cluster.checkout(Intent::Read, None).await.unwrap();
        assert_ne!(c.endpoint(), &id, "picked the endpoint its drop ejected");
    }
    assert_eq!(status_of(&cluster, id.as_str()).health, Health::Ejected);
}

#[tokio::test(start_paused = true)]
async fn a_hung_replica_costs_one_attempt_timeout_then_reads_move_on() {
    let (cluster, b) = cluster(1, config()).await;
    b[1].set_acquire_delay(Duration::from_secs(60));
    let started = Instant::now();
    let c = cluster.checkout(Intent::Read, None).await.unwrap();
    assert_eq!(c.endpoint().as_str(), "p", "fell back to the primary");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "one attempt_timeout"
    );
    assert_eq!(status_of(&cluster, "r1").health, Health::Ejected);
}

/// An operation that fails with a broken connection the first time only.
fn flaky(
    fails: Arc<AtomicU32>,
) -> impl AsyncFnMut(
    &mut switchyard_core::Checkout<switchyard_core::noop::NoopBackend>,
) -> Result<u64, Error> {
    async move |conn| {
        if fails.fetch_add(1, Ordering::SeqCst) == 0 {
            Err(io_error(conn.endpoint()))
        } else {
            Ok(conn.id)
        }
    }
}

#[tokio::test(start_paused = true)]
async fn writes_are_not_retried_unless_idempotent() {
    let (cluster, b) = cluster(1, config()).await;
    let op = flaky;
    let fails = Arc::new(AtomicU32::new(0));
    let err = cluster
        .run(
            Intent::Write,
            None,
            CheckoutOptions::new(),
            op(fails.clone()),
        )
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "retryable, yet a write is not retried");
    assert_eq!(fails.load(Ordering::SeqCst), 1);
    // The primary is the last writer: reported, but never ejected passively.
    assert_eq!(status_of(&cluster, "p").health, Health::Up);

    fails.store(0, Ordering::SeqCst);
    let opts = CheckoutOptions::new().idempotent(true);
    cluster
        .run(Intent::Write, None, opts, op(fails.clone()))
        .await
        .unwrap();
    assert_eq!(fails.load(Ordering::SeqCst), 2);
    assert_eq!(
        b[0].counters().discarded,
        2,
        "broken connections are discarded"
    );
}

#[tokio::test(start_paused = true)]
async fn run_retries_a_read_on_another_endpoint() {
    let (cluster, _) = cluster(2, config()).await;
    let mut seen = Vec::new();
    let value = cluster
        .run(Intent::Read, None, CheckoutOptions::new(), async |conn| {
            seen.push(conn.endpoint().to_string());
            if seen.len() == 1 {
                Err(io_error(conn.endpoint()))
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
    assert_eq!(value, 7);
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0], seen[1], "the retry went elsewhere");
    assert_eq!(status_of(&cluster, &seen[0]).health, Health::Ejected);
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_is_bounded() {
    let (cluster, b) = cluster(4, config()).await;
    for r in &b[1..] {
        r.set_down(true);
    }
    b[0].set_down(true);
    let err = cluster.checkout(Intent::Read, None).await.unwrap_err();
    assert_eq!(err.backend_kind(), Some(BackendErrorKind::Connect), "{err}");
    let tried: u64 = b.iter().map(|x| x.counters().acquired).sum();
    assert_eq!(tried, 0);
    let ejected = cluster
        .status()
        .endpoints
        .iter()
        .filter(|e| e.health == Health::Ejected)
        .count();
    assert_eq!(ejected, 3, "max_attempts = 3");
}

async fn read_until_ejected(cluster: &Cluster<switchyard_core::noop::NoopBackend>, id: &str) {
    for _ in 0..50 {
        let _ = cluster.checkout(Intent::Read, None).await;
        if status_of(cluster, id).health == Health::Ejected {
            return;
        }
    }
    panic!("{id} was never ejected");
}

#[tokio::test(start_paused = true)]
async fn ejected_endpoints_come_back_through_a_half_open_trial_with_doubling_backoff() {
    fastrand::seed(2);
    let (cluster, b) = cluster(2, config()).await;
    b[1].set_down(true);
    read_until_ejected(&cluster, "r1").await;
    // The backoff (1s) ends: half-open. One failed probe is below `fall`.
    run_for(Duration::from_secs(1)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::HalfOpen);
    // The trial goes to r1, fails, and the read moves on; the backoff doubles.
    let c = cluster.checkout(Intent::Read, None).await.unwrap();
    assert_eq!(c.endpoint().as_str(), "r2");
    let ej = status_of(&cluster, "r1").ejection.unwrap();
    assert_eq!((ej.level, ej.backoff), (2, Duration::from_secs(2)));
    // The node recovers; after the doubled backoff the trial succeeds.
    b[1].set_down(false);
    run_for(Duration::from_secs(2)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::HalfOpen);
    let c = cluster.checkout(Intent::Read, None).await.unwrap();
    assert_eq!(
        c.endpoint().as_str(),
        "r1",
        "the first checkout after the backoff is the trial"
    );
    assert_eq!(status_of(&cluster, "r1").health, Health::Up);
    assert_eq!(
        tally(&cluster, Intent::Read, 100).await.len(),
        2,
        "re-admitted without restart"
    );
}

/// While a half-open endpoint's trial is out, the checkouts that consider
/// it pass it over on the endpoint's own lock: none takes the topology lock
/// to be told the trial is gone (issue 15).
#[tokio::test(start_paused = true)]
async fn a_trial_that_is_out_is_passed_over_before_the_topology_lock() {
    let (cluster, b) = cluster(2, config()).await;
    b[1].set_down(true);
    read_until_ejected(&cluster, "r1").await;
    run_for(Duration::from_secs(1)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::HalfOpen);
    let snap = cluster.shared.snapshot.load_full();
    let r1 = snap.endpoints.iter().find(|e| e.id().as_str() == "r1");
    let r1 = Arc::clone(r1.unwrap());
    assert_eq!(snap.trials(Intent::Read, &[]).count(), 1);
    assert!(cluster
        .shared
        .apply(&r1.state, crate::health::Event::TrialClaimed));
    assert_eq!(
        snap.trials(Intent::Read, &[]).count(),
        0,
        "a trial that is out is still offered"
    );
    let c = cluster.checkout(Intent::Read, None).await.unwrap();
    assert_eq!(c.endpoint().as_str(), "r2");
    assert_eq!(status_of(&cluster, "r1").health, Health::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn ejection_is_capped_by_max_ejected_percent() {
    let mut c = config();
    c.health.max_ejected_percent = 50;
    let (cluster, b) = cluster(3, c).await; // 4 endpoints: at most 2 out
    for r in &b[1..] {
        r.set_down(true);
    }
    let _ = cluster.checkout(Intent::Read, None).await;
    let _ = cluster.checkout(Intent::Read, None).await;
    let out = cluster
        .status()
        .endpoints
        .iter()
        .filter(|e| e.health == Health::Ejected)
        .count();
    assert_eq!(out, 2);
}

#[tokio::test(start_paused = true)]
async fn writes_follow_a_promotion_and_the_old_primary_serves_reads() {
    let (cluster, b) = cluster(2, config()).await;
    b[0].set_down(true); // primary dies
    run_for(Duration::from_secs(2)).await;
    assert_eq!(status_of(&cluster, "p").health, Health::Down);
    assert_eq!(cluster.status().writer, None);
    // A write waits for a primary; r1 is promoted 1.5s later.
    let waiter = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let c = cluster.checkout(Intent::Write, None).await.unwrap();
            (c.endpoint().to_string(), started.elapsed())
        })
    };
    settle().await;
    run_for(Duration::from_millis(500)).await;
    b[1].set_role(Role::Primary);
    run_for(Duration::from_secs(1)).await;
    let (ep, waited) = waiter.await.unwrap();
    assert_eq!(ep, "r1");
    assert!(
        waited <= Duration::from_millis(1500),
        "woken by the promotion, not a poll: {waited:?}"
    );
    // The old primary comes back as a replica and serves reads.
    b[0].set_role(Role::Replica);
    b[0].set_down(false);
    run_for(Duration::from_secs(2)).await;
    let reads = tally(&cluster, Intent::Read, 100).await;
    assert_eq!(reads.keys().collect::<Vec<_>>(), ["p", "r2"]);
    assert_eq!(served_by(&cluster, Intent::Write, 5).await, ["r1"]);
}

#[tokio::test(start_paused = true)]
async fn with_no_primary_writes_fail_after_the_failover_timeout() {
    let (cluster, b) = cluster(1, config()).await;
    b[0].set_role(Role::Replica);
    run_for(Duration::from_secs(1)).await;
    let started = Instant::now();
    let err = cluster.checkout(Intent::Write, None).await.unwrap_err();
    assert!(matches!(err, Error::NoPrimary { .. }), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert!(err.to_string().contains("no primary in cluster test"));
    // Reads still work meanwhile.
    assert_eq!(tally(&cluster, Intent::Read, 50).await.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_longest_serving_primary_keeps_writes_when_two_report_primary() {
    let (cluster, b) = cluster(1, config()).await;
    run_for(Duration::from_secs(1)).await;
    b[1].set_role(Role::Primary);
    run_for(Duration::from_secs(1)).await;
    assert_eq!(served_by(&cluster, Intent::Write, 5).await, ["p"]);
}

#[tokio::test(start_paused = true)]
async fn an_old_primary_back_after_a_failover_gets_no_checkout() {
    let (cluster, b) = cluster(1, config()).await;
    // A write holds a connection on p when p dies; r1 is promoted.
    let mut held = cluster.checkout(Intent::Write, None).await.unwrap();
    assert_eq!(held.endpoint().as_str(), "p");
    b[0].set_down(true);
    run_for(Duration::from_secs(2)).await;
    b[1].set_role(Role::Primary);
    run_for(Duration::from_secs(1)).await;
    assert_eq!(
        cluster.status().writer.as_ref().map(|w| w.as_str()),
        Some("r1")
    );
    // The held write fails late: p is no longer the writer, so it is ejected.
    held.report_failure(&io_error(held.endpoint()));
    drop(held);
    assert_eq!(status_of(&cluster, "p").ejection.map(|e| e.level), Some(1));
    // p comes back as an independent primary (split brain): probed up, its
    // ejection over, half-open. It must get neither writes nor a trial.
    b[0].set_down(false);
    run_for(Duration::from_secs(3)).await;
    let p = status_of(&cluster, "p");
    assert_eq!((p.health, p.role), (Health::HalfOpen, Role::Primary));
    let writes = tally(&cluster, Intent::Write, 5).await;
    assert_eq!(
        writes.keys().collect::<Vec<_>>(),
        ["r1"],
        "a write reached the old primary"
    );
    let reads = tally(&cluster, Intent::Read, 20).await;
    assert_eq!(
        reads.keys().collect::<Vec<_>>(),
        ["r1"],
        "a read reached the old primary"
    );
    assert_eq!(
        cluster.status().writer.as_ref().map(|w| w.as_str()),
        Some("r1")
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_checkout_that_outlives_its_primary_moves_to_the_new_one() {
    let (cluster, b) = cluster(2, config()).await;
    // The primary hangs: the write checkout waits on it...
    b[0].set_acquire_delay(Duration::from_secs(3));
    let waiter = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let c = cluster.checkout(Intent::Write, None).await.unwrap();
            c.endpoint().to_string()
        })
    };
    settle().await;
    // ...while r1 is promoted and p demoted; p's connection then arrives.
    b[0].set_role(Role::Replica);
    b[1].set_role(Role::Primary);
    run_for(Duration::from_secs(4)).await;
    assert_eq!(
        cluster.status().writer.as_ref().map(|w| w.as_str()),
        Some("r1")
    );
    assert_eq!(
        waiter.await.unwrap(),
        "r1",
        "the write went to the old primary"
    );
}

/// A primary dies and its only replica is promoted before the probes have
/// marked the old one down. The promoted one's history (a later timeline)
/// says it is the newer primary: writes and reads move to it at once, and the
/// dead one, still "up" for one more probe, is fenced.
#[tokio::test(start_paused = true)]
async fn a_promotion_seen_before_the_dead_primary_takes_over_by_history() {
    let (cluster, b) = cluster(1, config()).await;
    b[0].set_replication(timeline(1), None);
    b[1].set_replication(timeline(1), Some(true));
    run_for(Duration::from_secs(1)).await;
    b[0].set_down(true);
    b[1].set_role(Role::Primary);
    b[1].set_replication(timeline(2), None);
    // One probe round: r1 is seen as primary, p has failed once (fall is 2).
    run_for(Duration::from_secs(1)).await;
    let p = status_of(&cluster, "p");
    assert_eq!(p.health, Health::Up, "{p:?}");
    assert!(p.fenced, "{p:?}");
    assert_eq!(status_of(&cluster, "r1").role, Role::Primary);
    assert_eq!(
        cluster.status().writer.as_ref().map(|w| w.as_str()),
        Some("r1")
    );
    for _ in 0..20 {
        let served = cluster
            .run(Intent::Read, None, CheckoutOptions::new(), async |conn| {
                Ok::<_, Error>(conn.endpoint().to_string())
            })
            .await;
        assert_eq!(served.unwrap(), "r1");
    }
}

/// A read retried at once while no replica is healthy fails without waiting
/// for anything. Such a loop must still give the cluster's own tasks turns,
/// or the replica that comes back is never seen and the loop spins forever
/// (it did, on a current-thread runtime): a checkout that finds no endpoint
/// takes a unit of tokio's cooperative budget, as tokio's own resources do,
/// and yields when the task has none left (`checkout::with_budget_taken`).
#[tokio::test(start_paused = true)]
async fn a_read_retried_at_once_lets_the_health_checks_bring_its_replica_back() {
    let mut cfg = config();
    cfg.read_preference = crate::ReadPreference::ReplicasOnly;
    cfg.health.fall = 1;
    cfg.health.rise = 1;
    let (cluster, b) = cluster(1, cfg).await;
    b[1].set_down(true);
    run_for(Duration::from_secs(1)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::Down);
    assert!(matches!(
        cluster.checkout(Intent::Read, None).await,
        Err(Error::NoHealthyEndpoint { .. })
    ));

    // Back, and a probe asked for now: the prober needs only a turn.
    b[1].set_down(false);
    let r1 = cluster.shared.snapshot.load().endpoints[1].clone();
    assert_eq!(r1.id().as_str(), "r1");
    r1.state.request_probe();
    assert_eq!(status_of(&cluster, "r1").health, Health::Down);

    let mut failed = 0u32;
    while cluster.checkout(Intent::Read, None).await.is_err() {
        failed += 1;
        assert!(
            failed < 100_000,
            "the read loop never let the prober run: r1 is still {:?}",
            status_of(&cluster, "r1").health
        );
    }
    assert!(failed > 0, "r1 came back before the loop started");
}
