//! Fencing by history, split brain and stale replicas, over `NoopBackend`s
//! that report the histories real engines would.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{EndpointId, Error, History, Intent, Role};

use super::*;
use crate::Health;

fn writer(cluster: &Cluster<NoopBackend>) -> Option<String> {
    cluster.status().writer.map(|w| w.to_string())
}

/// A failover, then the old primary back: p dies, r1 is promoted to
/// timeline 2 (and takes the writes), and p comes back as a primary on
/// timeline 1.
async fn old_primary_back(cluster: &Cluster<NoopBackend>, b: &[Arc<NoopBackend>]) {
    b[0].set_replication(timeline(1), None);
    b[1].set_replication(timeline(1), Some(true));
    run_for(Duration::from_secs(1)).await;
    b[0].set_down(true);
    b[1].set_role(Role::Primary);
    b[1].set_replication(timeline(2), None);
    run_for(Duration::from_secs(3)).await;
    assert_eq!(writer(cluster).as_deref(), Some("r1"));
    b[0].set_down(false);
    run_for(Duration::from_secs(3)).await;
}

/// Issue 17's first reproduction, in miniature: the old primary is back as
/// an independent primary on its old timeline, then the promoted one stalls
/// long enough to be marked down. Writes must wait, never go to the old one.
#[tokio::test(start_paused = true)]
async fn an_old_primary_never_takes_writes_back_when_the_promoted_one_stalls() {
    let (cluster, b) = cluster(1, config()).await;
    old_primary_back(&cluster, &b).await;
    let p = status_of(&cluster, "p");
    assert_eq!((p.health, p.role), (Health::Up, Role::Primary));
    assert!(p.fenced && !p.serves_writes && !p.serves_reads, "{p:?}");
    assert_eq!(writer(&cluster).as_deref(), Some("r1"));
    // r1 stalls: marked down; writes wait and fail, they do not go to p.
    b[1].set_down(true);
    run_for(Duration::from_secs(3)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::Down);
    assert_eq!(writer(&cluster), None);
    let write = tokio::spawn({
        let cluster = cluster.clone();
        async move {
            cluster
                .checkout(Intent::Write, None)
                .await
                .map(|c| c.endpoint().to_string())
        }
    });
    run_for(Duration::from_secs(4)).await;
    assert!(matches!(write.await.unwrap(), Err(Error::NoPrimary { .. })));
    // r1 resumes: writes go back to it, p stays fenced.
    b[1].set_down(false);
    run_for(Duration::from_secs(3)).await;
    assert_eq!(writer(&cluster).as_deref(), Some("r1"));
    assert!(status_of(&cluster, "p").fenced);
    // Demoted (made a standby of r1), p is a replica on the writer's line.
    b[0].set_role(Role::Replica);
    b[0].set_replication(timeline(2), Some(true));
    run_for(Duration::from_secs(1)).await;
    let p = status_of(&cluster, "p");
    assert!(!p.fenced && p.serves_reads, "{p:?}");
}

#[tokio::test(start_paused = true)]
async fn unordered_primaries_refuse_writes_until_an_operator_names_one() {
    let (cluster, b) = cluster(1, config()).await;
    let lineage = |id: &str| {
        Some(History::Lineage {
            id: id.into(),
            previous: None,
            offset: 0,
        })
    };
    // Two masters of unrelated lines from the start: nothing orders them.
    b[0].set_replication(lineage("aaaa"), None);
    b[1].set_role(Role::Primary);
    b[1].set_replication(lineage("bbbb"), None);
    let fresh = Cluster::builder("fresh")
        .config(config())
        .endpoint(b[0].clone(), EndpointConfig::new(Role::Primary))
        .endpoint(b[1].clone(), EndpointConfig::new(Role::Primary))
        .build()
        .unwrap();
    run_for(Duration::from_secs(1)).await;
    drop(cluster);
    let st = fresh.status();
    assert_eq!(st.split_brain.len(), 2, "{st:?}");
    match fresh.checkout(Intent::Write, None).await {
        Err(Error::SplitBrain { cluster, primaries }) => {
            assert_eq!(cluster, "fresh");
            assert_eq!(primaries.len(), 2);
        }
        other => panic!(
            "expected SplitBrain, got {:?}",
            other.map(|c| c.endpoint().clone())
        ),
    }
    let e = fresh.checkout(Intent::Write, None).await.err().unwrap();
    assert!(
        e.to_string()
            .contains("split brain in cluster fresh: p, r1"),
        "{e}"
    );
    assert!(!e.is_retryable());
    // The operator trusts r1: it takes writes, p is fenced.
    fresh.unfence(&EndpointId::new("r1")).unwrap();
    assert_eq!(writer(&fresh).as_deref(), Some("r1"));
    assert!(status_of(&fresh, "p").fenced);
    assert!(fresh.status().split_brain.is_empty());
    // And may change its mind.
    fresh.unfence(&EndpointId::new("p")).unwrap();
    assert_eq!(writer(&fresh).as_deref(), Some("p"));
    assert!(status_of(&fresh, "r1").fenced);
    assert!(fresh.unfence(&EndpointId::new("nope")).is_err());
}

