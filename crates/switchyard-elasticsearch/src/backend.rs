//! [`EsBackend`]: the [`Backend`] for one Elasticsearch node.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use elasticsearch::cluster::ClusterHealthParts;
use elasticsearch::http::headers::{HeaderValue, CONNECTION};
use elasticsearch::http::response::Response;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::{IndicesExistsAliasParts, IndicesExistsParts};
use elasticsearch::Elasticsearch;
use serde_json::Value;
use switchyard_core::{
    Backend, BackendErrorKind, EndpointId, Error, FairGate, HttpUrl, Isolation, PoolStats, Probe,
    Recycle, Returned, Role, TenantId, TenantScope, TierPolicy,
};
use tokio::time::Instant;

use crate::config::EsBackendConfig;
use crate::connection::{EsConnection, Target};
use crate::error::{classify, classify_status, EsError};
use crate::naming::{index_name, IndexNaming};
use switchyard_core::provision::ProvisionCache;

/// What the backend and its handles share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) endpoint: EndpointId,
    pub(crate) client: Elasticsearch,
    /// Sends `Connection: close`, so every probe opens a fresh connection.
    probe_client: Elasticsearch,
    pub(crate) tenant_field: Arc<str>,
    pub(crate) naming: IndexNaming,
    pub(crate) request_timeout: Duration,
    pub(crate) provisioned: ProvisionCache,
    permits: Arc<FairGate>,
    acquire_timeout: Duration,
}

/// Reads a response's status and JSON body (`Null` when empty; a non-JSON
/// body becomes a string).
async fn read(response: Response) -> Result<(u16, Value), elasticsearch::Error> {
    let status = response.status_code().as_u16();
    let bytes = response.bytes().await?;
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, body))
}

impl Shared {
    /// Wraps a transport error.
    pub(crate) fn transport_error(
        &self,
        tenant: Option<&TenantId>,
        error: elasticsearch::Error,
    ) -> Error {
        Error::connect(
            &self.endpoint,
            tenant,
            classify(&error),
            EsError::Transport(error),
        )
    }

    /// Wraps a crate error found before any I/O.
    pub(crate) fn rejected(&self, tenant: Option<&TenantId>, error: EsError) -> Error {
        Error::backend(&self.endpoint, tenant, BackendErrorKind::Rejected, error)
    }

    /// Sends one request within the request timeout and reads its answer.
    pub(crate) async fn call(
        &self,
        tenant: Option<&TenantId>,
        request: impl Future<Output = Result<Response, elasticsearch::Error>>,
    ) -> Result<(u16, Value), Error> {
        let work = async { read(request.await?).await };
        match tokio::time::timeout(self.request_timeout, work).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(self.transport_error(tenant, e)),
            Err(_) => Err(Error::backend(
                &self.endpoint,
                tenant,
                BackendErrorKind::Io,
                EsError::RequestTimeout(self.request_timeout),
            )),
        }
    }

    /// The error for a non-success status. A missing index or alias behind a
    /// scoped handle is [`Error::TenantNotProvisioned`] (and forgotten by the
    /// provisioning cache).
    pub(crate) fn status_error(&self, target: Option<&Target>, status: u16, body: &Value) -> Error {
        let error = EsError::from_body(status, body);
        if let Some(target) = target {
            if status == 404 && error.error_type() == Some("index_not_found_exception") {
                self.provisioned.forget(&target.cache_key());
                return Error::TenantNotProvisioned {
                    endpoint: self.endpoint.clone(),
                    tenant: target.tenant().clone(),
                    what: target.kind(),
                    name: target.name().to_owned(),
                };
            }
        }
        Error::backend(
            &self.endpoint,
            target.map(Target::tenant),
            classify_status(status),
            error,
        )
    }
}

/// The Elasticsearch [`Backend`] for one node: one transport (reqwest's
/// keep-alive pool inside, a single-node connection pool) and a bound on
/// requests in flight.
///
/// A connection is an [`EsConnection`]: a permit plus a handle confined to
/// the tenant's index or filtered alias. Nothing tenant-specific lives on a
/// socket, so returning one is dropping it.
///
/// The role is always [`Role::Standalone`]: an Elasticsearch cluster routes
/// reads and writes to the right shards internally, so every node takes both.
#[derive(Debug)]
pub struct EsBackend {
    shared: Arc<Shared>,
}

