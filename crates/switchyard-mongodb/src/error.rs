//! Mapping driver errors onto [`switchyard_core::Error`], and this crate's own
//! failures.

use std::time::Duration;

use mongodb::error::{ErrorKind, WriteFailure};
use switchyard_core::{BackendErrorKind, Checkout, EndpointId, Error, Isolation, TenantId};

/// Server codes that say "this node does not take writes (any more)":
/// NotWritablePrimary, NotPrimaryNoSecondaryOk, LegacyNotPrimary,
/// PrimarySteppedDown, InterruptedDueToReplStateChange.
const READ_ONLY_CODES: [i32; 5] = [10107, 13435, 10058, 189, 11602];

/// Server codes that say "this node is going away or not serving":
/// ShutdownInProgress, InterruptedAtShutdown, NotPrimaryOrSecondary,
/// HostUnreachable, HostNotFound, NetworkTimeout, SocketException.
const UNAVAILABLE_CODES: [i32; 7] = [91, 11600, 13436, 6, 7, 89, 9001];

/// What kind of failure a driver error is, for retry and ejection decisions.
///
/// - no server could be selected in time, refused or unreachable at connect,
///   DNS, TLS, authentication: [`BackendErrorKind::Connect`];
/// - any other I/O error, a cleared pool (the driver clears it after a network
///   error), an unreadable reply, a node shutting down or not serving
///   (codes 91, 11600, 13436, and the network codes 6, 7, 89, 9001):
///   [`BackendErrorKind::Io`];
/// - a node that does not take writes: NotWritablePrimary (10107),
///   NotPrimaryNoSecondaryOk (13435), LegacyNotPrimary (10058),
///   PrimarySteppedDown (189), InterruptedDueToReplStateChange (11602), as a
///   command error, write error or write concern error:
///   [`BackendErrorKind::ReadOnly`];
/// - everything else (bad commands, duplicate keys, validation, permissions,
///   serialization): [`BackendErrorKind::Rejected`].
pub fn classify(error: &mongodb::error::Error) -> BackendErrorKind {
    match error.kind.as_ref() {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Authentication { .. }
        | ErrorKind::InvalidTlsConfig { .. } => BackendErrorKind::Connect,
        ErrorKind::Io(io) => BackendErrorKind::of_io(io.kind()),
        ErrorKind::ConnectionPoolCleared { .. } | ErrorKind::InvalidResponse { .. } => {
            BackendErrorKind::Io
        }
        ErrorKind::Command(e) => by_code(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => by_code(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => by_code(e.code),
        ErrorKind::InsertMany(e) => e
            .write_concern_error
            .as_ref()
            .map(|wce| wce.code)
            .or_else(|| {
                e.write_errors
                    .as_ref()
                    .and_then(|w| w.first())
                    .map(|w| w.code)
            })
            .map_or(BackendErrorKind::Rejected, by_code),
        _ => BackendErrorKind::Rejected,
    }
}

fn by_code(code: i32) -> BackendErrorKind {
    if READ_ONLY_CODES.contains(&code) {
        BackendErrorKind::ReadOnly
    } else if UNAVAILABLE_CODES.contains(&code) {
        BackendErrorKind::Io
    } else {
        BackendErrorKind::Rejected
    }
}

/// The server's error code, for command, write and write concern errors.
pub fn server_code(error: &mongodb::error::Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .and_then(|w| w.first())
            .map(|w| w.code)
            .or_else(|| e.write_concern_error.as_ref().map(|w| w.code)),
        _ => None,
    }
}

/// Turns a driver error from `endpoint` into a switchyard [`Error`].
///
/// A client that was shut down becomes [`Error::Closed`]; everything else
/// becomes [`Error::Backend`] with the kind from [`classify`] and the driver
/// error as its source. Report it with [`Checkout::report_failure`] so the
/// router learns from it, or use [`MongoCheckoutExt::fail_driver`].
pub fn mongo_error(
    endpoint: &EndpointId,
    tenant: Option<&TenantId>,
    error: mongodb::error::Error,
) -> Error {
    if matches!(error.kind.as_ref(), ErrorKind::Shutdown) {
        return Error::Closed;
    }
    let kind = classify(&error);
    Error::backend(endpoint, tenant, kind, error)
}

/// A request the tenant handle refused, as an [`Error::Backend`] of kind
/// [`BackendErrorKind::Rejected`] (not retryable, not an endpoint failure).
pub(crate) fn rejected(endpoint: &EndpointId, tenant: Option<&TenantId>, e: MongoError) -> Error {
    Error::backend(endpoint, tenant, BackendErrorKind::Rejected, e)
}

/// The [`MongoError`] inside a switchyard error, if there is one: how callers
/// and tests tell a refused escape attempt from a server error.
///
/// ```
/// use switchyard_core::{BackendErrorKind, EndpointId, Error};
/// use switchyard_mongodb::{mongo_cause, MongoError};
///
/// let e = Error::backend(
///     &EndpointId::new("m1"),
///     None,
///     BackendErrorKind::Rejected,
///     MongoError::ScopedHandle,
/// );
/// assert!(matches!(mongo_cause(&e), Some(MongoError::ScopedHandle)));
/// ```
pub fn mongo_cause(error: &Error) -> Option<&MongoError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<MongoError>() {
            return Some(found);
        }
        source = e.source();
    }
    None
}

