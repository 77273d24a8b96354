#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fair queuing on a real PostgreSQL: a saturated pool serves waiting tenants
//! in turn (tier weights, untenanted as a class, FIFO on request), within the
//! affinity hand-off's bypass bound; a connection kept for its owner only for
//! the linger; every grant is scoped to its tenant; a waiter that gives up
//! leaves nothing behind.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common::Fixture;
use switchyard_core::{
    Checkout, CheckoutRequest, Error, Isolation, QueueOrder, TenantId, TenantRegistry, TierPolicy,
};
use switchyard_postgres::PgBackend;
use switchyard_testkit::wait_until;

const TIMEOUT: Duration = Duration::from_secs(10);
const NOISY: usize = 8;

fn registry(quiet_order: QueueOrder) -> Arc<TenantRegistry> {
    let reg = TenantRegistry::new()
        .with_tier("noisy", TierPolicy::new(Isolation::Schema))
        .with_tier(
            "quiet",
            TierPolicy::new(Isolation::Schema).with_queue(quiet_order),
        )
        .with_tier(
            "gold",
            TierPolicy::new(Isolation::Schema).with_queue_weight(NonZeroU32::new(2).unwrap()),
        )
        .with_tenant(TenantId::new("noisy").unwrap(), "noisy")
        .with_tenant(TenantId::new("q1").unwrap(), "quiet")
        .with_tenant(TenantId::new("q2").unwrap(), "quiet")
        .with_tenant(TenantId::new("gold").unwrap(), "gold");
    reg.validate().unwrap();
    Arc::new(reg)
}

async fn checkout(
    backend: &Arc<PgBackend>,
    reg: &TenantRegistry,
    tenant: Option<&str>,
) -> Result<Checkout<PgBackend>, Error> {
    let mut req = CheckoutRequest::with_timeout(TIMEOUT);
    if let Some(id) = tenant {
        req = req.tenant(&reg.resolve(&TenantId::new(id).unwrap()).unwrap());
    }
    Checkout::acquire(backend, req).await
}

/// Fills a pool of 1 with a `noisy` checkout, queues `waiters` (tenant or
/// untenanted) one after another behind it, lets it go, and returns the
/// order they were served in (one connection: each grant follows the
/// previous one's return). Each grant checks on the server that its session
/// serves exactly its tenant.
async fn served_order(
    backend: &Arc<PgBackend>,
    reg: &Arc<TenantRegistry>,
    waiters: &[Option<&'static str>],
) -> Vec<String> {
    let held = checkout(backend, reg, Some("noisy")).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, tenant) in waiters.iter().enumerate() {
        let (backend, reg, tx) = (Arc::clone(backend), Arc::clone(reg), tx.clone());
        let tenant = *tenant;
        tokio::spawn(async move {
            let mut conn = checkout(&backend, &reg, tenant).await.unwrap();
            let path = search_path(&mut conn).await;
            let want = tenant.map_or("\"$user\", public".to_owned(), |t| {
                format!("\"tenant_{t}\"")
            });
            assert_eq!(path, want, "waiter {i} got another owner's session");
            tx.send(format!("{}{i}", tenant.unwrap_or("-"))).unwrap();
        });
        // The current-thread runtime runs the task up to its wait: queued in
        // exactly this order, with no I/O before (the pool is full).
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    drop(tx);
    drop(held);
    let mut order = Vec::new();
    while let Some(label) = rx.recv().await {
        order.push(label);
    }
    assert_eq!(order.len(), waiters.len());
    order
}

/// The session's `search_path`, as the server has it.
async fn search_path(conn: &mut Checkout<PgBackend>) -> String {
    sqlx::query_scalar("SELECT current_setting('search_path')")
        .fetch_one(&mut **conn)
        .await
        .unwrap()
}

fn position(order: &[String], label: &str) -> usize {
    order.iter().position(|l| l == label).unwrap()
}

async fn fixture() -> Fixture {
    let fx = Fixture::start(0).await;
    for id in ["noisy", "q1", "q2", "gold"] {
        fx.create_schema_tenant(id).await;
    }
    fx
}

fn waiters() -> Vec<Option<&'static str>> {
    let mut waiters = vec![Some("noisy"); NOISY];
    waiters.extend([Some("q1"), Some("q2"), None]);
    waiters
}

#[tokio::test]
async fn waiting_tenants_are_served_in_turn_and_scoped() {
    let fx = fixture().await;
    // Strict turns (no affinity bypass): the exact deficit round robin order.
    let mut config = fx.config(1);
    config.affinity.max_bypass = 0;
    let backend = fx.backend(config);
    let order = served_order(&backend, &registry(QueueOrder::Fair), &waiters()).await;
    eprintln!("fair, max_bypass 0: {order:?}");
    assert_eq!(&order[..4], ["noisy0", "q18", "q29", "-10"]);

    // With the default bound, a quiet waiter is passed over for noisy's warm
    // connections at most max_bypass (4) times, never the whole noisy queue.
    let backend = fx.backend(fx.config(1));
    let order = served_order(&backend, &registry(QueueOrder::Fair), &waiters()).await;
    eprintln!("fair, max_bypass 4: {order:?}");
    assert!(position(&order, "q18") <= 1 + 4, "{order:?}");
    assert!(
        position(&order, "noisy7") > position(&order, "q29"),
        "{order:?}"
    );
    let stats = backend.pg_stats();
    assert!(stats.handoffs > 0, "{stats:?}");
}

