//! Shared fixture: a real ClickHouse server from the test bed, tenant
//! databases and a shared table whose rows carry their tenant's id.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_clickhouse::{clickhouse, ChBackend, ChBackendConfig};
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Isolation, NameTemplate, PoolSettings, TenantEntry,
    TenantId, TenantRegistry, TierPolicy,
};
use switchyard_testkit::ClickHouse;

/// The shared database of row-isolated tenants.
pub const ROW_DB: &str = "shared";
/// Rows per tenant written by [`Fixture::seed`].
pub const ROWS_PER_TENANT: u32 = 5;

/// One row of `items`, in a tenant database and in the shared table alike.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct Item {
    pub tenant_id: String,
    pub n: u32,
    pub label: String,
}

pub struct Fixture {
    pub ch: ClickHouse,
    pub version: String,
}

impl Fixture {
    /// Starts a server and prints what it is.
    pub async fn start(test: &str) -> Self {
        let started = Instant::now();
        let ch = ClickHouse::start().await.unwrap_or_else(|e| panic!("{e}"));
        let backend = backend_for(&ch.http_url(), 4);
        let probe = backend.probe(Duration::from_secs(5)).await.unwrap();
        let version = probe.version.clone().unwrap_or_default();
        eprintln!(
            "[{test}] running against real ClickHouse {version} at {} (started in {} ms, probe rtt {:?})",
            ch.http_url(),
            started.elapsed().as_millis(),
            probe.rtt
        );
        Self { ch, version }
    }

    pub async fn sql(&self, sql: &str) -> String {
        self.ch
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Creates `tenant_<id>.items` for each database tenant and
    /// `shared.items` holding rows of each row tenant, [`ROWS_PER_TENANT`] each.
    pub async fn seed(&self, database_tenants: &[String], row_tenants: &[String]) {
        let table = "(tenant_id String, n UInt32, label String) ENGINE = MergeTree ORDER BY n";
        for t in database_tenants {
            self.sql(&format!("CREATE DATABASE IF NOT EXISTS `tenant_{t}`"))
                .await;
            self.sql(&format!("CREATE TABLE `tenant_{t}`.items {table}"))
                .await;
            self.sql(&format!(
                "INSERT INTO `tenant_{t}`.items SELECT '{t}', toUInt32(number), 'secret of {t}' FROM system.numbers LIMIT {ROWS_PER_TENANT}"
            ))
            .await;
        }
        self.sql(&format!("CREATE DATABASE IF NOT EXISTS {ROW_DB}"))
            .await;
        self.sql(&format!("CREATE TABLE {ROW_DB}.items {table}"))
            .await;
        for t in row_tenants {
            self.sql(&format!(
                "INSERT INTO {ROW_DB}.items SELECT '{t}', toUInt32(number), 'secret of {t}' FROM system.numbers LIMIT {ROWS_PER_TENANT}"
            ))
            .await;
        }
    }

    /// `SELECT count() FROM <table>` straight on the server.
    pub async fn count(&self, table: &str) -> u64 {
        self.sql(&format!("SELECT count() FROM {table}"))
            .await
            .trim()
            .parse()
            .unwrap()
    }
}

/// A backend for `url` with an in-flight bound of `max_size`.
pub fn backend_for(url: &str, max_size: u32) -> Arc<ChBackend> {
    let config = ChBackendConfig::builder("ch-test", url)
        .pool(
            PoolSettings::default()
                .with_max_size(max_size)
                .with_acquire_timeout(Duration::from_secs(10)),
        )
        .row_database(ROW_DB)
        .query_timeout(Duration::from_secs(10))
        .config();
    Arc::new(ChBackend::new(config).unwrap())
}

/// Tier `db` (database isolation, `tenant_{id}`), tier `row` (row isolation,
/// the default), and the given tenants on `db`.
pub fn registry(database_tenants: &[String]) -> TenantRegistry {
    let mut reg = TenantRegistry::new()
        .with_tier("db", TierPolicy::new(Isolation::Database))
        .with_tier("row", TierPolicy::new(Isolation::Row))
        .with_tier(
            "bare",
            TierPolicy::new(Isolation::Database)
                .with_name_template(NameTemplate::new("{id}").unwrap()),
        )
        .with_default_tier("row");
    for t in database_tenants {
        reg = reg.with_tenant(TenantId::new(t).unwrap(), "db");
    }
    reg
}

pub fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

/// A checkout on `backend` within 10s, scoped to `tenant` when given.
pub async fn checkout(
    backend: &Arc<ChBackend>,
    tenant: Option<&TenantEntry>,
) -> Result<Checkout<ChBackend>, switchyard_core::Error> {
    let request = CheckoutRequest::with_timeout(Duration::from_secs(10));
    Checkout::acquire(
        backend,
        tenant.into_iter().fold(request, CheckoutRequest::tenant),
    )
    .await
}
