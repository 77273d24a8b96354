//! A randomized chaos run through the public API (issue 17), CI-sized: per
//! engine (PostgreSQL primary + 2 standbys, Redis master + 2 replicas), a
//! fixed seed decides which replica is promoted and the order, length and
//! spacing of the faults, while writers and readers run throughout:
//!
//! - a replica paused (SIGSTOP) for a few hundred ms, another killed and
//!   restarted;
//! - the primary killed, a replica promoted, the old primary restarted as an
//!   independent primary, then the promoted one stalled for 800 ms (the
//!   sequence that once handed the writes back to the stale node);
//! - the third node orphaned by that failover (it follows the old primary
//!   again once it is back), then re-pointed at the new primary, and the old
//!   primary re-cloned (PostgreSQL) or re-pointed (Redis) as a replica.
//!
//! Tenants of every isolation level the engine offers ([`TENANTS`]: a
//! PostgreSQL database, schema and RLS rows; a Redis logical database, key
//! prefix and ACL user) write items of their own throughout and read, through
//! their own checkouts, what they can see of the others' (see `tenant_load`).
//!
//! Asserted, per engine: 0 tenant leaks; no acknowledged write lost outside a
//! promotion window (those inside it are reported: replication here is
//! asynchronous); no read missing an acknowledged write older than
//! `max_replica_lag` (Redis included: a replica restarted empty, demoted or
//! re-pointed serves no reads before it has synced and streams again); no
//! operation running past its bound (no hung operation); nothing held once
//! the load stops. And a control for the leak checks: the namespace the row
//! (and, on Redis, prefix) tenants share physically holds several tenants'
//! items, so a check that reached past its scope would have found some.
//! Failed operations are reported by kind with when they happened, not
//! asserted (the faults make some fail).
//!
//! `SWITCHYARD_CHAOS_SEEDS=1,2,3 cargo test -p switchyard --test chaos --
//! --nocapture` runs more seeds; the default is one per engine.
//! `SWITCHYARD_CHAOS_ENGINES=redis` (or `pg`) runs one engine;
//! `SWITCHYARD_CHAOS_LOG=info` prints the router's log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fixture;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::kind;
use fixture::*;
use switchyard_postgres::PgBackend;
use switchyard_redis::RedisBackend;
use switchyard_router::Cluster;
use switchyard_testkit::Node;
use tokio::time::Instant;

const WRITERS: usize = 2;
const READERS: usize = 3;
const PACE: Duration = Duration::from_millis(10);
/// The most one operation may take: the checkout deadline plus its retries'
/// statements, plus scheduling slack on two shared cores.
const OP_BOUND: Duration = Duration::from_secs(5);
/// A write acknowledged this long before the primary's kill has reached
/// every replica that streams (loopback replication takes milliseconds).
const REPLICATION_SLACK: Duration = Duration::from_millis(500);

/// A small xorshift generator: the run is a function of its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

#[derive(Debug, Clone)]
struct Ack {
    id: i64,
    at: Instant,
    endpoint: String,
}

/// What the tenants' load saw: writes per tenant and every leak.
struct TenantLog {
    /// Item ids acknowledged for each tenant of [`TENANTS`], in order.
    acked: Mutex<Vec<Vec<i64>>>,
    /// Leak checks answered (reads through one tenant's checkout).
    checks: AtomicI64,
    /// Operations that failed (outside a fault they should not, but the
    /// faults make some fail; the untenanted load's counts say how many).
    failed: AtomicI64,
    /// What a tenant saw that was not its own.
    leaks: Mutex<Vec<String>>,
}

impl Default for TenantLog {
    fn default() -> Self {
        Self {
            acked: Mutex::new(vec![Vec::new(); TENANTS.len()]),
            checks: AtomicI64::new(0),
            failed: AtomicI64::new(0),
            leaks: Mutex::new(Vec::new()),
        }
    }
}

/// The most recent item ids of every tenant but `me`, a few each.
fn foreign_ids(acked: &[Vec<i64>], me: usize) -> Vec<i64> {
    acked
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .flat_map(|(_, ids)| ids.iter().rev().take(4).copied())
        .collect()
}

