//! Topology sources: where a cluster's endpoints and their roles come from.
//!
//! By default a cluster's endpoints are the ones it was built with or given
//! live ([`Cluster::add_endpoint`](crate::Cluster::add_endpoint) and friends),
//! and their roles are whatever the probes see: the *static* source. Teams
//! that run an HA control plane (Patroni for PostgreSQL, Redis Sentinel)
//! want every service instance to follow the control plane's decision instead
//! of forming its own view, so that an instance cut off from the old primary
//! never keeps writing to it. A [`TopologySource`] reports the control plane's
//! view, the whole membership at a time ([`View`]); the cluster diffs it
//! against the last one into a list of [`EndpointChange`](crate::EndpointChange)s
//! (insert, replace, remove, designate) and applies them as
//! [`Cluster::change_endpoints`](crate::Cluster::change_endpoints) does: with
//! the same checks, under one lock, ending in one routing rebuild.
//!
//! # Combining the source's view with the probes
//!
//! Probes keep running on every endpoint, at the cluster's interval, and an
//! endpoint whose role the source changes is probed at once. The source says
//! who *should* be primary; probes say who is reachable and what each node
//! believes it is. The rules (`effective_role`):
//!
//! | source says | probe says | the endpoint serves |
//! |---|---|---|
//! | primary | primary | writes (and reads per the read preference) |
//! | primary | replica | reads only: writes wait (up to `failover_timeout`) until the probe confirms the promotion |
//! | replica | replica | reads |
//! | replica | primary | **nothing**: an old primary back before the control plane demoted it (a restarted Redis master is empty and writable for seconds), or a split brain |
//! | (any) | not yet probed | nothing: a member the source adds or re-points serves once its first probe has said what it is |
//! | (any) | down, ejected | nothing, as for any endpoint |
//!
//! So writes only ever go to the endpoint the source designates primary, and
//! only once that endpoint itself reports primary. A source that cannot reach
//! its control plane leaves the last known topology in place (probes still
//! act on it) and is reported in [`ClusterStatus::source`](crate::ClusterStatus),
//! in logs (`warn` when it is lost, `info` when it is back) and in the
//! metrics `switchyard_source_up` and `switchyard_source_errors_total`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::future::Future;
//! use std::pin::Pin;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::noop::NoopBackend;
//! use switchyard_core::{EndpointId, Intent, Role};
//! use switchyard_router::source::{Member, Report, TopologySource, View};
//! use switchyard_router::Cluster;
//!
//! /// A control plane that always names `db-1` primary and `db-2` replica.
//! struct Fixed(bool);
//! impl TopologySource for Fixed {
//!     fn describe(&self) -> String { "fixed".into() }
//!     fn next(&mut self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
//!         let first = std::mem::replace(&mut self.0, false);
//!         Box::pin(async move {
//!             if !first { std::future::pending::<()>().await; }
//!             Report::View(View::new(vec![
//!                 Member::new("db-1", "10.0.0.1", 5432, Role::Primary),
//!                 Member::new("db-2", "10.0.0.2", 5432, Role::Replica),
//!             ]))
//!         })
//!     }
//! }
//!
//! let cluster = Cluster::<NoopBackend>::builder("main").build()?;
//! // The backend of each member the source reports; a real engine's backend
//! // would connect to member.host:member.port with the cluster's credentials.
//! cluster
//!     .follow(Fixed(true), |m: &Member| {
//!         let role = if m.name.as_str() == "db-1" { Role::Primary } else { Role::Replica };
//!         Ok(Arc::new(NoopBackend::with_role(m.name.as_str(), role)))
//!     })
//!     .ready(Duration::from_secs(1))
//!     .await?;
//! # tokio::time::pause();
//! # tokio::time::sleep(Duration::from_millis(10)).await;
//! let write = cluster.checkout(Intent::Write, None).await?;
//! assert_eq!(write.endpoint(), &EndpointId::new("db-1"));
//! assert_eq!(cluster.status().source.map(|s| s.primary), Some(Some(EndpointId::new("db-1"))));
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use switchyard_core::{EndpointId, Role};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::SourceMetrics;

