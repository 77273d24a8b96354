//! The checkout guard: a scoped connection that gives everything back on drop.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{Backend, Recycle, Returned};
use crate::endpoint::EndpointId;
use crate::registry::{Quota, TenantEntry};
use crate::tenant::{TenantId, TenantScope};
use crate::Error;

/// How a checkout ended, as reported to its [`CheckoutObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No failure was reported.
    Success,
    /// The caller reported a failure of the endpoint (broken connection, timeout);
    /// the connection was discarded.
    EndpointFailure,
    /// The caller reported a failure of the request itself (rejected query); the
    /// endpoint is fine.
    RequestFailure,
}

/// Receives the life of every checkout on one endpoint: the router's hook for
/// latency, passive health and metrics.
///
/// Methods run inline on the checkout path and in `Drop`: keep them to atomics.
pub trait CheckoutObserver: Send + Sync + 'static {
    /// A connection was handed out at `at`, after `waited` (`at` saves the
    /// observer a clock read on the checkout path). A checkout that never had
    /// to wait (every step was ready at once) reports zero, and `at` is when
    /// it started.
    fn on_acquired(&self, waited: Duration, at: Instant) {
        let _ = (waited, at);
    }
    /// Getting a connection failed after `waited`.
    fn on_acquire_failed(&self, error: &Error, waited: Duration) {
        let _ = (error, waited);
    }
    /// A connection came back; it was handed out at `acquired_at`. An
    /// observer that wants the hold time reads the clock itself
    /// (`acquired_at.elapsed()`), so a checkout whose observer keeps no hold
    /// time (or records it into a metrics handle nobody listens to) costs no
    /// clock read on release.
    fn on_released(&self, acquired_at: Instant, outcome: Outcome) {
        let _ = (acquired_at, outcome);
    }
    /// The counter this observer's checkouts are counted in while in flight,
    /// from the moment one starts waiting until it fails or its connection is
    /// returned. Read through the observer the checkout holds anyway, so
    /// counting costs a checkout no handle of its own.
    fn in_flight(&self) -> Option<&InFlight> {
        None
    }
}

/// Where a checkout's connection comes from: the backend, and who (if
/// anyone) observes the checkout's life.
///
/// A [`Checkout`] holds its origin by one reference: a router's endpoint,
/// which owns both the backend and the observer, costs a checkout one
/// reference count, not one for the backend and one for the observer. A
/// bare backend is its own origin, observed by nobody.
pub trait Origin<B: Backend>: Send + Sync + 'static {
    /// The backend connections come from.
    fn backend(&self) -> &B;

    /// Who learns of every checkout's life, if anyone.
    fn observer(&self) -> Option<&dyn CheckoutObserver>;
}

impl<B: Backend> Origin<B> for B {
    #[inline]
    fn backend(&self) -> &B {
        self
    }

    #[inline]
    fn observer(&self) -> Option<&dyn CheckoutObserver> {
        None
    }
}

/// Checkouts in flight on one endpoint, including those still waiting for a
/// connection: the load that least-connections balancing reads.
#[derive(Default)]
pub struct InFlight {
    count: AtomicU32,
}

impl InFlight {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current count.
    #[inline]
    pub fn get(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts one more until the returned token is dropped.
    pub fn enter(&self) -> InFlightToken<'_> {
        self.arrive();
        InFlightToken(self)
    }

    #[inline]
    fn arrive(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    fn leave(&self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One checkout counted in its observer's [`InFlight`] while it acquires:
/// given back on drop (a failed or cancelled checkout) unless
/// [`kept`](Self::kept) hands the count to the [`Checkout`].
struct Counted<'a>(Option<&'a InFlight>);

impl<'a> Counted<'a> {
    #[inline]
    fn enter(observer: Option<&'a dyn CheckoutObserver>) -> Self {
        let counter = observer.and_then(|o| o.in_flight());
        if let Some(c) = counter {
            c.arrive();
        }
        Self(counter)
    }

    /// Whether a count was taken; the caller gives it back.
    #[inline]
    fn kept(mut self) -> bool {
        self.0.take().is_some()
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            c.leave();
        }
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("InFlight").field(&self.get()).finish()
    }
}

/// One unit of [`InFlight`] load, given back on drop.
#[derive(Debug)]
pub struct InFlightToken<'a>(&'a InFlight);

