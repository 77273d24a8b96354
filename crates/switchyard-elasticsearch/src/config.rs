//! Configuration of one Elasticsearch node: a plain `Deserialize` struct with
//! documented defaults, plus a thin builder.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_core::{
    EndpointId, Error, HttpUrl, PoolSettings, SecretUrl, TlsSettings, Transport,
};

use crate::naming::{validate_field, IndexNaming};
use crate::EsBackend;

/// Default [`EsBackendConfig::tenant_field`].
pub const DEFAULT_TENANT_FIELD: &str = "tenant_id";
/// Default [`EsBackendConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`EsBackendConfig::provision_cache_ttl`].
pub const DEFAULT_PROVISION_CACHE_TTL: Duration = Duration::from_secs(60);

/// Everything an [`EsBackend`](crate::EsBackend) needs for one node.
///
/// The URL is `http(s)://[user[:password]@]host:port`; credentials are taken
/// out of it and sent as basic authentication, and the URL keeps its password
/// out of `Debug` and `Display` (see [`SecretUrl`]).
///
/// [`pool.max_size`](PoolSettings::max_size) bounds the requests in flight
/// on the node (a checkout holds one slot), and `acquire_timeout` caps the
/// wait for one.
///
/// ```
/// use switchyard_elasticsearch::{EsBackendConfig, IndexNaming};
///
/// let config: EsBackendConfig = serde_json::from_str(r#"{
///     "endpoint": "es-1",
///     "url": "http://elastic:secret@127.0.0.1:9200",
///     "pool": { "max_size": 32 },
///     "index_naming": "strict",
///     "request_timeout": "5s"
/// }"#).unwrap();
/// assert_eq!(config.index_naming, IndexNaming::Strict);
/// assert!(config.validate("search").is_empty());
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EsBackendConfig {
    /// The endpoint's name in errors, logs and metrics.
    pub endpoint: EndpointId,
    /// `http://user:password@host:9200`, or `https://` for TLS (see [`tls`](Self::tls)).
    pub url: SecretUrl,
    /// `max_size` bounds requests in flight; `acquire_timeout` caps the wait.
    #[serde(default)]
    pub pool: PoolSettings,
    /// The document field that carries the tenant id in shared indices
    /// (default `tenant_id`; map it as `keyword`).
    #[serde(default = "default_tenant_field")]
    pub tenant_field: String,
    /// How scope targets become index and alias names (default `encode`).
    #[serde(default)]
    pub index_naming: IndexNaming,
    /// Upper bound on every request a handle or probe sends (default 30s).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a tenant index or alias seen to exist is trusted without
    /// asking again (default 60s).
    #[serde(default = "default_provision_cache_ttl", with = "humantime_serde")]
    pub provision_cache_ttl: Duration,
    /// TLS trust and client certificate for an `https://` URL (without it,
    /// an `https://` URL verifies the node against Mozilla's roots); see the
    /// table in the README's engine section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

fn default_tenant_field() -> String {
    DEFAULT_TENANT_FIELD.to_owned()
}
fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}
fn default_provision_cache_ttl() -> Duration {
    DEFAULT_PROVISION_CACHE_TTL
}

impl EsBackendConfig {
    /// A configuration with every default, for `url`.
    pub fn new(endpoint: impl Into<Arc<str>>, url: impl Into<SecretUrl>) -> Self {
        Self {
            endpoint: EndpointId::new(endpoint),
            url: url.into(),
            pool: PoolSettings::default(),
            tenant_field: default_tenant_field(),
            index_naming: IndexNaming::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            provision_cache_ttl: DEFAULT_PROVISION_CACHE_TTL,
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
        if let Err(e) = validate_field(&self.tenant_field) {
            bad("tenant_field", e.to_string());
        }
        if self.request_timeout.is_zero() {
            bad("request_timeout", "must be greater than zero".into());
        }
        if self.provision_cache_ttl.is_zero() {
            bad("provision_cache_ttl", "must be greater than zero".into());
        }
        problems
    }

    /// How this node's requests are protected, as configured (no I/O).
    pub fn transport(&self) -> Transport {
        HttpUrl::transport(&self.url, self.tls.as_ref())
    }
}

switchyard_core::backend_builder! {
    /// A builder over [`EsBackendConfig`].
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), switchyard_core::Error> {
    /// use std::time::Duration;
    /// use switchyard_core::PoolSettings;
    /// use switchyard_elasticsearch::EsBackendConfig;
    ///
    /// let backend = EsBackendConfig::builder("es-1", "http://127.0.0.1:9200")
    ///     .pool(PoolSettings::default().with_max_size(32))
    ///     .tenant_field("org")
    ///     .request_timeout(Duration::from_secs(5))
    ///     .build()?;
    /// # let _ = backend; Ok(()) }
    /// ```
    EsBackendBuilder for EsBackendConfig => EsBackend;
    tenant_field(field: impl Into<String>) => tenant_field = field.into();
    index_naming(naming: IndexNaming) => index_naming = naming;
    request_timeout(timeout: Duration) => request_timeout = timeout;
    provision_cache_ttl(ttl: Duration) => provision_cache_ttl = ttl;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_out_of_serialized_config() {
        let c = EsBackendConfig::new("es", "http://elastic:p%40ss@127.0.0.1:9200");
        assert!(c.validate("es").is_empty());
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("p%40ss"), "{json}");
    }

    #[test]
    fn validation_reports_each_problem_without_secrets() {
        let mut c = EsBackendConfig::new("es", "ftp://elastic:hunter2@db:9200");
        c.tenant_field = "a.b".into();
        c.request_timeout = Duration::ZERO;
        let problems: Vec<String> = c.validate("es").iter().map(|e| e.to_string()).collect();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(
            problems.iter().all(|p| !p.contains("hunter2")),
            "{problems:#?}"
        );
    }
}
