//! The one error type of the test bed.

use std::time::Duration;

/// Result alias used throughout the test bed.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// Everything that can go wrong while starting or steering a test engine.
///
/// A missing engine binary is an error ([`TestkitError::MissingBinary`]) that names
/// the install command: tests never skip silently because a server is absent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// An engine binary was not found.
    #[error("`{name}` not found (looked in {looked_in}); install it with: {install}")]
    MissingBinary {
        /// The binary that was looked for.
        name: String,
        /// Where it was looked for.
        looked_in: String,
        /// The command that installs it.
        install: &'static str,
    },
    /// A file-system or socket operation failed.
    #[error("i/o error while {context}")]
    Io {
        /// What the test bed was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A one-shot helper command (initdb, pg_basebackup, pg_ctl) failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line, shortened to the program and its first arguments.
        command: String,
        /// Exit status as text.
        status: String,
        /// The tail of the command's output.
        output: String,
    },
    /// A server exited on its own while it was starting.
    #[error("{server} exited during start-up ({status}); log tail:\n{log_tail}")]
    Exited {
        /// Which server.
        server: String,
        /// Exit status as text.
        status: String,
        /// The last lines of the server's log.
        log_tail: String,
    },
    /// A condition was not reached in time.
    #[error("timed out after {elapsed:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long was waited.
        elapsed: Duration,
    },
    /// The operation does not apply to this server (e.g. killing a server the test
    /// bed did not start).
    #[error("{operation} is not supported for {server}")]
    Unsupported {
        /// The refused operation.
        operation: &'static str,
        /// The server it was asked of.
        server: String,
    },
    /// The node is not running, so the operation cannot be applied.
    #[error("{server} is not running; {operation} needs a running server")]
    NotRunning {
        /// The refused operation.
        operation: &'static str,
        /// The server it was asked of.
        server: String,
    },
    /// Sending a signal to a server process failed.
    #[error("could not send {signal} to process {pid}")]
    Signal {
        /// The signal name.
        signal: String,
        /// The target process.
        pid: i32,
        /// The underlying error.
        #[source]
        source: nix::errno::Errno,
    },
    /// A query to a PostgreSQL node failed.
    #[error("postgres query failed on {node}")]
    Postgres {
        /// The node, as `host:port`.
        node: String,
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// A command to a Redis node failed.
    #[error("redis command failed on {node}")]
    Redis {
        /// The node, as `host:port`.
        node: String,
        /// The driver error.
        #[source]
        source: ::redis::RedisError,
    },
    /// An HTTP request to a server answered with an error or could not be parsed.
    #[error("http {method} {url} answered {status}: {body}")]
    Http {
        /// The request method.
        method: &'static str,
        /// The request URL (without credentials).
        url: String,
        /// The status code, or 0 when no status line was read.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The machine is not set up the way the test bed needs (e.g. no `postgres` user
    /// when running as root).
    #[error("environment problem: {0}")]
    Environment(String),
}

impl TestkitError {
    /// Wraps an I/O error with what the test bed was doing.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}
