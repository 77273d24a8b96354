//! The isolation conformance suite (switchyard-testkit) against a real
//! PostgreSQL: a database, a schema and rows per tenant, and schema and rows
//! with a role per tenant (privilege-enforced mode).
//!
//! Session state one tenant leaves for the next in all its forms is
//! `reset.rs`'s subject; here it is one escape among the rest, checked the
//! suite's way (both tenants still read exactly their own marker afterwards,
//! on a pool of one connection).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{exec, Fixture as Server, APP_DB, APP_ROLE};
use sqlx::{AssertSqlSafe, Row};
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Isolation, NameTemplate, TenantId, TenantRegistry,
    TierPolicy,
};
use switchyard_postgres::{
    enable_role_row_security, enable_row_level_security, provision_tenant_role, quote_ident,
    PgBackend,
};
use switchyard_testkit::conformance::{self, error_chain, Attempt, Category, Fixture, TENANTS};

#[derive(Debug, Clone, Copy)]
enum Escape {
    /// `SELECT ... FROM "tenant_globex".kv`: another tenant's schema by name.
    QualifiedOtherSchema,
    /// `SET search_path` to another tenant's schema, then an unqualified read.
    SetSearchPath,
    /// `set_config` of the row setting to another tenant, then a read.
    SetConfigRowSetting,
    /// `SET ROLE` to another tenant's role.
    SetRole,
    /// `RESET ROLE`, back to the login role, then another tenant's schema.
    ResetRole,
    /// Settings and `search_path` left behind for the next checkout.
    LeftSessionState,
}

const ESCAPES: &[(Category, Escape)] = &[
    (Category::CrossData, Escape::QualifiedOtherSchema),
    (Category::CrossData, Escape::SetSearchPath),
    (Category::CrossData, Escape::SetConfigRowSetting),
    (Category::EngineCommand, Escape::SetRole),
    (Category::EngineCommand, Escape::ResetRole),
    (Category::SessionState, Escape::LeftSessionState),
];

struct PgFixture {
    level: Isolation,
    roles: bool,
    _server: Server,
    backend: Arc<PgBackend>,
    registry: TenantRegistry,
}

impl PgFixture {
    async fn new(level: Isolation, roles: bool) -> Self {
        let server = Server::start(0).await;
        let tier = TierPolicy::new(level);
        let registry = TenantRegistry::new()
            .with_tier("t", tier)
            .with_default_tier("t");
        let mut config = server.config(1);
        config.tenant_roles = roles;
        let backend = server.backend(config);
        let fixture = Self {
            level,
            roles,
            _server: server,
            backend,
            registry,
        };
        fixture.provision().await;
        fixture
    }

    async fn provision(&self) {
        let server = &self._server;
        let mut admin = server.admin(APP_DB).await;
        match self.level {
            Isolation::Database => {
                for t in TENANTS {
                    server.create_database_tenant(t).await;
                    let mut db = server.app(&format!("tenant_{t}")).await;
                    exec(&mut db, "CREATE TABLE kv (key text, value text)").await;
                }
            }
            Isolation::Schema => {
                let mut app = server.app(APP_DB).await;
                for t in TENANTS {
                    let schema = quote_ident(&format!("tenant_{t}"));
                    exec(
                        &mut app,
                        &format!("CREATE SCHEMA {schema}; CREATE TABLE {schema}.kv (key text, value text)"),
                    )
                    .await;
                }
            }
            Isolation::Row => {
                let default = if self.roles {
                    "substr(current_user, 8)"
                } else {
                    "current_setting('app.tenant_id', true)"
                };
                exec(
                    &mut admin,
                    &format!(
                        "CREATE TABLE public.kv (tenant text NOT NULL DEFAULT {default}, key text, value text); \
                         ALTER TABLE public.kv OWNER TO {APP_ROLE}"
                    ),
                )
                .await;
                if self.roles {
                    enable_role_row_security(
                        &mut admin,
                        "public.kv",
                        "tenant",
                        &NameTemplate::default(),
                    )
                    .await
                    .unwrap();
                } else {
                    enable_row_level_security(&mut admin, "public.kv", "tenant", "app.tenant_id")
                        .await
                        .unwrap();
                }
            }
        }
        if self.roles {
            for t in TENANTS {
                let entry = self.registry.resolve(&TenantId::new(t).unwrap()).unwrap();
                provision_tenant_role(&mut admin, entry.scope(), APP_ROLE, &["public.kv"])
                    .await
                    .unwrap();
            }
        }
    }

