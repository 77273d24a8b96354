//! A real `SELECT 1` through switchyard next to the raw sqlx pool, against the
//! testkit's PostgreSQL (one primary, started by the bench).
//!
//! Rows of one group run at the same concurrency (1 or 64 tasks); the time is
//! wall time per checkout + `SELECT 1` + release, the inverse of throughput.
//! Every pool, raw or not, has 16 connections, so at 64 tasks all of them queue
//! the same way.
//!
//! - `raw_sqlx`: `PgPool::acquire` + query on a separate pool of the same size;
//! - `backend/unscoped`: core `Checkout::acquire` on a `PgBackend` (no router);
//! - `cluster/unscoped`: `Cluster::checkout` over that backend as the only primary;
//! - `cluster/{schema,row}/affinity_{on,off}`: tenant-scoped checkouts (eight
//!   tenants, task `i` serving tenant `i % 8`), with the backend's tenant
//!   affinity stash on or off.
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
//! `cargo bench --bench postgres`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use switchyard::postgres::{AffinitySettings, PgBackend, PgBackendConfig};
use switchyard::router::EndpointConfig;
use switchyard::{Backend as _, Checkout, Cluster, PoolSettings, Role, TlsSettings};
use switchyard_testkit::{PgCluster, TestCa};

/// Connections in every pool compared here.
const POOL_SIZE: u32 = 16;
async fn select_one_raw(pool: &PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    black_box(one);
}

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

fn cluster(backend: &Arc<PgBackend>) -> Cluster<PgBackend> {
    Cluster::builder(format!("bench-{}", backend.endpoint()))
        .engine("postgres")
        .tenants(common::tenants())
        .endpoint(Arc::clone(backend), EndpointConfig::new(Role::Primary))
        .build()
        .expect("cluster")
}

fn postgres(c: &mut Criterion) {
    let rt = common::runtime();
    let pg = rt
        .block_on(PgCluster::start(0))
        .expect("postgres (testkit)");
    let url = pg.primary().url().to_owned();
    println!("postgres bench against {url}");

    let (raw, affine, plain, with_affinity, without_affinity) = rt.block_on(async {
        let raw = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect(&url)
            .await
            .expect("raw pool");
        for i in 0..common::TENANTS {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS tenant_s{i}"
            )))
            .execute(&raw)
            .await
            .expect("create schema");
        }
        let affine = backend(&url, "pg-affinity", AffinitySettings::default());
        let plain = backend(&url, "pg-no-affinity", AffinitySettings::disabled());
        let with_affinity = cluster(&affine);
        let without_affinity = cluster(&plain);
        (raw, affine, plain, with_affinity, without_affinity)
    });
    drop(plain);
    let schema_ids = common::tenant_ids("s");
    let row_ids = common::tenant_ids("r");

    for tasks in [1, 64] {
        let mut group = c.benchmark_group(format!("postgres/{tasks}_tasks"));
        group.bench_function("raw_sqlx", |b| {
            b.iter_custom(|iters| {
                let pool = raw.clone();
                common::concurrent(&rt, iters, tasks, move |_| {
                    let pool = pool.clone();
                    async move { select_one_raw(&pool).await }
                })
            });
        });
        common::backend_row(&mut group, &rt, tasks, &affine, select_one);
        common::cluster_row(
            &mut group,
            &rt,
            tasks,
            "cluster/unscoped",
            &with_affinity,
            None,
            select_one,
        );
        let scoped = [
            ("cluster/schema/affinity_on", &with_affinity, &schema_ids),
            (
                "cluster/schema/affinity_off",
                &without_affinity,
                &schema_ids,
            ),
            ("cluster/row/affinity_on", &with_affinity, &row_ids),
            ("cluster/row/affinity_off", &without_affinity, &row_ids),
        ];
        for (name, cluster, ids) in scoped {
            common::cluster_row(&mut group, &rt, tasks, name, cluster, Some(ids), select_one);
        }
        group.finish();
    }
    rt.block_on(async {
        drop((with_affinity, without_affinity, affine));
        raw.close().await;
    });
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
