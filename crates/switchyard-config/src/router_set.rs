//! Turning validated [`Settings`] into running routers, one per cluster.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use switchyard_core::{EndpointId, Role, TenantRegistry};
use switchyard_postgres::PgBackend;
use switchyard_redis::RedisBackend;
use switchyard_router::{Cluster, ClusterStatus, EndpointConfig};

use crate::any::{error_chain, AnyBackend, AnyCluster};
use crate::error::ConfigError;
use crate::settings::{ClusterSettings, EndpointSettings, Settings};

struct Entry {
    cluster: AnyCluster,
    /// The backends by endpoint name, for direct probes.
    backends: Mutex<BTreeMap<String, AnyBackend>>,
}

/// One direct probe of one endpoint, as `switchyard check` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointProbe {
    /// The cluster.
    pub cluster: String,
    /// The endpoint.
    pub endpoint: String,
    /// The role the probe saw, or the configured one when it failed.
    pub role: Role,
    /// The probe's result: its round trip, or the error (never a secret).
    pub result: Result<Duration, String>,
    /// Replication lag, where reported.
    pub lag: Option<Duration>,
}

/// Every configured cluster, running: one router per cluster.
pub struct RouterSet {
    clusters: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for RouterSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterSet")
            .field("clusters", &self.clusters.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RouterSet {
    /// Starts a router per cluster. Must run inside a tokio runtime.
    ///
    /// Fails with [`ConfigError::EngineNotBuiltIn`] for a cluster whose engine
    /// this build cannot run, and [`ConfigError::Build`] when a backend or
    /// router refuses its settings.
    pub fn build(settings: &Settings) -> Result<Self, ConfigError> {
        let mut clusters = BTreeMap::new();
        for (name, c) in &settings.clusters {
            clusters.insert(
                name.clone(),
                build_cluster(name, c, settings.tenant_registry())?,
            );
        }
        Ok(Self { clusters })
    }

    /// The PostgreSQL cluster called `name`.
    pub fn postgres(&self, name: &str) -> Option<&Cluster<PgBackend>> {
        match self.clusters.get(name).map(|e| &e.cluster) {
            Some(AnyCluster::Postgres(c)) => Some(c),
            _ => None,
        }
    }

    /// The Redis cluster called `name`.
    pub fn redis(&self, name: &str) -> Option<&Cluster<RedisBackend>> {
        match self.clusters.get(name).map(|e| &e.cluster) {
            Some(AnyCluster::Redis(c)) => Some(c),
            _ => None,
        }
    }

    /// The cluster called `name`, of any engine.
    pub fn get(&self, name: &str) -> Option<&AnyCluster> {
        self.clusters.get(name).map(|e| &e.cluster)
    }

    /// Every cluster, by name.
    pub fn iter(&self) -> impl Iterator<Item = &AnyCluster> {
        self.clusters.values().map(|e| &e.cluster)
    }

    /// The status of every cluster.
    pub fn statuses(&self) -> Vec<ClusterStatus> {
        self.iter().map(AnyCluster::status).collect()
    }

    /// Probes every endpoint directly, all at once, each within `timeout`.
    pub async fn probe_all(&self, timeout: Duration) -> Vec<EndpointProbe> {
        let mut tasks = Vec::new();
        for (cluster, entry) in &self.clusters {
            let backends: Vec<(String, AnyBackend)> = entry
                .backends
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let status = entry.cluster.status();
            for (endpoint, backend) in backends {
                let configured = status.endpoint(&endpoint).map_or(Role::Replica, |s| s.role);
                let cluster = cluster.clone();
                tasks.push(tokio::spawn(async move {
                    let probe = backend.probe(timeout).await;
                    EndpointProbe {
                        cluster,
                        endpoint,
                        role: probe.as_ref().map_or(configured, |p| p.role),
                        lag: probe.as_ref().ok().and_then(|p| p.lag),
                        result: probe.map(|p| p.rtt).map_err(|e| error_chain(&e)),
                    }
                }));
            }
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(p) = t.await {
                out.push(p);
            }
        }
        out
    }

    /// Applies the differences between `old` and `new` to the running clusters:
    /// endpoints added, removed or re-pointed, weights, strategy and tenant
    /// tiers. What cannot change live is listed in the report.
    pub fn apply(&self, old: &Settings, new: &Settings) -> ApplyReport {
        let mut report = ApplyReport::default();
        for name in old
            .clusters
            .keys()
            .filter(|n| !new.clusters.contains_key(*n))
        {
            report
                .restart_required
                .push(format!("cluster {name} removed"));
        }
        for (name, next) in &new.clusters {
            let (Some(prev), Some(entry)) = (old.clusters.get(name), self.clusters.get(name))
            else {
                report
                    .restart_required
                    .push(format!("cluster {name} added"));
                continue;
            };
            if prev.engine != next.engine {
                report
                    .restart_required
                    .push(format!("cluster {name} changed engine"));
                continue;
            }
            apply_cluster(name, entry, prev, next, &mut report);
        }
        if new.tenants_differ(old) {
            for entry in self.clusters.values() {
                match entry.cluster.set_tenants(new.tenant_registry()) {
                    Ok(()) => report.changes.push(format!(
                        "cluster {}: tenant tiers replaced",
                        entry.cluster.name()
                    )),
                    Err(e) => report.failed.push(e.to_string()),
                }
            }
        }
        report
    }
}

/// What [`RouterSet::apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Changes made to running clusters.
    pub changes: Vec<String>,
    /// Changes that take effect only after a restart.
    pub restart_required: Vec<String>,
    /// Changes a running cluster refused.
    pub failed: Vec<String>,
}

fn build_cluster(
    name: &str,
    c: &ClusterSettings,
    tenants: TenantRegistry,
) -> Result<Entry, ConfigError> {
    let mut backends = BTreeMap::new();
    let mut ordered = Vec::new();
    for ep in &c.endpoints {
        let backend = AnyBackend::build(c.engine, name, &c.pool, ep)?;
        ordered.push((backend.clone(), endpoint_config(ep)));
        backends.insert(ep.name.clone(), backend);
    }
    let cluster = AnyCluster::build(name, c, tenants, ordered)?;
    Ok(Entry {
        cluster,
        backends: Mutex::new(backends),
    })
}

fn endpoint_config(ep: &EndpointSettings) -> EndpointConfig {
    EndpointConfig::new(ep.role).weight(ep.weight)
}

fn apply_cluster(
    name: &str,
    entry: &Entry,
    prev: &ClusterSettings,
    next: &ClusterSettings,
    report: &mut ApplyReport,
) {
    if prev.router.strategy != next.router.strategy {
        entry.cluster.set_strategy(next.router.strategy);
        report.changes.push(format!(
            "cluster {name}: strategy {:?}",
            next.router.strategy
        ));
    }
    let mut prev_router = prev.router.clone();
    prev_router.strategy = next.router.strategy;
    if prev_router != next.router {
        report.restart_required.push(format!(
            "cluster {name}: router settings other than strategy"
        ));
    }
    if prev.pool != next.pool {
        report.restart_required.push(format!(
            "cluster {name}: pool settings (new endpoints use them)"
        ));
    }
    let old_eps: BTreeMap<&str, &EndpointSettings> = prev
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let new_eps: BTreeMap<&str, &EndpointSettings> = next
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let mut backends = entry
        .backends
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for (ep_name, old) in &old_eps {
        let replaced = new_eps
            .get(ep_name)
            .is_some_and(|n| n.url != old.url || n.role != old.role);
        if !new_eps.contains_key(ep_name) || replaced {
            entry.cluster.remove_endpoint(&EndpointId::new(*ep_name));
            backends.remove(*ep_name);
            report
                .changes
                .push(format!("cluster {name}: endpoint {ep_name} removed"));
        }
    }
    for (ep_name, ep) in &new_eps {
        let old = old_eps.get(ep_name);
        let add = old.is_none_or(|o| o.url != ep.url || o.role != ep.role);
        if add {
            let added = AnyBackend::build(next.engine, name, &next.pool, ep).and_then(|b| {
                entry
                    .cluster
                    .add_endpoint(&b, endpoint_config(ep))
                    .map(|()| b)
                    .map_err(|source| ConfigError::Build {
                        cluster: name.to_owned(),
                        source,
                    })
            });
            match added {
                Ok(b) => {
                    backends.insert((*ep_name).to_owned(), b);
                    report
                        .changes
                        .push(format!("cluster {name}: endpoint {ep_name} added"));
                }
                Err(e) => report.failed.push(format!(
                    "cluster {name}: endpoint {ep_name}: {}",
                    error_chain(&e)
                )),
            }
        } else if old.is_some_and(|o| o.weight != ep.weight) {
            match entry
                .cluster
                .set_weight(&EndpointId::new(*ep_name), ep.weight)
            {
                Ok(()) => report.changes.push(format!(
                    "cluster {name}: endpoint {ep_name} weight {}",
                    ep.weight
                )),
                Err(e) => report.failed.push(e.to_string()),
            }
        }
    }
}
