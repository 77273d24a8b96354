//! [`ChBackend`]: the [`Backend`] for one ClickHouse endpoint.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    Backend, EndpointId, Error, FairGate, HttpUrl, Isolation, PoolStats, Probe, Recycle, Returned,
    Role, TenantId, TenantScope, TierPolicy,
};
use tokio::time::Instant;

use crate::config::ChBackendConfig;
use crate::connection::{ChConnection, Scoped};
use crate::error::{ch_error, ChError};
use switchyard_core::provision::ProvisionCache;

/// The probe: liveness and the server version in one round trip.
const PROBE_SQL: &str = "SELECT 1, version()";
/// Whether a tenant database exists; the name is bound, never spliced.
const DATABASE_EXISTS_SQL: &str = "SELECT count() FROM system.databases WHERE name = ?";
/// The type of a row table's tenant column (no row when it is missing).
const COLUMN_TYPE_SQL: &str =
    "SELECT type FROM system.columns WHERE database = ? AND table = ? AND name = ?";
/// Tenant column types that compare as the tenant id's own text.
const STRING_TYPES: &[&str] = &["String", "LowCardinality(String)"];
/// Databases that exist on every server and belong to none of its tenants.
const SYSTEM_DATABASES: &[&str] = &[
    "system",
    "default",
    "information_schema",
    "INFORMATION_SCHEMA",
];

/// What the backend and its handles share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) endpoint: EndpointId,
    /// The endpoint's client: address, credentials, settings, default database.
    pub(crate) base: clickhouse::Client,
    /// `base` with `Connection: close`, so every probe opens a fresh
    /// connection: a kept-alive socket left over from before a crash would
    /// fail as a broken connection rather than a refused one.
    probe: clickhouse::Client,
    pub(crate) row_database: String,
    pub(crate) tenant_column: Arc<str>,
    pub(crate) row_policy_setting: Option<String>,
    pub(crate) query_timeout: Duration,
    pub(crate) provisioned: ProvisionCache,
    /// The unscoped checkouts' database, if configured.
    database: Option<String>,
    permits: Arc<FairGate>,
    acquire_timeout: Duration,
}

/// The ClickHouse [`Backend`] for one endpoint: one HTTP client (hyper's
/// keep-alive pool inside) and a bound on requests in flight.
///
/// A connection is a [`ChConnection`]: a permit plus a `clickhouse::Client`
/// configured for the checkout's tenant. ClickHouse over HTTP keeps no session
/// between requests (this crate never sends a `session_id`), so a scope lives
/// only in the handle: nothing tenant-specific is ever left on a socket, and
/// returning a connection is dropping the handle.
///
/// The role is always [`Role::Standalone`]: every ClickHouse replica accepts
/// writes (ReplicatedMergeTree replicates in all directions), so there is no
/// primary to find or fail over to.
#[derive(Debug)]
pub struct ChBackend {
    shared: Arc<Shared>,
}

impl ChBackend {
    /// Builds the backend. Nothing is sent until the first checkout or probe.
    pub fn new(config: ChBackendConfig) -> Result<Self, Error> {
        if let Some(problem) = config.validate(config.endpoint.as_str()).into_iter().next() {
            return Err(problem);
        }
        let connect = HttpUrl::parse(&config.url).map_err(|message| Error::Config {
            path: format!("{}.url", config.endpoint),
            message,
        })?;
        // Validation is off: 18.16 knows neither RowBinaryWithNamesAndTypes nor
        // the settings validation sends.
        let path = config.endpoint.as_str();
        let mut base = crate::tls::client(&connect.url, config.tls.as_ref(), path)?
            .with_url(connect.base())
            .with_validation(false);
        if let Some(user) = connect.user {
            base = base.with_user(user);
        }
        if let Some(password) = connect.password {
            base = base.with_password(password);
        }
        if let Some(database) = &config.database {
            base = base.with_database(database.clone());
        }
        for (name, value) in &config.settings {
            base = base.with_setting(name.clone(), value.clone());
        }
        Ok(Self {
            shared: Arc::new(Shared {
                endpoint: config.endpoint.clone(),
                probe: base.clone().with_header("Connection", "close"),
                base,
                row_database: config.row_database.clone(),
                tenant_column: Arc::from(config.tenant_column.as_str()),
                row_policy_setting: config.row_policy_setting.clone(),
                query_timeout: config.query_timeout,
                provisioned: ProvisionCache::new(config.provision_cache_ttl),
                database: config.database.clone(),
                permits: FairGate::for_pool(&config.pool),
                acquire_timeout: config.pool.acquire_timeout,
            }),
        })
    }

