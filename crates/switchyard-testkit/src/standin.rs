//! MongoDB and Elasticsearch: the real server when its URL is given in the
//! environment, else a wire-compatible stand-in from PyPI started by the test bed.
//!
//! | engine | real server from | stand-in |
//! |---|---|---|
//! | MongoDB | `SWITCHYARD_MONGODB_URL` | `nx-27017` 0.8.1, in-memory |
//! | Elasticsearch | `SWITCHYARD_ELASTICSEARCH_URL` | `noida-db` 0.2.3, `--only elasticsearch` |
//!
//! Stand-ins are looked for in the virtualenv named by `SWITCHYARD_STANDINS` if set,
//! else in `<workspace>/target/standins` (where `scripts/setup` installs them), else
//! on `PATH`. Tests print [`MongoServer::describe`] / [`ElasticServer::describe`] so
//! every run says what it ran against. A stand-in is not the engine: MongoDB replica
//! sets, for one, need the real server.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::TcpStream;

use crate::error::{Result, TestkitError};
use crate::http;
use crate::port::{loopback, with_free_port};
use crate::process::{find_binary, is_executable, Launch, ServerProcess};
use crate::scratch::node_dir;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The workspace this crate was built in; CI installs the stand-ins under its
/// `target/standins`.
fn workspace_root() -> PathBuf {
    let raw = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    raw.canonicalize().unwrap_or(raw)
}

/// What a server handle points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// The real engine, reached through a URL from the environment.
    Real,
    /// A wire-compatible stand-in started by the test bed.
    StandIn {
        /// The stand-in's package name, e.g. `nx-27017`.
        name: &'static str,
    },
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Real => f.write_str("real server"),
            Self::StandIn { name } => write!(f, "stand-in {name}"),
        }
    }
}

/// One stand-in package and how to run it.
#[derive(Debug)]
struct StandIn {
    engine: &'static str,
    name: &'static str,
    /// Prefix of its `*.dist-info` folder, for the version.
    dist: &'static str,
    url_env: &'static str,
    install: &'static str,
    /// Where the executable sits inside a virtualenv.
    locate_in_venv: fn(&Path) -> Option<PathBuf>,
}

const MONGO: StandIn = StandIn {
    engine: "MongoDB",
    name: "nx-27017",
    dist: "nx_27017",
    url_env: "SWITCHYARD_MONGODB_URL",
    install: "pip install nx-27017==0.8.1 (or run scripts/setup)",
    locate_in_venv: |venv| Some(venv.join("bin/nx-27017")).filter(|p| is_executable(p)),
};

const ELASTIC: StandIn = StandIn {
    engine: "Elasticsearch",
    name: "noida-db",
    dist: "noida_db",
    url_env: "SWITCHYARD_ELASTICSEARCH_URL",
    install: "pip install noida-db==0.2.3 (or run scripts/setup)",
    // The binary inside the wheel, not the Python wrapper in bin/, so that the PID
    // the test bed holds is the server itself.
    locate_in_venv: |venv| {
        site_packages(venv)
            .into_iter()
            .map(|sp| sp.join("noida_db/noida-db"))
            .find(|p| is_executable(p))
    },
};

fn site_packages(venv: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect()
}

/// The version from `<dist>-<version>.dist-info` in the virtualenv.
fn version_in(venv: &Path, dist: &str) -> Option<String> {
    let prefix = format!("{dist}-");
    site_packages(venv).into_iter().find_map(|sp| {
        std::fs::read_dir(sp).ok()?.flatten().find_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix(&prefix)?.strip_suffix(".dist-info")?;
            Some(version.to_owned())
        })
    })
}

