//! The live reconfiguration scenario: endpoints, weights and the strategy
//! change under load.

use std::time::Duration;

use switchyard_core::{EndpointId, Intent, Role};
use switchyard_router::{Cluster, EndpointConfig, StrategyKind};
use switchyard_testkit::ReplicaSet;
use tokio::time::Instant;

use super::{name, start, timeline, Fixture, READERS, WRITERS};
use crate::common::*;

/// Endpoints join and leave, a weight and the strategy change, all under
/// load: no checkout fails, and each change shows in where reads go.
pub async fn live_reconfiguration<F: Fixture>() {
    let tl = timeline::<F>("live reconfiguration");
    let bed = start::<F>(&tl).await;
    let nodes = bed.nodes();
    let [n0, n1, n2] = [0, 1, 2].map(name::<F>);
    let alias = format!("{n2}-alias");
    let first_n1 = F::backend(&n1, &nodes[1]);
    let cluster = Cluster::builder("live")
        .engine(F::ENGINE)
        .config(fast_config(Duration::from_millis(2500)))
        .endpoint(
            F::backend(&n0, &nodes[0]),
            EndpointConfig::new(Role::Primary),
        )
        .endpoint(first_n1.clone(), EndpointConfig::new(Role::Replica))
        .build()
        .unwrap();
    wait_ready(&cluster, &n0).await;
    let (reads, writes) = F::SETTLE;
    let load = Load::start(READERS, WRITERS, F::reader(&cluster), F::writer(&cluster));
    let t0 = tl.mark(format!(
        "{} load started on {n0} + {n1} (least_conn)",
        F::ENGINE
    ));
    load.settle(t0, reads, writes).await;

    let added = tl.mark(format!("add {n2} (replica, weight 1)"));
    cluster
        .add_endpoint(
            F::backend(&n2, &nodes[2]),
            EndpointConfig::new(Role::Replica),
        )
        .unwrap();
    load.settle(added, reads.max(300), writes).await;

    let weighted = tl.mark(format!("weighted_round_robin, {n2} weight 4"));
    cluster.set_strategy(StrategyKind::WeightedRoundRobin);
    cluster
        .set_weight(&EndpointId::new(n2.as_str()), 4)
        .unwrap();
    load.settle(weighted, 500, writes).await;

    let removed = tl.mark(format!("remove {n1}"));
    assert!(cluster.remove_endpoint(&EndpointId::new(n1.as_str())));
    let removed_done = Instant::now();
    load.settle(removed_done, reads.max(300), writes).await;
    let quiet_from = removed_done + GRACE;

    let readded = tl.mark(format!("add {n1} back (new backend), latency strategy"));
    let quiet_to = readded;
    cluster
        .add_endpoint(
            F::backend(&n1, &nodes[1]),
            EndpointConfig::new(Role::Replica).weight(2),
        )
        .unwrap();
    cluster.set_strategy(StrategyKind::Latency);
    load.settle(readded, reads.max(300), writes).await;

    let churn = tl.mark(format!(
        "churn: add and remove {alias} 10 times, round_robin"
    ));
    cluster.set_strategy(StrategyKind::RoundRobin);
    for _ in 0..10 {
        cluster
            .add_endpoint(
                F::backend(&alias, &nodes[2]),
                EndpointConfig::new(Role::Replica),
            )
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(cluster.remove_endpoint(&EndpointId::new(alias.as_str())));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load.settle(Instant::now(), reads, writes).await;

    let end = tl.mark("stop load");
    let ops = load.stop().await;
    let phases = [
        ("two endpoints", t0),
        ("+ third", added),
        ("wrr, third weight 4", weighted),
        ("- second", removed),
        ("+ second again, latency", readded),
        ("churn, round robin", churn),
    ];
    phase_report(&tl, &ops, &phases, end);

    assert!(
        ops.iter().all(|o| o.ok()),
        "failed checkouts: {:?} {:?}",
        error_counts(&ops),
        first_failures(&ops)
    );
    let reads_on = |ep: &str, from: Instant, to: Instant| {
        ops.iter()
            .filter(|o| o.intent == Intent::Read && o.on(ep) && o.start >= from && o.start < to)
            .count()
    };
    assert!(
        reads_on(&n2, added, weighted) > 0,
        "{n2} got no reads once added"
    );
    let (w1, w4) = (
        reads_on(&n1, weighted, removed),
        reads_on(&n2, weighted, removed),
    );
    tl.note(format!(
        "weighted phase: {n1} (weight 1) {w1} reads, {n2} (weight 4) {w4} reads"
    ));
    assert!(w4 >= 2 * w1, "weights not followed: {n1} {w1}, {n2} {w4}");
    // The removed backend got nothing once remove_endpoint returned.
    assert_eq!(
        first_n1.attempts_between(quiet_from, quiet_to),
        0,
        "checkouts reached a removed endpoint"
    );
    assert_eq!(reads_on(&n1, quiet_from, quiet_to), 0);
    assert!(
        reads_on(&n1, readded, churn) > 0,
        "{n1} got no reads once re-added"
    );
    assert_eq!(cluster.status().endpoints.len(), 3);
}
