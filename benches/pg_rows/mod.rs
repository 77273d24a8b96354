//! The side-by-side rows of the `postgres` group: every way of running one
//! `SELECT 1` per checkout that the PostgreSQL bar compares, each built
//! against a set of URLs (direct, for the timings, or through counting
//! proxies, for the round trips on the wire).
//!
//! | row | what one operation is |
//! |---|---|
//! | `raw_sqlx` | `PgPool` (sqlx defaults) `acquire` + prepared `SELECT 1` |
//! | `peer/set_config` | the same + `SELECT set_config('app.tenant_id', $1, false)` first (8 tenants) |
//! | `raw_sqlx/untested`, `peer/set_config/untested` | the same on a `PgPool` with `test_before_acquire(false)`: no ping on acquire |
//! | `peer/search_path` | the same + `SET search_path TO "tenant_sN"` first (8 tenants) |
//! | `pgbouncer/session` | `PgPool` (sqlx as is) to PgBouncer in session mode + prepared `SELECT 1` |
//! | `pgbouncer/transaction` | `PgPool` to PgBouncer in transaction mode + simple-protocol `SELECT 1` |
//! | `pgbouncer/transaction/row` | the same, the scope in the query's own implicit transaction: `SELECT set_config('app.tenant_id', 'rN', true); SELECT 1` (8 tenants) |
//! | `switchyard/backend_unscoped` | core `Checkout::acquire` on the `PgBackend` alone (no router) |
//! | `switchyard/unscoped` | `Cluster::checkout` (read, no tenant) |
//! | `switchyard/{schema,row}/{1,8}_tenants/affinity_{on,off}` | `Cluster::checkout` for tenant `task % tenants` |
//! | `switchyard/{schema,row}/8_tenants/affinity_on/fifo` | the same with both tiers queued `fifo` (one class per tier) instead of fair |
//! | `switchyard/{schema,row}/8_tenants/bypass_16` | affinity on, fair, `max_bypass` 16 (the pool's size) instead of 4 |
//! | `switchyard/unscoped/unchecked`, `switchyard/{schema,row}/8_tenants/unchecked` | affinity on with `check` off: the owner's own connection back with no round trip (owner changes still reset completely) |
//!
//! The count also reads each switchyard row's owner-change share from
//! `PgBackend::pg_stats`: complete resets over checkouts.
//!
//! Every pool has [`POOL_SIZE`] connections, PgBouncer [`POOL_SIZE`] server
//! connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use switchyard::core::QueueOrder;
use switchyard::postgres::{AffinitySettings, PgBackend, PgBackendConfig};
use switchyard::router::EndpointConfig;
use switchyard::{
    Backend as _, Checkout, CheckoutRequest, Cluster, Intent, PoolSettings, Role, TenantId,
};
use switchyard_testkit::{FaultHandle, PgMessages};
use tokio::runtime::Runtime;

use crate::common;

/// Connections in every pool compared here.
pub const POOL_SIZE: u32 = 16;

/// Where a row's client connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Postgres,
    BouncerSession,
    BouncerTransaction,
}

/// The three addresses a set of rows connects to.
#[derive(Debug, Clone)]
pub struct Urls {
    pub postgres: String,
    pub bouncer_session: String,
    pub bouncer_transaction: String,
}

type Op = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One row: its name, where it connects and one operation (given the task
/// number).
pub struct Row {
    pub name: String,
    pub via: Via,
    pub op: Op,
    /// The switchyard backend behind the row, for its owner-change count.
    pub backend: Option<Arc<PgBackend>>,
}

/// The pools and clusters behind a set of rows; dropping them (inside the
/// runtime) closes every connection.
pub struct Rows {
    pub rows: Vec<Row>,
    closers: Vec<PgPool>,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

impl Rows {
    /// Closes the sqlx pools (the switchyard backends close when dropped).
    pub async fn close(self) {
        for pool in &self.closers {
            pool.close().await;
        }
    }
}

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |task| Box::pin(f(task)))
}

async fn pg_pool(url: &str) -> PgPool {
    pg_pool_with(url, PgPoolOptions::new()).await
}

/// sqlx's pool without its ping on acquire (`test_before_acquire(false)`):
/// the peer of switchyard with `affinity.check` off.
async fn pg_pool_untested(url: &str) -> PgPool {
    pg_pool_with(url, PgPoolOptions::new().test_before_acquire(false)).await
}

async fn pg_pool_with(url: &str, options: PgPoolOptions) -> PgPool {
    options
        .max_connections(POOL_SIZE)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("sqlx pool to {url}: {e}"))
}

async fn select_one(conn: &mut sqlx::PgConnection) {
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    black_box(one);
}

async fn select_one_checkout(mut conn: Checkout<PgBackend>) {
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    black_box(one);
}

