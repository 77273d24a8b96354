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
//! While others wait, a permit given back by a tenant that has nobody
//! waiting and holds less than an equal share of the gate is kept for that
//! tenant's next checkout for a moment, the linger ([`DEFAULT_LINGER`], as
//! PostgreSQL's pool does with a returned connection): a quiet tenant that
//! checks out again at once does not queue behind a noisy one. When the linger
//! ends unused, the permit goes to whoever waits.
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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backend::PoolStats;
use crate::endpoint::{EndpointId, PoolSettings};
use crate::error::Error;
use crate::fair::{FairQueue, LingerTimer, QueueClass, WaitKey};
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

/// How long a permit is kept for the tenant that gave it back, by default
/// (see the module docs); PostgreSQL's pool keeps a returned connection as
/// long.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);

struct State {
    available: usize,
    queue: FairQueue<oneshot::Sender<()>>,
    closed: bool,
    /// Permits out, by the queue class of their holder (kept only with a
    /// linger: nothing else reads it).
    held: HashMap<QueueClass, u32>,
    /// Permits kept for the class that gave them back, and since when; oldest
    /// first.
    kept: VecDeque<(QueueClass, Instant)>,
    linger_timer: LingerTimer,
}

impl State {
    fn hold(&mut self, class: &QueueClass) {
        *self.held.entry(class.clone()).or_insert(0) += 1;
    }

    fn unhold(&mut self, class: &QueueClass) {
        if let Some(held) = self.held.get_mut(class) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(class);
            }
        }
    }
}

/// A semaphore with fair queuing between tenants (see the module docs).
pub struct FairGate {
    permits: usize,
    linger: Duration,
    /// For the linger's timer task, which must not keep the gate alive.
    this: Weak<FairGate>,
    state: Mutex<State>,
}

impl std::fmt::Debug for FairGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("FairGate")
            .field("permits", &self.permits)
            .field("available", &state.available)
            .field("waiting", &state.queue.len())
            .field("kept", &state.kept.len())
            .finish()
    }
}

impl FairGate {
    /// A gate of `permits` permits with the [`DEFAULT_LINGER`].
    pub fn new(permits: u32) -> Arc<Self> {
        Self::with_linger(permits, DEFAULT_LINGER)
    }

    /// The gate in front of a driver's pool configured by `pool`: its
    /// `max_size` permits, kept back for `linger` (every engine that waits at a
    /// gate builds it here, so the settings reach it the same way).
    pub fn for_pool(pool: &PoolSettings) -> Arc<Self> {
        Self::with_linger(pool.max_size, pool.linger)
    }

    /// A gate of `permits` permits that keeps a given-back permit for its
    /// tenant for `linger` at most (zero: never; see the module docs).
    pub fn with_linger(permits: u32, linger: Duration) -> Arc<Self> {
        let permits = usize::try_from(permits).unwrap_or(usize::MAX);
        Arc::new_cyclic(|this| Self {
            permits,
            linger,
            this: this.clone(),
            state: Mutex::new(State {
                available: permits,
                queue: FairQueue::new(),
                closed: false,
                held: HashMap::new(),
                kept: VecDeque::new(),
                linger_timer: LingerTimer::default(),
            }),
        })
    }

    /// The class a permit records for its holder: only a gate that lingers
    /// counts holders (nothing else reads the counts).
    fn holder(&self, class: &QueueClass) -> Option<QueueClass> {
        (!self.linger.is_zero()).then(|| class.clone())
    }

    /// A permit taken now by a checkout of `class`.
    fn permit(self: &Arc<Self>, state: &mut State, class: &QueueClass) -> GatePermit {
        let class = self.holder(class);
        if let Some(class) = &class {
            state.hold(class);
        }
        GatePermit {
            gate: Arc::clone(self),
            class,
        }
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
            let (class, weight) = QueueClass::of(scope);
            if let Some(at) = state.kept.iter().position(|(c, _)| *c == class) {
                state.kept.remove(at);
                return Ok(self.permit(&mut state, &class));
            }
            if state.available > 0 && state.queue.is_empty() {
                state.available -= 1;
                return Ok(self.permit(&mut state, &class));
            }
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
                // Counted as held by whoever handed it over.
                let key = waiting.key.take();
                Ok(GatePermit {
                    gate: Arc::clone(self),
                    class: key.and_then(|key| self.holder(key.class())),
                })
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
            let kept = state.kept.len();
            state.kept.clear();
            state.available += kept;
            state.queue.drain()
        };
        drop(waiters);
    }

    /// A permit held by a checkout of `class` (when counted) came back: kept
    /// for `class` for the linger if [`FairQueue::may_keep_for`] says so,
    /// else to the next waiter in turn, else to the count.
    fn release(&self, class: Option<QueueClass>) {
        let mut state = self.lock();
        if let Some(class) = class {
            state.unhold(&class);
            let held = state.held.get(&class).copied().unwrap_or(0);
            let max = u32::try_from(self.permits).unwrap_or(u32::MAX);
            if !state.closed && state.queue.may_keep_for(&class, held, max) {
                let now = Instant::now();
                if state
                    .linger_timer
                    .arm(now + self.linger, &self.this, Self::end_lingers)
                {
                    state.kept.push_back((class, now));
                    return;
                }
            }
        }
        self.hand_on(&mut state);
    }

    /// One permit to the next waiter in turn, else to the count.
    fn hand_on(&self, state: &mut State) {
        while let Some((key, tx)) = state.queue.pop() {
            let holder = self.holder(key.class());
            if let Some(class) = &holder {
                state.hold(class);
            }
            // A waiter leaves the queue before its receiver goes, so this
            // succeeds; a failure would only mean trying the next one.
            if tx.send(()).is_ok() {
                return;
            }
            if let Some(class) = &holder {
                state.unhold(class);
            }
        }
        state.available += 1;
    }

    /// Hands on the permits kept for the whole linger, and sets the timer
    /// for the next.
    fn end_lingers(&self) {
        let mut state = self.lock();
        state.linger_timer.fired();
        let now = Instant::now();
        while let Some(&(_, since)) = state.kept.front() {
            if since + self.linger > now {
                // Set from a timer task: there is a runtime.
                state
                    .linger_timer
                    .arm(since + self.linger, &self.this, Self::end_lingers);
                return;
            }
            state.kept.pop_front();
            self.hand_on(&mut state);
        }
    }
}

