//! PgBouncer, the proxy peer: Debian's `pgbouncer` (1.18) in front of a
//! PostgreSQL server of the test bed, in session or transaction mode.
//!
//! It refuses to run as root, so it runs as the `postgres` user like the
//! servers; with `auth_type = trust` every user must still be listed in its
//! `auth_file`; sqlx's startup packet sends `extra_float_digits`, which it
//! must be told to ignore (see ENGINES.md). Transaction mode in 1.18 does not
//! support the extended protocol's named prepared statements: with sqlx, use
//! simple-protocol queries (`sqlx::raw_sql`) only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

use crate::error::{Result, TestkitError};
use crate::port::{loopback, with_port};
use crate::postgres::postgres_user;
use crate::process::{find_binary, Launch, ServerProcess};
use crate::scratch::node_dir;

const INSTALL: &str = "apt-get install -y pgbouncer";
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How PgBouncer shares server connections among clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client connection, for the client's whole
    /// session (reset with `DISCARD ALL` when the client leaves).
    Session,
    /// A server connection per transaction; session state does not survive
    /// between transactions.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// A running PgBouncer. Dropping it stops it and removes its folder.
#[derive(Debug)]
pub struct PgBouncer {
    process: ServerProcess,
    port: u16,
    mode: PoolMode,
    // Last, so the folder is removed only after the process is gone.
    _dir: TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer on a free loopback port in `mode`, forwarding every
    /// database to the PostgreSQL server at `upstream` with at most
    /// `pool_size` server connections per user and database. `users` may log
    /// in (trust authentication, as the test bed's servers use).
    pub async fn start(
        upstream: SocketAddr,
        mode: PoolMode,
        pool_size: u32,
        users: &[&str],
    ) -> Result<Self> {
        let program = find_binary(
            "pgbouncer",
            &[PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")],
        )
        .ok_or_else(|| TestkitError::MissingBinary {
            name: "pgbouncer".into(),
            looked_in: "/usr/sbin, /usr/bin and PATH".into(),
            install: INSTALL,
        })?;
        let run_as = postgres_user()?;
        let dir = node_dir("pgbouncer", run_as)?;
        let folder = dir.path().to_path_buf();
        let auth = folder.join("userlist.txt");
        // `postgres` too: the readiness check logs in as it.
        let users: String = users
            .iter()
            .chain(std::iter::once(&"postgres"))
            .map(|u| format!("\"{u}\" \"\"\n"))
            .collect();
        write(&auth, &users)?;
        if let Some(user) = run_as {
            // PgBouncer reads it as the `postgres` user.
            nix::unistd::chown(auth.as_path(), Some(user.uid), Some(user.gid)).map_err(|e| {
                TestkitError::Io {
                    context: format!("handing {} to uid {}", auth.display(), user.uid),
                    source: e.into(),
                }
            })?;
        }
        let (process, port) = with_port(None, |port| {
            let ini = folder.join(format!("pgbouncer-{port}.ini"));
            let written = write(
                &ini,
                &config(upstream, port, mode, pool_size, &auth, &folder),
            );
            let launch = Launch {
                label: format!("pgbouncer ({}) 127.0.0.1:{port}", mode.as_str()),
                program: program.clone(),
                args: vec![ini.into_os_string()],
                dir: folder.clone(),
                log: folder.join("pgbouncer.log"),
                run_as,
            };
            async move {
                written?;
                let process = ServerProcess::spawn(launch)?;
                process
                    .wait_ready(START_TIMEOUT, || accepts_queries(port))
                    .await?;
                Ok((process, port))
            }
        })
        .await?;
        tracing::info!(port, mode = mode.as_str(), %upstream, "pgbouncer started");
        Ok(Self {
            process,
            port,
            mode,
            _dir: dir,
        })
    }

    /// `postgres://USER@127.0.0.1:PORT/DATABASE` through this PgBouncer.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// The pool mode it was started in.
    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    /// Its log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // SIGINT is PgBouncer's safe shutdown; SIGKILL follows if it lingers.
        self.process
            .stop_blocking(Some(Signal::SIGINT), Duration::from_secs(1));
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(TestkitError::io(format!("writing {}", path.display())))
}

fn config(
    upstream: SocketAddr,
    port: u16,
    mode: PoolMode,
    pool_size: u32,
    auth: &Path,
    folder: &Path,
) -> String {
    format!(
        "[databases]\n\
         * = host={host} port={upstream_port}\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir = {folder}\n\
         auth_type = trust\n\
         auth_file = {auth}\n\
         pool_mode = {mode}\n\
         default_pool_size = {pool_size}\n\
         max_client_conn = 1000\n\
         ignore_startup_parameters = extra_float_digits\n\
         logfile =\n\
         pidfile =\n",
        host = upstream.ip(),
        upstream_port = upstream.port(),
        folder = folder.display(),
        auth = auth.display(),
        mode = mode.as_str(),
    )
}

/// Whether a simple query through PgBouncer on `port` gets an answer.
async fn accepts_queries(port: u16) -> bool {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let Ok(Ok(mut conn)) =
        tokio::time::timeout(Duration::from_secs(2), PgConnection::connect(&url)).await
    else {
        return false;
    };
    let ok = sqlx::raw_sql("SELECT 1").execute(&mut conn).await.is_ok();
    let _ = conn.close().await;
    ok
}
