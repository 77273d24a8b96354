#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Probes, faults (kill, pause, resume, restart), the in-flight bound, quotas
//! and shutdown.
//!
//! Against the stand-in, faults are real: the test bed SIGKILLs or SIGSTOPs the
//! server. A real server (`SWITCHYARD_MONGODB_URL`) cannot be signalled by the
//! test bed, so there the same faults are made by a fault proxy in front of it
//! (refuse and reset for a kill, blackhole for a pause), and the tests say so.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::doc;
use switchyard_core::{
    Backend, BackendErrorKind, Checkout, CheckoutRequest, Error, Role, TenantId,
};
use switchyard_mongodb::{mongo_cause, MongoBackend, MongoBackendConfig, MongoError};
use switchyard_testkit::{wait_until, FaultProxy, MongoServer, ServerKind};

use common::*;

/// A server plus, for a real one, the proxy that stands in for signals.
struct Target {
    server: MongoServer,
    proxy: Option<FaultProxy>,
    url: String,
}

impl Target {
    async fn start() -> Self {
        let server = server().await;
        let (proxy, url) = match server.kind() {
            ServerKind::StandIn { .. } => (None, server.url().to_owned()),
            ServerKind::Real => {
                let (proxy, url) = proxied(&server, server.url()).await;
                eprintln!(
                    "faults on the real server are emulated by a fault proxy at {}",
                    proxy.addr()
                );
                (Some(proxy), url)
            }
        };
        Self { server, proxy, url }
    }

    async fn kill(&self) {
        match &self.proxy {
            None => self.server.kill().await.unwrap(),
            Some(p) => {
                p.refuse(true);
                p.reset_all();
            }
        }
    }

    async fn restart(&self) {
        match &self.proxy {
            None => self.server.restart().await.unwrap(),
            Some(p) => p.heal(),
        }
    }

    async fn pause(&self) {
        match &self.proxy {
            None => self.server.pause().await.unwrap(),
            Some(p) => p.stall_all(true),
        }
    }

    async fn resume(&self) {
        match &self.proxy {
            None => self.server.resume().await.unwrap(),
            Some(p) => p.heal(),
        }
    }
}

fn fast_config(url: &str, database: &str) -> MongoBackendConfig {
    let mut config = config(url, database, 4);
    config.server_selection_timeout = Some(Duration::from_secs(1));
    config.connect_timeout = Some(Duration::from_secs(1));
    config.operation_timeout = Duration::from_secs(2);
    config.heartbeat_interval = Duration::from_millis(500);
    config
}

async fn healthy(backend: &MongoBackend) -> bool {
    backend.probe(Duration::from_secs(2)).await.is_ok()
}

