//! Probes against a real master and replica: roles, promotion, a hung node and
//! a dead one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, unscoped};
use switchyard_core::{Backend, BackendErrorKind, Error, Role};
use switchyard_redis::{Command, RedisBackend};
use switchyard_testkit::poll_until;

#[tokio::test]
async fn probes_follow_role_promotion_hangs_and_deaths() {
    let cluster = cluster(1).await;
    let master = Arc::new(
        RedisBackend::builder("master", cluster.master().url())
            .max_size(1)
            .build()
            .unwrap(),
    );
    let replica_node = &cluster.replicas()[0];
    let replica = Arc::new(
        RedisBackend::builder("replica", replica_node.url())
            .build()
            .unwrap(),
    );
    let timeout = Duration::from_millis(500);

    // A full pool is not a dead endpoint: the probe has a connection of its own.
    let _held = unscoped(&master).await;
    let p = master.probe(timeout).await.unwrap();
    println!("master probe: {p:?}");
    assert_eq!(p.role, Role::Primary);
    assert!(p
        .version
        .as_deref()
        .unwrap()
        .starts_with(|c: char| c.is_ascii_digit()));
    assert!(p.rtt < timeout);

    // A write on the replica is refused as read-only, not as a broken endpoint.
    let mut on_replica = unscoped(&replica).await;
    let err = on_replica
        .query::<()>(&Command::new("SET").arg("k").arg("v"))
        .await
        .unwrap_err();
    assert_eq!(
        err.backend_kind(),
        Some(BackendErrorKind::ReadOnly),
        "{err:?}"
    );
    assert!(err.is_retryable() && !err.is_endpoint_failure());
    drop(on_replica);

    let p = replica.probe(timeout).await.unwrap();
    println!("replica probe: {p:?}");
    assert_eq!(p.role, Role::Replica);
    assert_eq!(p.lag, None, "the link is up");
    assert!(p.lag_bytes.is_some());

    replica_node.promote().await.unwrap();
    let p = replica.probe(timeout).await.unwrap();
    assert_eq!(p.role, Role::Primary);

    // SIGSTOP: connects succeed, nothing answers. The probe gives up on time.
    replica_node.pause().await.unwrap();
    let started = Instant::now();
    let err = replica.probe(Duration::from_millis(300)).await.unwrap_err();
    let waited = started.elapsed();
    replica_node.resume().await.unwrap();
    println!("paused node: {err} after {waited:?}");
    assert!(matches!(err, Error::ProbeTimeout { .. }), "{err:?}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_millis(1300), "{waited:?}");
    assert!(replica.probe(timeout).await.is_ok());

    // SIGKILL: connections are refused.
    cluster.master().kill().await.unwrap();
    let err = master.probe(timeout).await.unwrap_err();
    println!("killed node: {err}");
    assert_eq!(
        err.backend_kind(),
        Some(BackendErrorKind::Connect),
        "{err:?}"
    );
    assert!(err.is_endpoint_failure());
}

#[tokio::test]
async fn a_replica_cut_off_from_its_master_reports_staleness() {
    let cluster = cluster(1).await;
    let replica = RedisBackend::builder("replica", cluster.replicas()[0].url())
        .build()
        .unwrap();
    let timeout = Duration::from_millis(500);
    assert_eq!(replica.probe(timeout).await.unwrap().lag, None);
    cluster.master().kill().await.unwrap();
    let lag = poll_until("the replica to notice", Duration::from_secs(10), || async {
        replica.probe(timeout).await.ok().and_then(|p| {
            assert_eq!(p.role, Role::Replica);
            p.lag
        })
    })
    .await
    .unwrap();
    println!("replica without master: lag {lag:?}");
    assert!(lag < Duration::from_secs(10));
}

/// A replica restarted behind the router's back answers reads before it has
/// synced (Redis's default `replica-serve-stale-data yes`), from an empty data
/// set. A new pool connection to such a node is refused as an endpoint
/// failure, so the checkout goes elsewhere; once it has synced it serves.
#[tokio::test]
async fn a_new_connection_to_an_unsynced_replica_is_refused() {
    let cluster = Arc::new(cluster(1).await);
    let mut on_master = common::direct(cluster.master()).await;
    common::run::<()>(&mut on_master, &["SET", "before-restart", "1"]).await;
    // The master stopped: the restarted replica comes up but cannot sync.
    cluster.master().pause().await.unwrap();
    let restarting = {
        let cluster = Arc::clone(&cluster);
        tokio::spawn(async move { cluster.replicas()[0].restart().await })
    };
    let replica_url = cluster.replicas()[0].url();
    poll_until(
        "the restarted replica to accept connections",
        Duration::from_secs(20),
        || async {
            let client = switchyard_redis::redis::Client::open(replica_url.as_str()).ok()?;
            client
                .get_multiplexed_async_connection()
                .await
                .ok()
                .map(drop)
        },
    )
    .await
    .unwrap();
    let replica = Arc::new(
        RedisBackend::builder("replica", replica_url.clone())
            .build()
            .unwrap(),
    );
    let refused = switchyard_core::Checkout::acquire(
        &replica,
        switchyard_core::CheckoutRequest::with_timeout(Duration::from_secs(5)),
    )
    .await
    .map(drop)
    .unwrap_err();
    println!("checkout of the unsynced replica: {refused}");
    assert!(refused.is_endpoint_failure(), "{refused:?}");

    cluster.master().resume().await.unwrap();
    restarting.await.unwrap().unwrap();
    let mut conn = unscoped(&replica).await;
    let value: Option<String> = conn
        .query(&Command::new("GET").arg("before-restart"))
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("1"));
}
