//! Patroni: etcd plus three Patroni-managed PostgreSQL nodes.
//!
//! Settings from ENGINES.md: one etcd (v3 API: Patroni's `etcd3:` key; plain
//! `etcd:` is the v2 API, which etcd 3.4 disables), Patroni run as the
//! `postgres` user with `use_pg_rewind` and `use_slots`, and a short DCS `ttl
//! 6` / `loop_wait 1` / `retry_timeout 2` so a killed leader is replaced in
//! about 7 s. Patroni starts the postmaster in its own session, so it is not
//! Patroni's descendant: killing a node kills Patroni and then the postmaster
//! named in `postmaster.pid`. Ready when one leader and two replicas stream
//! (`pg_stat_replication` on the leader), about 8 s here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::time::Instant;

use crate::error::{Result, TestkitError};
use crate::http;
use crate::port::{free_port, loopback, with_port};
use crate::postgres::{release_shared_memory, Install};
use crate::process::{find_binary, signal_tree, Launch, ServerProcess};
use crate::scratch::node_dir;
use crate::wait::poll_until;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
const INSTALL: &str = "apt-get install -y patroni etcd-server etcd-client";

fn binary(name: &str) -> Result<PathBuf> {
    let dirs = [PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")];
    find_binary(name, &dirs).ok_or_else(|| TestkitError::MissingBinary {
        name: name.into(),
        looked_in: "/usr/bin, /usr/local/bin and PATH".into(),
        install: INSTALL,
    })
}

/// One etcd server.
#[derive(Debug)]
struct Etcd {
    _process: ServerProcess,
    port: u16,
    _dir: TempDir,
}

impl Etcd {
    async fn start() -> Result<Self> {
        let program = binary("etcd")?;
        let dir = node_dir("etcd", None)?;
        let folder = dir.path().to_path_buf();
        let (process, port) = with_port(None, |port| {
            let peer = free_port();
            let metrics = free_port();
            let folder = folder.clone();
            let program = program.clone();
            async move {
                let (peer, metrics) = (peer?, metrics?);
                let client = format!("http://127.0.0.1:{port}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let args = [
                    "--name".to_owned(),
                    "n".into(),
                    "--data-dir".into(),
                    folder.join("data").display().to_string(),
                    "--listen-client-urls".into(),
                    client.clone(),
                    "--advertise-client-urls".into(),
                    client,
                    "--listen-peer-urls".into(),
                    peer_url.clone(),
                    "--initial-advertise-peer-urls".into(),
                    peer_url.clone(),
                    "--initial-cluster".into(),
                    format!("n={peer_url}"),
                    "--listen-metrics-urls".into(),
                    format!("http://127.0.0.1:{metrics}"),
                ];
                let process = ServerProcess::spawn(Launch {
                    label: format!("etcd 127.0.0.1:{port}"),
                    program,
                    args: args.iter().map(Into::into).collect(),
                    dir: folder.clone(),
                    log: folder.join("etcd.log"),
                    run_as: None,
                })?;
                process
                    .wait_ready(START_TIMEOUT, || async move {
                        matches!(http::request(loopback(port), "GET", "/health", b"", HTTP_TIMEOUT).await,
                            Ok(r) if r.status == 200 && r.text().contains("true"))
                    })
                    .await?;
                Ok((process, port))
            }
        })
        .await?;
        Ok(Self {
            _process: process,
            port,
            _dir: dir,
        })
    }
}

/// One Patroni-managed PostgreSQL node.
#[derive(Debug)]
pub struct PatroniNode {
    name: String,
    process: ServerProcess,
    rest_port: u16,
    pg_port: u16,
    data: PathBuf,
    // Last, so the folder is removed only after the servers are gone.
    _dir: TempDir,
}

impl PatroniNode {
    fn spawn(
        install: &Install,
        program: &Path,
        scope: &str,
        name: &str,
        etcd: u16,
    ) -> Result<Self> {
        let dir = node_dir("patroni", install.run_as)?;
        let folder = dir.path().to_path_buf();
        let (rest_port, pg_port) = (free_port()?, free_port()?);
        let data = folder.join("data");
        let conf = folder.join("patroni.yml");
        let text = format!(
            r#"scope: {scope}
namespace: /switchyard/
name: {name}
restapi:
  listen: 127.0.0.1:{rest_port}
  connect_address: 127.0.0.1:{rest_port}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: 6
    loop_wait: 1
    retry_timeout: 2
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 128MB
  initdb:
    - encoding: UTF8
    - auth: trust
    - no-sync
  pg_hba:
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
    - local all all trust
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {folder}/pgpass
  authentication:
    replication:
      username: replicator
      password: replicator
    superuser:
      username: postgres
      password: postgres
    rewind:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: {folder}
    fsync: "off"
    shared_buffers: 32MB
    max_connections: 100
"#,
            data = data.display(),
            bin = install.bin.display(),
            folder = folder.display(),
        );
        std::fs::write(&conf, text)
            .map_err(TestkitError::io(format!("writing {}", conf.display())))?;
        if let Some(user) = install.run_as {
            nix::unistd::chown(&conf, Some(user.uid), Some(user.gid)).map_err(|e| {
                TestkitError::Io {
                    context: format!("handing {} to the postgres user", conf.display()),
                    source: e.into(),
                }
            })?;
        }
        let process = ServerProcess::spawn(Launch {
            label: format!("patroni {name} (postgres 127.0.0.1:{pg_port})"),
            program: program.to_path_buf(),
            args: vec![conf.into()],
            dir: folder.clone(),
            log: folder.join("patroni.log"),
            run_as: install.run_as,
        })?;
        Ok(Self {
            name: name.to_owned(),
            process,
            rest_port,
            pg_port,
            data,
            _dir: dir,
        })
    }

    /// Patroni's member name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://127.0.0.1:PORT`, the REST API.
    pub fn rest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rest_port)
    }

    /// The PostgreSQL port.
    pub fn pg_port(&self) -> u16 {
        self.pg_port
    }

    /// Patroni's log (PostgreSQL's goes to `data/log`... as Patroni sets it).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.pg_port)
    }

    fn postmaster(&self) -> Option<i32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs Patroni, then the postmaster and its backends: the node is
    /// gone at once, as in a machine crash.
    pub async fn kill(&self) -> Result<()> {
        tracing::info!(node = %self.name, "killing patroni and postgres");
        let postmaster = self.postmaster();
        self.process.kill().await?;
        if let Some(pid) = postmaster.filter(|&p| crate::process::is_alive(p)) {
            let mut tree = signal_tree(pid, Signal::SIGKILL)?;
            tree.push(pid);
            // The postmaster was orphaned onto this process (a child
            // subreaper): reaped, or Patroni restarted later would take the
            // zombie's PID for a running postmaster and wait for it forever.
            poll_until("the postmaster to die", START_TIMEOUT, || async {
                crate::process::reap(&tree).then_some(())
            })
            .await?;
        }
        Ok(())
    }

    /// Starts Patroni again on the same data folder (it rejoins, rewound, as
    /// a replica of whoever leads); does not wait.
    pub fn start(&self) -> Result<()> {
        self.process.start()
    }
}