/// One task per tenant of [`TENANTS`] until `stop`: writes an item of its
/// own, then reads through its own checkout what it can see (PostgreSQL:
/// the owners of every row of its `items`; Redis: the keys other tenants
/// just wrote, by their names), which must be nothing but its own. A write
/// that landed in another tenant's namespace shows there as a foreign owner;
/// a read that reaches another namespace shows a foreign item.
fn tenant_load<E: Engine>(
    cluster: &Cluster<E>,
    log: &Arc<Log>,
    tenants: &Arc<TenantLog>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next_id = Arc::new(AtomicI64::new(1_000_000));
    tenant_ids()
        .into_iter()
        .enumerate()
        .map(|(me, tenant)| {
            let (cluster, log, tenants, stop, next_id) = (
                cluster.clone(),
                log.clone(),
                tenants.clone(),
                stop.clone(),
                next_id.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    match E::tenant_write(&cluster, &tenant, id).await {
                        Ok(_) => tenants.acked.lock().unwrap()[me].push(id),
                        Err(_) => {
                            tenants.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    log.took(started);
                    let foreign = foreign_ids(&tenants.acked.lock().unwrap(), me);
                    let started = Instant::now();
                    match E::tenant_seen(&cluster, &tenant, foreign).await {
                        Ok((endpoint, owners)) => {
                            tenants.checks.fetch_add(1, Ordering::Relaxed);
                            for owner in owners.iter().filter(|o| o.as_str() != tenant.as_str()) {
                                tenants
                                    .leaks
                                    .lock()
                                    .unwrap()
                                    .push(format!("{tenant} saw an item of {owner} on {endpoint}"));
                            }
                        }
                        Err(_) => {
                            tenants.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    log.took(started);
                    tokio::time::sleep(PACE * 2).await;
                }
            })
        })
        .collect()
}

#[derive(Default)]
struct Log {
    acked: Mutex<Vec<Ack>>,
    /// Reads that missed a write acknowledged more than `MAX_LAG` before
    /// they started: (id, served by, age of the write, when the read started).
    misses: Mutex<Vec<(i64, String, Duration, Instant)>>,
    reads: AtomicI64,
    failed: AtomicI64,
    /// Failed operations by intent and error kind: how many, first, last.
    errors: Mutex<std::collections::BTreeMap<String, (usize, Instant, Instant)>>,
    slowest: Mutex<Duration>,
}

impl Log {
    fn failed(&self, what: &str, error: &switchyard_core::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let kind = format!("{what} {}", kind(error));
        let now = Instant::now();
        let mut errors = self.errors.lock().unwrap();
        let entry = errors.entry(kind).or_insert((0, now, now));
        entry.0 += 1;
        entry.2 = now;
    }

    fn took(&self, started: Instant) {
        let took = started.elapsed();
        let mut slowest = self.slowest.lock().unwrap();
        *slowest = (*slowest).max(took);
    }
}

/// Writers and readers over `cluster` until `stop`.
fn load<E: Engine>(
    cluster: &Cluster<E>,
    log: &Arc<Log>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next_id = Arc::new(AtomicI64::new(1_000));
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (cluster, log, stop, next_id) =
            (cluster.clone(), log.clone(), stop.clone(), next_id.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                match E::write(&cluster, id).await {
                    Ok(endpoint) => log.acked.lock().unwrap().push(Ack {
                        id,
                        at: Instant::now(),
                        endpoint,
                    }),
                    Err(e) => log.failed("write", &e),
                }
                log.took(started);
                tokio::time::sleep(PACE).await;
            }
        }));
    }
    for _ in 0..READERS {
        let (cluster, log, stop) = (cluster.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                // The newest write old enough that every read must see it.
                let target = log
                    .acked
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .find(|a| started.duration_since(a.at) > MAX_LAG)
                    .cloned();
                if let Some(ack) = target {
                    match E::read(&cluster, ack.id).await {
                        Ok((endpoint, false)) => log.misses.lock().unwrap().push((
                            ack.id,
                            endpoint,
                            started.duration_since(ack.at),
                            started,
                        )),
                        Ok(_) => {}
                        Err(e) => log.failed("read", &e),
                    }
                    log.reads.fetch_add(1, Ordering::Relaxed);
                    log.took(started);
                }
                tokio::time::sleep(PACE).await;
            }
        }));
    }
    tasks
}

