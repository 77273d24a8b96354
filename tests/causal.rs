#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Read-your-writes on replicas over real engines: a primary and two
//! replicas from the test bed, 16 tasks each writing a new key and reading it
//! back at once through one `Cluster`, a background writer keeping
//! replication busy. Without tokens some reads miss their own write (the
//! stale rate is reported); with tokens none may, and most are still served
//! by the replicas. Each scenario is written once over [`Kv`], what it
//! needs of an engine (a key's write and read back).
//!
//! Run with `cargo test -p switchyard --test causal -- --nocapture
//! --test-threads=1` to see the figures (stale rate, replica share, added
//! latency p50/p99).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::future::Future;

use common::fast_config;
use futures_util::future::BoxFuture;
use sqlx::{Connection, PgConnection};
use switchyard_core::{
    CausalBackend, CausalToken, Checkout, Error, Intent, OperationError, PoolSettings, Role,
};
use switchyard_postgres::{PgBackend, PgBackendConfig};
use switchyard_redis::{Command, RedisBackend, RedisBackendConfig};
use switchyard_router::{CheckoutOptions, Cluster, EndpointConfig};
use switchyard_testkit::{PgCluster, RedisCluster};
use tokio::time::Instant;

const TASKS: u64 = 16;
/// Pairs per task with tokens: 16 x 640 = 10,240.
const TOKEN_PAIRS: u64 = 640;
/// Pairs per task without tokens (only a rate is wanted).
const PLAIN_PAIRS: u64 = 200;

/// One write-then-read pair's verdict.
struct Read {
    /// The write was visible.
    fresh: bool,
    /// Served by a replica (as the read's endpoint says).
    replica: bool,
    took: Duration,
}

/// Writes key `k` and returns the write's token (when asked for one).
type WriteFn =
    Arc<dyn Fn(u64, bool) -> BoxFuture<'static, Result<Option<String>, Error>> + Send + Sync>;
/// Reads key `k` back, after the token when there is one.
type ReadFn =
    Arc<dyn Fn(u64, Option<String>) -> BoxFuture<'static, Result<Read, Error>> + Send + Sync>;

#[derive(Default)]
struct Report {
    pairs: u64,
    stale: Vec<u64>,
    replica: u64,
    failed_writes: u64,
    failed_reads: u64,
    /// Every failed operation's error, and whether it is a timeout or an
    /// unreachable endpoint (what a starved machine produces) rather than a
    /// refusal.
    errors: Vec<(String, bool)>,
    latencies: Vec<Duration>,
}

impl Report {
    fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        let i = ((l.len() - 1) as f64 * q).round() as usize;
        l[i]
    }

    fn stale_rate(&self) -> f64 {
        self.stale.len() as f64 / self.pairs.max(1) as f64
    }

    fn replica_share(&self) -> f64 {
        self.replica as f64 / self.pairs.max(1) as f64
    }

    fn fail(&mut self, error: &Error) {
        self.errors.push((error.to_string(), error.is_retryable()));
    }

    /// No operation failed but for the load on the machine: at most one in a
    /// thousand, each one a timeout or an unreachable endpoint after the
    /// cluster's retries (a test run on 2 shared cores can starve every
    /// attempt of a read). A refusal, a causal error or anything else fails.
    fn assert_failures_only_from_load(&self) {
        let refused: Vec<_> = self.errors.iter().filter(|(_, load)| !load).collect();
        assert!(refused.is_empty(), "operations refused: {refused:?}");
        assert!(
            self.errors.len() as u64 <= (self.pairs / 1000).max(1),
            "{} failed operations: {:?}",
            self.errors.len(),
            self.errors
        );
    }
}

