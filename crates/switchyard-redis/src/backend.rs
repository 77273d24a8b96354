//! [`RedisBackend`]: a deadpool-redis pool for one endpoint, and the
//! [`Backend`] contract on top of it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{self, IntoConnectionInfo};
use deadpool_redis::{Hook, HookError, Manager, Pool, Runtime, Timeouts};
use switchyard_core::{
    Backend, EndpointId, Error, FairGate, Isolation, PoolStats, Probe, Recycle, Returned,
    SecretUrl, TenantScope, TierPolicy,
};
use tokio::time::Instant;

use crate::acl::{acl_user, key_prefix, AclPasswords};
use crate::config::{DatabaseResolver, RedisBackendBuilder, RedisBackendConfig};
use crate::connection::{Reauth, RedisConnection, SessionDefaults};
use crate::error::{error_kind, pool_error, redis_error};
use crate::keys::{is_safe_target, Confinement};
use crate::probe;
use crate::users::{self, TenantUsers};

/// What a [`RedisBackend`] did with connections that came back, for tests and
/// metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisCounters {
    /// Connections closed instead of pooled (failed reset, cancelled command,
    /// broken socket, open transaction, or the caller's report).
    pub discarded: u64,
    /// Sessions reset on return (scoped or raw-used connections).
    pub resets: u64,
    /// Resets that failed or timed out (their connections are in `discarded`).
    pub reset_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    discarded: AtomicU64,
    resets: AtomicU64,
    reset_failures: AtomicU64,
}

/// One Redis endpoint: a deadpool-redis pool plus tenant isolation.
///
/// - Database isolation: `SELECT <index>` at checkout, the index from the
///   config's `databases` (or a resolver) by the scope's target.
/// - Schema isolation: keys under `<target>:`, enforced by the
///   [`RedisConnection`] handle; no round trip.
/// - Row isolation: `AUTH <target> <password>` at checkout, an ACL user the
///   server holds to `<target>:*` (see [`crate::acl`]); keys prefixed as well.
///
/// Before a scoped or raw-used connection goes back to the pool its session
/// is reset (`RESET`, the default user, the default database) on a background
/// task; if that fails, or a command was cancelled mid-flight, or the socket
/// broke, the connection is closed instead.
///
/// A tenant that needs a Redis of its own gets a backend (or a cluster) of its
/// own, unscoped: that is configuration, not a scope.
///
/// # Probes
///
/// [`probe`](Backend::probe) opens a connection of its own (a full pool is
/// not a dead endpoint) and sends `ROLE`, `INFO replication` and
/// `INFO server`, all bounded by the timeout: a stopped server that accepts
/// TCP but never answers gives [`Error::Timeout`], a refused connection a
/// `Connect` error. `master` is [`Role::Primary`](switchyard_core::Role),
/// `slave` is `Replica`. On a replica whose link is up, `lag_bytes` is the
/// replication stream read but not yet applied (`slave_read_repl_offset -
/// slave_repl_offset`); how far it trails the master's newest write is not
/// visible from the replica. On a replica whose link is down, `lag` is how
/// long it has been down (2^32 s if it never came up). `version` is
/// `redis_version`.
pub struct RedisBackend {
    endpoint: EndpointId,
    url: SecretUrl,
    pool: Pool,
    client: redis::Client,
    defaults: SessionDefaults,
    databases: std::collections::BTreeMap<String, u8>,
    resolver: Option<DatabaseResolver>,
    passwords: Option<Arc<dyn AclPasswords>>,
    acquire_timeout: Duration,
    connect_timeout: Duration,
    recycle_timeout: Duration,
    response_timeout: Duration,
    counters: Counters,
    users: Arc<TenantUsers>,
    /// The connection causal tokens are read and confirmed on.
    causal: crate::causal::Link,
    /// Where checkouts wait, in turn by tenant: as many permits as deadpool
    /// has connections, so deadpool's own FIFO queue stays empty.
    gate: Arc<FairGate>,
}

impl RedisBackend {
    /// A builder for the endpoint at `url`.
    pub fn builder(
        endpoint: impl Into<Arc<str>>,
        url: impl Into<SecretUrl>,
    ) -> RedisBackendBuilder {
        RedisBackendBuilder::new(endpoint, url)
    }

