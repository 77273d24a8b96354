//! A real `SELECT 1` per checkout through switchyard next to the raw sqlx
//! pool, the peer approach (raw pool + a scoping statement on every
//! checkout) and PgBouncer in both pool modes, against the testkit's
//! PostgreSQL (one primary) and PgBouncer 1.18, all started by the bench.
//!
//! `postgres/{1,64}_tasks`: the rows of [`pg_rows`] side by side. The time is
//! wall time per checkout + `SELECT 1` + release at that concurrency, the
//! inverse of throughput. Every pool has 16 connections, so at 64 tasks all
//! of them queue the same way. Before timing, the bench counts each row's
//! round trips per checkout on the wire (the testkit's counting proxy in
//! front of PostgreSQL or PgBouncer: one per simple `Query`, one per
//! extended-protocol `Sync`, the return path included) and prints the table.
//!
//! `postgres_roles/{1,64}_tasks` sets the privilege-enforced mode
//! (`tenant_roles`: the scope statement also switches to the tenant's role,
//! the return resets it) next to the setting-based one, both with affinity
//! off (the role mode turns it off), schema and row.
//! - `postgres_tls/{plaintext,tls}`: `Cluster::checkout` + `SELECT 1` against
//!   one server with `ssl = on`, once over `sslmode=disable` and once over
//!   verified TLS (the test bed's CA): what TLS costs per checkout when
//!   connections are reused (the handshake is paid once per connection).
//!
//! `cargo bench --bench postgres -- postgres/ --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod pg_rows;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use pg_rows::{cluster, Urls, Via, POOL_SIZE};
use sqlx::postgres::PgPoolOptions;
use switchyard::postgres::{AffinitySettings, PgBackend, PgBackendConfig};
use switchyard::{Checkout, PoolSettings, TlsSettings};
use switchyard_testkit::{FaultProxy, PgBouncer, PgCluster, PoolMode, TestCa};

async fn select_one(mut conn: Checkout<PgBackend>) {
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    black_box(one);
}

fn backend(url: &str, name: &str, affinity: AffinitySettings) -> Arc<PgBackend> {
    roles_backend(url, name, affinity, false)
}

fn roles_backend(
    url: &str,
    name: &str,
    affinity: AffinitySettings,
    tenant_roles: bool,
) -> Arc<PgBackend> {
    let config = PgBackendConfig::builder(name.to_owned(), url)
        .pool(PoolSettings::default().with_max_size(POOL_SIZE))
        .affinity(affinity)
        .tenant_roles(tenant_roles)
        .config();
    Arc::new(PgBackend::new(config).expect("pg backend"))
}

/// Criterion's smoke mode (`-- --test`): count on fewer operations.
fn smoke() -> bool {
    std::env::args().any(|a| a == "--test")
}

fn postgres(c: &mut Criterion) {
    let rt = common::runtime();
    let pg = rt
        .block_on(PgCluster::start(0))
        .expect("postgres (testkit)");
    let (session, transaction) = rt.block_on(async {
        let start = |mode| PgBouncer::start(pg.primary().addr(), mode, POOL_SIZE, &["postgres"]);
        let session = start(PoolMode::Session).await.expect("pgbouncer (session)");
        let transaction = start(PoolMode::Transaction)
            .await
            .expect("pgbouncer (transaction)");
        (session, transaction)
    });
    let url = pg.primary().url().to_owned();
    println!("postgres bench against {url}");
    rt.block_on(pg_rows::provision(&url));

    // Round trips per checkout, on the wire, through counting proxies.
    let levels = [1, 64];
    let table = rt.block_on(async {
        let counting = |addr| FaultProxy::start_counting_postgres(addr);
        let (to_pg, to_session, to_transaction) = (
            counting(pg.primary().addr()).await.expect("proxy"),
            counting(session.addr()).await.expect("proxy"),
            counting(transaction.addr()).await.expect("proxy"),
        );
        let at = |port: u16| format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let urls = Urls {
            postgres: at(to_pg.port()),
            bouncer_session: at(to_session.port()),
            bouncer_transaction: at(to_transaction.port()),
        };
        (
            pg_rows::build(&urls).await,
            [to_pg, to_session, to_transaction],
        )
    });
    let (rows, proxies) = table;
    let per_task = if smoke() { 2 } else { 8 };
    let counts = pg_rows::count(&rt, &rows, &levels, per_task, |via| {
        let i = match via {
            Via::Postgres => 0,
            Via::BouncerSession => 1,
            Via::BouncerTransaction => 2,
        };
        (*proxies[i]).clone()
    });
    rt.block_on(async {
        rows.close().await;
        drop(proxies);
    });
    println!(
        "round trips per checkout + SELECT 1 + release, counted on the wire:\n{}",
        pg_rows::table(&counts, &levels)
    );

    let urls = Urls {
        postgres: url.clone(),
        bouncer_session: session.url("postgres", "postgres"),
        bouncer_transaction: transaction.url("postgres", "postgres"),
    };
    let rows = rt.block_on(pg_rows::build(&urls));
    if !smoke() {
        // The bar's rows at 64 tasks, in interleaved rounds (see
        // `pg_rows::interleaved`): ratios that a load change between two
        // Criterion rows cannot skew.
        let names = [
            "raw_sqlx",
            "peer/set_config",
            "peer/search_path",
            "pgbouncer/session",
            "pgbouncer/transaction",
            "switchyard/unscoped",
            "switchyard/schema/8_tenants/affinity_on",
            "switchyard/schema/8_tenants/affinity_on/fifo",
            "switchyard/schema/8_tenants/bypass_16",
            "switchyard/row/8_tenants/affinity_on",
            "switchyard/row/8_tenants/affinity_on/fifo",
            "switchyard/row/8_tenants/bypass_16",
            "raw_sqlx/untested",
            "peer/set_config/untested",
            "switchyard/unscoped/unchecked",
            "switchyard/schema/8_tenants/unchecked",
            "switchyard/row/8_tenants/unchecked",
        ];
        let medians = pg_rows::interleaved(&rt, &rows, &names, 64, 9, 512);
        let raw = medians[0].1.as_secs_f64();
        println!("interleaved, 64 tasks, 9 rounds of 512 operations per row (median time per operation):");
        println!("| row | time/op | throughput vs raw sqlx |\n|---|---|---|");
        for (name, time) in &medians {
            println!("| `{name}` | {time:?} | {:.2} |", raw / time.as_secs_f64());
        }
    }
    for tasks in levels {
        let mut group = c.benchmark_group(format!("postgres/{tasks}_tasks"));
        for row in &rows.rows {
            group.bench_function(row.name.as_str(), |b| {
                b.iter_custom(|iters| {
                    let op = Arc::clone(&row.op);
                    common::concurrent(&rt, iters, tasks, move |task| op(task))
                });
            });
        }
        group.finish();
    }
    rt.block_on(rows.close());
    drop((session, transaction));
    drop(pg);
}

