//! The `Backend` contract: what every engine crate implements for one endpoint.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::endpoint::EndpointId;
use crate::history::History;
use crate::registry::TierPolicy;
use crate::tenant::TenantScope;
use crate::Error;

/// What a checkout is for: writes go to the primary, reads prefer replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Intent {
    /// A read; may be served by a replica, falls back to the primary.
    Read,
    /// A write; served by the primary only.
    Write,
}

impl fmt::Display for Intent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Intent::Read => "read",
            Intent::Write => "write",
        })
    }
}

/// The replication role an endpoint reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes.
    Primary,
    /// Read-only copy of a primary.
    Replica,
    /// The engine has no primary/replica notion (every node takes writes, or the
    /// cluster routes internally).
    Standalone,
}

impl Role {
    /// Whether this endpoint accepts writes.
    pub fn is_writable(self) -> bool {
        matches!(self, Role::Primary | Role::Standalone)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Standalone => "standalone",
        })
    }
}

/// What one health probe of an endpoint found.
///
/// Built with [`Probe::new`] and its fields set one by one, so fields can be
/// added without breaking engines.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Probe {
    /// The endpoint's current role.
    pub role: Role,
    /// How far a replica is behind its primary in time, where the engine reports it.
    pub lag: Option<Duration>,
    /// How far a replica is behind in bytes or offsets (WAL bytes, replication offset).
    pub lag_bytes: Option<u64>,
    /// The server's version string, where the engine reports it.
    pub version: Option<String>,
    /// Round-trip time of the probe.
    pub rtt: Duration,
    /// Where the endpoint stands in the engine's own replication history: the
    /// line a primary writes or a replica follows. `None` where the engine
    /// keeps no such history (or the probe could not read it).
    pub history: Option<History>,
    /// On a replica, whether it is receiving its primary's stream right now
    /// (a PostgreSQL WAL receiver in `streaming`, a Redis link `up`). A
    /// replica that is not has unknown lag. `None` where the engine does not
    /// say, and on primaries.
    pub streaming: Option<bool>,
    /// On a replica, whether the engine says its data set is not a copy of
    /// its primary's at any point in time: it has not completed a sync since
    /// it started or became a replica (an empty restarted node, a demoted
    /// primary still holding its own writes), or a full resync is replacing
    /// it (Redis: `master_link_down_since_seconds:-1`,
    /// `master_sync_in_progress:1`). Its lag is not a delay but
    /// a different data set, so it serves no reads, whatever
    /// `max_replica_lag` says. `false` where the engine does not say.
    pub unsynced: bool,
}

impl Probe {
    /// A probe result with only the role and round-trip time known.
    pub fn new(role: Role, rtt: Duration) -> Self {
        Self {
            role,
            lag: None,
            lag_bytes: None,
            version: None,
            rtt,
            history: None,
            streaming: None,
            unsynced: false,
        }
    }
}

/// A point-in-time view of one endpoint's pool(s).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Connections open (idle plus in use).
    pub size: u32,
    /// Connections open and idle.
    pub idle: u32,
    /// Most connections the pool may open.
    pub max_size: u32,
    /// Per-tenant pools open (database isolation), 0 when not applicable.
    pub tenant_pools: u32,
}

impl PoolStats {
    /// Connections currently checked out.
    pub fn in_use(&self) -> u32 {
        self.size.saturating_sub(self.idle)
    }
}

/// What a returned connection needs, from a look that does no I/O
/// ([`Backend::inspect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// Nothing to undo: it goes straight back ([`Recycle::Keep`]), no task spawned.
    Clean,
    /// Its session may carry state: [`Backend::recycle`] runs first, on a task.
    Dirty,
    /// It cannot be vouched for (broken socket, abandoned query): discarded.
    Broken,
}

/// The answer of the recycle step, and what [`Backend::release`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recycle {
    /// The connection is clean: pool it (or hand it to a waiting checkout).
    Keep,
    /// The connection cannot be proven clean: close it.
    Discard,
}

