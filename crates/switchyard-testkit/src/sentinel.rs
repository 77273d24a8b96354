//! Redis Sentinel: a Redis master plus replicas watched by three sentinels.
//!
//! Settings from ENGINES.md: each sentinel runs `redis-server FILE --sentinel`
//! from a writable copy of its file (sentinels rewrite it), announces
//! 127.0.0.1, and monitors the master with quorum 2, `down-after-milliseconds`
//! 500 and `failover-timeout` 5000. Ready when every sentinel knows the master,
//! both replicas and the two other sentinels (about 2.5 s here). A killed
//! master is replaced in about 1.7 s.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use crate::error::{Result, TestkitError};
use crate::port::{loopback, with_port};
use crate::process::{find_binary, Launch, ServerProcess};
use crate::redis::{command, RedisCluster};
use crate::scratch::node_dir;

/// The name the sentinels monitor the master under.
pub const SENTINEL_MASTER: &str = "switchyard";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const INSTALL: &str = "apt-get install -y redis-server redis-sentinel";

/// One `redis-server --sentinel` owned by the test bed.
#[derive(Debug)]
pub struct SentinelNode {
    process: ServerProcess,
    port: u16,
    // Last, so the folder is removed only after the server is gone.
    _dir: TempDir,
}

impl SentinelNode {
    async fn boot(program: &Path, master_port: u16, replicas: usize) -> Result<Self> {
        let dir = node_dir("sentinel", None)?;
        let folder = dir.path().to_path_buf();
        let (process, port) = with_port(None, |port| {
            let conf = folder.join(format!("sentinel-{port}.conf"));
            let text = format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                 sentinel announce-ip 127.0.0.1\n\
                 sentinel monitor {m} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {m} 500\n\
                 sentinel failover-timeout {m} 5000\n\
                 sentinel parallel-syncs {m} 1\n",
                dir = folder.display(),
                m = SENTINEL_MASTER,
            );
            let launch = Launch {
                label: format!("sentinel 127.0.0.1:{port}"),
                program: program.to_path_buf(),
                args: vec![conf.clone().into(), "--sentinel".into()],
                dir: folder.clone(),
                log: folder.join("sentinel.log"),
                run_as: None,
            };
            async move {
                std::fs::write(&conf, text)
                    .map_err(TestkitError::io(format!("writing {}", conf.display())))?;
                let process = ServerProcess::spawn(launch)?;
                process
                    .wait_ready(START_TIMEOUT, || async {
                        knows_replicas(loopback(port), replicas).await
                    })
                    .await?;
                Ok((process, port))
            }
        })
        .await?;
        Ok(Self {
            process,
            port,
            _dir: dir,
        })
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// SIGKILLs the sentinel.
    pub async fn kill(&self) -> Result<()> {
        self.process.kill().await
    }

    /// Starts a killed sentinel again from its (rewritten) config file.
    pub async fn restart(&self) -> Result<()> {
        self.process.kill().await?;
        self.process.start()?;
        self.process
            .wait_ready(START_TIMEOUT, || async {
                command::<String>(self.addr(), &::redis::cmd("PING"))
                    .await
                    .is_ok()
            })
            .await
    }

    /// `SENTINEL get-master-addr-by-name`: the master's port, as this sentinel sees it.
    pub async fn master_port(&self) -> Result<u16> {
        let (_, port): (String, String) = command(
            self.addr(),
            ::redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(SENTINEL_MASTER),
        )
        .await?;
        port.parse()
            .map_err(|_| TestkitError::Environment(format!("sentinel reported port {port:?}")))
    }
}

/// Whether the sentinel at `addr` knows the master and `replicas` replicas.
async fn knows_replicas(addr: SocketAddr, replicas: usize) -> bool {
    let listed: Result<Vec<::redis::Value>> = command(
        addr,
        ::redis::cmd("SENTINEL")
            .arg("replicas")
            .arg(SENTINEL_MASTER),
    )
    .await;
    matches!(listed, Ok(l) if l.len() >= replicas)
}

/// Whether the sentinel at `addr` knows `others` other sentinels.
async fn knows_sentinels(addr: SocketAddr, others: usize) -> bool {
    let listed: Result<Vec<::redis::Value>> = command(
        addr,
        ::redis::cmd("SENTINEL")
            .arg("sentinels")
            .arg(SENTINEL_MASTER),
    )
    .await;
    matches!(listed, Ok(l) if l.len() >= others)
}

/// A Redis master, replicas and three sentinels. Dropping it stops every
/// server and removes every folder.
#[derive(Debug)]
pub struct SentinelCluster {
    redis: RedisCluster,
    sentinels: Vec<SentinelNode>,
}

impl SentinelCluster {
    /// Starts a master, `replicas` replicas and three sentinels, and returns
    /// once every sentinel knows the replicas and the other sentinels.
    pub async fn start(replicas: usize) -> Result<Self> {
        let started = Instant::now();
        let program = sentinel_binary()?;
        let redis = RedisCluster::start(replicas).await?;
        let master = redis.master().port();
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(SentinelNode::boot(&program, master, replicas).await?);
        }
        for s in &sentinels {
            crate::wait::poll_until(
                &format!("{} to discover the other sentinels", s.addr()),
                START_TIMEOUT,
                || async { knows_sentinels(s.addr(), 2).await.then_some(()) },
            )
            .await?;
        }
        tracing::info!(replicas, elapsed = ?started.elapsed(), "sentinel cluster started");
        Ok(Self { redis, sentinels })
    }

    /// The Redis nodes (master as started, then replicas).
    pub fn redis(&self) -> &RedisCluster {
        &self.redis
    }

    /// The three sentinels.
    pub fn sentinels(&self) -> &[SentinelNode] {
        &self.sentinels
    }

    /// The sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(SentinelNode::url).collect()
    }
}

fn sentinel_binary() -> Result<PathBuf> {
    let dirs = [PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")];
    // `redis-sentinel` is a link to redis-server; either runs `--sentinel`.
    find_binary("redis-server", &dirs).ok_or_else(|| TestkitError::MissingBinary {
        name: "redis-server".into(),
        looked_in: "/usr/bin, /usr/local/bin and PATH".into(),
        install: INSTALL,
    })
}