fn backend(url: &str, name: &str, affinity: AffinitySettings) -> Arc<PgBackend> {
    let config = PgBackendConfig::builder(name.to_owned(), url)
        .pool(PoolSettings::default().with_max_size(POOL_SIZE))
        .affinity(affinity)
        .config();
    Arc::new(PgBackend::new(config).expect("pg backend"))
}

/// A cluster with `backend` as its only primary and the bench tenants.
pub fn cluster(backend: &Arc<PgBackend>) -> Cluster<PgBackend> {
    cluster_queued(backend, QueueOrder::Fair)
}

/// [`cluster`] with the tenant tiers queued in `order`.
pub fn cluster_queued(backend: &Arc<PgBackend>, order: QueueOrder) -> Cluster<PgBackend> {
    Cluster::builder(format!("bench-{}", backend.endpoint()))
        .engine("postgres")
        .tenants(common::tenants_queued(order))
        .endpoint(Arc::clone(backend), EndpointConfig::new(Role::Primary))
        .build()
        .expect("cluster")
}

fn cluster_op(cluster: &Cluster<PgBackend>, tenants: Option<Arc<Vec<TenantId>>>) -> Op {
    let cluster = cluster.clone();
    op(move |task| {
        let cluster = cluster.clone();
        let tenants = tenants.clone();
        async move {
            let tenant = tenants.as_ref().map(|ids| &ids[task % ids.len()]);
            select_one_checkout(cluster.checkout(Intent::Read, tenant).await.unwrap()).await;
        }
    })
}

/// Creates the tenant schemas `tenant_s0..7` the schema rows use.
pub async fn provision(url: &str) {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("admin pool");
    for i in 0..common::TENANTS {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS tenant_s{i}"
        )))
        .execute(&admin)
        .await
        .expect("create schema");
    }
    admin.close().await;
}

