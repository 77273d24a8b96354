//! A backend with no engine behind it, for the router's unit tests and for
//! measuring pure routing overhead.
//!
//! It never stands in for a real engine in an engine test: it has no data and
//! no isolation to get wrong. What it offers is control: a role to report,
//! faults to inject (down, slow, failing scope or recycle) and counters to
//! assert on.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{Backend, PoolStats, Probe, Recycle, Returned, Role};
use crate::endpoint::EndpointId;
use crate::gate::{FairGate, GatePermit};
use crate::history::History;
use crate::tenant::{TenantId, TenantScope};
use crate::{BackendErrorKind, Error};

/// A connection from a [`NoopBackend`]: an id and the tenant its session last
/// served.
#[derive(Debug)]
pub struct NoopConnection {
    /// Sequence number of the connection within its backend.
    pub id: u64,
    /// The tenant the connection's session last served (its owner).
    pub tenant: Option<TenantId>,
    /// The place it holds in a bounded backend's pool.
    _permit: Option<GatePermit>,
}

/// Counters of what a [`NoopBackend`] was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoopCounters {
    /// Connections handed out.
    pub acquired: u64,
    /// Scopes applied.
    pub scoped: u64,
    /// Returned scoped connections whose session was reset by `recycle`.
    pub recycled: u64,
    /// Connections discarded.
    pub discarded: u64,
    /// Probes answered.
    pub probes: u64,
    /// Connections currently alive: handed out and not yet given back
    /// (released, kept or discarded). A connection dropped without being
    /// given back stays counted: the return path leaked it.
    pub live: u64,
}

/// The counters, those every checkout moves first.
#[derive(Debug, Default)]
#[repr(C)]
struct State {
    acquired: AtomicU64,
    live: AtomicU64,
    scoped: AtomicU64,
    recycled: AtomicU64,
    discarded: AtomicU64,
    probes: AtomicU64,
}

/// A backend that hands out [`NoopConnection`]s instantly.
///
/// Laid out in order, what an unscoped checkout and its release read and
/// move first, from a cache line's start: a routed checkout over 1,024 of
/// them, which no cache holds, touches one line of the one it picks.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct NoopBackend {
    acquire_delay_ns: AtomicU64,
    /// Bounds the connections out at once, when set ([`NoopBackend::with_max_size`]).
    gate: Option<Arc<FairGate>>,
    down: AtomicBool,
    /// Scoped connections come back clean, as an engine's whose scope is
    /// per request (a key prefix, a filter) rather than session state.
    clean_returns: bool,
    state: State,
    endpoint: EndpointId,
    role: AtomicU8,
    fail_scope: AtomicBool,
    fail_recycle: AtomicBool,
    scope_delay_ns: AtomicU64,
    confirm_delay_ns: AtomicU64,
    probe_rtt_ns: AtomicU64,
    /// What probes report besides the role: history and streaming.
    replication: Mutex<(Option<History>, Option<bool>)>,
}

impl NoopBackend {
    /// A healthy primary named `endpoint`.
    pub fn new(endpoint: impl Into<Arc<str>>) -> Self {
        Self {
            endpoint: EndpointId::new(endpoint),
            role: AtomicU8::new(role_to_u8(Role::Primary)),
            down: AtomicBool::new(false),
            fail_scope: AtomicBool::new(false),
            fail_recycle: AtomicBool::new(false),
            clean_returns: false,
            acquire_delay_ns: AtomicU64::new(0),
            scope_delay_ns: AtomicU64::new(0),
            confirm_delay_ns: AtomicU64::new(0),
            probe_rtt_ns: AtomicU64::new(0),
            replication: Mutex::new((None, None)),
            state: State::default(),
            gate: None,
        }
    }

    /// Bounds the connections out at once to `max_size`: checkouts beyond it
    /// wait, in turn by tenant, like those of an engine's full pool.
    pub fn with_max_size(self, max_size: u32) -> Self {
        self.with_gate(FairGate::new(max_size))
    }

