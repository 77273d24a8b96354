//! Fair queuing under a noisy tenant: one tenant with 200 concurrent tasks
//! and three quiet tenants with 2 each share one pool of 16, on the no-op
//! backend (a `FairGate` of 16; the hold is one scheduler yield; scoped
//! connections reset on a task, or, in the `noop/clean_returns` groups, come
//! back clean, with and without the gate's linger) and on the testkit's
//! PostgreSQL (the hold is `SELECT 1`; schema isolation).
//!
//! Rows, per backend:
//! - `alone`: the six quiet tasks by themselves;
//! - `fifo`: everyone, every tier queued first come, first served (one
//!   class: what the pools did before fair queuing);
//! - `fair`: everyone, each tenant its own class (the default).
//!
//! The time Criterion reports is wall time per checkout over all tasks (the
//! inverse of throughput). The quiet tenants' checkout waits (the guard's
//! `waited`) are collected over the whole run of a row and printed as
//! `quiet wait ...` lines with p50 and p99.
//!
//! `cargo bench --bench fairness -- --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::core::noop::NoopBackend;
use switchyard::core::{FairGate, QueueOrder, DEFAULT_LINGER};
use switchyard::postgres::{PgBackend, PgBackendConfig};
use switchyard::{
    Backend, Checkout, CheckoutRequest, Isolation, PoolSettings, TenantId, TenantRegistry,
    TierPolicy,
};
use switchyard_testkit::PgCluster;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tokio::time::Instant;

const POOL_SIZE: u32 = 16;
const NOISY_TASKS: usize = 200;
const QUIET_TENANTS: [&str; 3] = ["s1", "s2", "s3"];
const QUIET_TASKS_EACH: usize = 2;

fn registry(order: QueueOrder) -> Arc<TenantRegistry> {
    let mut registry = TenantRegistry::new().with_tier(
        "schema",
        TierPolicy::new(Isolation::Schema).with_queue(order),
    );
    for id in ["s0", "s1", "s2", "s3"] {
        registry = registry.with_tenant(TenantId::new(id).unwrap(), "schema");
    }
    Arc::new(registry)
}

/// Who runs: the quiet tasks, and the noisy ones unless `alone`.
fn workload(alone: bool) -> Vec<(&'static str, bool)> {
    let mut tasks = Vec::new();
    if !alone {
        tasks.extend(std::iter::repeat_n(("s0", false), NOISY_TASKS));
    }
    for id in QUIET_TENANTS {
        tasks.extend(std::iter::repeat_n((id, true), QUIET_TASKS_EACH));
    }
    tasks
}

/// Runs `iters` checkouts in all over the workload's tasks, each holding its
/// connection through `hold`; returns the wall time and adds every quiet
/// checkout's wait (ns) to `waits`.
fn run<B, H, Fut>(
    rt: &Runtime,
    iters: u64,
    backend: &Arc<B>,
    registry: &Arc<TenantRegistry>,
    alone: bool,
    waits: &Arc<Mutex<Vec<Wait>>>,
    hold: H,
) -> Duration
where
    B: Backend,
    H: Fn(Checkout<B>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    rt.block_on(async {
        let budget = Arc::new(AtomicI64::new(i64::try_from(iters).unwrap()));
        let tasks = workload(alone);
        let start = Arc::new(tokio::sync::Barrier::new(tasks.len() + 1));
        let mut set = JoinSet::new();
        for (id, quiet) in tasks {
            let entry = registry.resolve(&TenantId::new(id).unwrap()).unwrap();
            let (backend, budget, start, waits) = (
                Arc::clone(backend),
                Arc::clone(&budget),
                Arc::clone(&start),
                Arc::clone(waits),
            );
            set.spawn(async move {
                let mut mine = Vec::new();
                start.wait().await;
                while budget.fetch_sub(1, Ordering::Relaxed) > 0 {
                    let req =
                        CheckoutRequest::with_timeout(common::CHECKOUT_TIMEOUT).tenant(&entry);
                    let conn = Checkout::acquire(&backend, req).await.unwrap();
                    let waited = conn.waited();
                    let held = Instant::now();
                    hold(conn).await;
                    if quiet {
                        mine.push(Wait {
                            ns: u64::try_from(waited.as_nanos()).unwrap(),
                            hold_ns: u64::try_from(held.elapsed().as_nanos()).unwrap(),
                            first: mine.is_empty(),
                        });
                    }
                }
                waits.lock().unwrap().extend(mine);
            });
        }
        start.wait().await;
        let began = Instant::now();
        while let Some(done) = set.join_next().await {
            done.expect("bench task panicked");
        }
        began.elapsed()
    })
}

/// One quiet checkout's wait, how long its hold took (the query itself, on
/// PostgreSQL: what the server's load does to a round trip, queue aside),
/// and whether it was its task's first of a run (when all tasks start
/// together).
struct Wait {
    ns: u64,
    hold_ns: u64,
    first: bool,
}

