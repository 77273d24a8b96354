//! Configuration of one MongoDB endpoint (or replica set): a plain `Deserialize`
//! struct with documented defaults, plus a thin builder.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use mongodb::options::{ClientOptions, ConnectionString, ServerAddress, ServerMonitoringMode};
use serde::{Deserialize, Serialize};
use switchyard_core::{EndpointId, Error, PoolSettings, SecretUrl, TlsSettings, Transport};

use crate::names::validate_database;
use crate::MongoBackend;

/// Default [`MongoBackendConfig::tenant_field`].
pub const DEFAULT_TENANT_FIELD: &str = "tenant_id";
/// The shared database when neither [`MongoBackendConfig::database`] nor the
/// URL names one.
pub const DEFAULT_DATABASE: &str = "switchyard";
/// Default [`MongoBackendConfig::heartbeat_interval`] (the driver's default).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Default [`MongoBackendConfig::operation_timeout`].
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The driver's floor for the heartbeat interval.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// What one backend's client talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    /// One node, with `directConnection=true`: the router sees every member of a
    /// replica set as an endpoint of its own, with its own role and lag, and
    /// does the routing and failover itself. The default.
    #[default]
    Direct,
    /// The whole replica set (or sharded cluster) behind one backend: the
    /// driver discovers the members and routes writes to the primary itself;
    /// reads follow the URL's `readPreference` (primary by default).
    /// Probes report [`Role::Primary`](switchyard_core::Role::Primary) while a
    /// primary is reachable and [`Role::Replica`](switchyard_core::Role::Replica)
    /// while only secondaries are.
    ReplicaSet,
}

