use std::sync::Arc;
use std::time::Duration;

use switchyard_core::noop::NoopBackend;
use switchyard_core::{Error, Intent, Isolation, Role, TenantId, TenantRegistry, TierPolicy};

use super::*;
use crate::{ReadPreference, StrategyKind};

#[tokio::test(start_paused = true)]
async fn writes_go_to_the_primary_and_reads_to_replicas() {
    let (cluster, _) = cluster(2, config()).await;
    assert_eq!(served_by(&cluster, Intent::Write, 10).await, ["p"]);
    let reads = tally(&cluster, Intent::Read, 1000).await;
    assert_eq!(reads.keys().collect::<Vec<_>>(), ["r1", "r2"]);
    let st = cluster.status();
    assert_eq!(st.writer.as_ref().map(|w| w.as_str()), Some("p"));
    assert!(st.endpoint("r1").unwrap().serves_reads && !st.endpoint("p").unwrap().serves_reads);
}

#[tokio::test(start_paused = true)]
async fn read_preferences_and_the_primary_fallback() {
    let mut c = config();
    c.read_preference = ReadPreference::Any;
    let (cluster, _) = cluster(1, c).await;
    assert_eq!(
        tally(&cluster, Intent::Read, 100).await.len(),
        2,
        "any: replica and primary"
    );

    let (cluster, backends) = cluster_with_down_replica(ReadPreference::PreferReplicas).await;
    assert_eq!(served_by(&cluster, Intent::Read, 10).await, ["p"]);
    drop(backends);

    let (cluster, _b) = cluster_with_down_replica(ReadPreference::ReplicasOnly).await;
    let err = cluster.checkout(Intent::Read, None).await.unwrap_err();
    assert!(matches!(err, Error::NoHealthyEndpoint { .. }), "{err}");
}

async fn cluster_with_down_replica(
    pref: ReadPreference,
) -> (Cluster<NoopBackend>, Vec<Arc<NoopBackend>>) {
    let mut c = config();
    c.read_preference = pref;
    let (cluster, backends) = cluster(1, c).await;
    backends[1].set_down(true);
    run_for(Duration::from_secs(2)).await;
    assert_eq!(status_of(&cluster, "r1").health, crate::Health::Down);
    (cluster, backends)
}

