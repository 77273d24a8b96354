//! PostgreSQL: a primary plus streaming standbys, each a real `postgres` process in
//! its own scratch folder on its own loopback port.
//!
//! `initdb` runs once per test process into a template that every primary copies
//! (copying takes ~50 ms, initdb ~0.6 s). Standbys are made with
//! `pg_basebackup -R -X stream -c fast`. Settings favour speed over durability
//! (`fsync = off`), but `synchronous_commit` stays on: with it off, standbys lag
//! visibly.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::error::{Result, TestkitError};
use crate::port::{loopback, with_port};
use crate::process::{find_binary, run_command, Launch, RunAs, ServerProcess};
use crate::scratch::node_dir;
use crate::tls::{TestCa, CLIENT_NAME, SERVER_NAME};
use crate::wait::{poll_until, POLL_INTERVAL};

const INSTALL: &str = "apt-get install -y postgresql";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Appended to the template's `postgresql.conf`. Node-specific settings (port,
/// socket folder) go on the command line so that a restart reuses them.
const SETTINGS: &str = "
# switchyard-testkit
listen_addresses = '127.0.0.1'
max_connections = 200
shared_buffers = '32MB'
fsync = off
full_page_writes = off
synchronous_commit = on
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '256MB'
hot_standby = on
# Segments as files in the data folder, so a killed node leaves nothing in /dev/shm.
dynamic_shared_memory_type = mmap
wal_retrieve_retry_interval = '200ms'
log_line_prefix = '%m [%p] '
";

/// Where the PostgreSQL binaries are and which OS user runs them.
#[derive(Debug, Clone)]
pub(crate) struct Install {
    pub(crate) bin: PathBuf,
    pub(crate) run_as: Option<RunAs>,
}

impl Install {
    /// Finds the binaries: `$SWITCHYARD_PG_BINDIR`, the newest
    /// `/usr/lib/postgresql/*/bin`, then `PATH`.
    pub(crate) fn locate() -> Result<Self> {
        let mut dirs = Vec::new();
        if let Some(dir) = std::env::var_os("SWITCHYARD_PG_BINDIR") {
            dirs.push(PathBuf::from(dir));
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse().ok()?;
                Some((version, e.path().join("bin")))
            })
            .collect();
        versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
        dirs.extend(versions.into_iter().map(|(_, dir)| dir));
        let initdb = find_binary("initdb", &dirs).ok_or_else(|| TestkitError::MissingBinary {
            name: "initdb".into(),
            looked_in: "$SWITCHYARD_PG_BINDIR, /usr/lib/postgresql/*/bin and PATH".into(),
            install: INSTALL,
        })?;
        let bin = initdb
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        for name in ["postgres", "pg_basebackup", "pg_ctl"] {
            if find_binary(name, std::slice::from_ref(&bin)).is_none() {
                return Err(TestkitError::MissingBinary {
                    name: name.into(),
                    looked_in: bin.display().to_string(),
                    install: INSTALL,
                });
            }
        }
        Ok(Self {
            bin,
            run_as: postgres_user()?,
        })
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}

/// PostgreSQL refuses to run as root; then the servers run as the `postgres` user.
pub(crate) fn postgres_user() -> Result<Option<RunAs>> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some(RunAs {
            uid: user.uid,
            gid: user.gid,
        })),
        _ => Err(TestkitError::Environment(format!(
            "running as root, PostgreSQL needs the `postgres` OS user, which does not exist \
             ({INSTALL} creates it)"
        ))),
    }
}

fn args<const N: usize>(items: [&dyn AsRef<std::ffi::OsStr>; N]) -> Vec<OsString> {
    items.iter().map(|a| a.as_ref().to_owned()).collect()
}

