//! Configuration of one Redis endpoint: where it is, how its pool is sized and
//! timed, and which logical database each database-isolated tenant owns.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{IntoConnectionInfo, ProtocolVersion};
use serde::Deserialize;
use switchyard_core::{
    EndpointId, Error, PoolSettings, SecretUrl, TenantScope, TlsSettings, Transport,
};

use crate::acl::AclPasswords;
use crate::backend::RedisBackend;

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_recycle_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_response_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Settings of one Redis endpoint's backend, as read from a config file.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use switchyard_redis::RedisBackendConfig;
///
/// let config: RedisBackendConfig = serde_json::from_str(r#"{
///     "endpoint": "cache-1",
///     "url": "redis://app:hunter2@10.0.0.7:6379/0",
///     "pool": { "max_size": 32, "acquire_timeout": "250ms" },
///     "response_timeout": "2s",
///     "databases": { "tenant_acme": 1, "tenant_globex": 2 }
/// }"#)?;
/// assert!(!format!("{config:?}").contains("hunter2"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisBackendConfig {
    /// The endpoint's name in errors, logs and metrics.
    pub endpoint: EndpointId,
    /// `redis://[user:password@]host:port[/db]`; its credentials are the pool's
    /// default user, re-established on every connection before it is pooled.
    /// RESP3 (`?protocol=resp3`) is not supported.
    pub url: SecretUrl,
    /// Pool size and timeouts (`acquire_timeout` bounds the wait for a pooled
    /// connection; `idle_timeout` and `max_lifetime` retire connections when
    /// they are next taken from the pool; `min_idle` is left to the router's
    /// warmer, deadpool keeps no floor).
    #[serde(default)]
    pub pool: PoolSettings,
    /// Longest time to open a connection, handshake included (default 2s); a
    /// checkout's own deadline shortens it.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest time to check a pooled connection before reuse, or to reset one
    /// before it goes back (default 1s); past it the connection is discarded.
    #[serde(default = "default_recycle_timeout", with = "humantime_serde")]
    pub recycle_timeout: Duration,
    /// Longest wait for a reply (default 5s); a blocking command (`BLPOP k 30`)
    /// gets its own timeout on top.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Logical database index per database-isolated tenant, keyed by the
    /// database name the tier's template renders (the scope's target, such as
    /// `tenant_acme`). A tenant missing here gets
    /// [`Error::TenantNotProvisioned`].
    #[serde(default)]
    pub databases: BTreeMap<String, u8>,
    /// TLS trust and client certificate for a `rediss://` URL (without it, a
    /// `rediss://` URL verifies the server against Mozilla's roots).
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

impl RedisBackendConfig {
    /// Defaults for the endpoint at `url`.
    pub fn new(endpoint: impl Into<Arc<str>>, url: impl Into<SecretUrl>) -> Self {
        Self {
            endpoint: EndpointId::new(endpoint),
            url: url.into(),
            pool: PoolSettings::default(),
            connect_timeout: default_connect_timeout(),
            recycle_timeout: default_recycle_timeout(),
            response_timeout: default_response_timeout(),
            databases: BTreeMap::new(),
            tls: None,
        }
    }

    /// How this endpoint's connections are protected, as configured.
    pub fn transport(&self) -> Transport {
        match self.url.expose().into_connection_info() {
            Ok(info) => crate::tls::transport(&info, self.tls.as_ref()),
            Err(_) => Transport::Plaintext,
        }
    }

    /// Every problem with these settings, each an [`Error::Config`].
    pub fn validate(&self) -> Vec<Error> {
        let path = format!("redis.{}", self.endpoint);
        let mut problems = self.pool.validate(&format!("{path}.pool"));
        let mut bad = |field: &str, message: String| {
            problems.push(Error::Config {
                path: format!("{path}.{field}"),
                message,
            })
        };
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("recycle_timeout", self.recycle_timeout),
            ("response_timeout", self.response_timeout),
        ] {
            if value.is_zero() {
                bad(field, "must be greater than zero".into());
            }
        }
        let default_db = match self.url.expose().into_connection_info() {
            Ok(info) => {
                if info.redis_settings().protocol() != ProtocolVersion::RESP2 {
                    bad(
                        "url",
                        format!("{}: only RESP2 is supported", self.url.redacted()),
                    );
                }
                if let Some(message) =
                    crate::tls::problem(&info, self.url.redacted(), self.tls.as_ref())
                {
                    bad("tls", message);
                }
                Some(info.redis_settings().db())
            }
            Err(e) => {
                // The driver's message names the problem, never the URL.
                bad(
                    "url",
                    format!("{} is not a redis url: {e}", self.url.redacted()),
                );
                None
            }
        };
        let mut owners: BTreeMap<u8, &str> = BTreeMap::new();
        for (name, &index) in &self.databases {
            if Some(i64::from(index)) == default_db {
                bad(
                    "databases",
                    format!("{name:?} is on database {index}, the default database of unscoped connections"),
                );
            }
            if let Some(other) = owners.insert(index, name) {
                bad(
                    "databases",
                    format!("{other:?} and {name:?} share database {index}"),
                );
            }
        }
        problems
    }
}

/// Picks a tenant's logical database from its scope.
pub type DatabaseResolver = Arc<dyn Fn(&TenantScope) -> Option<u8> + Send + Sync>;

