//! The return path: a look without I/O decides whether a returned connection
//! goes straight back, is checked first, or is closed; also the sweeper,
//! which closes idle connections and tenant pools and keeps `min_idle`
//! connections open.
//!
//! - Closed: the backend is closed, a query run through the checkout was
//!   dropped mid-way, or the connection is past `max_lifetime`.
//! - Checked first, in one simple-protocol round trip on a task (the same
//!   check as a same-owner checkout makes, see [`crate::lifecycle`]), when
//!   sqlx has work queued on it: a dropped sqlx `Transaction` queues its
//!   `ROLLBACK` in the write buffer, and the check flushes it at once so its
//!   locks go now, not at the next checkout.
//! - Otherwise straight back, no round trip: whoever takes it next checks it
//!   in the round trip that checkout makes anyway (the check for the same
//!   owner, the owner change for another). A transaction block left open by
//!   raw SQL (`BEGIN` without `COMMIT`) is found there and the connection
//!   closed, rolling it back.
//! - A returned connection that nobody has checked and that stays idle for
//!   [`IDLE_CHECK_AFTER`] is checked by the sweeper, so a transaction left
//!   open holds its locks for about that long when no checkout comes, not
//!   until `idle_timeout`. Under load connections do not sit idle that long,
//!   and this costs nothing; an idle pool spends one round trip per returned
//!   connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;
use switchyard_core::{EndpointId, Recycle, Returned, TenantScope};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::Shared;
use crate::connection::PgConn;
use crate::lifecycle::check;
use crate::slots::{Pooled, Slots};
use crate::stats::bump;

/// How long a returned connection that nobody has checked may sit idle
/// before the sweeper checks it (see the module docs).
pub(crate) const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

impl Shared {
    pub(crate) fn endpoint(&self) -> &EndpointId {
        &self.config.endpoint
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The look without I/O (see the module docs).
    pub(crate) fn inspect(&self, conn: &PgConn) -> Returned {
        if conn.in_flight {
            bump(&self.returns.closed_mid_query);
            return Returned::Broken;
        }
        let too_old = self
            .config
            .pool
            .max_lifetime
            .is_some_and(|max| conn.pooled().created.elapsed() >= max);
        if too_old || self.is_closed() {
            return Returned::Broken;
        }
        let raw = &conn.pooled().raw;
        // `should_flush`: sqlx's own test for queued messages (the pool's
        // release path uses it); public but hidden from its docs.
        if raw.should_flush() || raw.is_in_transaction() {
            Returned::Dirty
        } else {
            Returned::Clean
        }
    }

    /// The recycle step of a connection with work queued: the check, within
    /// `reset_timeout`.
    pub(crate) async fn recycle(&self, conn: &mut PgConn) -> Recycle {
        if !self.is_closed() && self.vouch(conn.pooled_mut()).await {
            Recycle::Keep
        } else {
            Recycle::Discard
        }
    }

    /// Checks a used session for its owner within `reset_timeout`, and
    /// vouches for it if it is clean.
    async fn vouch(&self, pooled: &mut Pooled) -> bool {
        let owner = pooled.owner.clone();
        let limit = Instant::now() + self.config.reset_timeout;
        let outcome = tokio::time::timeout_at(limit, check(&mut pooled.raw, owner.as_ref())).await;
        let clean = self.judge(owner.as_ref(), outcome);
        if clean {
            pooled.vouched = Some(Instant::now());
        }
        clean
    }

    /// Counts and logs the outcome of a check: true if the session is clean.
    pub(crate) fn judge(
        &self,
        owner: Option<&TenantScope>,
        outcome: Result<Result<bool, sqlx::Error>, tokio::time::error::Elapsed>,
    ) -> bool {
        let tenant = owner.map(|s| s.tenant().as_str());
        match outcome {
            Ok(Ok(true)) => true,
            Ok(Ok(false)) => {
                bump(&self.returns.closed_dirty);
                tracing::warn!(endpoint = %self.endpoint(), tenant, "connection inside a transaction block or with a changed scope; closed");
                false
            }
            Ok(Err(error)) => {
                bump(&self.returns.reset_failures);
                tracing::warn!(endpoint = %self.endpoint(), tenant, %error, "connection check failed; closed");
                false
            }
            Err(_) => {
                bump(&self.returns.reset_failures);
                tracing::warn!(endpoint = %self.endpoint(), tenant, timeout = ?self.config.reset_timeout, "connection check timed out (dropped mid-query?); closed");
                false
            }
        }
    }

    /// Closes every pool; checkouts after this fail with `Closed`.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.slots.close();
        self.tenants.close_all();
    }

    /// One sweep: idle connections and tenant pools past their idle timeout
    /// are closed, and the shared pool is topped up to `min_idle`.
    fn sweep_once(self: &Arc<Self>, now: Instant) {
        let closed = self.tenants.close_idle(now);
        if closed > 0 {
            tracing::debug!(endpoint = %self.config.endpoint, closed, "closed idle tenant pools");
        }
        if let Some(idle) = self.config.pool.idle_timeout {
            close_idle(&self.slots, now, idle);
        }
        for slots in self.tenants.all_slots() {
            close_idle(&slots, now, self.config.tenant_idle_timeout());
            self.check_idle(slots, now);
        }
        self.check_idle(Arc::clone(&self.slots), now);
        for reservation in self.slots.top_up(self.config.pool.min_idle) {
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                let connect =
                    <sqlx::PgConnection as sqlx::Connection>::connect_with(&shared.slots.options);
                let limit = Instant::now() + shared.config.pool.acquire_timeout;
                if let Ok(Ok(raw)) = tokio::time::timeout_at(limit, connect).await {
                    shared.slots.put(reservation.fill(raw));
                }
            });
        }
    }

    /// Checks, each on a task, the idle connections of `slots` that nobody
    /// has checked since their return and that have sat idle for
    /// [`IDLE_CHECK_AFTER`]: back to the pool if clean, else closed.
    fn check_idle(self: &Arc<Self>, slots: Arc<Slots>, now: Instant) {
        let Some(before) = now.checked_sub(IDLE_CHECK_AFTER) else {
            return;
        };
        for mut pooled in slots.take_unchecked_idle_since(before) {
            let shared = Arc::clone(self);
            let slots = Arc::clone(&slots);
            tokio::spawn(async move {
                if shared.vouch(&mut pooled).await && !shared.is_closed() {
                    slots.put(pooled);
                } else {
                    pooled.close();
                }
            });
        }
    }
}

fn close_idle(slots: &Slots, now: Instant, idle_timeout: Duration) {
    if let Some(before) = now.checked_sub(idle_timeout) {
        for conn in slots.take_idle_since(before) {
            conn.close();
        }
    }
}

/// Sweeps until cancelled.
pub(crate) async fn sweep(shared: Arc<Shared>, cancel: CancellationToken) {
    let idle = shared
        .config
        .pool
        .idle_timeout
        .unwrap_or(Duration::from_secs(120));
    let every = (shared.config.tenant_pool_idle_timeout.min(idle) / 4)
        .clamp(Duration::from_millis(10), IDLE_CHECK_AFTER / 2);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        shared.sweep_once(Instant::now());
    }
}