/// Setting-based scopes next to the same scopes run as the tenant's role.
fn postgres_roles(c: &mut Criterion) {
    let rt = common::runtime();
    let pg = rt
        .block_on(PgCluster::start(0))
        .expect("postgres (testkit)");
    let url = pg.primary().url().to_owned();
    let (setting, roles) = rt.block_on(async {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("admin pool");
        for i in 0..common::TENANTS {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS tenant_s{i}; CREATE ROLE tenant_s{i} NOLOGIN; \
                 GRANT USAGE ON SCHEMA tenant_s{i} TO tenant_s{i}; CREATE ROLE row_r{i} NOLOGIN"
            )))
            .execute(&admin)
            .await
            .expect("provision tenant roles");
        }
        admin.close().await;
        let setting = roles_backend(&url, "pg-setting", AffinitySettings::disabled(), false);
        let roles = roles_backend(&url, "pg-roles", AffinitySettings::disabled(), true);
        (cluster(&setting), cluster(&roles))
    });
    let schema_ids = common::tenant_ids("s");
    let row_ids = common::tenant_ids("r");
    for tasks in [1, 64] {
        let mut group = c.benchmark_group(format!("postgres_roles/{tasks}_tasks"));
        let rows = [
            ("schema/setting", &setting, &schema_ids),
            ("schema/role", &roles, &schema_ids),
            ("row/setting", &setting, &row_ids),
            ("row/role", &roles, &row_ids),
        ];
        for (name, cluster, ids) in rows {
            common::cluster_row(&mut group, &rt, tasks, name, cluster, Some(ids), select_one);
        }
        group.finish();
    }
    rt.block_on(async { drop((setting, roles)) });
}

/// Plaintext next to TLS, both to one `ssl = on` server, connections reused.
fn postgres_tls(c: &mut Criterion) {
    let rt = common::runtime();
    let ca = TestCa::generate().expect("test CA");
    let pg = rt
        .block_on(PgCluster::start_tls(0, &ca))
        .expect("postgres with TLS (testkit)");
    let plain_url = format!("{}?sslmode=disable", pg.primary().url());
    let tls_url = pg.primary().tls_url("postgres").expect("tls url");
    let (plain, tls) = rt.block_on(async {
        let plain = backend(&plain_url, "pg-plaintext", AffinitySettings::default());
        let config = PgBackendConfig::builder("pg-tls", tls_url.as_str())
            .pool(PoolSettings::default().with_max_size(POOL_SIZE))
            .tls(TlsSettings::with_ca_file(ca.ca_file()))
            .config();
        let tls = Arc::new(PgBackend::new(config).expect("pg tls backend"));
        (cluster(&plain), cluster(&tls))
    });
    for tasks in [1, 64] {
        let mut group = c.benchmark_group(format!("postgres_tls/{tasks}_tasks"));
        for (name, cluster) in [("plaintext", &plain), ("tls", &tls)] {
            common::cluster_row(&mut group, &rt, tasks, name, cluster, None, select_one);
        }
        group.finish();
    }
    rt.block_on(async move { drop((plain, tls)) });
    drop(pg);
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = postgres, postgres_roles, postgres_tls
}
criterion_main!(benches);
