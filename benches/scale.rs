//! How costs grow with the size of the deployment:
//!
//! - `scale/pick/<strategy>/<n>`: one strategy pick over `n` candidate
//!   endpoints (1 to 1,024), on the strategy alone;
//! - `scale/cluster_checkout/<strategy>/<n>`: a whole no-op routed checkout
//!   (pick + checkout + release) with `n` replicas in the cluster;
//! - `scale/resolve/<n>`: `TenantRegistry::resolve` with `n` registered
//!   tenants (1 to 100,000), all resolved once before;
//! - memory per idle tenant pool: database-per-tenant pools opened on the
//!   testkit's PostgreSQL, measured as live heap bytes (a counting global
//!   allocator) and as RSS growth (`/proc/self/statm`) per pool, next to plain
//!   sqlx pools, printed.
//!
//! `cargo bench --bench scale`
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The counting allocator below is the one unsafe item: `GlobalAlloc` is an
// unsafe trait, and each method only forwards to `System`.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sqlx::postgres::PgPoolOptions;
use switchyard::core::noop::NoopBackend;
use switchyard::postgres::{PgBackend, PgBackendConfig};
use switchyard::router::__bench::{Load, LoadCell, Picker, Strategy};
use switchyard::router::{EndpointConfig, StrategyKind};
use switchyard::{
    Backend as _, Checkout, CheckoutRequest, Cluster, ClusterConfig, Intent, Isolation, Role,
    TenantId, TenantRegistry, TierPolicy,
};
use switchyard_testkit::PgCluster;
use tokio::time::Instant;

const STRATEGIES: [(StrategyKind, &str); 4] = [
    (StrategyKind::RoundRobin, "round_robin"),
    (StrategyKind::LeastConn, "least_conn"),
    (StrategyKind::WeightedRoundRobin, "weighted_rr"),
    (StrategyKind::Latency, "latency"),
];
const ENDPOINTS: [usize; 4] = [1, 8, 64, 1024];
const CLUSTER_ENDPOINTS: [usize; 3] = [1, 64, 1024];
const TENANTS: [usize; 4] = [1, 100, 10_000, 100_000];
/// Idle tenant pools opened for the memory figure.
const TENANT_POOLS: usize = 64;

/// Counts live heap bytes, so the memory figure does not depend on how the
/// allocator hands pages back (RSS alone barely moves for a few KiB).
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

fn track(delta: usize, grow: bool) {
    let delta = i64::try_from(delta).unwrap_or(i64::MAX);
    if grow {
        LIVE_BYTES.fetch_add(delta, Ordering::Relaxed);
    } else {
        LIVE_BYTES.fetch_sub(delta, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments and
// only adds bookkeeping on an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            track(layout.size(), true);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            track(layout.size(), true);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        track(layout.size(), false);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            track(layout.size(), false);
            track(new_size, true);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// A candidate as a strategy sees it: its cell of weight, load and a
/// latency estimate (no samples: it only decays from its initial value).
struct Candidate(Arc<LoadCell>);

impl Load for Candidate {
    fn cell(&self) -> &Arc<LoadCell> {
        &self.0
    }
}

fn candidates(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| {
            Candidate(Arc::new(LoadCell::new(
                1 + (i % 4) as u32,
                Duration::from_secs(10),
                Duration::from_micros(1_000 + (i % 7) as u64 * 100),
            )))
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("scale/pick");
    for (kind, name) in STRATEGIES {
        for n in ENDPOINTS {
            let candidates = candidates(n);
            let picker = Picker::new(kind, &candidates);
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| black_box(picker.pick(black_box(&candidates))));
            });
        }
    }
    group.finish();
}

fn cluster_checkout(c: &mut Criterion) {
    let rt = common::runtime();
    let mut group = c.benchmark_group("scale/cluster_checkout");
    for (kind, name) in STRATEGIES {
        for n in CLUSTER_ENDPOINTS {
            let cluster = {
                let _guard = rt.enter();
                let config = ClusterConfig {
                    strategy: kind,
                    ..ClusterConfig::default()
                };
                let mut builder = Cluster::builder(format!("scale-{name}-{n}"))
                    .config(config)
                    .endpoint(
                        Arc::new(NoopBackend::with_role("primary", Role::Primary)),
                        EndpointConfig::new(Role::Primary),
                    );
                for i in 0..n {
                    builder = builder.endpoint(
                        Arc::new(NoopBackend::with_role(
                            format!("replica-{i}"),
                            Role::Replica,
                        )),
                        EndpointConfig::new(Role::Replica).weight(1 + (i % 4) as u32),
                    );
                }
                builder.build().expect("cluster")
            };
            let settled = rt.block_on(first_probes_applied(&cluster));
            println!(
                "scale/cluster_checkout/{name}/{n}: first probe of every endpoint applied \
                 {:.1} ms after the build",
                settled.as_secs_f64() * 1e3
            );
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.to_async(&rt).iter(|| async {
                    let conn = cluster.checkout(Intent::Read, None).await.unwrap();
                    black_box(conn.id);
                });
            });
            rt.block_on(async move { drop(cluster) });
        }
    }
    group.finish();
}

