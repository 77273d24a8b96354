//! Shared set-up for the engine tests: a server (real or stand-in), backends,
//! tenant registries, a raw client for checking what is really stored.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Document};
use switchyard_core::{
    Checkout, CheckoutRequest, Isolation, NameTemplate, PoolSettings, TenantEntry, TenantId,
    TenantRegistry, TierPolicy,
};
use switchyard_mongodb::{MongoBackend, MongoBackendConfig};
use switchyard_testkit::{FaultProxy, MongoServer, ServerKind};

/// Writes `message` to the terminal even when the test harness captures
/// output (it captures only the print macros), for skips that must be seen.
pub fn loud(message: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "\n*** {message}");
}

/// Starts (or finds) the server and says which one it is.
pub async fn server() -> MongoServer {
    let server = MongoServer::start()
        .await
        .unwrap_or_else(|e| panic!("no MongoDB server: {e}"));
    eprintln!("running against {}", server.describe());
    server
}

/// A name unique to this test process, valid as a database, collection and
/// name-template part on the stand-in too (ASCII letters, digits, '_').
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A config for `url` with short, test-friendly timeouts.
pub fn config(url: &str, database: &str, max_size: u32) -> MongoBackendConfig {
    MongoBackendConfig::builder("mongo-test", url)
        .database(database)
        .pool(
            PoolSettings::default()
                .with_max_size(max_size)
                .with_acquire_timeout(Duration::from_secs(10)),
        )
        .operation_timeout(Duration::from_secs(20))
        .config()
}

/// A backend for `url` with the shared database `database`.
pub fn backend(url: &str, database: &str, max_size: u32) -> Arc<MongoBackend> {
    Arc::new(MongoBackend::new(config(url, database, max_size)).expect("valid config"))
}

/// Tiers `database`, `prefix` and `row`, with name templates unique to `tag`.
pub fn registry(tag: &str, quota: u32) -> TenantRegistry {
    let template = |t: String| NameTemplate::new(&t).expect("valid template");
    TenantRegistry::new()
        .with_tier(
            "database",
            TierPolicy::new(Isolation::Database)
                .with_name_template(template(format!("{tag}d_{{id}}")))
                .with_max_connections(quota),
        )
        .with_tier(
            "prefix",
            TierPolicy::new(Isolation::Schema)
                .with_name_template(template(format!("{tag}p_{{id}}")))
                .with_max_connections(quota),
        )
        .with_tier(
            "row",
            TierPolicy::new(Isolation::Row).with_max_connections(quota),
        )
}

/// The tier name of an isolation level in [`registry`].
pub fn tier(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::Database => "database",
        Isolation::Schema => "prefix",
        Isolation::Row => "row",
    }
}

/// `registry` with `tenants` assigned round-robin to the three tiers.
pub fn tenants(tag: &str, quota: u32, count: usize) -> (TenantRegistry, Vec<TenantId>) {
    let levels = [Isolation::Database, Isolation::Schema, Isolation::Row];
    let ids: Vec<TenantId> = (0..count)
        .map(|i| TenantId::new(&format!("t{i}")).expect("valid id"))
        .collect();
    let mut reg = registry(tag, quota);
    for (i, id) in ids.iter().enumerate() {
        reg = reg.with_tenant(id.clone(), tier(levels[i % 3]));
    }
    reg.validate().expect("tiers exist");
    (reg, ids)
}

/// Checks out a handle for `entry`.
pub async fn checkout(backend: &Arc<MongoBackend>, entry: &TenantEntry) -> Checkout<MongoBackend> {
    Checkout::acquire(
        backend,
        CheckoutRequest::with_timeout(Duration::from_secs(20)).tenant(entry),
    )
    .await
    .unwrap_or_else(|e| panic!("checkout for {}: {e}", entry.scope().tenant()))
}

/// A plain driver client, outside switchyard, to look at what is stored.
pub async fn raw_client(url: &str) -> mongodb::Client {
    let mut options = mongodb::options::ClientOptions::parse(url)
        .await
        .expect("url parses");
    options.server_selection_timeout = Some(Duration::from_secs(10));
    mongodb::Client::with_options(options).expect("client")
}

/// The server's `hello` reply, asked with a plain client.
pub async fn hello(url: &str) -> Document {
    raw_client(url)
        .await
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .expect("hello")
}

/// Where tenant `entry`'s collection `name` really lives.
pub fn real_namespace(shared: &str, entry: &TenantEntry, name: &str) -> (String, String) {
    let scope = entry.scope();
    match scope.isolation() {
        Isolation::Database => (scope.target().to_owned(), name.to_owned()),
        Isolation::Schema => (shared.to_owned(), format!("{}__{name}", scope.target())),
        Isolation::Row => (shared.to_owned(), name.to_owned()),
    }
}

/// Every document in `db.coll`, read with the raw client.
pub async fn all_docs(client: &mongodb::Client, db: &str, coll: &str) -> Vec<Document> {
    use futures_util::TryStreamExt;
    client
        .database(db)
        .collection::<Document>(coll)
        .find(doc! {})
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("collect")
}

/// Drops the databases a test created on a real server (a stand-in is thrown
/// away with its process).
pub async fn cleanup(server: &MongoServer, url: &str, databases: impl IntoIterator<Item = String>) {
    if server.kind() != ServerKind::Real {
        return;
    }
    let client = raw_client(url).await;
    for db in databases {
        let _ = client.database(&db).drop().await;
    }
}

/// For a real server: `url` rewritten to reach its first host through
/// `127.0.0.1:port` (a fault proxy), as a direct connection.
pub fn via_proxy(url: &str, port: u16) -> String {
    direct_url(url, &format!("127.0.0.1:{port}"))
}

/// `url` rewritten to reach only `host` (`name:port`), as a direct connection,
/// keeping credentials, database and options.
pub fn direct_url(url: &str, host: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("url has a scheme");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    let mut params: Vec<&str> = query
        .map(|q| {
            q.split('&')
                .filter(|p| {
                    !p.is_empty() && !p.to_ascii_lowercase().starts_with("directconnection=")
                })
                .collect()
        })
        .unwrap_or_default();
    params.push("directConnection=true");
    let scheme = if scheme == "mongodb+srv" {
        "mongodb"
    } else {
        scheme
    };
    format!("{scheme}://{userinfo}{host}{path}?{}", params.join("&"))
}

/// A fault proxy in front of `server` (whose URL is `url`), and the URL
/// that reaches the server through it.
pub async fn proxied(server: &MongoServer, url: &str) -> (FaultProxy, String) {
    let upstream = match server.addr() {
        Some(addr) => addr,
        None => first_host(url).await,
    };
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let url = match server.kind() {
        ServerKind::Real => via_proxy(url, proxy.port()),
        ServerKind::StandIn { .. } => format!("mongodb://127.0.0.1:{}", proxy.port()),
    };
    (proxy, url)
}

/// The first host of `url`, resolved.
pub async fn first_host(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let first = hosts.split(',').next().expect("a host");
    let first = if first.contains(':') {
        first.to_owned()
    } else {
        format!("{first}:27017")
    };
    tokio::net::lookup_host(first)
        .await
        .expect("host resolves")
        .next()
        .expect("an address")
}
