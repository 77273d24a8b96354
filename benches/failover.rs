//! Failover against real servers: the testkit's PostgreSQL (primary + one
//! streaming standby) and Redis (master + one replica).
//!
//! Each iteration starts a fresh topology, builds a router over it (100 ms
//! probe interval), runs four reader tasks (and, for the primary scenarios, two
//! writer tasks) in a paced loop, injects one fault and measures:
//!
//! - `killed_replica` / `paused_replica` (SIGKILL / SIGSTOP on the replica):
//!   time from the fault to the first successful routed read started after it;
//! - `killed_primary`: the primary is killed, the standby promoted with the
//!   testkit; time from the promotion being done (the testkit saw the node
//!   leave recovery) to the first successful routed write. The total outage
//!   seen by clients (kill to first write) is printed next to it.
//!
//! Criterion reports those durations (`iter_custom`); the operations that
//! failed in each window are printed per iteration, since they are counts,
//! not times. A topology takes a couple of seconds to start, so the bench uses
//! Criterion's minimum of ten samples of one iteration each.
//!
//! `cargo bench --bench failover`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use switchyard::postgres::{pg_error, PgBackend, PgBackendConfig};
use switchyard::redis::RedisBackend;
use switchyard::router::{CheckoutOptions, EndpointConfig, HealthConfig, RetryConfig};
use switchyard::{Backend, Cluster, ClusterConfig, Error, Intent, PoolSettings, Role};
use switchyard_testkit::{Fault, Node, PgCluster, RedisCluster};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Probe interval the failover target is stated for.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Longest a single query may run before it counts as an endpoint failure (a
/// SIGSTOPped server never answers).
const QUERY_TIMEOUT: Duration = Duration::from_millis(250);
/// Deadline of one routed operation, retries included.
const OP_DEADLINE: Duration = Duration::from_secs(3);
/// Pause between one task's operations, so six tasks do not starve two cores.
const PACE: Duration = Duration::from_millis(5);
/// How long operations keep running after a replica fault.
const REPLICA_WINDOW: Duration = Duration::from_millis(800);
/// How long operations keep running after a promotion.
const PROMOTED_WINDOW: Duration = Duration::from_millis(400);
const READERS: usize = 4;
const WRITERS: usize = 2;

/// One operation as a load task saw it.
#[derive(Debug, Clone, Copy)]
struct Op {
    write: bool,
    started: Instant,
    ended: Instant,
    ok: bool,
}

/// What one iteration measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The figure Criterion reports.
    measured: Duration,
    /// Kill to first successful write (primary scenarios only).
    outage: Option<Duration>,
    failed_reads: usize,
    failed_writes: usize,
    ops: usize,
}

fn config() -> ClusterConfig {
    ClusterConfig {
        checkout_timeout: OP_DEADLINE,
        failover_timeout: OP_DEADLINE,
        health: HealthConfig {
            interval: PROBE_INTERVAL,
            timeout: PROBE_INTERVAL,
            fall: 2,
            rise: 1,
            eject_base: Duration::from_secs(1),
            ..HealthConfig::default()
        },
        retry: RetryConfig {
            max_attempts: 3,
            attempt_timeout: QUERY_TIMEOUT,
        },
        ..ClusterConfig::default()
    }
}

/// The routed operations a load task runs, per engine.
trait Engine: Backend + Sized {
    fn read(cluster: &Cluster<Self>) -> impl Future<Output = Result<(), Error>> + Send;
    fn write(cluster: &Cluster<Self>) -> impl Future<Output = Result<(), Error>> + Send;
}

fn timed_out(endpoint: &switchyard::core::EndpointId) -> Error {
    Error::Timeout {
        endpoint: endpoint.clone(),
        tenant: None,
        elapsed: QUERY_TIMEOUT,
    }
}

// Reads are bounded by the router: each attempt, query included, ends at
// `retry.attempt_timeout` (QUERY_TIMEOUT) and moves to another endpoint. A
// write's one attempt would run to OP_DEADLINE, so writes bound their query.
impl Engine for PgBackend {
    fn read(cluster: &Cluster<Self>) -> impl Future<Output = Result<(), Error>> + Send {
        let opts = CheckoutOptions::new().timeout(OP_DEADLINE);
        cluster.run(Intent::Read, None, opts, async |conn| {
            sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(&mut **conn)
                .await
                .map(drop)
        })
    }

