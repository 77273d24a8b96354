//! What causal reads cost the router, on the no-op backend: a read checkout
//! without a token (every read that does not ask for read-your-writes) next
//! to the same checkout on a cluster whose nodes report replication
//! positions, and to token reads.
//!
//! Rows of one group run at the same concurrency on a two-worker runtime; the
//! time is wall time per checkout + release (the inverse of throughput):
//!
//! - `no_token`: `Cluster::checkout(Read)`, nodes without positions;
//! - `no_token_positions`: the same, every node probed with a position (what
//!   a PostgreSQL, Redis or MongoDB cluster looks like to the router);
//! - `token_probed`: `checkout_after` with a token the picked replica's last
//!   probe already covers (no confirmation);
//! - `token_confirmed`: a token the probes do not cover, so each read asks
//!   its node once (the no-op backend answers at once: the router's part of
//!   a confirmation, without the round trip).
//!
//! The no-token path runs no causal code, so `no_token` and
//! `no_token_positions` should be level with each other and with the
//! `checkout/*/switchyard/round_robin` row of `benches/checkout.rs`.
//!
//! `cargo bench --bench causal -- --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::core::noop::NoopBackend;
use switchyard::core::History;
use switchyard::router::{CheckoutOptions, EndpointConfig};
use switchyard::{CausalToken, Cluster, ClusterConfig, Role};

const TASKS: [usize; 2] = [1, 64];

/// A timeline position, as a PostgreSQL node reports it.
fn at(position: u64) -> History {
    History::Timeline {
        system: 7,
        timeline: 1,
        position,
    }
}

/// A primary and three replicas, round robin, probed every `interval`, and
/// their backends; every node reports position `applied` (`None`: none).
fn cluster(
    name: &str,
    applied: Option<u64>,
    interval: Duration,
) -> (Cluster<NoopBackend>, Vec<Arc<NoopBackend>>) {
    let mut config = ClusterConfig::default();
    config.health.interval = interval;
    let mut nodes = Vec::new();
    let mut builder = Cluster::builder(name).engine("noop").config(config);
    for i in 0..4 {
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        let backend = Arc::new(NoopBackend::with_role(format!("node-{i}"), role));
        backend.set_replication(applied.map(at), Some(true));
        builder = builder.endpoint(Arc::clone(&backend), EndpointConfig::new(role));
        nodes.push(backend);
    }
    (builder.build().expect("cluster"), nodes)
}

fn causal(c: &mut Criterion) {
    let rt = common::runtime();
    let often = Duration::from_millis(20);
    let (plain, positions, asked, nodes) = {
        let _guard = rt.enter();
        let (plain, _) = cluster("plain", None, often);
        let (positions, _) = cluster("positions", Some(1_000), often);
        // Probed once, without a position, then never again (within the
        // run): every token read asks its node, which has the position.
        let (asked, nodes) = cluster("asked", None, Duration::from_secs(3_600));
        (plain, positions, asked, nodes)
    };
    // Let the first probes report.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
    for node in &nodes {
        node.set_replication(Some(at(1_000)), Some(true));
    }
    let token = |cluster: &str| CausalToken::new(cluster, at(1_000)).expect("a position");

    for tasks in TASKS {
        let mut group = c.benchmark_group(format!("causal/{tasks}_tasks"));
        let rows: [(&str, Cluster<NoopBackend>); 2] = [
            ("no_token", plain.clone()),
            ("no_token_positions", positions.clone()),
        ];
        for (name, cluster) in rows {
            common::cluster_row(
                &mut group,
                &rt,
                tasks,
                name,
                &cluster,
                None,
                |conn| async move {
                    black_box(conn.id);
                },
            );
        }
        let rows: [(&str, Cluster<NoopBackend>, CausalToken); 2] = [
            ("token_probed", positions.clone(), token("positions")),
            ("token_confirmed", asked.clone(), token("asked")),
        ];
        for (name, cluster, token) in rows {
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let (cluster, token) = (cluster.clone(), token.clone());
                    common::concurrent(&rt, iters, tasks, move |_| {
                        let (cluster, token) = (cluster.clone(), token.clone());
                        async move {
                            let conn = cluster
                                .checkout_after(&token, None, CheckoutOptions::new())
                                .await
                                .unwrap();
                            black_box(conn.id);
                        }
                    })
                });
            });
        }
        group.finish();
    }
    // Where the token reads went: all on replicas, none waited or fell back.
    for (name, cluster) in [("token_probed", &positions), ("token_confirmed", &asked)] {
        eprintln!("{name}: {:?}", cluster.causal_stats());
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = causal
}
criterion_main!(benches);