/// Convenience for reporting failures on a checkout.
pub trait MongoCheckoutExt {
    /// Reports `error` with [`Checkout::report_failure`] and returns it, so an
    /// unreachable or broken endpoint is counted against it.
    ///
    /// ```no_run
    /// # async fn demo(mut conn: switchyard_core::Checkout<switchyard_mongodb::MongoBackend>)
    /// # -> Result<(), switchyard_core::Error> {
    /// use mongodb::bson::doc;
    /// use switchyard_mongodb::MongoCheckoutExt;
    ///
    /// let found = conn.collection("items")?.find(doc! {}, None).await;
    /// let found = found.map_err(|e| conn.fail(e))?;
    /// # let _ = found; Ok(()) }
    /// ```
    fn fail(&mut self, error: Error) -> Error;

    /// Maps a driver error (from an unscoped handle's raw client) with
    /// [`mongo_error`], reports it and returns it.
    fn fail_driver(&mut self, error: mongodb::error::Error) -> Error;
}

impl MongoCheckoutExt for Checkout<crate::MongoBackend> {
    fn fail(&mut self, error: Error) -> Error {
        self.report_failure(&error);
        error
    }

    fn fail_driver(&mut self, error: mongodb::error::Error) -> Error {
        let error = mongo_error(self.endpoint(), self.tenant(), error);
        self.report_failure(&error);
        error
    }
}

