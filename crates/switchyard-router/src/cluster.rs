//! The cluster's face: [`Cluster`], what users hold, and its builder. The
//! state every clone shares, and the machinery that changes it, sit below in
//! `state`, `change`, `apply` and the prober; the files that add methods to
//! [`Cluster`] (`checkout`, `live`, `follow`, `status`, ...) stand above.

use std::fmt;
use std::sync::Arc;

use switchyard_core::{Backend, EndpointId, Error, TenantRegistry};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::change::EndpointChange;
use crate::config::{join_problems, ClusterConfig, EndpointConfig};
use crate::state::{tier_problems, ClusterState};

/// A cluster of endpoints of one engine, and the router in front of them.
///
/// Cheap to clone: clones share everything. Background tasks (one prober per
/// endpoint, and a warmer per endpoint while warming is on) run until the last
/// clone is dropped or [`close`](Self::close) is called. Checkouts still held
/// then keep their endpoint alive and are returned normally.
pub struct Cluster<B: Backend> {
    pub(crate) shared: Arc<ClusterState<B>>,
    _owner: Arc<DropGuard>,
}

impl<B: Backend> Clone for Cluster<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            _owner: Arc::clone(&self._owner),
        }
    }
}

impl<B: Backend> fmt::Debug for Cluster<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.shared.name)
            .field("endpoints", &self.shared.snapshot.load().endpoints)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Cluster`]: configuration, tenants and the initial endpoints.
pub struct ClusterBuilder<B: Backend> {
    name: String,
    engine: &'static str,
    config: ClusterConfig,
    tenants: TenantRegistry,
    endpoints: Vec<(Arc<B>, EndpointConfig)>,
}

impl<B: Backend> fmt::Debug for ClusterBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("name", &self.name)
            .field("engine", &self.engine)
            .field("endpoints", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> ClusterBuilder<B> {
    /// Replaces the configuration (default: [`ClusterConfig::default`]).
    pub fn config(mut self, config: ClusterConfig) -> Self {
        self.config = config;
        self
    }

    /// Names the engine in spans and metric labels (default `"unknown"`).
    pub fn engine(mut self, engine: &'static str) -> Self {
        self.engine = engine;
        self
    }

    /// Sets the tenant registry (default: empty, so every tenant is unknown).
    pub fn tenants(mut self, tenants: TenantRegistry) -> Self {
        self.tenants = tenants;
        self
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, backend: Arc<B>, config: EndpointConfig) -> Self {
        self.endpoints.push((backend, config));
        self
    }

    /// Validates everything and starts the cluster's tasks.
    ///
    /// Fails with [`Error::Config`] listing every problem, or when called
    /// outside a tokio runtime.
    pub fn build(self) -> Result<Cluster<B>, Error> {
        let path = format!("clusters.{}", self.name);
        let mut problems = self.config.validate(&path);
        for (i, (backend, ep)) in self.endpoints.iter().enumerate() {
            problems.extend(ep.validate(&format!("{path}.endpoints[{i}]")));
            let dup = self.endpoints[..i]
                .iter()
                .any(|(b, _)| b.endpoint() == backend.endpoint());
            if dup {
                problems.push(Error::Config {
                    path: format!("{path}.endpoints[{i}]"),
                    message: format!("duplicate endpoint {}", backend.endpoint()),
                });
            }
        }
        if let Err(e) = self.tenants.validate() {
            problems.push(e);
        }
        for (backend, _) in &self.endpoints {
            problems.extend(tier_problems(&**backend, &self.tenants));
        }
        join_problems(&path, problems)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::Config {
            path: path.clone(),
            message: "a cluster must be built inside a tokio runtime".into(),
        })?;
        let cancel = CancellationToken::new();
        let shared = Arc::new(ClusterState::new(
            self.name.into(),
            self.engine,
            self.config,
            self.tenants,
            runtime,
            cancel.clone(),
        ));
        let changes = self
            .endpoints
            .into_iter()
            .map(|(backend, ep)| EndpointChange::Insert(backend, ep));
        shared
            .change_endpoints(changes)
            .into_iter()
            .collect::<Result<(), Error>>()?;
        Ok(Cluster {
            _owner: Arc::new(cancel.drop_guard()),
            shared,
        })
    }
}

impl<B: Backend> Cluster<B> {
    /// Starts building a cluster called `name` (used in errors, logs and metrics).
    pub fn builder(name: impl Into<String>) -> ClusterBuilder<B> {
        ClusterBuilder {
            name: name.into(),
            engine: "unknown",
            config: ClusterConfig::default(),
            tenants: TenantRegistry::new(),
            endpoints: Vec::new(),
        }
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configuration in force (as built, or as last set with
    /// [`set_config`](Self::set_config) or [`set_strategy`](Self::set_strategy)).
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.shared.config.load_full()
    }

    /// The tenant registry in use.
    pub fn tenants(&self) -> Arc<TenantRegistry> {
        self.shared.tenants.load_full()
    }

    /// The endpoints' ids, in the order they were added.
    pub fn endpoint_ids(&self) -> Vec<EndpointId> {
        self.shared
            .snapshot
            .load()
            .endpoints
            .iter()
            .map(|e| e.id().clone())
            .collect()
    }
}