#[tokio::test(start_paused = true)]
async fn replicas_over_the_lag_limit_serve_no_reads() {
    // NoopBackend reports no lag, so drive the probe result directly.
    let (cluster, _) = cluster(2, config()).await;
    let ep = cluster.shared.snapshot.load().endpoints[1].clone();
    let mut probe = switchyard_core::Probe::new(Role::Replica, Duration::ZERO);
    probe.lag = Some(Duration::from_secs(60));
    let event = crate::health::Event::ProbePassed(probe);
    cluster.shared.apply(&ep.state, event);
    assert_eq!(served_by(&cluster, Intent::Read, 50).await, ["r2"]);
    let st = status_of(&cluster, "r1");
    assert_eq!(st.lag, Some(Duration::from_secs(60)));
    assert!(!st.serves_reads);
    // The next real probe (no lag reported) brings it back.
    run_for(Duration::from_secs(1)).await;
    assert_eq!(tally(&cluster, Intent::Read, 50).await.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn weighted_round_robin_through_the_cluster_is_exact() {
    let mut c = config();
    c.strategy = StrategyKind::WeightedRoundRobin;
    let cluster = Cluster::builder("w")
        .config(c)
        .endpoint(
            Arc::new(NoopBackend::with_role("p", Role::Primary)),
            EndpointConfig::new(Role::Primary),
        )
        .endpoint(
            Arc::new(NoopBackend::with_role("a", Role::Replica)),
            EndpointConfig::new(Role::Replica).weight(1),
        )
        .endpoint(
            Arc::new(NoopBackend::with_role("b", Role::Replica)),
            EndpointConfig::new(Role::Replica).weight(2),
        )
        .endpoint(
            Arc::new(NoopBackend::with_role("c", Role::Replica)),
            EndpointConfig::new(Role::Replica).weight(5),
        )
        .build()
        .unwrap();
    settle().await;
    let reads = tally(&cluster, Intent::Read, 80_000).await;
    assert_eq!(
        (reads["a"], reads["b"], reads["c"]),
        (10_000, 20_000, 50_000)
    );
}

#[tokio::test(start_paused = true)]
async fn least_conn_through_the_cluster_spreads_held_checkouts() {
    let (cluster, _) = cluster(3, config()).await;
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(cluster.checkout(Intent::Read, None).await.unwrap());
    }
    let st = cluster.status();
    for r in ["r1", "r2", "r3"] {
        assert_eq!(st.endpoint(r).unwrap().in_flight, 10, "{r}");
    }
    // Free two on r2: the next two checkouts go there.
    let r2: Vec<usize> = held
        .iter()
        .enumerate()
        .filter(|(_, c)| c.endpoint().as_str() == "r2")
        .map(|(i, _)| i)
        .take(2)
        .collect();
    held.remove(r2[1]);
    held.remove(r2[0]);
    for _ in 0..2 {
        held.push(cluster.checkout(Intent::Read, None).await.unwrap());
        assert_eq!(held.last().unwrap().endpoint().as_str(), "r2");
    }
}

#[tokio::test(start_paused = true)]
async fn latency_strategy_moves_reads_off_a_replica_that_turns_slow() {
    fastrand::seed(21);
    let mut c = config();
    c.strategy = StrategyKind::Latency;
    let (cluster, backends) = cluster(3, c).await;
    backends[2].set_acquire_delay(Duration::from_millis(200));
    let mut slow = 0;
    for _ in 0..300 {
        let conn = cluster.checkout(Intent::Read, None).await.unwrap();
        if conn.endpoint().as_str() == "r2" {
            slow += 1;
        }
    }
    assert!(slow <= 1, "{slow} reads went to the slow replica");
}

#[tokio::test(start_paused = true)]
async fn checkouts_are_scoped_and_the_registry_is_live() {
    let (cluster, _) = cluster(1, config()).await;
    let acme = TenantId::new("acme").unwrap();
    let err = cluster
        .checkout(Intent::Read, Some(&acme))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownTenant { .. }), "{err}");
    cluster
        .set_tenants(
            TenantRegistry::new()
                .with_tier("t", TierPolicy::new(Isolation::Row).with_max_connections(1))
                .with_default_tier("t"),
        )
        .unwrap();
    let held = cluster.checkout(Intent::Read, Some(&acme)).await.unwrap();
    assert_eq!(held.tenant(), Some(&acme));
    let opts = crate::CheckoutOptions::new().timeout(Duration::from_millis(100));
    let err = cluster
        .checkout_with(Intent::Read, Some(&acme), opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::QuotaExceeded { .. }),
        "quota applies, not retried: {err}"
    );
    assert!(cluster
        .set_tenants(TenantRegistry::new().with_default_tier("nope"))
        .is_err());
}

/// A checkout for a tenant the registry does not know yet fails at once. A
/// loop that retries it at once must still let the task that registers the
/// tenant (a configuration reload) run, as with an outage
/// (`failover::a_read_retried_at_once_lets_the_health_checks_bring_its_replica_back`).
#[tokio::test(start_paused = true)]
async fn a_checkout_retried_at_once_lets_the_registry_reload_that_knows_its_tenant() {
    let (cluster, _) = cluster(1, config()).await;
    let acme = TenantId::new("acme").unwrap();
    let reloaded = cluster.clone();
    tokio::spawn(async move {
        reloaded
            .set_tenants(
                TenantRegistry::new()
                    .with_tier("t", TierPolicy::new(Isolation::Row))
                    .with_default_tier("t"),
            )
            .unwrap();
    });
    let mut failed = 0u32;
    loop {
        match cluster.checkout(Intent::Read, Some(&acme)).await {
            Ok(conn) => break assert_eq!(conn.tenant(), Some(&acme)),
            Err(error) => assert!(matches!(error, Error::UnknownTenant { .. }), "{error}"),
        }
        failed += 1;
        assert!(
            failed < 100_000,
            "the checkout loop never let the reload run"
        );
    }
    assert!(failed > 0, "the reload ran before the loop started");
}