async fn chaos<E: Engine>(seed: u64) {
    let mut rng = Rng::new(seed);
    let bed = E::start(2).await;
    let nodes = E::nodes(&bed);
    let name = |i: usize| format!("{}-{i}", E::NAME);
    let cluster = tenant_cluster::<E>(&bed).await;
    wait_status(&cluster, "the primary to take writes", writer_is(name(0))).await;
    let log = Arc::new(Log::default());
    let tenants = Arc::new(TenantLog::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = load(&cluster, &log, &stop);
    tasks.extend(tenant_load(&cluster, &log, &tenants, &stop));
    let started = Instant::now();
    let say = |what: String| {
        println!(
            "{} seed {seed} +{:>5} ms: {what}",
            E::NAME,
            started.elapsed().as_millis()
        )
    };

    // Replica faults, in a seeded order.
    tokio::time::sleep(rng.millis(300, 800)).await;
    let (paused, killed) = if rng.below(2) == 0 { (1, 2) } else { (2, 1) };
    let pause = rng.millis(200, 800);
    say(format!("pause {} for {pause:?}", name(paused)));
    nodes[paused].pause().await.unwrap();
    tokio::time::sleep(pause).await;
    nodes[paused].resume().await.unwrap();
    tokio::time::sleep(rng.millis(200, 600)).await;
    say(format!("kill and restart {}", name(killed)));
    nodes[killed].kill().await.unwrap();
    tokio::time::sleep(rng.millis(100, 500)).await;
    nodes[killed].restart().await.unwrap();
    wait_status(&cluster, "both replicas to serve reads", |st| {
        st.endpoints.iter().filter(|e| e.serves_reads).count() == 2
    })
    .await;
    tokio::time::sleep(rng.millis(MAX_LAG.as_millis() as u64, 1500)).await;

    // The failover: kill, promote, old primary back independent, stall.
    let promoted = 1 + rng.below(2) as usize;
    let orphan = 3 - promoted;
    say(format!("kill {}, promote {}", name(0), name(promoted)));
    let killed_at = Instant::now();
    nodes[0].kill().await.unwrap();
    tokio::time::sleep(rng.millis(100, 400)).await;
    nodes[promoted].promote().await.unwrap();
    wait_status(
        &cluster,
        "writes to follow the promotion",
        writer_is(name(promoted)),
    )
    .await;
    let window = (killed_at - REPLICATION_SLACK, Instant::now());
    say(format!(
        "writes on {}; restart {} as an independent primary",
        name(promoted),
        name(0)
    ));
    nodes[0].restart().await.unwrap();
    tokio::time::sleep(rng.millis(300, 800)).await;
    say(format!("stall {} for {STALL:?}", name(promoted)));
    nodes[promoted].pause().await.unwrap();
    tokio::time::sleep(STALL).await;
    nodes[promoted].resume().await.unwrap();
    wait_status(
        &cluster,
        "writes back on the promoted node",
        writer_is(name(promoted)),
    )
    .await;
    tokio::time::sleep(rng.millis(MAX_LAG.as_millis() as u64, 2000)).await;

    // The operator puts the house in order.
    say(format!(
        "re-point {} and re-attach {} to {}",
        name(orphan),
        name(0),
        name(promoted)
    ));
    nodes[orphan].rejoin(&nodes[promoted]).await.unwrap();
    nodes[0].rejoin(&nodes[promoted]).await.unwrap();
    wait_status(&cluster, "both replicas to serve reads again", |st| {
        st.endpoints.iter().filter(|e| e.serves_reads).count() == 2
    })
    .await;
    tokio::time::sleep(MAX_LAG * 2).await;

    stop.store(true, Ordering::Release);
    for task in tasks {
        tokio::time::timeout(OP_BOUND * 2, task)
            .await
            .expect("a load task hung")
            .unwrap();
    }

    // Nothing held once the load stopped.
    wait_status(&cluster, "every checkout returned", |st| {
        st.endpoints.iter().all(|e| e.in_flight == 0)
    })
    .await;

    let acked = log.acked.lock().unwrap().clone();
    let mut lost_in_window = std::collections::HashSet::new();
    let mut lost = Vec::new();
    let absent: std::collections::HashSet<i64> =
        E::missing(&nodes[promoted], acked.iter().map(|a| a.id).collect())
            .await
            .into_iter()
            .collect();
    for ack in acked.iter().filter(|a| absent.contains(&a.id)) {
        if ack.at >= window.0 && ack.at <= window.1 {
            lost_in_window.insert(ack.id);
        } else {
            lost.push(ack.clone());
        }
    }
    // A read of a write the failover lost in its window misses it forever:
    // that loss is reported above, not counted again as stale reads.
    let misses: Vec<_> = log
        .misses
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _, _, _)| !lost_in_window.contains(id))
        .map(|(id, endpoint, age, at)| (*id, endpoint.clone(), *age, at.duration_since(started)))
        .collect();
    let by_endpoint = acked
        .iter()
        .fold(HashMap::<&str, usize>::new(), |mut m, a| {
            *m.entry(a.endpoint.as_str()).or_default() += 1;
            m
        });
    say(format!(
        "{} writes acknowledged {by_endpoint:?}, {} lost inside the promotion window, {} outside; {} reads, {} missed an acknowledged write older than {MAX_LAG:?}; {} operations failed; slowest {:?}",
        acked.len(),
        lost_in_window.len(),
        lost.len(),
        log.reads.load(Ordering::Relaxed),
        misses.len(),
        log.failed.load(Ordering::Relaxed),
        *log.slowest.lock().unwrap(),
    ));
    let errors: Vec<String> = log
        .errors
        .lock()
        .unwrap()
        .iter()
        .map(|(kind, (n, first, last))| {
            let at = |t: &Instant| t.duration_since(started).as_millis();
            format!("{kind}: {n} (+{} to +{} ms)", at(first), at(last))
        })
        .collect();
    say(format!("failed operations by kind: {errors:?}"));
    assert!(
        lost.is_empty(),
        "acknowledged writes lost outside the promotion window: {:?}",
        &lost[..lost.len().min(10)]
    );
    assert!(
        misses.is_empty(),
        "stale reads: {:?}",
        &misses[..misses.len().min(10)]
    );
    let leaks = tenants.leaks.lock().unwrap().clone();
    let per_tenant: Vec<usize> = tenants.acked.lock().unwrap().iter().map(Vec::len).collect();
    say(format!(
        "tenants {:?}: items acknowledged {per_tenant:?}, {} leak checks answered, {} tenant operations failed, {} leaks",
        TENANTS.map(|(t, i)| format!("{t}:{i}")),
        tenants.checks.load(Ordering::Relaxed),
        tenants.failed.load(Ordering::Relaxed),
        leaks.len(),
    ));
    // The control: the namespace the row (and, on Redis, prefix) tenants
    // read holds other tenants' items side by side, so a check that reached
    // past its tenant's scope would have seen them.
    let shared = E::shared_owners(&nodes[promoted]).await;
    say(format!(
        "items stored side by side in the shared namespace: owners {shared:?}"
    ));
    assert!(
        shared.len() >= 2,
        "the leak checks had nothing to find: {shared:?}"
    );
    assert!(
        leaks.is_empty(),
        "tenant leaks: {:?}",
        &leaks[..leaks.len().min(10)]
    );
    assert!(
        per_tenant.iter().all(|n| *n >= 20) && tenants.checks.load(Ordering::Relaxed) >= 120,
        "too little tenant load to mean anything"
    );
    let slowest = *log.slowest.lock().unwrap();
    assert!(slowest <= OP_BOUND, "an operation took {slowest:?}");
    assert!(
        log.reads.load(Ordering::Relaxed) > 0 && acked.len() > 100,
        "too little load to mean anything"
    );
}

fn seeds() -> Vec<u64> {
    std::env::var("SWITCHYARD_CHAOS_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![17])
}

/// One test, so the engines run one after the other (the runs share two
/// cores with the servers they break).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_over_postgres_then_redis() {
    // `SWITCHYARD_CHAOS_LOG=info` (any filter) prints the router's log.
    if let Ok(filter) = std::env::var("SWITCHYARD_CHAOS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    // `SWITCHYARD_CHAOS_ENGINES=redis` (or `pg`) runs one engine only.
    let engines = std::env::var("SWITCHYARD_CHAOS_ENGINES").unwrap_or_default();
    let runs = |name: &str| engines.is_empty() || engines.split(',').any(|e| e.trim() == name);
    for seed in seeds() {
        if runs(PgBackend::NAME) {
            chaos::<PgBackend>(seed).await;
        }
        if runs(RedisBackend::NAME) {
            chaos::<RedisBackend>(seed).await;
        }
    }
}
