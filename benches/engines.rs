//! One cheap operation per engine, raw driver next to switchyard, for MongoDB,
//! ClickHouse and Elasticsearch, against the testkit's servers (MongoDB and
//! Elasticsearch are the wire-compatible stand-ins unless
//! `SWITCHYARD_MONGODB_URL` / `SWITCHYARD_ELASTICSEARCH_URL` point at real
//! ones; ClickHouse is the real server).
//!
//! One Criterion group per engine (`engines_mongodb`, `engines_clickhouse`,
//! `engines_elasticsearch`, plus `engines_clickhouse_tls`: plaintext next to
//! TLS on one server); in each, rows at 1 and 16 concurrent tasks, the
//! time being wall time per operation (the inverse of throughput):
//!
//! - `raw`: the driver's own client, built by the bench (own pool);
//! - `unscoped`: `Checkout::acquire` on the switchyard backend (no router),
//!   then the same operation, then release;
//! - `tenant`: the same through a checkout scoped to tenant `acme` on a
//!   database-isolation tier (its own database for MongoDB and ClickHouse, its
//!   own index for Elasticsearch);
//! - `raw_tenant`: the driver doing the operation on the tenant's database or
//!   index directly, the baseline of `tenant`.
//!
//! The operations:
//!
//! - MongoDB: `find_one({})` on a one-document collection (through
//!   [`ScopedCollection`](switchyard::mongodb::ScopedCollection) for checkouts);
//! - ClickHouse: `SELECT 1` read as a `u8` (validation off, as the backend does),
//!   through `ChConnection::client()` for checkouts;
//! - Elasticsearch: `_count` on a one-document index (the raw client for
//!   unscoped checkouts, `EsConnection::count` for tenant checkouts).
//!
//! After the run the bench prints, per engine and concurrency, the median of
//! each switchyard row over the median of its raw baseline, read back from
//! Criterion's `new/estimates.json` (nothing to print under `--test`).
//!
//! `cargo bench --features full --bench engines`
//! (smoke: `cargo bench --features full --bench engines -- --test`)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion};
use serde_json::{json, Value};
use switchyard::clickhouse::{clickhouse, ChBackend};
use switchyard::core::TenantEntry;
use switchyard::elasticsearch::elasticsearch::http::transport::Transport;
use switchyard::elasticsearch::elasticsearch::indices::IndicesCreateParts;
use switchyard::elasticsearch::elasticsearch::{CountParts, Elasticsearch, IndexParts};
use switchyard::elasticsearch::{create_tenant_index, EsBackend, Refresh};
use switchyard::mongodb::mongodb::bson::{doc, Document};
use switchyard::mongodb::{mongodb, MongoBackend, MongoBackendConfig};
use switchyard::{
    Backend, Checkout, CheckoutRequest, Isolation, PoolSettings, TenantId, TenantRegistry,
    TierPolicy, TlsSettings,
};
use switchyard_testkit::{ClickHouse, ElasticServer, MongoServer, TestCa};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Concurrency levels: one task, and 16 tasks sharing one pool.
const TASKS: [usize; 2] = [1, 16];
/// Checkouts out at once on every switchyard backend (>= the largest `TASKS`).
const POOL_SIZE: u32 = 16;
const TIMEOUT: Duration = Duration::from_secs(10);
/// The shared database (MongoDB) / index (Elasticsearch) of unscoped rows.
const SHARED: &str = "bench";
/// The one-document MongoDB collection.
const TINY: &str = "tiny";
/// The tenant of the scoped rows; its database / index is `tenant_acme`.
const TENANT: &str = "acme";
const TENANT_TARGET: &str = "tenant_acme";

const ENGINES: [(&str, &str); 3] = [
    ("engines_mongodb", "tenant_db"),
    ("engines_clickhouse", "tenant_db"),
    ("engines_elasticsearch", "tenant_index"),
];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Short runs: two cores shared with other builds. Command-line flags
/// (`--quick`, `--measurement-time`, ...) still override.
fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

/// Runs `iters` operations spread over `tasks` concurrent tasks and returns the
/// wall time scaled to exactly `iters` operations.
fn concurrent<F, Fut>(rt: &Runtime, iters: u64, tasks: usize, op: F) -> Duration
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tasks_u64 = tasks as u64;
    let per_task = iters.div_ceil(tasks_u64).max(1);
    let op = Arc::new(op);
    rt.block_on(async move {
        let start = Arc::new(tokio::sync::Barrier::new(tasks + 1));
        let mut set = JoinSet::new();
        for _ in 0..tasks {
            let op = Arc::clone(&op);
            let start = Arc::clone(&start);
            set.spawn(async move {
                start.wait().await;
                for _ in 0..per_task {
                    op().await;
                }
            });
        }
        start.wait().await;
        let began = Instant::now();
        while let Some(done) = set.join_next().await {
            done.expect("bench task panicked");
        }
        began
            .elapsed()
            .mul_f64(iters as f64 / (per_task * tasks_u64) as f64)
    })
}