/// One engine's driver for one endpoint.
///
/// A backend owns the connections (or the driver's client) for its endpoint,
/// as deadpool's `Manager` does, and knows: how to get a connection before a
/// deadline, how to confine it to one tenant, how to probe the endpoint's
/// health and role, how full its pool is, and how to take a connection back
/// (one cheap look, one async recycle step that answers keep or discard, and
/// the final keep-or-close). Everything else (balancing, retries, quotas,
/// health state, metrics) belongs to the router and the [`Checkout`] guard.
///
/// # Owners and the return path
///
/// A connection records which owner its session last served: a tenant scope,
/// or none for an unscoped checkout. [`acquire`](Backend::acquire) is told the
/// owner it serves next, so that a backend can pick a per-tenant pool
/// (database isolation) or prefer a connection that last served the same owner
/// (affinity); handing a connection to a different owner means a complete
/// reset of its session, not only of the scope. [`scope`](Backend::scope) must
/// leave the connection serving exactly that tenant whatever it served before.
///
/// The guard drives the return path, written once in core: a connection whose
/// checkout reported an endpoint failure is released with [`Recycle::Discard`];
/// otherwise [`inspect`](Backend::inspect) decides without I/O whether it is
/// [`Clean`](Returned::Clean) (released with [`Recycle::Keep`] at once),
/// [`Broken`](Returned::Broken) (discarded) or [`Dirty`](Returned::Dirty): then
/// [`recycle`](Backend::recycle) runs on a spawned task and its answer goes to
/// [`release`](Backend::release). With no runtime to spawn on, a dirty
/// connection is discarded. A connection is never pooled carrying state that
/// another owner could see.
///
/// The futures are `Send` so router code can move them into `tokio::spawn`.
///
/// # Cancel safety
///
/// A connection whose `scope` future is dropped half-way is released with
/// [`Recycle::Discard`] by the guard. `recycle` runs on its own task and is
/// never cancelled; it must bound its own I/O (a reset timeout).
///
/// [`Checkout`]: crate::Checkout
pub trait Backend: Send + Sync + 'static {
    /// The connection a checkout derefs to.
    type Connection: Send + 'static;

    /// The endpoint this backend serves.
    fn endpoint(&self) -> &EndpointId;

    /// Gets a connection for `scope`'s tenant (or for no tenant), giving up at
    /// `deadline` with [`Error::Timeout`].
    fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Self::Connection, Error>> + Send;

    /// Confines `conn` to `scope`'s tenant, replacing whatever it served before.
    fn scope(
        &self,
        conn: &mut Self::Connection,
        scope: &TenantScope,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Checks liveness and reports role, lag and version.
    fn probe(&self, timeout: Duration) -> impl Future<Output = Result<Probe, Error>> + Send;

    /// Current pool occupancy.
    fn stats(&self) -> PoolStats;

    /// Looks at a returned connection without I/O: clean, dirty or broken.
    fn inspect(&self, conn: &mut Self::Connection) -> Returned;

    /// Undoes what a [`Dirty`](Returned::Dirty) connection's session carries,
    /// answering whether it can be kept. The default keeps it, for engines
    /// whose [`inspect`](Backend::inspect) never answers `Dirty` (the scope
    /// lives in the handle, nothing on the server).
    fn recycle(&self, conn: &mut Self::Connection) -> impl Future<Output = Recycle> + Send {
        let _ = conn;
        std::future::ready(Recycle::Keep)
    }

    /// Takes a connection back for good: pools it ([`Recycle::Keep`]) or
    /// closes it ([`Recycle::Discard`]). Never blocks.
    fn release(&self, conn: Self::Connection, recycle: Recycle);

    /// Refuses a tier this engine cannot serve safely, when a cluster is
    /// built or its tenants or endpoints change: above all a name template
    /// that can render a reserved or shared namespace (a system database,
    /// the row tier's shared one) for some tenant
    /// ([`TierPolicy::refuse_reserved`]). The default accepts every tier.
    fn validate_tier(&self, tier: &str, policy: &TierPolicy) -> Result<(), Error> {
        let _ = (tier, policy);
        Ok(())
    }
}
