//! Snapshots: the immutable routing table that every pick reads.
//!
//! A snapshot is rebuilt whenever anything routing depends on changes (an
//! endpoint's health, role or lag, a weight, the endpoint list, the strategy,
//! the read preference or the replica lag limit),
//! and published with one `ArcSwap` store. Rebuilds are serialised by the
//! cluster's topology mutex and read every endpoint's state under it, so the
//! last rebuild always reflects the last change. A pick loads the snapshot
//! once and never locks.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_core::{Backend, EndpointId, Intent, Role};
use tokio::time::Instant;

use crate::config::{ClusterConfig, ReadPreference, StrategyKind};
use crate::endpoint::Endpoint;
use crate::health::ejection::Phase;
use crate::strategy::{Picker, Strategy};

/// A candidate set and its prepared strategy.
pub(crate) struct Pool<B: Backend> {
    pub candidates: Vec<Arc<Endpoint<B>>>,
    pub picker: Picker,
}

impl<B: Backend> Pool<B> {
    fn new(kind: StrategyKind, candidates: Vec<Arc<Endpoint<B>>>) -> Self {
        let picker = Picker::new(kind, &candidates);
        Self { candidates, picker }
    }

    /// The strategy's pick, or, when it is in `avoid`, the first candidate not in
    /// `avoid` from a random starting point (retries only; O(n)).
    pub fn pick(&self, avoid: &[EndpointId]) -> Option<&Arc<Endpoint<B>>> {
        let first = self
            .picker
            .pick(&self.candidates)
            .and_then(|i| self.candidates.get(i))?;
        if !avoid.contains(first.id()) {
            return Some(first);
        }
        let n = self.candidates.len();
        let start = fastrand::usize(..n);
        (0..n)
            .filter_map(|k| self.candidates.get((start + k) % n))
            .find(|ep| !avoid.contains(ep.id()))
    }
}

/// The routing table at one moment.
pub(crate) struct Snapshot<B: Backend> {
    /// Every endpoint of the cluster, serving or not.
    pub endpoints: Vec<Arc<Endpoint<B>>>,
    /// Where writes go: the primary (or every standalone node).
    pub write: Pool<B>,
    /// Where reads go, after the read preference and its fallback.
    pub read: Pool<B>,
    /// Half-open endpoints waiting for their trial checkout.
    pub trials: Vec<(Arc<Endpoint<B>>, Role)>,
    /// Admitted primaries other than the one writes go to, newest last: mid
    /// failover, a promoted replica seen before its dead predecessor is down.
    /// A last resort for read retries only.
    pub other_primaries: Vec<Arc<Endpoint<B>>>,
    pub strategy: StrategyKind,
    pub read_preference: ReadPreference,
}

impl<B: Backend> Snapshot<B> {
    pub fn empty(config: &ClusterConfig) -> Self {
        Self::build(Vec::new(), config)
    }