/// The initdb'd data folder that every primary in this process copies.
async fn template(install: &Install) -> Result<&'static Path> {
    static TEMPLATE: OnceCell<PathBuf> = OnceCell::const_new();
    let path = TEMPLATE
        .get_or_try_init(|| async {
            let started = Instant::now();
            let dir = node_dir("pgtemplate", install.run_as)?;
            let data = dir.path().join("data");
            let mut result = Err(TestkitError::Environment("initdb did not run".into()));
            // C.UTF-8 gives Unicode-aware upper()/lower(); fall back where it is missing.
            for locale in ["--locale=C.UTF-8", "--locale=C"] {
                let _ = std::fs::remove_dir_all(&data);
                result = run_command(
                    &install.tool("initdb"),
                    &args([
                        &"-D",
                        &data,
                        &"-U",
                        &"postgres",
                        &"--auth=trust",
                        &"-E",
                        &"UTF8",
                        &locale,
                        &"--no-sync",
                    ]),
                    install.run_as,
                    dir.path(),
                )
                .await;
                if result.is_ok() {
                    break;
                }
            }
            result?;
            let conf = data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf)
                .map_err(TestkitError::io(format!("reading {}", conf.display())))?;
            text.push_str(SETTINGS);
            std::fs::write(&conf, text)
                .map_err(TestkitError::io(format!("writing {}", conf.display())))?;
            tracing::debug!(elapsed = ?started.elapsed(), "postgres template initialised");
            // Kept for the whole process; the next run's sweep removes it.
            Ok::<_, TestkitError>(dir.keep())
        })
        .await?;
    Ok(path.as_path())
}

async fn connect_url(url: &str) -> Result<PgConnection> {
    connect_named(
        url,
        url.trim_start_matches("postgres://postgres@").to_owned(),
    )
    .await
}

/// Connects to `url`; errors name the server `node`, never the URL (which may
/// carry a password).
pub(crate) async fn connect_named(url: &str, node: String) -> Result<PgConnection> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(TestkitError::Postgres { node, source }),
        Err(_) => Err(TestkitError::Timeout {
            what: format!("a connection to {node}"),
            elapsed: CONNECT_TIMEOUT,
        }),
    }
}

async fn accepts_queries(url: &str) -> bool {
    let Ok(mut conn) = connect_url(url).await else {
        return false;
    };
    let ok = sqlx::query("SELECT 1").execute(&mut conn).await.is_ok();
    let _ = conn.close().await;
    ok
}

/// One PostgreSQL server (primary or standby) owned by the test bed.
#[derive(Debug)]
pub struct PgNode {
    process: ServerProcess,
    install: Install,
    port: u16,
    url: String,
    data: PathBuf,
    /// Whether it was started with `ssl = on`.
    tls: bool,
    // Last, so the folder is removed only after the server is gone.
    dir: TempDir,
}

impl PgNode {
    /// Starts `postgres` on the data folder `dir/data`, on `port` or a free one;
    /// with `ssl = on` and `tls`'s server certificate when given.
    async fn boot(
        install: &Install,
        dir: TempDir,
        port: Option<u16>,
        tls: Option<&TestCa>,
    ) -> Result<Self> {
        let data = dir.path().join("data");
        let folder = dir.path().to_path_buf();
        let mut ssl = Vec::new();
        if let Some(ca) = tls {
            let files = ca.install(&folder, install.run_as)?;
            for setting in [
                "ssl=on".to_owned(),
                format!("ssl_cert_file={}", files.cert.display()),
                format!("ssl_key_file={}", files.key.display()),
                format!("ssl_ca_file={}", files.ca.display()),
            ] {
                ssl.extend([OsString::from("-c"), OsString::from(setting)]);
            }
        }
        let (process, port) = with_port(port, |port| {
            let mut node_args = args([
                &"-D",
                &data,
                &"-p",
                &port.to_string(),
                &"-c",
                &format!("unix_socket_directories={}", folder.display()),
            ]);
            node_args.extend(ssl.iter().cloned());
            let launch = Launch {
                label: format!("postgres 127.0.0.1:{port}"),
                program: install.tool("postgres"),
                args: node_args,
                dir: folder.clone(),
                log: folder.join("postgres.log"),
                run_as: install.run_as,
            };
            async move {
                let process = ServerProcess::spawn(launch)?;
                let url = url_for(port);
                process
                    .wait_ready(START_TIMEOUT, || accepts_queries(&url))
                    .await?;
                Ok((process, port))
            }
        })
        .await?;
        Ok(Self {
            process,
            install: install.clone(),
            port,
            url: url_for(port),
            data,
            tls: tls.is_some(),
            dir,
        })
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust auth, no password).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// For a node started with TLS: `postgres://USER@localhost:PORT/postgres`,
    /// the host its certificate names, without `sslmode` (the client's TLS
    /// settings decide). `user` is `postgres` (trust, also over TLS) or
    /// [`CLIENT_NAME`], which must present the test CA's client certificate
    /// (`hostssl ... cert`). `None` for a plaintext node.
    pub fn tls_url(&self, user: &str) -> Option<String> {
        self.tls
            .then(|| format!("postgres://{user}@{SERVER_NAME}:{}/postgres", self.port))
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log (stdout and stderr of every start).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The postmaster's PID, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    async fn connect(&self) -> Result<PgConnection> {
        connect_url(&self.url).await
    }

