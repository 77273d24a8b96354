//! The isolation conformance suite (switchyard-testkit) against a real
//! ClickHouse: a database per tenant, and rows in a shared database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{backend_for, Fixture as Server, ROW_DB};
use serde_json::json;
use switchyard_clickhouse::{clickhouse, ChBackend, Filter};
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Isolation, NameTemplate, TenantId, TenantRegistry,
    TierPolicy,
};
use switchyard_testkit::conformance::{self, error_chain, Attempt, Category, Fixture, TENANTS};

#[derive(Debug, Clone, clickhouse::Row, serde::Serialize, serde::Deserialize)]
struct Kv {
    tenant_id: String,
    key: String,
    value: String,
}

#[derive(Debug, Clone, Copy)]
enum Escape {
    /// Tenants `007` and `7` on a table whose tenant column is numeric.
    NumericTenantColumn,
    /// Inserting a row that names another tenant.
    ForeignTenantRow,
    /// The raw client of a row-scoped checkout.
    RawClient,
    /// A table name that names another database.
    QualifiedTableName,
    /// A table name carrying SQL.
    TableNameInjection,
    /// A filter value carrying SQL.
    FilterValueInjection,
    /// Raw SQL naming another tenant's database (database level).
    RawSqlOtherDatabase,
}

const TABLE: &str =
    "(tenant_id String DEFAULT '', key String, value String) ENGINE = MergeTree ORDER BY key";
const NUMERIC_TABLE: &str =
    "(tenant_id UInt64, key String, value String) ENGINE = MergeTree ORDER BY key";

struct ChFixture {
    level: Isolation,
    _server: Arc<Server>,
    backend: Arc<ChBackend>,
    registry: TenantRegistry,
}

impl ChFixture {
    async fn new(level: Isolation, server: Arc<Server>) -> Self {
        let backend = backend_for(&server.ch.http_url(), 4);
        let registry = TenantRegistry::new()
            .with_tier("t", TierPolicy::new(level))
            .with_default_tier("t");
        if level == Isolation::Database {
            for t in TENANTS {
                server
                    .sql(&format!("CREATE DATABASE IF NOT EXISTS `tenant_{t}`"))
                    .await;
                server
                    .sql(&format!("CREATE TABLE `tenant_{t}`.kv {TABLE}"))
                    .await;
            }
        } else {
            server
                .sql(&format!("CREATE DATABASE IF NOT EXISTS {ROW_DB}"))
                .await;
            server
                .sql(&format!("CREATE TABLE {ROW_DB}.kv {TABLE}"))
                .await;
            server
                .sql(&format!("CREATE TABLE {ROW_DB}.nums {NUMERIC_TABLE}"))
                .await;
        }
        Self {
            level,
            _server: server,
            backend,
            registry,
        }
    }

    async fn scoped(&self, tenant: &str) -> Result<Checkout<ChBackend>, String> {
        let id = TenantId::new(tenant).map_err(|e| e.to_string())?;
        let entry = self.registry.resolve(&id).map_err(|e| error_chain(&e))?;
        Checkout::acquire(
            &self.backend,
            CheckoutRequest::with_timeout(Duration::from_secs(10)).tenant(&entry),
        )
        .await
        .map_err(|e| error_chain(&e))
    }

    async fn rows(&self, tenant: &str, table: &str) -> Result<Vec<Kv>, String> {
        let conn = self.scoped(tenant).await?;
        conn.select::<Kv>(table)
            .fetch_all()
            .await
            .map_err(|e| error_chain(&e))
    }

    async fn numeric(&self) -> Attempt {
        if self.level != Isolation::Row {
            return Attempt::Refused("only the shared row database has a numeric column".into());
        }
        let conn = match self.scoped("007").await {
            Ok(c) => c,
            Err(e) => return Attempt::Refused(e),
        };
        let row = json!({"key": "secret", "value": "numeric-of-007"});
        if let Err(e) = conn.insert_rows("nums", [row]).await {
            return Attempt::Refused(error_chain(&e));
        }
        drop(conn);
        match self.rows("7", "nums").await {
            Ok(rows) if rows.iter().any(|r| r.value == "numeric-of-007") => {
                Attempt::Breached(format!("tenant 7 reads tenant 007's row: {rows:?}"))
            }
            Ok(rows) => Attempt::Ran(format!("{rows:?}")),
            Err(e) => Attempt::Refused(e),
        }
    }
}

impl Fixture for ChFixture {
    type Escape = Escape;

    fn label(&self) -> String {
        format!("clickhouse/{}", self.level)
    }

    async fn write(&self, tenant: &str, key: &str, value: &str) -> Result<(), String> {
        let conn = self.scoped(tenant).await?;
        conn.insert_rows("kv", [json!({"key": key, "value": value})])
            .await
            .map(drop)
            .map_err(|e| error_chain(&e))
    }

