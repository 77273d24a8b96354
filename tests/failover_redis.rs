#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fault tolerance of the router over real Redis: the scenarios of
//! `tests/failover/mod.rs` over a master and two replicas.
//!
//! Run with `cargo test -p switchyard --test failover_redis -- --nocapture`
//! to see each test's timeline: detection times, promotion follow time and
//! failed operations per phase.

mod common;
#[macro_use]
mod failover;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use failover::{Fixture, Routed};
use switchyard_core::{BackendErrorKind, EndpointId, Error, Intent};
use switchyard_redis::{redis, redis_error, RedisBackend};
use switchyard_router::CheckoutOptions;
use switchyard_testkit::{poll_until, RedisCluster, RedisNode};
use tokio::time::Instant;

/// A direct connection to `node`, outside the router.
async fn direct(node: &RedisNode) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(node.url()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("connect timed out")
    .unwrap()
}

/// `GET hot` reads, `SET w:<id> <id>` writes.
struct Redis;

impl Fixture for Redis {
    type Backend = RedisBackend;
    type Bed = RedisCluster;
    const ENGINE: &'static str = "redis";
    const SETTLE: (usize, usize) = (300, 100);
    /// A `SET` sent before the kill may have its reply read just after.
    const ACK_AFTER_KILL: bool = true;

    /// The key `hot` on every node.
    async fn prepare(rc: &RedisCluster, tl: &Timeline) {
        let mut master = direct(rc.master()).await;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut master)
            .await
            .unwrap();
        let version = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("redis_version:"))
            .unwrap_or("?")
            .to_owned();
        tl.mark(format!(
            "real Redis {version} master {} + replicas {}, {} started",
            rc.master().addr(),
            rc.replicas()[0].addr(),
            rc.replicas()[1].addr()
        ));
        let () = redis::cmd("SET")
            .arg("hot")
            .arg("1")
            .query_async(&mut master)
            .await
            .unwrap();
        for replica in rc.replicas() {
            let conn = direct(replica).await;
            poll_until("the hot key on a replica", WAIT, || {
                let mut conn = conn.clone();
                async move {
                    let v: Option<String> = redis::cmd("GET")
                        .arg("hot")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    v.map(drop)
                }
            })
            .await
            .unwrap();
        }
    }

    /// Connecting, recycling and each reply bounded well under the router's
    /// attempt timeout.
    fn backend(id: &str, node: &RedisNode) -> Arc<Counted<RedisBackend>> {
        Counted::new(
            RedisBackend::builder(id, node.url())
                .max_size(8)
                .acquire_timeout(Duration::from_secs(1))
                .connect_timeout(Duration::from_millis(300))
                .recycle_timeout(Duration::from_millis(300))
                .response_timeout(Duration::from_millis(500))
                .build()
                .unwrap(),
        )
    }

    /// Retried on another endpoint when the checkout or the command fails
    /// with a retryable error, or overruns the router's attempt timeout
    /// (which bounds the command too).
    fn reader(cluster: &Routed<Self>) -> ReadFn {
        let cluster = cluster.clone();
        Arc::new(move |deadline| Box::pin(read(cluster.clone(), deadline)))
    }

    fn writer(cluster: &Routed<Self>) -> WriteFn {
        writer(cluster, None)
    }

    /// A write served by the original master is acknowledged only when
    /// `WAIT 2 1000` (same round trip) reports both replicas have applied
    /// it; the promoted replica keeps what it had. Writes served by the
    /// promoted replica are acknowledged on its reply (the other replica
    /// still follows the dead master: nothing to wait for) and are read back
    /// from that same node.
    async fn durable_writer(_: &RedisCluster, cluster: &Routed<Self>, tl: &Timeline) -> WriteFn {
        tl.note("writes on redis-0 are SET + WAIT 2");
        writer(cluster, Some("redis-0"))
    }

    /// The test bed brings it back empty, as a master (split brain), and the
    /// other replica resyncs from it.
    async fn reopened(old: &RedisNode) {
        assert_eq!(old.role().await.unwrap(), "master");
    }

    async fn stored(node: &RedisNode) -> HashSet<i64> {
        let mut conn = direct(node).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("w:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.iter()
            .filter_map(|k| k.strip_prefix("w:")?.parse().ok())
            .collect()
    }

    /// A write `WAIT` could not confirm on both replicas.
    fn clear_in_gap(op: &Op) -> bool {
        op.error.as_deref() == Some("server@redis-0")
            && op
                .message
                .as_deref()
                .is_some_and(|m| m.contains("unconfirmed"))
    }
}

async fn read(cluster: Routed<Redis>, deadline: Instant) -> Result<String, Error> {
    let opts = CheckoutOptions::new().deadline(deadline);
    cluster
        .run(Intent::Read, None, opts, async |conn| {
            conn.get::<Option<String>>("hot").await?;
            Ok::<_, Error>(conn.endpoint().to_string())
        })
        .await
}

/// `SET w:<id> <id>`; with `confirm_on` naming an endpoint, a write served
/// there is acknowledged only once `WAIT 2` says both replicas have it.
fn writer(cluster: &Routed<Redis>, confirm_on: Option<&'static str>) -> WriteFn {
    let cluster = cluster.clone();
    Arc::new(move |id, deadline| Box::pin(write(cluster.clone(), confirm_on, id, deadline)))
}

async fn write(
    cluster: Routed<Redis>,
    confirm_on: Option<&'static str>,
    id: i64,
    deadline: Instant,
) -> Result<String, Error> {
    let opts = CheckoutOptions::new().deadline(deadline);
    // Owned captures only: a captured reference, even `&'static`, makes the
    // future not provably `Send` (a rustc limitation with async closures).
    let confirm_on = confirm_on.map(EndpointId::new);
    // The closure's one attempt (a write) runs to `deadline`, which the
    // router enforces: a cancelled write is an `OperationTimeout`.
    cluster
        .run(Intent::Write, None, opts, async move |conn| {
            let ep = conn.endpoint().clone();
            let confirm = confirm_on.as_ref() == Some(&ep);
            let mut raw = conn.raw()?;
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(format!("w:{id}")).arg(id);
            if !confirm {
                let ((),): ((),) = pipe
                    .query_async(&mut raw)
                    .await
                    .map_err(|e| redis_error(&ep, None, e))?;
                return Ok(ep.to_string());
            }
            pipe.cmd("WAIT").arg(2).arg(1000);
            let ((), replicas): ((), i64) = pipe
                .query_async(&mut raw)
                .await
                .map_err(|e| redis_error(&ep, None, e))?;
            if replicas < 2 {
                return Err(Error::backend(
                    &ep,
                    None,
                    BackendErrorKind::Rejected,
                    std::io::Error::other(format!(
                        "unconfirmed: WAIT saw {replicas} of 2 replicas"
                    )),
                ));
            }
            Ok(ep.to_string())
        })
        .await
}

failover_tests!(Redis);