/// Builds a [`RedisBackend`]: the config plus what cannot be written in a file
/// (the ACL password source, a database resolver).
///
/// ```
/// # fn main() -> Result<(), switchyard_core::Error> {
/// use std::time::Duration;
/// use switchyard_core::Backend;
/// use switchyard_redis::{RedisBackend, StaticPasswords};
///
/// let backend = RedisBackend::builder("cache-1", "redis://127.0.0.1:6379")
///     .max_size(8)
///     .acquire_timeout(Duration::from_millis(500))
///     .database("tenant_acme", 1)
///     .acl_passwords(StaticPasswords::new())
///     .build()?; // never connects: the server may be down
/// assert_eq!(backend.stats().max_size, 8);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBackendBuilder {
    pub(crate) config: RedisBackendConfig,
    pub(crate) passwords: Option<Arc<dyn AclPasswords>>,
    pub(crate) resolver: Option<DatabaseResolver>,
}

impl RedisBackendBuilder {
    /// A builder for the endpoint at `url` with default settings.
    pub fn new(endpoint: impl Into<Arc<str>>, url: impl Into<SecretUrl>) -> Self {
        Self::from_config(RedisBackendConfig::new(endpoint, url))
    }

    /// A builder starting from `config`.
    pub fn from_config(config: RedisBackendConfig) -> Self {
        Self {
            config,
            passwords: None,
            resolver: None,
        }
    }

    /// Replaces the pool settings.
    pub fn pool(mut self, pool: PoolSettings) -> Self {
        self.config.pool = pool;
        self
    }

    /// Sets the most connections open at once.
    pub fn max_size(mut self, n: u32) -> Self {
        self.config.pool.max_size = n;
        self
    }

    /// Sets the longest wait for a pooled connection.
    pub fn acquire_timeout(mut self, t: Duration) -> Self {
        self.config.pool.acquire_timeout = t;
        self
    }

    /// Sets the longest time to open a connection.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.config.connect_timeout = t;
        self
    }

    /// Sets the longest time to check or reset a connection.
    pub fn recycle_timeout(mut self, t: Duration) -> Self {
        self.config.recycle_timeout = t;
        self
    }

    /// Sets the longest wait for a reply.
    pub fn response_timeout(mut self, t: Duration) -> Self {
        self.config.response_timeout = t;
        self
    }

    /// Sets the TLS settings (see [`RedisBackendConfig::tls`]).
    pub fn tls(mut self, tls: TlsSettings) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// Gives the database named `name` (a scope target) the logical index `index`.
    pub fn database(mut self, name: impl Into<String>, index: u8) -> Self {
        self.config.databases.insert(name.into(), index);
        self
    }

    /// Picks databases with `resolve` instead of the `databases` map (for
    /// mappings kept elsewhere, such as by tenant id). `None` means the tenant
    /// is not provisioned. The resolver must never give two tenants one index,
    /// nor give a tenant the URL's default database.
    pub fn database_resolver(
        mut self,
        resolve: impl Fn(&TenantScope) -> Option<u8> + Send + Sync + 'static,
    ) -> Self {
        self.resolver = Some(Arc::new(resolve));
        self
    }

    /// Where row-isolated (ACL) tenants' passwords come from.
    pub fn acl_passwords(mut self, passwords: impl AclPasswords) -> Self {
        self.passwords = Some(Arc::new(passwords));
        self
    }

    /// The config as it stands.
    pub fn config(&self) -> &RedisBackendConfig {
        &self.config
    }

    /// Validates and builds the backend. Never connects, so an unreachable
    /// endpoint is not an error here.
    pub fn build(self) -> Result<RedisBackend, Error> {
        RedisBackend::from_builder(self)
    }
}

impl fmt::Debug for RedisBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackendBuilder")
            .field("config", &self.config)
            .field("acl_passwords", &self.passwords.is_some())
            .field("database_resolver", &self.resolver.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_bounded_and_valid() {
        let c = RedisBackendConfig::new("r", "redis://127.0.0.1:6379/0");
        assert!(c.validate().is_empty());
        assert!(c.response_timeout > Duration::ZERO);
    }

    #[test]
    fn shared_or_default_databases_are_refused() {
        let mut c = RedisBackendConfig::new("r", "redis://127.0.0.1:6379/3");
        c.databases.insert("tenant_a".into(), 3);
        c.databases.insert("tenant_b".into(), 4);
        c.databases.insert("tenant_c".into(), 4);
        let problems: Vec<String> = c.validate().iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("default database"), "{problems:?}");
        assert!(problems[1].contains("share database 4"), "{problems:?}");
    }

    #[test]
    fn bad_urls_are_reported_without_their_password() {
        let c = RedisBackendConfig::new("r", "nosuch://u:hunter2@host");
        let problems = c.validate();
        assert_eq!(problems.len(), 1);
        assert!(!problems[0].to_string().contains("hunter2"));
        let c = RedisBackendConfig::new("r", "redis://127.0.0.1/0?protocol=resp3");
        assert_eq!(c.validate().len(), 1);
    }

    #[test]
    fn debug_hides_the_password() {
        let b = RedisBackendBuilder::new("r", "redis://u:hunter2@h:1");
        assert!(!format!("{b:?}").contains("hunter2"));
    }
}
