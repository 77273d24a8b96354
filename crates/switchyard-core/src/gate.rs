//! A counting semaphore whose waiters are served by a [`FairQueue`]: the wait
//! path of engines whose driver keeps its own pool (Redis, MongoDB,
//! ClickHouse, Elasticsearch). With as many permits as the driver pool has
//! connections, the gate in front of it is where checkouts wait, so they wait
//! in turn by tenant; the driver's pool never makes anyone wait.
//!
//! A released permit goes straight to the next waiter (never back to the
//! count while someone waits), and a new checkout never takes a permit ahead
//! of waiters. A waiter that gives up (deadline, or its future dropped) takes
//! itself out of the queue; one that was granted a permit in the same instant
//! passes it on, so cancellation leaves no trace.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use switchyard_core::{FairGate, GateError};
//! use tokio::time::Instant;
//!
//! let gate = FairGate::new(1);
//! let soon = Instant::now() + Duration::from_millis(10);
//! let held = gate.acquire(None, soon).await.unwrap();
//! assert_eq!(gate.acquire(None, soon).await.unwrap_err(), GateError::Timeout);
//! drop(held);
//! assert_eq!(gate.available(), 1);
//! # }
//! ```

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backend::PoolStats;
use crate::endpoint::EndpointId;
use crate::error::Error;
use crate::fair::{FairQueue, QueueClass, WaitKey};
use crate::tenant::TenantScope;

/// Why [`FairGate::acquire`] gave no permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// The deadline passed first.
    #[error("no permit before the deadline")]
    Timeout,
    /// The gate was closed.
    #[error("the gate is closed")]
    Closed,
}

struct State {
    available: usize,
    queue: FairQueue<oneshot::Sender<()>>,
    closed: bool,
}

/// A semaphore with fair queuing between tenants (see the module docs).
pub struct FairGate {
    permits: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for FairGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("FairGate")
            .field("permits", &self.permits)
            .field("available", &state.available)
            .field("waiting", &state.queue.len())
            .finish()
    }
}

