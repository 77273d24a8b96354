//! The engines the demo breaks: the local test bed's processes, or the user's
//! own engines (the docker-compose ones) reached through fault proxies.
//!
//! With `SWITCHYARD_POSTGRES_URLS` or `SWITCHYARD_REDIS_URLS` set, that
//! engine's nodes are the user's: the roles are probed, every node gets a
//! [`FaultProxy`](switchyard_testkit::FaultProxy) the routers connect through, and the faults are injected in
//! the proxies (a killed node refuses and resets its connections, a paused one
//! stalls them). A standby is promoted for real, with `pg_promote()`. Both
//! kinds of node are the testkit's [`Node`]s, and the faults its [`Fault`]s.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use switchyard_core::{Backend, Role, SecretUrl};
use switchyard_postgres::{PgBackend, PgBackendConfig};
use switchyard_redis::{RedisBackend, RedisBackendConfig};
use switchyard_testkit::{
    wait_replayed_at, Fault, Node, PgCluster, Promotion, ProxiedNode, RedisCluster,
};

use super::DynError;

/// Superuser URLs of the user's PostgreSQL nodes, comma-separated.
pub const PG_URLS_VAR: &str = "SWITCHYARD_POSTGRES_URLS";
/// URLs of the user's Redis nodes, comma-separated.
pub const REDIS_URLS_VAR: &str = "SWITCHYARD_REDIS_URLS";

const RESET_HINT: &str = "recreate the engines (docker compose down -v && docker compose up -d)";

/// Where an engine's nodes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Started by the demo on loopback.
    TestBed,
    /// The user's, from the URL variable.
    External,
}

impl Origin {
    /// How the summary names it.
    pub fn describe(self, var: &str) -> String {
        match self {
            Origin::TestBed => "local test bed".into(),
            Origin::External => format!("external ({var})"),
        }
    }
}

/// One of the user's nodes and the proxy in front of it.
struct ExternalNode {
    /// The URL from the environment, for direct admin work (never printed).
    url: SecretUrl,
    node: ProxiedNode,
}

enum Nodes {
    Pg(PgCluster),
    Redis(RedisCluster),
    External(Vec<ExternalNode>),
}

/// The nodes of one engine, primary first, and how to break them.
pub struct Engine {
    nodes: Nodes,
    /// Endpoint names, primary first.
    names: Vec<String>,
}

impl Engine {
    /// Where the nodes come from.
    pub fn origin(&self) -> Origin {
        match self.nodes {
            Nodes::External(_) => Origin::External,
            Nodes::Pg(_) | Nodes::Redis(_) => Origin::TestBed,
        }
    }

    /// The endpoint name of node `i` (0 is the primary).
    pub fn name(&self, i: usize) -> &str {
        self.names.get(i).map_or("?", String::as_str)
    }

    /// How many standbys or replicas there are.
    pub fn replicas(&self) -> usize {
        self.names.len().saturating_sub(1)
    }

    /// Where the routers reach node `i`: the node itself, or its proxy.
    fn router_addr(&self, i: usize) -> Option<SocketAddr> {
        match &self.nodes {
            Nodes::Pg(c) => c.nodes().get(i).map(|n| n.addr()),
            Nodes::Redis(c) => c.nodes().get(i).map(|n| n.addr()),
            Nodes::External(n) => n.get(i).map(|n| n.node.addr()),
        }
    }

    /// Injects `fault` with node `replica` as the replica it hits or
    /// promotes (node 0 is the primary).
    pub async fn inject(&self, fault: Fault, replica: usize) -> Result<(), DynError> {
        match &self.nodes {
            Nodes::Pg(c) => fault.inject(&c.nodes()[0], &c.nodes()[replica]).await?,
            Nodes::Redis(c) => fault.inject(&c.nodes()[0], &c.nodes()[replica]).await?,
            Nodes::External(n) => fault.inject(&n[0].node, &n[replica].node).await?,
        }
        Ok(())
    }

