//! [`PgBackend`]: the `switchyard_core::Backend` for one PostgreSQL endpoint.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use switchyard_core::{
    Backend, BackendErrorKind, EndpointId, Error, Isolation, PoolStats, Probe, Recycle, Returned,
    TenantScope, TierPolicy,
};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::affinity::{Stash, Take};
use crate::config::PgBackendConfig;
use crate::connection::PgConn;
use crate::error::{timed_pg_error, PgError};
use crate::probe::Prober;
use crate::refusal::RefusalCheck;
use crate::returns::sweep;
use crate::sql::{self, quote_ident, validate_setting_name};
use crate::stats::{bump, read, PgStats, ReturnCounters};
use crate::tenant_pools::{close_in_background, TenantPools};

/// Schemas that every session shares: a schema tier must never render them.
const RESERVED_SCHEMAS: [&str; 4] = ["public", "information_schema", "pg_catalog", "pg_toast"];

/// The PostgreSQL backend for one endpoint.
///
/// Owns a sqlx [`PgPool`] for the endpoint (unscoped, schema- and row-scoped
/// checkouts), one small pool per tenant database (database isolation), a
/// dedicated probe connection, the affinity stash and a background sweeper
/// that closes idle tenant pools and ages out stashed connections. The
/// sweeper stops when the backend is dropped.
///
/// Build it inside a Tokio runtime; nothing connects until the first checkout
/// or probe, so an unreachable endpoint never fails or blocks construction.
pub struct PgBackend {
    shared: Arc<Shared>,
    _sweeper: DropGuard,
}

/// Everything the backend and its background tasks share.
pub(crate) struct Shared {
    pub(crate) config: PgBackendConfig,
    pub(crate) pool: PgPool,
    pub(crate) tenants: TenantPools,
    pub(crate) stash: Stash,
    pub(crate) prober: Prober,
    /// Fails checkouts fast when the endpoint refuses connections.
    pub(crate) refusal: RefusalCheck,
    pub(crate) returns: ReturnCounters,
    /// Set by [`PgBackend::close`].
    pub(crate) closed: AtomicBool,
    /// Databases no tenant may be given (see [`PgError::ReservedDatabase`]).
    pub(crate) reserved: Vec<String>,
}

impl PgBackend {
    /// Builds the backend for `config`.
    ///
    /// Fails with [`Error::Config`] when the configuration is invalid or when
    /// called outside a Tokio runtime (sqlx's pool starts maintenance tasks).
    pub fn new(config: PgBackendConfig) -> Result<Self, Error> {
        if let Some(problem) = config.validate(config.endpoint.as_str()).into_iter().next() {
            return Err(problem);
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| Error::Config {
            path: config.endpoint.to_string(),
            message: "a PostgreSQL backend must be built inside a Tokio runtime".into(),
        })?;
        let options = config.connect_options().map_err(|message| Error::Config {
            path: format!("{}.url", config.endpoint),
            message,
        })?;
        let pool = config
            .main_pool_options()
            .connect_lazy_with(options.clone());
        let tenants = TenantPools::new(
            options.clone(),
            config.tenant_pool_options(),
            config.max_tenant_pools,
            config.tenant_pool_idle_timeout,
        );
        let stash = Stash::new(config.stash_cap(), config.affinity.max_age);
        let shared = Arc::new(Shared {
            pool,
            tenants,
            stash,
            refusal: RefusalCheck::new(&options),
            prober: Prober::new(options),
            returns: ReturnCounters::default(),
            closed: AtomicBool::new(false),
            reserved: config.reserved_databases(),
            config,
        });
        let cancel = CancellationToken::new();
        let span = tracing::debug_span!("pg.sweeper", endpoint = %shared.config.endpoint);
        rt.spawn(sweep(Arc::clone(&shared), cancel.clone()).instrument(span));
        tracing::debug!(endpoint = %shared.config.endpoint, url = %shared.config.url, "postgres backend built");
        Ok(Self {
            shared,
            _sweeper: cancel.drop_guard(),
        })
    }

    /// The configuration the backend was built from.
    pub fn config(&self) -> &PgBackendConfig {
        &self.shared.config
    }

