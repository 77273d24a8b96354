//! Cross-tenant leak test: many tasks check out connections for random tenants
//! on every isolation level through a small pool, so physical connections move
//! between tenants (and unscoped users who dirty them) all the time. Every read
//! must belong to the tenant that checked out; every reach for another
//! tenant's data must fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, redis_source, Tenants, TIMEOUT};
use switchyard_core::{Backend, Checkout, CheckoutRequest, Isolation, TenantId};
use switchyard_redis::{redis, Command, ConfinementError, RedisBackend};

const TASKS: u64 = 16;
const CHECKOUTS: u64 = 12_000;

#[derive(Default)]
struct Tally {
    checkouts: AtomicU64,
    reads: AtomicU64,
    leaks: AtomicU64,
    blocked_reaches: AtomicU64,
    unscoped: AtomicU64,
    cancelled: AtomicU64,
}

impl Tally {
    fn leak(&self, what: String) {
        eprintln!("LEAK: {what}");
        self.leaks.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_tenant_ever_sees_another_tenants_data() {
    let cluster = cluster(0).await;
    let tenants = Arc::new(Tenants::new(5, None));
    let backend = Arc::new(
        tenants
            .backend("leak", &cluster.master().url())
            .max_size(4)
            .acquire_timeout(TIMEOUT)
            .build()
            .unwrap(),
    );
    tenants.seed(&backend).await;

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for seed in 0..TASKS {
        let (backend, tenants, tally) = (backend.clone(), tenants.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let all = tenants.all();
            let mut i = 0u64;
            while tally.checkouts.load(Ordering::Relaxed) < CHECKOUTS {
                i += 1;
                if rng.u8(..100) < 5 {
                    unscoped_round(&backend, &tally, &mut rng).await;
                } else {
                    let t = &all[rng.usize(..all.len())];
                    tenant_round(&backend, &tenants, &tally, t, i, &mut rng).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();

    let checkouts = tally.checkouts.load(Ordering::Relaxed);
    let leaks = tally.leaks.load(Ordering::Relaxed);
    println!(
        "{checkouts} checkouts ({} unscoped, {} cancelled mid-command) by {TASKS} tasks over a pool of 4 in {elapsed:?}: \
         {} reads verified, {} reaches for other tenants refused, {leaks} leaks; backend {:?}, {:?}",
        tally.unscoped.load(Ordering::Relaxed),
        tally.cancelled.load(Ordering::Relaxed),
        tally.reads.load(Ordering::Relaxed),
        tally.blocked_reaches.load(Ordering::Relaxed),
        backend.counters(),
        backend.stats(),
    );
    assert!(checkouts >= 10_000, "only {checkouts} checkouts");
    assert_eq!(leaks, 0);
    assert!(tally.blocked_reaches.load(Ordering::Relaxed) > 0);
}

async fn tenant_round(
    backend: &Arc<RedisBackend>,
    tenants: &Tenants,
    tally: &Tally,
    t: &TenantId,
    i: u64,
    rng: &mut fastrand::Rng,
) {
    let entry = tenants.entry(t);
    let mut conn = Checkout::acquire(
        backend,
        CheckoutRequest::with_timeout(TIMEOUT).tenant(&entry),
    )
    .await
    .unwrap();
    tally.checkouts.fetch_add(1, Ordering::Relaxed);

    // Whatever served this connection before, `owner` is this tenant's.
    let owner: Option<String> = conn.get("owner").await.unwrap();
    tally.reads.fetch_add(1, Ordering::Relaxed);
    if owner.as_deref() != Some(t.as_str()) {
        tally.leak(format!("{t} read owner {owner:?}"));
    }

    // Values carry their tenant; whichever slot is read back must be ours.
    let slot = format!("k{}", rng.u8(..20));
    conn.set(&slot, format!("{t}:{i}")).await.unwrap();
    let other = format!("k{}", rng.u8(..20));
    let value: Option<String> = conn.get(&other).await.unwrap();
    tally.reads.fetch_add(1, Ordering::Relaxed);
    if let Some(v) = value {
        if !v.starts_with(&format!("{t}:")) {
            tally.leak(format!("{t} read {other} = {v}"));
        }
    }

    if i.is_multiple_of(8) {
        reach_for_others(&mut conn, tenants, tally, t).await;
    }
    if i.is_multiple_of(97) {
        // A command cancelled mid-flight: the connection must never be reused.
        let cut = tokio::time::timeout(
            Duration::from_millis(2),
            conn.blpop::<String>(&["never"], Duration::from_secs(2)),
        )
        .await;
        if cut.is_err() {
            tally.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Tries to reach a neighbour's data in the ways each level allows expressing.
async fn reach_for_others(
    conn: &mut Checkout<RedisBackend>,
    tenants: &Tenants,
    tally: &Tally,
    t: &TenantId,
) {
    let neighbour = |list: &[TenantId]| {
        list.iter()
            .find(|o| *o != t)
            .cloned()
            .unwrap_or_else(|| list[0].clone())
    };
    let isolation = conn.isolation().unwrap();
    let refused = |r: Result<redis::Value, switchyard_core::Error>| match r {
        Err(e) => ConfinementError::find(&e).is_some(),
        Ok(_) => false,
    };
    let check = |ok: bool, what: &str| {
        if ok {
            tally.blocked_reaches.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.leak(format!("{t}: {what} was not refused"));
        }
    };
    // The raw socket is out of reach for every scoped checkout.
    check(conn.raw().is_err(), "raw()");
    match isolation {
        Isolation::Database => {
            for cmd in [
                Command::new("SELECT").arg(0),
                Command::new("MOVE").arg("owner").arg(0),
                Command::new("SWAPDB").arg(0).arg(1),
                Command::new("FLUSHALL"),
                Command::new("COPY").arg("owner").arg("x").arg("DB").arg(0),
            ] {
                check(refused(conn.query(&cmd).await), cmd.name());
            }
            // Keys are the tenant's database's: a whole-database scan is allowed and sees only it.
            let keys = conn.keys("*").await.unwrap();
            check(
                keys.iter().all(|k| k == "owner" || k.starts_with('k')),
                "keys(*)",
            );
        }
        Isolation::Schema | Isolation::Row => {
            let n = neighbour(if isolation == Isolation::Schema {
                &tenants.prefix
            } else {
                &tenants.acl
            });
            // A path-like key is just a key under our own prefix.
            let sneaky: Option<String> = conn.get(&format!("../tenant_{n}:owner")).await.unwrap();
            check(sneaky.is_none(), "a ../ key");
            for cmd in [
                Command::new("KEYS").arg("*"),
                Command::new("SCAN").arg(0),
                Command::new("RANDOMKEY"),
                Command::new("FLUSHDB"),
                Command::new("SELECT").arg(1),
            ] {
                check(refused(conn.query(&cmd).await), cmd.name());
            }
            let keys = conn.keys("*").await.unwrap();
            check(
                keys.iter().all(|k| k == "owner" || k.starts_with('k')),
                "keys(*)",
            );
            let script = Command::new("EVAL")
                .arg("return redis.call('GET', ARGV[1])")
                .arg(0)
                .arg(format!("tenant_{n}:owner"));
            let r: Result<Option<String>, _> = conn.query(&script).await;
            match (isolation, r) {
                // Prefix isolation cannot confine a script: refused before sending.
                (Isolation::Schema, Err(e)) => check(ConfinementError::find(&e).is_some(), "EVAL"),
                // An ACL user is held to its keys by the server. Redis 7.0
                // reports the denial inside a script as `ERR The user executing
                // the script can't access ...`; outside one it is `NOPERM`.
                (Isolation::Row, Err(e)) => {
                    let noperm = redis_source(&e).map(|r| r.to_string()).is_some_and(|m| {
                        m.contains("NOPERM")
                            || m.contains("can't access")
                            || m.contains("no permissions")
                    });
                    check(noperm, &format!("EVAL on a neighbour's key ({e:?})"));
                }
                (_, Ok(v)) => tally.leak(format!("{t} ran a script reading {n}: {v:?}")),
                (_, Err(e)) => tally.leak(format!("{t}: unexpected {e}")),
            }
        }
    }
}

async fn unscoped_round(backend: &Arc<RedisBackend>, tally: &Tally, rng: &mut fastrand::Rng) {
    let mut conn = Checkout::acquire(backend, CheckoutRequest::with_timeout(TIMEOUT))
        .await
        .unwrap();
    tally.checkouts.fetch_add(1, Ordering::Relaxed);
    tally.unscoped.fetch_add(1, Ordering::Relaxed);
    let mut raw = conn.raw().unwrap();
    let owner: Option<String> = redis::cmd("GET")
        .arg("owner")
        .query_async(&mut raw)
        .await
        .unwrap();
    tally.reads.fetch_add(1, Ordering::Relaxed);
    if owner.as_deref() != Some("unscoped") {
        tally.leak(format!("an unscoped checkout started on owner {owner:?}"));
    }
    // Leave the session dirty: another database. The reset on return must undo it.
    let db = rng.u8(1..6);
    let _: () = redis::cmd("SELECT")
        .arg(db)
        .query_async(&mut raw)
        .await
        .unwrap();
    drop(conn);
}
