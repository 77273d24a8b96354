//! Configuration of one PostgreSQL endpoint: a plain `Deserialize` struct with
//! documented defaults, plus a thin builder.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;
use switchyard_core::{EndpointId, Error, PoolSettings, SecretUrl, TlsSettings, Transport};

use crate::slots::HandOff;
use crate::PgBackend;

/// Default [`PgBackendConfig::max_tenant_pools`].
pub const DEFAULT_MAX_TENANT_POOLS: usize = 64;
/// Default [`PgBackendConfig::tenant_pool_max_size`].
pub const DEFAULT_TENANT_POOL_MAX_SIZE: u32 = 4;
/// Default [`PgBackendConfig::tenant_pool_idle_timeout`].
pub const DEFAULT_TENANT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default [`PgBackendConfig::reset_timeout`].
pub const DEFAULT_RESET_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything a [`PgBackend`](crate::PgBackend) needs for one endpoint.
///
/// The URL keeps its password out of `Debug` and `Display` (see [`SecretUrl`]).
///
/// ```
/// use switchyard_postgres::PgBackendConfig;
///
/// let config: PgBackendConfig = serde_json::from_str(r#"{
///     "endpoint": "pg-primary",
///     "url": "postgres://app:secret@db:5432/app",
///     "pool": { "max_size": 8, "acquire_timeout": "2s", "linger": "500us" },
///     "tenant_pool_idle_timeout": "1m",
///     "affinity": { "max_bypass": 2 }
/// }"#).unwrap();
/// assert_eq!(config.max_tenant_pools, 64);
/// assert_eq!(config.pool.linger, std::time::Duration::from_micros(500));
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgBackendConfig {
    /// The endpoint's name in errors, logs and metrics.
    pub endpoint: EndpointId,
    /// `postgres://user:password@host:port/database?...`, as sqlx parses it.
    /// Serializes redacted, so a serialized config never carries the password.
    pub url: SecretUrl,
    /// The endpoint's shared pool (unscoped, schema and row checkouts).
    #[serde(default)]
    pub pool: PoolSettings,
    /// Most per-tenant pools open at once for database isolation (default 64).
    /// At the cap, the least recently used idle one is closed to make room.
    #[serde(default = "default_max_tenant_pools")]
    pub max_tenant_pools: usize,
    /// Most connections in each per-tenant pool (default 4).
    #[serde(default = "default_tenant_pool_max_size")]
    pub tenant_pool_max_size: u32,
    /// A per-tenant pool unused this long is closed (default 5min).
    #[serde(default = "default_tenant_pool_idle_timeout", with = "humantime_serde")]
    pub tenant_pool_idle_timeout: Duration,
    /// Longest a returned connection may take to be checked and reset before it
    /// is closed instead (default 2s). A checkout dropped in the middle of a
    /// long query runs into this.
    #[serde(default = "default_reset_timeout", with = "humantime_serde")]
    pub reset_timeout: Duration,
    /// Tenant affinity (on by default).
    #[serde(default)]
    pub affinity: AffinitySettings,
    /// Privilege-enforced isolation (default off): schema- and row-scoped
    /// checkouts also run as the tenant's own role (named like the scope's
    /// target), so the server refuses another tenant's schema or rows; see
    /// [`provision_tenant_role`](crate::provision_tenant_role). Affinity is
    /// off in this mode.
    #[serde(default)]
    pub tenant_roles: bool,
    /// TLS trust and client certificate. With it, connections verify the
    /// server (`sslmode=verify-full`) unless it says `insecure_skip_verify`;
    /// without it, the URL's `sslmode` decides (see the TLS table in the
    /// README's engine section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

/// Tenant affinity: a connection remembers the owner its session last served
/// (a tenant, or none), and a checkout by the same owner gets it back without
/// a reset or a new scope.
///
/// On by default: the same owner's checkout sends a one-statement check
/// instead of the complete reset and scope, and it costs nothing in safety,
/// because every used connection is checked (outside a transaction block,
/// still carrying exactly its owner's scope) before its owner gets it again,
/// and goes to a different owner only after the complete reset. With
/// [`check`](Self::check) off, the owner's own connection comes back with no
/// round trip at all (see there for what that gives up).
/// Under load, a returned connection goes to the oldest waiting checkout of
/// its own owner while that tenant is fewer than
/// [`max_bypass`](Self::max_bypass) grants ahead of the tenant whose turn it
/// is (waiting tenants take turns: core's
/// [`FairQueue::pop_ahead`](switchyard_core::FairQueue::pop_ahead); within a
/// FIFO tier, the checkout first in line is passed over at most `max_bypass`
/// times), and an owner with nobody waiting keeps its returned connection
/// for the pool's [`linger`](PoolSettings::linger). Off,
/// every checkout of a used connection resets it completely, even for the
/// owner it last served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AffinitySettings {
    /// Whether a connection may go back to its last owner unreset (default true).
    pub enabled: bool,
    /// Most grants a tenant served by its own returned connections may run
    /// ahead of the waiting tenant whose turn it is (counted per unit of
    /// tier weight since each started waiting), and most times a FIFO tier's
    /// first checkout in line may be passed over (default 4; 0 serves
    /// waiters strictly in turn).
    pub max_bypass: u32,
    /// Whether a connection handed back to the owner it last served is
    /// checked first, in one round trip (default true). Off, it is handed
    /// back with none, as sqlx's own `PgPool` hands back a connection with
    /// `test_before_acquire(false)`; what the owner's own SQL left on the
    /// session then stays for the owner's next checkout:
    /// - a transaction block opened with raw `BEGIN` and not ended: the
    ///   next checkout's statements run inside it, and commit or roll back
    ///   with it;
    /// - a `search_path` or row setting the owner's SQL changed;
    /// - a connection the server dropped, found at the first query instead.
    ///
    /// Nothing changes between owners: another owner's checkout still gets
    /// the complete reset and the transaction check, a connection sqlx still
    /// has work queued on (a dropped `Transaction`) is still checked on its
    /// return, one left idle is still checked by the sweeper, and sessions
    /// under [`tenant_roles`](PgBackendConfig::tenant_roles) are always
    /// checked.
    pub check: bool,
}