impl Drop for InFlightToken<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// What to check out: the tenant scope and quota, and the deadline. (Where
/// load and outcome are reported is the [`Origin`]'s business.)
#[derive(Clone)]
pub struct CheckoutRequest {
    scope: Option<Arc<TenantScope>>,
    quota: Option<Quota>,
    deadline: Instant,
    started: Option<Instant>,
}

impl CheckoutRequest {
    /// An unscoped checkout that gives up at `deadline`.
    #[inline]
    pub fn new(deadline: Instant) -> Self {
        Self {
            scope: None,
            quota: None,
            deadline,
            started: None,
        }
    }

    /// Counts the wait from `started` instead of from the call to
    /// [`Checkout::acquire`]: for a caller that has just read the clock (a
    /// router starting an operation), which saves a read on the checkout path.
    /// A checkout that does not have to wait is handed out at `started`.
    #[inline]
    pub fn started_at(mut self, started: Instant) -> Self {
        self.started = Some(started);
        self
    }

    /// An unscoped checkout that gives up after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self::new(Instant::now() + timeout)
    }

    /// Scopes the checkout to a tenant and holds it to the tenant's quota.
    #[inline]
    pub fn tenant(mut self, entry: &TenantEntry) -> Self {
        self.scope = Some(Arc::clone(entry.scope()));
        self.quota = entry.quota().cloned();
        self
    }

    /// Scopes the checkout without a quota.
    pub fn scope(mut self, scope: Arc<TenantScope>) -> Self {
        self.scope = Some(scope);
        self
    }

    /// The deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Moves the deadline.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// The tenant scope, if any.
    pub fn scope_ref(&self) -> Option<&Arc<TenantScope>> {
        self.scope.as_ref()
    }
}

impl fmt::Debug for CheckoutRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckoutRequest")
            .field("scope", &self.scope)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// A connection checked out from one endpoint, confined to one tenant when the
/// request named one.
///
/// Derefs to the engine's connection. Dropping it gives everything back: the
/// connection takes the backend's return path (kept as it is, recycled on a
/// task, or discarded; see [`Backend`]), the in-flight count and tenant quota
/// are released, and the outcome (and when the connection was handed out)
/// reach the observer. Nothing
/// needs to be called by hand.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), switchyard_core::Error> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use switchyard_core::noop::NoopBackend;
/// use switchyard_core::{Checkout, CheckoutRequest, Isolation, TenantId, TenantRegistry, TierPolicy};
///
/// let backend = Arc::new(NoopBackend::new("noop-1"));
/// let tenants = TenantRegistry::new()
///     .with_tier("free", TierPolicy::new(Isolation::Schema).with_max_connections(2))
///     .with_default_tier("free");
/// let acme = tenants.resolve(&TenantId::new("acme")?)?;
///
/// let conn = Checkout::acquire(
///     &backend,
///     CheckoutRequest::with_timeout(Duration::from_secs(1)).tenant(&acme),
/// )
/// .await?;
/// assert_eq!(conn.tenant().map(|t| t.as_str()), Some("acme"));
/// assert_eq!(acme.quota().unwrap().in_use(), 1);
/// drop(conn);
/// assert_eq!(acme.quota().unwrap().in_use(), 0);
/// # Ok(()) }
/// ```
pub struct Checkout<B: Backend> {
    conn: Option<B::Connection>,
    origin: Arc<dyn Origin<B>>,
    scope: Option<Arc<TenantScope>>,
    /// Whether the checkout is counted in its observer's in-flight counter.
    counted: bool,
    _quota: Option<OwnedSemaphorePermit>,
    acquired_at: Instant,
    waited: Duration,
    outcome: Outcome,
    keep: bool,
}

