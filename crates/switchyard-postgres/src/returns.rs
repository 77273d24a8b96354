//! The return path: every returned connection is checked in one
//! simple-protocol round trip on a task (outside a transaction block, still
//! carrying exactly its owner's scope) before anyone else gets it; one that
//! fails, times out or comes back dirty is closed, never pooled. Also the
//! sweeper, which closes idle connections and tenant pools and keeps
//! `min_idle` connections open.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{EndpointId, Recycle, TenantScope};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::Shared;
use crate::connection::PgConn;
use crate::lifecycle::check;
use crate::slots::Slots;
use crate::stats::bump;

impl Shared {
    pub(crate) fn endpoint(&self) -> &EndpointId {
        &self.config.endpoint
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The recycle step: the check, within `reset_timeout`; a connection past
    /// its `max_lifetime` is closed instead.
    pub(crate) async fn recycle(&self, conn: &mut PgConn) -> Recycle {
        let too_old = self
            .config
            .pool
            .max_lifetime
            .is_some_and(|max| conn.pooled().created.elapsed() >= max);
        if too_old || self.is_closed() {
            return Recycle::Discard;
        }
        let pooled = conn.pooled_mut();
        let owner = pooled.owner.clone();
        let limit = Instant::now() + self.config.reset_timeout;
        let outcome = tokio::time::timeout_at(limit, check(&mut pooled.raw, owner.as_ref())).await;
        if self.judge(owner.as_ref(), outcome) {
            pooled.verified = Instant::now();
            Recycle::Keep
        } else {
            Recycle::Discard
        }
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
        }
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
        .clamp(Duration::from_millis(10), Duration::from_secs(30));
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        shared.sweep_once(Instant::now());
    }
}
