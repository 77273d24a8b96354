#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Provisioning errors against a real ClickHouse (its probes, faults and
//! in-flight bound are `tests/http_engines.rs` at the workspace root).

mod common;

use common::{backend_for, checkout, registry, tenant, Fixture, Item};
use switchyard_clickhouse::{ChCheckoutExt, Filter};
use switchyard_core::{Backend, BackendErrorKind, Error};

#[tokio::test]
async fn missing_tenant_databases_are_not_provisioned_errors() {
    let fx = Fixture::start("provisioning").await;
    fx.seed(&["present".into()], &[]).await;
    let backend = backend_for(&fx.ch.http_url(), 4);
    let reg = registry(&["present".into(), "absent".into()]);

    let absent = reg.resolve(&tenant("absent")).unwrap();
    let err = checkout(&backend, Some(&absent)).await.unwrap_err();
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
    let mut conn = checkout(&backend, Some(&present)).await.unwrap();
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
    let err = checkout(&backend, Some(&present)).await.unwrap_err();
    assert!(matches!(err, Error::TenantNotProvisioned { .. }), "{err}");
}
