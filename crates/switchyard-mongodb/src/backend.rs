//! [`MongoBackend`]: the `switchyard_core::Backend` for one MongoDB endpoint
//! (or replica set).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mongodb::options::ClientOptions;
use mongodb::Client;
use switchyard_core::{
    Backend, EndpointId, Error, FairGate, Isolation, PoolStats, Probe, Recycle, Returned,
    TenantScope, TierPolicy,
};
use tokio::time::Instant;

use crate::config::{MongoBackendConfig, Resolved};
use crate::conn::{Confinement, HandleSettings, MongoConn};
use crate::probe::Prober;
use crate::stats::{bump, Counters, MongoStats};
use crate::tls::Handshake;

/// The MongoDB backend for one endpoint, or one replica set
/// ([`Topology`](crate::Topology)).
///
/// Owns a driver [`Client`] for checkouts and a second, small one for probes,
/// both created on first use, so building a backend does no I/O and never
/// fails or blocks on an unreachable endpoint. Checkouts are
/// [`MongoConn`] handles; at most `pool.max_size` are out at once, and
/// [`Backend::acquire`] waits for one up to its deadline.
pub struct MongoBackend {
    config: MongoBackendConfig,
    options: ClientOptions,
    client: OnceLock<Client>,
    prober: Prober,
    permits: Arc<FairGate>,
    counters: Arc<Counters>,
    settings: Arc<HandleSettings>,
}

/// Creates a driver client (which starts its monitoring tasks).
pub(crate) fn new_client(endpoint: &EndpointId, options: ClientOptions) -> Result<Client, Error> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::Config {
            path: endpoint.to_string(),
            message: "a MongoDB backend must be used inside a Tokio runtime".into(),
        });
    }
    Client::with_options(options).map_err(|e| Error::Config {
        path: endpoint.to_string(),
        message: format!("the driver refused the client options: {}", kind_only(&e)),
    })
}

/// The error's kind without the server response or labels, which cannot
/// contain the URL but are noise in a configuration message.
fn kind_only(e: &mongodb::error::Error) -> String {
    e.kind.to_string()
}

impl MongoBackend {
    /// Builds the backend for `config` without any I/O.
    ///
    /// Fails with [`Error::Config`] when the configuration is invalid, and for
    /// `mongodb+srv://` URLs, which need a DNS lookup: use
    /// [`MongoBackend::connect`] for those.
    pub fn new(config: MongoBackendConfig) -> Result<Self, Error> {
        Self::check(&config)?;
        let resolved = config.resolve_now()?;
        Self::from_resolved(config, resolved)
    }

    /// Builds the backend, resolving a `mongodb+srv://` URL's DNS records
    /// (within the connect timeout). Still opens no connection.
    pub async fn connect(config: MongoBackendConfig) -> Result<Self, Error> {
        Self::check(&config)?;
        let resolved = config.resolve().await?;
        Self::from_resolved(config, resolved)
    }

    fn check(config: &MongoBackendConfig) -> Result<(), Error> {
        match config.validate(config.endpoint.as_str()).into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    fn from_resolved(config: MongoBackendConfig, resolved: Resolved) -> Result<Self, Error> {
        let Resolved {
            mut main,
            probe,
            database,
            direct_host,
        } = resolved;
        let handshake = Handshake::new(&main, direct_host.as_ref(), config.endpoint.as_str())?;
        let counters = Arc::new(Counters::default());
        main.cmap_event_handler = Some(counters.handler());
        let settings = Arc::new(HandleSettings {
            endpoint: config.endpoint.clone(),
            database,
            tenant_field: Arc::from(config.tenant_field.as_str()),
            operation_timeout: config.operation_timeout,
        });
        tracing::debug!(endpoint = %config.endpoint, url = %config.url, "mongodb backend built");
        Ok(Self {
            permits: FairGate::for_pool(&config.pool),
            prober: Prober::new(probe, direct_host, handshake.map(Arc::new)),
            options: main,
            client: OnceLock::new(),
            counters,
            settings,
            config,
        })
    }

    /// The configuration the backend was built from.
    pub fn config(&self) -> &MongoBackendConfig {
        &self.config
    }

    /// The driver options of the checkouts' client.
    pub(crate) fn client_options(&self) -> &ClientOptions {
        &self.options
    }

    /// The shared database of unscoped, collection-prefix and row-level
    /// checkouts.
    pub fn database_name(&self) -> &str {
        &self.settings.database
    }

    /// The driver client behind the checkouts, e.g. as a baseline for
    /// benchmarks or for administration. Operations on it bypass the in-flight
    /// bound and every tenant rule.
    pub fn client(&self) -> Result<&Client, Error> {
        if let Some(client) = self.client.get() {
            return Ok(client);
        }
        let client = new_client(&self.config.endpoint, self.options.clone())?;
        Ok(self.client.get_or_init(|| client))
    }

    /// Handles, connections and pool clears since the backend was built.
    pub fn mongo_stats(&self) -> MongoStats {
        self.counters.snapshot(self.permits.stats().size)
    }

    /// Stops handing out checkouts and shuts both clients down, waiting for
    /// operations in progress. Checkouts after this fail with [`Error::Closed`].
    pub async fn close(&self) {
        self.permits.close();
        if let Some(client) = self.client.get() {
            client.clone().shutdown().await;
        }
        self.prober.shutdown().await;
    }

    fn confinement(&self, scope: &TenantScope) -> Result<Confinement, Error> {
        Confinement::for_scope(scope, &self.settings).map_err(|e| Error::Scope {
            endpoint: self.config.endpoint.clone(),
            tenant: scope.tenant().clone(),
            action: "apply",
            source: Box::new(e),
        })
    }
}

impl Backend for MongoBackend {
    type Connection = MongoConn;

