//! Isolation under hostile input and failure: tenant ids that try injection,
//! commands cancelled mid-flight, resets that fail, transactions left open,
//! and a tenant that holds its whole quota.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, direct, run, scoped, unscoped, Tenants, TIMEOUT};
use futures_util::future::join_all;
use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Error, Isolation, PoolStats, TenantId, TenantIdError,
};
use switchyard_redis::{redis, Command, ConfinementError, RedisBackend};
use switchyard_testkit::{wait_until, FaultProxy};

const HOSTILE: &[&str] = &[
    "a'; DROP TABLE x; --",
    "a\"b",
    "../x",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "zürich",
    "租户",
    "",
    "*",
    "a b",
    "a\r\nFLUSHALL",
    "tenant:other",
    "a\0",
    "{a}",
];

#[tokio::test]
async fn hostile_tenant_ids_are_rejected_before_any_io() {
    let cluster = cluster(0).await;
    let proxy = FaultProxy::start(cluster.master().addr()).await.unwrap();
    let tenants = Tenants::new(1, None);
    let backend = Arc::new(
        tenants
            .backend("inj", &format!("redis://{}", proxy.addr()))
            .build()
            .unwrap(),
    );
    let mut admin = direct(cluster.master()).await;
    let _: () = run(&mut admin, &["SET", "canary", "alive"]).await;
    let before: u64 = run(&mut admin, &["DBSIZE"]).await;

    assert!(HOSTILE[3].len() >= 64);
    for id in HOSTILE {
        let err = TenantId::new(id).unwrap_err();
        assert!(
            matches!(
                err,
                TenantIdError::Empty
                    | TenantIdError::TooLong { .. }
                    | TenantIdError::InvalidChar { .. }
            ),
            "{id:?}: {err}"
        );
        assert!(matches!(Error::from(err), Error::InvalidTenant(_)));
        assert!(TenantId::try_from(id.to_string()).is_err());
        let json = serde_json::Value::String((*id).to_owned());
        assert!(serde_json::from_value::<TenantId>(json).is_err());
    }
    // Nothing reached the server, not even a connection attempt.
    assert_eq!(proxy.accepted(), 0);
    assert_eq!(
        backend.stats(),
        PoolStats {
            max_size: 16,
            ..PoolStats::default()
        }
    );
    let after: u64 = run(&mut admin, &["DBSIZE"]).await;
    assert_eq!(after, before);

    // The same strings as data of a valid tenant are literal keys and values.
    let mut conn = scoped(&backend, &tenants.entry(&tenants.prefix[0])).await;
    for id in HOSTILE {
        conn.set(id, *id).await.unwrap();
        let back: String = conn.get(id).await.unwrap();
        assert_eq!(back, *id);
    }
    let err = conn
        .query::<()>(&Command::new("a\r\nFLUSHALL"))
        .await
        .unwrap_err();
    assert!(matches!(
        ConfinementError::find(&err),
        Some(ConfinementError::Unknown { .. })
    ));
    drop(conn);
    let after: u64 = run(&mut admin, &["DBSIZE"]).await;
    assert_eq!(after, before + HOSTILE.len() as u64);
    let canary: String = run(&mut admin, &["GET", "canary"]).await;
    assert_eq!(canary, "alive");
    println!(
        "{} hostile ids rejected with 0 connections; {} accepted for the valid tenant",
        HOSTILE.len(),
        proxy.accepted()
    );
}

async fn owner_of(conn: &mut Checkout<RedisBackend>) -> Option<String> {
    // The connection's own confinement, not the checkout's label.
    if (**conn).tenant().is_some() {
        conn.get("owner").await.unwrap()
    } else {
        let mut raw = conn.raw().unwrap();
        redis::cmd("GET")
            .arg("owner")
            .query_async(&mut raw)
            .await
            .unwrap()
    }
}

/// Every level still lands on its own data, and unscoped on the default database.
async fn assert_everyone_lands_home(backend: &Arc<RedisBackend>, tenants: &Tenants) {
    for t in [&tenants.database[0], &tenants.prefix[0], &tenants.acl[0]] {
        let mut conn = scoped(backend, &tenants.entry(t)).await;
        assert_eq!(owner_of(&mut conn).await.as_deref(), Some(t.as_str()));
    }
    let mut conn = unscoped(backend).await;
    assert_eq!(owner_of(&mut conn).await.as_deref(), Some("unscoped"));
}

