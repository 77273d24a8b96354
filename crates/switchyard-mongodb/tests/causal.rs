#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Causal tokens on MongoDB, through the router.
//!
//! On a server outside any replica set (the nx-27017 stand-in, or a
//! standalone `mongod`), which keeps no operation times, every refusal is
//! shown for real: a write's token is `Unsupported`, malformed and foreign
//! tokens are refused when parsed, and a forged token read is refused by the
//! primary without hanging. The read-your-writes workload needs a real
//! replica set (`SWITCHYARD_MONGODB_URL`, e.g. docker-compose's): against
//! the stand-in it says `skipped: needs a real MongoDB replica set`.
//!
//! Run with `cargo test -p switchyard-mongodb --test causal -- --nocapture`
//! to see the figures on a real set.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Bson};
use switchyard_core::{
    CausalError, CausalToken, Checkout, Error, History, Intent, PoolSettings, Role, TenantId,
};
use switchyard_mongodb::{MongoBackend, MongoBackendConfig};
use switchyard_router::{CausalFallback, CheckoutOptions, Cluster, ClusterConfig, EndpointConfig};
use switchyard_testkit::{MongoServer, ServerKind};
use tokio::time::Instant;

use common::*;

const SKIP: &str = "skipped: needs a real MongoDB replica set (set SWITCHYARD_MONGODB_URL); \
                    the nx-27017 stand-in has no replica sets";

const TASKS: u64 = 16;
/// Pairs per task with tokens: 16 x 640 = 10,240.
const TOKEN_PAIRS: u64 = 640;
/// Pairs per task without tokens (only a rate is wanted).
const PLAIN_PAIRS: u64 = 100;

fn cluster_config() -> ClusterConfig {
    let mut config = ClusterConfig::default();
    config.health.interval = Duration::from_millis(250);
    config.health.timeout = Duration::from_secs(1);
    config.causal.wait = Duration::from_millis(200);
    config
}

fn member_config(url: &str, name: &str, database: &str) -> MongoBackendConfig {
    let mut config = MongoBackendConfig::builder(name, url)
        .database(database)
        .pool(
            PoolSettings::default()
                .with_max_size(24)
                .with_acquire_timeout(Duration::from_secs(5)),
        )
        .operation_timeout(Duration::from_secs(10))
        .config();
    config.server_selection_timeout = Some(Duration::from_secs(2));
    config
}

/// A cluster of `urls` (the first one the primary), with the test's tenants.
fn build(name: &str, urls: &[(String, Role)], database: &str, tag: &str) -> Cluster<MongoBackend> {
    let (tenants, _) = tenants(tag, 64, 6);
    let mut builder = Cluster::builder(name)
        .engine("mongodb")
        .config(cluster_config())
        .tenants(tenants);
    for (i, (url, role)) in urls.iter().enumerate() {
        let backend = MongoBackend::new(member_config(url, &format!("mongo-{i}"), database));
        builder = builder.endpoint(Arc::new(backend.unwrap()), EndpointConfig::new(*role));
    }
    builder.build().unwrap()
}

fn causal(error: &Error) -> Option<CausalError> {
    match error {
        Error::Causal { reason, .. } => Some(*reason),
        _ => None,
    }
}

