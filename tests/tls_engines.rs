#![allow(clippy::unwrap_used, clippy::expect_used)]
//! ClickHouse, MongoDB and Elasticsearch over TLS, with a throwaway CA from
//! the test bed.
//!
//! - ClickHouse 18.16 itself serves HTTPS (`https_port` with an `<openSSL>`
//!   server block): checkouts and database scoping over TLS, a server from an
//!   unknown CA or under another host name refused with [`Error::Tls`] naming
//!   the endpoint, on the first attempt, and a rotated CA file reaching a
//!   running cluster through the config crate.
//! - MongoDB and Elasticsearch have only plaintext stand-ins here (or the
//!   real server from `SWITCHYARD_MONGODB_URL` / `SWITCHYARD_ELASTICSEARCH_URL`),
//!   so the test bed puts a TLS listener in front ([`TlsFront`]): the drivers'
//!   TLS (trust, host name, client certificate) runs against a real rustls
//!   server; what is behind it speaks plaintext. Each test prints what it ran
//!   against.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchyard_clickhouse::{ch_error, ChBackend, ChBackendConfig};
use switchyard_config::{AnyCluster, ConfigSource, LiveConfig};
use switchyard_core::{
    Backend, Error, Intent, Isolation, PoolSettings, Role, TenantId, TenantRegistry, TierPolicy,
    TlsFailure, TlsSettings,
};
use switchyard_elasticsearch::{EsBackend, EsBackendConfig};
use switchyard_mongodb::mongodb::bson::doc;
use switchyard_mongodb::{MongoBackend, MongoBackendConfig};
use switchyard_router::{Cluster, ClusterConfig, EndpointConfig};
use switchyard_testkit::{
    poll_until, ClickHouse, ElasticServer, MongoServer, TestCa, TlsFront, SERVER_NAME,
};

const WAIT: Duration = Duration::from_secs(20);

fn acme() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn database_tenants() -> TenantRegistry {
    TenantRegistry::new()
        .with_tier("db", TierPolicy::new(Isolation::Database))
        .with_tenant(acme(), "db")
}

/// A cluster of `backends` (all writable, the first the primary).
fn build<B: Backend>(name: &str, backends: &[Arc<B>]) -> Cluster<B> {
    let mut builder = Cluster::builder(name)
        .config(ClusterConfig::default())
        .tenants(database_tenants());
    for (i, b) in backends.iter().enumerate() {
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        builder = builder.endpoint(b.clone(), EndpointConfig::new(role));
    }
    builder.build().unwrap()
}

