//! How redis and pool failures map onto [`switchyard_core::Error`], and the
//! error a tenant-confined connection gives for a command it will not send.

use std::time::Duration;

use deadpool_redis::redis::{ErrorKind, RedisError, ServerErrorKind};
use deadpool_redis::PoolError;
use switchyard_core::{BackendErrorKind, EndpointId, Error, OperationError, TenantId, TenantScope};

/// Why a tenant-confined connection refused to send a command.
///
/// It reaches callers as the source of an [`Error::Backend`] of kind
/// [`BackendErrorKind::Rejected`]; [`ConfinementError::find`] digs it out.
/// Nothing was sent to the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfinementError {
    /// The command cannot be confined to one tenant's keys or database.
    #[error("{command} cannot be confined to a tenant: {reason}")]
    Forbidden {
        /// The command name, upper-cased and shortened.
        command: String,
        /// Why it cannot be confined.
        reason: &'static str,
    },
    /// The command is not in the command table, so its key positions are unknown.
    #[error("{command} is not in switchyard's command table; send it on an unscoped checkout")]
    Unknown {
        /// The command name, upper-cased and shortened.
        command: String,
    },
    /// The command's arguments could not be parsed to find its keys.
    #[error("{command} is malformed: {reason}")]
    Malformed {
        /// The command name, upper-cased and shortened.
        command: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Raw access was asked of a connection confined to a tenant.
    #[error(
        "raw access needs an unscoped checkout; this connection is confined to tenant {tenant}"
    )]
    Raw {
        /// The tenant the connection serves.
        tenant: TenantId,
    },
}

impl ConfinementError {
    /// The confinement error behind `error`, if that is what it is.
    pub fn find(error: &Error) -> Option<&ConfinementError> {
        match error {
            Error::Backend { source, .. } => source.downcast_ref(),
            _ => None,
        }
    }

    pub(crate) fn into_error(self, endpoint: &EndpointId, tenant: Option<&TenantId>) -> Error {
        Error::backend(endpoint, tenant, BackendErrorKind::Rejected, self)
    }
}

/// A command name fit for an error message: upper-cased, printable ASCII only,
/// at most 32 characters.
pub(crate) fn shown(name: &[u8]) -> String {
    let mut out: String = name
        .iter()
        .take(32)
        .map(|&b| {
            if b.is_ascii_graphic() {
                char::from(b.to_ascii_uppercase())
            } else {
                '?'
            }
        })
        .collect();
    if name.len() > 32 {
        out.push('…');
    }
    out
}

/// The [`BackendErrorKind`] of a redis error.
///
/// Refused connections, failed authentication and a server still loading its
/// data (or a replica cut off from its master) are `Connect`: the endpoint
/// cannot serve now. Other I/O failures, timeouts included, are `Io`.
/// `READONLY` is `ReadOnly`. Everything else the server or the driver rejected
/// (syntax, types, `NOPERM`) is `Rejected`.
pub fn error_kind(err: &RedisError) -> BackendErrorKind {
    if err.is_connection_refusal() {
        return BackendErrorKind::Connect;
    }
    match err.kind() {
        ErrorKind::Io => BackendErrorKind::Io,
        ErrorKind::AuthenticationFailed => BackendErrorKind::Connect,
        ErrorKind::Server(ServerErrorKind::ReadOnly) => BackendErrorKind::ReadOnly,
        ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::MasterDown) => {
            BackendErrorKind::Connect
        }
        _ => BackendErrorKind::Rejected,
    }
}

/// Wraps a redis error as a [`switchyard_core::Error`] for `endpoint` and
/// `tenant`, classified by [`error_kind`]; the redis error stays the source.
///
/// Redis error messages never carry the connection URL or a password, so the
/// result is safe to log.
pub fn redis_error(endpoint: &EndpointId, tenant: Option<&TenantId>, err: RedisError) -> Error {
    let kind = error_kind(&err);
    Error::connect(endpoint, tenant, kind, err)
}

/// A redis error from an operation run by the router's `Cluster::run` (on a
/// [`RawConnection`](crate::RawConnection), say), mapped by [`redis_error`]
/// with the endpoint and tenant of the checkout it ran on.
impl OperationError<crate::RedisConnection> for RedisError {
    fn into_error(self, endpoint: &EndpointId, scope: Option<&TenantScope>) -> Error {
        redis_error(endpoint, scope.map(TenantScope::tenant), self)
    }
}

/// Whether a redis error leaves the connection unfit for another command: the
/// socket broke or a reply never came (it may still arrive, out of turn).
pub(crate) fn breaks_connection(err: &RedisError) -> bool {
    err.is_io_error() || err.is_unrecoverable_error() || err.is_timeout()
}

/// Maps a pool failure: a wait or create that ran out of time is
/// [`Error::Timeout`], a failed connect goes through [`redis_error`].
pub(crate) fn pool_error(
    endpoint: &EndpointId,
    tenant: Option<&TenantId>,
    err: PoolError,
    elapsed: Duration,
) -> Error {
    match err {
        PoolError::Timeout(_) => Error::Timeout {
            endpoint: endpoint.clone(),
            tenant: tenant.cloned(),
            elapsed,
        },
        PoolError::Backend(e) => redis_error(endpoint, tenant, e),
        PoolError::Closed => Error::Closed,
        PoolError::NoRuntimeSpecified => Error::CheckoutRefused {
            endpoint: endpoint.clone(),
            tenant: tenant.cloned(),
            reason: "the pool has no async runtime".into(),
        },
        PoolError::PostCreateHook(e) => Error::backend(
            endpoint,
            tenant,
            BackendErrorKind::Connect,
            std::io::Error::other(e.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deadpool_redis::redis::RedisError;

    fn ep() -> EndpointId {
        EndpointId::new("redis-1")
    }

    #[test]
    fn kinds_follow_the_failure() {
        let refused: RedisError =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert_eq!(error_kind(&refused), BackendErrorKind::Connect);
        let reset: RedisError =
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        assert_eq!(error_kind(&reset), BackendErrorKind::Io);
        assert!(breaks_connection(&reset));
        let e = redis_error(&ep(), None, refused);
        assert!(e.is_endpoint_failure());
        assert_eq!(e.to_string(), "connect error on redis-1");
    }

    #[test]
    fn pool_timeouts_are_timeouts() {
        let e = pool_error(
            &ep(),
            None,
            PoolError::Timeout(deadpool_redis::TimeoutType::Wait),
            Duration::from_millis(5),
        );
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
    }

    #[test]
    fn confinement_errors_are_found_behind_backend_errors() {
        let e = ConfinementError::Forbidden {
            command: "FLUSHALL".into(),
            reason: "x",
        }
        .into_error(&ep(), None);
        assert!(matches!(
            ConfinementError::find(&e),
            Some(ConfinementError::Forbidden { .. })
        ));
        assert!(!e.is_retryable());
    }

    #[test]
    fn shown_names_are_printable_and_short() {
        assert_eq!(shown(b"flushall"), "FLUSHALL");
        assert_eq!(shown(b"a\r\nFLUSHALL"), "A??FLUSHALL");
        assert_eq!(shown(&[b'x'; 40]).chars().count(), 33);
    }
}