fn forged(cluster: &str, set: &str, term: u64, seconds: u64) -> CausalToken {
    let mark = History::OpTime {
        set: set.into(),
        term,
        time: seconds << 32 | 1,
    };
    CausalToken::new(cluster, mark).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_a_replica_set_tokens_are_refused_typed_and_never_hang() {
    let server = server().await;
    if hello(server.url()).await.contains_key("setName") {
        loud("this test wants a server outside any replica set; SWITCHYARD_MONGODB_URL names a set member (the workload test below covers it)");
        return;
    }
    let db = unique("causal");
    let members = [(server.url().to_owned(), Role::Primary)];
    let cluster = build("catalog", &members, &db, &unique("c"));
    let tenant = TenantId::new("t2").unwrap(); // row tier

    // A write is done; its token cannot be made.
    let write = async |conn: &mut Checkout<MongoBackend>| {
        conn.collection("kv")?
            .insert_one(doc! { "k": 1 }, None)
            .await
            .map(|_| ())
    };
    let err = cluster
        .run_write(Some(&tenant), CheckoutOptions::new(), write)
        .await
        .unwrap_err();
    assert_eq!(causal(&err), Some(CausalError::Unsupported), "{err}");
    let read = cluster.checkout(Intent::Read, Some(&tenant)).await.unwrap();
    let kv = read.collection("kv").unwrap();
    assert_eq!(kv.count_documents(doc! { "k": 1 }, None).await.unwrap(), 1);
    drop(read);

    // Parsing: altered text, another cluster's token.
    let token = forged("catalog", "rs0", 1, 1);
    for text in [
        String::new(),
        token.to_string().replace(".o.", ".x."),
        format!("{token}.1"),
    ] {
        let err = cluster.parse_token(&text).unwrap_err();
        assert_eq!(causal(&err), Some(CausalError::Malformed), "{text:?}");
    }
    let other = forged("billing", "rs0", 1, 1).to_string();
    let err = cluster.parse_token(&other).unwrap_err();
    assert_eq!(causal(&err), Some(CausalError::ForeignCluster));

    // A token that parses (forged here) names a replica set this server is
    // not part of: the primary refuses it at once, scoped or not.
    let token = cluster.parse_token(&token.to_string()).unwrap();
    let started = Instant::now();
    for tenant in [None, Some(&tenant)] {
        let err = cluster
            .checkout_after(&token, tenant, CheckoutOptions::new())
            .await
            .unwrap_err();
        assert_eq!(causal(&err), Some(CausalError::Lost), "{err}");
    }
    eprintln!("two forged token reads refused in {:?}", started.elapsed());
    let stats = cluster.causal_stats();
    assert_eq!(stats.replica_reads + stats.primary_reads, 0, "{stats:?}");
    cleanup(&server, server.url(), [db]).await;
}

// ---------------------------------------------------------------------------
// A real replica set.

/// The members' direct URLs, the primary first, or `None` (after saying so).
async fn replica_set(server: &MongoServer) -> Option<Vec<(String, Role)>> {
    if server.kind() != ServerKind::Real {
        loud(SKIP);
        return None;
    }
    let hello = hello(server.url()).await;
    let (Ok(_), Ok(primary)) = (hello.get_str("setName"), hello.get_str("primary")) else {
        loud(&format!(
            "{SKIP} (SWITCHYARD_MONGODB_URL is outside any replica set)"
        ));
        return None;
    };
    let mut members = vec![(direct_url(server.url(), primary), Role::Primary)];
    for host in hello
        .get_array("hosts")
        .unwrap()
        .iter()
        .filter_map(Bson::as_str)
    {
        if host != primary {
            members.push((direct_url(server.url(), host), Role::Replica));
        }
    }
    if members.len() < 2 {
        loud(&format!("{SKIP} (the set has no secondary)"));
        return None;
    }
    Some(members)
}

/// What one workload found.
#[derive(Default)]
struct Report {
    pairs: AtomicU64,
    stale: AtomicU64,
    replica: AtomicU64,
    failed: AtomicU64,
    latencies: std::sync::Mutex<Vec<Duration>>,
}

impl Report {
    fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.lock().unwrap().clone();
        l.sort();
        l.get(((l.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// `TASKS` tasks writing a key and reading it back at once, each for its
/// own tenant (all three isolation levels), with or without tokens.
async fn workload(cluster: &Cluster<MongoBackend>, per_task: u64, tokens: bool) -> Arc<Report> {
    let report = Arc::new(Report::default());
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (cluster, report) = (cluster.clone(), report.clone());
        tasks.push(tokio::spawn(async move {
            let tenant = TenantId::new(&format!("t{}", task % 6)).unwrap();
            for i in 0..per_task {
                let key = i64::try_from(task * 1_000_000 + i).unwrap();
                let write = async move |conn: &mut Checkout<MongoBackend>| {
                    conn.collection("kv")?
                        .insert_one(doc! { "k": key }, None)
                        .await
                        .map(|_| ())
                };
                let token = if tokens {
                    match cluster
                        .run_write(Some(&tenant), CheckoutOptions::new(), write)
                        .await
                    {
                        Ok(((), token)) => Some(token.to_string()),
                        Err(_) => {
                            report.failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                } else {
                    let done = cluster
                        .run(Intent::Write, Some(&tenant), CheckoutOptions::new(), write)
                        .await;
                    if done.is_err() {
                        report.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    None
                };
                let started = Instant::now();
                let read = async move |conn: &mut Checkout<MongoBackend>| {
                    let found = conn
                        .collection("kv")?
                        .count_documents(doc! { "k": key }, None)
                        .await?;
                    Ok::<_, Error>((found == 1, conn.endpoint().to_string()))
                };
                let result = match &token {
                    Some(text) => match cluster.parse_token(text) {
                        Ok(token) => {
                            cluster
                                .run_after(&token, Some(&tenant), CheckoutOptions::new(), read)
                                .await
                        }
                        Err(e) => Err(e),
                    },
                    None => {
                        cluster
                            .run(Intent::Read, Some(&tenant), CheckoutOptions::new(), read)
                            .await
                    }
                };
                let Ok((fresh, endpoint)) = result else {
                    report.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                report.pairs.fetch_add(1, Ordering::Relaxed);
                report.stale.fetch_add(u64::from(!fresh), Ordering::Relaxed);
                report
                    .replica
                    .fetch_add(u64::from(endpoint != "mongo-0"), Ordering::Relaxed);
                report.latencies.lock().unwrap().push(started.elapsed());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_reads_see_their_writes_on_secondaries_with_tokens() {
    let server = server().await;
    let Some(members) = replica_set(&server).await else {
        return;
    };
    let db = unique("causal");
    let tag = unique("c");
    let cluster = build("catalog", &members, &db, &tag);
    switchyard_testkit::poll_until(
        "a writer and the secondaries",
        Duration::from_secs(30),
        || async {
            let st = cluster.status();
            let readers = st.endpoints.iter().filter(|e| e.serves_reads).count();
            (st.writer.is_some() && readers + 1 >= members.len()).then_some(())
        },
    )
    .await
    .unwrap();

    // Replication kept busy by a writer outside the cluster.
    let stop = Arc::new(AtomicBool::new(false));
    let noise = {
        let (url, stop, db) = (members[0].0.clone(), stop.clone(), db.clone());
        tokio::spawn(async move {
            let raw = raw_client(&url).await;
            let coll = raw
                .database(&db)
                .collection::<mongodb::bson::Document>("noise");
            let pad = "x".repeat(200);
            while !stop.load(Ordering::Relaxed) {
                let docs = (0..20).map(|i| doc! { "i": i, "pad": &pad });
                let _ = coll.insert_many(docs).await;
            }
        })
    };

    let plain = workload(&cluster, PLAIN_PAIRS, false).await;
    let with = workload(&cluster, TOKEN_PAIRS, true).await;
    stop.store(true, Ordering::Relaxed);
    noise.await.unwrap();

    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "mongodb: without tokens {} pairs, {} stale, read p50 {:?} p99 {:?}",
        n(&plain.pairs),
        n(&plain.stale),
        plain.quantile(0.5),
        plain.quantile(0.99)
    );
    println!(
        "mongodb: with tokens {} pairs, {} stale, {:.1}% served by secondaries, {} failed, read p50 {:?} p99 {:?}; {:?}",
        n(&with.pairs),
        n(&with.stale),
        n(&with.replica) as f64 * 100.0 / n(&with.pairs).max(1) as f64,
        n(&with.failed),
        with.quantile(0.5),
        with.quantile(0.99),
        cluster.causal_stats(),
    );
    assert_eq!(n(&with.stale), 0, "stale token reads");
    assert!(
        n(&with.pairs) >= TASKS * TOKEN_PAIRS * 99 / 100,
        "too many failed pairs"
    );
    assert!(
        n(&with.replica) * 10 >= n(&with.pairs) * 8,
        "under 80% on secondaries"
    );

    // A token opens nothing of another tenant's: t0's write, read by t1
    // (another isolation level) and by t3 (t0's level) with t0's token.
    let owner = TenantId::new("t0").unwrap();
    let insert = async |conn: &mut Checkout<MongoBackend>| {
        conn.collection("kv")?
            .insert_one(doc! { "k": -2 }, None)
            .await
            .map(|_| ())
    };
    let ((), token) = cluster
        .run_write(Some(&owner), CheckoutOptions::new(), insert)
        .await
        .unwrap();
    for (reader, expected) in [("t0", 1), ("t1", 0), ("t3", 0)] {
        let reader = TenantId::new(reader).unwrap();
        let count = async |conn: &mut Checkout<MongoBackend>| {
            conn.collection("kv")?
                .count_documents(doc! { "k": -2 }, None)
                .await
        };
        let seen = cluster
            .run_after(&token, Some(&reader), CheckoutOptions::new(), count)
            .await
            .unwrap();
        assert_eq!(seen, expected, "{reader} with t0's token");
    }

    // Another set's token is refused when parsed (the primary's probe names
    // its set); one past the primary's clock, after the wait.
    let History::OpTime { set, term, time } = cluster
        .run_write(
            None,
            CheckoutOptions::new(),
            async |conn: &mut Checkout<MongoBackend>| {
                conn.collection("kv")?
                    .insert_one(doc! { "k": -1 }, None)
                    .await
                    .map(|_| ())
            },
        )
        .await
        .unwrap()
        .1
        .mark()
        .clone()
    else {
        panic!("a MongoDB token names an operation time");
    };
    let foreign = forged("catalog", &format!("{set}-other"), term, time >> 32);
    let err = cluster.parse_token(&foreign.to_string()).unwrap_err();
    assert_eq!(causal(&err), Some(CausalError::ForeignCluster));
    let future = forged("catalog", &set, term, (time >> 32) + 3600);
    let opts = CheckoutOptions::new().causal_wait(Duration::from_millis(50));
    let err = cluster
        .checkout_after(&future, None, opts)
        .await
        .unwrap_err();
    assert_eq!(causal(&err), Some(CausalError::Future), "{err}");

    // With `fallback: fail`, a token no secondary can reach fails typed.
    let mut config = cluster_config();
    config.causal.fallback = CausalFallback::Fail;
    cluster.set_config(config).unwrap();
    let err = cluster
        .checkout_after(&future, None, opts)
        .await
        .unwrap_err();
    assert_eq!(causal(&err), Some(CausalError::NotApplied), "{err}");
    cleanup(&server, server.url(), [db]).await;
}