/// One member of the cluster as the control plane reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The endpoint's name (Patroni's member name, Sentinel's `ip:port`).
    pub name: EndpointId,
    /// Where it listens.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The role the control plane gives it: [`Role::Primary`] for the one
    /// writes should go to, [`Role::Replica`] for every other member.
    pub role: Role,
}

impl Member {
    /// A member called `name` at `host:port`.
    pub fn new(name: impl Into<String>, host: impl Into<String>, port: u16, role: Role) -> Self {
        Self {
            name: EndpointId::new(name.into()),
            host: host.into(),
            port,
            role,
        }
    }
}

/// The control plane's whole view of the cluster at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Every member, at most one of them primary.
    pub members: Vec<Member>,
}

impl View {
    /// A view of `members`.
    pub fn new(members: Vec<Member>) -> Self {
        Self { members }
    }

    /// The member designated primary, if any.
    pub fn primary(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.role == Role::Primary)
    }
}

/// What a source reports each time it is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The control plane's current view (a source may report the same view
    /// again; only differences are applied).
    View(View),
    /// The control plane could not be reached or gave no usable answer; the
    /// reason names what was tried, never a secret.
    Unreachable(String),
}

/// Where a cluster's endpoints and roles come from: a control plane's client.
///
/// The cluster calls [`next`](Self::next) in a loop from one task: the first
/// call should answer as soon as the control plane does; later calls wait
/// for a change (a push, such as Sentinel's `+switch-master`) or the poll
/// interval, whichever comes first. Cancel safety: the future may be dropped
/// when the cluster closes.
pub trait TopologySource: Send + 'static {
    /// The source in logs, status and errors (kind and addresses, never a secret).
    fn describe(&self) -> String;

    /// The next report. (The boxed future is `futures_util`'s `BoxFuture`
    /// spelled out, so implementations may name either.)
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>>;
}

impl TopologySource for Box<dyn TopologySource> {
    fn describe(&self) -> String {
        (**self).describe()
    }

    fn next(&mut self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
        (**self).next()
    }
}

/// How a source is doing, in [`SourceStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// No report yet.
    Starting,
    /// The last report was a view.
    Following,
    /// The last report said the control plane is unreachable; the last known
    /// topology stays in place.
    Unreachable,
}

impl fmt::Display for SourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceState::Starting => "starting",
            SourceState::Following => "following",
            SourceState::Unreachable => "unreachable",
        })
    }
}

/// A cluster's topology source, as [`Cluster::status`](crate::Cluster::status) reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceStatus {
    /// [`TopologySource::describe`].
    pub source: String,
    /// Starting, following or unreachable.
    pub state: SourceState,
    /// The member the source designates primary in the last view.
    pub primary: Option<EndpointId>,
    /// The roles of the last view, by endpoint.
    pub roles: BTreeMap<EndpointId, Role>,
    /// Views that changed the topology, since the source started.
    pub changes: u64,
    /// When the last view arrived.
    pub last_view: Option<SystemTime>,
    /// Why the source is unreachable (when it is).
    pub last_error: Option<String>,
    /// The members of the last view the cluster refused, each with why (a
    /// tier its engine refuses, no backend for it): they are not among the
    /// endpoints, and are tried again with the next view.
    pub refused: BTreeMap<EndpointId, String>,
    /// How long it has been unreachable (when it is).
    #[serde(with = "humantime_serde")]
    pub unreachable_for: Option<Duration>,
}

/// The role an endpoint routes as, from the source's designation and the
/// probe's role; `None` when it must serve nothing. See the module docs.
pub(crate) fn effective_role(designated: Option<Role>, probed: Role) -> Option<Role> {
    match (designated, probed) {
        (None, probed) => Some(probed),
        (Some(Role::Replica), Role::Primary) => None,
        (Some(Role::Primary), Role::Primary) => Some(Role::Primary),
        (Some(_), probed) => Some(probed),
    }
}