    /// The endpoint's shared sqlx pool, e.g. as a baseline for benchmarks.
    /// Connections taken from it directly bypass scoping and resets.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// Affinity, reset and tenant pool counters.
    pub fn pg_stats(&self) -> PgStats {
        let s = &self.shared;
        let a = &s.stash.counters;
        let t = &s.tenants.counters;
        PgStats {
            affinity_hits: read(&a.hits),
            affinity_misses: read(&a.misses),
            affinity_stolen: read(&a.stolen),
            stashed: read(&a.stashed),
            stash_evictions: read(&a.evicted),
            stashed_now: u32::try_from(s.stash.len()).unwrap_or(u32::MAX),
            resets: read(&s.returns.resets),
            closed_dirty: read(&s.returns.closed_dirty),
            reset_failures: read(&s.returns.reset_failures),
            closed_mid_query: read(&s.returns.closed_mid_query),
            discarded: read(&s.returns.discarded),
            tenant_pools_opened: read(&t.opened),
            tenant_pools_evicted: read(&t.evicted),
            tenant_pools_idle_closed: read(&t.idle_closed),
        }
    }

    /// Closes every pool and the stash, waiting for the shared pool's
    /// connections to close. Checkouts after this fail with [`Error::Closed`].
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        for conn in self.shared.stash.drain() {
            conn.close();
        }
        self.shared.tenants.close_all();
        self.shared.pool.close().await;
    }
}

impl Backend for PgBackend {
    type Connection = PgConn;

    fn endpoint(&self) -> &EndpointId {
        &self.shared.config.endpoint
    }

    async fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<PgConn, Error> {
        self.shared.acquire(scope, deadline).await
    }

    async fn scope(&self, conn: &mut PgConn, scope: &TenantScope) -> Result<(), Error> {
        self.shared.scope(conn, scope).await
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe, Error> {
        self.shared
            .prober
            .probe(&self.shared.config.endpoint, timeout)
            .await
    }

    fn stats(&self) -> PoolStats {
        let s = &self.shared;
        let tenants = s.tenants.usage();
        let stashed = u32::try_from(s.stash.len()).unwrap_or(u32::MAX);
        PoolStats {
            size: s.pool.size() + tenants.size,
            idle: u32::try_from(s.pool.num_idle()).unwrap_or(u32::MAX) + stashed + tenants.idle,
            max_size: s.config.pool.max_size + tenants.max_size,
            tenant_pools: tenants.pools,
        }
    }

    /// A connection closed by its backend or left mid-query is broken; any
    /// other is checked (and reset, or verified for the stash) by `recycle`.
    fn inspect(&self, conn: &mut PgConn) -> Returned {
        if self.shared.closed.load(Ordering::Acquire) || conn.in_flight {
            if conn.in_flight {
                bump(&self.shared.returns.closed_mid_query);
            }
            return Returned::Broken;
        }
        Returned::Dirty
    }

    async fn recycle(&self, conn: &mut PgConn) -> Recycle {
        self.shared.recycle(conn).await
    }

    /// Refuses a row tier whose setting name is not a plain dotted name, and a
    /// database or schema tier whose template can render a database or schema
    /// that others share (see [`PgError::ReservedDatabase`]).
    fn validate_tier(&self, name: &str, tier: &TierPolicy) -> Result<(), Error> {
        let config = |field: &str, message: String| Error::Config {
            path: format!("tiers.{name}.{field}"),
            message,
        };
        let reserved = match tier.isolation {
            Isolation::Row => {
                return validate_setting_name(&tier.row_setting)
                    .map_err(|message| config("row_setting", message));
            }
            Isolation::Database => self.shared.reserved.clone(),
            Isolation::Schema => RESERVED_SCHEMAS.map(str::to_owned).into(),
        };
        match reserved.iter().find(|r| tier.name_template.can_render(r)) {
            Some(taken) => Err(config(
                "name_template",
                format!(
                    "{} can render {taken:?}, which endpoint {} shares between tenants or reserves",
                    tier.name_template,
                    self.endpoint()
                ),
            )),
            None => Ok(()),
        }
    }

    fn release(&self, conn: PgConn, recycle: Recycle) {
        match recycle {
            Recycle::Keep => self.shared.keep(conn),
            Recycle::Discard => {
                bump(&self.shared.returns.discarded);
                conn.close();
            }
        }
    }
}

impl Shared {
    pub(crate) fn endpoint(&self) -> &EndpointId {
        &self.config.endpoint
    }

    fn timeout(&self, scope: Option<&TenantScope>, started: Instant) -> Error {
        Error::Timeout {
            endpoint: self.endpoint().clone(),
            tenant: scope.map(|s| s.tenant().clone()),
            elapsed: started.elapsed(),
        }
    }

