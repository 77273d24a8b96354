//! One router or backend of any engine this build includes.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{Backend, EndpointId, Error, PoolSettings, Probe, TenantRegistry};
use switchyard_postgres::{PgBackend, PgBackendConfig};
use switchyard_redis::{RedisBackend, RedisBackendConfig};
use switchyard_router::source::Member;
use switchyard_router::{Cluster, ClusterConfig, ClusterStatus, EndpointConfig, TopologySource};

use crate::engine_block::postgres_config;
use crate::error::ConfigError;
use crate::settings::{ClusterSettings, EndpointSettings};
use crate::topology::member_url;
use crate::Engine;

/// A running cluster of any engine built in.
///
/// MongoDB, ClickHouse and Elasticsearch variants exist with the cargo
/// features of the same names.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyCluster {
    /// A PostgreSQL cluster.
    Postgres(Cluster<PgBackend>),
    /// A Redis cluster.
    Redis(Cluster<RedisBackend>),
    /// A MongoDB cluster.
    #[cfg(feature = "mongodb")]
    Mongodb(Cluster<switchyard_mongodb::MongoBackend>),
    /// A ClickHouse cluster.
    #[cfg(feature = "clickhouse")]
    Clickhouse(Cluster<switchyard_clickhouse::ChBackend>),
    /// An Elasticsearch cluster.
    #[cfg(feature = "elasticsearch")]
    Elasticsearch(Cluster<switchyard_elasticsearch::EsBackend>),
}

/// One backend of any engine built in.
#[derive(Clone)]
pub(crate) enum AnyBackend {
    Postgres(Arc<PgBackend>),
    Redis(Arc<RedisBackend>),
    #[cfg(feature = "mongodb")]
    Mongodb(Arc<switchyard_mongodb::MongoBackend>),
    #[cfg(feature = "clickhouse")]
    Clickhouse(Arc<switchyard_clickhouse::ChBackend>),
    #[cfg(feature = "elasticsearch")]
    Elasticsearch(Arc<switchyard_elasticsearch::EsBackend>),
}

/// `$body` with `$c` bound to the cluster (or backend) of whatever engine.
macro_rules! each {
    ($ty:ident, $value:expr, $c:ident => $body:expr) => {
        match $value {
            $ty::Postgres($c) => $body,
            $ty::Redis($c) => $body,
            #[cfg(feature = "mongodb")]
            $ty::Mongodb($c) => $body,
            #[cfg(feature = "clickhouse")]
            $ty::Clickhouse($c) => $body,
            #[cfg(feature = "elasticsearch")]
            $ty::Elasticsearch($c) => $body,
        }
    };
}

/// `$body` with `$c` bound to the cluster and `$b` to a clone of the backend
/// `Arc`, when both are of the same engine; a config error otherwise.
macro_rules! paired {
    ($cluster:expr, $backend:expr, $c:ident, $b:ident => $body:expr) => {
        match ($cluster, $backend) {
            (AnyCluster::Postgres($c), AnyBackend::Postgres($b)) => {
                let $b = Arc::clone($b);
                $body
            }
            (AnyCluster::Redis($c), AnyBackend::Redis($b)) => {
                let $b = Arc::clone($b);
                $body
            }
            #[cfg(feature = "mongodb")]
            (AnyCluster::Mongodb($c), AnyBackend::Mongodb($b)) => {
                let $b = Arc::clone($b);
                $body
            }
            #[cfg(feature = "clickhouse")]
            (AnyCluster::Clickhouse($c), AnyBackend::Clickhouse($b)) => {
                let $b = Arc::clone($b);
                $body
            }
            #[cfg(feature = "elasticsearch")]
            (AnyCluster::Elasticsearch($c), AnyBackend::Elasticsearch($b)) => {
                let $b = Arc::clone($b);
                $body
            }
            #[allow(unreachable_patterns)]
            (c, _) => Err(Error::Config {
                path: format!("clusters.{}", c.name()),
                message: "endpoint of another engine".into(),
            }),
        }
    };
}

/// Builds the cluster variant for `$variant` from the backends of that variant.
macro_rules! cluster_of {
    ($variant:ident, $name:expr, $c:expr, $tenants:expr, $backends:expr) => {{
        let mut b = Cluster::builder($name)
            .engine($c.engine.as_str())
            .config($c.router.clone())
            .tenants($tenants);
        for (backend, cfg) in $backends {
            if let AnyBackend::$variant(x) = backend {
                b = b.endpoint(x, cfg);
            }
        }
        AnyCluster::$variant(b.build().map_err(|source| ConfigError::Build {
            cluster: $name.to_owned(),
            source,
        })?)
    }};
}

