//! Mapping clickhouse errors onto [`switchyard_core::Error`].

use std::time::Duration;

use switchyard_core::{
    BackendErrorKind, Checkout, EndpointId, Error, Isolation, TenantId, TenantScope,
};

/// `UNKNOWN_DATABASE`: the database does not exist.
pub const UNKNOWN_DATABASE: u32 = 81;
/// `READONLY`: the user or server is read-only.
pub const READONLY: u32 = 164;

/// Server error codes that say the server could not take the request right now.
const TRANSIENT_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    236, // ABORTED
    394, // QUERY_WAS_CANCELLED
];

/// Server error codes that say the credentials were refused.
const AUTH_CODES: &[u32] = &[
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    195, // IP_ADDRESS_NOT_ALLOWED
    516, // AUTHENTICATION_FAILED
];

/// The ClickHouse error code in a server error (`Code: 81, e.displayText() = ...`
/// on 18.16, `Code: 81. DB::Exception: ...` on newer servers).
pub fn server_code(error: &clickhouse::error::Error) -> Option<u32> {
    let clickhouse::error::Error::BadResponse(message) = error else {
        return None;
    };
    let rest = &message[message.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What kind of failure a clickhouse error is, for retry and ejection decisions.
///
/// - refused, unreachable or failed while connecting, and refused credentials
///   (codes 192–195, 516): [`BackendErrorKind::Connect`];
/// - any other network failure, the server too busy or cancelling (codes 159,
///   202, 209, 210, 236, 394), an HTTP 5xx without a ClickHouse code, a
///   client-side timeout: [`BackendErrorKind::Io`];
/// - `READONLY` (164): [`BackendErrorKind::ReadOnly`];
/// - everything else (syntax, unknown table or database, bad rows):
///   [`BackendErrorKind::Rejected`].
pub fn classify(error: &clickhouse::error::Error) -> BackendErrorKind {
    use clickhouse::error::Error as E;
    match error {
        E::Network(source) => BackendErrorKind::of_network(source.as_ref()),
        E::TimedOut => BackendErrorKind::Io,
        E::BadResponse(message) => match server_code(error) {
            Some(READONLY) => BackendErrorKind::ReadOnly,
            Some(code) if AUTH_CODES.contains(&code) => BackendErrorKind::Connect,
            Some(code) if TRANSIENT_CODES.contains(&code) => BackendErrorKind::Io,
            Some(_) => BackendErrorKind::Rejected,
            None if message.starts_with('5') => BackendErrorKind::Io,
            None => BackendErrorKind::Rejected,
        },
        _ => BackendErrorKind::Rejected,
    }
}

/// Turns a clickhouse error from a checkout on `endpoint` into a switchyard [`Error`].
///
/// `scope` is the checkout's tenant scope ([`Checkout::scope`]); with a
/// database scope, `UNKNOWN_DATABASE` (81) becomes
/// [`Error::TenantNotProvisioned`] naming the tenant database. A client-side
/// timeout becomes [`Error::Backend`] of kind `Io`, a refused TLS handshake
/// [`Error::Tls`], and everything else [`Error::Backend`] with the kind from
/// [`classify`] and the clickhouse error as its source.
pub fn ch_error(
    endpoint: &EndpointId,
    scope: Option<&TenantScope>,
    error: clickhouse::error::Error,
) -> Error {
    let tenant = scope.map(TenantScope::tenant);
    if let Some(scope) = scope {
        let database_scoped = matches!(scope.isolation(), Isolation::Database | Isolation::Schema);
        if database_scoped && server_code(&error) == Some(UNKNOWN_DATABASE) {
            return Error::TenantNotProvisioned {
                endpoint: endpoint.clone(),
                tenant: scope.tenant().clone(),
                what: "database",
                name: scope.target().to_owned(),
            };
        }
    }
    let kind = classify(&error);
    Error::connect(endpoint, tenant, kind, ChError::Driver(error))
}

/// Crate-specific failures, carried as the source of an [`Error::Backend`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChError {
    /// A table, column, database or setting name is not a plain identifier.
    #[error("invalid identifier {name:?}: {reason}")]
    InvalidIdentifier {
        /// The refused name (truncated to 80 characters).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A row-scoped checkout was asked for something that could leave its
    /// tenant's rows (the raw client, raw SQL).
    #[error("a row-scoped checkout for tenant {tenant} does not expose {what}")]
    Confined {
        /// The checkout's tenant.
        tenant: TenantId,
        /// What was asked for.
        what: &'static str,
    },
    /// A row to insert names another tenant in the tenant column.
    #[error("row {index} has {column} = {found:?}, but the checkout is for tenant {tenant}")]
    ForeignTenant {
        /// Position of the row in the batch.
        index: usize,
        /// The tenant column.
        column: String,
        /// The checkout's tenant.
        tenant: TenantId,
        /// The value found in the row (truncated to 80 characters).
        found: String,
    },
    /// The tenant column of a row-isolated table is missing or not a string.
    /// A numeric column would store tenant `007` as `7`, and compare `'007'`
    /// equal to it: two tenants would share rows.
    #[error("{table}.{column} is {found}; row isolation needs the tenant column to be String or LowCardinality(String)")]
    TenantColumnType {
        /// The table.
        table: String,
        /// The tenant column.
        column: String,
        /// What the server has (`missing` when there is no such column).
        found: String,
    },
    /// A tenant scope names a database no tenant may be given.
    #[error("database {database:?} is {why}; no tenant may be scoped to it")]
    ReservedDatabase {
        /// The database.
        database: String,
        /// What it is.
        why: &'static str,
    },
    /// A row to insert did not serialize to a JSON object.
    #[error("row {index} is not a struct or map")]
    NotARow {
        /// Position of the row in the batch.
        index: usize,
    },
    /// A row to insert could not be serialized.
    #[error("row {index} could not be serialized")]
    Serialize {
        /// Position of the row in the batch.
        index: usize,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A query took longer than the configured query timeout.
    #[error("query timed out after {0:?}")]
    QueryTimeout(Duration),
    /// The probe query answered something other than `1`.
    #[error("probe query returned {0} instead of 1")]
    UnexpectedProbe(u8),
    /// The driver or server failed.
    #[error(transparent)]
    Driver(clickhouse::error::Error),
}

impl ChError {
    pub(crate) fn invalid_identifier(name: &str, reason: &'static str) -> Self {
        ChError::InvalidIdentifier {
            name: name.chars().take(80).collect(),
            reason,
        }
    }
}

/// Wraps a crate error found before any I/O as a rejected request.
pub(crate) fn rejected(endpoint: &EndpointId, tenant: Option<&TenantId>, error: ChError) -> Error {
    Error::backend(endpoint, tenant, BackendErrorKind::Rejected, error)
}

/// Convenience for reporting clickhouse failures on a checkout.
pub trait ChCheckoutExt {
    /// Maps `error` with [`ch_error`], reports it with
    /// [`Checkout::report_failure`] and returns it, so a failed endpoint is
    /// counted against its health.
    ///
    /// ```no_run
    /// # async fn demo(mut conn: switchyard_core::Checkout<switchyard_clickhouse::ChBackend>)
    /// # -> Result<(), switchyard_core::Error> {
    /// use switchyard_clickhouse::ChCheckoutExt;
    ///
    /// let client = conn.client()?.clone();
    /// let n: u64 = client
    ///     .query("SELECT count() FROM events")
    ///     .fetch_one()
    ///     .await
    ///     .map_err(|e| conn.fail(e))?;
    /// # let _ = n; Ok(()) }
    /// ```
    fn fail(&mut self, error: clickhouse::error::Error) -> Error;
}

impl ChCheckoutExt for Checkout<crate::ChBackend> {
    fn fail(&mut self, error: clickhouse::error::Error) -> Error {
        let error = ch_error(self.endpoint(), self.scope(), error);
        self.report_failure(&error);
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error as E;
    use std::io::ErrorKind;

    fn ep() -> EndpointId {
        EndpointId::new("ch-1")
    }

    #[test]
    fn codes_are_read_from_old_and_new_messages() {
        let old = E::BadResponse(
            "Code: 81, e.displayText() = DB::Exception: Database x doesn't exist".into(),
        );
        assert_eq!(server_code(&old), Some(81));
        let new = E::BadResponse("Code: 60. DB::Exception: Table x.y does not exist".into());
        assert_eq!(server_code(&new), Some(60));
        assert_eq!(server_code(&E::BadResponse("502 Bad Gateway".into())), None);
        assert_eq!(server_code(&E::TimedOut), None);
    }

    #[test]
    fn kinds_follow_the_code() {
        let code = |c: u32| E::BadResponse(format!("Code: {c}, e.displayText() = x"));
        assert_eq!(classify(&code(164)), BackendErrorKind::ReadOnly);
        assert_eq!(classify(&code(516)), BackendErrorKind::Connect);
        assert_eq!(classify(&code(202)), BackendErrorKind::Io);
        assert_eq!(classify(&code(62)), BackendErrorKind::Rejected);
        assert_eq!(
            classify(&E::BadResponse("503 Service Unavailable".into())),
            BackendErrorKind::Io
        );
        let refused = std::io::Error::from(ErrorKind::ConnectionRefused);
        assert_eq!(
            classify(&E::Network(Box::new(refused))),
            BackendErrorKind::Connect
        );
        let reset = std::io::Error::from(ErrorKind::ConnectionReset);
        assert_eq!(classify(&E::Network(Box::new(reset))), BackendErrorKind::Io);
    }

    #[test]
    fn unknown_database_under_database_scope_is_not_provisioned() {
        let tenant = TenantId::new("acme").unwrap();
        let scope = TenantScope::new(tenant, Isolation::Database, "tenant_acme", "x");
        let err = ch_error(
            &ep(),
            Some(&scope),
            E::BadResponse("Code: 81, e.displayText() = DB::Exception: no".into()),
        );
        assert!(
            matches!(&err, Error::TenantNotProvisioned { name, what: "database", .. } if name == "tenant_acme"),
            "{err}"
        );
        let row = TenantScope::new(
            TenantId::new("acme").unwrap(),
            Isolation::Row,
            "tenant_acme",
            "x",
        );
        let err = ch_error(
            &ep(),
            Some(&row),
            E::BadResponse("Code: 81, e.displayText() = DB::Exception: no".into()),
        );
        assert_eq!(
            err.backend_kind(),
            Some(BackendErrorKind::Rejected),
            "{err}"
        );
    }
}
