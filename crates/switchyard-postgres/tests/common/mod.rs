//! Shared fixture: a real PostgreSQL cluster from the test bed, an ordinary
//! role `app` (RLS binds it; the test bed's `postgres` superuser bypasses RLS),
//! and tenants of every isolation level holding rows marked with their id.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use switchyard_core::{
    Checkout, CheckoutRequest, Isolation, PoolSettings, TenantEntry, TenantId, TenantRegistry,
    TierPolicy,
};
use switchyard_postgres::{
    enable_row_level_security, quote_ident, quote_literal, PgBackend, PgBackendConfig,
};
use switchyard_testkit::PgCluster;

/// The database the shared pool connects to.
pub const APP_DB: &str = "app";
/// The ordinary role the backend connects as.
pub const APP_ROLE: &str = "app";

pub struct Fixture {
    pub pg: PgCluster,
}

pub async fn connect(url: &str) -> PgConnection {
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

pub async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The deadline of the tests' checkouts.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A checkout on `backend` within [`TIMEOUT`], scoped to `tenant` when given.
pub async fn checkout(
    backend: &Arc<PgBackend>,
    tenant: Option<&TenantEntry>,
) -> Checkout<PgBackend> {
    let request = CheckoutRequest::with_timeout(TIMEOUT);
    let request = match tenant {
        Some(entry) => request.tenant(entry),
        None => request,
    };
    Checkout::acquire(backend, request)
        .await
        .unwrap_or_else(|e| panic!("checkout for {:?}: {e}", tenant.map(|t| t.scope().tenant())))
}

/// The checkout's server process id.
/// `user`'s URL of `db` on loopback `port` (the server's, or a proxy's in
/// front of it).
pub fn url_at(port: u16, user: &str, db: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{port}/{db}")
}

pub async fn pid(conn: &mut Checkout<PgBackend>) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut **conn)
        .await
        .unwrap()
}

impl Fixture {
    /// Starts a cluster and creates the `app` role and database.
    pub async fn start(standbys: usize) -> Self {
        let started = Instant::now();
        let pg = PgCluster::start(standbys)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let fx = Self { pg };
        let mut admin = fx.admin("postgres").await;
        let version: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&mut admin)
            .await
            .unwrap();
        eprintln!(
            "running against real PostgreSQL at {} (+{standbys} standby) started in {} ms: {version}",
            fx.pg.primary().addr(),
            started.elapsed().as_millis()
        );
        exec(
            &mut admin,
            &format!("CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS"),
        )
        .await;
        exec(
            &mut admin,
            &format!("CREATE DATABASE {APP_DB} OWNER {APP_ROLE}"),
        )
        .await;
        fx
    }

    pub fn port(&self) -> u16 {
        self.pg.primary().port()
    }

    pub fn url(&self, user: &str, db: &str) -> String {
        url_at(self.port(), user, db)
    }

    /// A superuser connection to `db`.
    pub async fn admin(&self, db: &str) -> PgConnection {
        connect(&self.url("postgres", db)).await
    }

    /// A connection as `app` to `db`.
    pub async fn app(&self, db: &str) -> PgConnection {
        connect(&self.url(APP_ROLE, db)).await
    }

    /// The backend configuration for `app` on the app database.
    pub fn config(&self, max_size: u32) -> PgBackendConfig {
        let mut config = PgBackendConfig::new("pg-primary", self.url(APP_ROLE, APP_DB));
        config.pool = PoolSettings::default()
            .with_max_size(max_size)
            .with_acquire_timeout(Duration::from_secs(10));
        config
    }

    pub fn backend(&self, config: PgBackendConfig) -> Arc<PgBackend> {
        Arc::new(PgBackend::new(config).unwrap())
    }

    /// The row-level table `public.items` in the app database, under RLS, with
    /// a decoy row that no tenant may ever see.
    pub async fn create_row_table(&self) {
        let mut admin = self.admin(APP_DB).await;
        exec(
            &mut admin,
            "CREATE TABLE public.items (tenant text NOT NULL, val text NOT NULL); \
             INSERT INTO public.items VALUES ('nobody', 'decoy'); \
             GRANT SELECT, INSERT ON public.items TO app",
        )
        .await;
        enable_row_level_security(&mut admin, "public.items", "tenant", "app.tenant_id")
            .await
            .unwrap();
    }

    /// Rows for a row-level tenant in `public.items`.
    pub async fn create_row_tenant(&self, id: &str) {
        let mut admin = self.admin(APP_DB).await;
        let t = quote_literal(id);
        let marker = quote_literal(&format!("marker-{id}"));
        exec(
            &mut admin,
            &format!("INSERT INTO public.items VALUES ({t}, {marker}), ({t}, 'r1'), ({t}, 'r2')"),
        )
        .await;
    }

    /// Schema `tenant_<id>` owned by `app`, with its own `items`.
    pub async fn create_schema_tenant(&self, id: &str) {
        let mut app = self.app(APP_DB).await;
        let schema = quote_ident(&format!("tenant_{id}"));
        let t = quote_literal(id);
        let marker = quote_literal(&format!("marker-{id}"));
        exec(
            &mut app,
            &format!(
                "CREATE SCHEMA {schema}; \
                 CREATE TABLE {schema}.items (tenant text NOT NULL, val text NOT NULL); \
                 INSERT INTO {schema}.items VALUES ({t}, {marker}), ({t}, 's1')"
            ),
        )
        .await;
    }

    /// Database `tenant_<id>` owned by `app`, with `public.items`.
    pub async fn create_database_tenant(&self, id: &str) {
        let db = format!("tenant_{id}");
        let mut admin = self.admin("postgres").await;
        exec(
            &mut admin,
            &format!("CREATE DATABASE {} OWNER {APP_ROLE}", quote_ident(&db)),
        )
        .await;
        let mut app = self.app(&db).await;
        let t = quote_literal(id);
        let marker = quote_literal(&format!("marker-{id}"));
        exec(
            &mut app,
            &format!(
                "CREATE TABLE items (tenant text NOT NULL, val text NOT NULL); \
                 INSERT INTO items VALUES ({t}, {marker}), ({t}, 'd1')"
            ),
        )
        .await;
    }
}

/// Tiers `database`, `schema` and `row`, with the given tenants assigned.
pub fn registry(tenants: &[(&str, Isolation)], quota: Option<u32>) -> TenantRegistry {
    let tier = |i: Isolation| {
        let p = TierPolicy::new(i);
        match quota {
            Some(q) => p.with_max_connections(q),
            None => p,
        }
    };
    let mut reg = TenantRegistry::new()
        .with_tier("database", tier(Isolation::Database))
        .with_tier("schema", tier(Isolation::Schema))
        .with_tier("row", tier(Isolation::Row));
    for (id, isolation) in tenants {
        reg = reg.with_tenant(TenantId::new(id).unwrap(), isolation.to_string());
    }
    reg.validate().unwrap();
    reg
}

/// `SELECT tenant, val FROM items` — the same text for every tenant, so sqlx's
/// per-connection statement cache is shared across tenants.
pub const READ_ITEMS: &str = "SELECT tenant, val FROM items";