impl<B: Backend> Checkout<B> {
    /// Checks out a connection from `origin` (a backend, or something that
    /// owns one and observes its checkouts): takes the tenant's quota, gets a
    /// connection, applies the tenant scope, all before the request's
    /// deadline.
    ///
    /// Traced in a `checkout` span (debug level) when a subscriber may want it.
    pub async fn acquire<O: Origin<B>>(
        origin: &Arc<O>,
        req: CheckoutRequest,
    ) -> Result<Self, Error> {
        // No span is built, entered or looked up unless a subscriber may want
        // it: even a disabled span costs a checkout a good part of its time
        // (with `tracing`'s `log` feature, which sqlx turns on, it takes the
        // `log` fallback's path on every enter, exit and drop).
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return Self::acquire_and_report(origin, req, false).await;
        }
        let span = tracing::debug_span!(
            "checkout",
            endpoint = %origin.backend().endpoint(),
            tenant = req.scope.as_ref().map(|s| s.tenant().as_str()),
            wait_us = tracing::field::Empty,
        );
        Self::acquire_and_report(origin, req, true)
            .instrument(span)
            .await
    }

    /// [`acquire`](Self::acquire), reporting the outcome to the observer and,
    /// when `traced`, the wait to the span it runs in. One future, no nested
    /// ones on the path of a connection that is ready at once: every layer
    /// would move the result once more.
    async fn acquire_and_report<O: Origin<B>>(
        origin: &Arc<O>,
        req: CheckoutRequest,
        traced: bool,
    ) -> Result<Self, Error> {
        let backend = origin.backend();
        let observer = origin.observer();
        let started = req.started.unwrap_or_else(Instant::now);
        let mut suspended = false;
        let tenant = req.scope.as_ref().map(|s| s.tenant());
        let timeout = || Error::Timeout {
            endpoint: backend.endpoint().clone(),
            tenant: tenant.cloned(),
            elapsed: started.elapsed(),
        };
        // The quota comes first: a tenant at its cap waits on itself, holding no
        // pool capacity that other tenants could use.
        let quota = match (&req.quota, tenant) {
            (Some(quota), Some(tenant)) => {
                // Whether it waited is not tracked: count it as a wait.
                suspended = true;
                match quota.acquire(tenant, req.deadline).await {
                    Ok(permit) => Some(permit),
                    Err(error) => return Err(failed(observer, error, started, suspended, traced)),
                }
            }
            _ => None,
        };
        let counted = Counted::enter(observer);
        let acquire = backend.acquire(req.scope.as_deref(), req.deadline);
        let mut conn = match until(req.deadline, acquire, &mut suspended).await {
            Some(Ok(conn)) => conn,
            Some(Err(error)) => {
                drop(counted);
                return Err(failed(observer, error, started, suspended, traced));
            }
            None => {
                drop(counted);
                return Err(failed(observer, timeout(), started, suspended, traced));
            }
        };
        if let Some(scope) = &req.scope {
            // Until the scope is applied, a cancelled or failed checkout must not
            // let the half-scoped connection back into the pool.
            let mut pending = Unscoped {
                conn: Some(conn),
                backend,
            };
            let scoped = match pending.conn.as_mut() {
                // Boxed: an engine's scope future is large, only scoped
                // checkouts build it, and every checkout's future would carry
                // its size.
                Some(conn_ref) => {
                    let scoping = Box::pin(backend.scope(conn_ref, scope));
                    until(req.deadline, scoping, &mut suspended)
                        .await
                        .unwrap_or_else(|| Err(timeout()))
                }
                None => Err(Error::Closed),
            };
            // Taken out of `pending` only once scoped: dropped with it
            // otherwise, the connection is discarded.
            let scoped = scoped.and_then(|()| pending.conn.take().ok_or(Error::Closed));
            conn = match scoped {
                Ok(conn) => conn,
                Err(error) => {
                    drop(counted);
                    return Err(failed(observer, error, started, suspended, traced));
                }
            };
        }
        // A checkout that never had to wait ends when it started: one clock
        // read fewer on the path every immediate checkout takes.
        let (ended, waited) = waited(started, suspended);
        if traced {
            tracing::Span::current().record("wait_us", waited.as_micros() as u64);
        }
        if let Some(observer) = observer {
            observer.on_acquired(waited, ended);
        }
        Ok(Self {
            conn: Some(conn),
            origin: Arc::clone(origin) as Arc<dyn Origin<B>>,
            counted: counted.kept(),
            scope: req.scope,
            _quota: quota,
            acquired_at: ended,
            waited,
            outcome: Outcome::Success,
            keep: true,
        })
    }

    /// The endpoint this connection came from.
    pub fn endpoint(&self) -> &EndpointId {
        self.origin.backend().endpoint()
    }

    /// The tenant this connection is confined to, if any.
    pub fn tenant(&self) -> Option<&TenantId> {
        self.scope.as_ref().map(|s| s.tenant())
    }

    /// The full tenant scope, if any.
    pub fn scope(&self) -> Option<&TenantScope> {
        self.scope.as_deref()
    }

    /// How long the checkout waited for its connection: zero when every step
    /// was ready at once.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The backend the connection came from.
    pub fn backend(&self) -> &B {
        self.origin.backend()
    }

    /// The backend and the connection at once: for an engine call that
    /// takes both (`backend.written(conn, ..)`).
    pub fn split(&mut self) -> (&B, &mut B::Connection) {
        let Self { origin, conn, .. } = self;
        #[allow(clippy::expect_used)]
        let conn = conn.as_mut().expect("connection present until drop");
        (origin.backend(), conn)
    }

    /// Tells the router this checkout failed.
    ///
    /// An endpoint failure (timeout, broken connection) discards the connection
    /// and counts against the endpoint's health; anything else only counts as a
    /// failed request.
    pub fn report_failure(&mut self, error: &Error) {
        if error.is_endpoint_failure() {
            self.outcome = Outcome::EndpointFailure;
            self.keep = false;
        } else if self.outcome == Outcome::Success {
            self.outcome = Outcome::RequestFailure;
        }
    }

    /// Closes the connection on drop instead of returning it (for a connection
    /// left in a state the caller cannot vouch for).
    pub fn discard_on_drop(&mut self) {
        self.keep = false;
    }

    #[allow(clippy::expect_used)]
    fn conn(&self) -> &B::Connection {
        // Only `Drop` takes the connection out.
        self.conn.as_ref().expect("connection present until drop")
    }

    #[allow(clippy::expect_used)]
    fn conn_mut(&mut self) -> &mut B::Connection {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl<B: Backend> Deref for Checkout<B> {
    type Target = B::Connection;
    fn deref(&self) -> &B::Connection {
        self.conn()
    }
}

impl<B: Backend> DerefMut for Checkout<B> {
    fn deref_mut(&mut self) -> &mut B::Connection {
        self.conn_mut()
    }
}

impl<B: Backend> Drop for Checkout<B> {
    fn drop(&mut self) {
        let observer = self.origin.observer();
        if let Some(observer) = observer {
            observer.on_released(self.acquired_at, self.outcome);
        }
        if let Some(conn) = self.conn.take() {
            give_back(&self.origin, conn, self.keep);
        }
        if self.counted {
            if let Some(counter) = observer.and_then(|o| o.in_flight()) {
                counter.leave();
            }
        }
    }
}

impl<B: Backend> fmt::Debug for Checkout<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkout")
            .field("endpoint", self.endpoint())
            .field("tenant", &self.tenant())
            .field("waited", &self.waited)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

/// The return path of every checkout, written once: see [`Backend`](crate::Backend).
/// The origin's handle is cloned only for a reset that runs on a task.
fn give_back<B: Backend>(origin: &Arc<dyn Origin<B>>, mut conn: B::Connection, keep: bool) {
    let backend = origin.backend();
    if !keep {
        backend.release(conn, Recycle::Discard);
        return;
    }
    match backend.inspect(&mut conn) {
        Returned::Clean => backend.release(conn, Recycle::Keep),
        Returned::Broken => backend.release(conn, Recycle::Discard),
        Returned::Dirty => match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let origin = Arc::clone(origin);
                rt.spawn(async move {
                    let backend = origin.backend();
                    let verdict = backend.recycle(&mut conn).await;
                    backend.release(conn, verdict);
                });
            }
            // No runtime left to reset it on: never pool a dirty connection.
            Err(_) => backend.release(conn, Recycle::Discard),
        },
    }
}