    /// `SELECT pg_is_in_recovery()`: true on a standby, false on a primary.
    pub async fn is_in_recovery(&self) -> Result<bool> {
        let mut conn = self.connect().await?;
        let in_recovery = sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await
            .map_err(|source| self.error(source))?;
        let _ = conn.close().await;
        Ok(in_recovery)
    }

    fn error(&self, source: sqlx::Error) -> TestkitError {
        TestkitError::Postgres {
            node: self.addr().to_string(),
            source,
        }
    }

    /// SIGKILLs the postmaster and every backend; returns once all are gone, so new
    /// connections are refused.
    pub async fn kill(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "killing postgres");
        self.process.kill().await
    }

    /// SIGSTOPs the postmaster and each child process: new connections hang and open
    /// sessions stop answering.
    pub async fn pause(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "pausing postgres");
        self.process.pause()
    }

    /// SIGCONTs everything [`PgNode::pause`] stopped.
    pub async fn resume(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "resuming postgres");
        self.process.resume()
    }

    /// Starts the server again on the same port and data folder and waits until it
    /// accepts connections. A running (or paused) server is killed first, so this is
    /// a crash-and-recover, not a clean restart. A standby comes back as a standby
    /// unless it was promoted; a primary comes back as a primary on its own
    /// timeline even if a standby was promoted meanwhile (a split brain, as
    /// a real old primary restarted by its init system would be).
    pub async fn restart(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "restarting postgres");
        self.process.kill().await?;
        self.process.start()?;
        self.process
            .wait_ready(START_TIMEOUT, || accepts_queries(&self.url))
            .await
    }

    /// Promotes a standby (`pg_ctl promote -W`) and waits until
    /// `pg_is_in_recovery()` is false, i.e. it accepts writes.
    pub async fn promote(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "promoting postgres standby");
        run_command(
            &self.install.tool("pg_ctl"),
            &args([&"promote", &"-W", &"-D", &self.data]),
            self.install.run_as,
            self.dir.path(),
        )
        .await?;
        poll_until(
            &format!("{} to leave recovery after promotion", self.addr()),
            START_TIMEOUT,
            || async { matches!(self.is_in_recovery().await, Ok(false)).then_some(()) },
        )
        .await
    }
}

