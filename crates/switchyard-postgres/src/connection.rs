//! The connection a checkout derefs to: a pooled sqlx connection plus where it
//! goes back.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use switchyard_core::TenantScope;

use crate::slots::{Pooled, Slots};
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
/// checks it; dropped any other way, it is closed. Queries run through
/// `&mut *checkout` are tracked: if one's future or stream is dropped before
/// it finishes (a timeout, a cancelled request), the connection is closed on
/// return rather than drained. Queries run on the sqlx connection itself
/// (`&mut **checkout`, a transaction) are not tracked; a cancelled one is
/// drained by the return check within `reset_timeout`, or the connection is
/// closed.
pub struct PgConn {
    conn: Option<Pooled>,
    /// The pool it goes back to.
    pub(crate) slots: Arc<Slots>,
    /// The tenant database this connection belongs to, for database isolation.
    pub(crate) database: Option<Arc<str>>,
    /// Keeps the tenant pool open while the connection is out.
    pub(crate) _lease: Option<TenantLease>,
    /// A query run through this connection's [`Executor`](sqlx::Executor) impl
    /// has not finished: its future or stream was dropped mid-way.
    pub(crate) in_flight: bool,
}

impl PgConn {
    pub(crate) fn new(
        conn: Pooled,
        slots: Arc<Slots>,
        database: Option<Arc<str>>,
        lease: Option<TenantLease>,
    ) -> Self {
        Self {
            conn: Some(conn),
            slots,
            database,
            _lease: lease,
            in_flight: false,
        }
    }

    /// The owner this session last served: the tenant scope it carries, or
    /// `None` for an unscoped one.
    pub fn session_scope(&self) -> Option<&TenantScope> {
        self.pooled().owner.as_ref()
    }

    /// The tenant database this connection is connected to, for a
    /// database-isolated checkout.
    pub fn tenant_database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    #[allow(clippy::expect_used)]
    pub(crate) fn pooled(&self) -> &Pooled {
        // Only `into_pooled` and `Drop` take the connection out.
        self.conn
            .as_ref()
            .expect("connection present until dropped")
    }

    #[allow(clippy::expect_used)]
    pub(crate) fn pooled_mut(&mut self) -> &mut Pooled {
        self.conn
            .as_mut()
            .expect("connection present until dropped")
    }

    /// The sqlx connection and the in-flight flag, borrowed apart.
    pub(crate) fn split(&mut self) -> (&mut sqlx::PgConnection, &mut bool) {
        #[allow(clippy::expect_used)]
        let pooled = self
            .conn
            .as_mut()
            .expect("connection present until dropped");
        (&mut pooled.raw, &mut self.in_flight)
    }

    /// Hands the connection back to its pool as it is: used once the return
    /// path has vouched for it.
    pub(crate) fn return_to_pool(mut self) {
        if let Some(conn) = self.conn.take() {
            self.slots.put(conn);
        }
    }

    /// Closes the connection instead of pooling it.
    pub(crate) fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close();
        }
    }
}

/// Dropped any other way than through the return path (a cancelled scope, a
/// discard, a backend going away), a connection is closed, never pooled:
/// nothing has vouched for its session.
impl Drop for PgConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close();
        }
    }
}

impl Deref for PgConn {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &sqlx::PgConnection {
        &self.pooled().raw
    }
}

impl DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        &mut self.pooled_mut().raw
    }
}

impl AsRef<sqlx::PgConnection> for PgConn {
    fn as_ref(&self) -> &sqlx::PgConnection {
        self
    }
}

impl AsMut<sqlx::PgConnection> for PgConn {
    fn as_mut(&mut self) -> &mut sqlx::PgConnection {
        self
    }
}

impl fmt::Debug for PgConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConn")
            .field("tenant", &self.session_scope().map(TenantScope::tenant))
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}