/// One permit of a [`FairGate`], handed on when dropped.
#[must_use = "the permit is released when dropped"]
pub struct GatePermit {
    gate: Arc<FairGate>,
    /// The queue class of its holder, when the gate counts them.
    class: Option<QueueClass>,
}

impl std::fmt::Debug for GatePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatePermit")
    }
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        self.gate.release(self.class.take());
    }
}

/// A queued acquire; takes itself out of the queue if dropped while waiting.
struct Waiting<'a> {
    gate: &'a FairGate,
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
            // Counted as held by this waiter's class by whoever handed it over.
            self.gate.release(self.gate.holder(key.class()));
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

    #[test]
    fn a_pool_gate_takes_the_pool_size_and_linger() {
        let pool = PoolSettings::default()
            .with_max_size(3)
            .with_linger(Duration::from_micros(250));
        let gate = FairGate::for_pool(&pool);
        assert_eq!((gate.permits, gate.linger), (3, Duration::from_micros(250)));
        let gate = FairGate::for_pool(&PoolSettings::default());
        assert_eq!((gate.permits, gate.linger), (16, DEFAULT_LINGER));
    }

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

    /// A gate of 4 with the quiet tenant holding one permit and the noisy
    /// one three and one more waiting.
    async fn quiet_and_noisy(
        gate: &Arc<FairGate>,
    ) -> (
        GatePermit,
        Vec<GatePermit>,
        std::pin::Pin<Box<impl std::future::Future<Output = Result<GatePermit, GateError>>>>,
    ) {
        let registry = registry();
        let (quiet, noisy) = (scope(&registry, "quiet"), scope(&registry, "noisy"));
        let held = gate.acquire(Some(&quiet), far()).await.unwrap();
        let mut noisy_held = Vec::new();
        for _ in 0..3 {
            noisy_held.push(gate.acquire(Some(&noisy), far()).await.unwrap());
        }
        let gate = Arc::clone(gate);
        let mut waiter = Box::pin(async move { gate.acquire(Some(&noisy), far()).await });
        assert!(futures_poll(&mut waiter).is_none());
        (held, noisy_held, waiter)
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tenant_keeps_its_permit_for_the_linger_while_others_wait() {
        let gate = FairGate::new(4);
        let quiet = scope(&registry(), "quiet");
        let (held, _noisy, mut waiter) = quiet_and_noisy(&gate).await;
        // Below its share (4 / 2 classes wanting) and nobody of its own
        // waiting: kept, not handed to the noisy waiter.
        drop(held);
        assert!(futures_poll(&mut waiter).is_none());
        let again = Instant::now();
        let held = gate.acquire(Some(&quiet), far()).await.unwrap();
        assert_eq!(again.elapsed(), Duration::ZERO);
        // Kept again, and handed on once the linger ends unused.
        drop(held);
        tokio::time::sleep(DEFAULT_LINGER / 2).await;
        assert!(futures_poll(&mut waiter).is_none());
        tokio::time::sleep(DEFAULT_LINGER).await;
        assert!(futures_poll(&mut waiter).unwrap().is_ok());
        assert_eq!(gate.lock().kept.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_linger_a_given_back_permit_goes_to_the_waiter_at_once() {
        let gate = FairGate::with_linger(4, Duration::ZERO);
        let (held, _noisy, mut waiter) = quiet_and_noisy(&gate).await;
        drop(held);
        assert!(futures_poll(&mut waiter).unwrap().is_ok());
        assert!(gate.lock().held.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_at_its_share_hands_its_permit_on() {
        let gate = FairGate::new(4);
        let (_quiet, mut noisy, mut waiter) = quiet_and_noisy(&gate).await;
        // The noisy tenant waits itself: its own waiter gets it.
        noisy.pop();
        noisy.push(futures_poll(&mut waiter).unwrap().unwrap());
        // Another tenant waits now, and the noisy one holds 3 >= 4 / 2.
        let registry = registry();
        let other = scope(&registry, "other");
        let gate2 = Arc::clone(&gate);
        let mut other_waiter = Box::pin(async move { gate2.acquire(Some(&other), far()).await });
        assert!(futures_poll(&mut other_waiter).is_none());
        noisy.pop();
        assert!(futures_poll(&mut other_waiter).unwrap().is_ok());
        assert_eq!(gate.lock().kept.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_gives_kept_permits_back() {
        let gate = FairGate::new(4);
        let (held, noisy, waiter) = quiet_and_noisy(&gate).await;
        drop(held);
        assert_eq!(gate.lock().kept.len(), 1);
        gate.close();
        drop((noisy, waiter));
        assert_eq!((gate.available(), gate.lock().kept.len()), (4, 0));
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