impl Drop for PatroniNode {
    fn drop(&mut self) {
        let postmaster = self.postmaster();
        self.process.stop_blocking(None, Duration::ZERO);
        if let Some(pid) = postmaster.filter(|&p| crate::process::is_alive(p)) {
            let mut tree = signal_tree(pid, Signal::SIGKILL).unwrap_or_default();
            tree.push(pid);
            let started = std::time::Instant::now();
            while !crate::process::reap(&tree) && started.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        release_shared_memory(&self.data);
    }
}

/// One member as `GET /cluster` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatroniMember {
    /// Its name.
    pub name: String,
    /// `leader`, `replica`, ...
    pub role: String,
    /// `running`, `streaming`, `stopped`, ...
    pub state: String,
}

/// etcd plus three Patroni nodes. Dropping it stops everything and removes
/// every folder.
#[derive(Debug)]
pub struct PatroniCluster {
    // Nodes first: they stop before etcd.
    nodes: Vec<PatroniNode>,
    _etcd: Etcd,
}

impl PatroniCluster {
    /// Starts etcd and three Patroni nodes; returns once a leader and two
    /// streaming replicas are up.
    pub async fn start() -> Result<Self> {
        let started = Instant::now();
        let install = Install::locate()?;
        let program = binary("patroni")?;
        let etcd = Etcd::start().await?;
        let scope = format!("sy{}", std::process::id());
        let mut nodes = Vec::new();
        for i in 1..=3 {
            nodes.push(PatroniNode::spawn(
                &install,
                &program,
                &scope,
                &format!("node{i}"),
                etcd.port,
            )?);
        }
        let cluster = Self { nodes, _etcd: etcd };
        cluster.wait_streaming(2, START_TIMEOUT).await?;
        tracing::info!(elapsed = ?started.elapsed(), "patroni cluster started");
        Ok(cluster)
    }

