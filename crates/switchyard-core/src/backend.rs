//! The `Backend` contract: what every engine crate implements for one endpoint.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
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

/// One engine's driver for one endpoint.
///
/// A backend owns the driver's own pool (or client) for its endpoint and knows
/// five things: how to get a connection before a deadline, how to probe the
/// endpoint's health and role, how to confine a connection to one tenant, how to
/// undo that, and how full its pool is. Everything else (balancing, retries,
/// quotas, health state, metrics) belongs to the router and the [`Checkout`]
/// guard, as deadpool keeps hooks and timeouts out of its `Manager`.
///
/// # Tenant scope contract
///
/// [`acquire`](Backend::acquire) is told the scope so that a backend can pick a
/// per-tenant pool (database isolation) or prefer a connection already scoped to
/// that tenant (affinity). Afterwards the guard calls [`scope`](Backend::scope),
/// which must leave the connection serving exactly that tenant whatever it served
/// before; on return [`release`](Backend::release) must undo the scope or discard
/// the connection. A connection is never handed out or pooled carrying a scope
/// other than the one asked for.
///
/// The futures are `Send` so router code can move them into `tokio::spawn`.
///
/// [`Checkout`]: crate::Checkout
pub trait Backend: Send + Sync + 'static {
    /// The connection a checkout derefs to.
    type Connection: Send + 'static;

    /// The endpoint this backend serves.
    fn endpoint(&self) -> &EndpointId;

    /// Gets a connection, giving up at `deadline` with [`Error::Timeout`].
    fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Self::Connection, Error>> + Send;

    /// Confines `conn` to `scope`'s tenant, replacing any previous scope.
    fn scope(
        &self,
        conn: &mut Self::Connection,
        scope: &TenantScope,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Undoes [`scope`](Backend::scope) so `conn` can serve anyone again.
    fn unscope(
        &self,
        conn: &mut Self::Connection,
        scope: &TenantScope,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Closes `conn` instead of returning it to the pool.
    fn discard(&self, conn: Self::Connection);

    /// Checks liveness and reports role, lag and version.
    fn probe(&self, timeout: Duration) -> impl Future<Output = Result<Probe, Error>> + Send;

    /// Current pool occupancy.
    fn stats(&self) -> PoolStats;

    /// Refuses a tier this engine cannot serve safely, when a cluster is
    /// built or its tenants or endpoints change: above all a name template
    /// that can render a reserved or shared namespace (a system database,
    /// the row tier's shared one) for some tenant
    /// ([`TierPolicy::refuse_reserved`]). The default accepts every tier.
    fn validate_tier(&self, tier: &str, policy: &TierPolicy) -> Result<(), Error> {
        let _ = (tier, policy);
        Ok(())
    }

    /// Gives a connection back after a checkout.
    ///
    /// The default discards it when `healthy` is false, returns an unscoped one
    /// as is, and otherwise undoes the scope on a background task, discarding the
    /// connection if that fails, so [`Drop`] never blocks. Backends override this
    /// when their driver has a cheaper return path (a pool hook, an affinity
    /// stash).
    fn release(
        self: Arc<Self>,
        conn: Self::Connection,
        scope: Option<Arc<TenantScope>>,
        healthy: bool,
    ) {
        if !healthy {
            self.discard(conn);
            return;
        }
        let Some(scope) = scope else {
            drop(conn);
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let mut conn = conn;
                    match self.unscope(&mut conn, &scope).await {
                        Ok(()) => drop(conn),
                        Err(error) => {
                            tracing::warn!(
                                endpoint = %self.endpoint(),
                                tenant = %scope.tenant(),
                                %error,
                                "tenant scope reset failed; connection discarded"
                            );
                            self.discard(conn);
                        }
                    }
                });
            }
            // No runtime left to run the reset on: never pool a scoped connection.
            Err(_) => self.discard(conn),
        }
    }
}