/// The source of a cluster that [`Cluster::follow`](crate::Cluster::follow) started: wait for its
/// first view with [`ready`](Self::ready).
#[derive(Debug)]
pub struct Following {
    pub(crate) cluster: Arc<str>,
    pub(crate) source: String,
    pub(crate) first: watch::Receiver<Option<Result<(), String>>>,
}

/// A topology source gave no view: unreachable at start, or no answer in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUnreachable {
    /// The cluster.
    pub cluster: String,
    /// [`TopologySource::describe`] of the source.
    pub source: String,
    /// What went wrong (never a secret).
    pub reason: String,
}

impl fmt::Display for SourceUnreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster {}: topology source {} is unreachable: {}",
            self.cluster, self.source, self.reason
        )
    }
}

impl std::error::Error for SourceUnreachable {}

impl Following {
    /// Waits for the source's first report: `Ok` once its first view is
    /// applied, an error naming the source when it reports itself
    /// unreachable, says nothing within `timeout`, or names only members the
    /// cluster refuses (each with why; the same reasons stay in the source
    /// status's `refused`). Either way the cluster keeps following it (close
    /// the cluster to stop), and a later view can still bring endpoints.
    pub async fn ready(mut self, timeout: Duration) -> Result<(), SourceUnreachable> {
        let error = |reason: String| SourceUnreachable {
            cluster: self.cluster.to_string(),
            source: self.source.clone(),
            reason,
        };
        let outcome = tokio::time::timeout(timeout, self.first.wait_for(Option::is_some)).await;
        match outcome {
            Ok(Ok(first)) => match first.clone() {
                Some(Ok(())) => Ok(()),
                Some(Err(reason)) => Err(error(reason)),
                None => Err(error("no report".into())),
            },
            Ok(Err(_)) => Err(error("the cluster closed before the first report".into())),
            Err(_) => Err(error(format!("no answer within {timeout:?}"))),
        }
    }

    /// The source, as described in logs and status.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// A cluster's source and what it last said; held in the cluster's state,
/// updated by the follower task only.
#[derive(Debug)]
pub(crate) struct SourceCell {
    status: SourceStatus,
    unreachable_since: Option<Instant>,
    metrics: SourceMetrics,
}

impl SourceCell {
    /// A source just started, nothing heard from it yet.
    pub(crate) fn new(source: String, metrics: SourceMetrics) -> Self {
        Self {
            status: SourceStatus {
                source,
                state: SourceState::Starting,
                primary: None,
                roles: BTreeMap::new(),
                changes: 0,
                last_view: None,
                last_error: None,
                refused: BTreeMap::new(),
                unreachable_for: None,
            },
            unreachable_since: None,
            metrics,
        }
    }

    /// Records `view`, just applied; `changed` when it changed the endpoints
    /// or their roles, `refused` the members the cluster did not take in.
    pub(crate) fn viewed(
        &mut self,
        cluster: &str,
        view: &View,
        changed: bool,
        refused: BTreeMap<EndpointId, String>,
    ) {
        if self.status.state == SourceState::Unreachable {
            tracing::info!(%cluster, source = %self.status.source, "topology source reachable again");
        }
        self.unreachable_since = None;
        self.status.state = SourceState::Following;
        self.status.last_error = None;
        self.status.last_view = Some(SystemTime::now());
        self.status.refused = refused;
        self.status.primary = view.primary().map(|m| m.name.clone());
        self.status.roles = view
            .members
            .iter()
            .map(|m| (m.name.clone(), m.role))
            .collect();
        self.metrics.up.set(1.0);
        if changed {
            self.status.changes += 1;
            self.metrics.changes.increment(1);
        }
    }

    /// Records that the source is unreachable; the topology stays as it is.
    pub(crate) fn lost(&mut self, cluster: &str, reason: &str) {
        self.metrics.errors.increment(1);
        self.metrics.up.set(0.0);
        if self.status.state != SourceState::Unreachable {
            tracing::warn!(%cluster, source = %self.status.source, reason, "topology source unreachable: keeping the last known topology");
            self.unreachable_since = Some(Instant::now());
        } else {
            tracing::debug!(%cluster, reason, "topology source still unreachable");
        }
        self.status.state = SourceState::Unreachable;
        self.status.last_error = Some(reason.to_owned());
    }