    /// Undoes [`inject`](Self::inject): restarts or resumes the replica, or
    /// promotes it in the killed primary's place.
    pub async fn recover(&self, fault: Fault, replica: usize) -> Result<(), DynError> {
        match &self.nodes {
            Nodes::Pg(c) => fault.recover(&c.nodes()[replica]).await?,
            Nodes::Redis(c) => fault.recover(&c.nodes()[replica]).await?,
            Nodes::External(n) => fault.recover(&n[replica].node).await?,
        }
        Ok(())
    }

    /// What the user should know after the run, if anything.
    pub fn aftermath(&self, promoted: Option<usize>) -> Option<String> {
        match (&self.nodes, promoted) {
            (Nodes::External(_), Some(i)) => Some(format!(
                "{} was promoted and the old primary still runs as a primary; \
                 to run the demo again, {RESET_HINT}",
                self.name(i)
            )),
            _ => None,
        }
    }
}

/// The PostgreSQL side: the test bed's primary and two standbys, or the user's.
pub async fn postgres() -> Result<Engine, DynError> {
    let names = |standbys| node_names("pg-primary", "pg-standby", standbys);
    match urls(PG_URLS_VAR) {
        None => Ok(Engine {
            names: names(2),
            nodes: Nodes::Pg(PgCluster::start(2).await?),
        }),
        Some(urls) => {
            external(
                PG_URLS_VAR,
                urls,
                names,
                Promotion::Postgres,
                |name, url| PgBackend::new(PgBackendConfig::new(name, url)),
            )
            .await
        }
    }
}

/// The Redis side: the test bed's master and one replica, or the user's.
pub async fn redis() -> Result<Engine, DynError> {
    let names = |replicas| node_names("redis-master", "redis-replica", replicas);
    match urls(REDIS_URLS_VAR) {
        None => Ok(Engine {
            names: names(1),
            nodes: Nodes::Redis(RedisCluster::start(1).await?),
        }),
        Some(urls) => {
            external(
                REDIS_URLS_VAR,
                urls,
                names,
                Promotion::Redis,
                |name, url| RedisBackend::new(RedisBackendConfig::new(name, url)),
            )
            .await
        }
    }
}

/// `primary`, then `replica-1` to `replica-n`.
fn node_names(primary: &str, replica: &str, replicas: usize) -> Vec<String> {
    std::iter::once(primary.to_owned())
        .chain((1..=replicas).map(|i| format!("{replica}-{i}")))
        .collect()
}

/// The URLs in `var`, if it is set and not empty.
fn urls(var: &str) -> Option<Vec<SecretUrl>> {
    let raw = std::env::var(var).ok()?;
    let urls: Vec<SecretUrl> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(SecretUrl::new)
        .collect();
    (!urls.is_empty()).then_some(urls)
}