impl FairGate {
    /// A gate of `permits` permits.
    pub fn new(permits: u32) -> Arc<Self> {
        let permits = usize::try_from(permits).unwrap_or(usize::MAX);
        Arc::new(Self {
            permits,
            state: Mutex::new(State {
                available: permits,
                queue: FairQueue::new(),
                closed: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a permit for a checkout of `scope` (or of no tenant), waiting in
    /// turn with other tenants until `deadline` at most.
    pub async fn acquire(
        self: &Arc<Self>,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<GatePermit, GateError> {
        let mut waiting = {
            let mut state = self.lock();
            if state.closed {
                return Err(GateError::Closed);
            }
            if state.available > 0 && state.queue.is_empty() {
                state.available -= 1;
                return Ok(GatePermit(Arc::clone(self)));
            }
            let (class, weight) = QueueClass::of(scope);
            let (tx, rx) = oneshot::channel();
            let key = state.queue.push(class, weight, tx);
            Waiting {
                gate: self,
                key: Some(key),
                rx,
            }
        };
        let granted = tokio::time::timeout_at(deadline, &mut waiting.rx).await;
        match granted {
            Ok(Ok(())) => {
                waiting.key = None;
                Ok(GatePermit(Arc::clone(self)))
            }
            Ok(Err(_)) => {
                waiting.key = None;
                Err(GateError::Closed)
            }
            Err(_elapsed) => Err(GateError::Timeout),
        }
    }

    /// [`acquire`](Self::acquire) for a checkout on `endpoint`, as every
    /// engine's `Backend::acquire` reports it: the deadline passing is
    /// [`Error::Timeout`] naming the endpoint, the tenant and the time waited,
    /// a closed gate [`Error::Closed`].
    pub async fn acquire_for(
        self: &Arc<Self>,
        endpoint: &EndpointId,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<GatePermit, Error> {
        let started = Instant::now();
        self.acquire(scope, deadline).await.map_err(|e| match e {
            GateError::Closed => Error::Closed,
            GateError::Timeout => Error::Timeout {
                endpoint: endpoint.clone(),
                tenant: scope.map(|s| s.tenant().clone()),
                elapsed: started.elapsed(),
            },
        })
    }

    /// Permits free now.
    pub fn available(&self) -> usize {
        self.lock().available
    }

    /// The number of permits.
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// The gate as an engine's pool statistics, when its checkouts are the
    /// gate's permits and it pools nothing itself (the HTTP engines): in use
    /// is the permits taken, nothing idle.
    pub fn stats(&self) -> PoolStats {
        let max_size = u32::try_from(self.permits).unwrap_or(u32::MAX);
        let available = u32::try_from(self.available()).unwrap_or(u32::MAX);
        PoolStats {
            size: max_size.saturating_sub(available),
            idle: 0,
            max_size,
            tenant_pools: 0,
        }
    }

    /// Checkouts waiting.
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    /// Closes the gate: waiters and later checkouts get [`GateError::Closed`];
    /// permits held stay valid.
    pub fn close(&self) {
        let waiters = {
            let mut state = self.lock();
            state.closed = true;
            state.queue.drain()
        };
        drop(waiters);
    }

    /// A permit came back: to the next waiter in turn, else to the count.
    fn release(&self) {
        let mut state = self.lock();
        while let Some((_, tx)) = state.queue.pop() {
            // A waiter leaves the queue before its receiver goes, so this
            // succeeds; a failure would only mean trying the next one.
            if tx.send(()).is_ok() {
                return;
            }
        }
        state.available += 1;
    }
}

/// One permit of a [`FairGate`], handed on when dropped.
#[must_use = "the permit is released when dropped"]
pub struct GatePermit(Arc<FairGate>);

impl std::fmt::Debug for GatePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatePermit")
    }
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A queued acquire; takes itself out of the queue if dropped while waiting.
struct Waiting<'a> {
    gate: &'a Arc<FairGate>,
    /// `Some` until the wait ends with a permit or a closed gate.
    key: Option<WaitKey>,
    rx: oneshot::Receiver<()>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let granted = {
            let mut state = self.gate.lock();
            if state.queue.remove(&key).is_some() {
                return;
            }
            // Already popped: a permit may have been sent in the meantime.
            self.rx.close();
            self.rx.try_recv().is_ok()
        };
        if granted {
            self.gate.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{TenantRegistry, TierPolicy};
    use crate::tenant::{Isolation, TenantId};
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn registry() -> TenantRegistry {
        TenantRegistry::new()
            .with_tier("free", TierPolicy::new(Isolation::Row))
            .with_tier(
                "gold",
                TierPolicy::new(Isolation::Row).with_queue_weight(NonZeroU32::new(3).unwrap()),
            )
            .with_tier(
                "internal",
                TierPolicy::new(Isolation::Row).with_queue(crate::QueueOrder::Fifo),
            )
            .with_default_tier("free")
            .with_tenant(TenantId::new("big").unwrap(), "gold")
            .with_tenant(TenantId::new("ops1").unwrap(), "internal")
            .with_tenant(TenantId::new("ops2").unwrap(), "internal")
    }

    fn scope(registry: &TenantRegistry, name: &str) -> Arc<TenantScope> {
        let entry = registry.resolve(&TenantId::new(name).unwrap()).unwrap();
        Arc::clone(entry.scope())
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Queues one waiter per name (in order) behind a full gate, frees the
    /// permit, and returns the order in which they were served.
    async fn served_order(gate: &Arc<FairGate>, names: &[Option<&str>]) -> Vec<String> {
        let registry = registry();
        let held = gate.acquire(None, far()).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, name) in names.iter().enumerate() {
            let scope = name.map(|n| scope(&registry, n));
            let gate = Arc::clone(gate);
            let tx = tx.clone();
            let label = format!("{}{}", name.unwrap_or("-"), i);
            tokio::spawn(async move {
                let permit = gate.acquire(scope.as_deref(), far()).await.unwrap();
                tx.send(label).unwrap();
                // Hold it a moment so every later grant is a hand-off.
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(permit);
            });
            // Queue them in exactly this order.
            tokio::task::yield_now().await;
        }
        drop(tx);
        assert_eq!(gate.waiting(), names.len());
        drop(held);
        let mut order = Vec::new();
        while let Some(label) = rx.recv().await {
            order.push(label);
        }
        order
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_tenants_are_served_in_turn() {
        let gate = FairGate::new(1);
        let order = served_order(
            &gate,
            &[
                Some("noisy"),
                Some("noisy"),
                Some("noisy"),
                Some("quiet"),
                None,
                Some("quiet"),
            ],
        )
        .await;
        assert_eq!(
            order,
            ["noisy0", "quiet3", "-4", "noisy1", "quiet5", "noisy2"]
        );
        assert_eq!((gate.available(), gate.waiting()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tiers_weight_is_its_tenants_grants_per_turn() {
        let gate = FairGate::new(1);
        let mut names = vec![Some("big"); 4];
        names.extend([Some("small"), Some("small")]);
        let order = served_order(&gate, &names).await;
        assert_eq!(order, ["big0", "big1", "big2", "small4", "big3", "small5"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fifo_tier_queues_its_tenants_together() {
        let gate = FairGate::new(1);
        let order = served_order(
            &gate,
            &[Some("ops1"), Some("ops1"), Some("ops2"), Some("other")],
        )
        .await;
        // ops2 waits behind ops1 (one class), other takes the second turn.
        assert_eq!(order, ["ops10", "other3", "ops11", "ops22"]);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_for_names_the_endpoint_tenant_and_wait() {
        let gate = FairGate::new(1);
        let registry = registry();
        let quiet = scope(&registry, "quiet");
        let endpoint = EndpointId::new("ep-1");
        let held = gate.acquire_for(&endpoint, None, far()).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(250);
        let err = gate
            .acquire_for(&endpoint, Some(&quiet), deadline)
            .await
            .unwrap_err();
        match err {
            Error::Timeout {
                endpoint: ep,
                tenant,
                elapsed,
            } => {
                assert_eq!(ep, endpoint);
                assert_eq!(tenant.as_ref(), Some(quiet.tenant()));
                assert_eq!(elapsed, Duration::from_millis(250));
            }
            other => panic!("{other:?}"),
        }
        drop(held);
        gate.close();
        let err = gate.acquire_for(&endpoint, None, far()).await.unwrap_err();
        assert!(matches!(err, Error::Closed), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_exact_and_leaves_no_trace() {
        let gate = FairGate::new(1);
        let registry = registry();
        let held = gate.acquire(None, far()).await.unwrap();
        let started = Instant::now();
        let quiet = scope(&registry, "quiet");
        let deadline = started + Duration::from_millis(250);
        let err = gate.acquire(Some(&quiet), deadline).await.unwrap_err();
        assert_eq!(err, GateError::Timeout);
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(gate.waiting(), 0);
        assert_eq!(gate.lock().queue.classes(), 0);
        drop(held);
        assert_eq!(gate.available(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_leaves_no_trace() {
        let gate = FairGate::new(1);
        let held = gate.acquire(None, far()).await.unwrap();
        let mut waiter = Box::pin(gate.acquire(None, far()));
        assert!(futures_poll(&mut waiter).is_none());
        assert_eq!(gate.waiting(), 1);
        drop(waiter);
        assert_eq!((gate.waiting(), gate.lock().queue.classes()), (0, 0));
        drop(held);
        assert_eq!(gate.available(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropped_after_its_grant_passes_the_permit_on() {
        let gate = FairGate::new(1);
        let held = gate.acquire(None, far()).await.unwrap();
        let mut first = Box::pin(gate.acquire(None, far()));
        let mut second = Box::pin(gate.acquire(None, far()));
        assert!(futures_poll(&mut first).is_none());
        assert!(futures_poll(&mut second).is_none());
        // The permit goes to `first`, which is dropped before it looks.
        drop(held);
        drop(first);
        let permit = futures_poll(&mut second).expect("second got the permit");
        assert!(permit.is_ok());
        drop(permit);
        drop(second);
        assert_eq!((gate.available(), gate.waiting()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_wakes_waiters_and_refuses_new_ones() {
        let gate = FairGate::new(1);
        let held = gate.acquire(None, far()).await.unwrap();
        let mut waiter = Box::pin(gate.acquire(None, far()));
        assert!(futures_poll(&mut waiter).is_none());
        gate.close();
        assert_eq!(
            futures_poll(&mut waiter).unwrap().unwrap_err(),
            GateError::Closed
        );
        let err = gate.acquire(None, far()).await.unwrap_err();
        assert_eq!(err, GateError::Closed);
        drop(held);
        assert_eq!(gate.available(), 1);
    }

    /// Polls `fut` once.
    fn futures_poll<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(fut).poll(&mut cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        }
    }
}