    /// The three nodes.
    pub fn nodes(&self) -> &[PatroniNode] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&PatroniNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every node's REST API URL.
    pub fn rest_urls(&self) -> Vec<String> {
        self.nodes.iter().map(PatroniNode::rest_url).collect()
    }

    /// `GET /cluster` from the first node that answers.
    pub async fn members(&self) -> Result<Vec<PatroniMember>> {
        let mut last = None;
        for n in &self.nodes {
            match http::request(loopback(n.rest_port), "GET", "/cluster", b"", HTTP_TIMEOUT).await {
                Ok(r) if r.status == 200 => return parse_members(&r.text()),
                Ok(r) => last = Some(format!("HTTP {}", r.status)),
                Err(e) => last = Some(e.to_string()),
            }
        }
        Err(TestkitError::Environment(format!(
            "no patroni REST API answered /cluster: {}",
            last.unwrap_or_default()
        )))
    }

    /// The leader's name, as `/cluster` says (`None` mid-failover).
    pub async fn leader(&self) -> Result<Option<String>> {
        Ok(self
            .members()
            .await?
            .into_iter()
            .find(|m| m.role == "leader" && m.state == "running")
            .map(|m| m.name))
    }

    /// Waits until a leader runs and `replicas` replicas stream from it.
    pub async fn wait_streaming(&self, replicas: i64, timeout: Duration) -> Result<String> {
        poll_until(
            &format!("a patroni leader with {replicas} streaming replicas"),
            timeout,
            || async {
                let leader = self.leader().await.ok()??;
                let node = self.node(&leader)?;
                let mut conn = crate::postgres::connect_named(&node.url(), leader.clone())
                    .await
                    .ok()?;
                let streaming: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )
                .fetch_one(&mut conn)
                .await
                .ok()?;
                (streaming >= replicas).then_some(leader)
            },
        )
        .await
    }

    /// `POST /switchover` from `leader` to `candidate`, on the leader's API.
    pub async fn switchover(&self, leader: &str, candidate: &str) -> Result<String> {
        let node = self
            .node(leader)
            .ok_or_else(|| TestkitError::Environment(format!("no node {leader}")))?;
        let body = format!(r#"{{"leader": "{leader}", "candidate": "{candidate}"}}"#);
        let r = http::request(
            loopback(node.rest_port),
            "POST",
            "/switchover",
            body.as_bytes(),
            Duration::from_secs(30),
        )
        .await
        .map_err(TestkitError::io("POST /switchover"))?;
        if r.status != 200 {
            return Err(TestkitError::Environment(format!(
                "switchover refused: HTTP {}: {}",
                r.status,
                r.text()
            )));
        }
        Ok(r.text())
    }
}

fn parse_members(text: &str) -> Result<Vec<PatroniMember>> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| TestkitError::Environment(format!("bad /cluster JSON: {e}")))?;
    let field = |m: &serde_json::Value, k: &str| m[k].as_str().unwrap_or_default().to_owned();
    Ok(value["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| PatroniMember {
                    name: field(m, "name"),
                    role: field(m, "role"),
                    state: field(m, "state"),
                })
                .collect()
        })
        .unwrap_or_default())
}