async fn setup(max_size: u32) -> (switchyard_testkit::RedisCluster, Tenants, Arc<RedisBackend>) {
    let cluster = cluster(0).await;
    let tenants = Tenants::new(1, None);
    let backend = Arc::new(
        tenants
            .backend("r", &cluster.master().url())
            .max_size(max_size)
            .build()
            .unwrap(),
    );
    tenants.seed(&backend).await;
    (cluster, tenants, backend)
}

#[tokio::test]
async fn a_command_cancelled_mid_flight_is_never_reused() {
    let (cluster, tenants, backend) = setup(1).await;
    let d0 = tenants.entry(&tenants.database[0]);
    let mut conn = scoped(&backend, &d0).await;
    let cut = tokio::time::timeout(
        Duration::from_millis(50),
        conn.blpop::<String>(&["queue"], Duration::from_secs(5)),
    )
    .await;
    assert!(cut.is_err(), "BLPOP should still be blocked");
    drop(conn);
    assert_eq!(backend.counters().discarded, 1);
    assert_eq!(backend.stats().size, 0);

    // The one-connection pool serves everyone correctly afterwards.
    assert_everyone_lands_home(&backend, &tenants).await;

    // The abandoned BLPOP died with its socket: nothing steals a pushed job.
    let mut admin = direct(cluster.master()).await;
    wait_until(TIMEOUT, || {
        let mut admin = admin.clone();
        async move {
            let info: String = run(&mut admin, &["INFO", "clients"]).await;
            info.contains("blocked_clients:0")
        }
    })
    .await
    .unwrap();
    let mut conn = scoped(&backend, &d0).await;
    conn.rpush("queue", "job").await.unwrap();
    let left: u64 = conn
        .query(&Command::new("LLEN").arg("queue"))
        .await
        .unwrap();
    assert_eq!(left, 1);
    let _: () = run(&mut admin, &["PING"]).await;
}

#[tokio::test]
async fn a_connection_killed_before_its_reset_is_discarded() {
    let (cluster, tenants, backend) = setup(2).await;
    let mut admin = direct(cluster.master()).await;
    let d0 = tenants.entry(&tenants.database[0]);
    let mut conn = scoped(&backend, &d0).await;
    assert_eq!(owner_of(&mut conn).await.as_deref(), Some("d0"));

    let clients: String = run(&mut admin, &["CLIENT", "LIST"]).await;
    let id = clients
        .lines()
        .find(|l| l.contains(" db=1 "))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .expect("the checkout's connection is on database 1")
        .to_owned();
    let killed: u64 = run(&mut admin, &["CLIENT", "KILL", "ID", &id]).await;
    assert_eq!(killed, 1);

    let before = backend.counters();
    drop(conn);
    wait_until(TIMEOUT, || async {
        backend.counters().reset_failures == before.reset_failures + 1
    })
    .await
    .unwrap();
    assert_eq!(backend.counters().discarded, before.discarded + 1);
    assert_everyone_lands_home(&backend, &tenants).await;
}

#[tokio::test]
async fn a_failed_reauth_as_the_pool_user_discards_the_connection() {
    let cluster = cluster(0).await;
    let mut admin = direct(cluster.master()).await;
    let create_app = [
        "ACL", "SETUSER", "app", "on", ">app-pw", "~*", "&*", "+@all",
    ];
    let _: () = run(&mut admin, &create_app).await;
    let url = format!("redis://app:app-pw@{}", cluster.master().addr());
    let tenants = Tenants::new(1, None);
    let backend = Arc::new(tenants.backend("r", &url).max_size(2).build().unwrap());
    tenants.seed(&backend).await;

    let a0 = tenants.entry(&tenants.acl[0]);
    let mut conn = scoped(&backend, &a0).await;
    assert_eq!(owner_of(&mut conn).await.as_deref(), Some("a0"));
    // The pool's own user disappears (its idle connections go with it); the
    // checkout, now authenticated as the tenant, survives until it returns.
    let deleted: u64 = run(&mut admin, &["ACL", "DELUSER", "app"]).await;
    assert_eq!(deleted, 1);
    assert_eq!(owner_of(&mut conn).await.as_deref(), Some("a0"));

    let before = backend.counters();
    drop(conn);
    wait_until(TIMEOUT, || async {
        backend.counters().reset_failures == before.reset_failures + 1
    })
    .await
    .unwrap();
    assert_eq!(backend.counters().discarded, before.discarded + 1);

    let _: () = run(&mut admin, &create_app).await;
    assert_everyone_lands_home(&backend, &tenants).await;
}

