//! Pure router overhead: pick + checkout + release on the no-op backend, per
//! balancing strategy, next to deadpool's and bb8's own checkout + release of a
//! trivial object and to core's `Checkout::acquire` without a router.
//!
//! deadpool's get takes a unit of tokio's cooperative budget (its tokio
//! semaphore does), so in a loop of checkouts its task yields to the
//! scheduler every 128 gets; switchyard's checkout of a ready no-op
//! connection takes none. The `deadpool_unconstrained` row runs deadpool's
//! get + drop under `tokio::task::unconstrained`: the same work without
//! those yields, the bookkeeping alone.
//!
//! Every row of one group runs at the same concurrency (1, 2, 8 or 64 tasks on
//! a two-worker runtime); the reported time is wall time per operation, i.e.
//! the inverse of throughput. The raw pools are sized at 64, so no row ever
//! waits for a free object: what is measured is bookkeeping, not queueing.
//!
//! `cargo bench --bench checkout`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::core::noop::NoopBackend;
use switchyard::router::{EndpointConfig, StrategyKind};
use switchyard::{Checkout, CheckoutRequest, Cluster, ClusterConfig, Role};

const STRATEGIES: [(StrategyKind, &str); 4] = [
    (StrategyKind::RoundRobin, "round_robin"),
    (StrategyKind::LeastConn, "least_conn"),
    (StrategyKind::WeightedRoundRobin, "weighted_rr"),
    (StrategyKind::Latency, "latency"),
];

/// Size of the raw pools: at least the largest task count, so nobody waits.
const POOL_SIZE: usize = 64;

/// A trivial pooled object for deadpool.
struct DeadpoolNoop;

impl deadpool::managed::Manager for DeadpoolNoop {
    type Type = u64;
    type Error = Infallible;

    async fn create(&self) -> Result<u64, Infallible> {
        Ok(0)
    }

    async fn recycle(
        &self,
        _: &mut u64,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<Infallible> {
        Ok(())
    }
}

/// A trivial pooled connection for bb8.
struct Bb8Noop;

impl bb8::ManageConnection for Bb8Noop {
    type Connection = u64;
    type Error = Infallible;

    async fn connect(&self) -> Result<u64, Infallible> {
        Ok(0)
    }

    async fn is_valid(&self, _: &mut u64) -> Result<(), Infallible> {
        Ok(())
    }

    fn has_broken(&self, _: &mut u64) -> bool {
        false
    }
}

/// A primary and three replicas (weights 1, 2, 3); reads pick among the replicas.
fn cluster(strategy: StrategyKind) -> Cluster<NoopBackend> {
    let config = ClusterConfig {
        strategy,
        ..ClusterConfig::default()
    };
    let mut builder = Cluster::builder(format!("bench-{strategy:?}"))
        .engine("noop")
        .config(config)
        .endpoint(
            Arc::new(NoopBackend::with_role("primary", Role::Primary)),
            EndpointConfig::new(Role::Primary),
        );
    for i in 1..=3u32 {
        builder = builder.endpoint(
            Arc::new(NoopBackend::with_role(
                format!("replica-{i}"),
                Role::Replica,
            )),
            EndpointConfig::new(Role::Replica).weight(i),
        );
    }
    builder.build().expect("cluster")
}

fn checkout(c: &mut Criterion) {
    let rt = common::runtime();
    let clusters: Vec<_> = {
        let _guard = rt.enter();
        STRATEGIES
            .iter()
            .map(|&(kind, name)| (name, cluster(kind)))
            .collect()
    };
    let deadpool_pool: deadpool::managed::Pool<DeadpoolNoop> =
        deadpool::managed::Pool::builder(DeadpoolNoop)
            .max_size(POOL_SIZE)
            .build()
            .expect("deadpool");
    let bb8_pool = rt.block_on(async {
        bb8::Pool::builder()
            .max_size(POOL_SIZE as u32)
            .build(Bb8Noop)
            .await
            .expect("bb8")
    });
    let noop = Arc::new(NoopBackend::new("direct"));

    for tasks in common::TASKS {
        let mut group = c.benchmark_group(format!("checkout/{tasks}_tasks"));
        for (name, cluster) in &clusters {
            let id = format!("switchyard/{name}");
            common::cluster_row(
                &mut group,
                &rt,
                tasks,
                &id,
                cluster,
                None,
                |conn| async move {
                    black_box(conn.id);
                },
            );
        }
        group.bench_function("core_acquire", |b| {
            b.iter_custom(|iters| {
                let noop = Arc::clone(&noop);
                common::concurrent(&rt, iters, tasks, move |_| {
                    let noop = Arc::clone(&noop);
                    async move {
                        let req = CheckoutRequest::with_timeout(Duration::from_secs(5));
                        let conn = Checkout::acquire(&noop, req).await.unwrap();
                        black_box(conn.id);
                    }
                })
            });
        });
        group.bench_function("deadpool", |b| {
            b.iter_custom(|iters| {
                let pool = deadpool_pool.clone();
                common::concurrent(&rt, iters, tasks, move |_| {
                    let pool = pool.clone();
                    async move {
                        let obj = pool.get().await.unwrap();
                        black_box(*obj);
                    }
                })
            });
        });
        group.bench_function("deadpool_unconstrained", |b| {
            b.iter_custom(|iters| {
                let pool = deadpool_pool.clone();
                common::concurrent(&rt, iters, tasks, move |_| {
                    let pool = pool.clone();
                    tokio::task::unconstrained(async move {
                        let obj = pool.get().await.unwrap();
                        black_box(*obj);
                    })
                })
            });
        });
        group.bench_function("bb8", |b| {
            b.iter_custom(|iters| {
                let pool = bb8_pool.clone();
                common::concurrent(&rt, iters, tasks, move |_| {
                    let pool = pool.clone();
                    async move {
                        let conn = pool.get().await.unwrap();
                        black_box(*conn);
                    }
                })
            });
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = checkout
}
criterion_main!(benches);