    async fn scoped(&self, tenant: &str) -> Result<Checkout<PgBackend>, String> {
        let id = TenantId::new(tenant).map_err(|e| e.to_string())?;
        let entry = self.registry.resolve(&id).map_err(|e| error_chain(&e))?;
        Checkout::acquire(
            &self.backend,
            CheckoutRequest::with_timeout(Duration::from_secs(10)).tenant(&entry),
        )
        .await
        .map_err(|e| error_chain(&e))
    }

    /// Runs `statements` (simple protocol) then `read`, returning every value read.
    async fn run(&self, tenant: &str, statements: &str, read: &str) -> Result<Vec<String>, String> {
        let mut conn = self.scoped(tenant).await?;
        if !statements.is_empty() {
            sqlx::raw_sql(AssertSqlSafe(statements.to_owned()))
                .execute(&mut **conn)
                .await
                .map_err(|e| error_chain(&e))?;
        }
        let rows = sqlx::raw_sql(AssertSqlSafe(read.to_owned()))
            .fetch_all(&mut **conn)
            .await
            .map_err(|e| error_chain(&e))?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<Option<String>, _>(0).ok().flatten())
            .collect())
    }

    /// An attempt whose success this level's documented trust model allows.
    fn trusted(&self, escape: Escape) -> Option<&'static str> {
        match (escape, self.level, self.roles) {
            (
                Escape::QualifiedOtherSchema | Escape::SetSearchPath | Escape::ResetRole,
                Isolation::Schema,
                false,
            ) => {
                Some("schema isolation sets search_path; it trusts the application not to name another tenant's schema")
            }
            (Escape::SetConfigRowSetting, Isolation::Row, false) => {
                Some("setting-based row isolation trusts the application not to set the row setting itself")
            }
            (Escape::SetRole | Escape::ResetRole, _, true) => {
                Some("PostgreSQL 15 checks SET ROLE against the login role, a member of every tenant role: the role mode trusts the application not to switch roles")
            }
            _ => None,
        }
    }
}

impl Fixture for PgFixture {
    type Escape = Escape;

    fn label(&self) -> String {
        if self.roles {
            format!("postgres/{} with tenant roles", self.level)
        } else {
            format!("postgres/{}", self.level)
        }
    }

