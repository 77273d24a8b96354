//! Mapping sqlx errors onto [`switchyard_core::Error`].

use std::time::Duration;

use switchyard_core::{
    BackendErrorKind, Checkout, EndpointId, Error, Isolation, OperationError, TenantScope,
};

/// SQLSTATE `25006`: a write on a hot standby.
const READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// SQLSTATE `3D000`: the database does not exist.
const INVALID_CATALOG_NAME: &str = "3D000";
/// SQLSTATE `3F000`: the schema does not exist.
const INVALID_SCHEMA_NAME: &str = "3F000";

/// What kind of failure a sqlx error is, for retry and ejection decisions.
///
/// - refused, unreachable or reset while connecting, TLS, authentication
///   (`28xxx`), too many connections (`53300`), the server starting or shutting
///   down (`57P0x`), connection exceptions (`08xxx`), a pool that timed out or
///   was closed: [`BackendErrorKind::Connect`];
/// - any other I/O error, protocol errors, a crashed worker: [`BackendErrorKind::Io`];
/// - `25006 read_only_sql_transaction` (a standby asked to write):
///   [`BackendErrorKind::ReadOnly`];
/// - everything else (syntax, constraints, permissions, `3D000`, `3F000`, row
///   decoding): [`BackendErrorKind::Rejected`].
///
/// [`pg_error`] refines this further into [`Error::Timeout`], [`Error::Closed`]
/// and [`Error::TenantNotProvisioned`].
pub fn classify(error: &sqlx::Error) -> BackendErrorKind {
    match error {
        sqlx::Error::Io(io) => BackendErrorKind::of_io(io.kind()),
        sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            BackendErrorKind::Connect
        }
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => BackendErrorKind::Io,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some(READ_ONLY_SQL_TRANSACTION) => BackendErrorKind::ReadOnly,
            Some(code)
                if code.starts_with("08")
                    || code.starts_with("28")
                    || code.starts_with("57P")
                    || code == "53300" =>
            {
                BackendErrorKind::Connect
            }
            _ => BackendErrorKind::Rejected,
        },
        _ => BackendErrorKind::Rejected,
    }
}

/// The SQLSTATE of a database error, if `error` is one.
pub fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Turns a sqlx error from a checkout on `endpoint` into a switchyard [`Error`].
///
/// `scope` is the checkout's tenant scope ([`Checkout::scope`]); with one,
/// `3D000 invalid_catalog_name` and `3F000 invalid_schema_name` become
/// [`Error::TenantNotProvisioned`] naming the tenant's database or schema.
/// A timed-out pool becomes [`Error::Timeout`], a closed one [`Error::Closed`],
/// and the rest [`Error::Backend`] with the kind from [`classify`] and the sqlx
/// error as its source. Report it with [`Checkout::report_failure`] so the
/// router learns from it, or use [`PgCheckoutExt::fail`].
pub fn pg_error(endpoint: &EndpointId, scope: Option<&TenantScope>, error: sqlx::Error) -> Error {
    timed_pg_error(endpoint, scope, error, Duration::ZERO)
}

/// [`pg_error`] with the time already spent waiting, for [`Error::Timeout`].
pub(crate) fn timed_pg_error(
    endpoint: &EndpointId,
    scope: Option<&TenantScope>,
    error: sqlx::Error,
    elapsed: Duration,
) -> Error {
    let tenant = scope.map(TenantScope::tenant);
    match &error {
        sqlx::Error::PoolTimedOut => {
            return Error::Timeout {
                endpoint: endpoint.clone(),
                tenant: tenant.cloned(),
                elapsed,
            }
        }
        sqlx::Error::PoolClosed => return Error::Closed,
        _ => {}
    }
    if let Some(scope) = scope {
        let what = match sqlstate(&error).as_deref() {
            Some(INVALID_CATALOG_NAME) => Some("database"),
            Some(INVALID_SCHEMA_NAME) => Some("schema"),
            _ => None,
        };
        if let Some(what) = what {
            // A missing schema under database isolation is the caller's query,
            // not the tenant's provisioning; name what the scope points at.
            let name = match (scope.isolation(), what) {
                (Isolation::Database, "database") | (Isolation::Schema, "schema") => {
                    scope.target().to_owned()
                }
                _ => {
                    return Error::backend(endpoint, tenant, BackendErrorKind::Rejected, error);
                }
            };
            return Error::TenantNotProvisioned {
                endpoint: endpoint.clone(),
                tenant: scope.tenant().clone(),
                what,
                name,
            };
        }
    }
    Error::connect(endpoint, tenant, classify(&error), error)
}