/// Prints the quiet waits' p50 and p99: of all of them (the figure the bar
/// is about), and without each task's first checkout of a run.
fn report(name: &str, waits: &Mutex<Vec<Wait>>) {
    let waits = std::mem::take(&mut *waits.lock().unwrap());
    let percentiles = |mut ns: Vec<u64>| {
        ns.sort_unstable();
        let at = |q: f64| {
            let i = ((ns.len() as f64 - 1.0) * q).round() as usize;
            Duration::from_nanos(ns.get(i).copied().unwrap_or(0))
        };
        (at(0.50), at(0.99), ns.len())
    };
    let (p50, p99, n) = percentiles(waits.iter().map(|w| w.ns).collect());
    let (later50, later99, _) =
        percentiles(waits.iter().filter(|w| !w.first).map(|w| w.ns).collect());
    let (hold50, hold99, _) = percentiles(waits.iter().map(|w| w.hold_ns).collect());
    println!(
        "quiet wait {name}: p50 {p50:?} p99 {p99:?} ({n} checkouts); \
         without each task's first of a run: p50 {later50:?} p99 {later99:?}; \
         quiet hold: p50 {hold50:?} p99 {hold99:?}"
    );
}

/// Resets and checkouts so far (PostgreSQL's `pg_stats`), for the share of
/// checkouts that changed owner.
type Changes<'a> = &'a dyn Fn() -> Option<(u64, u64)>;

fn rows<B, H, Fut>(
    c: &mut Criterion,
    rt: &Runtime,
    group: &str,
    backend: &Arc<B>,
    hold: H,
    changes: Changes<'_>,
) where
    B: Backend,
    H: Fn(Checkout<B>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut g = c.benchmark_group(format!("fairness/{group}"));
    for (row, order, alone) in [
        ("alone", QueueOrder::Fair, true),
        ("fifo", QueueOrder::Fifo, false),
        ("fair", QueueOrder::Fair, false),
    ] {
        let registry = registry(order);
        let waits = Arc::new(Mutex::new(Vec::<Wait>::new()));
        let before = changes();
        g.bench_function(row, |b| {
            b.iter_custom(|iters| run(rt, iters, backend, &registry, alone, &waits, hold));
        });
        report(&format!("{group}/{row}"), &waits);
        if let Some(((r0, c0), (r1, c1))) = before.zip(changes()) {
            let share = (r1 - r0) as f64 / (c1 - c0).max(1) as f64;
            println!(
                "owner changes {group}/{row}: {:.1}% of {} checkouts",
                share * 100.0,
                c1 - c0
            );
        }
    }
    g.finish();
}

async fn yield_once(conn: Checkout<NoopBackend>) {
    tokio::task::yield_now().await;
    drop(conn);
}

async fn select_one(mut conn: Checkout<PgBackend>) {
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    std::hint::black_box(one);
}

fn fairness(c: &mut Criterion) {
    let rt = common::runtime();
    let noop = Arc::new(NoopBackend::new("noop").with_max_size(POOL_SIZE));
    rows(c, &rt, "noop", &noop, yield_once, &|| None);
    // Scoped connections that come back clean (an engine whose scope is per
    // request: Elasticsearch, ClickHouse, MongoDB): the permit is given back
    // in the drop, so the gate's linger can keep it for a quiet tenant's
    // next checkout; and the same gate without the linger.
    for (group, linger) in [
        ("noop/clean_returns", DEFAULT_LINGER),
        ("noop/clean_returns/no_linger", Duration::ZERO),
    ] {
        let gate = FairGate::with_linger(POOL_SIZE, linger);
        let clean = Arc::new(NoopBackend::new(group).with_gate(gate).with_clean_returns());
        rows(c, &rt, group, &clean, yield_once, &|| None);
    }

    let pg = rt
        .block_on(PgCluster::start(0))
        .expect("postgres (testkit)");
    let url = pg.primary().url().to_owned();
    // The default hand-off (bypass bound 4, linger 1ms), and the same without
    // the linger: every return goes on to whoever waits.
    let pool = PoolSettings::default().with_max_size(POOL_SIZE);
    let lingers = [
        ("postgres", pool.clone()),
        ("postgres/no_linger", pool.with_linger(Duration::ZERO)),
    ];
    for (group, pool) in lingers {
        let config =
            PgBackendConfig::builder(format!("pg-{}", group.replace('/', "-")), url.as_str())
                .pool(pool)
                .config();
        let backend = {
            let _runtime = rt.enter();
            Arc::new(PgBackend::new(config).expect("pg backend"))
        };
        rt.block_on(async {
            let mut conn = Checkout::acquire(
                &backend,
                CheckoutRequest::with_timeout(common::CHECKOUT_TIMEOUT),
            )
            .await
            .unwrap();
            for id in ["s0", "s1", "s2", "s3"] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE SCHEMA IF NOT EXISTS tenant_{id}"
                )))
                .execute(&mut *conn)
                .await
                .expect("create schema");
            }
        });
        let changes = || {
            let s = backend.pg_stats();
            Some((s.resets, s.affinity_hits + s.affinity_misses))
        };
        rows(c, &rt, group, &backend, select_one, &changes);
        rt.block_on(async move { drop(backend) });
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = fairness
}
criterion_main!(benches);