    fn write(cluster: &Cluster<Self>) -> impl Future<Output = Result<(), Error>> + Send {
        let opts = CheckoutOptions::new().timeout(OP_DEADLINE);
        cluster.run(Intent::Write, None, opts, async |conn| {
            let endpoint = conn.endpoint().clone();
            let query =
                sqlx::query("INSERT INTO failover_bench (at) VALUES (now())").execute(&mut **conn);
            match tokio::time::timeout(QUERY_TIMEOUT, query).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(pg_error(&endpoint, None, e)),
                Err(_) => Err(timed_out(&endpoint)),
            }
        })
    }
}

impl Engine for RedisBackend {
    fn read(cluster: &Cluster<Self>) -> impl Future<Output = Result<(), Error>> + Send {
        let opts = CheckoutOptions::new().timeout(OP_DEADLINE);
        cluster.run(Intent::Read, None, opts, async |conn| {
            conn.get::<Option<String>>("k").await.map(drop)
        })
    }

    fn write(cluster: &Cluster<Self>) -> impl Future<Output = Result<(), Error>> + Send {
        let opts = CheckoutOptions::new().timeout(OP_DEADLINE);
        cluster.run(Intent::Write, None, opts, async |conn| {
            let endpoint = conn.endpoint().clone();
            match tokio::time::timeout(QUERY_TIMEOUT, conn.set("k", "v")).await {
                Ok(result) => result,
                Err(_) => Err(timed_out(&endpoint)),
            }
        })
    }
}

/// Reader (and writer) tasks logging every operation until `stop` is set.
fn start_load<B: Engine>(
    cluster: &Cluster<B>,
    writers: usize,
    stop: &Arc<AtomicBool>,
    log: &Arc<Mutex<Vec<Op>>>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for i in 0..READERS + writers {
        let write = i >= READERS;
        let cluster = cluster.clone();
        let stop = Arc::clone(stop);
        let log = Arc::clone(log);
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = if write {
                    B::write(&cluster).await
                } else {
                    B::read(&cluster).await
                };
                let ended = Instant::now();
                log.lock().unwrap().push(Op {
                    write,
                    started,
                    ended,
                    ok: result.is_ok(),
                });
                tokio::time::sleep(PACE).await;
            }
        });
    }
    set
}

/// The first successful operation of the kind wanted that started after `since`.
fn first_success(log: &[Op], write: bool, since: Instant) -> Option<Instant> {
    log.iter()
        .filter(|op| op.write == write && op.ok && op.started >= since)
        .map(|op| op.ended)
        .min()
}

/// Waits (bounded) until an operation of the kind wanted succeeded after `since`.
async fn wait_success(log: &Mutex<Vec<Op>>, write: bool, since: Instant) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(at) = first_success(&log.lock().unwrap(), write, since) {
            return at;
        }
        assert!(
            Instant::now() < deadline,
            "no successful operation after the fault"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Loads `cluster` over `primary` and `replica`, injects `fault` and
/// measures; a paused replica is resumed before the topology is dropped.
async fn measure<B: Engine, N: Node>(
    cluster: Cluster<B>,
    fault: Fault,
    primary: &N,
    replica: &N,
) -> Sample {
    let writers = if fault.hits_primary() { WRITERS } else { 0 };
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    // Warm: every task has completed operations before the fault.
    let mut tasks = start_load(&cluster, writers, &stop, &log);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The fault counts from when it is in effect: the signal has been sent
    // and, for a kill, the process is gone.
    fault.inject(primary, replica).await.unwrap();
    let faulted = Instant::now();
    let (measured, outage, window_end) = if fault.hits_primary() {
        fault.recover(replica).await.unwrap();
        let promoted = Instant::now();
        let at = wait_success(&log, true, faulted).await;
        (
            at.saturating_duration_since(promoted),
            Some(at - faulted),
            at.max(promoted) + PROMOTED_WINDOW,
        )
    } else {
        let at = wait_success(&log, false, faulted).await;
        let end = (faulted + REPLICA_WINDOW).max(at);
        (at - faulted, None, end)
    };
    tokio::time::sleep_until(window_end).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done.expect("load task panicked");
    }
    drop(cluster);
    if fault == Fault::PausedReplica {
        fault.recover(replica).await.unwrap();
    }
    let log = log.lock().unwrap();
    let window: Vec<&Op> = log
        .iter()
        .filter(|op| op.ended >= faulted && op.started <= window_end)
        .collect();
    Sample {
        measured,
        outage,
        failed_reads: window.iter().filter(|op| !op.write && !op.ok).count(),
        failed_writes: window.iter().filter(|op| op.write && !op.ok).count(),
        ops: window.len(),
    }
}

