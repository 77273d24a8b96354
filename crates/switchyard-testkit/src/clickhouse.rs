//! ClickHouse: one `clickhouse-server` with a minimal generated config.
//!
//! Written for the 18.16 server Debian ships (root tag `<yandex>`, which newer
//! servers still accept). Against 18.16, the `clickhouse` crate needs
//! `Client::with_validation(false)`. HTTP GET is read-only there: DDL and inserts go
//! over POST, which is what [`ClickHouse::query`] does.
//!
//! [`ClickHouse::start_tls`] adds an `https_port` served with a [`TestCa`]'s
//! server certificate (the `<openSSL>` server block; 18.16 links OpenSSL 3
//! through Poco and negotiates TLS 1.3). The plain HTTP port stays open for
//! the test bed's own readiness checks and queries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use crate::error::{Result, TestkitError};
use crate::http;
use crate::port::{free_port, loopback, with_free_port};
use crate::process::{find_binary, Launch, ServerProcess};
use crate::scratch::node_dir;
use crate::tls::{ServerFiles, TestCa, SERVER_NAME};

const INSTALL: &str = "apt-get install -y clickhouse-server clickhouse-client";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

fn locate() -> Result<PathBuf> {
    let dirs = [
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/usr/bin"),
        PathBuf::from("/usr/local/bin"),
    ];
    find_binary("clickhouse-server", &dirs).ok_or_else(|| TestkitError::MissingBinary {
        name: "clickhouse-server".into(),
        looked_in: "/usr/sbin, /usr/bin, /usr/local/bin and PATH".into(),
        install: INSTALL,
    })
}

/// The `https_port` and the `<openSSL>` server block, for a TLS server.
fn https_config(port: u16, files: &ServerFiles) -> String {
    format!(
        r#"
    <https_port>{port}</https_port>
    <openSSL>
        <server>
            <certificateFile>{cert}</certificateFile>
            <privateKeyFile>{key}</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>"#,
        cert = files.cert.display(),
        key = files.key.display(),
    )
}

fn config(dir: &Path, http: u16, tcp: u16, interserver: u16, https: &str) -> String {
    let d = dir.display();
    format!(
        r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{d}/server.log</log>
        <errorlog>{d}/server.err.log</errorlog>
        <console>false</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>{https}
    <tcp_port>{tcp}</tcp_port>
    <interserver_http_port>{interserver}</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>67108864</mark_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
"#
    )
}

const USERS: &str = r#"<?xml version="1.0"?>
<yandex>
    <profiles>
        <default></default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"#;

async fn pings(addr: SocketAddr) -> bool {
    matches!(
        http::request(addr, "GET", "/ping", b"", Duration::from_secs(1)).await,
        Ok(response) if response.status == 200
    )
}

/// One ClickHouse server owned by the test bed. Dropping it stops the server and
/// removes its folder.
#[derive(Debug)]
pub struct ClickHouse {
    process: ServerProcess,
    http_port: u16,
    tcp_port: u16,
    /// The HTTPS port, when started with TLS.
    https_port: Option<u16>,
    // Last, so the folder is removed only after the server is gone.
    dir: TempDir,
}

impl ClickHouse {
    /// Starts the server and returns once `GET /ping` answers.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts the server with an HTTPS port too, serving `ca`'s server
    /// certificate (issued for [`SERVER_NAME`] only); see
    /// [`https_url`](Self::https_url).
    pub async fn start_tls(ca: &TestCa) -> Result<Self> {
        Self::start_with(Some(ca)).await
    }