/// Crate-specific failures, carried as the source of an [`Error::Backend`] (or
/// [`Error::Scope`]).
///
/// Every refusal of the tenant handle is one of these, raised before anything
/// is sent to the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MongoError {
    /// A document names another tenant in the tenant field.
    #[error("document sets {field:?} to {found}, but the checkout belongs to tenant {tenant}")]
    TenantFieldMismatch {
        /// The configured tenant field.
        field: String,
        /// The checkout's tenant.
        tenant: TenantId,
        /// What the document held, as extended JSON.
        found: String,
    },
    /// An update would modify the tenant field.
    #[error("{operator} on {path:?} would modify the tenant field {field:?}")]
    TenantFieldUpdate {
        /// The configured tenant field.
        field: String,
        /// The update operator (`$set`, `$rename`, ...).
        operator: String,
        /// The path it touches.
        path: String,
    },
    /// A row-scoped operation carried a `collation`: it would apply to the
    /// tenant condition too, and under a case-insensitive one
    /// `{tenant_id: "acme"}` also matches tenant `ACME`'s documents.
    #[error("a collation is not allowed on a row-scoped {operation}: it would also apply to the tenant condition")]
    CollationRefused {
        /// The operation (`find`, `update`, ...).
        operation: &'static str,
    },
    /// An update document is not made of update operators.
    #[error("invalid update document: {reason}")]
    InvalidUpdate {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An aggregation stage could reach data outside the tenant's scope.
    #[error("aggregation stage {stage} is not allowed under {isolation} isolation")]
    ForbiddenStage {
        /// The stage (`$lookup`, `$out`, ...).
        stage: String,
        /// The scope's isolation level.
        isolation: Isolation,
    },
    /// An aggregation stage names another database.
    #[error("aggregation stage {stage} names database {database:?}, outside the tenant's scope")]
    ForeignNamespace {
        /// The stage.
        stage: String,
        /// The database it names.
        database: String,
    },
    /// An aggregation stage is malformed in a way that hides its namespace.
    #[error("aggregation stage {stage} is malformed: {reason}")]
    InvalidStage {
        /// The stage.
        stage: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A database, collection or prefix name is unusable.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// `database`, `collection`, `collection prefix`, `tenant database`.
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Raw client or database access was asked of a tenant-scoped handle.
    #[error("raw client access is only available on unscoped checkouts")]
    ScopedHandle,
    /// An operation did not finish within the configured operation timeout.
    #[error("operation did not finish within {timeout:?}")]
    OperationTimeout {
        /// The configured timeout.
        timeout: Duration,
    },
    /// The probed node is neither a writable primary nor a secondary
    /// (arbiter, recovering, starting up).
    #[error("node is neither primary nor secondary ({state})")]
    NotServing {
        /// What the node reported.
        state: String,
    },
    /// The driver failed.
    #[error("mongodb driver error")]
    Driver(#[from] mongodb::error::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind as IoKind;

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(by_code(10107), BackendErrorKind::ReadOnly);
        assert_eq!(by_code(13435), BackendErrorKind::ReadOnly);
        assert_eq!(by_code(189), BackendErrorKind::ReadOnly);
        assert_eq!(by_code(91), BackendErrorKind::Io);
        assert_eq!(by_code(11000), BackendErrorKind::Rejected);
        assert_eq!(by_code(2), BackendErrorKind::Rejected);
    }

    #[test]
    fn driver_errors_map_to_kinds() {
        let ep = EndpointId::new("m1");
        let io = |k: IoKind| mongodb::error::Error::from(std::io::Error::from(k));
        assert_eq!(
            classify(&io(IoKind::ConnectionRefused)),
            BackendErrorKind::Connect
        );
        assert_eq!(classify(&io(IoKind::ConnectionReset)), BackendErrorKind::Io);
        assert_eq!(classify(&io(IoKind::UnexpectedEof)), BackendErrorKind::Io);
        let e = mongo_error(&ep, None, io(IoKind::ConnectionRefused));
        assert!(e.is_retryable() && e.is_endpoint_failure(), "{e}");
        let shutdown = mongodb::error::Error::from(ErrorKind::Shutdown);
        assert!(matches!(mongo_error(&ep, None, shutdown), Error::Closed));
        let Err(bad) = mongodb::options::ConnectionString::parse("mongodb://h:notaport") else {
            panic!("a bad port must not parse");
        };
        assert_eq!(classify(&bad), BackendErrorKind::Rejected);
        assert_eq!(server_code(&bad), None);
    }

    #[test]
    fn typed_causes_are_found_through_the_chain() {
        let ep = EndpointId::new("m1");
        let e = rejected(&ep, None, MongoError::InvalidUpdate { reason: "empty" });
        assert!(!e.is_retryable());
        assert!(!e.is_endpoint_failure());
        assert!(matches!(
            mongo_cause(&e),
            Some(MongoError::InvalidUpdate { .. })
        ));
        let plain = Error::Closed;
        assert!(mongo_cause(&plain).is_none());
    }
}