    /// The status as of now.
    pub(crate) fn status(&self) -> SourceStatus {
        let mut status = self.status.clone();
        status.unreachable_for = self.unreachable_since.map(|t| t.elapsed());
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, port: u16, role: Role) -> Member {
        Member::new(name, "127.0.0.1", port, role)
    }

    /// Reports the views sent to it.
    struct Script(tokio::sync::mpsc::UnboundedReceiver<View>);
    impl TopologySource for Script {
        fn describe(&self) -> String {
            "script".into()
        }
        fn next(&mut self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
            Box::pin(async move {
                match self.0.recv().await {
                    Some(view) => Report::View(view),
                    None => std::future::pending().await,
                }
            })
        }
    }

    /// Each view is applied as its differences from the last: a new member
    /// added, a moved one re-pointed (a new backend), a new role designated,
    /// a member gone removed; the same view again changes nothing. A member
    /// the cluster cannot take (no backend) stays out and is listed.
    #[tokio::test(start_paused = true)]
    async fn a_followed_view_applies_its_differences() {
        use std::sync::{Arc, Mutex};
        use switchyard_core::noop::NoopBackend;

        let cluster = crate::Cluster::<NoopBackend>::builder("main")
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let made = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&made);
        let following = cluster.follow(Script(rx), move |m: &Member| {
            log.lock().unwrap().push(format!("{}:{}", m.name, m.port));
            if m.port == 0 {
                return Err(switchyard_core::Error::Closed);
            }
            Ok(Arc::new(NoopBackend::with_role(m.name.as_str(), m.role)))
        });
        let step = |members: Vec<Member>| {
            tx.send(View::new(members)).unwrap();
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let status = cluster.status();
                let roles: Vec<_> = (status.endpoints.iter())
                    .map(|e| format!("{}={:?}", e.id, e.source_role.unwrap()))
                    .collect();
                let made = std::mem::take(&mut *made.lock().unwrap());
                (
                    roles.join(" "),
                    made.join(" "),
                    status.source.unwrap().changes,
                )
            }
        };
        let first = step(vec![m("a", 1, Role::Primary), m("b", 2, Role::Replica)]).await;
        following.ready(Duration::from_secs(1)).await.unwrap();
        assert_eq!(first, ("a=Primary b=Replica".into(), "a:1 b:2".into(), 1));
        let next = vec![
            m("a", 1, Role::Replica),
            m("b", 2, Role::Primary),
            m("c", 3, Role::Replica),
        ];
        let moved = step(next.clone()).await;
        assert_eq!(
            moved,
            ("a=Replica b=Primary c=Replica".into(), "c:3".into(), 2)
        );
        assert_eq!(step(next).await, (moved.0, String::new(), 2));
        let last = vec![
            m("b", 2, Role::Primary),
            m("c", 4, Role::Replica),
            m("x", 0, Role::Replica),
        ];
        let last = step(last).await;
        assert_eq!(last, ("b=Primary c=Replica".into(), "c:4 x:0".into(), 3));
        let refused = cluster.status().source.unwrap().refused;
        assert_eq!(
            refused.keys().map(EndpointId::as_str).collect::<Vec<_>>(),
            ["x"]
        );
    }

    /// A first view whose every member the cluster refuses leaves nothing to
    /// serve with: `ready` says so, naming each member and why, instead of
    /// `Ok` over an empty cluster. The follower goes on, and the next view's
    /// members are taken in. A view that takes in one member of two is ready.
    #[tokio::test(start_paused = true)]
    async fn ready_fails_when_every_member_of_the_first_view_is_refused() {
        use std::sync::Arc;
        use switchyard_core::noop::NoopBackend;

        let make = |m: &Member| {
            if m.port == 0 {
                return Err(switchyard_core::Error::Config {
                    path: format!("members.{}", m.name),
                    message: format!("no backend for {}", m.name),
                });
            }
            Ok(Arc::new(NoopBackend::with_role(m.name.as_str(), m.role)))
        };
        // A cluster following a script whose first view is `first`.
        let start = |name: &str, first: Vec<Member>| {
            let cluster = crate::Cluster::<NoopBackend>::builder(name)
                .build()
                .unwrap();
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let following = cluster.follow(Script(rx), make);
            tx.send(View::new(first)).unwrap();
            (cluster, tx, following)
        };
        let first = vec![m("a", 0, Role::Primary), m("b", 0, Role::Replica)];
        let (cluster, tx, following) = start("main", first);
        let err = following.ready(Duration::from_secs(1)).await.unwrap_err();
        assert!(
            err.reason.contains("a: ") && err.reason.contains("no backend for b"),
            "{err}"
        );
        tx.send(View::new(vec![m("a", 1, Role::Primary)])).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(cluster.status().endpoints.len(), 1);

        let first = vec![m("a", 1, Role::Primary), m("b", 0, Role::Replica)];
        let (_other, _tx, following) = start("other", first);
        following.ready(Duration::from_secs(1)).await.unwrap();
    }

    /// A source that names `db-1` primary and `db-2` replica once.
    struct Once(bool);
    impl TopologySource for Once {
        fn describe(&self) -> String {
            "once".into()
        }
        fn next(&mut self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
            let first = std::mem::replace(&mut self.0, false);
            Box::pin(async move {
                if !first {
                    std::future::pending::<()>().await;
                }
                Report::View(View::new(vec![
                    m("db-1", 1, Role::Primary),
                    m("db-2", 2, Role::Replica),
                ]))
            })
        }
    }

    /// A member the source adds is what the source says until a probe has
    /// seen it: here `db-2`, listed as a replica, is really a writable master
    /// (a restarted old Redis master, empty) whose first probe is slow. No
    /// read may reach it before that probe; after it, it serves nothing.
    #[tokio::test(start_paused = true)]
    async fn a_member_added_by_the_source_serves_nothing_before_its_first_probe() {
        use std::sync::Arc;
        use switchyard_core::noop::NoopBackend;
        use switchyard_core::Intent;

        let cluster = crate::Cluster::<NoopBackend>::builder("main")
            .build()
            .unwrap();
        cluster
            .follow(Once(true), |m: &Member| {
                let backend = NoopBackend::with_role(m.name.as_str(), Role::Primary);
                if m.name.as_str() == "db-2" {
                    backend.set_probe_rtt(Duration::from_millis(500));
                }
                Ok(Arc::new(backend))
            })
            .ready(Duration::from_secs(1))
            .await
            .unwrap();
        // db-1's probe has passed; db-2's is still under way.
        tokio::time::sleep(Duration::from_millis(10)).await;
        for _ in 0..20 {
            let read = cluster.checkout(Intent::Read, None).await.unwrap();
            assert_eq!(read.endpoint().as_str(), "db-1");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let db2 = cluster.status();
        let db2 = db2.endpoint("db-2").unwrap();
        assert!(db2.probe_rtt.is_some(), "probed: {db2:?}");
        assert!(!db2.serves_reads, "{db2:?}");
        for _ in 0..20 {
            let read = cluster.checkout(Intent::Read, None).await.unwrap();
            assert_eq!(read.endpoint().as_str(), "db-1");
        }
    }

    #[test]
    fn a_replica_that_probes_primary_serves_nothing() {
        use Role::*;
        assert_eq!(effective_role(None, Primary), Some(Primary));
        assert_eq!(effective_role(Some(Primary), Primary), Some(Primary));
        assert_eq!(effective_role(Some(Primary), Replica), Some(Replica));
        assert_eq!(effective_role(Some(Replica), Replica), Some(Replica));
        assert_eq!(effective_role(Some(Replica), Primary), None);
        assert_eq!(effective_role(Some(Replica), Standalone), Some(Standalone));
    }
}