/// Builds every row against `urls`.
pub async fn build(urls: &Urls) -> Rows {
    let raw = pg_pool(&urls.postgres).await;
    let set_config = pg_pool(&urls.postgres).await;
    let search_path = pg_pool(&urls.postgres).await;
    let session = pg_pool(&urls.bouncer_session).await;
    let transaction = pg_pool(&urls.bouncer_transaction).await;
    let raw_untested = pg_pool_untested(&urls.postgres).await;
    let set_config_untested = pg_pool_untested(&urls.postgres).await;
    let affine = backend(&urls.postgres, "pg-affinity", AffinitySettings::default());
    let unchecked = backend(
        &urls.postgres,
        "pg-unchecked",
        AffinitySettings {
            check: false,
            ..AffinitySettings::default()
        },
    );
    let with_unchecked = cluster(&unchecked);
    let plain = backend(
        &urls.postgres,
        "pg-no-affinity",
        AffinitySettings::disabled(),
    );
    let with_affinity = cluster(&affine);
    let without_affinity = cluster(&plain);
    let fifo = cluster_queued(&affine, QueueOrder::Fifo);
    let bypass_16 = {
        let affinity = AffinitySettings {
            max_bypass: POOL_SIZE,
            ..AffinitySettings::default()
        };
        backend(&urls.postgres, "pg-bypass-16", affinity)
    };
    let with_bypass_16 = cluster(&bypass_16);

    let row_ids = common::tenant_ids("r");
    let schema_ids = common::tenant_ids("s");
    let mut rows = Vec::new();
    let mut add = |name: &str, via: Via, op: Op| {
        rows.push(Row {
            name: name.to_owned(),
            via,
            op,
            backend: None,
        });
    };

    for (name, pool) in [("raw_sqlx", &raw), ("raw_sqlx/untested", &raw_untested)] {
        let pool = pool.clone();
        add(
            name,
            Via::Postgres,
            op(move |_| {
                let pool = pool.clone();
                async move { select_one(&mut pool.acquire().await.unwrap()).await }
            }),
        );
    }
    for (name, pool) in [
        ("peer/set_config", &set_config),
        ("peer/set_config/untested", &set_config_untested),
    ] {
        let (pool, ids) = (pool.clone(), Arc::clone(&row_ids));
        add(
            name,
            Via::Postgres,
            op(move |task| {
                let (pool, ids) = (pool.clone(), Arc::clone(&ids));
                async move {
                    let mut conn = pool.acquire().await.unwrap();
                    sqlx::query("SELECT set_config('app.tenant_id', $1, false)")
                        .bind(ids[task % ids.len()].as_str())
                        .execute(&mut *conn)
                        .await
                        .unwrap();
                    select_one(&mut conn).await;
                }
            }),
        );
    }
    let paths: Arc<Vec<String>> = Arc::new(
        (0..common::TENANTS)
            .map(|i| format!("SET search_path TO \"tenant_s{i}\""))
            .collect(),
    );
    let pool = search_path.clone();
    add(
        "peer/search_path",
        Via::Postgres,
        op(move |task| {
            let (pool, paths) = (pool.clone(), Arc::clone(&paths));
            async move {
                let mut conn = pool.acquire().await.unwrap();
                let set = paths[task % paths.len()].clone();
                sqlx::raw_sql(AssertSqlSafe(set))
                    .execute(&mut *conn)
                    .await
                    .unwrap();
                select_one(&mut conn).await;
            }
        }),
    );
    let pool = session.clone();
    add(
        "pgbouncer/session",
        Via::BouncerSession,
        op(move |_| {
            let pool = pool.clone();
            async move { select_one(&mut pool.acquire().await.unwrap()).await }
        }),
    );
    let pool = transaction.clone();
    add(
        "pgbouncer/transaction",
        Via::BouncerTransaction,
        op(move |_| {
            let pool = pool.clone();
            async move {
                let mut conn = pool.acquire().await.unwrap();
                black_box(
                    sqlx::raw_sql("SELECT 1")
                        .fetch_one(&mut *conn)
                        .await
                        .unwrap(),
                );
            }
        }),
    );
    let scoped: Arc<Vec<String>> = Arc::new(
        row_ids
            .iter()
            .map(|id| format!("SELECT set_config('app.tenant_id', '{id}', true); SELECT 1"))
            .collect(),
    );
    let pool = transaction.clone();
    add(
        "pgbouncer/transaction/row",
        Via::BouncerTransaction,
        op(move |task| {
            let (pool, scoped) = (pool.clone(), Arc::clone(&scoped));
            async move {
                let mut conn = pool.acquire().await.unwrap();
                let sql = scoped[task % scoped.len()].clone();
                black_box(
                    sqlx::raw_sql(AssertSqlSafe(sql))
                        .fetch_all(&mut *conn)
                        .await
                        .unwrap(),
                );
            }
        }),
    );
    let backend_only = Arc::clone(&affine);
    add(
        "switchyard/backend_unscoped",
        Via::Postgres,
        op(move |_| {
            let backend = Arc::clone(&backend_only);
            async move {
                let req = CheckoutRequest::with_timeout(common::CHECKOUT_TIMEOUT);
                select_one_checkout(Checkout::acquire(&backend, req).await.unwrap()).await;
            }
        }),
    );
    add(
        "switchyard/unscoped",
        Via::Postgres,
        cluster_op(&with_affinity, None),
    );
    add(
        "switchyard/unscoped/unchecked",
        Via::Postgres,
        cluster_op(&with_unchecked, None),
    );
    for (level, ids) in [("schema", &schema_ids), ("row", &row_ids)] {
        for tenants in [1, common::TENANTS] {
            let ids: Arc<Vec<TenantId>> = Arc::new(ids[..tenants].to_vec());
            for (affinity, cluster) in [("on", &with_affinity), ("off", &without_affinity)] {
                add(
                    &format!("switchyard/{level}/{tenants}_tenants/affinity_{affinity}"),
                    Via::Postgres,
                    cluster_op(cluster, Some(Arc::clone(&ids))),
                );
            }
        }
    }
    for (level, ids) in [("schema", &schema_ids), ("row", &row_ids)] {
        add(
            &format!(
                "switchyard/{level}/{}_tenants/affinity_on/fifo",
                common::TENANTS
            ),
            Via::Postgres,
            cluster_op(&fifo, Some(Arc::clone(ids))),
        );
        add(
            &format!("switchyard/{level}/{}_tenants/bypass_16", common::TENANTS),
            Via::Postgres,
            cluster_op(&with_bypass_16, Some(Arc::clone(ids))),
        );
        add(
            &format!("switchyard/{level}/{}_tenants/unchecked", common::TENANTS),
            Via::Postgres,
            cluster_op(&with_unchecked, Some(Arc::clone(ids))),
        );
    }
    for row in &mut rows {
        if row.name.starts_with("switchyard/") {
            let backend = if row.name.contains("affinity_off") {
                &plain
            } else if row.name.contains("bypass_16") {
                &bypass_16
            } else if row.name.contains("unchecked") {
                &unchecked
            } else {
                &affine
            };
            row.backend = Some(Arc::clone(backend));
        }
    }
    Rows {
        rows,
        closers: vec![
            raw,
            raw_untested,
            set_config,
            set_config_untested,
            search_path,
            session,
            transaction,
        ],
        _keep: vec![
            Box::new(with_affinity),
            Box::new(with_unchecked),
            Box::new(unchecked),
            Box::new(fifo),
            Box::new(with_bypass_16),
            Box::new(bypass_16),
            Box::new(without_affinity),
            Box::new(affine),
            Box::new(plain),
        ],
    }
}