/// One row per concurrency level: `name/<tasks>`.
fn rows<F, Fut>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: &str,
    op: F,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    for tasks in TASKS {
        group.bench_function(BenchmarkId::new(name, tasks), |b| {
            b.iter_custom(|iters| concurrent(rt, iters, tasks, op.clone()));
        });
    }
}

/// Tier `db` (database isolation, names `tenant_{id}`) with `acme` on it.
fn tenant() -> Arc<TenantEntry> {
    let tenants = TenantRegistry::new()
        .with_tier("db", TierPolicy::new(Isolation::Database))
        .with_tenant(TenantId::new(TENANT).unwrap(), "db");
    let entry = tenants.resolve(&TenantId::new(TENANT).unwrap()).unwrap();
    assert_eq!(entry.scope().target(), TENANT_TARGET);
    entry
}

fn pool() -> PoolSettings {
    PoolSettings::default()
        .with_max_size(POOL_SIZE)
        .with_acquire_timeout(TIMEOUT)
}

fn unscoped() -> CheckoutRequest {
    CheckoutRequest::with_timeout(TIMEOUT)
}

// ---------------------------------------------------------------- MongoDB

async fn mongo_find_one(collection: mongodb::Collection<Document>) {
    black_box(collection.find_one(doc! {}).await.unwrap().unwrap());
}

async fn mongo_checkout_find_one(backend: Arc<MongoBackend>, request: CheckoutRequest) {
    let conn = Checkout::acquire(&backend, request).await.unwrap();
    let found = conn
        .collection(TINY)
        .unwrap()
        .find_one(doc! {}, None)
        .await
        .unwrap();
    black_box(found.unwrap());
}

fn bench_mongodb(c: &mut Criterion, rt: &Runtime) {
    let server = rt.block_on(MongoServer::start()).expect("MongoDB server");
    println!("mongodb: {}", server.describe());
    let entry = tenant();
    let (raw, backend) = rt.block_on(async {
        let raw = mongodb::Client::with_uri_str(server.url()).await.unwrap();
        for database in [SHARED, TENANT_TARGET] {
            raw.database(database)
                .collection::<Document>(TINY)
                .insert_one(doc! { "x": 1 })
                .await
                .unwrap();
        }
        let config = MongoBackendConfig::builder("mongo-bench", server.url())
            .database(SHARED)
            .pool(pool())
            .config();
        let backend = Arc::new(MongoBackend::new(config).unwrap());
        // Connect the driver pool before measuring.
        mongo_checkout_find_one(Arc::clone(&backend), unscoped()).await;
        (raw, backend)
    });

    let mut group = c.benchmark_group("engines_mongodb");
    let shared = raw.database(SHARED).collection::<Document>(TINY);
    rows(&mut group, rt, "raw", move || {
        mongo_find_one(shared.clone())
    });
    let b = Arc::clone(&backend);
    rows(&mut group, rt, "unscoped", move || {
        mongo_checkout_find_one(Arc::clone(&b), unscoped())
    });
    let own = raw.database(TENANT_TARGET).collection::<Document>(TINY);
    rows(&mut group, rt, "raw_tenant_db", move || {
        mongo_find_one(own.clone())
    });
    let b = Arc::clone(&backend);
    rows(&mut group, rt, "tenant_db", move || {
        mongo_checkout_find_one(Arc::clone(&b), unscoped().tenant(&entry))
    });
    group.finish();
    rt.block_on(async {
        backend.close().await;
        raw.shutdown().await;
    });
    drop(server);
}

// ------------------------------------------------------------- ClickHouse

async fn ch_select_1(client: &clickhouse::Client) {
    let one = client.query("SELECT 1").fetch_one::<u8>().await.unwrap();
    assert_eq!(black_box(one), 1);
}

async fn ch_checkout_select_1(backend: Arc<ChBackend>, request: CheckoutRequest) {
    let conn = Checkout::acquire(&backend, request).await.unwrap();
    ch_select_1(conn.client().unwrap()).await;
}

