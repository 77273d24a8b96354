//! The demo's mixed multi-tenant workload and its isolation audit.
//!
//! Every row a tenant writes carries its own id; every read checks that what
//! came back belongs to the tenant it was checked out for. A row or value of
//! another tenant is a leak.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{Error, Intent, TenantId};
use switchyard_postgres::{PgBackend, PgCheckoutExt};
use switchyard_redis::RedisBackend;
use switchyard_router::{CheckoutOptions, Cluster};

/// Tenants on PostgreSQL: the first two on schema isolation, the others on row isolation.
pub const PG_TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
/// Tenants on Redis, all on key-prefix isolation.
pub const REDIS_TENANTS: [&str; 3] = ["acme", "globex", "hooli"];

/// Longest one operation may take before it counts as failed. Reads are also
/// bounded per attempt by the router (`retry.attempt_timeout`).
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters of one phase.
#[derive(Debug, Default)]
pub struct Counters {
    /// Checkouts that succeeded.
    pub checkouts: AtomicU64,
    /// Reads that completed.
    pub reads_ok: AtomicU64,
    /// Reads that failed.
    pub reads_failed: AtomicU64,
    /// Writes that completed.
    pub writes_ok: AtomicU64,
    /// Writes that failed.
    pub writes_failed: AtomicU64,
    /// Reads that were verified against their tenant.
    pub verified: AtomicU64,
    /// Rows or values of another tenant seen.
    pub leaks: AtomicU64,
}

/// Counters per phase, and which phase is running.
#[derive(Debug)]
pub struct Stats {
    /// One entry per phase.
    pub phases: Vec<Counters>,
    /// Index of the running phase.
    pub current: AtomicUsize,
    /// Set to stop the workers.
    pub stop: AtomicBool,
}

