//! The connection a checkout derefs to: a sqlx pool connection plus what it is
//! scoped to.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use switchyard_core::TenantScope;

use crate::tenant_pools::TenantLease;

/// A PostgreSQL connection from a [`PgBackend`](crate::PgBackend).
///
/// Derefs to [`sqlx::PgConnection`], and `&mut PgConn` is itself an sqlx
/// [`Executor`](sqlx::Executor), so `&mut *checkout` runs queries directly:
///
/// ```no_run
/// # async fn demo(mut conn: switchyard_core::Checkout<switchyard_postgres::PgBackend>)
/// # -> Result<(), sqlx::Error> {
/// let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
///     .fetch_one(&mut *conn)
///     .await?;
/// # let _ = n; Ok(()) }
/// ```
///
/// It goes back to its pool only through the backend's return path, which
/// resets and checks it (or stashes it, still scoped, for the same tenant);
/// dropped any other way, it is closed. Queries run through `&mut *checkout`
/// are tracked: if one's future or stream is dropped before it finishes (a
/// timeout, a cancelled request), the connection is closed on return rather
/// than drained. Queries run on the sqlx connection itself (`&mut **checkout`,
/// a transaction) are not tracked; a cancelled one is drained by the return
/// check within `reset_timeout`, or the connection is closed.
pub struct PgConn {
    inner: Option<PoolConnection<Postgres>>,
    /// The schema or row scope the session currently carries.
    pub(crate) scoped: Option<TenantScope>,
    /// The tenant database this connection belongs to, for database isolation.
    pub(crate) database: Option<Arc<str>>,
    /// Keeps the tenant pool open while the connection is out.
    pub(crate) _lease: Option<TenantLease>,
    /// The pool keeps a minimum of connections, which makes sqlx spawn a task
    /// when one is detached.
    pub(crate) pool_keeps_min: bool,
    /// A query run through this connection's [`Executor`](sqlx::Executor) impl
    /// has not finished: its future or stream was dropped mid-way.
    pub(crate) in_flight: bool,
}

impl PgConn {
    pub(crate) fn new(inner: PoolConnection<Postgres>, pool_keeps_min: bool) -> Self {
        Self {
            inner: Some(inner),
            scoped: None,
            database: None,
            _lease: None,
            pool_keeps_min,
            in_flight: false,
        }
    }

    pub(crate) fn for_tenant_database(
        inner: PoolConnection<Postgres>,
        database: Arc<str>,
        lease: TenantLease,
    ) -> Self {
        Self {
            inner: Some(inner),
            scoped: None,
            database: Some(database),
            _lease: Some(lease),
            pool_keeps_min: false,
            in_flight: false,
        }
    }

    /// The schema or row scope this session carries right now, if any.
    pub fn session_scope(&self) -> Option<&TenantScope> {
        self.scoped.as_ref()
    }

    /// The tenant database this connection is connected to, for a
    /// database-isolated checkout.
    pub fn tenant_database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// The sqlx connection.
    #[allow(clippy::expect_used)]
    fn raw(&self) -> &sqlx::PgConnection {
        // Only `into_inner` and `Drop` take the connection out.
        self.inner
            .as_deref()
            .expect("connection present until dropped")
    }

    fn raw_mut(&mut self) -> &mut sqlx::PgConnection {
        self.split().0
    }

    /// The sqlx connection and the in-flight flag, borrowed apart.
    #[allow(clippy::expect_used)]
    pub(crate) fn split(&mut self) -> (&mut sqlx::PgConnection, &mut bool) {
        let conn = self
            .inner
            .as_deref_mut()
            .expect("connection present until dropped");
        (conn, &mut self.in_flight)
    }

    /// Hands the pool connection back to the pool as it is: the only way a
    /// connection goes back, used once the return path has vouched for it.
    pub(crate) fn return_to_pool(mut self) {
        if let Some(inner) = self.inner.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                drop(inner);
            } else {
                close_now(inner, self.pool_keeps_min);
            }
        }
    }

    /// Closes the connection instead of pooling it.
    pub(crate) fn close(mut self) {
        if let Some(inner) = self.inner.take() {
            close_now(inner, self.pool_keeps_min);
        }
    }
}

/// Closes a pool connection without blocking: gracefully on a background task
/// when a runtime is there, otherwise by detaching it from the pool (sqlx would
/// otherwise need a runtime to return it).
pub(crate) fn close_now(mut conn: PoolConnection<Postgres>, pool_keeps_min: bool) {
    if tokio::runtime::Handle::try_current().is_ok() {
        conn.close_on_drop();
        drop(conn);
    } else if pool_keeps_min {
        // Detaching would make sqlx spawn a replacement task; leaking costs the
        // pool one slot, which only matters if the pool outlives its runtime.
        drop(conn.leak());
    } else {
        drop(conn.detach());
    }
}

/// Dropped any other way than through the return path (a cancelled scope, a
/// discard, a backend going away, direct use of the `Backend` methods), a
/// connection is closed, never pooled: nothing has vouched for its session.
impl Drop for PgConn {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            close_now(inner, self.pool_keeps_min);
        }
    }
}

impl Deref for PgConn {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &sqlx::PgConnection {
        self.raw()
    }
}

impl DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        self.raw_mut()
    }
}

impl AsRef<sqlx::PgConnection> for PgConn {
    fn as_ref(&self) -> &sqlx::PgConnection {
        self.raw()
    }
}

impl AsMut<sqlx::PgConnection> for PgConn {
    fn as_mut(&mut self) -> &mut sqlx::PgConnection {
        self.raw_mut()
    }
}

impl fmt::Debug for PgConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConn")
            .field("tenant", &self.scoped.as_ref().map(TenantScope::tenant))
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}