#[tokio::test]
async fn raw_sessions_are_reset_and_open_transactions_discarded() {
    let (_cluster, tenants, backend) = setup(1).await;

    // A dirty unscoped session: another database, a name. Reset on return.
    let mut conn = unscoped(&backend).await;
    let mut raw = conn.raw().unwrap();
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut raw)
        .await
        .unwrap();
    drop(conn);
    let mut conn = unscoped(&backend).await;
    assert_eq!(owner_of(&mut conn).await.as_deref(), Some("unscoped"));
    drop(conn);

    // MULTI left open: the connection is closed, not reset.
    let before = backend.counters();
    let mut conn = unscoped(&backend).await;
    let mut raw = conn.raw().unwrap();
    let _: () = redis::cmd("MULTI").query_async(&mut raw).await.unwrap();
    let queued: String = redis::cmd("SET")
        .arg("owner")
        .arg("hijacked")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(queued, "QUEUED");
    drop(conn);
    assert_eq!(backend.counters().discarded, before.discarded + 1);
    assert_everyone_lands_home(&backend, &tenants).await;
}

#[tokio::test]
async fn swapped_connections_keep_their_own_confinement() {
    let (_cluster, tenants, backend) = setup(2).await;
    let mut a = scoped(&backend, &tenants.entry(&tenants.database[0])).await;
    let mut open = unscoped(&backend).await;
    std::mem::swap(&mut *a, &mut *open);
    // The unscoped checkout now holds d0's connection: still confined to d0.
    assert_eq!(open.isolation(), Some(Isolation::Database));
    assert!(open.raw().is_err());
    assert_eq!(owner_of(&mut open).await.as_deref(), Some("d0"));
    assert_eq!(a.key_prefix(), None);
    drop(open);
    drop(a);
    wait_until(TIMEOUT, || async { backend.stats().idle == 2 })
        .await
        .unwrap();
    // Returned by what each connection carried, not by the checkout's label.
    assert_everyone_lands_home(&backend, &tenants).await;
    assert_eq!(backend.counters().discarded, 0);
}

#[tokio::test]
async fn a_noisy_tenant_at_its_quota_does_not_starve_others() {
    let cluster = cluster(0).await;
    let tenants = Tenants::new(3, Some(2));
    let backend = Arc::new(
        tenants
            .backend("q", &cluster.master().url())
            .max_size(4)
            .build()
            .unwrap(),
    );
    tenants.seed(&backend).await;
    let noisy = tenants.entry(&tenants.prefix[0]);
    let _held = [
        scoped(&backend, &noisy).await,
        scoped(&backend, &noisy).await,
    ];

    let acquire_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let third = async {
        let r = Checkout::acquire(
            &backend,
            CheckoutRequest::with_timeout(acquire_timeout).tenant(&noisy),
        )
        .await;
        (r, started.elapsed())
    };
    let others = tenants.all().into_iter().filter(|t| t.as_str() != "p0");
    let others = join_all(others.flat_map(|t| [t.clone(), t]).map(|t| {
        let backend = backend.clone();
        let entry = tenants.entry(&t);
        async move {
            let mut conn = Checkout::acquire(
                &backend,
                CheckoutRequest::with_timeout(TIMEOUT).tenant(&entry),
            )
            .await?;
            let owner: Option<String> = conn.get("owner").await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, Error>(owner == Some(t.to_string()))
        }
    }));
    let ((third, waited), others) = tokio::join!(third, others);
    let err = third.unwrap_err();
    assert!(
        matches!(err, Error::QuotaExceeded { limit: 2, .. }),
        "{err}"
    );
    assert!(waited >= acquire_timeout, "{waited:?}");
    assert!(
        waited < acquire_timeout + Duration::from_secs(1),
        "{waited:?}"
    );
    assert_eq!(others.len(), 16);
    for r in others {
        assert!(r.unwrap(), "a quiet tenant was served someone else's data");
    }
    println!("noisy tenant refused after {waited:?}; 16 quiet checkouts served meanwhile");
}

#[tokio::test]
async fn a_database_the_server_does_not_have_is_not_provisioned() {
    let cluster = cluster(0).await;
    let tenants = Tenants::new(1, None);
    let d0 = tenants.entry(&tenants.database[0]);
    // redis-server has 16 databases by default.
    let backend = Arc::new(
        RedisBackend::builder("r", cluster.master().url())
            .database(d0.scope().target(), 200)
            .build()
            .unwrap(),
    );
    let err = Checkout::acquire(&backend, CheckoutRequest::with_timeout(TIMEOUT).tenant(&d0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TenantNotProvisioned {
                what: "database",
                ..
            }
        ),
        "{err}"
    );
    // The half-scoped connection was closed, not pooled.
    assert_eq!(backend.counters().discarded, 1);
    assert_eq!(backend.stats().size, 0);
}