    #[tracing::instrument(
        level = "debug",
        name = "pg.acquire",
        skip_all,
        fields(endpoint = %self.config.endpoint, tenant = scope.map(|s| s.tenant().as_str()))
    )]
    async fn acquire(
        self: &Arc<Self>,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<PgConn, Error> {
        let started = Instant::now();
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if let Some(s) = scope.filter(|s| s.isolation() == Isolation::Row) {
            // Refused before any connection is taken.
            check_row_setting(s)?;
        }
        match scope {
            Some(s) if s.isolation() == Isolation::Database => {
                self.acquire_tenant_database(s, deadline, started).await
            }
            _ => self.acquire_shared(scope, deadline, started).await,
        }
    }

    async fn acquire_tenant_database(
        &self,
        scope: &TenantScope,
        deadline: Instant,
        started: Instant,
    ) -> Result<PgConn, Error> {
        let database = scope.target();
        if self.reserved.iter().any(|r| r == database) {
            return Err(Error::backend(
                self.endpoint(),
                Some(scope.tenant()),
                BackendErrorKind::Rejected,
                PgError::ReservedDatabase {
                    database: database.to_owned(),
                },
            ));
        }
        let (pool, name, lease) = self.tenants.get(database).map_err(|e| {
            Error::backend(
                self.endpoint(),
                Some(scope.tenant()),
                BackendErrorKind::Rejected,
                e,
            )
        })?;
        match tokio::time::timeout_at(deadline, pool.acquire()).await {
            Ok(Ok(conn)) => Ok(PgConn::for_tenant_database(conn, name, lease)),
            Ok(Err(error)) => {
                let error = timed_pg_error(self.endpoint(), Some(scope), error, started.elapsed());
                if matches!(error, Error::TenantNotProvisioned { .. }) {
                    drop(lease);
                    self.tenants.forget_if_empty(database);
                }
                Err(error)
            }
            Err(_) => Err(self.timeout(Some(scope), started)),
        }
    }

    async fn acquire_shared(
        self: &Arc<Self>,
        scope: Option<&TenantScope>,
        deadline: Instant,
        started: Instant,
    ) -> Result<PgConn, Error> {
        let keeps_min = self.config.pool.min_idle > 0;
        // Look for the tenant's own stashed connection only once.
        let mut lookup = scope;
        loop {
            let mut expired = Vec::new();
            let take = self.stash.take(lookup.take(), &self.pool, &mut expired);
            for conn in expired {
                self.reset_in_background(conn);
            }
            match take {
                Take::Hit(conn) => {
                    tracing::trace!("affinity hit");
                    return Ok(conn);
                }
                Take::Pool(conn) => {
                    // `try_acquire` skips sqlx's test-before-acquire: without this
                    // ping, connections that died with a restarted server would be
                    // handed out one by one, each failing and ejecting the endpoint.
                    let mut conn = PgConn::new(conn, keeps_min);
                    let limit = deadline.min(Instant::now() + self.config.reset_timeout);
                    match tokio::time::timeout_at(limit, sqlx::Connection::ping(&mut *conn)).await {
                        Ok(Ok(())) => return Ok(conn),
                        _ => conn.close(),
                    }
                }
                Take::Steal(mut conn) => {
                    let limit = deadline.min(Instant::now() + self.config.reset_timeout);
                    if self.reset(&mut conn, limit).await {
                        return Ok(conn);
                    }
                    conn.close();
                }
                Take::Wait(ticket) => {
                    // Only a pool with room opens connections, which sqlx retries
                    // while they are refused.
                    let opens = self.pool.size() < self.config.pool.max_size;
                    let got = tokio::select! {
                        got = tokio::time::timeout_at(deadline, self.pool.acquire()) => got,
                        refused = self.refusal.refused(), if opens => {
                            return Err(Error::backend(
                                self.endpoint(),
                                scope.map(TenantScope::tenant),
                                BackendErrorKind::Connect,
                                refused,
                            ));
                        }
                    };
                    drop(ticket);
                    return match got {
                        Ok(Ok(conn)) => Ok(PgConn::new(conn, keeps_min)),
                        Ok(Err(e)) => {
                            Err(timed_pg_error(self.endpoint(), scope, e, started.elapsed()))
                        }
                        Err(_) => Err(self.timeout(scope, started)),
                    };
                }
            }
        }
    }

    #[tracing::instrument(
        level = "debug",
        name = "pg.scope",
        skip_all,
        fields(endpoint = %self.config.endpoint, tenant = %scope.tenant(), isolation = %scope.isolation())
    )]
    async fn scope(&self, conn: &mut PgConn, scope: &TenantScope) -> Result<(), Error> {
        let wrong_database = |have: &str| Error::Scope {
            endpoint: self.endpoint().clone(),
            tenant: scope.tenant().clone(),
            action: "apply",
            source: Box::new(PgError::WrongDatabase {
                have: have.to_owned(),
                want: scope.target().to_owned(),
            }),
        };
        if scope.isolation() == Isolation::Database {
            return match conn.database.as_deref() {
                Some(db) if db == scope.target() => Ok(()),
                Some(db) => Err(wrong_database(&format!("database {db:?}"))),
                None => Err(wrong_database("the shared pool")),
            };
        }
        if let Some(db) = conn.database.as_deref() {
            return Err(wrong_database(&format!("database {db:?}")));
        }
        if conn.scoped.as_ref() == Some(scope) {
            // Affinity: the session already carries exactly this scope.
            return Ok(());
        }
        if scope.isolation() == Isolation::Row {
            check_row_setting(scope)?;
        }
        if conn.scoped.is_some() {
            // Another tenant's scope: take it off before putting this one on.
            let limit = Instant::now() + self.config.reset_timeout;
            if !self.reset(conn, limit).await {
                return Err(self.scope_error(
                    scope,
                    "reset",
                    "the previous scope could not be reset",
                ));
            }
        }
        // Marked before any I/O, so a cancelled apply can never be pooled.
        conn.scoped = Some(scope.clone());
        let result = match scope.isolation() {
            Isolation::Schema => sqlx::query_scalar::<_, Option<String>>(sql::APPLY_SCHEMA)
                .bind(quote_ident(scope.target()))
                .fetch_one(&mut **conn)
                .await
                .map(|set| set.is_some()),
            _ => sqlx::query(sql::APPLY_ROW)
                .bind(scope.row_setting())
                .bind(scope.tenant().as_str())
                .execute(&mut **conn)
                .await
                .map(|_| true),
        };
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::TenantNotProvisioned {
                endpoint: self.endpoint().clone(),
                tenant: scope.tenant().clone(),
                what: "schema",
                name: scope.target().to_owned(),
            }),
            Err(error) => Err(self.sqlx_scope_error(scope, "apply", error)),
        }
    }

    fn scope_error(&self, scope: &TenantScope, action: &'static str, why: &str) -> Error {
        Error::Scope {
            endpoint: self.endpoint().clone(),
            tenant: scope.tenant().clone(),
            action,
            source: why.to_owned().into(),
        }
    }

    /// A broken connection is an endpoint failure; anything else the server
    /// said is a failed scope.
    fn sqlx_scope_error(
        &self,
        scope: &TenantScope,
        action: &'static str,
        error: sqlx::Error,
    ) -> Error {
        match crate::error::classify(&error) {
            BackendErrorKind::Connect | BackendErrorKind::Io => {
                timed_pg_error(self.endpoint(), Some(scope), error, Duration::ZERO)
            }
            _ => Error::Scope {
                endpoint: self.endpoint().clone(),
                tenant: scope.tenant().clone(),
                action,
                source: Box::new(error),
            },
        }
    }
}