impl AnyCluster {
    /// The cluster's name.
    pub fn name(&self) -> &str {
        each!(AnyCluster, self, c => c.name())
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        match self {
            AnyCluster::Postgres(_) => Engine::Postgres,
            AnyCluster::Redis(_) => Engine::Redis,
            #[cfg(feature = "mongodb")]
            AnyCluster::Mongodb(_) => Engine::Mongodb,
            #[cfg(feature = "clickhouse")]
            AnyCluster::Clickhouse(_) => Engine::Clickhouse,
            #[cfg(feature = "elasticsearch")]
            AnyCluster::Elasticsearch(_) => Engine::Elasticsearch,
        }
    }

    /// A snapshot of every endpoint's state.
    pub fn status(&self) -> ClusterStatus {
        each!(AnyCluster, self, c => c.status())
    }

    pub(crate) fn build(
        name: &str,
        c: &ClusterSettings,
        tenants: TenantRegistry,
        backends: Vec<(AnyBackend, EndpointConfig)>,
    ) -> Result<Self, ConfigError> {
        Ok(match c.engine {
            Engine::Postgres => cluster_of!(Postgres, name, c, tenants, backends),
            Engine::Redis => cluster_of!(Redis, name, c, tenants, backends),
            #[cfg(feature = "mongodb")]
            Engine::Mongodb => cluster_of!(Mongodb, name, c, tenants, backends),
            #[cfg(feature = "clickhouse")]
            Engine::Clickhouse => cluster_of!(Clickhouse, name, c, tenants, backends),
            #[cfg(feature = "elasticsearch")]
            Engine::Elasticsearch => cluster_of!(Elasticsearch, name, c, tenants, backends),
            #[allow(unreachable_patterns)]
            other => return Err(not_built_in(name, other)),
        })
    }

    /// Follows the cluster's topology source: each member's backend is made
    /// from the member URL template with the member's host and port, and
    /// the cluster's pool settings.
    pub(crate) fn follow(&self, c: &ClusterSettings, source: Box<dyn TopologySource>) {
        let Some(template) = c.source.member_url().cloned() else {
            return;
        };
        let (engine, pool, cluster) = (c.engine, c.pool.clone(), self.name().to_owned());
        let postgres = c.postgres.clone();
        let (tls, tls_digest) = (c.member_tls.clone(), c.member_tls_digest);
        let make = move |m: &Member| -> Result<AnyBackend, Error> {
            let url = member_url(&template, m).map_err(|message| Error::Config {
                path: format!("clusters.{cluster}.member_url"),
                message,
            })?;
            let ep = EndpointSettings {
                name: m.name.to_string(),
                url,
                role: m.role,
                weight: 1,
                secret_files: Vec::new(),
                tls: tls.clone(),
                tls_digest,
            };
            AnyBackend::build(engine, &cluster, &pool, postgres.as_ref(), &ep).map_err(
                |e| match e {
                    ConfigError::Build { source, .. } => source,
                    other => Error::Config {
                        path: format!("clusters.{cluster}"),
                        message: other.to_string(),
                    },
                },
            )
        };
        macro_rules! follow_as {
            ($c:expr, $variant:ident) => {{
                $c.follow(source, move |m| match make(m)? {
                    AnyBackend::$variant(b) => Ok(b),
                    #[allow(unreachable_patterns)]
                    _ => Err(Error::Config {
                        path: "source".into(),
                        message: "backend of another engine".into(),
                    }),
                });
            }};
        }
        match self {
            AnyCluster::Postgres(c) => follow_as!(c, Postgres),
            AnyCluster::Redis(c) => follow_as!(c, Redis),
            #[cfg(feature = "mongodb")]
            AnyCluster::Mongodb(c) => follow_as!(c, Mongodb),
            #[cfg(feature = "clickhouse")]
            AnyCluster::Clickhouse(c) => follow_as!(c, Clickhouse),
            #[cfg(feature = "elasticsearch")]
            AnyCluster::Elasticsearch(c) => follow_as!(c, Elasticsearch),
        }
    }