/// A sqlx error from an operation run by the router's `Cluster::run`, mapped
/// by [`pg_error`] with the endpoint and tenant scope of the checkout it ran on:
/// the operation returns `sqlx::Error` and needs no mapping of its own.
impl OperationError<crate::PgConn> for sqlx::Error {
    fn into_error(self, endpoint: &EndpointId, scope: Option<&TenantScope>) -> Error {
        pg_error(endpoint, scope, self)
    }
}

/// Convenience for reporting sqlx failures on a checkout.
pub trait PgCheckoutExt {
    /// Maps `error` with [`pg_error`], reports it with
    /// [`Checkout::report_failure`] and returns it, so a broken connection is
    /// discarded and counted against the endpoint.
    ///
    /// ```no_run
    /// # async fn demo(mut conn: switchyard_core::Checkout<switchyard_postgres::PgBackend>)
    /// # -> Result<(), switchyard_core::Error> {
    /// use switchyard_postgres::PgCheckoutExt;
    ///
    /// let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
    ///     .fetch_one(&mut *conn)
    ///     .await
    ///     .map_err(|e| conn.fail(e))?;
    /// # let _ = n; Ok(()) }
    /// ```
    fn fail(&mut self, error: sqlx::Error) -> Error;
}

impl PgCheckoutExt for Checkout<crate::PgBackend> {
    fn fail(&mut self, error: sqlx::Error) -> Error {
        let error = pg_error(self.endpoint(), self.scope(), error);
        self.report_failure(&error);
        error
    }
}

/// Crate-specific failures, carried as the source of an [`Error::Backend`] or
/// returned by the helpers in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// Every tenant pool is in use and the cap is reached, so no pool can be
    /// opened for another tenant database.
    #[error(
        "all {max} tenant pools are in use; cannot open one for database {database:?} \
         (raise max_tenant_pools)"
    )]
    TenantPoolsBusy {
        /// The configured cap.
        max: usize,
        /// The database that could not get a pool.
        database: String,
    },
    /// A connection from one pool was asked to serve a scope it cannot serve
    /// (a database-isolated tenant on a connection to another database).
    #[error("connection to {have} cannot serve database {want:?}")]
    WrongDatabase {
        /// What the connection is connected to.
        have: String,
        /// The database the scope asks for.
        want: String,
    },
    /// A database-isolated tenant's database is one the endpoint shares with
    /// others: the URL's own database, `postgres`, `template0` or `template1`.
    #[error("database {database:?} is shared or reserved and never serves one tenant")]
    ReservedDatabase {
        /// The refused database name.
        database: String,
    },
    /// A row-level setting name is not a dotted plain name.
    #[error("invalid row setting: {0}")]
    InvalidSetting(String),
    /// An identifier was empty or held a NUL character.
    #[error("invalid identifier {0:?}: it must be non-empty and hold no NUL character")]
    InvalidIdentifier(String),
    /// The database refused a statement.
    #[error("postgres error")]
    Sqlx(#[from] sqlx::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use switchyard_core::TenantId;

    fn ep() -> EndpointId {
        EndpointId::new("pg-1")
    }

    #[test]
    fn io_errors_split_into_connect_and_io() {
        let refused = sqlx::Error::Io(std::io::Error::from(ErrorKind::ConnectionRefused));
        assert_eq!(classify(&refused), BackendErrorKind::Connect);
        let reset = sqlx::Error::Io(std::io::Error::from(ErrorKind::ConnectionReset));
        assert_eq!(classify(&reset), BackendErrorKind::Io);
        assert_eq!(
            classify(&sqlx::Error::Protocol("x".into())),
            BackendErrorKind::Io
        );
        assert_eq!(
            classify(&sqlx::Error::RowNotFound),
            BackendErrorKind::Rejected
        );
    }

    #[test]
    fn pool_timeouts_and_closure_get_their_own_variants() {
        let t = TenantId::new("a").unwrap();
        let scope = TenantScope::new(t, Isolation::Schema, "tenant_a", "app.t");
        let e = timed_pg_error(
            &ep(),
            Some(&scope),
            sqlx::Error::PoolTimedOut,
            Duration::from_millis(5),
        );
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(matches!(
            pg_error(&ep(), None, sqlx::Error::PoolClosed),
            Error::Closed
        ));
        let e = pg_error(&ep(), None, sqlx::Error::RowNotFound);
        assert_eq!(e.backend_kind(), Some(BackendErrorKind::Rejected));
    }
}
