//! Free loopback ports.
//!
//! A port is found by binding `127.0.0.1:0` and releasing it. Another process can
//! take it before the server binds, so every start in this crate retries with a fresh
//! port when the server exits early. Within one process, a port is never handed out
//! twice, which removes the common collision between tests running in parallel.

use std::collections::HashSet;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};

use crate::error::{Result, TestkitError};

/// How many times a start is retried with fresh ports after a collision.
pub(crate) const START_ATTEMPTS: usize = 4;

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Returns a loopback TCP port that was free a moment ago and has not been returned
/// before by this process.
pub fn free_port() -> Result<u16> {
    for _ in 0..64 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(TestkitError::io("binding 127.0.0.1:0 to find a free port"))?;
        let port = listener
            .local_addr()
            .map_err(TestkitError::io("reading the address of a probe socket"))?
            .port();
        let mut seen = handed_out().lock().unwrap_or_else(|e| e.into_inner());
        if seen.insert(port) {
            return Ok(port);
        }
    }
    Err(TestkitError::Environment(
        "the kernel kept returning ports this process already used".into(),
    ))
}

/// The loopback socket address for `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Whether a failed start was a lost race for the port (worth retrying on another).
pub(crate) fn is_port_clash(err: &TestkitError) -> bool {
    match err {
        // "Address already in use" from the engines; the Elasticsearch
        // stand-in says "port N is already in use".
        TestkitError::Exited { log_tail, .. } => {
            log_tail.to_ascii_lowercase().contains("already in use")
        }
        _ => false,
    }
}

/// Runs `start` with a fresh free port, retrying with another port when the server
/// lost the port to someone else.
pub(crate) async fn with_free_port<T, F, Fut>(mut start: F) -> Result<T>
where
    F: FnMut(u16) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        let port = free_port()?;
        match start(port).await {
            Err(err) if attempt < START_ATTEMPTS && is_port_clash(&err) => {
                tracing::debug!(
                    port,
                    attempt,
                    "port taken before the server bound it; retrying"
                );
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Runs `start` on `port` when one is given (once: a fixed port that is taken
/// is an error naming it), or on a fresh free port as [`with_free_port`] does.
pub(crate) async fn with_port<T, F, Fut>(port: Option<u16>, mut start: F) -> Result<T>
where
    F: FnMut(u16) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let Some(port) = port else {
        return with_free_port(start).await;
    };
    // Bound and released at once: a clear error beats a server log to read.
    drop(TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|e| {
        TestkitError::Environment(format!(
            "127.0.0.1:{port} is not free ({e}); stop what listens there or pick other ports"
        ))
    })?);
    start(port).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_not_repeated() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
        assert_eq!(loopback(a).port(), a);
    }

    fn clash() -> TestkitError {
        TestkitError::Exited {
            server: "test".into(),
            status: "exit status: 1".into(),
            log_tail: "could not bind: Address already in use".into(),
        }
    }

    #[tokio::test]
    async fn retries_only_port_clashes() {
        let mut tried = Vec::new();
        let port = with_free_port(|port| {
            tried.push(port);
            let attempt = tried.len();
            async move {
                if attempt < 3 {
                    Err(clash())
                } else {
                    Ok(port)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(tried.len(), 3);
        assert_eq!(tried.last(), Some(&port));

        let mut attempts = 0;
        let err = with_free_port(|_| {
            attempts += 1;
            async { Err::<(), _>(TestkitError::Environment("broken".into())) }
        })
        .await
        .unwrap_err();
        assert_eq!(attempts, 1, "{err}");

        let mut attempts = 0;
        with_free_port(|_| {
            attempts += 1;
            async { Err::<(), _>(clash()) }
        })
        .await
        .unwrap_err();
        assert_eq!(attempts, START_ATTEMPTS);
    }
}
