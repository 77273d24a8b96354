//! [`PgBackend`]: the `switchyard_core::Backend` for one PostgreSQL endpoint.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    Backend, EndpointId, Error, Isolation, PoolStats, Probe, Recycle, Returned, TenantScope,
    TierPolicy,
};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::config::PgBackendConfig;
use crate::connection::PgConn;
use crate::probe::Prober;
use crate::returns::sweep;
use crate::slots::Slots;
use crate::sql::validate_setting_name;
use crate::stats::{bump, read, PgStats, ReturnCounters};
use crate::tenant_pools::TenantPools;

/// Schemas that every session shares: a schema tier must never render them.
const RESERVED_SCHEMAS: [&str; 4] = ["public", "information_schema", "pg_catalog", "pg_toast"];

/// The PostgreSQL backend for one endpoint.
///
/// Owns the endpoint's pool of sqlx `PgConnection`s (unscoped, schema- and
/// row-scoped checkouts), one small pool per tenant database (database
/// isolation), a dedicated probe connection, and a background sweeper that
/// closes idle connections and tenant pools and keeps `min_idle` connections
/// open. The sweeper stops when the backend is dropped.
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
    /// The pool of the URL's own database.
    pub(crate) slots: Arc<Slots>,
    pub(crate) tenants: TenantPools,
    pub(crate) prober: Prober,
    pub(crate) returns: ReturnCounters,
    /// Set by [`PgBackend::close`].
    pub(crate) closed: AtomicBool,
    /// Databases no tenant may be given (see
    /// [`PgError::ReservedDatabase`](crate::PgError::ReservedDatabase)).
    pub(crate) reserved: Vec<String>,
}

impl PgBackend {
    /// Builds the backend for `config`.
    ///
    /// Fails with [`Error::Config`] when the configuration is invalid or when
    /// called outside a Tokio runtime (the backend starts its sweeper).
    pub fn new(config: PgBackendConfig) -> Result<Self, Error> {
        if let Some(problem) = config.validate(config.endpoint.as_str()).into_iter().next() {
            return Err(problem);
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| Error::Config {
            path: config.endpoint.to_string(),
            message: "a PostgreSQL backend must be built inside a Tokio runtime".into(),
        })?;
        let options = config.connect_options()?;
        let slots = Slots::new(options.clone(), config.pool.max_size, config.handoff());
        let tenants = TenantPools::new(
            options.clone(),
            config.tenant_pool_max_size,
            config.handoff(),
            config.max_tenant_pools,
            config.tenant_pool_idle_timeout,
        );
        let shared = Arc::new(Shared {
            slots,
            tenants,
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

    /// Affinity, reset and tenant pool counters.
    pub fn pg_stats(&self) -> PgStats {
        let s = &self.shared;
        let r = &s.returns;
        let t = &s.tenants.counters;
        let handoffs = read(&s.slots.handoffs)
            + s.tenants
                .all_slots()
                .iter()
                .map(|slots| read(&slots.handoffs))
                .sum::<u64>();
        PgStats {
            affinity_hits: read(&r.hits),
            affinity_misses: read(&r.misses),
            handoffs,
            resets: read(&r.resets),
            closed_dirty: read(&r.closed_dirty),
            reset_failures: read(&r.reset_failures),
            closed_mid_query: read(&r.closed_mid_query),
            discarded: read(&r.discarded),
            tenant_pools_opened: read(&t.opened),
            tenant_pools_evicted: read(&t.evicted),
            tenant_pools_idle_closed: read(&t.idle_closed),
        }
    }

    /// Closes every pool: idle connections at once, checked-out ones as they
    /// come back. Checkouts after this fail with [`Error::Closed`].
    pub async fn close(&self) {
        self.shared.close();
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
        let main = s.slots.occupancy();
        PoolStats {
            size: main.size + tenants.size,
            idle: main.idle + tenants.idle,
            max_size: s.slots.max() + tenants.max_size,
            tenant_pools: tenants.pools,
        }
    }

    /// A connection closed by its backend, left mid-query or past its
    /// lifetime is broken; one with sqlx work queued is checked by `recycle`;
    /// any other goes straight back (see `crate::returns`).
    fn inspect(&self, conn: &mut PgConn) -> Returned {
        self.shared.inspect(conn)
    }

    async fn recycle(&self, conn: &mut PgConn) -> Recycle {
        self.shared.recycle(conn).await
    }

    /// Refuses a row tier whose setting name is not a plain dotted name, and a
    /// database or schema tier whose template can render a database or schema
    /// that others share (see [`PgError::ReservedDatabase`](crate::PgError::ReservedDatabase)).
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
            Recycle::Keep => conn.return_to_pool(),
            Recycle::Discard => {
                bump(&self.shared.returns.discarded);
                conn.close();
            }
        }
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.shared.close();
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
    async fn tiers_that_could_reach_shared_names_are_refused() {
        use switchyard_core::NameTemplate;
        let backend = PgBackend::new(PgBackendConfig::new(
            "pg",
            "postgres://app:pw@127.0.0.1:1/shop",
        ))
        .unwrap();
        let tier = |isolation, template: &str| {
            TierPolicy::new(isolation).with_name_template(NameTemplate::new(template).unwrap())
        };
        for (isolation, template, refused) in [
            (Isolation::Database, "tenant_{id}", None),
            (Isolation::Database, "{id}", Some("postgres")),
            (Isolation::Database, "sh{id}", Some("shop")),
            (Isolation::Database, "template{id}", Some("template0")),
            (Isolation::Schema, "tenant_{id}", None),
            (Isolation::Schema, "{id}", Some("public")),
            (Isolation::Schema, "pg_{id}", Some("pg_catalog")),
        ] {
            let got = backend.validate_tier("t", &tier(isolation, template));
            match refused {
                None => assert!(got.is_ok(), "{template}: {got:?}"),
                Some(name) => {
                    let err = got.unwrap_err();
                    assert!(matches!(err, Error::Config { .. }), "{err}");
                    assert!(err.to_string().contains(name), "{err}");
                    assert!(
                        err.to_string().starts_with("tiers.t.name_template"),
                        "{err}"
                    );
                }
            }
        }
        let row = TierPolicy::new(Isolation::Row).with_row_setting("tenant id");
        let err = backend.validate_tier("r", &row).unwrap_err();
        assert!(err.to_string().starts_with("tiers.r.row_setting"), "{err}");
        assert!(backend
            .validate_tier("r", &TierPolicy::new(Isolation::Row))
            .is_ok());
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