impl PgNode {
    /// Re-points this standby at `primary` (`primary_conninfo` in
    /// `postgresql.auto.conf`, then a reload: PostgreSQL restarts its WAL
    /// receiver) and waits until it streams from it. The standby follows
    /// `primary`'s timeline (`recovery_target_timeline` is `latest`, the
    /// default) only if it has not replayed past the point where that
    /// timeline forked; otherwise this times out and [`reclone`](Self::reclone)
    /// is the way back.
    pub async fn follow(&self, primary: &PgNode) -> Result<()> {
        tracing::info!(node = %self.addr(), primary = %primary.addr(), "re-pointing postgres standby");
        self.set_primary_conninfo(primary)?;
        let mut conn = self.connect().await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&mut conn)
            .await
            .map_err(|source| self.error(source))?;
        let _ = conn.close().await;
        self.wait_streaming_from(primary).await
    }

    /// Whether this standby can follow `primary`'s timeline: it is on that
    /// timeline already, or it has not replayed past the point where the
    /// timeline forked off its own (from `primary`'s timeline history file).
    pub async fn can_follow(&self, primary: &PgNode) -> Result<bool> {
        let timeline = primary.timeline().await?;
        let mut conn = self.connect().await?;
        let (own, replayed): (i64, String) = sqlx::query_as(
            "SELECT coalesce((SELECT received_tli FROM pg_stat_wal_receiver WHERE pid IS NOT NULL), \
                             (SELECT timeline_id FROM pg_control_checkpoint()))::int8, \
                    coalesce(pg_last_wal_replay_lsn(), '0/0')::text",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|source| self.error(source))?;
        if own == timeline {
            let _ = conn.close().await;
            return Ok(true);
        }
        let mut on_primary = primary.connect().await?;
        let history: String = sqlx::query_scalar("SELECT pg_read_file($1)")
            .bind(format!("pg_wal/{timeline:08X}.history"))
            .fetch_one(&mut on_primary)
            .await
            .map_err(|source| primary.error(source))?;
        let _ = on_primary.close().await;
        // Lines are `parent_tli <TAB> switch_lsn <TAB> reason`.
        let Some(fork) = history.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let parent: i64 = fields.next()?.parse().ok()?;
            (parent == own)
                .then(|| fields.next().map(str::to_owned))
                .flatten()
        }) else {
            let _ = conn.close().await;
            return Ok(false);
        };
        let before: bool = sqlx::query_scalar("SELECT $1::pg_lsn <= $2::pg_lsn")
            .bind(&replayed)
            .bind(&fork)
            .fetch_one(&mut conn)
            .await
            .map_err(|source| self.error(source))?;
        let _ = conn.close().await;
        Ok(before)
    }

    /// The timeline this primary writes.
    async fn timeline(&self) -> Result<i64> {
        let mut conn = self.connect().await?;
        let timeline: i64 = sqlx::query_scalar(
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int4::int8",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|source| self.error(source))?;
        let _ = conn.close().await;
        Ok(timeline)
    }

    /// Makes this node (an old primary, or a standby that cannot follow)
    /// a fresh standby of `primary`: stops it, replaces its data folder with a
    /// `pg_basebackup` of `primary` and starts it. (`pg_rewind` would need
    /// `full_page_writes` or `wal_log_hints`, which the test bed turns off for
    /// speed; a re-clone is what remains, and what an operator does when a
    /// rewind is impossible.)
    pub async fn reclone(&self, primary: &PgNode) -> Result<()> {
        tracing::info!(node = %self.addr(), primary = %primary.addr(), "re-cloning postgres node as a standby");
        self.process.kill().await?;
        release_shared_memory(&self.data);
        std::fs::remove_dir_all(&self.data).map_err(TestkitError::io(format!(
            "removing {}",
            self.data.display()
        )))?;
        basebackup(&self.install, primary.port, &self.data, self.dir.path()).await?;
        self.process.start()?;
        self.process
            .wait_ready(START_TIMEOUT, || accepts_queries(&self.url))
            .await?;
        self.wait_streaming_from(primary).await
    }

    /// Rewrites `primary_conninfo` in `postgresql.auto.conf` to point at `primary`.
    fn set_primary_conninfo(&self, primary: &PgNode) -> Result<()> {
        let path = self.data.join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&path)
            .map_err(TestkitError::io(format!("reading {}", path.display())))?;
        let mut kept: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
            .map(|l| format!("{l}\n"))
            .collect();
        kept.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres'\n",
            primary.port
        ));
        // Rewriting an existing file keeps its owner (the postgres user).
        std::fs::write(&path, kept).map_err(TestkitError::io(format!("writing {}", path.display())))
    }

    /// Waits until this standby's WAL receiver streams from `primary` on
    /// `primary`'s current timeline.
    async fn wait_streaming_from(&self, primary: &PgNode) -> Result<()> {
        let timeline = primary.timeline().await?;
        let port = primary.port;
        poll_until(
            &format!(
                "{} to stream timeline {timeline} from {}",
                self.addr(),
                primary.addr()
            ),
            START_TIMEOUT,
            || async move {
                let mut conn = self.connect().await.ok()?;
                let streaming: Option<bool> = sqlx::query_scalar(
                    "SELECT status = 'streaming' AND received_tli = $1 AND sender_port = $2 \
                     FROM pg_stat_wal_receiver",
                )
                .bind(timeline)
                .bind(i32::from(port))
                .fetch_optional(&mut conn)
                .await
                .ok()
                .flatten();
                let _ = conn.close().await;
                (streaming == Some(true)).then_some(())
            },
        )
        .await
    }
}