    async fn write(&self, tenant: &str, key: &str, value: &str) -> Result<(), String> {
        let mut conn = self.scoped(tenant).await?;
        sqlx::query("INSERT INTO kv (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .execute(&mut **conn)
            .await
            .map(drop)
            .map_err(|e| error_chain(&e))
    }

    async fn read(&self, tenant: &str, key: &str) -> Result<Vec<String>, String> {
        let mut conn = self.scoped(tenant).await?;
        sqlx::query_scalar("SELECT value FROM kv WHERE key = $1")
            .bind(key)
            .fetch_all(&mut **conn)
            .await
            .map_err(|e| error_chain(&e))
    }

    async fn names(&self, tenant: &str) -> Result<Vec<String>, String> {
        let mut conn = self.scoped(tenant).await?;
        sqlx::query_scalar("SELECT key FROM kv")
            .fetch_all(&mut **conn)
            .await
            .map_err(|e| error_chain(&e))
    }

    async fn checkout(&self, tenant: &str) -> Result<(), String> {
        self.scoped(tenant).await.map(drop)
    }

    fn reserved_templates(&self) -> Vec<(String, &'static str)> {
        match self.level {
            Isolation::Database => vec![
                (
                    "{id}".into(),
                    "postgres, template1 and the shared pool's database",
                ),
                ("template{id}".into(), "template0 and template1"),
            ],
            Isolation::Schema => vec![
                ("{id}".into(), "public, pg_catalog and information_schema"),
                ("pg_{id}".into(), "pg_catalog and pg_toast"),
            ],
            Isolation::Row => Vec::new(),
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
        ESCAPES.to_vec()
    }

    async fn attempt(&self, escape: Escape, attacker: &str, victim: &str) -> Attempt {
        let other_schema = quote_ident(&format!("tenant_{victim}"));
        let other_role = quote_ident(&format!("tenant_{victim}"));
        let (statements, read) = match escape {
            Escape::QualifiedOtherSchema => (
                String::new(),
                format!("SELECT value FROM {other_schema}.kv"),
            ),
            Escape::SetSearchPath => (
                format!("SET search_path = {other_schema}"),
                "SELECT value FROM kv".into(),
            ),
            Escape::SetConfigRowSetting => (
                format!("SELECT set_config('app.tenant_id', '{victim}', false)"),
                "SELECT value FROM kv".into(),
            ),
            Escape::SetRole => (
                format!("SET ROLE {other_role}"),
                if self.level == Isolation::Row {
                    "SELECT value FROM kv".into()
                } else {
                    format!("SELECT value FROM {other_schema}.kv")
                },
            ),
            Escape::ResetRole => (
                "RESET ROLE".into(),
                format!("SELECT value FROM {other_schema}.kv"),
            ),
            Escape::LeftSessionState => {
                let statements = format!(
                    "SELECT set_config('app.tenant_id', '{victim}', false); SET search_path = {other_schema}; \
                     SET ROLE NONE"
                );
                return match self.run(attacker, &statements, "SELECT 'left'").await {
                    Ok(v) => Attempt::Ran(format!("{v:?}")),
                    Err(e) => Attempt::Refused(e),
                };
            }
        };
        match self.run(attacker, &statements, &read).await {
            Err(e) => Attempt::Refused(e),
            Ok(values) => {
                let leaked = values.contains(&conformance::marker(victim));
                match self.trusted(escape) {
                    Some(why) if leaked => Attempt::Trusted(format!("{why}; read {values:?}")),
                    _ => Attempt::Ran(format!("{values:?}")),
                }
            }
        }
    }
}

#[tokio::test]
async fn database_isolation_conforms() {
    conformance::run(&PgFixture::new(Isolation::Database, false).await).await;
}

#[tokio::test]
async fn schema_isolation_conforms() {
    conformance::run(&PgFixture::new(Isolation::Schema, false).await).await;
}

#[tokio::test]
async fn row_isolation_conforms() {
    conformance::run(&PgFixture::new(Isolation::Row, false).await).await;
}

#[tokio::test]
async fn schema_isolation_with_tenant_roles_conforms() {
    let fixture = PgFixture::new(Isolation::Schema, true).await;
    let report = conformance::run(&fixture).await;
    // The point of the mode: the server refuses what schema isolation trusts.
    let verdict = |case: &str| {
        report
            .cases
            .iter()
            .find(|c| c.case.ends_with(case))
            .map(|c| c.verdict.clone())
            .unwrap()
    };
    let qualified = verdict("QualifiedOtherSchema");
    assert!(
        matches!(&qualified, conformance::Verdict::Held(seen) if seen.contains("permission denied for schema")),
        "{qualified:?}"
    );
    // Without USAGE a schema is skipped in the search path: "does not exist".
    let search_path = verdict("SetSearchPath");
    assert!(
        matches!(&search_path, conformance::Verdict::Held(seen) if seen.starts_with("refused")),
        "{search_path:?}"
    );
}

#[tokio::test]
async fn row_isolation_with_tenant_roles_conforms() {
    let fixture = PgFixture::new(Isolation::Row, true).await;
    let report = conformance::run(&fixture).await;
    let found = report
        .cases
        .iter()
        .find(|c| c.case.ends_with("SetConfigRowSetting"))
        .unwrap();
    assert!(
        matches!(&found.verdict, conformance::Verdict::Held(_)),
        "{:?}",
        found.verdict
    );
}
