//! Causal reads on `NoopBackend`s: whose probes and confirmations report the
//! history set on them. Time is paused.

use std::time::Duration;

use switchyard_core::{CausalError, CausalToken, Error, History};
use tokio::time::Instant;

use super::*;
use crate::CausalFallback;

const SYSTEM: u64 = 7_300_000_000_000_000_001;

fn wal(position: u64) -> Option<History> {
    Some(History::Timeline {
        system: SYSTEM,
        timeline: 1,
        position,
    })
}

/// A primary at 100 and two replicas at `replicas`, probed.
async fn at(replicas: u64, config: ClusterConfig) -> (Cluster<NoopBackend>, Vec<Arc<NoopBackend>>) {
    let (cluster, backends) = cluster(2, config).await;
    backends[0].set_replication(wal(100), None);
    for r in &backends[1..] {
        r.set_replication(wal(replicas), Some(true));
    }
    run_for(Duration::from_secs(2)).await;
    (cluster, backends)
}

async fn written(cluster: &Cluster<NoopBackend>) -> CausalToken {
    let ((), token) = cluster
        .run_write(None, CheckoutOptions::new(), async |_conn| {
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    token
}

fn reason(error: Error) -> CausalError {
    match error {
        Error::Causal { reason, .. } => reason,
        other => panic!("not a causal error: {other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_known_to_have_applied_the_token_serves_it_at_once() {
    let (cluster, _backends) = at(100, config()).await;
    let token = written(&cluster).await;
    let text = token.to_string();
    let token = cluster.parse_token(&text).unwrap();
    let started = Instant::now();
    for _ in 0..10 {
        let conn = cluster
            .checkout_after(&token, None, CheckoutOptions::new())
            .await
            .unwrap();
        assert_ne!(conn.endpoint().as_str(), "p");
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
    let stats = cluster.causal_stats();
    assert_eq!(
        (stats.replica_reads, stats.waits, stats.fallbacks),
        (10, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_read_waits_for_its_replica_to_apply_the_token() {
    let (cluster, backends) = at(50, config()).await;
    let token = written(&cluster).await;
    let started = Instant::now();
    let read = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            cluster
                .checkout_after(&token, None, CheckoutOptions::new())
                .await
                .map(|c| c.endpoint().to_string())
        })
    };
    settle().await;
    tokio::time::advance(Duration::from_millis(20)).await;
    settle().await;
    for r in &backends[1..] {
        r.set_replication(wal(100), Some(true));
    }
    let served = read.await.unwrap().unwrap();
    assert_ne!(served, "p");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(20) && waited < Duration::from_millis(40),
        "{waited:?}"
    );
    let stats = cluster.causal_stats();
    assert_eq!(
        (stats.replica_reads, stats.waits, stats.fallbacks),
        (1, 1, 0)
    );
    assert!(stats.wait_time >= Duration::from_millis(20));
}

#[tokio::test(start_paused = true)]
async fn replicas_that_do_not_catch_up_in_time_leave_the_read_to_the_primary() {
    let (cluster, _backends) = at(50, config()).await;
    let token = written(&cluster).await;
    let started = Instant::now();
    let conn = cluster
        .checkout_after(&token, None, CheckoutOptions::new())
        .await
        .unwrap();
    assert_eq!(conn.endpoint().as_str(), "p");
    let waited = started.elapsed();
    let wait = config().causal.wait;
    assert!(waited >= wait && waited < wait * 2, "{waited:?}");
    let stats = cluster.causal_stats();
    assert_eq!((stats.primary_reads, stats.fallbacks), (1, 1));

    // The caller's own wait replaces the cluster's.
    let started = Instant::now();
    let opts = CheckoutOptions::new().causal_wait(Duration::from_millis(5));
    let conn = cluster.checkout_after(&token, None, opts).await.unwrap();
    assert_eq!(conn.endpoint().as_str(), "p");
    assert!(started.elapsed() < Duration::from_millis(20));
}

#[tokio::test(start_paused = true)]
async fn without_a_fallback_the_read_fails_after_the_wait() {
    let mut c = config();
    c.causal.fallback = CausalFallback::Fail;
    let (cluster, _backends) = at(50, c).await;
    let token = written(&cluster).await;
    let error = cluster
        .checkout_after(&token, None, CheckoutOptions::new())
        .await
        .unwrap_err();
    assert_eq!(reason(error), CausalError::NotApplied);
}

#[tokio::test(start_paused = true)]
async fn forged_foreign_and_future_tokens_are_refused_in_bounded_time() {
    let (cluster, _backends) = at(100, config()).await;
    for text in ["", "sy1.0", "garbage", "sy1.zz.t.1.1.1"] {
        assert_eq!(
            reason(cluster.parse_token(text).unwrap_err()),
            CausalError::Malformed
        );
    }
    let other_cluster = CausalToken::new("elsewhere", wal(10).unwrap()).unwrap();
    assert_eq!(
        reason(cluster.parse_token(&other_cluster.to_string()).unwrap_err()),
        CausalError::ForeignCluster
    );
    let other_system = History::Timeline {
        system: 1,
        timeline: 1,
        position: 10,
    };
    let other_system = CausalToken::new("test", other_system).unwrap();
    assert_eq!(
        reason(cluster.parse_token(&other_system.to_string()).unwrap_err()),
        CausalError::ForeignCluster
    );
    // Ahead of the primary itself: waited out, then refused, never hung.
    let future = CausalToken::new("test", wal(1 << 40).unwrap()).unwrap();
    let started = Instant::now();
    let error = cluster
        .checkout_after(&future, None, CheckoutOptions::new())
        .await
        .unwrap_err();
    assert_eq!(reason(error), CausalError::Future);
    assert!(started.elapsed() < config().causal.wait * 2);
}

#[tokio::test(start_paused = true)]
async fn a_later_token_wins_a_merge_and_is_the_one_honoured() {
    let (cluster, backends) = at(100, config()).await;
    let first = written(&cluster).await;
    backends[0].set_replication(wal(200), None);
    let second = written(&cluster).await;
    let merged = second.clone().merge(first.clone());
    assert_eq!(merged, second);
    // The replicas hold the first write, not the second: only the first
    // token is theirs to serve.
    let conn = cluster
        .checkout_after(&first, None, CheckoutOptions::new())
        .await
        .unwrap();
    assert_ne!(conn.endpoint().as_str(), "p");
    let conn = cluster
        .checkout_after(&merged, None, CheckoutOptions::new())
        .await
        .unwrap();
    assert_eq!(conn.endpoint().as_str(), "p");
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_hangs_on_the_confirmation_is_left_within_the_wait_and_ejected() {
    // Round robin: r1 is certain to be picked.
    let mut c = config();
    c.strategy = crate::StrategyKind::RoundRobin;
    let (cluster, backends) = at(50, c).await;
    let token = written(&cluster).await;
    // r1 hands out connections but never answers; r2 has applied the write.
    backends[1].set_confirm_delay(Duration::from_secs(3600));
    backends[2].set_replication(wal(100), Some(true));
    let wait = config().causal.wait;
    for _ in 0..20 {
        let started = Instant::now();
        let conn = cluster
            .checkout_after(&token, None, CheckoutOptions::new())
            .await
            .unwrap();
        assert_eq!(conn.endpoint().as_str(), "r2");
        assert!(started.elapsed() < wait * 2, "{:?}", started.elapsed());
    }
    // Cut off once, then charged and ejected: later reads never try it.
    assert!(matches!(
        status_of(&cluster, "r1").health,
        crate::Health::Ejected
    ));
    assert_eq!(cluster.causal_stats().replica_reads, 20);
}

/// `run_after` is a read like `run`'s: an operation that hangs on one replica
/// is cut at the attempt timeout and runs again, with the same token, on the
/// other one.
#[tokio::test(start_paused = true)]
async fn a_token_read_that_hangs_on_one_replica_moves_to_the_other() {
    let (cluster, _backends) = at(100, config()).await;
    let token = written(&cluster).await;
    let started = Instant::now();
    let mut tried = Vec::new();
    let served = cluster
        .run_after(&token, None, CheckoutOptions::new(), async |conn| {
            tried.push(conn.endpoint().clone());
            if tried.len() == 1 {
                std::future::pending::<()>().await;
            }
            Ok::<_, Error>(conn.endpoint().clone())
        })
        .await
        .unwrap();
    assert_eq!(tried.len(), 2, "{tried:?}");
    assert_ne!(tried[0], tried[1]);
    assert_eq!(served, tried[1]);
    assert_ne!(served.as_str(), "p");
    assert_eq!(started.elapsed(), config().retry.attempt_timeout);
}
