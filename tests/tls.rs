#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The router over TLS, against real servers the test bed starts with a
//! throwaway CA: PostgreSQL (`ssl = on`) and Redis (`--tls-port`), a primary
//! and a replica each.
//!
//! - checkouts, tenant scoping and failover work over TLS, and the session
//!   really is encrypted (PostgreSQL's `pg_stat_ssl` says so);
//! - a server certificate from an unknown CA, or for another host name, is
//!   refused with [`Error::Tls`] naming the endpoint, on the first attempt:
//!   not retried on the other endpoint and not counted against its health;
//! - client certificates are presented where the server demands them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sqlx::{Connection, PgConnection};
use switchyard_core::{
    Error, Intent, Isolation, PoolSettings, Role, TenantId, TenantRegistry, TierPolicy, TlsFailure,
    TlsSettings,
};
use switchyard_postgres::{PgBackend, PgBackendConfig};
use switchyard_redis::{redis, Command, RedisBackend, RedisBackendConfig};
use switchyard_router::{Cluster, ClusterConfig, EndpointConfig, Health};
use switchyard_testkit::{poll_until, PgCluster, RedisCluster, TestCa, CLIENT_NAME};

const WAIT: Duration = Duration::from_secs(20);

fn acme() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn schema_tenants() -> TenantRegistry {
    TenantRegistry::new()
        .with_tier("schema", TierPolicy::new(Isolation::Schema))
        .with_tenant(acme(), "schema")
}

/// A cluster of `backends`, the first the primary; probes at the router's
/// default pace unless `fast`.
fn build<B: switchyard_core::Backend>(name: &str, backends: &[Arc<B>], fast: bool) -> Cluster<B> {
    let config = if fast {
        fast_config(Duration::from_secs(2))
    } else {
        ClusterConfig::default()
    };
    let mut builder = Cluster::builder(name)
        .config(config)
        .tenants(schema_tenants());
    for (i, b) in backends.iter().enumerate() {
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        builder = builder.endpoint(b.clone(), EndpointConfig::new(role));
    }
    builder.build().unwrap()
}

// ---------------------------------------------------------------------------
// PostgreSQL

async fn pg_exec(url: &str, sql: &'static str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    let _ = conn.close().await;
}

/// A TLS PostgreSQL primary + standby with `tenant_acme.items` and the
/// certificate-only role on both.
async fn pg_start(ca: &TestCa) -> PgCluster {
    let pg = PgCluster::start_tls(1, ca).await.unwrap();
    pg_exec(
        pg.primary().url(),
        "CREATE SCHEMA tenant_acme; CREATE TABLE tenant_acme.items (v int);
         INSERT INTO tenant_acme.items VALUES (7);
         CREATE ROLE switchyard LOGIN SUPERUSER",
    )
    .await;
    pg.wait_replayed(&pg.standbys()[0], WAIT).await.unwrap();
    pg
}

fn pg_backends(pg: &PgCluster, user: &str, tls: &TlsSettings) -> Vec<Arc<Counted<PgBackend>>> {
    pg.nodes()
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let mut config = PgBackendConfig::new(format!("pg-{i}"), node.tls_url(user).unwrap());
            config.tls = Some(tls.clone());
            config.pool = PoolSettings::default()
                .with_max_size(4)
                .with_acquire_timeout(Duration::from_secs(5));
            Counted::new(PgBackend::new(config).unwrap())
        })
        .collect()
}