impl Default for AffinitySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bypass: 4,
            check: true,
        }
    }
}

impl AffinitySettings {
    /// Affinity switched off.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }
}

fn default_max_tenant_pools() -> usize {
    DEFAULT_MAX_TENANT_POOLS
}
fn default_tenant_pool_max_size() -> u32 {
    DEFAULT_TENANT_POOL_MAX_SIZE
}
fn default_tenant_pool_idle_timeout() -> Duration {
    DEFAULT_TENANT_POOL_IDLE_TIMEOUT
}
fn default_reset_timeout() -> Duration {
    DEFAULT_RESET_TIMEOUT
}

impl PgBackendConfig {
    /// A configuration with every default, for `url`.
    pub fn new(endpoint: impl Into<Arc<str>>, url: impl Into<SecretUrl>) -> Self {
        Self {
            endpoint: EndpointId::new(endpoint),
            url: url.into(),
            pool: PoolSettings::default(),
            max_tenant_pools: DEFAULT_MAX_TENANT_POOLS,
            tenant_pool_max_size: DEFAULT_TENANT_POOL_MAX_SIZE,
            tenant_pool_idle_timeout: DEFAULT_TENANT_POOL_IDLE_TIMEOUT,
            reset_timeout: DEFAULT_RESET_TIMEOUT,
            affinity: AffinitySettings::default(),
            tenant_roles: false,
            tls: None,
        }
    }

    /// Every problem with this configuration, each as an [`Error::Config`] under `path`.
    pub fn validate(&self, path: &str) -> Vec<Error> {
        let mut problems = self.pool.validate(&format!("{path}.pool"));
        let mut tls_problem = None;
        let mut bad = |field: &str, message: String| {
            problems.push(Error::Config {
                path: format!("{path}.{field}"),
                message,
            })
        };
        match self.url.scheme().as_deref() {
            Some("postgres" | "postgresql") => match self.parsed_options() {
                Ok(options) => {
                    tls_problem =
                        crate::tls::apply(options, self.url.expose(), self.tls.as_ref(), path)
                            .err();
                }
                Err(e) => bad("url", format!("{} is not a valid url: {e}", self.url)),
            },
            _ => bad(
                "url",
                format!("{} must start with postgres:// or postgresql://", self.url),
            ),
        }
        if self.max_tenant_pools == 0 {
            bad("max_tenant_pools", "must be at least 1".into());
        }
        if self.tenant_pool_max_size == 0 {
            bad("tenant_pool_max_size", "must be at least 1".into());
        }
        if self.tenant_pool_idle_timeout.is_zero() {
            bad(
                "tenant_pool_idle_timeout",
                "must be greater than zero".into(),
            );
        }
        if self.reset_timeout.is_zero() {
            bad("reset_timeout", "must be greater than zero".into());
        }
        problems.extend(tls_problem);
        problems
    }

    /// The URL parsed by sqlx, with the TLS settings applied (their files
    /// read now). Errors are [`Error::Config`], scrubbed of the password.
    pub(crate) fn connect_options(&self) -> Result<PgConnectOptions, Error> {
        let path = self.endpoint.as_str();
        let options = self.parsed_options().map_err(|message| Error::Config {
            path: format!("{path}.url"),
            message,
        })?;
        crate::tls::apply(options, self.url.expose(), self.tls.as_ref(), path)
    }

    /// How this endpoint's connections are protected, as configured (no I/O;
    /// an unreadable TLS file shows as what the settings ask for).
    pub fn transport(&self) -> Transport {
        let Ok(options) = self.parsed_options() else {
            return Transport::Plaintext;
        };
        match &self.tls {
            Some(tls) if tls.insecure_skip_verify => Transport::Unverified,
            Some(_) => Transport::Verified,
            None => crate::tls::transport(&options),
        }
    }