fn bench_clickhouse(c: &mut Criterion, rt: &Runtime) {
    let server = rt.block_on(ClickHouse::start()).expect("ClickHouse server");
    let entry = tenant();
    let url = server.http_url();
    let raw = clickhouse::Client::default()
        .with_url(url.as_str())
        .with_validation(false);
    let raw_tenant = raw.clone().with_database(TENANT_TARGET);
    let backend = Arc::new(
        ChBackend::builder("ch-bench", url.as_str())
            .pool(pool())
            .build()
            .unwrap(),
    );
    rt.block_on(async {
        server
            .query(&format!("CREATE DATABASE IF NOT EXISTS {TENANT_TARGET}"))
            .await
            .unwrap();
        let probe = backend.probe(TIMEOUT).await.unwrap();
        println!(
            "clickhouse: real ClickHouse {} at {url} (probe rtt {:?})",
            probe.version.unwrap_or_default(),
            probe.rtt
        );
        ch_select_1(&raw).await;
        ch_checkout_select_1(Arc::clone(&backend), unscoped().tenant(&entry)).await;
    });

    let mut group = c.benchmark_group("engines_clickhouse");
    rows(&mut group, rt, "raw", move || {
        let raw = raw.clone();
        async move { ch_select_1(&raw).await }
    });
    let b = Arc::clone(&backend);
    rows(&mut group, rt, "unscoped", move || {
        ch_checkout_select_1(Arc::clone(&b), unscoped())
    });
    rows(&mut group, rt, "raw_tenant_db", move || {
        let raw = raw_tenant.clone();
        async move { ch_select_1(&raw).await }
    });
    let b = Arc::clone(&backend);
    rows(&mut group, rt, "tenant_db", move || {
        ch_checkout_select_1(Arc::clone(&b), unscoped().tenant(&entry))
    });
    group.finish();
    drop(backend);
    drop(server);
}

/// `engines_clickhouse_tls`: unscoped checkout + `SELECT 1` on one server
/// started with TLS, over its plain HTTP port (`plaintext`) and its HTTPS
/// port, verified against the test CA (`tls`): what TLS costs per checkout
/// with hyper's kept-alive connections reused.
fn bench_clickhouse_tls(c: &mut Criterion, rt: &Runtime) {
    let ca = TestCa::generate().expect("test CA");
    let server = rt
        .block_on(ClickHouse::start_tls(&ca))
        .expect("ClickHouse server with TLS");
    let https = server.https_url().expect("https url");
    let build = |name: &str, url: &str, tls: Option<TlsSettings>| {
        let mut builder = ChBackend::builder(name, url).pool(pool());
        if let Some(tls) = tls {
            builder = builder.tls(tls);
        }
        Arc::new(builder.build().unwrap())
    };
    let plain = build("ch-plain", &server.http_url(), None);
    let tls = build(
        "ch-tls",
        &https,
        Some(TlsSettings::with_ca_file(ca.ca_file())),
    );
    rt.block_on(async {
        tls.probe(TIMEOUT).await.unwrap();
        println!("clickhouse_tls: real ClickHouse, plaintext next to {https}");
    });
    let mut group = c.benchmark_group("engines_clickhouse_tls");
    for (name, backend) in [("plaintext", plain), ("tls", tls)] {
        rows(&mut group, rt, name, move || {
            ch_checkout_select_1(Arc::clone(&backend), unscoped())
        });
    }
    group.finish();
    drop(server);
}

// ---------------------------------------------------------- Elasticsearch

async fn es_count(client: &Elasticsearch, index: &str) -> u64 {
    let response = client
        .count(CountParts::Index(&[index]))
        .body(json!({}))
        .send()
        .await
        .unwrap()
        .error_for_status_code()
        .unwrap();
    let body: Value = response.json().await.unwrap();
    body["count"].as_u64().unwrap()
}

async fn es_raw_count(client: Arc<Elasticsearch>, index: &'static str) {
    assert_eq!(black_box(es_count(&client, index).await), 1);
}

async fn es_checkout_count(backend: Arc<EsBackend>, request: CheckoutRequest) {
    let conn = Checkout::acquire(&backend, request).await.unwrap();
    let count = match conn.tenant() {
        // Unscoped checkouts have no typed methods: the node's client.
        None => es_count(conn.client().unwrap(), SHARED).await,
        Some(_) => conn.count(None).await.unwrap(),
    };
    assert_eq!(black_box(count), 1);
}