    /// Builds the table from every endpoint's current state and the cluster's
    /// strategy, read preference and replica lag limit.
    pub fn build(endpoints: Vec<Arc<Endpoint<B>>>, config: &ClusterConfig) -> Self {
        let kind = config.strategy;
        let mut primaries: Vec<(Option<Instant>, Arc<Endpoint<B>>)> = Vec::new();
        let mut standalone = Vec::new();
        let mut replicas = Vec::new();
        let mut trials = Vec::new();
        for ep in &endpoints {
            let h = ep.state.health();
            if !h.up {
                continue;
            }
            // A topology source's designation, combined with the probe's role
            // (see `crate::source`); `None` serves nothing.
            let Some(role) = crate::source::effective_role(ep.state.designated(), h.role) else {
                continue;
            };
            match h.ejection.phase {
                Phase::Admitted => {}
                Phase::Ejected { .. } => continue,
                Phase::HalfOpen => {
                    trials.push((Arc::clone(ep), role, h.primary_since));
                    continue;
                }
            }
            match role {
                Role::Primary => primaries.push((h.primary_since, Arc::clone(ep))),
                Role::Standalone => standalone.push(Arc::clone(ep)),
                Role::Replica if h.lag_ok(&config.health) => replicas.push(Arc::clone(ep)),
                Role::Replica => {}
            }
        }
        // Two primaries happen mid-failover (an old primary back before it is
        // fenced). The one that has been primary longest keeps the writes.
        primaries.sort_by_key(|(since, _)| *since);
        if primaries.len() > 1 {
            let ids: Vec<&str> = primaries.iter().map(|(_, e)| e.id().as_str()).collect();
            tracing::warn!(endpoints = ?ids, "several endpoints report primary; writes stay on the longest-serving one");
        }
        // A half-open primary that has not been primary longer than the one
        // writes go to is a stale primary (an old one back after a failover):
        // a trial would hand it a write or a read, so it gets none. It stays
        // half-open, serving nothing, until it is the longest-serving primary.
        let elected = primaries.first().map(|(since, _)| *since);
        let trials: Vec<_> = trials
            .into_iter()
            .filter(|(_, role, since)| {
                *role != Role::Primary || elected.is_none_or(|elected| *since < elected)
            })
            .map(|(ep, role, _)| (ep, role))
            .collect();
        let writers: Vec<_> = match primaries.first() {
            Some((_, p)) => vec![Arc::clone(p)],
            None => standalone.clone(),
        };
        replicas.extend(standalone);
        let mut primaries = primaries.into_iter().map(|(_, p)| p);
        let readers = match config.read_preference {
            ReadPreference::ReplicasOnly => replicas,
            ReadPreference::PreferReplicas if replicas.is_empty() => writers.clone(),
            ReadPreference::PreferReplicas => replicas,
            ReadPreference::Any => {
                let mut all = replicas;
                all.extend(primaries.next());
                all
            }
        };
        let other_primaries = primaries
            .filter(|p| !writers.iter().any(|w| Arc::ptr_eq(w, p)))
            .collect();
        let snapshot = Self {
            write: Pool::new(kind, writers),
            read: Pool::new(kind, readers),
            endpoints,
            trials,
            other_primaries,
            strategy: kind,
            read_preference: config.read_preference,
        };
        snapshot.link_load_trees();
        snapshot
    }

    /// Points every endpoint's load watcher at the least-connections trees it
    /// is a leaf of, then refreshes those trees so no change made during the
    /// relinking is missed.
    fn link_load_trees(&self) {
        let mut links: HashMap<&EndpointId, Vec<_>> = HashMap::new();
        for pool in [&self.write, &self.read] {
            if let Some(tree) = pool.picker.load_tree() {
                for (leaf, ep) in pool.candidates.iter().enumerate() {
                    links
                        .entry(ep.id())
                        .or_default()
                        .push((Arc::clone(tree), leaf));
                }
            }
        }
        for ep in &self.endpoints {
            ep.state
                .links
                .set(links.remove(ep.id()).unwrap_or_default());
        }
        for pool in [&self.write, &self.read] {
            if let Some(tree) = pool.picker.load_tree() {
                tree.refresh();
            }
        }
    }

    /// The pool an intent draws from.
    pub fn pool(&self, intent: Intent) -> &Pool<B> {
        match intent {
            Intent::Write => &self.write,
            Intent::Read => &self.read,
        }
    }

    /// Whether any checkout could be served now.
    pub fn any_available(&self) -> bool {
        !self.write.candidates.is_empty()
            || !self.read.candidates.is_empty()
            || !self.trials.is_empty()
    }

    /// The endpoint writes go to.
    pub fn writer(&self) -> Option<&EndpointId> {
        self.write.candidates.first().map(|e| e.id())
    }

    /// A half-open endpoint whose trial this checkout may take.
    pub fn claim_trial(&self, intent: Intent, avoid: &[EndpointId]) -> Option<&Arc<Endpoint<B>>> {
        self.trials
            .iter()
            .filter(|(ep, role)| {
                let fits = match intent {
                    Intent::Write => role.is_writable(),
                    Intent::Read => {
                        *role != Role::Primary
                            || self.read_preference != ReadPreference::ReplicasOnly
                    }
                };
                fits && !avoid.contains(ep.id())
            })
            .map(|(ep, _)| ep)
            .find(|ep| ep.state.claim_trial())
    }
}