/// Asserts `err` is a TLS refusal of `failure` naming `endpoint`, neither
/// retryable nor counted against the endpoint.
fn assert_refused(err: &Error, endpoint: &str, failure: TlsFailure) {
    match err {
        Error::Tls {
            endpoint: e,
            failure: f,
            ..
        } => {
            assert_eq!(e.as_str(), endpoint, "{err}");
            assert_eq!(*f, failure, "{err}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(err.to_string().contains(endpoint), "{err}");
    assert!(!err.is_retryable() && !err.is_endpoint_failure());
}

/// A cluster of `backends`, two endpoints on one server whose certificate
/// they cannot verify: a read checkout for `tenant` is refused as from an
/// unknown issuer on its first attempt, never retried on the other.
async fn refused_at_once<B: Backend>(
    name: &str,
    backends: &[Arc<Counted<B>>],
    tenant: Option<&TenantId>,
) -> Cluster<Counted<B>> {
    let cluster = build(name, backends);
    let err = cluster.checkout(Intent::Read, tenant).await.unwrap_err();
    let endpoint = err.endpoint().unwrap().to_string();
    assert_refused(&err, &endpoint, TlsFailure::UnknownIssuer);
    let attempts: usize = backends.iter().map(|b| b.attempts()).sum();
    assert_eq!(attempts, 1, "a refused certificate was retried");
    cluster
}

/// Every session `front` accepted (a probe's and a checkout's at least)
/// presented the client certificate.
fn assert_client_cert_on_every_session(front: &TlsFront) {
    assert!(front.handshakes() >= 2, "{}", front.handshakes());
    assert_eq!(
        front.with_client_cert(),
        front.handshakes(),
        "a session without the client certificate"
    );
}

// ---------------------------------------------------------------------------
// ClickHouse

async fn ch_start(ca: &TestCa) -> ClickHouse {
    let ch = ClickHouse::start_tls(ca).await.unwrap();
    for sql in [
        "CREATE DATABASE tenant_acme",
        "CREATE TABLE tenant_acme.items (v UInt32) ENGINE = Memory",
        "INSERT INTO tenant_acme.items VALUES (7)",
    ] {
        ch.query(sql).await.unwrap();
    }
    ch
}

fn ch_backend(name: &str, url: &str, tls: TlsSettings) -> Arc<Counted<ChBackend>> {
    let config = ChBackendConfig::builder(name, url)
        .pool(PoolSettings::default().with_max_size(4))
        .tls(tls)
        .config();
    Counted::new(ChBackend::new(config).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_checkout_and_scoping_over_tls() {
    let ca = TestCa::generate().unwrap();
    let ch = ch_start(&ca).await;
    let url = ch.https_url().unwrap();
    let backends = [ch_backend(
        "ch-0",
        &url,
        TlsSettings::with_ca_file(ca.ca_file()),
    )];
    let probe = backends[0].probe(Duration::from_secs(5)).await.unwrap();
    eprintln!("clickhouse {:?} over {url}", probe.version);
    let cluster = build("ch-tls", &backends);

    let conn = cluster.checkout(Intent::Write, None).await.unwrap();
    let one: u8 = conn
        .client()
        .unwrap()
        .query("SELECT 1")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(one, 1);
    drop(conn);

    // Database scoping over TLS: the handle's database is the tenant's.
    let conn = cluster.checkout(Intent::Read, Some(&acme())).await.unwrap();
    assert_eq!(conn.database(), Some("tenant_acme"));
    let v: u32 = conn
        .client()
        .unwrap()
        .query("SELECT v FROM items")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(v, 7);
    drop(conn);

    // The port spoke TLS: plain HTTP to it gets no ClickHouse answer.
    let plain = ChBackendConfig::new("ch-plain", url.replace("https://", "http://"));
    let plain = ChBackend::new(plain).unwrap();
    assert!(plain.probe(Duration::from_secs(5)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_refuses_untrusted_or_misnamed_servers_at_once() {
    let ca = TestCa::generate().unwrap();
    let ch = ch_start(&ca).await;
    let url = ch.https_url().unwrap();

    // A trust store without the server's CA: two endpoints on the server,
    // a scoped read (its database check is the first request) tried once.
    let untrusted = TlsSettings::with_ca_file(ca.other_ca_file());
    let backends = [
        ch_backend("ch-0", &url, untrusted.clone()),
        ch_backend("ch-1", &url, untrusted),
    ];
    let cluster = refused_at_once("ch-untrusted", &backends, Some(&acme())).await;

    // Unscoped, the first query fails the same way; so does the probe.
    let conn = cluster.checkout(Intent::Write, None).await.unwrap();
    let raw = conn
        .client()
        .unwrap()
        .query("SELECT 1")
        .fetch_one::<u8>()
        .await
        .unwrap_err();
    assert_refused(
        &ch_error(conn.endpoint(), None, raw),
        "ch-0",
        TlsFailure::UnknownIssuer,
    );
    drop(conn);
    let probe = backends[0].probe(Duration::from_secs(5)).await.unwrap_err();
    assert_refused(&probe, "ch-0", TlsFailure::UnknownIssuer);

    // The right CA, but the URL dials 127.0.0.1 and the certificate names
    // only localhost.
    let by_ip = url.replace(SERVER_NAME, "127.0.0.1");
    let backend = ch_backend("ch-ip", &by_ip, TlsSettings::with_ca_file(ca.ca_file()));
    let err = backend.probe(Duration::from_secs(5)).await.unwrap_err();
    assert_refused(&err, "ch-ip", TlsFailure::HostnameMismatch);
}

fn ch_yaml(url: &str, ca_file: &Path) -> String {
    format!(
        "clusters:\n  main:\n    engine: clickhouse\n    tls:\n      ca_file: {}\n    endpoints:\n      - {{ name: ch-1, url: \"{url}\", role: primary }}\n",
        ca_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_picks_up_a_rotated_ca_file_without_a_restart() {
    let ca = TestCa::generate().unwrap();
    let ch = ClickHouse::start_tls(&ca).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trust = dir.path().join("trust.pem");
    // The trust store first holds a CA that did not sign the server.
    std::fs::copy(ca.other_ca_file(), &trust).unwrap();
    let yaml = ch_yaml(&ch.https_url().unwrap(), &trust);
    std::fs::write(dir.path().join("base.yaml"), yaml).unwrap();
    let live = Arc::new(
        LiveConfig::start(ConfigSource::new(dir.path(), "testing").env_prefix("SYTEST_CH_ROT__"))
            .unwrap(),
    );
    let Some(AnyCluster::Clickhouse(cluster)) = live.routers().get("main") else {
        panic!("no clickhouse cluster");
    };
    let select = |cluster: Cluster<ChBackend>| async move {
        let conn = cluster.checkout(Intent::Write, None).await?;
        let query = conn.client()?.query("SELECT 1").fetch_one::<u8>().await;
        query.map_err(|e| ch_error(conn.endpoint(), None, e))
    };
    let err = select(cluster.clone()).await.unwrap_err();
    assert_refused(&err, "ch-1", TlsFailure::UnknownIssuer);

    let mut events = live.subscribe();
    let _watch = live.watch(Duration::from_millis(100));
    // Rotated as rotation tools do, by a rename over the old file: a copy
    // in place can be read half-written (a full run here once saw the first
    // reload rejected), which is the writer's problem, not the one tested.
    let next = dir.path().join("trust.pem.next");
    std::fs::copy(ca.ca_file(), &next).unwrap();
    std::fs::rename(&next, &trust).unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), events.wait_for(|e| e.accepted > 0))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!((seen.accepted, seen.rejected), (1, 0), "{seen:?}");
    let one = poll_until("a query with the rotated CA", WAIT, || {
        let cluster = cluster.clone();
        async move { select(cluster).await.ok() }
    })
    .await
    .unwrap();
    assert_eq!(one, 1);
}

// ---------------------------------------------------------------------------
// Elasticsearch and MongoDB: stand-ins behind a TLS listener

/// The plaintext address of a test-bed server (the stand-in's, or the real
/// one's from its URL).
fn upstream(addr: Option<SocketAddr>, url: &str) -> SocketAddr {
    addr.unwrap_or_else(|| {
        let url = url::Url::parse(url).unwrap();
        let host = url.host_str().unwrap();
        let port = url.port_or_known_default().unwrap();
        std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .unwrap()
            .next()
            .unwrap()
    })
}

fn client_tls(ca: &TestCa) -> TlsSettings {
    TlsSettings::with_ca_file(ca.ca_file()).client_cert(ca.client_cert_file(), ca.client_key_file())
}

fn es_backend(name: &str, url: &str, tls: TlsSettings) -> Arc<Counted<EsBackend>> {
    let config = EsBackendConfig::builder(name, url)
        .pool(PoolSettings::default().with_max_size(4))
        .request_timeout(Duration::from_secs(10))
        .tls(tls)
        .config();
    Counted::new(EsBackend::new(config).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_over_tls() {
    let ca = TestCa::generate().unwrap();
    let es = ElasticServer::start().await.unwrap();
    let front = TlsFront::start(upstream(es.addr(), es.url()), &ca)
        .await
        .unwrap();
    eprintln!(
        "elasticsearch over TLS: rustls listener at {} in front of {}",
        front.host_port(),
        es.describe()
    );
    let url = format!("https://{}", front.host_port());
    let backends = [es_backend("es-0", &url, client_tls(&ca))];
    backends[0].probe(Duration::from_secs(10)).await.unwrap();
    let cluster = build("es-tls", &backends);
    let conn = cluster.checkout(Intent::Write, None).await.unwrap();
    let info = conn.client().unwrap().info().send().await.unwrap();
    assert_eq!(info.status_code().as_u16(), 200);
    drop(conn);
    assert_client_cert_on_every_session(&front);

    // Unknown CA: the probe and the first request are refused, typed, once.
    let untrusted = TlsSettings::with_ca_file(ca.other_ca_file());
    let backends = [
        es_backend("es-0", &url, untrusted.clone()),
        es_backend("es-1", &url, untrusted),
    ];
    let err = backends[0]
        .probe(Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_refused(&err, "es-0", TlsFailure::UnknownIssuer);
    // A scoped checkout asks whether the tenant's index exists: refused,
    // on the first attempt.
    let cluster = refused_at_once("es-untrusted", &backends, Some(&acme())).await;
    // Unscoped, the first request is refused the same way.
    let conn = cluster.checkout(Intent::Write, None).await.unwrap();
    let raw = conn.client().unwrap().info().send().await.unwrap_err();
    let err = switchyard_elasticsearch::es_error(conn.endpoint(), None, raw);
    assert_refused(&err, "es-0", TlsFailure::UnknownIssuer);
    drop(conn);

    // The right CA, the wrong name.
    let by_ip = format!("https://{}", front.addr());
    let backend = es_backend("es-ip", &by_ip, client_tls(&ca));
    let err = backend.probe(Duration::from_secs(10)).await.unwrap_err();
    assert_refused(&err, "es-ip", TlsFailure::HostnameMismatch);
}

/// The client certificate and key in one PEM file, as the MongoDB driver
/// reads them.
fn combined_identity(ca: &TestCa, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("client-combined.pem");
    let mut pem = std::fs::read(ca.client_cert_file()).unwrap();
    pem.extend(std::fs::read(ca.client_key_file()).unwrap());
    std::fs::write(&path, pem).unwrap();
    path
}

fn mongo_backend(name: &str, url: &str, tls: TlsSettings) -> Arc<Counted<MongoBackend>> {
    let config = MongoBackendConfig::builder(name, url)
        .pool(
            PoolSettings::default()
                .with_max_size(4)
                .with_acquire_timeout(Duration::from_secs(10)),
        )
        .tls(tls)
        .config();
    Counted::new(MongoBackend::new(config).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_over_tls() {
    let ca = TestCa::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let identity = combined_identity(&ca, dir.path());
    let mongo = MongoServer::start().await.unwrap();
    let front = TlsFront::start(upstream(mongo.addr(), mongo.url()), &ca)
        .await
        .unwrap();
    eprintln!(
        "mongodb over TLS: rustls listener at {} in front of {}",
        front.host_port(),
        mongo.describe()
    );
    let url = format!("mongodb://{}/?tls=true", front.host_port());
    let trusted = TlsSettings::with_ca_file(ca.ca_file()).client_cert(&identity, &identity);
    let backends = [mongo_backend("mongo-0", &url, trusted)];
    backends[0].probe(Duration::from_secs(10)).await.unwrap();
    let cluster = build("mongo-tls", &backends);
    let conn = cluster.checkout(Intent::Write, None).await.unwrap();
    let items = conn.collection("tls_items").unwrap();
    items.insert_one(doc! { "v": 7 }, None).await.unwrap();
    let found = items.find_one(doc! { "v": 7 }, None).await.unwrap();
    assert_eq!(found.unwrap().get_i32("v").unwrap(), 7);
    drop(conn);
    assert_client_cert_on_every_session(&front);

    // Unknown CA: refused at checkout, typed, on the first attempt (the
    // driver alone would say only "no server selected" after its timeout).
    let untrusted = TlsSettings::with_ca_file(ca.other_ca_file());
    let backends = [
        mongo_backend("mongo-0", &url, untrusted.clone()),
        mongo_backend("mongo-1", &url, untrusted),
    ];
    refused_at_once("mongo-untrusted", &backends, None).await;
    let err = backends[0]
        .probe(Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_refused(&err, "mongo-0", TlsFailure::UnknownIssuer);

    // The right CA, the wrong name.
    let by_ip = format!("mongodb://{}/?tls=true", front.addr());
    let backend = mongo_backend("mongo-ip", &by_ip, TlsSettings::with_ca_file(ca.ca_file()));
    let single = build("mongo-ip", &[backend]);
    let err = single.checkout(Intent::Write, None).await.unwrap_err();
    assert_refused(&err, "mongo-ip", TlsFailure::HostnameMismatch);
}