    /// A backend from a config alone (no ACL passwords, no resolver).
    pub fn new(config: RedisBackendConfig) -> Result<Self, Error> {
        RedisBackendBuilder::from_config(config).build()
    }

    pub(crate) fn from_builder(builder: RedisBackendBuilder) -> Result<Self, Error> {
        let RedisBackendBuilder {
            config,
            passwords,
            resolver,
        } = builder;
        if let Some(problem) = config.validate().into_iter().next() {
            return Err(problem);
        }
        let config_error = |message: String| Error::Config {
            path: format!("redis.{}.url", config.endpoint),
            message,
        };
        let info = config
            .url
            .expose()
            .into_connection_info()
            .map_err(|e| config_error(format!("{}: {e}", config.url.redacted())))?;
        let settings = info.redis_settings();
        let defaults = SessionDefaults {
            db: settings.db(),
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
        };
        let client = crate::tls::client(
            info,
            config.tls.as_ref(),
            &format!("redis.{}", config.endpoint),
        )?;
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout));
        let manager = Manager::new_with_config(client.get_connection_info().clone(), connection)
            .map_err(|e| config_error(format!("{}: {e}", config.url.redacted())))?;
        let (idle, life) = (config.pool.idle_timeout, config.pool.max_lifetime);
        let retire = Hook::sync_fn(move |_, metrics| {
            let too_old = life.is_some_and(|l| metrics.age() > l);
            let idle_too_long = idle.is_some_and(|i| metrics.last_used() > i);
            if too_old || idle_too_long {
                Err(HookError::message("retired"))
            } else {
                Ok(())
            }
        });
        // A node restarted between two probes can come up as a replica with
        // no copy of its master's data, and answers reads from it (Redis's
        // default `replica-serve-stale-data yes`) before any probe has seen
        // it: a new connection asks first, and such a node is refused as an
        // endpoint failure, so the checkout goes elsewhere. A node that does
        // not answer `INFO` (no permission) is let through: probes decide.
        let synced = Hook::async_fn(|conn, _| {
            Box::pin(async move {
                let info: redis::RedisResult<String> = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(conn)
                    .await;
                match info {
                    Ok(info)
                        if crate::probe::field(&info, "role") == Some("slave")
                            && crate::probe::unsynced(&info) =>
                    {
                        Err(HookError::message(
                            "a replica with no copy of its master's data (never synced since it \
                             started, or a full resync under way)",
                        ))
                    }
                    _ => Ok(()),
                }
            })
        });
        let max_size = usize::try_from(config.pool.max_size).unwrap_or(usize::MAX);
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.pool.acquire_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.recycle_timeout))
            .pre_recycle(retire)
            .post_create(synced)
            .build()
            .map_err(|e| Error::Config {
                path: format!("redis.{}.pool", config.endpoint),
                message: e.to_string(),
            })?;
        Ok(Self {
            causal: crate::causal::Link::new(client.clone(), config.response_timeout),
            endpoint: config.endpoint,
            url: config.url,
            pool,
            client,
            defaults,
            databases: config.databases,
            resolver,
            passwords,
            acquire_timeout: config.pool.acquire_timeout,
            connect_timeout: config.connect_timeout,
            recycle_timeout: config.recycle_timeout,
            response_timeout: config.response_timeout,
            counters: Counters::default(),
            users: Arc::default(),
            gate: FairGate::for_pool(&config.pool),
        })
    }

    pub(crate) fn causal_link(&self) -> &crate::causal::Link {
        &self.causal
    }

    /// The endpoint's URL, redacted when shown.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// What happened to returned connections so far.
    pub fn counters(&self) -> RedisCounters {
        RedisCounters {
            discarded: self.counters.discarded.load(Ordering::Relaxed),
            resets: self.counters.resets.load(Ordering::Relaxed),
            reset_failures: self.counters.reset_failures.load(Ordering::Relaxed),
        }
    }

    /// The logical database of a database-isolated scope, if it has one.
    pub fn database_of(&self, scope: &TenantScope) -> Option<u8> {
        match &self.resolver {
            Some(resolve) => resolve(scope),
            None => self.databases.get(scope.target()).copied(),
        }
    }

    fn not_provisioned(&self, scope: &TenantScope, what: &'static str) -> Error {
        Error::TenantNotProvisioned {
            endpoint: self.endpoint.clone(),
            tenant: scope.tenant().clone(),
            what,
            name: scope.target().to_owned(),
        }
    }

    fn refused(&self, scope: &TenantScope, reason: String) -> Error {
        Error::CheckoutRefused {
            endpoint: self.endpoint.clone(),
            tenant: Some(scope.tenant().clone()),
            reason,
        }
    }

    fn password_of(&self, scope: &TenantScope) -> Result<crate::AclPassword, Error> {
        let Some(passwords) = &self.passwords else {
            return Err(self.refused(
                scope,
                "row isolation needs an ACL password source (acl_passwords)".into(),
            ));
        };
        passwords
            .password(scope.tenant())
            .ok_or_else(|| self.not_provisioned(scope, "acl user"))
    }

    /// ACL users no tenant may be: the administrator every Redis has and
    /// the pool's own user.
    fn reserved_users(&self) -> impl Iterator<Item = &str> {
        std::iter::once("default").chain(self.defaults.username.as_deref())
    }

    /// Fails before any I/O when the scope cannot be applied here.
    fn check_provisioned(&self, scope: &TenantScope) -> Result<(), Error> {
        if scope.isolation() == Isolation::Row
            && self.reserved_users().any(|user| user == acl_user(scope))
        {
            return Err(self.refused(
                scope,
                format!(
                    "the tenant would authenticate as the reserved ACL user {:?}",
                    acl_user(scope)
                ),
            ));
        }
        if !is_safe_target(scope.target()) {
            return Err(self.refused(
                scope,
                format!(
                    "scope target {:?} is not a safe redis name ([A-Za-z0-9_-]+)",
                    scope.target()
                ),
            ));
        }
        match scope.isolation() {
            Isolation::Database => self
                .database_of(scope)
                .map(drop)
                .ok_or_else(|| self.not_provisioned(scope, "database")),
            Isolation::Row => self.password_of(scope).map(drop),
            Isolation::Schema => Ok(()),
        }
    }

    fn scope_error(
        &self,
        scope: &TenantScope,
        action: &'static str,
        e: redis::RedisError,
    ) -> Error {
        if error_kind(&e) == switchyard_core::BackendErrorKind::Io {
            return redis_error(&self.endpoint, Some(scope.tenant()), e);
        }
        Error::Scope {
            endpoint: self.endpoint.clone(),
            tenant: scope.tenant().clone(),
            action,
            source: Box::new(e),
        }
    }

    /// `AUTH` as `scope`'s ACL user. A user this backend provisioned that
    /// the node lost in a restart (a `run_id` other than the one the users
    /// were last known in) is written again first; one it cannot restore is
    /// an endpoint failure, so reads move to a node that has it. A user
    /// missing without a restart, or never provisioned here, is
    /// [`Error::TenantNotProvisioned`].
    async fn log_in(
        &self,
        conn: &mut RedisConnection,
        scope: &TenantScope,
    ) -> Result<crate::AclPassword, Error> {
        let password = self.password_of(scope)?;
        conn.session.dirty = true;
        let mut auth = redis::cmd("AUTH");
        auth.arg(acl_user(scope)).arg(password.expose());
        let Err(e) = conn.send(&auth, None).await else {
            return Ok(password);
        };
        if e.code() != Some("WRONGPASS") {
            return Err(self.scope_error(scope, "apply", e));
        }
        if !self.users.knows(scope) {
            return Err(self.not_provisioned(scope, "acl user"));
        }
        let restored = match &self.passwords {
            Some(passwords) => {
                let mut raw = conn.raw()?;
                match users::restarted(&mut raw, &self.users).await {
                    // Deleted on a running server, by someone else: an
                    // operator's revocation stands.
                    Ok(false) => return Err(self.not_provisioned(scope, "acl user")),
                    Ok(true) => {
                        tracing::warn!(endpoint = %self.endpoint, tenant = %scope.tenant(), "redis restarted and lost a tenant ACL user: restoring it");
                        users::restore(&mut raw, scope, passwords.as_ref()).await
                    }
                    Err(e) => Err(e),
                }
            }
            None => Err(e),
        };
        let result = match restored {
            Ok(()) => conn.send(&auth, None).await.map(drop),
            Err(e) => Err(e),
        };
        result.map(|()| password).map_err(|e| {
            tracing::warn!(endpoint = %self.endpoint, tenant = %scope.tenant(), error = %e, "could not restore the tenant ACL user: this node cannot serve the tenant");
            Error::backend(
                &self.endpoint,
                Some(scope.tenant()),
                switchyard_core::BackendErrorKind::Connect,
                e,
            )
        })
    }

    fn count_discard(&self, conn: RedisConnection) {
        self.counters.discarded.fetch_add(1, Ordering::Relaxed);
        drop(conn.into_detached());
    }
}