/// Everything a [`MongoBackend`](crate::MongoBackend) needs for one endpoint.
///
/// The URL keeps its password out of `Debug`, `Display` and serialization (see
/// [`SecretUrl`]). Every wait is bounded: pool waits by
/// [`PoolSettings::acquire_timeout`], connects and server selection by their
/// timeouts (which default to the acquire timeout), and each operation of a
/// handle by [`operation_timeout`](Self::operation_timeout).
///
/// How [`PoolSettings`] map onto the driver's pool:
///
/// | setting | driver option |
/// |---|---|
/// | `max_size` | `maxPoolSize`, and the number of handles out at once |
/// | `min_idle` | `minPoolSize` |
/// | `idle_timeout` | `maxIdleTimeMS` |
/// | `acquire_timeout` | the wait for a handle; default for `connectTimeoutMS` and `serverSelectionTimeoutMS` |
/// | `max_lifetime` | not supported by the driver; ignored |
///
/// ```
/// use switchyard_mongodb::MongoBackendConfig;
///
/// let config: MongoBackendConfig = serde_json::from_str(r#"{
///     "endpoint": "mongo-1",
///     "url": "mongodb://app:secret@db:27017/app",
///     "pool": { "max_size": 8, "acquire_timeout": "2s" },
///     "tenant_field": "org_id",
///     "operation_timeout": "10s"
/// }"#).unwrap();
/// assert!(config.validate("mongo-1").is_empty());
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoBackendConfig {
    /// The endpoint's name in errors, logs and metrics.
    pub endpoint: EndpointId,
    /// `mongodb://user:password@host:port/database?options`, as the driver
    /// parses it. `mongodb+srv://` needs DNS, so it works only with
    /// [`MongoBackend::connect`](crate::MongoBackend::connect).
    pub url: SecretUrl,
    /// Pool sizing and timeouts.
    #[serde(default)]
    pub pool: PoolSettings,
    /// One node (default) or a whole replica set per backend.
    #[serde(default)]
    pub topology: Topology,
    /// The shared database of unscoped, collection-prefix and row-level
    /// checkouts. Default: the URL's database, else `switchyard`.
    #[serde(default)]
    pub database: Option<String>,
    /// The field that carries the tenant id under row-level isolation (default
    /// `tenant_id`). A plain top-level field name.
    #[serde(default = "default_tenant_field")]
    pub tenant_field: String,
    /// Longest wait for a TCP connect and handshake (default: the pool's
    /// acquire timeout).
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Longest wait for a suitable server before an operation fails (default:
    /// the pool's acquire timeout).
    #[serde(default, with = "humantime_serde")]
    pub server_selection_timeout: Option<Duration>,
    /// How often the driver checks each server in the background (default 10s,
    /// at least 500ms).
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Longest any one operation of a handle may take before it fails with an
    /// I/O error (default 30s). The driver has no socket timeout, so without
    /// this an operation on a hung server would wait forever.
    #[serde(default = "default_operation_timeout", with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// TLS trust and client certificate for a URL with `tls=true` (without
    /// it, such a URL verifies the server against Mozilla's roots); see the
    /// table in the README's engine section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

fn default_tenant_field() -> String {
    DEFAULT_TENANT_FIELD.to_owned()
}
fn default_heartbeat() -> Duration {
    DEFAULT_HEARTBEAT_INTERVAL
}
fn default_operation_timeout() -> Duration {
    DEFAULT_OPERATION_TIMEOUT
}

/// What a backend builds its clients from.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// Options of the client that serves checkouts.
    pub(crate) main: ClientOptions,
    /// Options of the probe's own client.
    pub(crate) probe: ClientOptions,
    /// The shared database.
    pub(crate) database: Arc<str>,
    /// The one host, in direct mode.
    pub(crate) direct_host: Option<ServerAddress>,
}

impl MongoBackendConfig {
    /// A configuration with every default, for `url`.
    pub fn new(endpoint: impl Into<Arc<str>>, url: impl Into<SecretUrl>) -> Self {
        Self {
            endpoint: EndpointId::new(endpoint),
            url: url.into(),
            pool: PoolSettings::default(),
            topology: Topology::default(),
            database: None,
            tenant_field: default_tenant_field(),
            connect_timeout: None,
            server_selection_timeout: None,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            tls: None,
        }
    }

    /// How this endpoint's connections are protected, as configured (no I/O).
    pub fn transport(&self) -> Transport {
        match ConnectionString::parse(self.url.expose()) {
            Ok(parsed) => {
                crate::tls::transport(parsed.tls.as_ref(), self.is_srv(), self.tls.as_ref())
            }
            Err(_) => Transport::Plaintext,
        }
    }

    fn is_srv(&self) -> bool {
        self.url.scheme().as_deref() == Some("mongodb+srv")
    }

    /// The effective connect timeout.
    pub fn effective_connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(self.pool.acquire_timeout)
    }

    /// The effective server selection timeout.
    pub fn effective_server_selection_timeout(&self) -> Duration {
        self.server_selection_timeout
            .unwrap_or(self.pool.acquire_timeout)
    }

    /// Every problem with this configuration, each as an [`Error::Config`]
    /// under `path`. Messages never contain the URL's password.
    pub fn validate(&self, path: &str) -> Vec<Error> {
        let mut problems = self.pool.validate(&format!("{path}.pool"));
        let mut bad = |field: &str, message: String| {
            problems.push(Error::Config {
                path: format!("{path}.{field}"),
                message,
            })
        };
        match self.url.scheme().as_deref() {
            Some("mongodb" | "mongodb+srv") => match ConnectionString::parse(self.url.expose()) {
                Ok(parsed) => {
                    if let Some(message) = self.topology_problem(&parsed) {
                        bad("url", message);
                    }
                    if let Some(message) =
                        crate::tls::problem(parsed.tls.as_ref(), self.is_srv(), self.tls.as_ref())
                    {
                        bad("tls", message);
                    }
                }
                Err(e) => bad(
                    "url",
                    format!(
                        "{} is not a valid url: {}",
                        self.url,
                        self.scrub(&e.to_string())
                    ),
                ),
            },
            _ => bad(
                "url",
                format!("{} must start with mongodb:// or mongodb+srv://", self.url),
            ),
        }
        if let Some(db) = &self.database {
            if let Err(e) = validate_database(db) {
                bad("database", e.to_string());
            }
        }
        let field = self.tenant_field.as_str();
        if field.is_empty()
            || field.starts_with('$')
            || field.contains(['.', '\0'])
            || field == "_id"
        {
            bad(
                "tenant_field",
                format!("{field:?} must be a plain top-level field name other than _id"),
            );
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("server_selection_timeout", self.server_selection_timeout),
        ] {
            if value.is_some_and(|v| v.is_zero()) {
                bad(name, "must be greater than zero".into());
            }
        }
        if self.heartbeat_interval < MIN_HEARTBEAT_INTERVAL {
            bad("heartbeat_interval", "must be at least 500ms".into());
        }
        if self.operation_timeout.is_zero() {
            bad("operation_timeout", "must be greater than zero".into());
        }
        problems
    }

    fn topology_problem(&self, parsed: &ConnectionString) -> Option<String> {
        use mongodb::options::HostInfo;
        match (self.topology, &parsed.host_info, parsed.direct_connection) {
            (Topology::Direct, HostInfo::DnsRecord(_), _) => Some(
                "a mongodb+srv:// url names a cluster; use topology \"replica_set\" with it".into(),
            ),
            (Topology::Direct, HostInfo::HostIdentifiers(hosts), _) if hosts.len() != 1 => {
                Some(format!(
                    "topology \"direct\" needs exactly one host, the url has {}; \
                     use one backend per member or topology \"replica_set\"",
                    hosts.len()
                ))
            }
            (Topology::ReplicaSet, _, Some(true)) => {
                Some("topology \"replica_set\" conflicts with directConnection=true".into())
            }
            _ => None,
        }
    }

    /// Replaces the URL's password (as written and percent-decoded) in `text`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        self.url.scrub(text)
    }

    fn config_error(&self, field: &str, message: impl AsRef<str>) -> Error {
        Error::Config {
            path: format!("{}.{field}", self.endpoint),
            message: self.scrub(message.as_ref()),
        }
    }

    /// Parses the URL without I/O; `mongodb+srv://` URLs, which need DNS, are
    /// refused.
    pub(crate) fn resolve_now(&self) -> Result<Resolved, Error> {
        let srv = || {
            self.config_error(
                "url",
                "a mongodb+srv:// url needs a DNS lookup; build the backend with MongoBackend::connect",
            )
        };
        let parsed = ConnectionString::parse(self.url.expose())
            .map_err(|e| self.config_error("url", e.to_string()))?;
        if matches!(parsed.host_info, mongodb::options::HostInfo::DnsRecord(_)) {
            return Err(srv());
        }
        // Without an SRV record to look up, parsing completes on its first poll.
        match ClientOptions::parse(parsed).into_future().now_or_never() {
            Some(parsed) => self.finish(parsed),
            None => Err(srv()),
        }
    }

    /// Parses the URL, resolving `mongodb+srv://` records within the connect
    /// timeout.
    pub(crate) async fn resolve(&self) -> Result<Resolved, Error> {
        let timeout = self.effective_connect_timeout();
        match tokio::time::timeout(timeout, ClientOptions::parse(self.url.expose())).await {
            Ok(parsed) => self.finish(parsed),
            Err(_) => Err(self.config_error(
                "url",
                format!("resolving the url took longer than {timeout:?}"),
            )),
        }
    }

    fn finish(&self, parsed: mongodb::error::Result<ClientOptions>) -> Result<Resolved, Error> {
        let mut main = parsed.map_err(|e| self.config_error("url", e.to_string()))?;
        let database: Arc<str> = self
            .database
            .clone()
            .or_else(|| main.default_database.clone())
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned())
            .into();
        validate_database(&database).map_err(|e| self.config_error("database", e.to_string()))?;
        main.max_pool_size = Some(self.pool.max_size);
        main.min_pool_size = Some(self.pool.min_idle.min(self.pool.max_size));
        main.max_idle_time = Some(self.pool.idle_timeout.unwrap_or(Duration::ZERO));
        main.connect_timeout = Some(self.effective_connect_timeout());
        main.server_selection_timeout = Some(self.effective_server_selection_timeout());
        main.heartbeat_freq = Some(self.heartbeat_interval);
        crate::tls::apply(&mut main, self.tls.as_ref());
        let direct_host = match self.topology {
            Topology::Direct => {
                if main.hosts.len() != 1 {
                    return Err(
                        self.config_error("url", "topology \"direct\" needs exactly one host")
                    );
                }
                main.direct_connection = Some(true);
                main.hosts.first().cloned()
            }
            Topology::ReplicaSet => {
                if main.direct_connection == Some(true) {
                    return Err(self.config_error(
                        "url",
                        "topology \"replica_set\" conflicts with directConnection=true",
                    ));
                }
                None
            }
        };
        let mut probe = main.clone();
        if main.app_name.is_none() {
            main.app_name = Some("switchyard".into());
        }
        probe.app_name = Some("switchyard-probe".into());
        // The probe has a small pool of its own, so a full checkout pool never
        // makes a live endpoint look dead.
        probe.max_pool_size = Some(2);
        probe.min_pool_size = Some(0);
        probe.server_monitoring_mode = Some(ServerMonitoringMode::Poll);
        Ok(Resolved {
            main,
            probe,
            database,
            direct_host,
        })
    }
}