#[tokio::test]
async fn a_fifo_tier_and_a_weighted_tier_queue_as_configured() {
    let fx = fixture().await;
    let mut config = fx.config(1);
    config.affinity.max_bypass = 0;
    let backend = fx.backend(config);

    // q1 and q2 share one FIFO line: q2 waits behind q1's second checkout.
    let reg = registry(QueueOrder::Fifo);
    let waiters = [
        Some("noisy"),
        Some("noisy"),
        Some("q1"),
        Some("q1"),
        Some("q2"),
    ];
    let order = served_order(&backend, &reg, &waiters).await;
    assert_eq!(order, ["noisy0", "q12", "noisy1", "q13", "q24"]);

    // gold (weight 2) gets two grants per turn.
    let waiters = [
        Some("noisy"),
        Some("noisy"),
        Some("noisy"),
        Some("gold"),
        Some("gold"),
        Some("gold"),
    ];
    let order = served_order(&backend, &reg, &waiters).await;
    assert_eq!(
        order,
        ["noisy0", "gold3", "gold4", "noisy1", "gold5", "noisy2"]
    );
}

#[tokio::test]
async fn a_fifo_tier_tenant_is_not_starved_by_another_tenants_warm_connection() {
    let fx = fixture().await;
    // Default affinity (max_bypass 4). q1 and q2 share a FIFO line, q2's
    // waiter first after q1's first: every connection q1 returns has a q1
    // waiter behind q2's, but q2 is passed over at most 4 times.
    let backend = fx.backend(fx.config(1));
    let mut waiters = vec![Some("q1"), Some("q2")];
    waiters.extend(std::iter::repeat_n(Some("q1"), NOISY));
    let order = served_order(&backend, &registry(QueueOrder::Fifo), &waiters).await;
    eprintln!("fifo tier, max_bypass 4: {order:?}");
    assert!(position(&order, "q21") <= 1 + 4, "{order:?}");
    assert!(backend.pg_stats().handoffs > 0);
}

#[tokio::test]
async fn a_returned_connection_is_kept_for_its_owner_for_the_linger_only() {
    let fx = fixture().await;
    // A linger long enough that the steps below always fall inside it.
    const LINGER: Duration = Duration::from_secs(3);
    let mut config = fx.config(2);
    config.pool.linger = LINGER;
    let backend = fx.backend(config);
    let reg = registry(QueueOrder::Fair);
    let noisy = checkout(&backend, &reg, Some("noisy")).await.unwrap();
    let q1 = checkout(&backend, &reg, Some("q1")).await.unwrap();
    // noisy's second checkout waits: the pool of 2 is out.
    let waiting = {
        let (backend, reg) = (Arc::clone(&backend), Arc::clone(&reg));
        tokio::spawn(async move { checkout(&backend, &reg, Some("noisy")).await.unwrap() })
    };
    // The current-thread runtime runs it up to its wait (no I/O before).
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }

    // q1 holds nothing else and nobody of q1 waits: its connection is kept
    // for it (one of two classes wanting the pool of 2), not handed to
    // noisy's waiter, and q1's next checkout gets it back unreset.
    let before = backend.pg_stats();
    drop(q1);
    wait_until(TIMEOUT, || async {
        switchyard_core::Backend::stats(&*backend).idle == 1
    })
    .await
    .unwrap();
    let mut again = checkout(&backend, &reg, Some("q1")).await.unwrap();
    assert!(!waiting.is_finished(), "the kept connection went to noisy");
    let path = search_path(&mut again).await;
    assert_eq!(path, "\"tenant_q1\"");
    let after = backend.pg_stats();
    assert_eq!(after.affinity_hits, before.affinity_hits + 1, "{after:?}");
    assert_eq!(after.resets, before.resets, "{after:?}");

    // q1 does not come back: after the linger, noisy's waiter gets it.
    drop(again);
    let released = std::time::Instant::now();
    let mut got = tokio::time::timeout(TIMEOUT, waiting)
        .await
        .unwrap()
        .unwrap();
    let path = search_path(&mut got).await;
    assert_eq!(path, "\"tenant_noisy\"");
    assert!(released.elapsed() >= LINGER - Duration::from_millis(50));
    drop(noisy);
}

#[tokio::test]
async fn a_waiter_that_gives_up_leaves_nothing_behind() {
    let fx = fixture().await;
    let backend = fx.backend(fx.config(1));
    let reg = registry(QueueOrder::Fair);
    let held = checkout(&backend, &reg, Some("noisy")).await.unwrap();

    // One waiter times out exactly at its deadline, one is cancelled.
    let entry = reg.resolve(&TenantId::new("q1").unwrap()).unwrap();
    let req = CheckoutRequest::with_timeout(Duration::from_millis(200)).tenant(&entry);
    let err = Checkout::acquire(&backend, req).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        checkout(&backend, &reg, Some("q2")),
    )
    .await;
    assert!(cancelled.is_err());

    // The returned connection is idle again, not handed to a ghost.
    drop(held);
    wait_until(TIMEOUT, || async {
        let stats = switchyard_core::Backend::stats(&*backend);
        (stats.size, stats.idle) == (1, 1)
    })
    .await
    .unwrap();
    let mut conn = checkout(&backend, &reg, Some("noisy")).await.unwrap();
    let path = search_path(&mut conn).await;
    assert_eq!(path, "\"tenant_noisy\"");
    assert_eq!(backend.pg_stats().affinity_hits, 1);
}
