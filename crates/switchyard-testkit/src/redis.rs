//! Redis: a master plus replicas, each a foreground `redis-server` child process.
//!
//! No persistence (`--save ''`, `--appendonly no`) and
//! `--repl-diskless-sync-delay 0` on every node: without it the first sync waits
//! 5 s. A replica is ready when `INFO replication` reports `master_link_status:up`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use crate::error::{Result, TestkitError};
use crate::port::{free_port, loopback, with_port};
use crate::process::{find_binary, Launch, ServerProcess};
use crate::scratch::node_dir;
use crate::tls::{TestCa, SERVER_NAME};
use crate::wait::poll_until;

const INSTALL: &str = "apt-get install -y redis-server";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

fn locate() -> Result<PathBuf> {
    let dirs = [
        PathBuf::from("/usr/bin"),
        PathBuf::from("/usr/local/bin"),
        PathBuf::from("/opt/homebrew/bin"),
    ];
    find_binary("redis-server", &dirs).ok_or_else(|| TestkitError::MissingBinary {
        name: "redis-server".into(),
        looked_in: "/usr/bin, /usr/local/bin and PATH".into(),
        install: INSTALL,
    })
}

/// Sends one command on a fresh connection, with a deadline on connect and reply.
pub(crate) async fn command<T: ::redis::FromRedisValue>(
    addr: SocketAddr,
    cmd: &::redis::Cmd,
) -> Result<T> {
    let node = addr.to_string();
    let work = async {
        let client = ::redis::Client::open(format!("redis://{addr}"))?;
        // The driver's own defaults (1 s connect, 500 ms reply) are tight for a busy
        // two-core machine; the outer timeout bounds the whole exchange instead.
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        cmd.query_async::<T>(&mut conn).await
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(TestkitError::Redis { node, source }),
        Err(_) => Err(TestkitError::Timeout {
            what: format!("a reply from redis {node}"),
            elapsed: COMMAND_TIMEOUT,
        }),
    }
}

/// Whether the node answers, and (for a replica) is linked to its master.
async fn is_ready(addr: SocketAddr, replica: bool) -> bool {
    if !replica {
        return command::<String>(addr, &::redis::cmd("PING")).await.is_ok();
    }
    match command::<String>(addr, ::redis::cmd("INFO").arg("replication")).await {
        Ok(info) => info.lines().any(|l| l.trim() == "master_link_status:up"),
        Err(_) => false,
    }
}

/// `--replicaof 127.0.0.1 PORT` for a replica of `master`, nothing for a master.
fn replicaof_args(master: Option<u16>) -> Vec<OsString> {
    match master {
        Some(port) => ["--replicaof", "127.0.0.1", &port.to_string()]
            .map(OsString::from)
            .to_vec(),
        None => Vec::new(),
    }
}

/// One `redis-server` owned by the test bed.
#[derive(Debug)]
pub struct RedisNode {
    process: ServerProcess,
    port: u16,
    /// The master port this node replicates from, as last set by start,
    /// [`promote`](Self::promote) or [`replicaof`](Self::replicaof): what a
    /// restart starts it with.
    master: std::sync::Mutex<Option<u16>>,
    /// The TLS port, for a node started with TLS.
    tls_port: Option<u16>,
    // Last, so the folder is removed only after the server is gone.
    dir: TempDir,
}

