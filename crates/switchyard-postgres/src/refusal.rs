//! Telling a dead endpoint from a slow one while sqlx waits for it.
//!
//! sqlx's pool treats a refused connection as a server still starting up and
//! retries it until the acquire timeout. For a router that is the wrong
//! answer: a checkout on a killed node would hang for the whole timeout instead
//! of failing at once and being retried on another endpoint. So while a
//! checkout waits on a pool that has to open a connection, one plain TCP
//! connect to the endpoint (at most one per backend every
//! [`RECHECK`]) tells whether anything is listening.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a checkout waits before the first check: a healthy connect is
/// usually done by then, so no check is made.
const FIRST_CHECK: Duration = Duration::from_millis(25);

/// Least time between two checks of the same endpoint.
const RECHECK: Duration = Duration::from_millis(100);

/// Checks whether an endpoint refuses TCP connections.
pub(crate) struct RefusalCheck {
    /// `None` for a Unix socket, where there is nothing to check.
    target: Option<(String, u16)>,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last check, plus one (0 = never).
    last: AtomicU64,
}

impl RefusalCheck {
    pub(crate) fn new(options: &PgConnectOptions) -> Self {
        let host = options.get_host();
        let target = (!host.starts_with('/')).then(|| (host.to_owned(), options.get_port()));
        Self {
            target,
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Resolves with the refusal once the endpoint refuses connections; stays
    /// pending for as long as it accepts them (or cannot be checked).
    pub(crate) async fn refused(&self) -> std::io::Error {
        tokio::time::sleep(FIRST_CHECK).await;
        loop {
            if let Some((host, port)) = self.claim() {
                if let Err(e) = TcpStream::connect((host, *port)).await {
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        return e;
                    }
                }
            }
            tokio::time::sleep(RECHECK).await;
        }
    }

    /// The target, when no other checkout checked it within [`RECHECK`].
    fn claim(&self) -> Option<(&str, &u16)> {
        let (host, port) = self.target.as_ref()?;
        let now = millis(self.epoch.elapsed()) + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= millis(RECHECK);
        (due && self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then_some((host.as_str(), port))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[tokio::test]
    async fn a_closed_port_is_refused_and_an_open_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap().port();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = |port| format!("postgres://app@127.0.0.1:{port}/app");
        let check = RefusalCheck::new(&PgConnectOptions::from_str(&url(closed)).unwrap());
        let err = tokio::time::timeout(Duration::from_secs(2), check.refused())
            .await
            .unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

        let check = RefusalCheck::new(&PgConnectOptions::from_str(&url(open)).unwrap());
        assert!(
            tokio::time::timeout(Duration::from_millis(400), check.refused())
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn checks_are_rate_limited_per_endpoint() {
        let options = PgConnectOptions::from_str("postgres://app@127.0.0.1:1/app").unwrap();
        let check = RefusalCheck::new(&options);
        assert!(check.claim().is_some());
        assert!(check.claim().is_none());
        tokio::time::advance(RECHECK).await;
        assert!(check.claim().is_some());
    }

    #[test]
    fn unix_sockets_are_not_checked() {
        let options = PgConnectOptions::new().host("/var/run/postgresql");
        assert!(RefusalCheck::new(&options).claim().is_none());
    }
}