fn bench_elasticsearch(c: &mut Criterion, rt: &Runtime) {
    let server = rt
        .block_on(ElasticServer::start())
        .expect("Elasticsearch server");
    println!("elasticsearch: {}", server.describe());
    let entry = tenant();
    let raw = Arc::new(Elasticsearch::new(
        Transport::single_node(server.url()).unwrap(),
    ));
    let backend = Arc::new(
        EsBackend::builder("es-bench", server.url())
            .pool(pool())
            .build()
            .unwrap(),
    );
    rt.block_on(async {
        raw.indices()
            .create(IndicesCreateParts::Index(SHARED))
            .body(json!({}))
            .send()
            .await
            .unwrap()
            .error_for_status_code()
            .unwrap();
        raw.index(IndexParts::IndexId(SHARED, "1"))
            .body(json!({ "x": 1 }))
            .refresh(Refresh::True)
            .send()
            .await
            .unwrap()
            .error_for_status_code()
            .unwrap();
        let admin = Checkout::acquire(&backend, unscoped()).await.unwrap();
        create_tenant_index(&admin, entry.scope(), None)
            .await
            .unwrap();
        drop(admin);
        let conn = Checkout::acquire(&backend, unscoped().tenant(&entry))
            .await
            .unwrap();
        conn.index("1", json!({ "x": 1 }), Refresh::True)
            .await
            .unwrap();
        drop(conn);
        es_raw_count(Arc::clone(&raw), TENANT_TARGET).await;
        es_checkout_count(Arc::clone(&backend), unscoped()).await;
        es_checkout_count(Arc::clone(&backend), unscoped().tenant(&entry)).await;
    });

    let mut group = c.benchmark_group("engines_elasticsearch");
    let r = Arc::clone(&raw);
    rows(&mut group, rt, "raw", move || {
        es_raw_count(Arc::clone(&r), SHARED)
    });
    let b = Arc::clone(&backend);
    rows(&mut group, rt, "unscoped", move || {
        es_checkout_count(Arc::clone(&b), unscoped())
    });
    let r = Arc::clone(&raw);
    rows(&mut group, rt, "raw_tenant_index", move || {
        es_raw_count(Arc::clone(&r), TENANT_TARGET)
    });
    let b = Arc::clone(&backend);
    rows(&mut group, rt, "tenant_index", move || {
        es_checkout_count(Arc::clone(&b), unscoped().tenant(&entry))
    });
    group.finish();
    drop(backend);
    drop(server);
}

// ------------------------------------------------------------------ ratios

/// Where Criterion writes its results (its own lookup order, minus
/// `cargo metadata`: the workspace's `target/`).
fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        PathBuf::from(home)
    } else if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        PathBuf::from(target).join("criterion")
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/criterion")
    }
}

/// The median (ns) of `group/name/tasks` written by this run, if any.
fn median_ns(group: &str, name: &str, tasks: usize, since: SystemTime) -> Option<f64> {
    let path = criterion_home()
        .join(group)
        .join(name)
        .join(tasks.to_string())
        .join("new/estimates.json");
    let fresh = std::fs::metadata(&path).ok()?.modified().ok()? >= since;
    if !fresh {
        return None;
    }
    let estimates: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn print_ratios(since: SystemTime) {
    println!("\nswitchyard median / raw median (from new/estimates.json):");
    println!(
        "{:<22} {:>5} {:>10} {:>10} {:>7} {:>12} {:>10} {:>7}",
        "group", "tasks", "raw", "unscoped", "ratio", "raw_tenant", "tenant", "ratio"
    );
    let mut any = false;
    for (group, scoped) in ENGINES {
        for tasks in TASKS {
            let get = |name: &str| median_ns(group, name, tasks, since);
            let raw_tenant = format!("raw_{scoped}");
            let (Some(raw), Some(plain)) = (get("raw"), get("unscoped")) else {
                continue;
            };
            any = true;
            let (tenant_raw, tenant) = match (get(&raw_tenant), get(scoped)) {
                (Some(r), Some(t)) => (
                    format!("{:.1}us", r / 1e3),
                    format!("{:.1}us {:>7.3}", t / 1e3, t / r),
                ),
                _ => ("-".into(), "-".into()),
            };
            println!(
                "{group:<22} {tasks:>5} {:>8.1}us {:>8.1}us {:>7.3} {tenant_raw:>12} {tenant:>18}",
                raw / 1e3,
                plain / 1e3,
                plain / raw,
            );
        }
    }
    if !any {
        println!("(no fresh estimates: nothing was measured, e.g. under --test)");
    }
}

fn main() {
    let since = SystemTime::now();
    let rt = runtime();
    let mut c = criterion().configure_from_args();
    bench_mongodb(&mut c, &rt);
    bench_clickhouse(&mut c, &rt);
    bench_clickhouse_tls(&mut c, &rt);
    bench_elasticsearch(&mut c, &rt);
    c.final_summary();
    print_ratios(since);
}
