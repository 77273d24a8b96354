//! Turning validated [`Settings`] into running routers, one per cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use switchyard_core::{EndpointId, Role, TenantRegistry};
use switchyard_postgres::PgBackend;
use switchyard_redis::RedisBackend;
use switchyard_router::{Cluster, ClusterConfig, ClusterStatus, EndpointConfig, SourceState};

use crate::any::{error_chain, AnyBackend, AnyCluster};
use crate::error::ConfigError;
use crate::settings::{ClusterSettings, EndpointSettings, Settings};
use crate::topology::SourceSettings;

struct Entry {
    cluster: AnyCluster,
    /// The backends by endpoint name, for direct probes.
    backends: Mutex<BTreeMap<String, AnyBackend>>,
}

type Clusters = BTreeMap<String, Arc<Entry>>;

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
///
/// The set itself is live: [`apply`](Self::apply) starts clusters added to the
/// configuration and closes removed ones, swapping the whole set at once, so
/// readers never take a lock. The accessors return clones of the clusters
/// (cheap: a cluster is an `Arc`), which stay valid after a reload; a clone of
/// a cluster removed since fails its checkouts with
/// [`Error::Closed`](switchyard_core::Error::Closed).
pub struct RouterSet {
    clusters: ArcSwap<Clusters>,
    /// Held while applying a change, so two changes never interleave.
    applying: Mutex<()>,
}