impl StandIn {
    /// Finds the executable and its version: in `$SWITCHYARD_STANDINS` if set (and
    /// only there), else in `<workspace>/target/standins`, else on `PATH`.
    fn locate(&self) -> Result<(PathBuf, Option<String>)> {
        let explicit = std::env::var_os("SWITCHYARD_STANDINS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let venv = explicit
            .clone()
            .unwrap_or_else(|| workspace_root().join("target/standins"));
        if let Some(program) = (self.locate_in_venv)(&venv) {
            return Ok((program, version_in(&venv, self.dist)));
        }
        let missing = || TestkitError::MissingBinary {
            name: self.name.into(),
            looked_in: match &explicit {
                Some(venv) => format!("$SWITCHYARD_STANDINS={}", venv.display()),
                None => format!("{} and PATH", venv.display()),
            },
            install: self.install,
        };
        if explicit.is_some() {
            return Err(missing());
        }
        let wrapper = find_binary(self.name, &[]).ok_or_else(missing)?;
        // bin/<name> of some virtualenv: prefer what that virtualenv holds.
        let other_venv = wrapper.parent().and_then(Path::parent);
        let version = other_venv.and_then(|v| version_in(v, self.dist));
        let program = other_venv
            .and_then(self.locate_in_venv)
            .unwrap_or_else(|| wrapper.clone());
        Ok((program, version))
    }
}

/// Hides the password in `scheme://user:password@host/...`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// How a stand-in shows it is ready.
#[derive(Debug, Clone, Copy)]
enum Probe {
    Tcp,
    HttpRoot,
}

impl Probe {
    async fn ready(self, addr: SocketAddr) -> bool {
        match self {
            Self::Tcp => TcpStream::connect(addr).await.is_ok(),
            Self::HttpRoot => matches!(
                http::request(addr, "GET", "/", b"", Duration::from_secs(1)).await,
                Ok(r) if r.status == 200
            ),
        }
    }
}

#[derive(Debug)]
struct Managed {
    process: ServerProcess,
    port: u16,
    probe: Probe,
    // Last, so the folder is removed only after the server is gone.
    dir: TempDir,
}

/// Shared body of [`MongoServer`] and [`ElasticServer`].
#[derive(Debug)]
struct Server {
    engine: &'static str,
    url: String,
    kind: ServerKind,
    version: Option<String>,
    managed: Option<Managed>,
}

impl Server {
    async fn start(
        spec: &StandIn,
        scheme: &str,
        probe: Probe,
        args: fn(&Path, u16) -> Vec<String>,
    ) -> Result<Self> {
        if let Some(url) = std::env::var(spec.url_env).ok().filter(|u| !u.is_empty()) {
            return Ok(Self {
                engine: spec.engine,
                url,
                kind: ServerKind::Real,
                version: None,
                managed: None,
            });
        }
        let (program, version) = spec.locate()?;
        let dir = node_dir(spec.name, None)?;
        let folder = dir.path().to_path_buf();
        let (process, port) = with_free_port(|port| {
            let launch = Launch {
                label: format!("{} 127.0.0.1:{port}", spec.name),
                program: program.clone(),
                args: args(&folder, port).into_iter().map(Into::into).collect(),
                dir: folder.clone(),
                log: folder.join("server.log"),
                run_as: None,
            };
            async move {
                let process = ServerProcess::spawn(launch)?;
                process
                    .wait_ready(START_TIMEOUT, || probe.ready(loopback(port)))
                    .await?;
                Ok((process, port))
            }
        })
        .await?;
        Ok(Self {
            engine: spec.engine,
            url: format!("{scheme}://127.0.0.1:{port}"),
            kind: ServerKind::StandIn { name: spec.name },
            version,
            managed: Some(Managed {
                process,
                port,
                probe,
                dir,
            }),
        })
    }

    fn describe(&self) -> String {
        match self.kind {
            ServerKind::Real => format!("{} (real server) at {}", self.engine, redact(&self.url)),
            ServerKind::StandIn { name } => format!(
                "{} stand-in {name} {} at {}",
                self.engine,
                self.version.as_deref().unwrap_or("(unknown version)"),
                self.url
            ),
        }
    }

    fn managed(&self, operation: &'static str) -> Result<&Managed> {
        self.managed
            .as_ref()
            .ok_or_else(|| TestkitError::Unsupported {
                operation,
                server: self.describe(),
            })
    }

    async fn kill(&self) -> Result<()> {
        let managed = self.managed("kill")?;
        tracing::info!(server = %self.describe(), "killing");
        managed.process.kill().await
    }

    async fn pause(&self) -> Result<()> {
        let managed = self.managed("pause")?;
        tracing::info!(server = %self.describe(), "pausing");
        managed.process.pause()
    }

    async fn resume(&self) -> Result<()> {
        let managed = self.managed("resume")?;
        tracing::info!(server = %self.describe(), "resuming");
        managed.process.resume()
    }