/// The user's nodes: roles probed with the engine's own backend, primary
/// first, each behind a fault proxy.
async fn external<B: Backend>(
    var: &str,
    urls: Vec<SecretUrl>,
    names: impl Fn(usize) -> Vec<String>,
    promotion: Promotion,
    backend: impl Fn(String, SecretUrl) -> Result<B, switchyard_core::Error>,
) -> Result<Engine, DynError> {
    let mut primaries = Vec::new();
    let mut replicas = Vec::new();
    for (i, url) in urls.into_iter().enumerate() {
        let probe = backend(format!("node-{i}"), url.clone())?
            .probe(Duration::from_secs(5))
            .await
            .map_err(|e| format!("{var}: cannot reach {url}: {e}"))?;
        if probe.role == Role::Primary {
            primaries.push(url);
        } else {
            replicas.push(url);
        }
    }
    if primaries.len() != 1 || replicas.is_empty() {
        return Err(format!(
            "{var}: the demo needs exactly one primary and at least one replica; \
             found {} node(s), primaries: [{}]; if an earlier demo promoted a standby, \
             {RESET_HINT}",
            primaries.len() + replicas.len(),
            primaries
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
        .into());
    }
    let mut nodes = Vec::new();
    for url in primaries.into_iter().chain(replicas) {
        let upstream = socket_addr(&url).await?;
        let node = ProxiedNode::start(upstream, url.expose().to_owned(), promotion).await?;
        nodes.push(ExternalNode { url, node });
    }
    Ok(Engine {
        names: names(nodes.len() - 1),
        nodes: Nodes::External(nodes),
    })
}

async fn socket_addr(url: &SecretUrl) -> Result<SocketAddr, DynError> {
    let parsed = url::Url::parse(url.expose()).map_err(|e| format!("{url}: {e}"))?;
    let host = parsed.host_str().ok_or_else(|| format!("{url}: no host"))?;
    let port = parsed
        .port_or_known_default()
        .or(match parsed.scheme() {
            "postgres" | "postgresql" => Some(5432),
            "redis" | "rediss" => Some(6379),
            _ => None,
        })
        .ok_or_else(|| format!("{url}: no port"))?;
    let host = host.trim_matches(['[', ']']).to_owned();
    let found = tokio::net::lookup_host((host.as_str(), port)).await?.next();
    found.ok_or_else(|| format!("{url}: {host} does not resolve").into())
}

/// The URL the routers use for node `i`: the node's own URL pointed at
/// `router_addr`, with its password moved into a file the config references
/// as `${file:…}` (so the generated config holds no secret).
fn router_url(
    engine: &Engine,
    i: usize,
    template: &SecretUrl,
    secrets: &Path,
) -> Result<String, DynError> {
    let addr = engine
        .router_addr(i)
        .ok_or_else(|| format!("no node {i}"))?;
    let parsed = url::Url::parse(template.expose()).map_err(|e| format!("{template}: {e}"))?;
    let userinfo = match (parsed.username(), parsed.password()) {
        ("", None) => String::new(),
        (user, None) => format!("{user}@"),
        (user, Some(password)) => {
            let file = secrets.join(format!("{}.password", engine.name(i)));
            write_secret(&file, password)?;
            format!("{user}:${{file:{}}}@", file.display())
        }
    };
    let query = parsed.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok(format!(
        "{}://{userinfo}{addr}{}{query}",
        parsed.scheme(),
        parsed.path()
    ))
}

/// Writes a secret readable by the owner only.
pub fn write_secret(path: &Path, secret: &str) -> Result<(), DynError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(secret.as_bytes())?;
    Ok(())
}

/// Router URLs for every PostgreSQL node, as the demo's application role.
pub fn pg_router_urls(
    engine: &Engine,
    role: &str,
    password: &str,
    database: &str,
    secrets: &Path,
) -> Result<Vec<String>, DynError> {
    let template = SecretUrl::new(format!("postgres://{role}:{password}@127.0.0.1/{database}"));
    (0..=engine.replicas())
        .map(|i| router_url(engine, i, &template, secrets))
        .collect()
}

/// Router URLs for every Redis node, with the user's credentials.
pub fn redis_router_urls(engine: &Engine, secrets: &Path) -> Result<Vec<String>, DynError> {
    (0..=engine.replicas())
        .map(|i| {
            let template = match &engine.nodes {
                Nodes::Redis(c) => SecretUrl::new(c.nodes()[i].url()),
                Nodes::External(n) => n[i].url.clone(),
                Nodes::Pg(_) => return Err("not a Redis engine".into()),
            };
            router_url(engine, i, &template, secrets)
        })
        .collect()
}

/// A superuser URL of PostgreSQL node `i`, for seeding and replication checks.
pub fn pg_admin_url(engine: &Engine, i: usize, database: &str) -> Result<SecretUrl, DynError> {
    match &engine.nodes {
        Nodes::Pg(c) => Ok(SecretUrl::new(format!(
            "postgres://postgres@{}/{database}",
            c.nodes()[i].addr()
        ))),
        Nodes::External(n) => {
            let mut url =
                url::Url::parse(n[i].url.expose()).map_err(|e| format!("{}: {e}", n[i].url))?;
            url.set_path(database);
            Ok(SecretUrl::new(String::from(url)))
        }
        Nodes::Redis(_) => Err("not a PostgreSQL engine".into()),
    }
}

/// Waits until every standby has replayed what the primary has written.
pub async fn wait_replayed(engine: &Engine, timeout: Duration) -> Result<(), DynError> {
    let primary = pg_admin_url(engine, 0, "postgres")?;
    for i in 1..=engine.replicas() {
        let standby = pg_admin_url(engine, i, "postgres")?;
        wait_replayed_at(primary.expose(), standby.expose(), engine.name(i), timeout).await?;
    }
    Ok(())
}