impl EsBackend {
    /// Builds the backend. Nothing is sent until the first checkout or probe.
    pub fn new(config: EsBackendConfig) -> Result<Self, Error> {
        if let Some(problem) = config.validate(config.endpoint.as_str()).into_iter().next() {
            return Err(problem);
        }
        let config_error = |message: String| Error::Config {
            path: format!("{}.url", config.endpoint),
            message,
        };
        let connect = HttpUrl::parse(&config.url).map_err(config_error)?;
        let transport = |close: bool| {
            let builder = TransportBuilder::new(SingleNodeConnectionPool::new(connect.url.clone()))
                .timeout(config.request_timeout);
            let mut builder = crate::tls::apply(
                builder,
                &connect,
                config.tls.as_ref(),
                config.endpoint.as_str(),
            )?;
            if close {
                builder = builder.header(CONNECTION, HeaderValue::from_static("close"));
            }
            builder
                .build()
                .map_err(|e| config_error(format!("cannot build the transport: {e}")))
        };
        let client = Elasticsearch::new(transport(false)?);
        // Probes never reuse a kept-alive socket: one left over from before a
        // crash would fail as a broken connection rather than a refused one,
        // and a probe is meant to find out whether a new connection works.
        let probe_client = Elasticsearch::new(transport(true)?);
        Ok(Self {
            shared: Arc::new(Shared {
                endpoint: config.endpoint.clone(),
                client,
                probe_client,
                tenant_field: Arc::from(config.tenant_field.as_str()),
                naming: config.index_naming,
                request_timeout: config.request_timeout,
                provisioned: ProvisionCache::new(config.provision_cache_ttl),
                permits: FairGate::for_pool(&config.pool),
                acquire_timeout: config.pool.acquire_timeout,
            }),
        })
    }

    /// Starts a builder; see [`EsBackendConfig::builder`].
    pub fn builder(
        endpoint: impl Into<Arc<str>>,
        url: impl Into<switchyard_core::SecretUrl>,
    ) -> crate::EsBackendBuilder {
        EsBackendConfig::builder(endpoint, url)
    }

    /// The document field that carries the tenant in shared indices.
    pub fn tenant_field(&self) -> &str {
        &self.shared.tenant_field
    }

    /// The upper bound on each request a handle sends.
    pub fn request_timeout(&self) -> Duration {
        self.shared.request_timeout
    }

    /// Forgets that `scope`'s index or alias exists, so the next checkout
    /// asks the node again (call it after deleting one).
    pub fn forget_provisioned(&self, scope: &TenantScope) {
        if let Ok(name) = index_name(scope.target(), self.shared.naming) {
            for kind in ["index", "alias"] {
                self.shared.provisioned.forget(&format!("{kind}:{name}"));
            }
        }
    }

    /// The index or alias name `scope` maps to under this backend's naming.
    pub fn target_name(&self, scope: &TenantScope) -> Result<String, Error> {
        index_name(scope.target(), self.shared.naming)
            .map_err(|e| self.shared.rejected(Some(scope.tenant()), e))
    }

    /// Fails with [`Error::TenantNotProvisioned`] unless the target exists; a
    /// positive answer is cached for `provision_cache_ttl`.
    async fn check_exists(&self, target: &Target) -> Result<(), Error> {
        let shared = &self.shared;
        let key = target.cache_key();
        if shared.provisioned.is_fresh(&key) {
            return Ok(());
        }
        let names = [target.name()];
        let indices = shared.client.indices();
        let tenant = Some(target.tenant());
        let (status, body) = match target {
            Target::Index { .. } => {
                let request = indices.exists(IndicesExistsParts::Index(&names)).send();
                shared.call(tenant, request).await?
            }
            Target::Alias { .. } => {
                let request = indices
                    .exists_alias(IndicesExistsAliasParts::Name(&names))
                    .send();
                shared.call(tenant, request).await?
            }
        };
        match status {
            200 => {
                shared.provisioned.mark(&key);
                Ok(())
            }
            404 => Err(Error::TenantNotProvisioned {
                endpoint: shared.endpoint.clone(),
                tenant: target.tenant().clone(),
                what: target.kind(),
                name: target.name().to_owned(),
            }),
            _ => Err(shared.status_error(None, status, &body)),
        }
    }
}