    async fn restart(&self) -> Result<()> {
        let managed = self.managed("restart")?;
        tracing::info!(server = %self.describe(), "restarting");
        managed.process.kill().await?;
        managed.process.start()?;
        let addr = loopback(managed.port);
        managed
            .process
            .wait_ready(START_TIMEOUT, || managed.probe.ready(addr))
            .await
    }
}

macro_rules! server_handle {
    ($(#[$doc:meta])* $name:ident, $engine:literal) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name {
            inner: Server,
        }

        impl $name {
            /// The URL to connect to.
            pub fn url(&self) -> &str {
                &self.inner.url
            }

            /// Real server or stand-in.
            pub fn kind(&self) -> ServerKind {
                self.inner.kind
            }

            /// The stand-in's package version (`None` for a real server).
            pub fn version(&self) -> Option<&str> {
                self.inner.version.as_deref()
            }

            /// One line saying what this is, for test output, e.g.
            #[doc = concat!("`", $engine, " stand-in NAME VERSION at URL`.")]
            pub fn describe(&self) -> String {
                self.inner.describe()
            }

            /// The stand-in's address, `127.0.0.1:PORT`; `None` for a real server.
            pub fn addr(&self) -> Option<SocketAddr> {
                self.inner.managed.as_ref().map(|m| loopback(m.port))
            }

            /// The stand-in's folder (its log is `server.log` in it); `None` for a
            /// real server.
            pub fn dir(&self) -> Option<&Path> {
                self.inner.managed.as_ref().map(|m| m.dir.path())
            }

            /// SIGKILLs the stand-in; returns once it is gone. Unsupported for a real
            /// server.
            pub async fn kill(&self) -> Result<()> {
                self.inner.kill().await
            }

            /// SIGSTOPs the stand-in. Unsupported for a real server.
            pub async fn pause(&self) -> Result<()> {
                self.inner.pause().await
            }

            /// SIGCONTs the stand-in. Unsupported for a real server.
            pub async fn resume(&self) -> Result<()> {
                self.inner.resume().await
            }

            /// Starts the stand-in again on the same port and waits until it is
            /// ready; a running one is killed first. Unsupported for a real server.
            pub async fn restart(&self) -> Result<()> {
                self.inner.restart().await
            }
        }
    };
}

server_handle!(
    /// A MongoDB server: the one at `SWITCHYARD_MONGODB_URL`, else an in-memory
    /// `nx-27017` stand-in (wire protocol only: no replica sets). A restarted stand-in
    /// starts empty.
    MongoServer,
    "MongoDB"
);

server_handle!(
    /// An Elasticsearch server: the one at `SWITCHYARD_ELASTICSEARCH_URL`, else a
    /// `noida-db` stand-in (reports version 8.15.3). As with the real engine, a
    /// document indexed without `refresh=true` is not visible to an immediate search.
    ElasticServer,
    "Elasticsearch"
);

impl MongoServer {
    /// Returns the real server if `SWITCHYARD_MONGODB_URL` is set, else starts the
    /// stand-in on a free port and waits until it accepts connections.
    pub async fn start() -> Result<Self> {
        let inner = Server::start(&MONGO, "mongodb", Probe::Tcp, |dir, port| {
            let log = dir.join("server.log").display().to_string();
            let pid = dir.join("nx.pid").display().to_string();
            [
                "--db",
                "memory",
                "--host",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--log-file",
                &log,
                "--pid-file",
                &pid,
            ]
            .map(String::from)
            .to_vec()
        })
        .await?;
        Ok(Self { inner })
    }
}

impl ElasticServer {
    /// Returns the real server if `SWITCHYARD_ELASTICSEARCH_URL` is set, else starts
    /// the stand-in on a free port and waits until `GET /` answers.
    pub async fn start() -> Result<Self> {
        let inner = Server::start(&ELASTIC, "http", Probe::HttpRoot, |dir, port| {
            let data = dir.join("data").display().to_string();
            [
                "start",
                "--data-dir",
                &data,
                "--only",
                "elasticsearch",
                "--elasticsearch-port",
                &port.to_string(),
            ]
            .map(String::from)
            .to_vec()
        })
        .await?;
        Ok(Self { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("mongodb://app:s3cret@db:27017/x"),
            "mongodb://app:***@db:27017/x"
        );
        assert_eq!(redact("http://127.0.0.1:9200"), "http://127.0.0.1:9200");
    }

    #[test]
    fn kinds_display() {
        assert_eq!(ServerKind::Real.to_string(), "real server");
        assert_eq!(
            ServerKind::StandIn { name: "nx-27017" }.to_string(),
            "stand-in nx-27017"
        );
    }
}