/// `pg_basebackup -R` of the primary on `port` into `data` (a standby's
/// folder, with `standby.signal` and `primary_conninfo`).
async fn basebackup(install: &Install, port: u16, data: &Path, cwd: &Path) -> Result<()> {
    run_command(
        &install.tool("pg_basebackup"),
        &args([
            &"-h",
            &"127.0.0.1",
            &"-p",
            &port.to_string(),
            &"-U",
            &"postgres",
            &"-D",
            &data,
            &"-R",
            &"-X",
            &"stream",
            &"-c",
            &"fast",
            &"--no-sync",
        ]),
        install.run_as,
        cwd,
    )
    .await
}

impl Drop for PgNode {
    fn drop(&mut self) {
        // SIGQUIT is PostgreSQL's immediate shutdown: fast, and it frees its shared
        // memory; SIGKILL follows if it does not exit in time.
        self.process
            .stop_blocking(Some(Signal::SIGQUIT), Duration::from_secs(3));
        release_shared_memory(&self.data);
    }
}

/// After an unclean exit the postmaster leaves its small SysV segment behind (its id
/// is on line 7 of `postmaster.pid`); remove it so that killed nodes do not exhaust
/// the machine's segments. The kernel frees it once the last process detaches.
pub(crate) fn release_shared_memory(data_dir: &Path) {
    let Ok(lock) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let Some(id) = lock
        .lines()
        .nth(6)
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u64>().ok())
    else {
        return;
    };
    let _ = std::process::Command::new("ipcrm")
        .args(["-m", &id.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Puts `hostssl all CLIENT_NAME ... cert` first in `pg_hba.conf` (standbys
/// copy it), so that role logs in only over TLS with a client certificate
/// whose common name is its name.
fn require_client_certificate(data: &Path) -> Result<()> {
    let hba = data.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba)
        .map_err(TestkitError::io(format!("reading {}", hba.display())))?;
    let rule = format!(
        "hostssl all {CLIENT_NAME} 127.0.0.1/32 cert\nhost all {CLIENT_NAME} 127.0.0.1/32 reject\n"
    );
    std::fs::write(&hba, rule + &text)
        .map_err(TestkitError::io(format!("writing {}", hba.display())))
}

fn url_for(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

/// A PostgreSQL primary plus streaming standbys. Dropping it stops every server and
/// removes every folder.
#[derive(Debug)]
pub struct PgCluster {
    /// `nodes[0]` is the primary; never empty.
    nodes: Vec<PgNode>,
}

impl PgCluster {
    /// Starts a primary and `standbys` streaming standbys, and returns once every
    /// node accepts connections (standbys: read-only ones).
    pub async fn start(standbys: usize) -> Result<Self> {
        Self::start_with(&vec![None; standbys + 1], None).await
    }

    /// [`start`](Self::start) with `ssl = on` on every node, serving `ca`'s
    /// server certificate (see [`PgNode::tls_url`]). Plaintext connections
    /// are still accepted, so [`PgNode::url`] keeps working for set-up; the
    /// role [`CLIENT_NAME`] may only log in over TLS with `ca`'s client
    /// certificate.
    pub async fn start_tls(standbys: usize, ca: &TestCa) -> Result<Self> {
        Self::start_with(&vec![None; standbys + 1], Some(ca)).await
    }

    /// Starts a primary on `ports[0]` and a streaming standby on each further
    /// port, for a test bed that must match a configuration's URLs. A port that
    /// is taken is an error naming it; no other port is tried.
    pub async fn start_on(ports: &[u16]) -> Result<Self> {
        if ports.is_empty() {
            return Err(TestkitError::Environment(
                "a PostgreSQL cluster needs at least a primary's port".into(),
            ));
        }
        Self::start_with(&ports.iter().copied().map(Some).collect::<Vec<_>>(), None).await
    }

    /// `ports[0]` for the primary, the rest for standbys; `None` is a free port.
    async fn start_with(ports: &[Option<u16>], tls: Option<&TestCa>) -> Result<Self> {
        let standbys = ports.len().saturating_sub(1);
        let started = Instant::now();
        let install = Install::locate()?;
        let template = template(&install).await?;
        let dir = node_dir("pg", install.run_as)?;
        run_command(
            Path::new("cp"),
            &args([&"-a", &template.join("data"), &dir.path().join("data")]),
            install.run_as,
            dir.path(),
        )
        .await?;
        if tls.is_some() {
            require_client_certificate(&dir.path().join("data"))?;
        }
        let primary = PgNode::boot(&install, dir, ports.first().copied().flatten(), tls).await?;
        let mut nodes = vec![primary];
        for port in ports.iter().skip(1).copied() {
            let dir = node_dir("pg", install.run_as)?;
            basebackup(
                &install,
                nodes[0].port,
                &dir.path().join("data"),
                dir.path(),
            )
            .await?;
            nodes.push(PgNode::boot(&install, dir, port, tls).await?);
        }
        tracing::info!(standbys, elapsed = ?started.elapsed(), "postgres cluster started");
        Ok(Self { nodes })
    }

    /// The primary (as started; a promoted standby does not take its place here).
    pub fn primary(&self) -> &PgNode {
        &self.nodes[0]
    }

    /// The standbys, in start order.
    pub fn standbys(&self) -> &[PgNode] {
        &self.nodes[1..]
    }

    /// The primary followed by the standbys.
    pub fn nodes(&self) -> &[PgNode] {
        &self.nodes
    }

    /// Waits until `standby` has replayed all WAL the primary had written when this
    /// was called (`pg_last_wal_replay_lsn() >= pg_current_wal_lsn()`).
    pub async fn wait_replayed(&self, standby: &PgNode, timeout: Duration) -> Result<()> {
        wait_replayed_at(
            &self.primary().url,
            &standby.url,
            &standby.addr().to_string(),
            timeout,
        )
        .await
    }
}

/// Waits until the standby at `standby_url` has replayed all WAL the primary
/// at `primary_url` had written when this was called
/// (`pg_last_wal_replay_lsn() >= pg_current_wal_lsn()`). For servers the test
/// kit did not start too; the URLs may carry passwords, and errors name the
/// standby `standby` (and the primary "the primary of `standby`") instead.
pub async fn wait_replayed_at(
    primary_url: &str,
    standby_url: &str,
    standby: &str,
    timeout: Duration,
) -> Result<()> {
    let primary = format!("the primary of {standby}");
    let mut conn = connect_named(primary_url, primary.clone()).await?;
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut conn)
        .await
        .map_err(|source| TestkitError::Postgres {
            node: primary,
            source,
        })?;
    let _ = conn.close().await;

    let started = Instant::now();
    let mut session: Option<PgConnection> = None;
    loop {
        if session.is_none() {
            session = connect_named(standby_url, standby.to_owned()).await.ok();
        }
        if let Some(conn) = session.as_mut() {
            let replayed = sqlx::query_scalar::<_, bool>(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)",
            )
            .bind(&target)
            .fetch_one(&mut *conn)
            .await;
            match replayed {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(_) => session = None,
            }
        }
        if started.elapsed() >= timeout {
            return Err(TestkitError::Timeout {
                what: format!("{standby} to replay WAL up to {target}"),
                elapsed: started.elapsed(),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