    pub(crate) fn set_tenants(&self, tenants: TenantRegistry) -> Result<(), Error> {
        each!(AnyCluster, self, c => c.set_tenants(tenants))
    }

    pub(crate) fn set_config(&self, config: ClusterConfig) -> Result<(), Error> {
        each!(AnyCluster, self, c => c.set_config(config))
    }

    pub(crate) fn set_weight(&self, id: &EndpointId, weight: u32) -> Result<(), Error> {
        each!(AnyCluster, self, c => c.set_weight(id, weight))
    }

    pub(crate) fn remove_endpoint(&self, id: &EndpointId) -> bool {
        each!(AnyCluster, self, c => c.remove_endpoint(id))
    }

    pub(crate) fn close(&self) {
        each!(AnyCluster, self, c => c.close())
    }

    pub(crate) fn add_endpoint(
        &self,
        backend: &AnyBackend,
        config: EndpointConfig,
    ) -> Result<(), Error> {
        paired!(self, backend, c, b => c.add_endpoint(b, config))
    }

    pub(crate) fn replace_endpoint(
        &self,
        backend: &AnyBackend,
        config: EndpointConfig,
    ) -> Result<(), Error> {
        paired!(self, backend, c, b => c.replace_endpoint(b, config))
    }

    pub(crate) fn replace_backend(&self, backend: &AnyBackend) -> Result<(), Error> {
        paired!(self, backend, c, b => c.replace_backend(b))
    }
}

fn not_built_in(cluster: &str, engine: Engine) -> ConfigError {
    ConfigError::EngineNotBuiltIn {
        cluster: cluster.to_owned(),
        engine: engine.as_str(),
    }
}

/// Builds the backend variant `$variant` of endpoint `$ep` from a `$config`
/// with the cluster's pool and the endpoint's TLS settings (PostgreSQL:
/// from the cluster's `postgres` block, see `engine_block`).
macro_rules! backend_of {
    ($variant:ident, $config:path, $backend:path, $ep:expr, $pool:expr, $cluster:expr) => {{
        let mut config = <$config>::new($ep.name.clone(), $ep.url.clone());
        config.pool = $pool.clone();
        config.tls = $ep.tls.clone();
        backend_of!($variant, $backend, config, $cluster)
    }};
    ($variant:ident, $backend:path, $config:expr, $cluster:expr) => {{
        let backend = <$backend>::new($config).map_err(|source| ConfigError::Build {
            cluster: $cluster.to_owned(),
            source,
        })?;
        AnyBackend::$variant(Arc::new(backend))
    }};
}

impl AnyBackend {
    /// Endpoint `ep`'s backend in cluster `cluster`, with the cluster's pool
    /// and, for PostgreSQL, its `postgres` block.
    pub(crate) fn build(
        engine: Engine,
        cluster: &str,
        pool: &PoolSettings,
        postgres: Option<&PgBackendConfig>,
        ep: &EndpointSettings,
    ) -> Result<Self, ConfigError> {
        Ok(match engine {
            Engine::Postgres => {
                let config = postgres_config(postgres, &ep.name, &ep.url, pool, ep.tls.as_ref());
                backend_of!(Postgres, PgBackend, config, cluster)
            }
            Engine::Redis => {
                backend_of!(Redis, RedisBackendConfig, RedisBackend, ep, pool, cluster)
            }
            #[cfg(feature = "mongodb")]
            Engine::Mongodb => {
                use switchyard_mongodb::{MongoBackend, MongoBackendConfig};
                backend_of!(Mongodb, MongoBackendConfig, MongoBackend, ep, pool, cluster)
            }
            #[cfg(feature = "clickhouse")]
            Engine::Clickhouse => {
                use switchyard_clickhouse::{ChBackend, ChBackendConfig};
                backend_of!(Clickhouse, ChBackendConfig, ChBackend, ep, pool, cluster)
            }
            #[cfg(feature = "elasticsearch")]
            Engine::Elasticsearch => {
                use switchyard_elasticsearch::{EsBackend, EsBackendConfig};
                backend_of!(Elasticsearch, EsBackendConfig, EsBackend, ep, pool, cluster)
            }
            #[allow(unreachable_patterns)]
            other => return Err(not_built_in(cluster, other)),
        })
    }

    pub(crate) async fn probe(&self, timeout: Duration) -> Result<Probe, Error> {
        each!(AnyBackend, self, b => b.probe(timeout).await)
    }
}

/// An error and its sources, joined with `: `.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