switchyard_core::backend_builder! {
    /// A builder over [`MongoBackendConfig`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchyard_core::PoolSettings;
    /// use switchyard_mongodb::MongoBackendConfig;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), switchyard_core::Error> {
    /// // Nothing connects until the first checkout or probe.
    /// let backend = MongoBackendConfig::builder("mongo-1", "mongodb://127.0.0.1:1")
    ///     .pool(PoolSettings::default().with_max_size(8))
    ///     .database("app")
    ///     .operation_timeout(Duration::from_secs(5))
    ///     .build()?;
    /// # let _ = backend; Ok(()) }
    /// ```
    MongoBackendBuilder for MongoBackendConfig => MongoBackend;
    topology(topology: Topology) => topology = topology;
    database(database: impl Into<String>) => database = Some(database.into());
    tenant_field(field: impl Into<String>) => tenant_field = field.into();
    connect_timeout(t: Duration) => connect_timeout = Some(t);
    server_selection_timeout(t: Duration) => server_selection_timeout = Some(t);
    heartbeat_interval(t: Duration) => heartbeat_interval = t;
    operation_timeout(t: Duration) => operation_timeout = t;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_hide_the_password() {
        let c = MongoBackendConfig::new("m", "mongodb://app:hunter2@db:27017/app");
        assert!(c.validate("m").is_empty(), "{:?}", c.validate("m"));
        assert!(!format!("{c:?}").contains("hunter2"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
        let r = c.resolve_now().unwrap();
        assert_eq!(&*r.database, "app");
        assert_eq!(r.main.direct_connection, Some(true));
        assert_eq!(r.main.max_pool_size, Some(16));
        assert_eq!(
            r.main.server_selection_timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(r.probe.max_pool_size, Some(2));
        assert!(r.direct_host.is_some());
    }

    #[test]
    fn the_shared_database_defaults_sensibly() {
        let c = MongoBackendConfig::new("m", "mongodb://db:27017");
        assert_eq!(&*c.resolve_now().unwrap().database, DEFAULT_DATABASE);
        let c = MongoBackendConfig::builder("m", "mongodb://db:27017/fromurl")
            .database("explicit")
            .config();
        assert_eq!(&*c.resolve_now().unwrap().database, "explicit");
    }

    #[test]
    fn validation_reports_each_problem_without_secrets() {
        let mut c = MongoBackendConfig::new("m", "postgres://app:hunter2@db/app");
        c.tenant_field = "a.b".into();
        c.database = Some("../x".into());
        c.operation_timeout = Duration::ZERO;
        c.heartbeat_interval = Duration::from_millis(10);
        let problems: Vec<String> = c
            .validate("clusters.main")
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems.iter().all(|p| !p.contains("hunter2")));
        assert!(problems[0].starts_with("clusters.main.url: "));

        let c = MongoBackendConfig::new("m", "mongodb://app:hunter2@h1:1,h2:2/app");
        let problems = c.validate("m");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].to_string().contains("exactly one host"));
        let c = MongoBackendConfig::builder("m", "mongodb://h1:1,h2:2/?directConnection=true")
            .topology(Topology::ReplicaSet)
            .config();
        assert_eq!(c.validate("m").len(), 1);
        let c = MongoBackendConfig::new("m", "mongodb://app:hunter2@db:notaport/app");
        let problems = c.validate("m");
        assert_eq!(problems.len(), 1);
        assert!(!problems[0].to_string().contains("hunter2"));
    }

    #[test]
    fn srv_urls_need_the_async_constructor() {
        let c = MongoBackendConfig::builder("m", "mongodb+srv://cluster.example.com/app")
            .topology(Topology::ReplicaSet)
            .config();
        let err = c.resolve_now().unwrap_err();
        assert!(err.to_string().contains("MongoBackend::connect"), "{err}");
    }

    #[test]
    fn scrub_removes_raw_and_decoded_passwords() {
        let c = MongoBackendConfig::new("m", "mongodb://app:p%40ss@db/app");
        assert_eq!(c.scrub("x p@ss y p%40ss"), "x *** y ***");
        assert_eq!(SecretUrl::new("mongodb://db/app").password(), None);
    }

    #[test]
    fn durations_deserialize_from_human_strings() {
        let c: MongoBackendConfig = serde_json::from_str(
            r#"{"endpoint":"m","url":"mongodb://db","topology":"replica_set",
                "connect_timeout":"250ms","heartbeat_interval":"1s"}"#,
        )
        .unwrap();
        assert_eq!(c.topology, Topology::ReplicaSet);
        assert_eq!(c.effective_connect_timeout(), Duration::from_millis(250));
        assert_eq!(
            c.effective_server_selection_timeout(),
            Duration::from_secs(5)
        );
        assert!(serde_json::from_str::<MongoBackendConfig>(
            r#"{"endpoint":"m","url":"mongodb://db","bogus":1}"#
        )
        .is_err());
    }
}