    /// Starts a builder; see [`ChBackendConfig::builder`].
    pub fn builder(
        endpoint: impl Into<Arc<str>>,
        url: impl Into<switchyard_core::SecretUrl>,
    ) -> crate::ChBackendBuilder {
        ChBackendConfig::builder(endpoint, url)
    }

    /// Forgets that a tenant database exists, so the next checkout asks the
    /// server again (call it after dropping a tenant database).
    pub fn forget_database(&self, database: &str) {
        self.shared.provisioned.forget(database);
    }

    /// Fails with [`Error::TenantNotProvisioned`] unless the scope's database
    /// exists; a positive answer is cached for `provision_cache_ttl`. A
    /// system database or the row tier's shared one is refused outright.
    async fn check_database(&self, scope: &TenantScope) -> Result<(), Error> {
        let shared = &self.shared;
        let database = scope.target();
        if let Some(why) = shared.reserved_database(database) {
            return Err(crate::error::rejected(
                &shared.endpoint,
                Some(scope.tenant()),
                ChError::ReservedDatabase {
                    database: database.to_owned(),
                    why,
                },
            ));
        }
        if shared.provisioned.is_fresh(database) {
            return Ok(());
        }
        let query = shared.base.query(DATABASE_EXISTS_SQL).bind(database);
        let count = tokio::time::timeout(shared.query_timeout, query.fetch_one::<u64>())
            .await
            .map_err(|_| {
                Error::backend(
                    &shared.endpoint,
                    Some(scope.tenant()),
                    switchyard_core::BackendErrorKind::Io,
                    ChError::QueryTimeout(shared.query_timeout),
                )
            })?
            .map_err(|e| ch_error(&shared.endpoint, Some(scope), e))?;
        if count == 0 {
            return Err(Error::TenantNotProvisioned {
                endpoint: shared.endpoint.clone(),
                tenant: scope.tenant().clone(),
                what: "database",
                name: database.to_owned(),
            });
        }
        shared.provisioned.mark(database);
        Ok(())
    }
}

impl Shared {
    /// Every database no tenant may be scoped to.
    fn reserved_databases(&self) -> impl Iterator<Item = &str> {
        SYSTEM_DATABASES
            .iter()
            .copied()
            .chain([self.row_database.as_str()])
            .chain(self.database.as_deref())
    }

    /// What `database` is, when no tenant may have it.
    fn reserved_database(&self, database: &str) -> Option<&'static str> {
        if SYSTEM_DATABASES.contains(&database) {
            Some("a system database")
        } else if database == self.row_database {
            Some("the shared database of row-isolated tenants")
        } else if self.database.as_deref() == Some(database) {
            Some("the database of unscoped checkouts")
        } else {
            None
        }
    }

    /// Fails unless `table`'s tenant column in the row database is a string
    /// type; a positive answer is cached for `provision_cache_ttl`.
    pub(crate) async fn check_tenant_column(
        &self,
        tenant: &TenantId,
        table: &str,
    ) -> Result<(), Error> {
        let key = format!("tenant-column:{table}");
        if self.provisioned.is_fresh(&key) {
            return Ok(());
        }
        let query = self
            .base
            .query(COLUMN_TYPE_SQL)
            .bind(self.row_database.as_str())
            .bind(table)
            .bind(&*self.tenant_column);
        let found = tokio::time::timeout(self.query_timeout, query.fetch_optional::<String>())
            .await
            .map_err(|_| {
                Error::backend(
                    &self.endpoint,
                    Some(tenant),
                    switchyard_core::BackendErrorKind::Io,
                    ChError::QueryTimeout(self.query_timeout),
                )
            })?
            .map_err(|e| ch_error(&self.endpoint, None, e))?;
        match found {
            Some(ty) if STRING_TYPES.contains(&ty.as_str()) => {
                self.provisioned.mark(&key);
                Ok(())
            }
            other => Err(crate::error::rejected(
                &self.endpoint,
                Some(tenant),
                ChError::TenantColumnType {
                    table: format!("{}.{table}", self.row_database),
                    column: self.tenant_column.to_string(),
                    found: other.unwrap_or_else(|| "missing".into()),
                },
            )),
        }
    }
}