/// Waits until the first probe of every endpoint has been applied; returns
/// how long that took.
///
/// A new cluster probes every endpoint at once, and each first answer rebuilds
/// the routing snapshot (the role it reports replaces the configured guess):
/// `n` rebuilds of O(n) each, on the runtime's workers. Measuring checkouts
/// during that start-up would charge the larger rows with it, for as long as
/// it outlasts the warm-up; every row waits for it instead, and the time is
/// printed. The later probe rounds (every `health.interval`, the default for
/// every row) run during the measurement as they would in service.
async fn first_probes_applied(cluster: &Cluster<NoopBackend>) -> Duration {
    let started = Instant::now();
    while cluster
        .status()
        .endpoints
        .iter()
        .any(|e| e.probe_rtt.is_none())
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

fn resolve(c: &mut Criterion) {
    let mut group = c.benchmark_group("scale/resolve");
    for n in TENANTS {
        let ids: Vec<TenantId> = (0..n)
            .map(|i| TenantId::new(&format!("tenant-{i}")).unwrap())
            .collect();
        let mut registry = TenantRegistry::new()
            .with_tier("standard", TierPolicy::new(Isolation::Row))
            .with_tier(
                "premium",
                TierPolicy::new(Isolation::Schema)
                    .with_name_template("premium_{id}".parse().expect("template")),
            );
        for (i, id) in ids.iter().enumerate() {
            registry =
                registry.with_tenant(id.clone(), if i % 2 == 0 { "standard" } else { "premium" });
        }
        for id in &ids {
            registry.resolve(id).unwrap();
        }
        let next = AtomicUsize::new(0);
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                // A stride that is coprime with every n here, so lookups wander
                // over the whole map instead of hitting one cache line.
                let i = next.fetch_add(7919, Ordering::Relaxed) % n;
                black_box(registry.resolve(&ids[i]).unwrap());
            });
        });
    }
    group.finish();
}

/// Opens `TENANT_POOLS` database-per-tenant pools (one idle connection each)
/// and prints the RSS growth per pool, next to the same number of plain sqlx
/// pools. Runs once; the figure is printed, not sampled.
fn tenant_pool_memory(_: &mut Criterion) {
    let rt = common::runtime();
    rt.block_on(async {
        let pg = PgCluster::start(0).await.expect("postgres (testkit)");
        let url = pg.primary().url().to_owned();
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("admin pool");
        for i in 0..TENANT_POOLS {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE tenant_d{i}")))
                .execute(&admin)
                .await
                .expect("create database");
        }
        let ids: Vec<TenantId> = (0..TENANT_POOLS)
            .map(|i| TenantId::new(&format!("d{i}")).unwrap())
            .collect();
        let registry = TenantRegistry::new()
            .with_tier("dedicated", TierPolicy::new(Isolation::Database))
            .with_default_tier("dedicated");
        let backend = Arc::new(
            PgBackend::new(
                PgBackendConfig::builder("pg-tenants", url.as_str())
                    .max_tenant_pools(TENANT_POOLS)
                    .config(),
            )
            .expect("pg backend"),
        );
        // One warm-up checkout so one-off allocations (statement caches, TLS
        // config, runtime buffers) are not charged to the pools measured.
        let warm = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(Duration::from_secs(10)),
        )
        .await
        .expect("warm-up checkout");
        drop(warm);
        settle().await;

        let before = common::rss_bytes();
        let heap_before = live_bytes();
        for id in &ids {
            let entry = registry.resolve(id).unwrap();
            let mut conn = Checkout::acquire(
                &backend,
                CheckoutRequest::with_timeout(Duration::from_secs(10)).tenant(&entry),
            )
            .await
            .expect("tenant checkout");
            let one: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            black_box(one);
        }
        settle().await;
        let after = common::rss_bytes();
        let heap_after = live_bytes();
        let stats = backend.stats();

        let (base, _) = url.rsplit_once('/').expect("database in url");
        let raw_before = common::rss_bytes();
        let raw_heap_before = live_bytes();
        let mut raw_pools = Vec::with_capacity(TENANT_POOLS);
        for i in 0..TENANT_POOLS {
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect(&format!("{base}/tenant_d{i}"))
                .await
                .expect("raw tenant pool");
            let one: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&pool)
                .await
                .unwrap();
            black_box(one);
            raw_pools.push(pool);
        }
        settle().await;
        let raw_after = common::rss_bytes();
        let raw_heap_after = live_bytes();

        let kib_per_pool = |delta: f64| delta / TENANT_POOLS as f64 / 1024.0;
        println!(
            "scale/tenant_pool_memory: {TENANT_POOLS} idle database-per-tenant pools \
             (backend reports {} tenant pools, {} connections open), client side, per pool: \
             switchyard {:.1} KiB heap / {:.1} KiB RSS; \
             raw sqlx PgPool (max 4, 1 idle connection) {:.1} KiB heap / {:.1} KiB RSS",
            stats.tenant_pools,
            stats.size,
            kib_per_pool((heap_after - heap_before) as f64),
            kib_per_pool(after as f64 - before as f64),
            kib_per_pool((raw_heap_after - raw_heap_before) as f64),
            kib_per_pool(raw_after as f64 - raw_before as f64),
        );
        for pool in raw_pools {
            pool.close().await;
        }
        drop(backend);
        admin.close().await;
        drop(pg);
    });
}

/// Lets background returns and connection tasks finish before RSS is read.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = pick, cluster_checkout, resolve, tenant_pool_memory
}
criterion_main!(benches);
