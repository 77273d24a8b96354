//! Helpers shared by the benches: the runtime, the Criterion settings and a
//! driver that spreads one measured batch over concurrent tasks.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use switchyard::core::QueueOrder;
use switchyard::{
    Backend, Checkout, CheckoutRequest, Cluster, Intent, Isolation, TenantId, TenantRegistry,
    TierPolicy,
};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Concurrency levels of the throughput benches.
pub const TASKS: [usize; 4] = [1, 2, 8, 64];

/// A multi-threaded runtime with one worker per core (two on the reference box).
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Short runs: the machine has two cores shared with other builds.
/// Command-line flags (`--quick`, `--measurement-time`, ...) still override.
pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

/// Runs `iters` operations split over `tasks` concurrent tasks and returns the
/// wall time scaled to exactly `iters` operations, so Criterion reports the
/// inverse of throughput (time per operation at that concurrency). `op` is
/// told which task (0..tasks) it runs on.
pub fn concurrent<F, Fut>(rt: &Runtime, iters: u64, tasks: usize, op: F) -> Duration
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tasks_u64 = tasks as u64;
    let per_task = iters.div_ceil(tasks_u64).max(1);
    let op = Arc::new(op);
    rt.block_on(async move {
        let mut set = JoinSet::new();
        let start = Arc::new(tokio::sync::Barrier::new(tasks + 1));
        for task in 0..tasks {
            let op = Arc::clone(&op);
            let start = Arc::clone(&start);
            set.spawn(async move {
                start.wait().await;
                for _ in 0..per_task {
                    op(task).await;
                }
            });
        }
        start.wait().await;
        let began = Instant::now();
        while let Some(done) = set.join_next().await {
            done.expect("bench task panicked");
        }
        let elapsed = began.elapsed();
        elapsed.mul_f64(iters as f64 / (per_task * tasks_u64) as f64)
    })
}

/// Tenants per scoped row of the engine benches; task `i` serves tenant
/// `i % TENANTS`.
pub const TENANTS: usize = 8;

/// Tenants `s0..s7` on a tier `schema` (schema or key-prefix isolation) and
/// `r0..r7` on a tier `row` (row isolation, names `row_{id}`).
pub fn tenants() -> TenantRegistry {
    tenants_queued(QueueOrder::Fair)
}

/// [`tenants`] with both tiers queued in `order` (fair, the default, or FIFO).
pub fn tenants_queued(order: QueueOrder) -> TenantRegistry {
    let mut registry = TenantRegistry::new()
        .with_tier(
            "schema",
            TierPolicy::new(Isolation::Schema).with_queue(order),
        )
        .with_tier(
            "row",
            TierPolicy::new(Isolation::Row)
                .with_name_template("row_{id}".parse().expect("template"))
                .with_queue(order),
        );
    for i in 0..TENANTS {
        registry = registry
            .with_tenant(tenant(&format!("s{i}")), "schema")
            .with_tenant(tenant(&format!("r{i}")), "row");
    }
    registry
}

/// A bench tenant id.
pub fn tenant(id: &str) -> TenantId {
    TenantId::new(id).expect("tenant id")
}

/// `{prefix}0` to `{prefix}7`.
pub fn tenant_ids(prefix: &str) -> Arc<Vec<TenantId>> {
    Arc::new(
        (0..TENANTS)
            .map(|i| tenant(&format!("{prefix}{i}")))
            .collect(),
    )
}

/// How long a bench checkout may wait before the bench fails.
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `backend/unscoped` row of an engine bench: `Checkout::acquire` on
/// `backend` alone, then `work` on the connection.
pub fn backend_row<B, W, Fut>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    tasks: usize,
    backend: &Arc<B>,
    work: W,
) where
    B: Backend,
    W: Fn(Checkout<B>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    group.bench_function("backend/unscoped", |b| {
        b.iter_custom(|iters| {
            let backend = Arc::clone(backend);
            concurrent(rt, iters, tasks, move |_| {
                let backend = Arc::clone(&backend);
                async move {
                    let req = CheckoutRequest::with_timeout(CHECKOUT_TIMEOUT);
                    work(Checkout::acquire(&backend, req).await.unwrap()).await;
                }
            })
        });
    });
}

/// A `cluster/...` row of an engine bench: a routed read checkout, unscoped or
/// for one of `tenants` (task *i* serves tenant *i* mod their number), then
/// `work` on the connection.
pub fn cluster_row<B, W, Fut>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    tasks: usize,
    name: &str,
    cluster: &Cluster<B>,
    tenants: Option<&Arc<Vec<TenantId>>>,
    work: W,
) where
    B: Backend,
    W: Fn(Checkout<B>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let cluster = cluster.clone();
            let tenants = tenants.cloned();
            concurrent(rt, iters, tasks, move |task| {
                let cluster = cluster.clone();
                let tenants = tenants.clone();
                async move {
                    let tenant = tenants.as_ref().map(|ids| &ids[task % ids.len()]);
                    work(cluster.checkout(Intent::Read, tenant).await.unwrap()).await;
                }
            })
        });
    });
}

/// This process's resident set size in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
