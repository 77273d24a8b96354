#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tenant isolation against a real ClickHouse: the cross-tenant leak test,
//! escape attempts through the row-scoped handle, and hostile tenant ids.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{backend_for, checkout, registry, tenant, Fixture, Item, ROWS_PER_TENANT, ROW_DB};
use switchyard_clickhouse::{ChError, Filter};
use switchyard_core::{
    Backend, BackendErrorKind, Checkout, CheckoutRequest, Error, Isolation, TenantId, TenantIdError,
};
use switchyard_testkit::FaultProxy;

const TASKS: u64 = 16;
const CHECKOUTS_PER_TASK: u64 = 640;

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Many tasks, many tenants, both isolation levels, fewer in-flight slots
/// than tasks: every row read must belong to the checking-out tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_tenant_ever_reads_another_tenants_rows() {
    let fx = Fixture::start("leak").await;
    // Mixed case on purpose: ClickHouse database names are case-sensitive.
    let mut db_tenants = names("Db", 4);
    db_tenants.extend(names("db", 4));
    let row_tenants = names("row-", 16);
    fx.seed(&db_tenants, &row_tenants).await;
    let backend = backend_for(&fx.ch.http_url(), 8);
    let reg = Arc::new(registry(&db_tenants));
    let all: Arc<Vec<String>> = Arc::new(db_tenants.iter().chain(&row_tenants).cloned().collect());

    let checkouts = Arc::new(AtomicU64::new(0));
    let rows_read = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (backend, reg, all) = (backend.clone(), reg.clone(), all.clone());
        let (checkouts, rows_read, writes) = (checkouts.clone(), rows_read.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(0x5eed + task);
            for i in 0..CHECKOUTS_PER_TASK {
                let name = &all[rng.usize(..all.len())];
                let entry = reg.resolve(&tenant(name)).unwrap();
                let conn = checkout(&backend, Some(&entry))
                    .await
                    .unwrap_or_else(|e| panic!("checkout for {name}: {e}"));
                checkouts.fetch_add(1, Ordering::Relaxed);
                assert_eq!(conn.tenant().map(TenantId::as_str), Some(name.as_str()));
                if i % 50 == 7 {
                    // Row tenants write without the tenant column (the handle
                    // fills it in); database tenants mark their rows themselves.
                    let mut row =
                        serde_json::json!({ "n": 1000 + i, "label": format!("written by {name}") });
                    if conn.isolation() == Some(Isolation::Database) {
                        row["tenant_id"] = name.as_str().into();
                    }
                    conn.insert_rows("items", [row]).await.unwrap();
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                let rows: Vec<Item> = conn
                    .select::<Item>("items")
                    .filter(Filter::lt("n", 100_000))
                    .order_by("n")
                    .fetch_all()
                    .await
                    .unwrap_or_else(|e| panic!("select for {name}: {e}"));
                assert!(rows.len() >= ROWS_PER_TENANT as usize, "{name}: {rows:?}");
                for row in &rows {
                    assert_eq!(&row.tenant_id, name, "tenant {name} read {row:?}");
                    assert!(
                        row.label.ends_with(name.as_str()),
                        "tenant {name} read {row:?}"
                    );
                }
                rows_read.fetch_add(rows.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let checkouts = checkouts.load(Ordering::Relaxed);
    eprintln!(
        "leak test: {checkouts} checkouts ({} database-scoped tenants, {} row-scoped), \
         {checkouts} selects verified ({} rows, every one the checking-out tenant's), \
         {} writes, {TASKS} tasks over 8 in-flight slots, in {elapsed:?}",
        db_tenants.len(),
        row_tenants.len(),
        rows_read.load(Ordering::Relaxed),
        writes.load(Ordering::Relaxed),
    );
    assert!(checkouts >= 10_000);
    assert_eq!(backend.stats().in_use(), 0);
    // And on the server: the shared table holds only row tenants' rows, each
    // database only its tenant's.
    let foreign = fx
        .sql(&format!(
            "SELECT count() FROM {ROW_DB}.items WHERE NOT startsWith(tenant_id, 'row-') OR NOT endsWith(label, tenant_id)"
        ))
        .await;
    assert_eq!(foreign.trim(), "0");
    for t in &db_tenants {
        let foreign = fx
            .sql(&format!(
                "SELECT count() FROM `tenant_{t}`.items WHERE tenant_id != '{t}'"
            ))
            .await;
        assert_eq!(foreign.trim(), "0", "tenant_{t}");
    }
}

fn is_rejected(err: &Error) -> bool {
    err.backend_kind() == Some(BackendErrorKind::Rejected)
}

fn source_of(err: &Error) -> Option<&ChError> {
    std::error::Error::source(err).and_then(|s| s.downcast_ref::<ChError>())
}

/// Every way out of a row-scoped handle is refused, most of them before any
/// byte reaches the server.
#[tokio::test]
async fn row_scoped_handles_cannot_be_escaped() {
    let fx = Fixture::start("escape").await;
    fx.seed(&[], &["a".into(), "b".into()]).await;
    let proxy = FaultProxy::start(fx.ch.addr()).await.unwrap();
    let backend = backend_for(&format!("http://127.0.0.1:{}", proxy.port()), 4);
    let reg = registry(&[]);
    let a = reg.resolve(&tenant("a")).unwrap();
    assert_eq!(a.scope().isolation(), Isolation::Row);
    let conn = checkout(&backend, Some(&a)).await.unwrap();
    assert_eq!(proxy.accepted(), 0, "a row scope needs no round trip");

    // No raw client.
    let err = conn.client().unwrap_err();
    assert!(
        matches!(source_of(&err), Some(ChError::Confined { .. })),
        "{err}"
    );

    // Names that would leave the shared table or inject SQL.
    for table in [
        "shared.items",
        "system.tables",
        "items; DROP TABLE items",
        "items` UNION ALL SELECT * FROM `items",
        "items WHERE 1 --",
        "",
    ] {
        let err = conn.select::<Item>(table).fetch_all().await.unwrap_err();
        assert!(is_rejected(&err), "{table:?}: {err}");
        let err = conn.count(table, Filter::all()).await.unwrap_err();
        assert!(is_rejected(&err), "{table:?}: {err}");
        let err = conn
            .insert_rows(table, [serde_json::json!({"n": 1, "label": "x"})])
            .await
            .unwrap_err();
        assert!(is_rejected(&err), "{table:?}: {err}");
    }
    for column in ["1=1 OR tenant_id", "tenant_id` != '' OR `n", "n)) OR ((1"] {
        let err = conn
            .select::<Item>("items")
            .filter(Filter::eq(column, 1))
            .fetch_all()
            .await
            .unwrap_err();
        assert!(is_rejected(&err), "{column:?}: {err}");
        let err = conn
            .select::<Item>("items")
            .order_by(column)
            .fetch_all()
            .await
            .unwrap_err();
        assert!(is_rejected(&err), "{column:?}: {err}");
    }
    // A row naming another tenant fails the whole batch before anything is sent.
    let err = conn
        .insert_rows(
            "items",
            [
                Item {
                    tenant_id: "a".into(),
                    n: 900,
                    label: "fine".into(),
                },
                Item {
                    tenant_id: "b".into(),
                    n: 901,
                    label: "planted".into(),
                },
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            source_of(&err),
            Some(ChError::ForeignTenant { index: 1, .. })
        ),
        "{err}"
    );
    let err = conn
        .insert_rows("items", [serde_json::json!({"tenant_id": 7, "n": 1})])
        .await
        .unwrap_err();
    assert!(
        matches!(source_of(&err), Some(ChError::ForeignTenant { .. })),
        "{err}"
    );
    let err = conn.insert_rows("items", [42]).await.unwrap_err();
    assert!(
        matches!(source_of(&err), Some(ChError::NotARow { .. })),
        "{err}"
    );
    assert_eq!(
        proxy.accepted(),
        0,
        "all of the above is refused before I/O"
    );

    // Filters that name the tenant column or carry SQL in values only narrow.
    for filter in [
        Filter::eq("tenant_id", "b"),
        Filter::ne("tenant_id", "a"),
        Filter::eq("label", "' OR 1=1 --"),
        Filter::eq("label", "x') OR (1=1"),
        Filter::like("label", "%' OR tenant_id = 'b"),
        Filter::is_in("tenant_id", ["b", "a' OR '1'='1"]),
    ] {
        let rows = conn
            .select::<Item>("items")
            .filter(filter.clone())
            .fetch_all()
            .await
            .unwrap();
        assert!(rows.is_empty(), "{filter:?} -> {rows:?}");
    }
    let everything = conn
        .select::<Item>("items")
        .filter(Filter::eq("tenant_id", "b").or(Filter::all()))
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(everything.len(), ROWS_PER_TENANT as usize);
    assert!(everything.iter().all(|r| r.tenant_id == "a"));
    assert_eq!(
        conn.count("items", Filter::all()).await.unwrap(),
        u64::from(ROWS_PER_TENANT)
    );
    // Nothing of b's was touched, nothing planted.
    let b_rows = fx
        .sql(&format!(
            "SELECT count() FROM {ROW_DB}.items WHERE tenant_id = 'b'"
        ))
        .await;
    assert_eq!(b_rows.trim(), ROWS_PER_TENANT.to_string());
    assert_eq!(fx.count(&format!("{ROW_DB}.items")).await, 10);
    eprintln!(
        "escape attempts refused; {} HTTP connections opened for the legitimate queries",
        proxy.accepted()
    );
}

/// Hostile tenant ids never reach a backend: they fail validation before any
/// connection is opened, and the data is unchanged.
#[tokio::test]
async fn hostile_tenant_ids_are_rejected_before_any_io() {
    let fx = Fixture::start("injection").await;
    fx.seed(&["victim".into()], &["a".into()]).await;
    let before = (
        fx.count("tenant_victim.items").await,
        fx.count(&format!("{ROW_DB}.items")).await,
    );
    let proxy = FaultProxy::start(fx.ch.addr()).await.unwrap();
    let backend = backend_for(&format!("http://127.0.0.1:{}", proxy.port()), 4);
    let reg = registry(&["victim".into()]);

    let long = "x".repeat(64);
    let hostile = [
        "a'; DROP TABLE x; --",
        "a\"b",
        "../x",
        long.as_str(),
        "zürich",
        "テナント",
        "",
        "*",
        "a b",
        "a`b",
        "a.b",
        "a\0b",
        "tenant_victim.items",
    ];
    for raw in hostile {
        let err = TenantId::new(raw).unwrap_err();
        // The only way from a string to a checkout goes through TenantId.
        let err = Error::from(err);
        assert!(matches!(err, Error::InvalidTenant(_)), "{raw:?}: {err}");
        assert!(!err.is_retryable());
    }
    assert!(matches!(TenantId::new(""), Err(TenantIdError::Empty)));
    assert!(matches!(
        TenantId::new(&long),
        Err(TenantIdError::TooLong { len: 64 })
    ));
    // 63 characters is a valid id, but `tenant_` + 63 is too long a name.
    let err = reg
        .resolve(&tenant(&"y".repeat(63)))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::TenantNameTooLong { .. }), "{err}");
    assert_eq!(proxy.accepted(), 0, "nothing was sent");

    // `_all` is a valid id and means nothing special here: its database is
    // literally `_all` (template `{id}`), which does not exist.
    let all = switchyard_core::TierPolicy::new(Isolation::Database)
        .with_name_template(switchyard_core::NameTemplate::new("{id}").unwrap())
        .scope(&tenant("_all"))
        .unwrap();
    let err = Checkout::acquire(
        &backend,
        CheckoutRequest::with_timeout(Duration::from_secs(5)).scope(Arc::new(all)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::TenantNotProvisioned { name, .. } if name == "_all"),
        "{err}"
    );
    let after = (
        fx.count("tenant_victim.items").await,
        fx.count(&format!("{ROW_DB}.items")).await,
    );
    assert_eq!(before, after, "data unchanged");
    eprintln!(
        "{} hostile ids rejected before I/O; `_all` resolved to a literal, missing database",
        hostile.len()
    );
}