/// Issue 17's second reproduction, in miniature: with two standbys, the
/// primary dies and one standby is promoted; the other is cut off (its
/// receiver stops) and must stop serving reads once its staleness can exceed
/// `max_replica_lag`, and never serve while it follows the old timeline.
#[tokio::test(start_paused = true)]
async fn an_orphaned_standby_stops_serving_reads() {
    let mut c = config();
    c.health.max_replica_lag = Some(Duration::from_secs(3));
    let (cluster, b) = cluster(2, c).await;
    b[0].set_replication(timeline(1), None);
    b[1].set_replication(timeline(1), Some(true));
    b[2].set_replication(timeline(1), Some(true));
    run_for(Duration::from_secs(1)).await;
    b[0].set_down(true);
    b[2].set_replication(timeline(1), Some(false));
    run_for(Duration::from_secs(1)).await;
    assert!(status_of(&cluster, "r2").serves_reads, "within the bound");
    b[1].set_role(Role::Primary);
    b[1].set_replication(timeline(2), None);
    run_for(Duration::from_secs(1)).await;
    assert_eq!(writer(&cluster).as_deref(), Some("r1"));
    let r2 = status_of(&cluster, "r2");
    assert!(
        !r2.serves_reads,
        "follows timeline 1 while writes are on 2: {r2:?}"
    );
    assert_eq!(tally(&cluster, Intent::Read, 10).await.get("r2"), None);
    // Re-pointed at r1, it streams timeline 2 and serves again.
    b[2].set_replication(timeline(2), Some(true));
    run_for(Duration::from_secs(1)).await;
    assert!(status_of(&cluster, "r2").serves_reads);
}

#[tokio::test(start_paused = true)]
async fn a_standby_cut_off_without_a_failover_ages_out() {
    let mut c = config();
    c.health.max_replica_lag = Some(Duration::from_secs(3));
    let (cluster, b) = cluster(1, c).await;
    b[1].set_replication(timeline(1), Some(true));
    run_for(Duration::from_secs(1)).await;
    b[1].set_replication(timeline(1), Some(false));
    run_for(Duration::from_secs(1)).await;
    assert!(status_of(&cluster, "r1").serves_reads);
    run_for(Duration::from_secs(1)).await;
    assert!(
        status_of(&cluster, "r1").serves_reads,
        "3s since it last streamed, a probe ahead"
    );
    run_for(Duration::from_secs(1)).await;
    assert!(
        !status_of(&cluster, "r1").serves_reads,
        "4s: over the limit a probe ahead"
    );
    // With no limit, any lag is accepted.
    let mut c = config();
    c.health.max_replica_lag = None;
    cluster.set_config(c).unwrap();
    run_for(Duration::from_secs(1)).await;
    assert!(status_of(&cluster, "r1").serves_reads);
}

/// A half-open replica's trial read is a read like any other: one that is
/// too far behind (here: cut off from its primary for longer than
/// `max_replica_lag`) or on an older line gets none, and reads stay on the
/// primary until a probe sees it fit again.
#[tokio::test(start_paused = true)]
async fn a_half_open_replica_that_is_too_stale_gets_no_trial_read() {
    let mut c = config();
    c.health.max_replica_lag = Some(Duration::from_secs(1));
    c.health.eject_base = Duration::from_secs(3);
    let (cluster, b) = cluster(1, c).await;
    b[0].set_replication(timeline(2), None);
    b[1].set_replication(timeline(2), Some(true));
    run_for(Duration::from_secs(1)).await;
    assert_eq!(tally(&cluster, Intent::Read, 1).await.len(), 1);
    // Ejected by a hung checkout, then cut off from its primary.
    b[1].set_acquire_delay(Duration::from_secs(60));
    let c = cluster.checkout(Intent::Read, None).await.unwrap();
    assert_eq!(c.endpoint().as_str(), "p");
    drop(c);
    assert_eq!(status_of(&cluster, "r1").health, Health::Ejected);
    b[1].set_acquire_delay(Duration::ZERO);
    b[1].set_replication(timeline(2), Some(false));
    run_for(Duration::from_secs(3)).await;
    assert_eq!(status_of(&cluster, "r1").health, Health::HalfOpen);
    assert_eq!(
        tally(&cluster, Intent::Read, 5).await,
        [("p".to_owned(), 5)].into(),
        "no trial read on a replica 3 s out of its stream"
    );
    // Streaming again, on the line writes follow: its trial comes.
    b[1].set_replication(timeline(2), Some(true));
    run_for(Duration::from_secs(1)).await;
    let c = cluster.checkout(Intent::Read, None).await.unwrap();
    assert_eq!(c.endpoint().as_str(), "r1");
    drop(c);
    assert_eq!(status_of(&cluster, "r1").health, Health::Up);
}

/// Slow is not dead for the primary writes follow, even while a fenced old
/// primary is back: that one takes no writes, so it is no alternative, and
/// the promoted primary's slow probes must not mark it down.
#[tokio::test(start_paused = true)]
async fn a_fenced_old_primary_does_not_make_the_writer_droppable_for_slowness() {
    let (cluster, b) = cluster(1, config()).await;
    old_primary_back(&cluster, &b).await;
    assert!(status_of(&cluster, "p").fenced);
    assert_eq!(writer(&cluster).as_deref(), Some("r1"));
    // r1 answers probes, but slower than their timeout (500 ms).
    b[1].set_probe_rtt(Duration::from_millis(800));
    run_for(Duration::from_secs(5)).await;
    let r1 = status_of(&cluster, "r1");
    assert_eq!(r1.health, Health::Up, "{r1:?}");
    assert_eq!(writer(&cluster).as_deref(), Some("r1"));
}