    async fn start_with(tls: Option<&TestCa>) -> Result<Self> {
        let started = Instant::now();
        let program = locate()?;
        let dir = node_dir("clickhouse", None)?;
        let folder = dir.path().to_path_buf();
        let files = tls.map(|ca| ca.install(&folder, None)).transpose()?;
        let (process, http_port, tcp_port, https_port) = with_free_port(|http_port| {
            let folder = folder.clone();
            let program = program.clone();
            let files = files.clone();
            async move {
                let tcp_port = free_port()?;
                let interserver = free_port()?;
                let https_port = files.as_ref().map(|_| free_port()).transpose()?;
                let https = match (https_port, &files) {
                    (Some(port), Some(files)) => https_config(port, files),
                    _ => String::new(),
                };
                let config_path = folder.join("config.xml");
                std::fs::write(
                    &config_path,
                    config(&folder, http_port, tcp_port, interserver, &https),
                )
                .map_err(TestkitError::io("writing the clickhouse config"))?;
                std::fs::write(folder.join("users.xml"), USERS)
                    .map_err(TestkitError::io("writing the clickhouse users"))?;
                let launch = Launch {
                    label: format!("clickhouse 127.0.0.1:{http_port}"),
                    program,
                    args: vec![format!("--config-file={}", config_path.display()).into()],
                    dir: folder.clone(),
                    log: folder.join("stdout.log"),
                    run_as: None,
                };
                let process = ServerProcess::spawn(launch)?;
                process
                    .wait_ready(START_TIMEOUT, || pings(loopback(http_port)))
                    .await
                    .map_err(|err| with_error_log(err, &folder))?;
                Ok((process, http_port, tcp_port, https_port))
            }
        })
        .await?;
        tracing::info!(elapsed = ?started.elapsed(), tls = https_port.is_some(), "clickhouse started");
        Ok(Self {
            process,
            http_port,
            tcp_port,
            https_port,
            dir,
        })
    }

    /// `https://localhost:PORT` (the name the test certificate is issued
    /// for), when started with [`start_tls`](Self::start_tls).
    pub fn https_url(&self) -> Option<String> {
        self.https_port
            .map(|port| format!("https://{SERVER_NAME}:{port}"))
    }

    /// The HTTPS port, when started with [`start_tls`](Self::start_tls).
    pub fn https_port(&self) -> Option<u16> {
        self.https_port
    }

    /// `http://127.0.0.1:PORT` (user `default`, no password).
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The HTTP port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The native-protocol TCP port.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// `127.0.0.1:HTTP_PORT`.
    pub fn addr(&self) -> SocketAddr {
        loopback(self.http_port)
    }

    /// The server's folder (logs: `server.log`, `server.err.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's PID, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    /// Runs `sql` over HTTP POST and returns the response body (for a `SELECT`, the
    /// rows in the default `TabSeparated` format).
    pub async fn query(&self, sql: &str) -> Result<String> {
        let url = self.http_url();
        let response = http::request(self.addr(), "POST", "/", sql.as_bytes(), QUERY_TIMEOUT)
            .await
            .map_err(TestkitError::io(format!("querying clickhouse at {url}")))?;
        if response.status != 200 {
            return Err(TestkitError::Http {
                method: "POST",
                url,
                status: response.status,
                body: response.text().chars().take(500).collect(),
            });
        }
        Ok(response.text())
    }

    /// SIGKILLs the server; returns once it is gone, so connections are refused.
    pub async fn kill(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "killing clickhouse");
        self.process.kill().await
    }

    /// SIGSTOPs the server: it accepts TCP connections but never answers.
    pub async fn pause(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "pausing clickhouse");
        self.process.pause()
    }

    /// SIGCONTs the server.
    pub async fn resume(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "resuming clickhouse");
        self.process.resume()
    }

    /// Starts the server again on the same ports and folder (data is kept) and waits
    /// until `/ping` answers. A running server is killed first.
    pub async fn restart(&self) -> Result<()> {
        tracing::info!(node = %self.addr(), "restarting clickhouse");
        self.process.kill().await?;
        self.process.start()?;
        self.process
            .wait_ready(START_TIMEOUT, || pings(self.addr()))
            .await
            .map_err(|err| with_error_log(err, self.dir.path()))
    }
}

/// ClickHouse logs to its own files, not stdout: put their tail in start errors.
fn with_error_log(err: TestkitError, dir: &Path) -> TestkitError {
    match err {
        TestkitError::Exited {
            server,
            status,
            log_tail,
        } => TestkitError::Exited {
            server,
            status,
            log_tail: format!(
                "{log_tail}\n{}",
                crate::process::tail(&dir.join("server.err.log"), 1500)
            ),
        },
        other => other,
    }
}