async fn pg_iteration(fault: Fault) -> Sample {
    let pg = PgCluster::start(1).await.expect("postgres (testkit)");
    let standby = &pg.standbys()[0];
    {
        let admin = sqlx::PgPool::connect(pg.primary().url()).await.unwrap();
        sqlx::query("CREATE TABLE failover_bench (at timestamptz)")
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
    }
    pg.wait_replayed(standby, Duration::from_secs(10))
        .await
        .unwrap();
    let backend = |name: &str, url: &str| {
        let pool = PoolSettings {
            max_size: 4,
            acquire_timeout: Duration::from_secs(1),
            ..PoolSettings::default()
        };
        Arc::new(
            PgBackend::new(
                PgBackendConfig::builder(name.to_owned(), url)
                    .pool(pool)
                    .config(),
            )
            .unwrap(),
        )
    };
    let cluster = two_nodes(
        "postgres",
        backend("pg-primary", pg.primary().url()),
        backend("pg-standby", standby.url()),
    );
    let sample = measure(cluster, fault, pg.primary(), standby).await;
    drop(pg);
    sample
}

async fn redis_iteration(fault: Fault) -> Sample {
    let redis = RedisCluster::start(1).await.expect("redis (testkit)");
    let replica = &redis.replicas()[0];
    let backend = |name: &str, url: String| {
        Arc::new(
            RedisBackend::builder(name.to_owned(), url)
                .max_size(4)
                .acquire_timeout(Duration::from_secs(1))
                .connect_timeout(QUERY_TIMEOUT)
                .response_timeout(QUERY_TIMEOUT)
                .build()
                .unwrap(),
        )
    };
    let cluster = two_nodes(
        "redis",
        backend("redis-master", redis.master().url()),
        backend("redis-replica", replica.url()),
    );
    let sample = measure(cluster, fault, redis.master(), replica).await;
    drop(redis);
    sample
}

/// The router every iteration measures: `primary` and `replica` of `engine`,
/// with the bench's configuration.
fn two_nodes<B: Engine>(engine: &'static str, primary: Arc<B>, replica: Arc<B>) -> Cluster<B> {
    Cluster::builder(format!("failover-{engine}"))
        .engine(engine)
        .config(config())
        .endpoint(primary, EndpointConfig::new(Role::Primary))
        .endpoint(replica, EndpointConfig::new(Role::Replica))
        .build()
        .unwrap()
}

fn report(engine: &str, fault: Fault, sample: &Sample) {
    let outage = sample
        .outage
        .map(|o| format!(", kill to first write {:.1} ms", o.as_secs_f64() * 1e3))
        .unwrap_or_default();
    println!(
        "failover/{engine}/{}: {:.1} ms to first success{outage}; failed in window: {} reads, {} writes of {} ops",
        fault.name(),
        sample.measured.as_secs_f64() * 1e3,
        sample.failed_reads,
        sample.failed_writes,
        sample.ops,
    );
}

fn failover(c: &mut Criterion) {
    let rt = common::runtime();
    let mut group = c.benchmark_group("failover");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
    for engine in ["postgres", "redis"] {
        for fault in Fault::ALL {
            group.bench_function(format!("{engine}/{}", fault.name()), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let sample = rt.block_on(async {
                            if engine == "postgres" {
                                pg_iteration(fault).await
                            } else {
                                redis_iteration(fault).await
                            }
                        });
                        report(engine, fault, &sample);
                        // A write already waiting when the promotion lands can
                        // succeed at once; Criterion rejects a zero sample.
                        total += sample.measured.max(Duration::from_micros(1));
                    }
                    total
                });
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = failover
}
criterion_main!(benches);
