//! Configuration of one ClickHouse endpoint: a plain `Deserialize` struct with
//! documented defaults, plus a thin builder.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_core::{
    EndpointId, Error, HttpUrl, PoolSettings, SecretUrl, TlsSettings, Transport,
};

use crate::filter::validate_identifier;
use crate::ChBackend;

/// Default [`ChBackendConfig::row_database`].
pub const DEFAULT_ROW_DATABASE: &str = "default";
/// Default [`ChBackendConfig::tenant_column`].
pub const DEFAULT_TENANT_COLUMN: &str = "tenant_id";
/// Default [`ChBackendConfig::provision_cache_ttl`].
pub const DEFAULT_PROVISION_CACHE_TTL: Duration = Duration::from_secs(60);
/// Default [`ChBackendConfig::query_timeout`].
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a [`ChBackend`](crate::ChBackend) needs for one endpoint.
///
/// The URL is `http://[user[:password]@]host:port`; the credentials are taken
/// out of it and sent as ClickHouse's own headers, and the URL keeps its
/// password out of `Debug` and `Display` (see [`SecretUrl`]).
///
/// [`pool.max_size`](PoolSettings::max_size) bounds the requests in flight on
/// the endpoint: ClickHouse over HTTP has no session to pool, so a checkout is
/// a permit plus a client handle, and an endpoint at its bound makes further
/// checkouts wait up to their deadline like a full pool would.
///
/// ```
/// use switchyard_clickhouse::ChBackendConfig;
///
/// let config: ChBackendConfig = serde_json::from_str(r#"{
///     "endpoint": "ch-1",
///     "url": "http://app:secret@127.0.0.1:8123",
///     "pool": { "max_size": 32, "acquire_timeout": "2s" },
///     "row_database": "shared",
///     "query_timeout": "10s"
/// }"#).unwrap();
/// assert_eq!(config.tenant_column, "tenant_id");
/// assert!(config.validate("clickhouse").is_empty());
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChBackendConfig {
    /// The endpoint's name in errors, logs and metrics.
    pub endpoint: EndpointId,
    /// `http://user:password@host:8123`, or `https://` for TLS (see [`tls`](Self::tls)).
    pub url: SecretUrl,
    /// `max_size` is the bound on requests in flight; `acquire_timeout` caps the
    /// wait for a free slot.
    #[serde(default)]
    pub pool: PoolSettings,
    /// Database of unscoped checkouts (default: the user's default database).
    #[serde(default)]
    pub database: Option<String>,
    /// The shared database holding the tables of row-isolated tenants
    /// (default `default`).
    #[serde(default = "default_row_database")]
    pub row_database: String,
    /// The column that carries the tenant id in row-isolated tables (default
    /// `tenant_id`).
    #[serde(default = "default_tenant_column")]
    pub tenant_column: String,
    /// A custom setting (such as `SQL_tenant`) sent with every query of a
    /// row-scoped checkout, for row policies on servers that have custom
    /// settings; see [`row_policy_sql`](crate::row_policy_sql). Off by default:
    /// servers without custom settings (18.16 among them) reject unknown ones.
    #[serde(default)]
    pub row_policy_setting: Option<String>,
    /// How long a tenant database seen to exist is trusted without asking
    /// again (default 60s).
    #[serde(default = "default_provision_cache_ttl", with = "humantime_serde")]
    pub provision_cache_ttl: Duration,
    /// Upper bound on each query a handle runs (default 30s).
    #[serde(default = "default_query_timeout", with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Extra ClickHouse settings sent with every query (`max_threads`, ...).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// TLS trust and client certificate for an `https://` URL (without it,
    /// an `https://` URL verifies the server against Mozilla's roots); see
    /// the table in the README's engine section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

fn default_row_database() -> String {
    DEFAULT_ROW_DATABASE.to_owned()
}
fn default_tenant_column() -> String {
    DEFAULT_TENANT_COLUMN.to_owned()
}
fn default_provision_cache_ttl() -> Duration {
    DEFAULT_PROVISION_CACHE_TTL
}
fn default_query_timeout() -> Duration {
    DEFAULT_QUERY_TIMEOUT
}

impl ChBackendConfig {
    /// A configuration with every default, for `url`.
    pub fn new(endpoint: impl Into<Arc<str>>, url: impl Into<SecretUrl>) -> Self {
        Self {
            endpoint: EndpointId::new(endpoint),
            url: url.into(),
            pool: PoolSettings::default(),
            database: None,
            row_database: default_row_database(),
            tenant_column: default_tenant_column(),
            row_policy_setting: None,
            provision_cache_ttl: DEFAULT_PROVISION_CACHE_TTL,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            settings: BTreeMap::new(),
            tls: None,
        }
    }

    /// Every problem with this configuration, each as an [`Error::Config`] under `path`.
    pub fn validate(&self, path: &str) -> Vec<Error> {
        let mut problems = self.pool.validate(&format!("{path}.pool"));
        let mut bad = |field: &str, message: String| {
            problems.push(Error::Config {
                path: format!("{path}.{field}"),
                message,
            })
        };
        if let Some((field, message)) = HttpUrl::problem(&self.url, self.tls.as_ref()) {
            bad(field, message);
        }
        if let Some(db) = &self.database {
            if let Err(e) = validate_identifier(db) {
                bad("database", e.to_string());
            }
        }
        if let Err(e) = validate_identifier(&self.row_database) {
            bad("row_database", e.to_string());
        }
        if let Err(e) = validate_identifier(&self.tenant_column) {
            bad("tenant_column", e.to_string());
        }
        if let Some(setting) = &self.row_policy_setting {
            if let Err(e) = validate_identifier(setting) {
                bad("row_policy_setting", e.to_string());
            }
        }
        if self.provision_cache_ttl.is_zero() {
            bad("provision_cache_ttl", "must be greater than zero".into());
        }
        if self.query_timeout.is_zero() {
            bad("query_timeout", "must be greater than zero".into());
        }
        problems
    }

    /// How this endpoint's requests are protected, as configured (no I/O).
    pub fn transport(&self) -> Transport {
        HttpUrl::transport(&self.url, self.tls.as_ref())
    }
}

switchyard_core::backend_builder! {
    /// A builder over [`ChBackendConfig`].
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), switchyard_core::Error> {
    /// use std::time::Duration;
    /// use switchyard_core::PoolSettings;
    /// use switchyard_clickhouse::ChBackendConfig;
    ///
    /// let backend = ChBackendConfig::builder("ch-1", "http://127.0.0.1:8123")
    ///     .pool(PoolSettings::default().with_max_size(32))
    ///     .row_database("shared")
    ///     .query_timeout(Duration::from_secs(10))
    ///     .build()?;
    /// # let _ = backend; Ok(()) }
    /// ```
    ChBackendBuilder for ChBackendConfig => ChBackend;
    database(database: impl Into<String>) => database = Some(database.into());
    row_database(database: impl Into<String>) => row_database = database.into();
    tenant_column(column: impl Into<String>) => tenant_column = column.into();
    row_policy_setting(setting: impl Into<String>) => row_policy_setting = Some(setting.into());
    provision_cache_ttl(ttl: Duration) => provision_cache_ttl = ttl;
    query_timeout(timeout: Duration) => query_timeout = timeout;
}

impl ChBackendBuilder {
    /// Adds a ClickHouse setting sent with every query.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.settings.insert(name.into(), value.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_out_of_serialized_config() {
        let c = ChBackendConfig::new("ch", "http://app:p%40ss@127.0.0.1:8123");
        assert!(c.validate("ch").is_empty());
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("p%40ss"), "{json}");
    }

    #[test]
    fn validation_reports_each_problem_without_secrets() {
        let mut c = ChBackendConfig::new("ch", "tcp://app:hunter2@db:9000");
        c.tenant_column = "tenant id".into();
        c.row_database = "db`x".into();
        c.row_policy_setting = Some("SQL_tenant; DROP".into());
        c.query_timeout = Duration::ZERO;
        let problems: Vec<String> = c.validate("ch").iter().map(|e| e.to_string()).collect();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(
            problems.iter().all(|p| !p.contains("hunter2")),
            "{problems:#?}"
        );
        assert!(problems[0].starts_with("ch.url: "));
    }
}