impl Backend for ChBackend {
    type Connection = ChConnection;

    fn endpoint(&self) -> &EndpointId {
        &self.shared.endpoint
    }

    async fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<ChConnection, Error> {
        let shared = &self.shared;
        let deadline = deadline.min(Instant::now() + shared.acquire_timeout);
        let permit = shared
            .permits
            .acquire_for(&shared.endpoint, scope, deadline)
            .await?;
        Ok(ChConnection::new(Arc::clone(shared), permit))
    }

    async fn scope(&self, conn: &mut ChConnection, scope: &TenantScope) -> Result<(), Error> {
        let shared = &self.shared;
        // Drop any previous scope first, so a failure below leaves the handle
        // unscoped rather than on the previous tenant.
        conn.reset();
        match scope.isolation() {
            // ClickHouse has no schemas inside a database: both mean a database
            // of the tenant's own.
            Isolation::Database | Isolation::Schema => {
                self.check_database(scope).await?;
                let client = shared.base.clone().with_database(scope.target());
                conn.set_scope(
                    client,
                    Scoped::Database {
                        tenant: scope.tenant().clone(),
                        database: Arc::from(scope.target()),
                    },
                );
            }
            Isolation::Row => {
                let mut client = shared.base.clone().with_database(&shared.row_database);
                if let Some(setting) = &shared.row_policy_setting {
                    client = client.with_setting(setting.clone(), scope.tenant().as_str());
                }
                conn.set_scope(
                    client,
                    Scoped::Row {
                        tenant: scope.tenant().clone(),
                        column: Arc::clone(&shared.tenant_column),
                    },
                );
            }
        }
        Ok(())
    }

    /// Refuses a database (or schema) tier whose template can render a
    /// system database (`system`, `default`, `information_schema`), the row
    /// tier's shared database or the unscoped checkouts' database.
    fn validate_tier(&self, tier: &str, policy: &TierPolicy) -> Result<(), Error> {
        if policy.isolation == Isolation::Row {
            return Ok(());
        }
        policy.refuse_reserved(tier, self.shared.reserved_databases(), false)
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe, Error> {
        let shared = &self.shared;
        let started = Instant::now();
        let query = shared.probe.query(PROBE_SQL).fetch_one::<(u8, String)>();
        let (one, version) = tokio::time::timeout(timeout, query)
            .await
            .map_err(|_| Error::ProbeTimeout {
                endpoint: shared.endpoint.clone(),
                elapsed: started.elapsed(),
            })?
            .map_err(|e| ch_error(&shared.endpoint, None, e))?;
        if one != 1 {
            return Err(Error::backend(
                &shared.endpoint,
                None,
                switchyard_core::BackendErrorKind::Io,
                ChError::UnexpectedProbe(one),
            ));
        }
        let mut probe = Probe::new(Role::Standalone, started.elapsed());
        probe.version = Some(version);
        Ok(probe)
    }

    fn stats(&self) -> PoolStats {
        self.shared.permits.stats()
    }

    /// Always clean: the scope lives only in the handle, so there is nothing
    /// to undo on the server and no task to spawn.
    fn inspect(&self, _conn: &mut ChConnection) -> Returned {
        Returned::Clean
    }

    /// Dropping the handle is the whole return path, kept or discarded alike.
    fn release(&self, conn: ChConnection, _recycle: Recycle) {
        drop(conn);
    }
}