/// `TASKS` tasks, `per_task` pairs each, on keys `base + task * 1e6 + i`.
async fn workload(base: u64, per_task: u64, tokens: bool, write: WriteFn, read: ReadFn) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (write, read, report) = (write.clone(), read.clone(), report.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                let key = base + task * 1_000_000 + i;
                let token = match write(key, tokens).await {
                    Ok(token) => token,
                    Err(e) => {
                        let mut r = report.lock().unwrap();
                        r.failed_writes += 1;
                        r.fail(&e);
                        continue;
                    }
                };
                let result = read(key, token).await;
                let mut r = report.lock().unwrap();
                match result {
                    Ok(read) => {
                        r.pairs += 1;
                        if !read.fresh {
                            r.stale.push(key);
                        }
                        r.replica += u64::from(read.replica);
                        r.latencies.push(read.took);
                    }
                    Err(e) => {
                        r.failed_reads += 1;
                        r.fail(&e);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(report)
        .ok()
        .expect("tasks done")
        .into_inner()
        .unwrap()
}

fn print(engine: &str, plain: &Report, causal: &Report) {
    println!(
        "{engine}: without tokens {} pairs, {} stale ({:.2}%), read p50 {:?} p99 {:?}",
        plain.pairs,
        plain.stale.len(),
        plain.stale_rate() * 100.0,
        plain.quantile(0.5),
        plain.quantile(0.99)
    );
    println!(
        "{engine}: with tokens {} pairs, {} stale, {:.1}% served by replicas, read p50 {:?} p99 {:?}; added p50 {:?} p99 {:?}",
        causal.pairs,
        causal.stale.len(),
        causal.replica_share() * 100.0,
        causal.quantile(0.5),
        causal.quantile(0.99),
        causal.quantile(0.5).saturating_sub(plain.quantile(0.5)),
        causal.quantile(0.99).saturating_sub(plain.quantile(0.99)),
    );
}

/// What the scenarios need of one engine: the write of a key and its read
/// back, as operations on a routed connection.
trait Kv: CausalBackend + Sized {
    /// The engine, in logs and metric labels.
    const ENGINE: &'static str;
    /// Endpoint `<PREFIX>-i` is node `i`.
    const PREFIX: &'static str;
    /// What one operation of the background writer is, for the report.
    const NOISE: &'static str;
    /// The error its driver fails with.
    type Failure: OperationError<Self::Connection> + Send;
    /// A backend for `url` with room for every task.
    fn backend(id: String, url: &str, pool: PoolSettings) -> Self;
    /// Writes key `key`.
    fn put(
        conn: &mut Checkout<Self>,
        key: u64,
    ) -> impl Future<Output = Result<(), Self::Failure>> + Send;
    /// Whether key `key` is there.
    fn get(
        conn: &mut Checkout<Self>,
        key: u64,
    ) -> impl Future<Output = Result<bool, Self::Failure>> + Send;
}

/// Node 0 the primary, the others replicas.
fn cluster<B: Kv>(urls: impl IntoIterator<Item = impl AsRef<str>>) -> Cluster<B> {
    let mut builder = Cluster::builder("causal")
        .engine(B::ENGINE)
        .config(fast_config(Duration::from_secs(3)));
    let pool = PoolSettings::default()
        .with_max_size(24)
        .with_acquire_timeout(Duration::from_secs(1));
    for (i, url) in urls.into_iter().enumerate() {
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        let backend = B::backend(format!("{}-{i}", B::PREFIX), url.as_ref(), pool.clone());
        builder = builder.endpoint(Arc::new(backend), EndpointConfig::new(role));
    }
    builder.build().unwrap()
}

fn writer<B: Kv>(cluster: &Cluster<B>) -> WriteFn {
    let cluster = cluster.clone();
    Arc::new(move |key, tokens| {
        let cluster = cluster.clone();
        Box::pin(async move {
            let op = async move |conn: &mut Checkout<B>| B::put(conn, key).await;
            if tokens {
                let ((), token) = cluster.run_write(None, CheckoutOptions::new(), op).await?;
                Ok(Some(token.to_string()))
            } else {
                cluster
                    .run(Intent::Write, None, CheckoutOptions::new(), op)
                    .await?;
                Ok(None)
            }
        })
    })
}

fn reader<B: Kv>(cluster: &Cluster<B>) -> ReadFn {
    let cluster = cluster.clone();
    Arc::new(move |key, token| {
        let cluster = cluster.clone();
        Box::pin(async move {
            let started = Instant::now();
            let op = async move |conn: &mut Checkout<B>| {
                let found = B::get(conn, key).await?;
                Ok::<_, B::Failure>((found, conn.endpoint().to_string()))
            };
            let (fresh, endpoint) = match token {
                // The token came back from a client as text.
                Some(text) => {
                    let token = cluster.parse_token(&text)?;
                    cluster
                        .run_after(&token, None, CheckoutOptions::new(), op)
                        .await?
                }
                None => {
                    cluster
                        .run(Intent::Read, None, CheckoutOptions::new(), op)
                        .await?
                }
            };
            let writer = cluster.status().writer.map(|w| w.to_string());
            Ok(Read {
                fresh,
                replica: writer.as_deref() != Some(endpoint.as_str()),
                took: started.elapsed(),
            })
        })
    })
}

/// A background writer keeping replication busy, until stopped.
struct Noise {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Noise {
    /// Runs `write` (given the stop flag) on a task; it returns how many
    /// operations it ran.
    fn start<F: Future<Output = u64> + Send + 'static>(
        write: impl FnOnce(Arc<AtomicBool>) -> F,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(write(stop.clone()));
        Self { stop, task }
    }

    /// Stops the writer; how many operations it ran.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

async fn settled<B: switchyard_core::Backend>(cluster: &Cluster<B>) {
    switchyard_testkit::poll_until(
        "the cluster to see a writer and two readers",
        Duration::from_secs(20),
        || async {
            let st = cluster.status();
            let readers = st.endpoints.iter().filter(|e| e.serves_reads).count();
            (st.writer.is_some() && readers == 2).then_some(())
        },
    )
    .await
    .unwrap();
}

/// 16 tasks write a new key and read it back at once, first without tokens
/// (some reads miss their own write: the stale rate is reported), then with
/// them: none may, and most are still served by the replicas. The report
/// of the reads with tokens, for the engine's own checks.
async fn reads_see_their_writes<B: Kv>(cluster: &Cluster<B>, noise: Noise) -> Report {
    let plain = workload(0, PLAIN_PAIRS, false, writer(cluster), reader(cluster)).await;
    let causal = workload(1 << 40, TOKEN_PAIRS, true, writer(cluster), reader(cluster)).await;
    let noise = noise.stop().await;
    print(B::ENGINE, &plain, &causal);
    println!(
        "{}: background writer ran {noise} {}; {:?}",
        B::ENGINE,
        B::NOISE,
        cluster.causal_stats()
    );

    assert!(causal.pairs >= 10_000, "{} pairs", causal.pairs);
    assert_eq!(causal.stale, Vec::<u64>::new(), "stale reads with tokens");
    assert!(
        causal.replica_share() >= 0.8,
        "{:.1}% served by replicas",
        causal.replica_share() * 100.0
    );
    causal.assert_failures_only_from_load();
    causal
}

// ---------------------------------------------------------------------------
// PostgreSQL

async fn connect(url: &str) -> PgConnection {
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

async fn pg_start() -> PgCluster {
    let pg = PgCluster::start(2).await.unwrap_or_else(|e| panic!("{e}"));
    let mut admin = connect(pg.primary().url()).await;
    sqlx::raw_sql(
        "CREATE TABLE kv (k bigint PRIMARY KEY, v bigint NOT NULL); \
         CREATE TABLE noise (id bigserial PRIMARY KEY, pad text NOT NULL)",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    for standby in pg.standbys() {
        pg.wait_replayed(standby, Duration::from_secs(10))
            .await
            .unwrap();
    }
    pg
}

impl Kv for PgBackend {
    const ENGINE: &'static str = "postgres";
    const PREFIX: &'static str = "pg";
    const NOISE: &'static str = "statements";
    type Failure = sqlx::Error;

    fn backend(id: String, url: &str, pool: PoolSettings) -> Self {
        let mut config = PgBackendConfig::new(id, url);
        config.pool = pool;
        PgBackend::new(config).unwrap()
    }

    async fn put(conn: &mut Checkout<Self>, key: u64) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO kv (k, v) VALUES ($1, $1)")
            .bind(key as i64)
            .execute(&mut **conn)
            .await
            .map(|_| ())
    }

    async fn get(conn: &mut Checkout<Self>, key: u64) -> Result<bool, sqlx::Error> {
        let found: Option<i64> = sqlx::query_scalar("SELECT v FROM kv WHERE k = $1")
            .bind(key as i64)
            .fetch_optional(&mut **conn)
            .await?;
        Ok(found.is_some())
    }
}

fn pg_cluster(pg: &PgCluster) -> Cluster<PgBackend> {
    cluster(pg.nodes().iter().map(|n| n.url()))
}

/// Keeps WAL flowing: 20 rows of 200 bytes per statement, on `url` until
/// `stop` (reconnecting to whichever of `urls` accepts writes).
fn pg_noise(urls: Vec<String>) -> Noise {
    Noise::start(move |stop| async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            for url in &urls {
                let Ok(Ok(mut conn)) =
                    tokio::time::timeout(Duration::from_millis(500), PgConnection::connect(url))
                        .await
                else {
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    let insert = sqlx::query(
                        "INSERT INTO noise (pad) SELECT repeat('x', 200) FROM generate_series(1, 20)",
                    )
                    .execute(&mut conn);
                    match tokio::time::timeout(Duration::from_millis(500), insert).await {
                        Ok(Ok(_)) => n += 1,
                        _ => break,
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_see_their_writes_on_replicas_with_tokens() {
    let pg = pg_start().await;
    let cluster = pg_cluster(&pg);
    settled(&cluster).await;
    let noise = pg_noise(vec![pg.primary().url().to_owned()]);
    let causal = reads_see_their_writes(&cluster, noise).await;
    let stats = cluster.causal_stats();
    // Every pair's read was served once; a read served and then run again
    // (its operation overran the attempt deadline) is counted each time.
    let served = stats.replica_reads + stats.primary_reads;
    assert!(
        served >= causal.pairs && served <= causal.pairs + causal.pairs / 1000,
        "{served} reads served for {} pairs",
        causal.pairs
    );
    // A token from elsewhere is refused, never waited on.
    let foreign = CausalToken::new(
        "another",
        switchyard_core::History::Timeline {
            system: 1,
            timeline: 1,
            position: 1,
        },
    )
    .unwrap();
    assert!(matches!(
        cluster.parse_token(&foreign.to_string()),
        Err(Error::Causal { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_token_reads_move_off_a_paused_standby() {
    let pg = pg_start().await;
    let cluster = pg_cluster(&pg);
    settled(&cluster).await;
    let noise = pg_noise(vec![pg.primary().url().to_owned()]);
    let (write, read) = (writer(&cluster), reader(&cluster));
    let load = tokio::spawn(workload(2 << 40, 80, true, write, read));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = Instant::now();
    pg.standbys()[0].pause().await.unwrap();
    let report = load.await.unwrap();
    let held = paused.elapsed();
    pg.standbys()[0].resume().await.unwrap();
    noise.stop().await;
    println!(
        "postgres, pg-1 paused for the rest of the run ({held:?}): {} pairs, {} stale, {} failed reads, read p50 {:?} p99 {:?} max {:?}; {:?}",
        report.pairs,
        report.stale.len(),
        report.failed_reads,
        report.quantile(0.5),
        report.quantile(0.99),
        report.quantile(1.0),
        cluster.causal_stats()
    );
    assert_eq!(report.stale, Vec::<u64>::new());
    assert_eq!(report.failed_reads, 0, "{:?}", report.errors);
    // No read waited out the pause: each is bounded by one attempt timeout
    // (500ms) plus the causal wait, far below the time the node was held.
    assert!(report.quantile(1.0) < Duration::from_millis(1500));
    assert!(
        held > report.quantile(1.0) * 2,
        "the pause outlasted every read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tokens_hold_across_a_primary_kill_and_promotion() {
    let pg = pg_start().await;
    let cluster = pg_cluster(&pg);
    settled(&cluster).await;
    let urls: Vec<String> = pg.nodes().iter().map(|n| n.url().to_owned()).collect();
    let noise = pg_noise(urls);
    let (write, read) = (writer(&cluster), reader(&cluster));
    let load = tokio::spawn(workload(3 << 40, 150, true, write, read));
    tokio::time::sleep(Duration::from_millis(400)).await;
    pg.primary().kill().await.unwrap();
    pg.standbys()[0].promote().await.unwrap();
    // The other standby may have received WAL the promoted one never got
    // (asynchronous replication): then it cannot follow the new timeline
    // and is re-cloned, as an operator would.
    let (heir, other) = (&pg.standbys()[0], &pg.standbys()[1]);
    if other.can_follow(heir).await.unwrap() {
        other.follow(heir).await.unwrap();
    } else {
        other.reclone(heir).await.unwrap();
    }
    let report = load.await.unwrap();
    noise.stop().await;
    // A read that missed its write is a causal failure only if the write
    // survived the failover: an acknowledged commit not yet streamed when
    // the primary died is gone from every node (asynchronous replication).
    let mut survivor = connect(pg.standbys()[0].url()).await;
    let stale: Vec<i64> = report.stale.iter().map(|&k| k as i64).collect();
    let survived: Vec<i64> = sqlx::query_scalar("SELECT k FROM kv WHERE k = ANY($1)")
        .bind(&stale)
        .fetch_all(&mut survivor)
        .await
        .unwrap();
    println!(
        "postgres across a failover: {} pairs, {} writes failed, {} reads failed, {} stale ({} of them lost with the old primary), {:.1}% on replicas; {:?}",
        report.pairs,
        report.failed_writes,
        report.failed_reads,
        report.stale.len(),
        report.stale.len() - survived.len(),
        report.replica_share() * 100.0,
        cluster.causal_stats()
    );
    assert_eq!(
        survived,
        Vec::<i64>::new(),
        "stale reads of surviving writes"
    );
    assert!(report.pairs > 1_000);
    assert_eq!(
        cluster.status().writer.map(|w| w.to_string()).as_deref(),
        Some("pg-1")
    );
}

// ---------------------------------------------------------------------------
// Redis

impl Kv for RedisBackend {
    const ENGINE: &'static str = "redis";
    const PREFIX: &'static str = "redis";
    const NOISE: &'static str = "SETs of 4 KiB";
    type Failure = Error;

    fn backend(id: String, url: &str, pool: PoolSettings) -> Self {
        let mut config = RedisBackendConfig::new(id, url);
        config.pool = pool;
        RedisBackend::new(config).unwrap()
    }

    async fn put(conn: &mut Checkout<Self>, key: u64) -> Result<(), Error> {
        conn.query::<()>(&Command::new("SET").arg(format!("kv:{key}")).arg(key))
            .await
    }

    async fn get(conn: &mut Checkout<Self>, key: u64) -> Result<bool, Error> {
        let found: Option<u64> = conn
            .query(&Command::new("GET").arg(format!("kv:{key}")))
            .await?;
        Ok(found == Some(key))
    }
}

fn redis_cluster(redis: &RedisCluster) -> Cluster<RedisBackend> {
    cluster(redis.nodes().iter().map(|n| n.url()))
}

fn redis_noise(url: String) -> Noise {
    Noise::start(move |stop| async move {
        let client = deadpool_redis::redis::Client::open(url).unwrap();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                let mut cmd = deadpool_redis::redis::cmd("SET");
                cmd.arg(format!("noise:{}", n % 1000)).arg("x".repeat(4096));
                let set = cmd.query_async::<()>(&mut conn);
                match tokio::time::timeout(Duration::from_millis(500), set).await {
                    Ok(Ok(())) => n += 1,
                    _ => break,
                }
            }
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_see_their_writes_on_replicas_with_tokens() {
    let redis = RedisCluster::start(2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cluster = redis_cluster(&redis);
    settled(&cluster).await;
    let noise = redis_noise(redis.master().url());
    reads_see_their_writes(&cluster, noise).await;
}

/// `INFO replication`'s `master_repl_offset` on `node`.
async fn redis_offset(node: &switchyard_testkit::RedisNode) -> u64 {
    let client = deadpool_redis::redis::Client::open(node.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = deadpool_redis::redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.trim().strip_prefix("master_repl_offset:"))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tokens_of_the_old_master_neither_hang_nor_read_older_data_after_a_promotion() {
    let redis = RedisCluster::start(2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cluster = redis_cluster(&redis);
    settled(&cluster).await;
    let (write, read) = (writer(&cluster), reader(&cluster));
    // Writes the replica to be promoted has applied...
    let mut kept = Vec::new();
    for key in 0..50 {
        kept.push((key, write(key, true).await.unwrap().unwrap()));
    }
    let written = redis_offset(redis.master()).await;
    let heir = &redis.replicas()[0];
    switchyard_testkit::poll_until(
        "the heir to apply the writes",
        Duration::from_secs(20),
        || async { (redis_offset(heir).await >= written).then_some(()) },
    )
    .await
    .unwrap();
    // ...and writes it never sees: cut off from the master (pointed at a
    // port nobody listens on, keeping its line and offset), then the master
    // dies and the heir is promoted without them.
    let client = deadpool_redis::redis::Client::open(heir.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    deadpool_redis::redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(1)
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let mut lost_writes = Vec::new();
    for key in 100..105 {
        lost_writes.push((key, write(key, true).await.unwrap().unwrap()));
    }
    redis.master().kill().await.unwrap();
    heir.promote().await.unwrap();
    redis.replicas()[1].replicaof(heir).await.unwrap();
    switchyard_testkit::poll_until(
        "the new master to be the writer",
        Duration::from_secs(20),
        || async {
            (cluster.status().writer.map(|w| w.to_string()).as_deref() == Some("redis-1"))
                .then_some(())
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut refused = BTreeSet::new();
    for (key, token) in kept.iter().chain(&lost_writes) {
        let began = Instant::now();
        match read(*key, Some(token.clone())).await {
            Ok(r) => assert!(r.fresh, "key {key} read older data than its token names"),
            Err(Error::Causal { reason, .. }) => {
                assert_eq!(reason, switchyard_core::CausalError::Lost, "key {key}");
                refused.insert(*key);
            }
            Err(other) => panic!("key {key}: {other}"),
        }
        assert!(began.elapsed() < Duration::from_secs(1), "a read hung");
    }
    println!(
        "redis after a promotion: {} tokens of the old master read in {:?}, {} refused as lost ({:?}); {:?}",
        kept.len() + lost_writes.len(),
        started.elapsed(),
        refused.len(),
        refused,
        cluster.causal_stats()
    );
    // The applied writes are honoured, the lost ones refused, none served stale.
    assert_eq!(refused, (100..105).collect::<BTreeSet<u64>>());
    // New writes on the new line are honoured as before.
    let fresh = write(1_000, true).await.unwrap().unwrap();
    assert!(read(1_000, Some(fresh)).await.unwrap().fresh);
}