/// `fut`'s output, or `None` once `deadline` passes first; sets `waited`
/// when `fut` was not ready at once.
///
/// As `tokio::time::timeout_at`, except that the timer is only armed when
/// `fut` has to wait: a future that is ready at its first poll (an idle
/// connection handed out at once) costs no timer registration. The timer is
/// boxed: it is only built on the path that waits anyway, and keeps every
/// checkout's future smaller.
fn until<F: Future>(deadline: Instant, fut: F, waited: &mut bool) -> Until<'_, F> {
    Until {
        fut,
        deadline,
        timer: None,
        waited,
    }
}

pin_project_lite::pin_project! {
    /// The future [`until`] returns.
    struct Until<'a, F> {
        #[pin]
        fut: F,
        deadline: Instant,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        waited: &'a mut bool,
    }
}

impl<F: Future> Future for Until<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Some(out));
        }
        **this.waited = true;
        let deadline = *this.deadline;
        let sleep = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        sleep.as_mut().poll(cx).map(|()| None)
    }
}

/// When a checkout that started at `started` ended, and how long it
/// waited: zero, with no clock read, unless it was `suspended`.
#[inline]
fn waited(started: Instant, suspended: bool) -> (Instant, Duration) {
    if suspended {
        let ended = Instant::now();
        (ended, ended.saturating_duration_since(started))
    } else {
        (started, Duration::ZERO)
    }
}

