//! The return path: every healthy checkout comes back through one
//! simple-protocol round trip that undoes the scope (or, for the affinity
//! stash, confirms it) and checks that no transaction block is open. Anything
//! that fails, times out or comes back dirty is closed, never pooled.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Row};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use switchyard_core::Recycle;

use crate::affinity::Put;
use crate::backend::Shared;
use crate::connection::PgConn;
use crate::sql::{reset_sql, verify_sql};
use crate::stats::bump;

impl Shared {
    /// Undoes the session scope before `limit`; true if the connection is now
    /// clean. Callers close one that is not.
    pub(crate) async fn reset(&self, conn: &mut PgConn, limit: Instant) -> bool {
        let sql = reset_sql(conn.scoped.as_ref());
        let outcome = tokio::time::timeout_at(limit, check(conn, sql)).await;
        let clean = self.judge(conn, outcome);
        if clean {
            conn.scoped = None;
        }
        clean
    }

    /// Counts and logs the outcome of a return-path check.
    fn judge(
        &self,
        conn: &PgConn,
        outcome: Result<Result<bool, sqlx::Error>, tokio::time::error::Elapsed>,
    ) -> bool {
        let tenant = conn.scoped.as_ref().map(|s| s.tenant().as_str());
        match outcome {
            Ok(Ok(true)) => true,
            Ok(Ok(false)) => {
                bump(&self.returns.closed_dirty);
                tracing::warn!(endpoint = %self.endpoint(), tenant, "connection returned inside a transaction block or with a changed scope; closed");
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

    /// The recycle step: a clean schema- or row-scoped connection bound for
    /// the stash is verified to carry exactly its scope; any other is reset.
    pub(crate) async fn recycle(&self, conn: &mut PgConn) -> Recycle {
        let stashable = conn.database.is_none() && self.stash.enabled();
        if let Some(scope) = conn.scoped.clone().filter(|_| stashable) {
            let limit = Instant::now() + self.config.reset_timeout;
            let outcome = tokio::time::timeout_at(limit, check(conn, verify_sql(&scope))).await;
            return if self.judge(conn, outcome) {
                Recycle::Keep
            } else {
                Recycle::Discard
            };
        }
        let was_scoped = conn.scoped.is_some();
        if self
            .reset(conn, Instant::now() + self.config.reset_timeout)
            .await
        {
            if was_scoped {
                bump(&self.returns.resets);
            }
            Recycle::Keep
        } else {
            Recycle::Discard
        }
    }

    /// Keeps a recycled connection: a scoped one goes to the stash (or, when
    /// the stash refuses it, is reset on a task first), an unscoped one back to
    /// the pool.
    pub(crate) fn keep(self: &Arc<Self>, conn: PgConn) {
        if conn.scoped.is_none() {
            conn.return_to_pool();
            return;
        }
        match self.stash.put(conn) {
            Put::Stashed => {}
            Put::Evicted(other) | Put::Refused(other) => self.reset_in_background(other),
        }
    }

    async fn reset_and_return(&self, mut conn: PgConn) {
        let was_scoped = conn.scoped.is_some();
        if self
            .reset(&mut conn, Instant::now() + self.config.reset_timeout)
            .await
        {
            if was_scoped {
                bump(&self.returns.resets);
            }
            conn.return_to_pool();
        } else {
            conn.close();
        }
    }

    pub(crate) fn reset_in_background(self: &Arc<Self>, conn: PgConn) {
        let shared = Arc::clone(self);
        tokio::spawn(async move { shared.reset_and_return(conn).await });
    }
}

/// Runs a simple-protocol check and reads the first column of its last row.
pub(crate) async fn check(conn: &mut PgConn, sql: String) -> Result<bool, sqlx::Error> {
    let rows = sqlx::raw_sql(AssertSqlSafe(sql))
        .fetch_all(&mut **conn)
        .await?;
    let row = rows.last().ok_or(sqlx::Error::RowNotFound)?;
    Ok(row.try_get::<Option<bool>, _>(0)?.unwrap_or(false))
}

/// Closes idle tenant pools and ages out stashed connections until cancelled.
pub(crate) async fn sweep(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = (shared
        .config
        .tenant_pool_idle_timeout
        .min(shared.config.affinity.max_age)
        / 4)
    .clamp(Duration::from_millis(10), Duration::from_secs(30));
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        let now = Instant::now();
        let closed = shared.tenants.close_idle(now);
        if closed > 0 {
            tracing::debug!(endpoint = %shared.config.endpoint, closed, "closed idle tenant pools");
        }
        for conn in shared.stash.take_expired(now) {
            shared.reset_in_background(conn);
        }
    }
}