    fn endpoint(&self) -> &EndpointId {
        &self.config.endpoint
    }

    /// Takes one of `max_size` permits, waiting until `deadline` at most.
    ///
    /// Nothing is sent to the server: the driver connects when the handle is
    /// first used. A scope whose target is not a usable name is refused here,
    /// before any wait. With TLS in direct mode, until a handshake has shown
    /// the server's certificate acceptable, one is made here first (see the
    /// `tls` module), so a refused certificate is [`Error::Tls`] at once.
    async fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<MongoConn, Error> {
        if let Some(scope) = scope {
            self.confinement(scope)?;
        }
        let permit = self
            .permits
            .acquire_for(&self.config.endpoint, scope, deadline)
            .await?;
        self.prober
            .check_certificate(&self.config.endpoint, deadline)
            .await?;
        let client = self.client()?.clone();
        bump(&self.counters.acquired);
        Ok(MongoConn::new(client, Arc::clone(&self.settings), permit))
    }

    /// Confines the handle to `scope`: a pure, local change (see
    /// [`inspect`](Backend::inspect)).
    async fn scope(&self, conn: &mut MongoConn, scope: &TenantScope) -> Result<(), Error> {
        conn.confinement = self.confinement(scope)?;
        Ok(())
    }

    /// Refuses a database tier whose template can render `admin`, `local`,
    /// `config` or the shared database of row and prefix tenants (compared
    /// ignoring case, as MongoDB refuses databases differing only in case).
    fn validate_tier(&self, tier: &str, policy: &TierPolicy) -> Result<(), Error> {
        if policy.isolation != Isolation::Database {
            return Ok(());
        }
        let shared = [&*self.settings.database];
        policy.refuse_reserved(
            tier,
            crate::names::RESERVED_DATABASES
                .iter()
                .copied()
                .chain(shared),
            true,
        )
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe, Error> {
        self.prober.probe(&self.config.endpoint, timeout).await
    }

    fn stats(&self) -> PoolStats {
        let (size, in_use) = self.counters.connections();
        PoolStats {
            size,
            idle: size.saturating_sub(in_use),
            max_size: self.config.pool.max_size,
            tenant_pools: 0,
        }
    }

    /// Always clean. Nothing needs undoing on the server: no MongoDB
    /// connection carries tenant state. Every command names its own database
    /// and collection, filters travel with each command, and the driver's
    /// implicit sessions hold only a transaction number and cluster time. So a
    /// connection that just served tenant A is safe for tenant B, and a
    /// cancelled operation (its future dropped mid-flight) cannot leave
    /// anything behind for the next user: the driver closes that connection.
    /// The tenant lives only in the handle, which is dropped.
    fn inspect(&self, _conn: &mut MongoConn) -> Returned {
        Returned::Clean
    }

    /// Drops the handle, which returns its permit. A discarded one is only
    /// counted: the driver already clears its pool for the server after a
    /// network error, and a handle has no connection of its own to close.
    fn release(&self, conn: MongoConn, recycle: Recycle) {
        if recycle == Recycle::Discard {
            bump(&self.counters.discarded);
        }
        drop(conn);
    }
}

impl fmt::Debug for MongoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoBackend")
            .field("endpoint", &self.config.endpoint)
            .field("url", &self.config.url)
            .field("topology", &self.config.topology)
            .field("database", &self.settings.database)
            .finish_non_exhaustive()
    }
}