    /// The URL parsed by sqlx; the error text is scrubbed of the password.
    fn parsed_options(&self) -> Result<PgConnectOptions, String> {
        PgConnectOptions::from_str(self.url.expose()).map_err(|e| self.scrub(&e.to_string()))
    }

    /// The databases a database-isolated tenant must never be given: the
    /// URL's own (shared by every unscoped, schema and row checkout; the user
    /// name when the URL names none), the maintenance database and the
    /// templates.
    pub(crate) fn reserved_databases(&self) -> Vec<String> {
        let mut reserved: Vec<String> = ["postgres", "template0", "template1"]
            .map(str::to_owned)
            .into();
        if let Ok(options) = self.connect_options() {
            let shared = options
                .get_database()
                .unwrap_or_else(|| options.get_username());
            reserved.push(shared.to_owned());
        }
        reserved
    }

    /// `text` with anything secret from the URL replaced by `***`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        self.url.scrub(text)
    }

    /// How returned connections are handed on, the bypass bound and the
    /// pool's linger: strict turns and no lingering without affinity.
    pub(crate) fn handoff(&self) -> HandOff {
        if self.affinity.enabled && !self.tenant_roles {
            HandOff {
                max_bypass: self.affinity.max_bypass,
                linger: self.pool.linger,
            }
        } else {
            HandOff::default()
        }
    }

    /// How long an idle tenant-database connection is kept.
    pub(crate) fn tenant_idle_timeout(&self) -> Duration {
        self.pool
            .idle_timeout
            .map_or(self.tenant_pool_idle_timeout, |t| {
                t.min(self.tenant_pool_idle_timeout)
            })
    }
}

switchyard_core::backend_builder! {
    /// A builder over [`PgBackendConfig`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), switchyard_core::Error> {
    /// use std::time::Duration;
    /// use switchyard_core::PoolSettings;
    /// use switchyard_postgres::PgBackendConfig;
    ///
    /// let backend = PgBackendConfig::builder("pg-1", "postgres://app@127.0.0.1:5432/app")
    ///     .pool(PoolSettings::default().with_max_size(8))
    ///     .max_tenant_pools(16)
    ///     .tenant_pool_idle_timeout(Duration::from_secs(60))
    ///     .build()?;
    /// # let _ = backend; Ok(()) }
    /// ```
    PgBackendBuilder for PgBackendConfig => PgBackend;
    max_tenant_pools(n: usize) => max_tenant_pools = n;
    tenant_pool_max_size(n: u32) => tenant_pool_max_size = n;
    tenant_pool_idle_timeout(t: Duration) => tenant_pool_idle_timeout = t;
    reset_timeout(t: Duration) => reset_timeout = t;
    tenant_roles(on: bool) => tenant_roles = on;
    affinity(affinity: AffinitySettings) => affinity = affinity;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_hide_the_password() {
        let c = PgBackendConfig::new("pg", "postgres://app:hunter2@db:5432/app");
        assert!(c.validate("pg").is_empty());
        assert!(!format!("{c:?}").contains("hunter2"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
    }

    #[test]
    fn validation_reports_each_problem_without_secrets() {
        let mut c = PgBackendConfig::new("pg", "mysql://app:hunter2@db/app");
        c.max_tenant_pools = 0;
        c.reset_timeout = Duration::ZERO;
        let problems: Vec<String> = c
            .validate("clusters.main")
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems.iter().all(|p| !p.contains("hunter2")));
        assert!(problems[0].starts_with("clusters.main.url: "));

        let c = PgBackendConfig::new("pg", "postgres://app:hunter2@db:notaport/app");
        let problems = c.validate("pg");
        assert_eq!(problems.len(), 1);
        assert!(!problems[0].to_string().contains("hunter2"));
    }

    #[test]
    fn scrub_removes_raw_and_decoded_passwords() {
        let c = PgBackendConfig::new("pg", "postgres://app:p%40ss@db/app");
        assert_eq!(c.scrub("x p@ss y p%40ss"), "x *** y ***");
        assert_eq!(SecretUrl::new("postgres://db/app").password(), None);
    }

    #[test]
    fn no_affinity_means_no_bypass_and_no_linger() {
        let mut c = PgBackendConfig::new("pg", "postgres://db/app");
        assert_eq!(c.handoff().max_bypass, 4);
        assert_eq!(c.handoff().linger, switchyard_core::DEFAULT_LINGER);
        c.affinity = AffinitySettings::disabled();
        assert_eq!(c.handoff().max_bypass, 0);
        assert!(c.handoff().linger.is_zero());
    }

    /// The same owner's check is on unless asked off; a partial `affinity`
    /// section keeps the other defaults.
    #[test]
    fn the_same_owner_check_is_on_by_default() {
        let on: AffinitySettings = serde_json::from_str("{}").unwrap();
        assert!(on.check);
        let off: AffinitySettings = serde_json::from_str(r#"{ "check": false }"#).unwrap();
        assert!(!off.check && off.enabled);
        assert_eq!(off.max_bypass, 4);
    }
}