    async fn read(&self, tenant: &str, key: &str) -> Result<Vec<String>, String> {
        let conn = self.scoped(tenant).await?;
        let rows = conn
            .select::<Kv>("kv")
            .filter(Filter::eq("key", key))
            .fetch_all()
            .await
            .map_err(|e| error_chain(&e))?;
        Ok(rows.into_iter().map(|r| r.value).collect())
    }

    async fn names(&self, tenant: &str) -> Result<Vec<String>, String> {
        Ok(self
            .rows(tenant, "kv")
            .await?
            .into_iter()
            .map(|r| r.key)
            .collect())
    }

    async fn checkout(&self, tenant: &str) -> Result<(), String> {
        self.scoped(tenant).await.map(drop)
    }

    fn reserved_templates(&self) -> Vec<(String, &'static str)> {
        match self.level {
            Isolation::Row => Vec::new(),
            _ => vec![
                ("{id}".into(), "system, default and the shared row database"),
                ("sys{id}".into(), "the system database (tenant `tem`)"),
                (
                    "shar{id}".into(),
                    "the shared row database `shared` (tenant `ed`)",
                ),
            ],
        }
    }

    async fn configure(&self, template: &str) -> Result<(), String> {
        let template = NameTemplate::new(template).map_err(|e| e.to_string())?;
        let policy = TierPolicy::new(self.level).with_name_template(template);
        self.backend
            .validate_tier("t", &policy)
            .map_err(|e| error_chain(&e))
    }

    fn escapes(&self) -> Vec<(Category, Escape)> {
        vec![
            (Category::HostileValue, Escape::NumericTenantColumn),
            (Category::CrossData, Escape::ForeignTenantRow),
            (Category::EngineCommand, Escape::RawClient),
            (Category::CrossData, Escape::QualifiedTableName),
            (Category::HostileValue, Escape::TableNameInjection),
            (Category::HostileValue, Escape::FilterValueInjection),
            (Category::CrossData, Escape::RawSqlOtherDatabase),
        ]
    }

    async fn attempt(&self, escape: Escape, attacker: &str, victim: &str) -> Attempt {
        if let Escape::NumericTenantColumn = escape {
            return self.numeric().await;
        }
        let conn = match self.scoped(attacker).await {
            Ok(c) => c,
            Err(e) => return Attempt::Refused(e),
        };
        match escape {
            Escape::NumericTenantColumn => unreachable!(),
            Escape::ForeignTenantRow => {
                let row = json!({"tenant_id": victim, "key": "foreign", "value": "planted"});
                Attempt::of(conn.insert_rows("kv", [row]).await)
            }
            Escape::RawClient => match (conn.client(), self.level) {
                (Err(e), _) => Attempt::Refused(error_chain(&e)),
                (Ok(_), Isolation::Row) => {
                    Attempt::Breached("a row-scoped checkout handed out its raw client".into())
                }
                (Ok(_), _) => Attempt::Ran("the tenant database's own client".into()),
            },
            Escape::QualifiedTableName => {
                let table = format!("tenant_{victim}.kv");
                Attempt::of(conn.select::<Kv>(&table).fetch_all().await)
            }
            Escape::TableNameInjection => {
                let table = "kv WHERE 1 UNION ALL SELECT tenant_id, key, value FROM shared.kv";
                Attempt::of(conn.select::<Kv>(table).fetch_all().await)
            }
            Escape::FilterValueInjection => {
                let filter = Filter::eq("key", "x' OR 1 = 1 OR key = '");
                Attempt::of(conn.select::<Kv>("kv").filter(filter).fetch_all().await)
            }
            Escape::RawSqlOtherDatabase => {
                let client = match conn.client() {
                    Ok(c) => c,
                    Err(e) => return Attempt::Refused(error_chain(&e)),
                };
                let sql = format!("SELECT value FROM `tenant_{victim}`.kv");
                match client.query(&sql).fetch_all::<String>().await {
                    Ok(values) => Attempt::Trusted(format!(
                        "raw SQL on a database-scoped client read {values:?}: the handle only sets the \
                         default database; give each tenant a ClickHouse user limited to its database"
                    )),
                    Err(e) => Attempt::Refused(e.to_string()),
                }
            }
        }
    }
}

#[tokio::test]
async fn database_isolation_conforms() {
    let server = Arc::new(Server::start("conformance-database").await);
    let fixture = ChFixture::new(Isolation::Database, server).await;
    conformance::run(&fixture).await;
}

#[tokio::test]
async fn row_isolation_conforms() {
    let server = Arc::new(Server::start("conformance-row").await);
    let fixture = ChFixture::new(Isolation::Row, server).await;
    conformance::run(&fixture).await;
}