/// Reports a failed checkout (to the span when `traced`, to the observer, to
/// the debug log) and hands its error back.
#[cold]
fn failed(
    observer: Option<&dyn CheckoutObserver>,
    error: Error,
    started: Instant,
    suspended: bool,
    traced: bool,
) -> Error {
    let (_, waited) = waited(started, suspended);
    if traced {
        tracing::Span::current().record("wait_us", waited.as_micros() as u64);
    }
    if let Some(observer) = observer {
        observer.on_acquire_failed(&error, waited);
    }
    tracing::debug!(%error, "checkout failed");
    error
}

/// A connection between acquire and scope: discarded unless taken out.
struct Unscoped<'a, B: Backend> {
    conn: Option<B::Connection>,
    backend: &'a B,
}

impl<B: Backend> Drop for Unscoped<'_, B> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.backend.release(conn, Recycle::Discard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noop::NoopBackend;
    use crate::registry::{deadline_after, TenantRegistry, TierPolicy};
    use crate::tenant::Isolation;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    const _: fn() = || {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send::<Checkout<NoopBackend>>();
        assert_send_sync::<CheckoutRequest>();
    };

    /// A backend and an observer of its checkouts: the origin a router's
    /// endpoint is, reduced to counts.
    struct Recorder {
        backend: Arc<NoopBackend>,
        acquired: AtomicU64,
        failed: AtomicU64,
        released: Mutex<Vec<(Duration, Outcome)>>,
        in_flight: InFlight,
    }

    impl Recorder {
        fn on(backend: &Arc<NoopBackend>) -> Arc<Self> {
            Arc::new(Self {
                backend: Arc::clone(backend),
                acquired: AtomicU64::default(),
                failed: AtomicU64::default(),
                released: Mutex::default(),
                in_flight: InFlight::new(),
            })
        }
    }

    impl Origin<NoopBackend> for Recorder {
        fn backend(&self) -> &NoopBackend {
            &self.backend
        }
        fn observer(&self) -> Option<&dyn CheckoutObserver> {
            Some(self)
        }
    }

    impl CheckoutObserver for Recorder {
        fn on_acquired(&self, _: Duration, _: Instant) {
            self.acquired.fetch_add(1, Ordering::Relaxed);
        }
        fn on_acquire_failed(&self, _: &Error, _: Duration) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        fn on_released(&self, acquired_at: Instant, outcome: Outcome) {
            self.released
                .lock()
                .unwrap()
                .push((acquired_at.elapsed(), outcome));
        }
        fn in_flight(&self) -> Option<&InFlight> {
            Some(&self.in_flight)
        }
    }

    fn registry() -> TenantRegistry {
        TenantRegistry::new()
            .with_tier(
                "free",
                TierPolicy::new(Isolation::Schema).with_max_connections(1),
            )
            .with_default_tier("free")
    }

    fn tenant(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn drop_releases_in_flight_quota_and_reports_hold_time() {
        let backend = Arc::new(NoopBackend::new("n1"));
        let reg = registry();
        let entry = reg.resolve(&tenant("a")).unwrap();
        let rec = Recorder::on(&backend);
        let load = &rec.in_flight;
        let req = CheckoutRequest::new(deadline_after(Duration::from_secs(1))).tenant(&entry);

        let conn = Checkout::acquire(&rec, req).await.unwrap();
        assert_eq!(conn.tenant, Some(tenant("a")));
        assert_eq!(load.get(), 1);
        assert_eq!(entry.quota().unwrap().in_use(), 1);
        tokio::time::advance(Duration::from_millis(40)).await;
        drop(conn);

        assert_eq!(load.get(), 0);
        assert_eq!(entry.quota().unwrap().in_use(), 0);
        assert_eq!(rec.acquired.load(Ordering::Relaxed), 1);
        let released = rec.released.lock().unwrap().clone();
        assert_eq!(
            released,
            vec![(Duration::from_millis(40), Outcome::Success)]
        );
        // The reset runs on a task; let it finish.
        tokio::task::yield_now().await;
        let stats = backend.counters();
        assert_eq!((stats.scoped, stats.recycled, stats.discarded), (1, 1, 0));
    }

    #[test]
    fn a_counter_counts_its_tokens() {
        let counter = InFlight::new();
        let a = counter.enter();
        let b = counter.enter();
        assert_eq!(counter.get(), 2);
        drop(a);
        assert_eq!(counter.get(), 1);
        drop(b);
        assert_eq!(format!("{:?}", counter), "InFlight(0)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_at_quota_waits_then_gets_quota_exceeded() {
        let backend = Arc::new(NoopBackend::new("n1"));
        let reg = registry();
        let a = reg.resolve(&tenant("a")).unwrap();
        let b = reg.resolve(&tenant("b")).unwrap();
        let timeout = Duration::from_millis(300);
        let held = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout).tenant(&a))
            .await
            .unwrap();

        let started = Instant::now();
        let err = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout).tenant(&a))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::QuotaExceeded { limit: 1, .. }),
            "{err}"
        );
        assert_eq!(started.elapsed(), timeout);

        // Another tenant is not held up by a's full quota.
        let started = Instant::now();
        let other = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout).tenant(&b))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop((held, other));
    }

    #[tokio::test(start_paused = true)]
    async fn endpoint_failures_discard_the_connection() {
        let backend = Arc::new(NoopBackend::new("n1"));
        let rec = Recorder::on(&backend);
        let mut conn =
            Checkout::acquire(&rec, CheckoutRequest::with_timeout(Duration::from_secs(1)))
                .await
                .unwrap();
        conn.report_failure(&Error::backend(
            conn.endpoint(),
            None,
            crate::BackendErrorKind::Io,
            std::io::Error::other("reset"),
        ));
        drop(conn);
        assert_eq!(backend.counters().discarded, 1);
        assert_eq!(rec.released.lock().unwrap()[0].1, Outcome::EndpointFailure);
    }

    #[tokio::test(start_paused = true)]
    async fn request_failures_keep_the_connection() {
        let backend = Arc::new(NoopBackend::new("n1"));
        let mut conn = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        conn.report_failure(&Error::backend(
            conn.endpoint(),
            None,
            crate::BackendErrorKind::Rejected,
            std::io::Error::other("syntax error"),
        ));
        drop(conn);
        assert_eq!(backend.counters().discarded, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_checkout_that_waits_reports_a_wait() {
        let backend = Arc::new(NoopBackend::new("n1"));
        let started = Instant::now() - Duration::from_millis(3);
        let at_once = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(Duration::from_secs(1)).started_at(started),
        )
        .await
        .unwrap();
        assert_eq!(at_once.waited(), Duration::ZERO);
        backend.set_acquire_delay(Duration::from_millis(7));
        let slow = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(Duration::from_secs(1)).started_at(started),
        )
        .await
        .unwrap();
        assert_eq!(slow.waited(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_backend_times_out_at_the_deadline() {
        let backend = Arc::new(NoopBackend::new("slow"));
        backend.set_acquire_delay(Duration::from_secs(10));
        let rec = Recorder::on(&backend);
        let started = Instant::now();
        let err = Checkout::acquire(
            &rec,
            CheckoutRequest::with_timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("slow"));
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert_eq!(rec.failed.load(Ordering::Relaxed), 1);
        assert_eq!(rec.in_flight.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_checkout_counts_in_flight_until_it_is_cancelled() {
        let backend = Arc::new(NoopBackend::new("slow"));
        backend.set_acquire_delay(Duration::from_secs(10));
        let rec = Recorder::on(&backend);
        let req = CheckoutRequest::with_timeout(Duration::from_secs(60));
        let waiting = tokio::spawn({
            let rec = Arc::clone(&rec);
            async move { Checkout::acquire(&rec, req).await.map(|_| ()) }
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(rec.in_flight.get(), 1);
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        assert_eq!(rec.in_flight.get(), 0);
        assert_eq!(rec.failed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_scope_discards_the_connection() {
        let backend = Arc::new(NoopBackend::new("n1"));
        backend.set_fail_scope(true);
        let reg = registry();
        let a = reg.resolve(&tenant("a")).unwrap();
        let err = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(Duration::from_secs(1)).tenant(&a),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Scope { .. }), "{err}");
        assert_eq!(backend.counters().discarded, 1);
        assert_eq!(a.quota().unwrap().in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_reset_discards_the_connection() {
        let backend = Arc::new(NoopBackend::new("n1"));
        backend.set_fail_recycle(true);
        let reg = registry();
        let a = reg.resolve(&tenant("a")).unwrap();
        let conn = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(Duration::from_secs(1)).tenant(&a),
        )
        .await
        .unwrap();
        drop(conn);
        tokio::task::yield_now().await;
        assert_eq!(backend.counters().discarded, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkout_cancelled_while_scoping_never_pools_the_connection() {
        let backend = Arc::new(NoopBackend::new("n1"));
        backend.set_scope_delay(Duration::from_secs(5));
        let reg = registry();
        let a = reg.resolve(&tenant("a")).unwrap();
        let fut = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(Duration::from_secs(60)).tenant(&a),
        );
        let cancelled = tokio::time::timeout(Duration::from_millis(10), fut).await;
        assert!(cancelled.is_err());
        assert_eq!(backend.counters().discarded, 1);
        assert_eq!(backend.counters().live, 0);
    }

    #[test]
    fn drop_outside_a_runtime_discards_a_scoped_connection() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let backend = Arc::new(NoopBackend::new("n1"));
        let reg = registry();
        let a = reg.resolve(&tenant("a")).unwrap();
        let conn = rt
            .block_on(Checkout::acquire(
                &backend,
                CheckoutRequest::with_timeout(Duration::from_secs(1)).tenant(&a),
            ))
            .unwrap();
        drop(rt);
        drop(conn);
        assert_eq!(backend.counters().discarded, 1);
    }
}
