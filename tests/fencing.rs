//! Failover that never goes backwards (issue 17), over real PostgreSQL and
//! Redis from the test bed. Each scenario is written once against an
//! [`Engine`] fixture and the testkit's [`Node`] trait, and run per engine:
//!
//! - an old primary restarted as an independent primary must never take the
//!   writes back, not even while the promoted one is stalled (SIGSTOP) long
//!   enough to be marked down;
//! - a replica left behind by a failover (an orphaned PostgreSQL standby, a
//!   Redis replica) must not serve reads that miss an acknowledged write older
//!   than `max_replica_lag`, not even once the old primary is back and it
//!   streams from it again.
//!
//! Run with `cargo test -p switchyard --test fencing -- --nocapture` to see
//! each step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::time::Duration;

use fixture::*;
use switchyard_core::Role;
use switchyard_postgres::PgBackend;
use switchyard_redis::RedisBackend;
use switchyard_router::Cluster;
use switchyard_testkit::Node;
use tokio::time::Instant;

/// Kills the primary and promotes node 1 (`promoted`); returns once writes
/// follow the promotion and record 2 is acknowledged there.
async fn fail_over<E: Engine>(cluster: &Cluster<E>, nodes: &[E::Node], promoted: &str) {
    nodes[0].kill().await.unwrap();
    nodes[1].promote().await.unwrap();
    let follows = writer_is(promoted.to_owned());
    wait_status(cluster, "writes to follow the promotion", follows).await;
    assert_eq!(E::write(cluster, 2).await.unwrap(), promoted);
}

/// Issue 17, defect 1: kill the primary, promote the replica, write; restart
/// the old primary (an independent primary: PostgreSQL on its old timeline,
/// Redis empty on a new replication id); stall the promoted one for 800 ms
/// under write load. No write may ever be acknowledged by the old node, and
/// every acknowledged write is on the promoted one.
async fn old_primary_never_takes_writes_back<E: Engine>() {
    let bed = E::start(1).await;
    let nodes = E::nodes(&bed);
    let cluster = cluster::<E>(&bed);
    let (old, promoted) = (format!("{}-0", E::NAME), format!("{}-1", E::NAME));
    wait_status(
        &cluster,
        "the primary to take writes",
        writer_is(old.clone()),
    )
    .await;
    assert_eq!(E::write(&cluster, 1).await.unwrap(), old);
    replicated::<E>(&nodes[1], 1).await;

    fail_over(&cluster, nodes, &promoted).await;

    nodes[0].restart().await.unwrap();
    let old_id = old.clone();
    wait_status(
        &cluster,
        "the old primary to be probed back as a primary",
        move |st| {
            st.endpoint(&old_id).is_some_and(|e| {
                e.role == Role::Primary && e.health == switchyard_router::Health::Up
            })
        },
    )
    .await;
    let st = cluster.status();
    println!("{}: old primary back: {:?}", E::NAME, st.endpoint(&old));
    assert!(st.endpoint(&old).unwrap().fenced, "{st:#?}");

    // Writes in a loop while the promoted node is stalled, and after.
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut id = 100;
    nodes[1].pause().await.unwrap();
    let stalled = Instant::now();
    let mut resumed = false;
    let until = stalled + Duration::from_secs(5);
    while Instant::now() < until {
        if !resumed && stalled.elapsed() >= STALL {
            nodes[1].resume().await.unwrap();
            resumed = true;
        }
        id += 1;
        match E::write(&cluster, id).await {
            Ok(endpoint) => acked.push((id, endpoint)),
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !resumed {
        nodes[1].resume().await.unwrap();
    }
    println!(
        "{}: {} writes acknowledged, {failed} failed around an {STALL:?} stall",
        E::NAME,
        acked.len()
    );
    let on_old: Vec<_> = acked.iter().filter(|(_, e)| *e == old).collect();
    assert!(
        on_old.is_empty(),
        "writes acknowledged by the old primary: {on_old:?}"
    );
    assert!(
        acked.iter().any(|(_, e)| *e == promoted),
        "writes never came back to the promoted node"
    );
    for (id, _) in &acked {
        assert!(
            E::has(&nodes[1], *id).await,
            "acknowledged write {id} missing"
        );
    }
    assert_eq!(cluster.status().writer.unwrap().as_str(), promoted);
}

/// Issue 17, defect 2: a primary and two replicas; kill the primary, promote
/// one replica, write a record, restart the old primary as an independent
/// one (the other replica reconnects to it). The replica left behind must
/// not serve reads that miss the record once it is older than
/// `max_replica_lag`; re-pointed at the new primary, it serves again.
async fn orphaned_replica_serves_no_stale_reads<E: Engine>() {
    let bed = E::start(2).await;
    let nodes = E::nodes(&bed);
    let cluster = cluster::<E>(&bed);
    let (promoted, orphan) = (format!("{}-1", E::NAME), format!("{}-2", E::NAME));
    wait_status(&cluster, "both replicas to serve reads", |st| {
        st.endpoints.iter().filter(|e| e.serves_reads).count() == 2
    })
    .await;
    E::write(&cluster, 1).await.unwrap();
    replicated::<E>(&nodes[1], 1).await;
    replicated::<E>(&nodes[2], 1).await;

    fail_over(&cluster, nodes, &promoted).await;
    let acked = Instant::now();
    nodes[0].restart().await.unwrap();

    // Reads from MAX_LAG (plus a probe) after the acknowledgement on must all
    // see the record.
    tokio::time::sleep_until(acked + MAX_LAG + Duration::from_millis(200)).await;
    let mut misses = Vec::new();
    for _ in 0..40 {
        let (endpoint, found) = E::read(&cluster, 2).await.unwrap();
        if !found {
            misses.push(endpoint);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let st = cluster.status();
    println!("{}: orphan {:?}", E::NAME, st.endpoint(&orphan));
    assert!(
        misses.is_empty(),
        "{} of 40 reads missed a write acknowledged over {MAX_LAG:?} before: served by {misses:?}\n{st:#?}",
        misses.len()
    );
    assert!(!st.endpoint(&orphan).unwrap().serves_reads, "{st:#?}");

    // The operator re-points it at the new primary: it serves again.
    nodes[2].rejoin(&nodes[1]).await.unwrap();
    let orphan_id = orphan.clone();
    wait_status(
        &cluster,
        "the re-pointed replica to serve reads",
        move |st| st.endpoint(&orphan_id).is_some_and(|e| e.serves_reads),
    )
    .await;
    assert!(E::has(&nodes[2], 2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_old_primary_never_takes_writes_back() {
    old_primary_never_takes_writes_back::<PgBackend>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_old_primary_never_takes_writes_back() {
    old_primary_never_takes_writes_back::<RedisBackend>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_orphaned_standby_serves_no_stale_reads() {
    orphaned_replica_serves_no_stale_reads::<PgBackend>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_orphaned_replica_serves_no_stale_reads() {
    orphaned_replica_serves_no_stale_reads::<RedisBackend>().await;
}
