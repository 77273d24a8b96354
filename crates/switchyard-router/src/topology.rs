//! Snapshots: the immutable routing table that every pick reads.
//!
//! A snapshot is rebuilt whenever anything routing depends on changes (an
//! endpoint's health, role or lag, a weight, the endpoint list, the strategy,
//! the read preference or the replica lag limit),
//! and published with one `ArcSwap` store. Rebuilds are serialised by the
//! cluster's topology mutex and read every endpoint's state under it, so the
//! last rebuild always reflects the last change. A pick loads the snapshot
//! once and never locks.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{Backend, EndpointId, History, Intent, Role};
use tokio::time::Instant;

use crate::config::{ClusterConfig, ReadPreference, StrategyKind};
use crate::election::{elect, follows, Line, Primary};
use crate::endpoint::Endpoint;
use crate::health::ejection::Phase;
use crate::strategy::{Picker, Strategy};

/// A candidate set and its prepared strategy.
pub(crate) struct Candidates<B: Backend> {
    pub candidates: Vec<Arc<Endpoint<B>>>,
    pub picker: Picker,
}

impl<B: Backend> Candidates<B> {
    fn new(kind: StrategyKind, candidates: Vec<Arc<Endpoint<B>>>) -> Self {
        let picker = Picker::new(kind, &candidates);
        Self { candidates, picker }
    }

    /// The strategy's pick at `now`, or, when it is in `avoid`, the first
    /// candidate not in `avoid` from a random starting point (retries only;
    /// O(n)).
    #[inline]
    pub fn pick(&self, avoid: &[EndpointId], now: Instant) -> Option<&Arc<Endpoint<B>>> {
        let first = self
            .picker
            .pick_at(&self.candidates, now)
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
    pub write: Candidates<B>,
    /// Where reads go, after the read preference and its fallback.
    pub read: Candidates<B>,
    /// Half-open endpoints waiting for their trial checkout.
    pub trials: Vec<(Arc<Endpoint<B>>, Role)>,
    /// Primaries behind (or off) the line writes follow: no writes, no reads.
    pub fenced: Vec<EndpointId>,
    /// Primaries nothing orders: while there are any, writes are refused.
    pub split_brain: Vec<EndpointId>,
    pub strategy: StrategyKind,
    pub read_preference: ReadPreference,
    /// The checkout rules of the configuration this table was built with: a
    /// checkout reads them from the snapshot it picks from, so it loads one
    /// `ArcSwap`, not two.
    pub rules: Rules,
}

/// What one checkout may spend: the configuration's timeouts and attempts,
/// as a [`Budget`](crate::checkout::Budget) takes them at its first pick.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub checkout_timeout: Duration,
    pub attempt_timeout: Duration,
    pub failover_timeout: Duration,
    pub max_attempts: u32,
}

impl Rules {
    fn of(config: &ClusterConfig) -> Self {
        Self {
            checkout_timeout: config.checkout_timeout,
            attempt_timeout: config.retry.attempt_timeout,
            failover_timeout: config.failover_timeout,
            max_attempts: config.retry.max_attempts.max(1),
        }
    }
}

impl<B: Backend> Snapshot<B> {
    pub fn empty(config: &ClusterConfig) -> Self {
        Self::build(Vec::new(), config, &mut None)
    }