impl RedisNode {
    async fn boot(
        program: &Path,
        master: Option<u16>,
        port: Option<u16>,
        tls: Option<&TestCa>,
    ) -> Result<Self> {
        let dir = node_dir("redis", None)?;
        let folder = dir.path().to_path_buf();
        let mut tls_args: Vec<OsString> = Vec::new();
        let tls_port = match tls {
            Some(ca) => {
                let files = ca.install(&folder, None)?;
                let tls_port = free_port()?;
                tls_args.extend([
                    OsString::from("--tls-port"),
                    tls_port.to_string().into(),
                    "--tls-cert-file".into(),
                    files.cert.into(),
                    "--tls-key-file".into(),
                    files.key.into(),
                    "--tls-ca-cert-file".into(),
                    files.ca.into(),
                    // Clients must present a certificate the CA signed.
                    "--tls-auth-clients".into(),
                    "yes".into(),
                ]);
                Some(tls_port)
            }
            None => None,
        };
        let (process, port) = with_port(port, |port| {
            let mut args: Vec<OsString> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &folder.display().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--daemonize",
                "no",
            ]
            .iter()
            .map(OsString::from)
            .collect();
            args.extend(tls_args.iter().cloned());
            let launch = Launch {
                label: format!("redis 127.0.0.1:{port}"),
                program: program.to_path_buf(),
                args,
                dir: folder.clone(),
                log: folder.join("redis.log"),
                run_as: None,
            };
            async move {
                let process = ServerProcess::spawn_with(launch, replicaof_args(master))?;
                process
                    .wait_ready(START_TIMEOUT, || is_ready(loopback(port), master.is_some()))
                    .await?;
                Ok((process, port))
            }
        })
        .await?;
        Ok(Self {
            process,
            port,
            master: std::sync::Mutex::new(master),
            tls_port,
            dir,
        })
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// For a node started with TLS: `rediss://localhost:TLS_PORT`, the host its
    /// certificate names. The server asks for a client certificate signed by
    /// the test CA. `None` for a plaintext node.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|port| format!("rediss://{SERVER_NAME}:{port}"))
    }

    /// The TLS port, for a node started with TLS.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// The server's folder (its log is `redis.log` in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's PID, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    /// The first element of `ROLE`: `master` or `slave`.
    pub async fn role(&self) -> Result<String> {
        let role: Vec<::redis::Value> = command(self.addr(), &::redis::cmd("ROLE")).await?;
        Ok(match role.first() {
            Some(::redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            Some(::redis::Value::SimpleString(text)) => text.clone(),
            _ => String::new(),
        })
    }

    /// SIGKILLs the server; returns once it is gone, so connections are refused.
    pub async fn kill(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "killing redis");
        self.process.kill().await
    }

    /// SIGSTOPs the server: it still accepts TCP connections but never answers.
    pub async fn pause(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "pausing redis");
        self.process.pause()
    }

    /// SIGCONTs the server.
    pub async fn resume(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "resuming redis");
        self.process.resume()
    }

    fn master(&self) -> Option<u16> {
        *self.master.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_master(&self, master: Option<u16>) {
        *self.master.lock().unwrap_or_else(|e| e.into_inner()) = master;
        self.process.set_extra_args(replicaof_args(master));
    }

    /// Starts the server again on the same port, in the role it last had: a
    /// master as a master; a replica of the master it was last pointed at
    /// (at start, or by [`replicaof`](Self::replicaof)), never the one it
    /// was first started with if it has been re-pointed or promoted since. It
    /// waits until the node answers (a replica: until its link is up). A
    /// running server is killed first. Data is not kept: a restarted master
    /// is empty, on a new replication id.
    pub async fn restart(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), master = ?self.master(), "restarting redis");
        self.process.kill().await?;
        self.process.start()?;
        let replica = self.master().is_some();
        self.process
            .wait_ready(START_TIMEOUT, || is_ready(self.addr(), replica))
            .await
    }

    /// `REPLICAOF NO ONE`, then waits until `ROLE` says `master`. A later
    /// restart starts it as a master.
    pub async fn promote(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "promoting redis replica");
        command::<String>(self.addr(), ::redis::cmd("REPLICAOF").arg("NO").arg("ONE")).await?;
        self.set_master(None);
        poll_until(
            &format!("{} to become master", self.addr()),
            START_TIMEOUT,
            || async { matches!(self.role().await.as_deref(), Ok("master")).then_some(()) },
        )
        .await
    }

    /// What an operator does after a failover: `REPLICAOF` the new `master`
    /// (this node's data is replaced by the master's), then waits until the
    /// link is up. A later restart starts it as a replica of `master`.
    pub async fn replicaof(&self, master: &RedisNode) -> Result<()> {
        tracing::info!(node = %self.addr(), master = %master.addr(), "re-pointing redis replica");
        command::<String>(
            self.addr(),
            ::redis::cmd("REPLICAOF").arg("127.0.0.1").arg(master.port),
        )
        .await?;
        self.set_master(Some(master.port));
        poll_until(
            &format!("{} to link to {}", self.addr(), master.addr()),
            START_TIMEOUT,
            || async { is_ready(self.addr(), true).await.then_some(()) },
        )
        .await
    }
}

/// A Redis master plus replicas. Dropping it stops every server and removes every
/// folder.
#[derive(Debug)]
pub struct RedisCluster {
    /// `nodes[0]` is the master; never empty.
    nodes: Vec<RedisNode>,
}

impl RedisCluster {
    /// Starts a master and `replicas` replicas and returns once every replica's link
    /// to the master is up.
    pub async fn start(replicas: usize) -> Result<Self> {
        Self::start_with(&vec![None; replicas + 1], None).await
    }

    /// [`start`](Self::start), every node also listening for TLS with `ca`'s
    /// server certificate (see [`RedisNode::tls_url`]). The plaintext port
    /// stays open for set-up and replication, which runs over loopback.
    pub async fn start_tls(replicas: usize, ca: &TestCa) -> Result<Self> {
        Self::start_with(&vec![None; replicas + 1], Some(ca)).await
    }

    /// Starts a master on `ports[0]` and a replica on each further port, for a
    /// test bed that must match a configuration's URLs. A port that is taken
    /// is an error naming it; no other port is tried.
    pub async fn start_on(ports: &[u16]) -> Result<Self> {
        if ports.is_empty() {
            return Err(TestkitError::Environment(
                "a Redis cluster needs at least a master's port".into(),
            ));
        }
        Self::start_with(&ports.iter().copied().map(Some).collect::<Vec<_>>(), None).await
    }

    /// `ports[0]` for the master, the rest for replicas; `None` is a free port.
    async fn start_with(ports: &[Option<u16>], tls: Option<&TestCa>) -> Result<Self> {
        let replicas = ports.len().saturating_sub(1);
        let started = Instant::now();
        let program = locate()?;
        let master = RedisNode::boot(&program, None, ports.first().copied().flatten(), tls).await?;
        let master_port = master.port;
        let mut nodes = vec![master];
        for port in ports.iter().skip(1).copied() {
            nodes.push(RedisNode::boot(&program, Some(master_port), port, tls).await?);
        }
        tracing::info!(replicas, elapsed = ?started.elapsed(), "redis cluster started");
        Ok(Self { nodes })
    }

    /// The master (as started; a promoted replica does not take its place here).
    pub fn master(&self) -> &RedisNode {
        &self.nodes[0]
    }

    /// The replicas, in start order.
    pub fn replicas(&self) -> &[RedisNode] {
        &self.nodes[1..]
    }

    /// The master followed by the replicas.
    pub fn nodes(&self) -> &[RedisNode] {
        &self.nodes
    }
}