impl Backend for EsBackend {
    type Connection = EsConnection;

    fn endpoint(&self) -> &EndpointId {
        &self.shared.endpoint
    }

    async fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<EsConnection, Error> {
        let shared = &self.shared;
        let deadline = deadline.min(Instant::now() + shared.acquire_timeout);
        let permit = shared
            .permits
            .acquire_for(&shared.endpoint, scope, deadline)
            .await?;
        Ok(EsConnection::new(Arc::clone(shared), permit))
    }

    async fn scope(&self, conn: &mut EsConnection, scope: &TenantScope) -> Result<(), Error> {
        conn.reset();
        // The name is checked before anything is sent.
        let name: Arc<str> = Arc::from(self.target_name(scope)?);
        let tenant = scope.tenant().clone();
        let target = match scope.isolation() {
            // Elasticsearch has no schemas: both mean an index of the tenant's own.
            Isolation::Database | Isolation::Schema => Target::Index {
                tenant,
                index: name,
            },
            Isolation::Row => Target::Alias {
                tenant,
                alias: name,
                field: Arc::clone(&self.shared.tenant_field),
            },
        };
        self.check_exists(&target).await?;
        conn.set_target(target);
        Ok(())
    }

    /// Refuses a tier whose template can render a name Elasticsearch
    /// reserves: with no fixed prefix, tenant `_all` names every index and
    /// tenant `Security` (encoded `.security`) a system index; a prefix
    /// starting with `_`, `-` or an uppercase letter does the same for every
    /// tenant.
    fn validate_tier(&self, tier: &str, policy: &TierPolicy) -> Result<(), Error> {
        policy.refuse_reserved(tier, ["_all", "-all", "Security"], false)?;
        let sample = TenantId::new("a").map_err(Error::from)?;
        if let Some(rendered) = policy.name_template.render(&sample) {
            index_name(&rendered, self.shared.naming).map_err(|e| Error::Config {
                path: format!("tiers.{tier}.name_template"),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe, Error> {
        let shared = &self.shared;
        let started = Instant::now();
        let work = async {
            let cluster = shared.probe_client.cluster();
            let health = cluster.health(ClusterHealthParts::None).send();
            let info = shared.probe_client.info().send();
            let (health, info) = tokio::join!(health, info);
            let (health, info) = (read(health?).await?, read(info?).await?);
            Ok::<_, elasticsearch::Error>((health, info))
        };
        let ((h_status, health), (i_status, info)) = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| Error::ProbeTimeout {
                endpoint: shared.endpoint.clone(),
                elapsed: started.elapsed(),
            })?
            .map_err(|e| shared.transport_error(None, e))?;
        let rtt = started.elapsed();
        for (status, body) in [(h_status, &health), (i_status, &info)] {
            if !(200..300).contains(&status) {
                return Err(shared.status_error(None, status, body));
            }
        }
        match health["status"].as_str() {
            Some("green" | "yellow") => {}
            Some("red") => {
                return Err(Error::backend(
                    &shared.endpoint,
                    None,
                    BackendErrorKind::Io,
                    EsError::ClusterRed {
                        cluster: health["cluster_name"].as_str().unwrap_or("?").to_owned(),
                        unassigned: health["unassigned_shards"].as_u64().unwrap_or(0),
                    },
                ))
            }
            _ => {
                return Err(Error::backend(
                    &shared.endpoint,
                    None,
                    BackendErrorKind::Io,
                    EsError::UnexpectedResponse(format!(
                        "cluster health without a status: {}",
                        health.to_string().chars().take(200).collect::<String>()
                    )),
                ))
            }
        }
        let mut probe = Probe::new(Role::Standalone, rtt);
        probe.version = info["version"]["number"].as_str().map(str::to_owned);
        Ok(probe)
    }

    fn stats(&self) -> PoolStats {
        self.shared.permits.stats()
    }

    /// Always clean: the scope lives only in the handle, so there is nothing
    /// to undo on the server and no task to spawn.
    fn inspect(&self, _conn: &mut EsConnection) -> Returned {
        Returned::Clean
    }

    /// Dropping the handle is the whole return path, kept or discarded alike.
    fn release(&self, conn: EsConnection, _recycle: Recycle) {
        drop(conn);
    }
}