impl std::fmt::Debug for RouterSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterSet")
            .field("clusters", &self.names())
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
        check_engines(settings)?;
        let mut clusters = BTreeMap::new();
        for (name, c) in &settings.clusters {
            let entry = build_cluster(name, c, settings.tenant_registry())?;
            clusters.insert(name.clone(), Arc::new(entry));
        }
        Ok(Self {
            clusters: ArcSwap::from_pointee(clusters),
            applying: Mutex::new(()),
        })
    }

    /// The PostgreSQL cluster called `name`.
    pub fn postgres(&self, name: &str) -> Option<Cluster<PgBackend>> {
        match self.get(name)? {
            AnyCluster::Postgres(c) => Some(c),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The Redis cluster called `name`.
    pub fn redis(&self, name: &str) -> Option<Cluster<RedisBackend>> {
        match self.get(name)? {
            AnyCluster::Redis(c) => Some(c),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The cluster called `name`, of any engine.
    pub fn get(&self, name: &str) -> Option<AnyCluster> {
        self.clusters.load().get(name).map(|e| e.cluster.clone())
    }

    /// Every cluster, by name, as the set is now.
    pub fn iter(&self) -> impl Iterator<Item = AnyCluster> {
        let clusters: Vec<AnyCluster> = self
            .clusters
            .load()
            .values()
            .map(|e| e.cluster.clone())
            .collect();
        clusters.into_iter()
    }

    /// The clusters' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.clusters.load().keys().cloned().collect()
    }

    /// The status of every cluster.
    pub fn statuses(&self) -> Vec<ClusterStatus> {
        self.iter().map(|c| c.status()).collect()
    }

    /// Waits until every cluster that follows a topology source has its first
    /// report; fails with [`ConfigError::SourceUnreachable`] naming the first
    /// cluster whose source is unreachable or silent after `timeout`. Such a
    /// cluster keeps trying in the background.
    pub async fn wait_sources(&self, timeout: Duration) -> Result<(), ConfigError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut starting = None;
            for c in self.iter() {
                let Some(source) = c.status().source else {
                    continue;
                };
                match source.state {
                    SourceState::Following => {}
                    SourceState::Unreachable => {
                        return Err(ConfigError::SourceUnreachable {
                            cluster: c.name().to_owned(),
                            name: source.source,
                            reason: source.last_error.unwrap_or_default(),
                        })
                    }
                    SourceState::Starting => starting = Some((c.name().to_owned(), source.source)),
                }
            }
            let Some((cluster, source)) = starting else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ConfigError::SourceUnreachable {
                    cluster,
                    name: source,
                    reason: format!("no answer within {timeout:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Probes every endpoint directly, all at once, each within `timeout`.
    pub async fn probe_all(&self, timeout: Duration) -> Vec<EndpointProbe> {
        let mut tasks = Vec::new();
        for (cluster, entry) in self.clusters.load_full().iter() {
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

    /// Applies the differences between `old` and `new` to the running set,
    /// while traffic flows:
    ///
    /// - clusters added start, clusters removed are closed, and a cluster
    ///   whose engine changed is replaced by a new one (the set is swapped
    ///   once, after every new cluster started);
    /// - router settings go to [`Cluster::set_config`];
    /// - pool settings rebuild every endpoint's backend, swapped in with
    ///   [`Cluster::replace_backend`] so each endpoint keeps its health and
    ///   serves at once;
    /// - an endpoint with a new URL or role is swapped with
    ///   [`Cluster::replace_endpoint`], in one routing change; endpoints are
    ///   added and replaced before any is removed, so a cluster whose primary
    ///   moves to a new name is never without one;
    /// - weights and tenant tiers change in place.
    ///
    /// Whatever a running cluster refuses is listed in
    /// [`ApplyReport::failed`], and the rest is still applied. Must run inside
    /// a tokio runtime (new clusters and backends start tasks).
    pub fn apply(&self, old: &Settings, new: &Settings) -> ApplyReport {
        let _one_at_a_time = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        let mut report = ApplyReport::default();
        let mut next: Clusters = Clusters::clone(&self.clusters.load());
        let mut closing = Vec::new();
        let gone: Vec<String> = next
            .keys()
            .filter(|n| !new.clusters.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(entry) = next.remove(&name) {
                closing.push(entry);
                report.changes.push(format!("cluster {name} removed"));
            }
        }
        let mut kept = Vec::new();
        for (name, wanted) in &new.clusters {
            let running = next.get(name).map(Arc::clone);
            match (old.clusters.get(name), running) {
                (Some(prev), Some(entry))
                    if entry.cluster.engine() == wanted.engine && !follows_anew(prev, wanted) =>
                {
                    apply_cluster(name, &entry, prev, wanted, &mut report);
                    kept.push(entry);
                }
                (_, running) => match build_cluster(name, wanted, new.tenant_registry()) {
                    Ok(entry) => {
                        next.insert(name.clone(), Arc::new(entry));
                        report.changes.push(match running {
                            Some(previous) => {
                                let was = old.clusters.get(name).map_or("?", |c| c.source.kind());
                                let mut change = format!(
                                    "cluster {name} rebuilt: engine {} -> {}",
                                    previous.cluster.engine(),
                                    wanted.engine,
                                );
                                if was != wanted.source.kind() {
                                    change.push_str(&format!(
                                        ", source {was} -> {}",
                                        wanted.source.kind()
                                    ));
                                }
                                closing.push(previous);
                                change
                            }
                            None => format!("cluster {name} added"),
                        });
                    }
                    Err(e) => report
                        .failed
                        .push(format!("cluster {name}: {}", error_chain(&e))),
                },
            }
        }
        self.clusters.store(Arc::new(next));
        for entry in closing {
            entry.cluster.close();
        }
        if new.tenants_differ(old) {
            for entry in kept {
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

/// Whether a running cluster must be rebuilt to follow `next`'s source: the
/// source changed, or (with a source) the pool or engine block, member URL
/// or TLS settings and files its members' backends are made with did.
fn follows_anew(prev: &ClusterSettings, next: &ClusterSettings) -> bool {
    let members_differ = prev.backends_differ(next)
        || prev.member_tls != next.member_tls
        || prev.member_tls_digest != next.member_tls_digest;
    prev.source != next.source || (next.source != SourceSettings::Static && members_differ)
}

/// What [`RouterSet::apply`] changed.
///
/// Every setting in the files applies live, so nothing waits for a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Changes made to running clusters.
    pub changes: Vec<String>,
    /// Changes a running cluster refused; the rest of the change was applied.
    pub failed: Vec<String>,
}

/// [`ConfigError::EngineNotBuiltIn`] for the first cluster whose engine this
/// build cannot run.
pub(crate) fn check_engines(settings: &Settings) -> Result<(), ConfigError> {
    match settings
        .clusters
        .iter()
        .find(|(_, c)| !c.engine.is_built_in())
    {
        Some((name, c)) => Err(ConfigError::EngineNotBuiltIn {
            cluster: name.clone(),
            engine: c.engine.as_str(),
        }),
        None => Ok(()),
    }
}

fn build_cluster(
    name: &str,
    c: &ClusterSettings,
    tenants: TenantRegistry,
) -> Result<Entry, ConfigError> {
    let mut backends = BTreeMap::new();
    let mut ordered = Vec::new();
    for ep in &c.endpoints {
        let backend = AnyBackend::build(c.engine, name, &c.pool, c.postgres.as_ref(), ep)?;
        ordered.push((backend.clone(), endpoint_config(ep)));
        backends.insert(ep.name.clone(), backend);
    }
    let cluster = AnyCluster::build(name, c, tenants, ordered)?;
    let source = c.source.client().map_err(|message| ConfigError::Build {
        cluster: name.to_owned(),
        source: switchyard_core::Error::Config {
            path: format!("clusters.{name}.source"),
            message,
        },
    })?;
    if let Some(source) = source {
        cluster.follow(c, source);
    }
    Ok(Entry {
        cluster,
        backends: Mutex::new(backends),
    })
}

fn endpoint_config(ep: &EndpointSettings) -> EndpointConfig {
    EndpointConfig::new(ep.role).weight(ep.weight)
}

/// The top-level router settings that differ, for the report.
fn router_changes(prev: &ClusterConfig, next: &ClusterConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |differs: bool, name: &'static str| {
        if differs {
            out.push(name);
        }
    };
    check(prev.strategy != next.strategy, "strategy");
    check(
        prev.read_preference != next.read_preference,
        "read_preference",
    );
    check(
        prev.checkout_timeout != next.checkout_timeout,
        "checkout_timeout",
    );
    check(
        prev.failover_timeout != next.failover_timeout,
        "failover_timeout",
    );
    check(prev.health != next.health, "health");
    check(prev.retry != next.retry, "retry");
    check(prev.latency != next.latency, "latency");
    check(prev.warming != next.warming, "warming");
    check(prev.causal != next.causal, "causal");
    out
}

/// How an endpoint of the new configuration reaches the running cluster.
#[derive(Clone, Copy)]
enum Swap {
    /// A new name: added.
    Add,
    /// A new URL or role: replaced by a fresh endpoint.
    Repoint,
    /// Only the cluster's pool settings or engine block changed: a new
    /// backend, same state.
    NewPool,
    /// Only the credentials in the URL or the TLS settings or files changed
    /// (a rotated secret or certificate): a new backend for the same server,
    /// same state.
    NewCredentials,
}

impl Swap {
    fn done(self) -> &'static str {
        match self {
            Swap::Add => "added",
            Swap::Repoint => "re-pointed",
            Swap::NewPool => "given a new pool",
            Swap::NewCredentials => "given new credentials",
        }
    }
}

/// One change a new configuration asks of a running cluster's endpoints.
enum EndpointStep<'a> {
    /// A new or changed endpoint, swapped in as `Swap` says.
    Swap(Swap, &'a EndpointSettings),
    /// A kept endpoint's new weight.
    Reweight(&'a EndpointSettings),
    /// An endpoint the new configuration no longer names.
    Remove(&'a str),
}

/// The endpoint changes from `prev` to `next`, in the order they apply:
/// additions and replacements first, so a primary that moves to a new name
/// joins before the old one leaves; then removals.
fn endpoint_steps<'a>(
    prev: &'a ClusterSettings,
    next: &'a ClusterSettings,
) -> Vec<EndpointStep<'a>> {
    let new_pool = prev.backends_differ(next);
    let old_eps: BTreeMap<&str, &EndpointSettings> = prev
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let mut steps = Vec::new();
    for ep in &next.endpoints {
        let old = old_eps.get(ep.name.as_str());
        let swap = match old {
            None => Some(Swap::Add),
            // The redacted form is the URL without its secrets: equal means
            // the same server.
            Some(o) if o.url.redacted() != ep.url.redacted() || o.role != ep.role => {
                Some(Swap::Repoint)
            }
            Some(_) if new_pool => Some(Swap::NewPool),
            Some(o) if o.url != ep.url || o.tls != ep.tls || o.tls_digest != ep.tls_digest => {
                Some(Swap::NewCredentials)
            }
            Some(_) => None,
        };
        steps.extend(swap.map(|swap| EndpointStep::Swap(swap, ep)));
        // A fresh endpoint (added or re-pointed) already has its new weight.
        if old.is_some_and(|o| o.weight != ep.weight)
            && !matches!(swap, Some(Swap::Add | Swap::Repoint))
        {
            steps.push(EndpointStep::Reweight(ep));
        }
    }
    let gone = old_eps
        .into_keys()
        .filter(|n| !next.endpoints.iter().any(|e| e.name == *n));
    steps.extend(gone.map(EndpointStep::Remove));
    steps
}

fn apply_cluster(
    name: &str,
    entry: &Entry,
    prev: &ClusterSettings,
    next: &ClusterSettings,
    report: &mut ApplyReport,
) {
    if prev.router != next.router {
        match entry.cluster.set_config(next.router.clone()) {
            Ok(()) => report.changes.push(format!(
                "cluster {name}: router settings changed ({})",
                router_changes(&prev.router, &next.router).join(", ")
            )),
            Err(e) => report.failed.push(e.to_string()),
        }
    }
    let mut backends = entry
        .backends
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut changes = Vec::new();
    for step in endpoint_steps(prev, next) {
        match apply_step(name, entry, next, &mut backends, step) {
            Ok(done) => changes.push(format!("cluster {name}: endpoint {done}")),
            Err(failed) => report
                .failed
                .push(format!("cluster {name}: endpoint {failed}")),
        }
    }
    report.changes.extend(changes);
}

/// Applies one endpoint step: what was done, or what failed, each starting
/// with the endpoint's name.
fn apply_step(
    name: &str,
    entry: &Entry,
    next: &ClusterSettings,
    backends: &mut BTreeMap<String, AnyBackend>,
    step: EndpointStep<'_>,
) -> Result<String, String> {
    let cluster = &entry.cluster;
    match step {
        EndpointStep::Swap(swap, ep) => {
            let ep_name = &ep.name;
            let swapped =
                AnyBackend::build(next.engine, name, &next.pool, next.postgres.as_ref(), ep)
                    .and_then(|b| {
                        match swap {
                            Swap::Add => cluster.add_endpoint(&b, endpoint_config(ep)),
                            Swap::Repoint => cluster.replace_endpoint(&b, endpoint_config(ep)),
                            Swap::NewPool | Swap::NewCredentials => cluster.replace_backend(&b),
                        }
                        .map(|()| b)
                        .map_err(|source| ConfigError::Build {
                            cluster: name.to_owned(),
                            source,
                        })
                    });
            let b = swapped.map_err(|e| format!("{ep_name}: {}", error_chain(&e)))?;
            backends.insert(ep_name.clone(), b);
            Ok(format!("{ep_name} {}", swap.done()))
        }
        EndpointStep::Reweight(ep) => {
            let ep_name = &ep.name;
            cluster
                .set_weight(&EndpointId::new(ep_name.as_str()), ep.weight)
                .map_err(|e| format!("{ep_name}: {}", error_chain(&e)))?;
            Ok(format!("{ep_name} weight {}", ep.weight))
        }
        EndpointStep::Remove(ep_name) => {
            cluster.remove_endpoint(&EndpointId::new(ep_name));
            backends.remove(ep_name);
            Ok(format!("{ep_name} removed"))
        }
    }
}