#[tokio::test]
async fn building_a_backend_does_no_io_even_for_an_unreachable_endpoint() {
    let server = server().await;
    let (proxy, url) = proxied(&server, server.url()).await;
    let backend = MongoBackend::new(fast_config(&url, "noio")).unwrap();
    assert_eq!(backend.stats().size, 0);
    // Give anything that might connect in the background a chance to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.accepted(), 0, "construction opened a connection");
    drop(backend);

    // Nothing listens on port 1: building still succeeds, the probe says why.
    let dead = MongoBackend::new(fast_config("mongodb://127.0.0.1:1", "noio")).unwrap();
    let started = Instant::now();
    let err = dead.probe(Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(err.backend_kind(), Some(BackendErrorKind::Connect), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn probes_report_role_and_version() {
    let server = server().await;
    let backend = MongoBackend::new(fast_config(server.url(), "probe")).unwrap();
    let probe = backend.probe(Duration::from_secs(2)).await.unwrap();
    eprintln!("{probe:?}");
    assert!(probe.rtt < Duration::from_secs(2));
    assert!(
        probe.version.as_deref().is_some_and(|v| !v.is_empty()),
        "{probe:?}"
    );
    assert_eq!(probe.lag_bytes, None);
    match server.kind() {
        ServerKind::StandIn { .. } => {
            // A standalone server: writable, no replication, no lag.
            assert_eq!(probe.role, Role::Primary);
            assert_eq!(probe.lag, None);
            assert_eq!(probe.version.as_deref(), Some("7.0.0"));
        }
        ServerKind::Real => assert!(matches!(probe.role, Role::Primary | Role::Replica)),
    }
    // Probes do not use (or need) checkout capacity.
    let _held: Vec<_> = futures_util::future::join_all((0..4).map(|_| {
        let b = &backend;
        async move {
            b.acquire(None, tokio::time::Instant::now() + Duration::from_secs(1))
                .await
                .unwrap()
        }
    }))
    .await;
    assert!(backend.probe(Duration::from_secs(2)).await.is_ok());
}

#[tokio::test]
async fn a_killed_server_fails_probes_with_connect_and_recovers_after_restart() {
    let target = Target::start().await;
    let tag = unique("kill");
    let backend = Arc::new(MongoBackend::new(fast_config(&target.url, &tag)).unwrap());
    let tenants = registry(&tag, 4).with_default_tier("row");
    let acme = tenants.resolve(&TenantId::new("acme").unwrap()).unwrap();
    {
        let conn = checkout(&backend, &acme).await;
        conn.collection("items")
            .unwrap()
            .insert_one(doc! { "n": 1 }, None)
            .await
            .unwrap();
    }
    assert!(healthy(&backend).await);

    target.kill().await;
    for attempt in 0..3 {
        let started = Instant::now();
        let err = backend.probe(Duration::from_secs(3)).await.unwrap_err();
        assert_eq!(
            err.backend_kind(),
            Some(BackendErrorKind::Connect),
            "probe {attempt} after kill: {err}"
        );
        assert!(err.is_endpoint_failure() && err.is_retryable());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    // Checkouts still hand out handles (nothing is sent at checkout), and the
    // first operation fails as an endpoint failure the router can learn from.
    let mut conn = checkout(&backend, &acme).await;
    let started = Instant::now();
    let result = conn.collection("items").unwrap().find(doc! {}, None).await;
    let err = result.unwrap_err();
    assert!(err.is_endpoint_failure(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    conn.report_failure(&err);
    drop(conn);
    assert_eq!(backend.mongo_stats().handles_discarded, 1);

    target.restart().await;
    wait_until(Duration::from_secs(30), || healthy(&backend))
        .await
        .unwrap();
    let probe = backend.probe(Duration::from_secs(2)).await.unwrap();
    assert!(probe.role.is_writable() || probe.role == Role::Replica);
    // Operations work again (a restarted stand-in starts empty).
    let conn = checkout(&backend, &acme).await;
    let items = conn.collection("items").unwrap();
    wait_until(Duration::from_secs(10), || async {
        items.insert_one(doc! { "n": 2 }, None).await.is_ok()
    })
    .await
    .unwrap();
    assert!(!items.find(doc! { "n": 2 }, None).await.unwrap().is_empty());
    drop(items);
    drop(conn);
    cleanup(&target.server, target.server.url(), [tag]).await;
}

#[tokio::test]
async fn a_paused_server_times_out_within_the_probe_timeout_and_recovers() {
    let target = Target::start().await;
    let tag = unique("pause");
    let backend = Arc::new(MongoBackend::new(fast_config(&target.url, &tag)).unwrap());
    let tenants = registry(&tag, 4).with_default_tier("row");
    let acme = tenants.resolve(&TenantId::new("acme").unwrap()).unwrap();
    assert!(healthy(&backend).await);

    target.pause().await;
    let timeout = Duration::from_millis(500);
    for attempt in 0..3 {
        let started = Instant::now();
        let err = backend.probe(timeout).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err, Error::ProbeTimeout { .. }),
            "probe {attempt} while paused: {err}"
        );
        assert!(err.is_endpoint_failure());
        assert!(
            took >= timeout && took < timeout + Duration::from_millis(500),
            "{took:?}"
        );
    }
    // An operation on the hung server ends at the operation timeout.
    let conn = checkout(&backend, &acme).await;
    let started = Instant::now();
    let err = conn
        .collection("items")
        .unwrap()
        .insert_one(doc! { "n": 1 }, None)
        .await
        .unwrap_err();
    assert!(
        matches!(mongo_cause(&err), Some(MongoError::OperationTimeout { .. }))
            || err.is_endpoint_failure(),
        "{err}"
    );
    assert!(err.is_endpoint_failure(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(conn);

    target.resume().await;
    wait_until(Duration::from_secs(30), || healthy(&backend))
        .await
        .unwrap();
    let conn = checkout(&backend, &acme).await;
    let items = conn.collection("items").unwrap();
    wait_until(Duration::from_secs(10), || async {
        items.insert_one(doc! { "n": 2 }, None).await.is_ok()
    })
    .await
    .unwrap();
    drop(items);
    drop(conn);
    cleanup(&target.server, target.server.url(), [tag]).await;
}

#[tokio::test]
async fn checkouts_wait_for_the_in_flight_bound_and_quota_then_time_out() {
    let server = server().await;
    let tag = unique("bound");
    let backend = Arc::new(MongoBackend::new(config(server.url(), &tag, 2)).unwrap());
    let tenants = registry(&tag, 1).with_default_tier("row");
    let a = tenants.resolve(&TenantId::new("a").unwrap()).unwrap();
    let b = tenants.resolve(&TenantId::new("b").unwrap()).unwrap();
    let c = tenants.resolve(&TenantId::new("c").unwrap()).unwrap();
    let short = || CheckoutRequest::with_timeout(Duration::from_millis(300));

    let held_a = checkout(&backend, &a).await;
    // a is at its quota of one: it waits on itself, then gives up.
    let err = Checkout::acquire(&backend, short().tenant(&a))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::QuotaExceeded { limit: 1, .. }),
        "{err}"
    );

    let held_b = checkout(&backend, &b).await;
    assert_eq!(backend.mongo_stats().handles_out, 2);
    // Both permits are out: c waits for one until its deadline.
    let started = Instant::now();
    let err = Checkout::acquire(&backend, short().tenant(&c))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(1),
        "{waited:?}"
    );

    // A returned handle is taken by the waiter at once.
    let waiter = tokio::spawn({
        let backend = Arc::clone(&backend);
        let c = Arc::clone(&c);
        async move {
            Checkout::acquire(
                &backend,
                CheckoutRequest::with_timeout(Duration::from_secs(5)).tenant(&c),
            )
            .await
            .map(|conn| conn.tenant().cloned())
        }
    });
    tokio::task::yield_now().await;
    drop(held_a);
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.as_ref().map(TenantId::as_str), Some("c"));
    drop(held_b);
    assert_eq!(backend.mongo_stats().handles_out, 0);

    // Work through a full pool still completes.
    let conn = checkout(&backend, &a).await;
    conn.collection("items")
        .unwrap()
        .insert_one(doc! { "n": 1 }, None)
        .await
        .unwrap();
    drop(conn);
    cleanup(&server, server.url(), [tag]).await;
}

#[tokio::test]
async fn closing_the_backend_refuses_new_checkouts_and_unscoped_handles_keep_raw_access() {
    let server = server().await;
    let tag = unique("close");
    let backend = Arc::new(MongoBackend::new(config(server.url(), &tag, 2)).unwrap());
    {
        let conn = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
        assert_eq!(conn.tenant(), None);
        // Unscoped: the shared database, and the raw client for administration.
        let items = conn.collection("items").unwrap();
        items.insert_one(doc! { "n": 1 }, None).await.unwrap();
        assert_eq!(items.database_name(), tag);
        let names = conn.client().unwrap().list_database_names().await.unwrap();
        assert!(names.contains(&tag), "{names:?}");
    }
    cleanup(&server, server.url(), [tag]).await;
    backend.close().await;
    let err = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Closed), "{err}");
}

/// The helper that points real-server tests at a proxy or one member (not an
/// engine test: no server involved).
#[test]
fn url_rewriting_for_real_servers_keeps_credentials_and_options() {
    assert_eq!(
        via_proxy("mongodb://u:p@h1:27017,h2:27018/app?replicaSet=rs0", 5),
        "mongodb://u:p@127.0.0.1:5/app?replicaSet=rs0&directConnection=true"
    );
    assert_eq!(
        via_proxy("mongodb://h1", 5),
        "mongodb://127.0.0.1:5/?directConnection=true"
    );
    assert_eq!(
        direct_url(
            "mongodb://u:p@h1,h2/app?directConnection=false&replicaSet=rs0",
            "h2:27018"
        ),
        "mongodb://u:p@h2:27018/app?replicaSet=rs0&directConnection=true"
    );
}