impl Backend for RedisBackend {
    type Connection = RedisConnection;

    fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    async fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<RedisConnection, Error> {
        if let Some(scope) = scope {
            self.check_provisioned(scope)?;
        }
        let started = Instant::now();
        let tenant = scope.map(TenantScope::tenant);
        let permit = self
            .gate
            .acquire_for(&self.endpoint, scope, deadline)
            .await?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeouts = Timeouts {
            wait: Some(remaining.min(self.acquire_timeout)),
            create: Some(remaining.min(self.connect_timeout)),
            recycle: Some(remaining.min(self.recycle_timeout)),
        };
        let inner = self
            .pool
            .timeout_get(&timeouts)
            .await
            .map_err(|e| pool_error(&self.endpoint, tenant, e, started.elapsed()))?;
        Ok(
            RedisConnection::new(inner, self.endpoint.clone(), self.response_timeout)
                .recording_users(Arc::clone(&self.users))
                .holding(permit),
        )
    }

    async fn scope(&self, conn: &mut RedisConnection, scope: &TenantScope) -> Result<(), Error> {
        self.check_provisioned(scope)?;
        // Pooled connections are clean; one that is not (a swap between
        // checkouts, say) is reset first so nothing carries over.
        if conn.session.dirty {
            conn.reset(&self.defaults)
                .await
                .map_err(|e| self.scope_error(scope, "reset", e))?;
        }
        conn.release_confinement();
        let tenant = scope.tenant().clone();
        match scope.isolation() {
            Isolation::Schema => {
                conn.confine(
                    tenant,
                    Isolation::Schema,
                    Confinement::Prefix(key_prefix(scope).into()),
                );
            }
            Isolation::Database => {
                let index = self
                    .database_of(scope)
                    .ok_or_else(|| self.not_provisioned(scope, "database"))?;
                conn.session.dirty = true;
                let mut select = redis::cmd("SELECT");
                select.arg(index);
                conn.send(&select, None).await.map_err(|e| {
                    if e.detail().is_some_and(|d| d.contains("out of range")) {
                        self.not_provisioned(scope, "database")
                    } else {
                        self.scope_error(scope, "apply", e)
                    }
                })?;
                conn.confine(
                    tenant,
                    Isolation::Database,
                    Confinement::Database(key_prefix(scope).into()),
                );
            }
            Isolation::Row => {
                let password = self.log_in(conn, scope).await?;
                conn.confine(
                    tenant,
                    Isolation::Row,
                    Confinement::Acl(key_prefix(scope).into()),
                );
                conn.reauth = Some(Reauth {
                    user: acl_user(scope).to_owned(),
                    password,
                    defaults: self.defaults.clone(),
                });
            }
        }
        tracing::trace!(
            endpoint = %self.endpoint,
            tenant = %scope.tenant(),
            isolation = %scope.isolation(),
            target = scope.target(),
            "redis tenant scope applied"
        );
        Ok(())
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe, Error> {
        let started = Instant::now();
        let timed_out = || Error::ProbeTimeout {
            endpoint: self.endpoint.clone(),
            elapsed: started.elapsed(),
        };
        let restore = probe::Restore {
            users: &self.users,
            passwords: self.passwords.as_deref(),
            endpoint: &self.endpoint,
        };
        match tokio::time::timeout(timeout, probe::run(&self.client, timeout, restore)).await {
            Ok(Ok(mut found)) => {
                found.rtt = started.elapsed();
                Ok(found)
            }
            Ok(Err(e)) if e.is_timeout() => Err(timed_out()),
            Ok(Err(e)) => Err(redis_error(&self.endpoint, None, e)),
            Err(_) => Err(timed_out()),
        }
    }

    fn stats(&self) -> PoolStats {
        let status = self.pool.status();
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        PoolStats {
            size: clamp(status.size),
            idle: clamp(status.available),
            max_size: clamp(status.max_size),
            tenant_pools: 0,
        }
    }

    /// The connection's own record decides, not the checkout's scope: it is
    /// what the server session actually carries.
    fn inspect(&self, conn: &mut RedisConnection) -> Returned {
        if !conn.reusable() {
            Returned::Broken
        } else if conn.session.dirty {
            Returned::Dirty
        } else {
            conn.release_confinement();
            Returned::Clean
        }
    }

    /// Restores the pool's default session (`RESET`, default user and
    /// database) within the recycle timeout.
    async fn recycle(&self, conn: &mut RedisConnection) -> Recycle {
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        let outcome = tokio::time::timeout(self.recycle_timeout, conn.reset(&self.defaults)).await;
        let failure = match outcome {
            Ok(Ok(())) => {
                conn.release_confinement();
                return Recycle::Keep;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no reply within {:?}", self.recycle_timeout),
        };
        self.counters.reset_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %self.endpoint,
            tenant = conn.tenant().map(|t| t.as_str()),
            error = %failure,
            "redis session reset failed; connection discarded"
        );
        Recycle::Discard
    }

    fn release(&self, conn: RedisConnection, recycle: Recycle) {
        match recycle {
            // Back to deadpool's pool.
            Recycle::Keep => drop(conn),
            Recycle::Discard => self.count_discard(conn),
        }
    }

    /// Refuses a row (ACL user) tier whose template can name the user
    /// `default` or the pool's own user: provisioning would rewrite it.
    ///
    /// A missing ACL password source is not refused here: tiers are shared by
    /// every cluster of a configuration, and a Redis cluster that no
    /// row-isolated tenant uses needs none. A row-scoped checkout without one
    /// fails with [`Error::CheckoutRefused`] naming the source.
    fn validate_tier(&self, name: &str, tier: &TierPolicy) -> Result<(), Error> {
        if tier.isolation != Isolation::Row {
            return Ok(());
        }
        tier.refuse_reserved(name, self.reserved_users(), false)
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("endpoint", &self.endpoint)
            .field("url", &self.url)
            .field("stats", &self.stats())
            .field("databases", &self.databases.len())
            .field("acl_passwords", &self.passwords.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{Checkout, TenantId};

    const _: fn() = || {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send::<Checkout<RedisBackend>>();
        assert_send::<RedisConnection>();
        assert_send_sync::<RedisBackend>();
    };

    fn scope(isolation: Isolation, target: &str) -> TenantScope {
        TenantScope::new(TenantId::new("acme").unwrap(), isolation, target, "x")
    }

    #[tokio::test]
    async fn building_never_connects() {
        // Port 1 on loopback: nothing listens there.
        let backend = RedisBackend::builder("down", "redis://:hunter2@127.0.0.1:1")
            .build()
            .unwrap();
        assert_eq!(backend.stats().size, 0);
        assert!(!format!("{backend:?}").contains("hunter2"));
        let err = backend
            .acquire(None, Instant::now() + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.is_endpoint_failure(), "{err}");
        assert!(!format!("{err} {err:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn unprovisioned_scopes_fail_before_any_io() {
        let backend = RedisBackend::builder("r", "redis://127.0.0.1:1")
            .database("tenant_known", 2)
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        let err = backend
            .acquire(Some(&scope(Isolation::Database, "tenant_acme")), deadline)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::TenantNotProvisioned {
                    what: "database",
                    ..
                }
            ),
            "{err}"
        );
        let err = backend
            .acquire(Some(&scope(Isolation::Row, "tenant_acme")), deadline)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::CheckoutRefused { .. }), "{err}");
        let err = backend
            .acquire(Some(&scope(Isolation::Schema, "tenant_*")), deadline)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::CheckoutRefused { .. }), "{err}");
        assert_eq!(backend.stats().size, 0);
        assert_eq!(
            backend.database_of(&scope(Isolation::Database, "tenant_known")),
            Some(2)
        );
    }
}