    /// [`with_max_size`](Self::with_max_size) with a gate of the caller's
    /// (another linger, say).
    pub fn with_gate(mut self, gate: Arc<FairGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Scoped connections come back clean (no reset on a task), as those of
    /// an engine whose scope is part of each request rather than of the
    /// session (Elasticsearch, ClickHouse, MongoDB).
    pub fn with_clean_returns(mut self) -> Self {
        self.clean_returns = true;
        self
    }

    /// A healthy endpoint reporting `role`.
    pub fn with_role(endpoint: impl Into<Arc<str>>, role: Role) -> Self {
        let b = Self::new(endpoint);
        b.set_role(role);
        b
    }

    /// Changes the role reported by probes (promotion, demotion).
    pub fn set_role(&self, role: Role) {
        self.role.store(role_to_u8(role), Ordering::Relaxed);
    }

    /// The role probes report.
    pub fn role(&self) -> Role {
        role_from_u8(self.role.load(Ordering::Relaxed))
    }

    /// Makes acquire and probe fail as a refused connection would.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Makes every acquire take `delay` (a slow or hung node).
    pub fn set_acquire_delay(&self, delay: Duration) {
        self.acquire_delay_ns.store(nanos(delay), Ordering::Relaxed);
    }

    /// Makes applying a scope take `delay`.
    pub fn set_scope_delay(&self, delay: Duration) {
        self.scope_delay_ns.store(nanos(delay), Ordering::Relaxed);
    }

    /// Makes every causal confirmation take `delay` (a node that hangs
    /// after handing out a connection).
    pub fn set_confirm_delay(&self, delay: Duration) {
        self.confirm_delay_ns.store(nanos(delay), Ordering::Relaxed);
    }

    /// Makes probes take `rtt`.
    pub fn set_probe_rtt(&self, rtt: Duration) {
        self.probe_rtt_ns.store(nanos(rtt), Ordering::Relaxed);
    }

    /// Makes probes report `history` and, for a replica, whether it is
    /// `streaming`.
    pub fn set_replication(&self, history: Option<History>, streaming: Option<bool>) {
        *self
            .replication
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (history, streaming);
    }

    /// Makes applying a scope fail.
    pub fn set_fail_scope(&self, fail: bool) {
        self.fail_scope.store(fail, Ordering::Relaxed);
    }

    /// Makes the recycle step of a returned scoped connection answer discard.
    pub fn set_fail_recycle(&self, fail: bool) {
        self.fail_recycle.store(fail, Ordering::Relaxed);
    }

    /// What the backend has been asked to do so far.
    pub fn counters(&self) -> NoopCounters {
        let s = &self.state;
        NoopCounters {
            acquired: s.acquired.load(Ordering::Relaxed),
            scoped: s.scoped.load(Ordering::Relaxed),
            recycled: s.recycled.load(Ordering::Relaxed),
            discarded: s.discarded.load(Ordering::Relaxed),
            probes: s.probes.load(Ordering::Relaxed),
            live: s.live.load(Ordering::Relaxed),
        }
    }

    fn refused(&self) -> Error {
        Error::backend(
            &self.endpoint,
            None,
            BackendErrorKind::Connect,
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        )
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn delay(ns: &AtomicU64) -> Option<Duration> {
    match ns.load(Ordering::Relaxed) {
        0 => None,
        n => Some(Duration::from_nanos(n)),
    }
}

fn role_to_u8(role: Role) -> u8 {
    match role {
        Role::Primary => 0,
        Role::Replica => 1,
        Role::Standalone => 2,
    }
}

fn role_from_u8(v: u8) -> Role {
    match v {
        0 => Role::Primary,
        1 => Role::Replica,
        _ => Role::Standalone,
    }
}

/// Causal positions are the history set with
/// [`set_replication`](NoopBackend::set_replication): a write reached it, a
/// node has applied what it covers. Confirmations take
/// [`set_confirm_delay`](NoopBackend::set_confirm_delay).
impl crate::causal::CausalBackend for NoopBackend {
    async fn written(
        &self,
        _conn: &mut NoopConnection,
        _line: Option<&History>,
    ) -> Result<History, Error> {
        self.history().ok_or_else(|| Error::Causal {
            cluster: self.endpoint.to_string(),
            reason: crate::causal::CausalError::Unsupported,
        })
    }

    async fn confirm(
        &self,
        _conn: &mut NoopConnection,
        token: &crate::causal::CausalToken,
        _line: Option<&History>,
    ) -> Result<crate::causal::Coverage, Error> {
        if let Some(d) = delay(&self.confirm_delay_ns) {
            tokio::time::sleep(d).await;
        }
        Ok(self
            .history()
            .map_or(crate::causal::Coverage::NotYet, |h| token.covered_by(&h)))
    }
}

impl NoopBackend {
    fn history(&self) -> Option<History> {
        self.replication
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }
}

impl Backend for NoopBackend {
    type Connection = NoopConnection;

    fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    async fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<NoopConnection, Error> {
        if let Some(d) = delay(&self.acquire_delay_ns) {
            let started = Instant::now();
            let ready = started + d;
            tokio::time::sleep_until(deadline.min(ready)).await;
            if ready > deadline {
                return Err(Error::Timeout {
                    endpoint: self.endpoint.clone(),
                    tenant: None,
                    elapsed: started.elapsed(),
                });
            }
        }
        if self.down.load(Ordering::Relaxed) {
            return Err(self.refused());
        }
        let permit = match &self.gate {
            Some(gate) => Some(gate.acquire_for(&self.endpoint, scope, deadline).await?),
            None => None,
        };
        let s = &self.state;
        s.live.fetch_add(1, Ordering::Relaxed);
        Ok(NoopConnection {
            // The sequence number is the count of connections handed out.
            id: s.acquired.fetch_add(1, Ordering::Relaxed),
            tenant: None,
            _permit: permit,
        })
    }

    async fn scope(&self, conn: &mut NoopConnection, scope: &TenantScope) -> Result<(), Error> {
        if let Some(d) = delay(&self.scope_delay_ns) {
            tokio::time::sleep(d).await;
        }
        if self.fail_scope.load(Ordering::Relaxed) {
            return Err(Error::Scope {
                endpoint: self.endpoint.clone(),
                tenant: scope.tenant().clone(),
                action: "apply",
                source: "injected scope failure".into(),
            });
        }
        self.state.scoped.fetch_add(1, Ordering::Relaxed);
        conn.tenant = Some(scope.tenant().clone());
        Ok(())
    }

    async fn probe(&self, _timeout: Duration) -> Result<Probe, Error> {
        self.state.probes.fetch_add(1, Ordering::Relaxed);
        let rtt = delay(&self.probe_rtt_ns).unwrap_or_default();
        if !rtt.is_zero() {
            tokio::time::sleep(rtt).await;
        }
        if self.down.load(Ordering::Relaxed) {
            return Err(self.refused());
        }
        let mut probe = Probe::new(self.role(), rtt);
        (probe.history, probe.streaming) = self
            .replication
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(probe)
    }

    /// A connection that served a tenant is dirty: its owner must be reset.
    fn inspect(&self, conn: &mut NoopConnection) -> Returned {
        if conn.tenant.is_some() && !self.clean_returns {
            Returned::Dirty
        } else {
            Returned::Clean
        }
    }

    async fn recycle(&self, conn: &mut NoopConnection) -> Recycle {
        if self.fail_recycle.load(Ordering::Relaxed) {
            return Recycle::Discard;
        }
        self.state.recycled.fetch_add(1, Ordering::Relaxed);
        conn.tenant = None;
        Recycle::Keep
    }

    fn release(&self, conn: NoopConnection, recycle: Recycle) {
        if recycle == Recycle::Discard {
            self.state.discarded.fetch_add(1, Ordering::Relaxed);
        }
        self.state.live.fetch_sub(1, Ordering::Relaxed);
        drop(conn);
    }

    fn stats(&self) -> PoolStats {
        let live = u32::try_from(self.state.live.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        let max_size = self.gate.as_ref().map_or(u32::MAX, |gate| {
            u32::try_from(gate.permits()).unwrap_or(u32::MAX)
        });
        PoolStats {
            size: live,
            idle: 0,
            max_size,
            tenant_pools: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkout_touches_one_line_of_the_backend() {
        use std::mem::{offset_of, size_of};
        // From the delay to the last counter a checkout and its release move.
        let hot_end = offset_of!(NoopBackend, state) + offset_of!(State, live) + size_of::<u64>();
        assert!(hot_end <= 64, "the checkout path spans {hot_end} bytes");
        assert!(offset_of!(NoopBackend, down) < 64 && offset_of!(NoopBackend, gate) < 64);
        assert_eq!(std::mem::align_of::<NoopBackend>(), 64);
    }

    #[tokio::test(start_paused = true)]
    async fn reports_role_and_faults() {
        let b = NoopBackend::with_role("r1", Role::Replica);
        assert_eq!(
            b.probe(Duration::from_secs(1)).await.unwrap().role,
            Role::Replica
        );
        b.set_role(Role::Primary);
        assert_eq!(
            b.probe(Duration::from_secs(1)).await.unwrap().role,
            Role::Primary
        );
        b.set_down(true);
        let err = b.probe(Duration::from_secs(1)).await.unwrap_err();
        assert!(err.is_endpoint_failure());
        let deadline = Instant::now() + Duration::from_secs(1);
        assert!(b.acquire(None, deadline).await.is_err());
        assert_eq!(b.counters().probes, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn counts_live_connections_until_given_back() {
        let b = NoopBackend::new("n");
        let deadline = Instant::now() + Duration::from_secs(1);
        let c1 = b.acquire(None, deadline).await.unwrap();
        let c2 = b.acquire(None, deadline).await.unwrap();
        let c3 = b.acquire(None, deadline).await.unwrap();
        assert_eq!((c1.id, c2.id, c3.id), (0, 1, 2));
        assert_eq!(b.stats().in_use(), 3);
        b.release(c1, Recycle::Keep);
        b.release(c2, Recycle::Discard);
        // Dropped without the return path: a leak, and counted as one.
        drop(c3);
        let c = b.counters();
        assert_eq!((c.acquired, c.discarded, c.live), (3, 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_bounded_backend_queues_checkouts_in_turn() {
        let b = Arc::new(NoopBackend::new("n").with_max_size(1));
        assert_eq!(b.stats().max_size, 1);
        let far = Instant::now() + Duration::from_secs(60);
        let held = b.acquire(None, far).await.unwrap();
        let started = Instant::now();
        let soon = started + Duration::from_millis(20);
        let err = b.acquire(None, soon).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        b.release(held, Recycle::Keep);
        let again = b.acquire(None, soon).await.unwrap();
        assert_eq!(again.id, 1);
    }
}