/// `(ssl, version)` of the session `conn` is on, from the server's side.
async fn pg_ssl(conn: &mut PgConnection) -> (bool, String) {
    sqlx::query_as(
        "SELECT ssl, coalesce(version, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_checkout_scoping_and_failover_over_tls() {
    let ca = TestCa::generate().unwrap();
    let pg = pg_start(&ca).await;
    let tls = TlsSettings::with_ca_file(ca.ca_file());
    let backends = pg_backends(&pg, "postgres", &tls);
    let cluster = build("pg-tls", &backends, true);

    let mut conn = cluster.checkout(Intent::Write, None).await.unwrap();
    assert_eq!(conn.endpoint().as_str(), "pg-0");
    let (ssl, version) = pg_ssl(&mut conn).await;
    assert!(ssl, "the primary session is not encrypted");
    assert!(version.starts_with("TLSv1."), "{version}");
    drop(conn);

    // Scoped read on the standby: search_path set over the TLS session.
    let mut conn = cluster.checkout(Intent::Read, Some(&acme())).await.unwrap();
    assert_eq!(conn.endpoint().as_str(), "pg-1");
    let v: i32 = sqlx::query_scalar("SELECT v FROM items")
        .fetch_one(&mut **conn)
        .await
        .unwrap();
    assert_eq!(v, 7);
    assert!(
        pg_ssl(&mut conn).await.0,
        "the standby session is not encrypted"
    );
    drop(conn);

    // Failover: the primary dies, the standby is promoted, writes follow it.
    pg.primary().kill().await.unwrap();
    pg.standbys()[0].promote().await.unwrap();
    let endpoint = poll_until("writes to move to the promoted standby", WAIT, || async {
        let mut conn = cluster.checkout(Intent::Write, None).await.ok()?;
        sqlx::query("INSERT INTO tenant_acme.items VALUES (8)")
            .execute(&mut **conn)
            .await
            .ok()?;
        let ssl = pg_ssl(&mut conn).await.0;
        Some((conn.endpoint().to_string(), ssl))
    })
    .await
    .unwrap();
    assert_eq!(endpoint, ("pg-1".to_owned(), true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_untrusted_or_misnamed_servers_at_once() {
    let ca = TestCa::generate().unwrap();
    let pg = pg_start(&ca).await;

    // A trust store without the server's CA: a configuration error, typed,
    // naming the endpoint, tried once (reads may retry, this one must not).
    let untrusted = TlsSettings::with_ca_file(ca.other_ca_file());
    let backends = pg_backends(&pg, "postgres", &untrusted);
    let cluster = build("pg-untrusted", &backends, false);
    let err = cluster.checkout(Intent::Read, None).await.unwrap_err();
    match &err {
        Error::Tls {
            endpoint, failure, ..
        } => {
            assert_eq!(endpoint.as_str(), "pg-1");
            assert_eq!(*failure, TlsFailure::UnknownIssuer);
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(err.to_string().contains("pg-1"), "{err}");
    assert!(!err.is_retryable() && !err.is_endpoint_failure());
    let attempts: usize = backends.iter().map(|b| b.attempts()).sum();
    assert_eq!(attempts, 1, "a refused certificate was retried");
    let status = cluster.status();
    assert_eq!(status.endpoint("pg-1").unwrap().health, Health::Up);

    // The right CA, but the URL dials 127.0.0.1 and the certificate names
    // only localhost.
    let mut config = PgBackendConfig::new("pg-ip", pg.primary().url());
    config.tls = Some(TlsSettings::with_ca_file(ca.ca_file()));
    let backend = Counted::new(PgBackend::new(config).unwrap());
    let single = cluster_of_one("pg-misnamed", backend);
    match single.checkout(Intent::Write, None).await.unwrap_err() {
        Error::Tls { failure, .. } => assert_eq!(failure, TlsFailure::HostnameMismatch),
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // A role the server admits only with a client certificate.
    let trusted = TlsSettings::with_ca_file(ca.ca_file());
    let with_cert = trusted
        .clone()
        .client_cert(ca.client_cert_file(), ca.client_key_file());
    let backends = pg_backends(&pg, CLIENT_NAME, &with_cert);
    let cluster = build("pg-cert", &backends, false);
    let mut conn = cluster.checkout(Intent::Write, None).await.unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut **conn)
        .await
        .unwrap();
    assert_eq!(user, CLIENT_NAME);
    drop(conn);
    let backends = pg_backends(&pg, CLIENT_NAME, &trusted);
    let cluster = build("pg-no-cert", &backends, false);
    let err = cluster.checkout(Intent::Write, None).await.unwrap_err();
    assert!(
        err.to_string().contains("pg-0") && !matches!(err, Error::Tls { .. }),
        "{err:?}"
    );
}

fn cluster_of_one<B: switchyard_core::Backend>(name: &str, backend: Arc<B>) -> Cluster<B> {
    Cluster::builder(name)
        .endpoint(backend, EndpointConfig::new(Role::Primary))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Redis

fn redis_backends(rc: &RedisCluster, tls: &TlsSettings) -> Vec<Arc<Counted<RedisBackend>>> {
    rc.nodes()
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let mut config = RedisBackendConfig::new(format!("redis-{i}"), node.tls_url().unwrap());
            config.tls = Some(tls.clone());
            config.pool = PoolSettings::default().with_max_size(4);
            Counted::new(RedisBackend::new(config).unwrap())
        })
        .collect()
}

fn client_tls(ca: &TestCa) -> TlsSettings {
    TlsSettings::with_ca_file(ca.ca_file()).client_cert(ca.client_cert_file(), ca.client_key_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_checkout_scoping_and_failover_over_tls() {
    let ca = TestCa::generate().unwrap();
    let rc = RedisCluster::start_tls(1, &ca).await.unwrap();
    let backends = redis_backends(&rc, &client_tls(&ca));
    let cluster = build("redis-tls", &backends, true);

    let mut conn = cluster
        .checkout(Intent::Write, Some(&acme()))
        .await
        .unwrap();
    assert_eq!(conn.endpoint().as_str(), "redis-0");
    let () = conn
        .query(&Command::new("SET").arg("k").arg("v1"))
        .await
        .unwrap();
    drop(conn);

    // The key landed under the tenant's prefix, and reached the replica.
    let plain = redis::Client::open(rc.replicas()[0].url()).unwrap();
    let mut plain = plain.get_multiplexed_async_connection().await.unwrap();
    poll_until("the key on the replica", WAIT, || {
        let mut plain = plain.clone();
        async move {
            let v: Option<String> = redis::cmd("GET")
                .arg("tenant_acme:k")
                .query_async(&mut plain)
                .await
                .ok()?;
            v
        }
    })
    .await
    .unwrap();
    let mut conn = cluster.checkout(Intent::Read, Some(&acme())).await.unwrap();
    assert_eq!(
        conn.endpoint().as_str(),
        "redis-1",
        "{:#?}",
        cluster.status()
    );
    let v: String = conn.query(&Command::new("GET").arg("k")).await.unwrap();
    assert_eq!(v, "v1");
    drop(conn);

    // The TLS listener really is the one serving: the server counts the
    // connections it accepted over TLS... via its client list, whose `laddr`
    // is the TLS port for ours.
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut plain)
        .await
        .unwrap();
    let tls_port = format!(":{}", rc.replicas()[0].tls_port().unwrap());
    assert!(
        clients
            .lines()
            .any(|l| l.contains(&format!("laddr=127.0.0.1{tls_port}"))),
        "no client on the TLS port: {clients}"
    );

    rc.master().kill().await.unwrap();
    rc.replicas()[0].promote().await.unwrap();
    let endpoint = poll_until("writes to move to the promoted replica", WAIT, || async {
        let mut conn = cluster.checkout(Intent::Write, Some(&acme())).await.ok()?;
        let () = conn
            .query(&Command::new("SET").arg("k").arg("v2"))
            .await
            .ok()?;
        Some(conn.endpoint().to_string())
    })
    .await
    .unwrap();
    assert_eq!(endpoint, "redis-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refuses_untrusted_or_misnamed_servers_at_once() {
    let ca = TestCa::generate().unwrap();
    let rc = RedisCluster::start_tls(1, &ca).await.unwrap();

    let untrusted = TlsSettings::with_ca_file(ca.other_ca_file())
        .client_cert(ca.client_cert_file(), ca.client_key_file());
    let backends = redis_backends(&rc, &untrusted);
    let cluster = build("redis-untrusted", &backends, false);
    let err = cluster.checkout(Intent::Read, None).await.unwrap_err();
    match &err {
        Error::Tls {
            endpoint, failure, ..
        } => {
            assert_eq!(endpoint.as_str(), "redis-1");
            assert_eq!(*failure, TlsFailure::UnknownIssuer);
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    let attempts: usize = backends.iter().map(|b| b.attempts()).sum();
    assert_eq!(attempts, 1, "a refused certificate was retried");
    assert_eq!(
        cluster.status().endpoint("redis-1").unwrap().health,
        Health::Up
    );

    // Right CA, wrong host name.
    let port = rc.master().tls_port().unwrap();
    let mut config = RedisBackendConfig::new("redis-ip", format!("rediss://127.0.0.1:{port}"));
    config.tls = Some(client_tls(&ca));
    let single = cluster_of_one(
        "redis-misnamed",
        Counted::new(RedisBackend::new(config).unwrap()),
    );
    match single.checkout(Intent::Write, None).await.unwrap_err() {
        Error::Tls { failure, .. } => assert_eq!(failure, TlsFailure::HostnameMismatch),
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // The server demands a client certificate: without one, no session.
    let backends = redis_backends(&rc, &TlsSettings::with_ca_file(ca.ca_file()));
    let cluster = build("redis-no-cert", &backends, false);
    let refused = async {
        let mut conn = cluster.checkout(Intent::Write, None).await?;
        conn.query::<String>(&Command::new("PING")).await
    };
    let err = refused.await.unwrap_err();
    assert!(err.to_string().contains("redis-0"), "{err:?}");
}