    /// Builds the table from every endpoint's current state and the cluster's
    /// strategy, read preference and replica lag limit, electing the writer
    /// relative to `line` (see [`crate::election`]) and moving `line` to the
    /// writer's latest history.
    pub fn build(
        endpoints: Vec<Arc<Endpoint<B>>>,
        config: &ClusterConfig,
        line: &mut Option<Line>,
    ) -> Self {
        let kind = config.strategy;
        // Looking one probe ahead: a replica drifting out of bounds is out
        // before it gets there.
        let at = Instant::now() + config.health.interval;
        let mut primaries: Vec<(Arc<Endpoint<B>>, Option<History>, bool)> = Vec::new();
        // Whether every primary has been probed: until then one is only a
        // configured guess, and the first one probed must not set the line
        // the others are judged by (that would order them by sight).
        let mut settled = true;
        let mut standalone = Vec::new();
        let mut replicas: Vec<(Arc<Endpoint<B>>, Option<History>)> = Vec::new();
        let mut trials = Vec::new();
        for ep in &endpoints {
            let h = ep.state.health();
            if !h.up {
                continue;
            }
            // A topology source's designation, combined with the probe's role
            // (see `crate::source`); `None` serves nothing. A member the
            // source added serves once a probe has seen what it is: the
            // source's word alone would send reads to a node it lists as a
            // replica that is really an empty, writable restarted master.
            let designated = ep.state.designated();
            if designated.is_some() && h.last_probe.is_none() {
                continue;
            }
            let Some(role) = crate::source::effective_role(designated, h.role) else {
                continue;
            };
            let half_open = match h.ejection.phase {
                Phase::Admitted => false,
                Phase::Ejected { .. } => continue,
                Phase::HalfOpen { .. } => true,
            };
            match role {
                Role::Primary => {
                    settled &= h.last_probe.is_some();
                    primaries.push((Arc::clone(ep), h.history.clone(), half_open));
                }
                // A replica too far behind (or unsynced) gets no reads, a
                // half-open trial read included.
                Role::Replica if !h.lag_ok(&config.health, at) => {}
                _ if half_open => trials.push((Arc::clone(ep), role, h.history.clone())),
                Role::Standalone => standalone.push(Arc::clone(ep)),
                Role::Replica => replicas.push((Arc::clone(ep), h.history.clone())),
            }
        }
        let election = {
            let candidates: Vec<Primary<'_>> = primaries
                .iter()
                .map(|(ep, history, _)| Primary {
                    id: ep.id(),
                    history: history.as_ref(),
                })
                .collect();
            elect(&candidates, line.as_ref())
        };
        let ids = |idx: &[usize]| -> Vec<EndpointId> {
            idx.iter().map(|&i| primaries[i].0.id().clone()).collect()
        };
        let fenced = ids(&election.fenced);
        let split_brain = ids(&election.split_brain);
        let mut writers = Vec::new();
        let mut primary = None;
        if let Some((ep, history, half_open)) = election.writer.map(|w| &primaries[w]) {
            if settled {
                *line = Some(Line {
                    writer: ep.id().clone(),
                    history: history.clone(),
                });
            }
            // A half-open writer gets writes only through its trial.
            if *half_open {
                trials.push((Arc::clone(ep), Role::Primary, None));
            } else {
                writers.push(Arc::clone(ep));
                primary = Some(Arc::clone(ep));
            }
        } else if primaries.is_empty() {
            writers.clone_from(&standalone);
        }
        // A replica serves reads that need freshness only while it follows
        // the line writes follow.
        let strict = config.health.max_replica_lag.is_some();
        let line_history = line.as_ref().and_then(|l| l.history.as_ref());
        let mut readers: Vec<_> = replicas
            .into_iter()
            .filter(|(_, history)| !strict || follows(history.as_ref(), line_history))
            .map(|(ep, _)| ep)
            .collect();
        let trials = trials
            .into_iter()
            .filter(|(_, role, history)| {
                *role != Role::Replica || !strict || follows(history.as_ref(), line_history)
            })
            .map(|(ep, role, _)| (ep, role))
            .collect();
        readers.extend(standalone);
        let readers = match config.read_preference {
            ReadPreference::ReplicasOnly => readers,
            ReadPreference::PreferReplicas if readers.is_empty() => writers.clone(),
            ReadPreference::PreferReplicas => readers,
            ReadPreference::Any => {
                readers.extend(primary);
                readers
            }
        };
        Self {
            write: Candidates::new(kind, writers),
            read: Candidates::new(kind, readers),
            endpoints,
            trials,
            fenced,
            split_brain,
            strategy: kind,
            read_preference: config.read_preference,
            rules: Rules::of(config),
        }
    }

    /// The candidates an intent draws from.
    pub fn candidates(&self, intent: Intent) -> &Candidates<B> {
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

    /// The half-open endpoints whose trial a checkout for `intent` may ask
    /// for, their trial not out.
    pub fn trials<'a>(
        &'a self,
        intent: Intent,
        avoid: &'a [EndpointId],
    ) -> impl Iterator<Item = &'a Arc<Endpoint<B>>> {
        self.trials
            .iter()
            .filter(move |(ep, role)| {
                let fits = match intent {
                    Intent::Write => role.is_writable(),
                    Intent::Read => {
                        *role != Role::Primary
                            || self.read_preference != ReadPreference::ReplicasOnly
                    }
                };
                // Read on the endpoint's own lock: while its trial is out,
                // claiming it (under the topology lock) would only fail.
                fits && !avoid.contains(ep.id()) && ep.state.health().ejection.trial_free()
            })
            .map(|(ep, _)| ep)
    }
}
