//! [`Cluster::run`]: an operation on a routed connection, bounded by the
//! attempt's deadline and retried elsewhere when it fails or overruns.
//!
//! The deadline of an attempt covers the checkout and the work done on the
//! connection, as deadpool's `timeout_get` covers a wait and a recycle: a
//! replica that hangs mid-query (SIGSTOPped, or a network that drops every
//! packet) costs a reader one `retry.attempt_timeout`, not the driver's own
//! read timeout. What overruns is cancelled, which leaves the session in a
//! state nobody can vouch for, so its connection is closed, never pooled.

use switchyard_core::{
    Backend, BackendErrorKind, Checkout, Deadline, EndpointId, Error, Intent, OperationError,
    TenantId,
};

use crate::checkout::{Attempt, Budget, CheckoutOptions};
use crate::cluster::Cluster;

impl<B: Backend> Cluster<B> {
    /// Runs `op` on a checked-out connection, and again on another endpoint
    /// when it fails with a retryable error, for reads and idempotent writes.
    ///
    /// `op` is an async closure that borrows what it captures (no clone per
    /// attempt) and may fail with its driver's own error (`sqlx::Error`,
    /// `redis::RedisError`) or with [`Error`]: either is converted once, with
    /// the endpoint and tenant of the connection it ran on
    /// ([`OperationError`]), and reported to the router
    /// ([`Checkout::report_failure`]), so a broken connection ejects its
    /// endpoint.
    ///
    /// Attempts share one budget of `retry.max_attempts` and one deadline
    /// (the cluster's `checkout_timeout`, or the one in `opts`). Each attempt,
    /// the checkout and `op` together, ends at `retry.attempt_timeout` while
    /// another attempt may follow, else at the whole deadline. An `op` still
    /// running then is cancelled, its connection closed, and the result is
    /// [`Error::OperationTimeout`] naming the [`Deadline`] that fired; an
    /// overrun attempt deadline counts against the endpoint, and a read moves
    /// to another endpoint (the primary, when no other replica is left).
    ///
    /// Because a cancelled `op` never returns its connection to a pool, `op`
    /// may use the engine connection any way it likes (for PostgreSQL,
    /// `&mut **conn` as the executor).
    ///
    /// # In a task that must be `Send`
    ///
    /// Under `tokio::spawn` or an axum handler, give `op` owned captures:
    /// `async move |conn| ...` over values moved in once (an `Arc` clone, a
    /// `String`), which every attempt then borrows. A closure that captures a
    /// reference, even a `&'static str`, makes this future not provably
    /// `Send` today (rustc's "implementation of `Send` is not general
    /// enough", rust-lang/rust#110338); outside such tasks it may borrow.
    ///
    /// ```
    /// # use switchyard_router::{Cluster, CheckoutOptions};
    /// # use switchyard_core::{noop::NoopBackend, Intent};
    /// # async fn f(cluster: Cluster<NoopBackend>) -> Result<(), switchyard_core::Error> {
    /// let wanted = String::from("borrowed by every attempt");
    /// let id = cluster
    ///     .run(Intent::Read, None, CheckoutOptions::new(), async |conn| {
    ///         let _ = &wanted;
    ///         Ok::<_, switchyard_core::Error>(conn.id)
    ///     })
    ///     .await?;
    /// # let _ = id; Ok(()) }
    /// ```
    pub async fn run<T, E, F>(
        &self,
        intent: Intent,
        tenant: Option<&TenantId>,
        opts: CheckoutOptions,
        mut op: F,
    ) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Checkout<B>) -> Result<T, E>,
        E: OperationError<B::Connection>,
    {
        let mut budget = Budget::new(intent, &opts);
        loop {
            let conn = self.checkout_budgeted(intent, tenant, &mut budget).await?;
            if let Some(done) = self.attempt(intent, conn, &mut budget, &mut op).await {
                return done;
            }
        }
    }

    /// `op` on `conn` within the attempt's deadline: its result, or `None`
    /// when it failed (or overran) and `budget` allows another attempt,
    /// which then avoids this endpoint for a read. Shared by `run` and a
    /// causal read's `run_after`, which differ only in how they check out.
    pub(crate) async fn attempt<T, E, F>(
        &self,
        intent: Intent,
        mut conn: Checkout<B>,
        budget: &mut Budget,
        op: &mut F,
    ) -> Option<Result<T, Error>>
    where
        F: AsyncFnMut(&mut Checkout<B>) -> Result<T, E>,
        E: OperationError<B::Connection>,
    {
        let attempt = budget.attempt();
        let outcome = tokio::time::timeout_at(attempt.ends, op(&mut conn)).await;
        let error = match outcome {
            Ok(Ok(value)) => return Some(Ok(value)),
            Ok(Err(error)) => error.into_error(conn.endpoint(), conn.scope()),
            Err(_) => {
                self.overran(conn.endpoint(), attempt.deadline);
                overrun(&mut conn, attempt, budget.attempt_timeout())
            }
        };
        conn.report_failure(&error);
        let id = conn.endpoint().clone();
        drop(conn);
        self.learn(&id, &error);
        if !budget.may_retry(&error) {
            return Some(Err(error));
        }
        self.shared.metrics.retry(intent);
        tracing::debug!(cluster = %self.shared.name, endpoint = %id, %error, "operation failed; retrying on another endpoint");
        if intent == Intent::Read {
            budget.avoid(id);
        }
        None
    }

    /// Counts an operation cancelled at `deadline` on endpoint `id`.
    fn overran(&self, id: &EndpointId, deadline: Deadline) {
        if let Some(ep) = self
            .shared
            .snapshot
            .load()
            .endpoints
            .iter()
            .find(|e| e.id() == id)
        {
            ep.state.counters.operation_timed_out();
            ep.state.metrics.operation_timed_out(deadline);
        }
    }

    /// A write refused as read-only means our idea of the primary is stale.
    fn learn(&self, id: &EndpointId, error: &Error) {
        if error.backend_kind() == Some(BackendErrorKind::ReadOnly) {
            if let Some(ep) = self
                .shared
                .snapshot
                .load()
                .endpoints
                .iter()
                .find(|e| e.id() == id)
            {
                ep.state.request_probe();
            }
        }
    }
}

/// The error for an operation cancelled at its attempt's end, reported on
/// `conn`. The connection is closed: the operation stopped at an unknown
/// point, so the session may hold a half-read reply, an open transaction or
/// a lock. The endpoint is charged with a failure when it had at least the
/// whole attempt timeout, even if what fired was the whole deadline (the last
/// attempt has no shorter one of its own); a caller's deadline shorter than
/// that says nothing about the endpoint.
fn overrun<B: Backend>(
    conn: &mut Checkout<B>,
    attempt: Attempt,
    attempt_timeout: std::time::Duration,
) -> Error {
    conn.discard_on_drop();
    let elapsed = attempt.started.elapsed();
    let error = |deadline| Error::OperationTimeout {
        endpoint: conn.endpoint().clone(),
        tenant: conn.tenant().cloned(),
        deadline,
        elapsed,
    };
    let fired = error(attempt.deadline);
    if elapsed >= attempt_timeout && !fired.is_endpoint_failure() {
        let charge = error(Deadline::Attempt);
        conn.report_failure(&charge);
    }
    tracing::debug!(endpoint = %conn.endpoint(), ?elapsed, deadline = %attempt.deadline, "operation overran its deadline; cancelled, connection closed");
    fired
}