impl Stats {
    /// Stats for `phases` phases.
    pub fn new(phases: usize) -> Self {
        Self {
            phases: (0..phases).map(|_| Counters::default()).collect(),
            current: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }

    fn now(&self) -> &Counters {
        let i = self
            .current
            .load(Ordering::Relaxed)
            .min(self.phases.len().saturating_sub(1));
        &self.phases[i]
    }

    /// Sum of a counter over all phases.
    pub fn total(&self, f: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.phases
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum()
    }
}

fn count(stats: &Stats, intent: Intent, ok: bool) {
    let c = stats.now();
    let counter = match (intent, ok) {
        (Intent::Read, true) => &c.reads_ok,
        (Intent::Read, false) => &c.reads_failed,
        (_, true) => &c.writes_ok,
        (_, false) => &c.writes_failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One worker until the demo stops: cycles through `tenants`, one write
/// every `write_every` operations, each operation (`op`) bounded by
/// [`OP_TIMEOUT`] and counted.
async fn worker<F: Future<Output = bool>>(
    stats: &Stats,
    seed: usize,
    tenants: &[&str],
    write_every: usize,
    op: impl Fn(TenantId, Intent, usize) -> F,
) {
    let mut n = seed;
    while !stats.stop.load(Ordering::Relaxed) {
        n += 1;
        let Ok(tenant) = TenantId::new(tenants[n % tenants.len()]) else {
            return;
        };
        let intent = if n.is_multiple_of(write_every) {
            Intent::Write
        } else {
            Intent::Read
        };
        let ok = tokio::time::timeout(OP_TIMEOUT, op(tenant, intent, n))
            .await
            .unwrap_or(false);
        count(stats, intent, ok);
        tokio::time::sleep(Duration::from_millis(if ok { 5 } else { 20 })).await;
    }
}

/// One PostgreSQL worker: alternates tenants, one write per three reads.
pub async fn pg_worker(cluster: Cluster<PgBackend>, stats: Arc<Stats>, seed: usize) {
    let (c, s) = (&cluster, &stats);
    let op = move |t: TenantId, intent, n| async move { pg_op(c, s, &t, intent, n).await };
    worker(&stats, seed, &PG_TENANTS, 4, op).await;
}

async fn pg_op(
    cluster: &Cluster<PgBackend>,
    stats: &Arc<Stats>,
    tenant: &TenantId,
    intent: Intent,
    n: usize,
) -> bool {
    if intent == Intent::Write {
        // Not idempotent: one attempt, and a failure counts.
        let Ok(mut conn) = cluster.checkout(intent, Some(tenant)).await else {
            return false;
        };
        stats.now().checkouts.fetch_add(1, Ordering::Relaxed);
        let r = sqlx::query("INSERT INTO items (tenant, n) VALUES ($1, $2)")
            .bind(tenant.as_str())
            .bind(i64::try_from(n).unwrap_or(0))
            .execute(&mut *conn)
            .await;
        return r.map_err(|e| conn.fail(e)).is_ok();
    }
    // Reads go through `Cluster::run`: one that fails on a dying endpoint, or
    // hangs on it past the router's attempt timeout, is retried on another.
    // Owned captures, moved in once and borrowed by every attempt: a closure
    // that borrowed `stats` would make this task's future not provably `Send`.
    let counted = Arc::clone(stats);
    let rows = cluster
        .run(
            Intent::Read,
            Some(tenant),
            CheckoutOptions::new(),
            async move |conn| {
                counted.now().checkouts.fetch_add(1, Ordering::Relaxed);
                sqlx::query_scalar::<_, String>(
                    "SELECT tenant FROM items ORDER BY id DESC LIMIT 20",
                )
                .fetch_all(&mut **conn)
                .await
            },
        )
        .await;
    let Ok(rows) = rows else {
        return false;
    };
    let c = stats.now();
    c.verified.fetch_add(1, Ordering::Relaxed);
    let foreign = rows
        .iter()
        .filter(|t| t.as_str() != tenant.as_str())
        .count();
    if foreign > 0 || rows.is_empty() {
        // An empty result would mean the tenant's seed row went missing.
        c.leaks.fetch_add(foreign.max(1) as u64, Ordering::Relaxed);
    }
    true
}

/// One Redis worker: per tenant keys under its prefix, values carrying the tenant.
pub async fn redis_worker(cluster: Cluster<RedisBackend>, stats: Arc<Stats>, seed: usize) {
    let (c, s) = (&cluster, &stats);
    let op = move |t: TenantId, intent, n| async move { redis_op(c, s, &t, intent, n).await };
    worker(&stats, seed, &REDIS_TENANTS, 3, op).await;
}

async fn redis_op(
    cluster: &Cluster<RedisBackend>,
    stats: &Arc<Stats>,
    tenant: &TenantId,
    intent: Intent,
    n: usize,
) -> bool {
    // The same key names for every tenant: only the prefix keeps them apart.
    let key = format!("k{}", n % 8);
    if intent == Intent::Write {
        let Ok(mut conn) = cluster.checkout(intent, Some(tenant)).await else {
            return false;
        };
        stats.now().checkouts.fetch_add(1, Ordering::Relaxed);
        return conn
            .set(&key, tenant.as_str())
            .await
            .map_err(|e| conn.report_failure(&e))
            .is_ok();
    }
    let (counted, owner) = (Arc::clone(stats), tenant.clone());
    let read = cluster
        .run(
            Intent::Read,
            Some(tenant),
            CheckoutOptions::new(),
            async move |conn| {
                counted.now().checkouts.fetch_add(1, Ordering::Relaxed);
                let value: Option<String> = conn.get(&key).await?;
                let prefix_ok = conn
                    .key_prefix()
                    .is_some_and(|p| p.contains(owner.as_str()));
                Ok::<_, Error>((value, prefix_ok))
            },
        )
        .await;
    let Ok((value, prefix_ok)) = read else {
        return false;
    };
    let c = stats.now();
    c.verified.fetch_add(1, Ordering::Relaxed);
    if value.is_some_and(|v| v != tenant.as_str()) || !prefix_ok {
        c.leaks.fetch_add(1, Ordering::Relaxed);
    }
    true
}
