#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Probes, faults, the in-flight bound and provisioning errors against a real
//! ClickHouse.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{backend_for, registry, tenant, Fixture, Item};
use switchyard_clickhouse::{ChCheckoutExt, Filter};
use switchyard_core::{Backend, BackendErrorKind, Checkout, CheckoutRequest, Error, Role};
use switchyard_testkit::wait_until;

const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

#[tokio::test]
async fn probes_follow_kill_pause_resume_and_restart() {
    let fx = Fixture::start("faults").await;
    let backend = backend_for(&fx.ch.http_url(), 4);

    let probe = backend.probe(PROBE_TIMEOUT).await.unwrap();
    assert_eq!(probe.role, Role::Standalone);
    assert!(probe
        .version
        .as_deref()
        .unwrap_or("")
        .starts_with(|c: char| c.is_ascii_digit()));
    assert!(probe.lag.is_none());

    // Paused: connections are accepted but never answered.
    fx.ch.pause().await.unwrap();
    let started = Instant::now();
    let err = backend.probe(PROBE_TIMEOUT).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, Error::ProbeTimeout { .. }), "{err}");
    assert!(err.is_endpoint_failure());
    assert!(
        elapsed >= PROBE_TIMEOUT && elapsed < PROBE_TIMEOUT + Duration::from_millis(300),
        "{elapsed:?}"
    );
    eprintln!("paused: {err} after {elapsed:?}");

    fx.ch.resume().await.unwrap();
    wait_until(Duration::from_secs(10), || async {
        backend.probe(PROBE_TIMEOUT).await.is_ok()
    })
    .await
    .unwrap();

    // Killed: refused at once, a Connect error, even with a kept-alive
    // socket from before the kill in the client's pool.
    let conn = Checkout::acquire(&backend, CheckoutRequest::with_timeout(PROBE_TIMEOUT))
        .await
        .unwrap();
    let one: u8 = conn
        .client()
        .unwrap()
        .query("SELECT 1")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(one, 1);
    drop(conn);
    fx.ch.kill().await.unwrap();
    let started = Instant::now();
    let err = backend.probe(PROBE_TIMEOUT).await.unwrap_err();
    assert_eq!(
        err.backend_kind(),
        Some(BackendErrorKind::Connect),
        "{err:?}"
    );
    assert!(err.is_retryable() && err.is_endpoint_failure());
    assert!(started.elapsed() < PROBE_TIMEOUT);
    eprintln!("killed: {err} ({:?})", std::error::Error::source(&err));

    let started = Instant::now();
    fx.ch.restart().await.unwrap();
    wait_until(Duration::from_secs(30), || async {
        backend.probe(PROBE_TIMEOUT).await.is_ok()
    })
    .await
    .unwrap();
    eprintln!("restarted and healthy after {:?}", started.elapsed());
    let probe = backend.probe(PROBE_TIMEOUT).await.unwrap();
    assert_eq!(probe.version.as_deref(), Some(fx.version.as_str()));
}

#[tokio::test]
async fn the_in_flight_bound_makes_checkouts_wait_until_their_deadline() {
    let fx = Fixture::start("bound").await;
    let backend = backend_for(&fx.ch.http_url(), 2);
    let timeout = Duration::from_secs(2);
    let one = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout))
        .await
        .unwrap();
    let two = Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout))
        .await
        .unwrap();
    let stats = backend.stats();
    assert_eq!((stats.in_use(), stats.max_size), (2, 2));

    let started = Instant::now();
    let err = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_millis(500));

    // Probes do not queue behind checkouts.
    backend.probe(Duration::from_secs(2)).await.unwrap();

    // A waiter gets the slot as soon as one comes back.
    let waiter = {
        let backend = Arc::clone(&backend);
        tokio::spawn(async move {
            Checkout::acquire(&backend, CheckoutRequest::with_timeout(timeout)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(one);
    let three = waiter.await.unwrap().unwrap();
    let n: u8 = three
        .client()
        .unwrap()
        .query("SELECT 1")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(n, 1);
    drop((two, three));
    assert_eq!(backend.stats().in_use(), 0);
}

#[tokio::test]
async fn missing_tenant_databases_are_not_provisioned_errors() {
    let fx = Fixture::start("provisioning").await;
    fx.seed(&["present".into()], &[]).await;
    let backend = backend_for(&fx.ch.http_url(), 4);
    let reg = registry(&["present".into(), "absent".into()]);
    let timeout = Duration::from_secs(5);

    let absent = reg.resolve(&tenant("absent")).unwrap();
    let err = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(timeout).tenant(&absent),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::TenantNotProvisioned { what: "database", name, .. } if name == "tenant_absent"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(
        backend.stats().in_use(),
        0,
        "the failed checkout gave its slot back"
    );

    let present = reg.resolve(&tenant("present")).unwrap();
    let mut conn = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(timeout).tenant(&present),
    )
    .await
    .unwrap();
    assert_eq!(conn.database(), Some("tenant_present"));
    let rows = conn.select::<Item>("items").fetch_all().await.unwrap();
    assert_eq!(rows.len(), 5);
    // Database-scoped handles get the raw client, confined to their database
    // for unqualified names.
    let n: u64 = conn
        .client()
        .unwrap()
        .query("SELECT count() FROM items")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(n, 5);
    // The typed API never names another database.
    for table in ["tenant_absent.items", "system.databases", "default.items"] {
        let err = conn.select::<Item>(table).fetch_all().await.unwrap_err();
        assert_eq!(
            err.backend_kind(),
            Some(BackendErrorKind::Rejected),
            "{table}: {err}"
        );
    }
    // An unknown table is the caller's mistake, not the endpoint's.
    let client = conn.client().unwrap().clone();
    let err = client
        .query("SELECT count() FROM no_such_table")
        .fetch_one::<u64>()
        .await
        .map_err(|e| conn.fail(e))
        .unwrap_err();
    assert_eq!(
        err.backend_kind(),
        Some(BackendErrorKind::Rejected),
        "{err}"
    );

    // Dropped while cached as present: the query's UNKNOWN_DATABASE (81) is
    // reported as not provisioned, and the next checkout asks again.
    fx.sql("DROP DATABASE tenant_present").await;
    let err = conn.count("items", Filter::all()).await.unwrap_err();
    assert!(
        matches!(&err, Error::TenantNotProvisioned { name, .. } if name == "tenant_present"),
        "{err}"
    );
    drop(conn);
    let err = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(timeout).tenant(&present),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::TenantNotProvisioned { .. }), "{err}");
}