/// Runs `count` operations of `op` spread over `tasks` tasks.
async fn run(op: &Op, tasks: usize, count: usize) {
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let op = Arc::clone(op);
        let per_task = count.div_ceil(tasks);
        set.spawn(async move {
            for _ in 0..per_task {
                op(task).await;
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.expect("bench task panicked");
    }
}

/// Waits until `proxy` has seen nothing new for a while: the returns that
/// run on spawned tasks (sqlx's release ping, switchyard's recycle) are done.
async fn settled(proxy: &FaultHandle) -> PgMessages {
    let mut last = proxy.pg_messages().expect("a counting proxy");
    loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = proxy.pg_messages().expect("a counting proxy");
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Round trips per operation of one row at one concurrency, counted on the
/// wire after a warm-up (connections open, statements prepared).
pub struct Count {
    pub name: String,
    pub tasks: usize,
    pub per_op: f64,
    pub parses: u64,
    pub startups: u64,
    /// Complete resets (owner changes) over checkouts, switchyard rows only.
    pub owner_changes: Option<f64>,
}

/// Counts every row's round trips per operation at each of `levels`, with
/// `per_task` operations per task. `proxy(via)` is the counting proxy that
/// row's client goes through.
pub fn count(
    rt: &Runtime,
    rows: &Rows,
    levels: &[usize],
    per_task: usize,
    proxy: impl Fn(Via) -> FaultHandle,
) -> Vec<Count> {
    let mut out = Vec::new();
    for &tasks in levels {
        for row in &rows.rows {
            let proxy = proxy(row.via);
            let n = tasks * per_task;
            let stats = || row.backend.as_ref().map(|b| b.pg_stats());
            let (counted, stats_before, stats_after) = rt.block_on(async {
                run(&row.op, tasks, tasks * 2).await;
                let before = settled(&proxy).await;
                let stats_before = stats();
                run(&row.op, tasks, n).await;
                let stats_after = stats();
                (
                    settled(&proxy).await.since(&before),
                    stats_before,
                    stats_after,
                )
            });
            let owner_changes = stats_before.zip(stats_after).map(|(a, b)| {
                let checkouts =
                    (b.affinity_hits + b.affinity_misses) - (a.affinity_hits + a.affinity_misses);
                (b.resets - a.resets) as f64 / checkouts.max(1) as f64
            });
            out.push(Count {
                name: row.name.clone(),
                tasks,
                per_op: counted.round_trips() as f64 / n as f64,
                parses: counted.parses,
                startups: counted.startups,
                owner_changes,
            });
        }
    }
    out
}

/// The table of [`count`], one line per row, a column per concurrency.
pub fn table(counts: &[Count], levels: &[usize]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for c in counts {
        if !names.contains(&c.name.as_str()) {
            names.push(&c.name);
        }
    }
    let mut out = String::from("| row |");
    for tasks in levels {
        out.push_str(&format!(" round trips/op, {tasks} task(s) |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(levels.len()));
    for name in names {
        out.push_str(&format!("\n| `{name}` |"));
        for &tasks in levels {
            match counts.iter().find(|c| c.name == name && c.tasks == tasks) {
                Some(c) => {
                    out.push_str(&format!(" {:.2}", c.per_op));
                    if c.startups > 0 || c.parses > 0 {
                        out.push_str(&format!(" ({} connects, {} parses)", c.startups, c.parses));
                    }
                    if let Some(share) = c.owner_changes {
                        out.push_str(&format!(", {:.0}% owner changes", share * 100.0));
                    }
                    out.push_str(" |");
                }
                None => out.push_str(" |"),
            }
        }
    }
    out
}

/// Throughput of `names` at `tasks` tasks measured in interleaved rounds:
/// each round runs `per_round` operations of every row, one row after the
/// other, so load that comes and goes on a shared machine falls on every
/// row alike. Returns each row's median time per operation over the rounds.
pub fn interleaved(
    rt: &Runtime,
    rows: &Rows,
    names: &[&str],
    tasks: usize,
    rounds: usize,
    per_round: usize,
) -> Vec<(String, Duration)> {
    let picked: Vec<&Row> = names
        .iter()
        .filter_map(|n| rows.rows.iter().find(|r| r.name == *n))
        .collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); picked.len()];
    rt.block_on(async {
        for row in &picked {
            run(&row.op, tasks, tasks * 2).await;
        }
        for _ in 0..rounds {
            for (i, row) in picked.iter().enumerate() {
                let began = std::time::Instant::now();
                run(&row.op, tasks, per_round).await;
                times[i].push(began.elapsed() / u32::try_from(per_round).unwrap());
            }
        }
    });
    picked
        .iter()
        .zip(times)
        .map(|(row, mut t)| {
            t.sort_unstable();
            (row.name.clone(), t[t.len() / 2])
        })
        .collect()
}