fn check_row_setting(scope: &TenantScope) -> Result<(), Error> {
    validate_setting_name(scope.row_setting()).map_err(|message| Error::Config {
        path: "tenants.row_setting".into(),
        message,
    })
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        for conn in self.shared.stash.drain() {
            conn.close();
        }
        self.shared.tenants.close_all();
        close_in_background(self.shared.pool.clone());
    }
}

impl fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBackend")
            .field("endpoint", &self.shared.config.endpoint)
            .field("url", &self.shared.config.url)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn building_outside_a_runtime_is_a_config_error() {
        let config = PgBackendConfig::new("pg", "postgres://app:pw@127.0.0.1:1/app");
        let err = PgBackend::new(config).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(err.to_string().contains("Tokio runtime"), "{err}");
    }

    #[tokio::test]
    async fn building_never_connects() {
        // Port 1 refuses; construction neither fails nor waits.
        let config = PgBackendConfig::new("pg", "postgres://app:pw@127.0.0.1:1/app");
        let backend = PgBackend::new(config).unwrap();
        assert_eq!(backend.stats().size, 0);
        let err = PgBackend::new(PgBackendConfig::new("pg", "mysql://x@db/app")).unwrap_err();
        assert!(err.to_string().starts_with("pg.url: "), "{err}");
    }
}
