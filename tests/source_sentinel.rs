#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The router following real Redis Sentinel: a master, two replicas and three
//! sentinels from the test bed, writers and readers through one `Cluster`
//! whose endpoints and roles come from a `SentinelSource`.
//!
//! One test, serial phases (starting the bed is the slow part): a source
//! unreachable at start is an error naming it; kill -9 the master and measure
//! Sentinel's failover (kill to `+switch-master`, on a test-side subscription)
//! and the router's lag behind it (to the first write acknowledged by the new
//! master); restart the old master and check it gets no write while it is
//! empty and writable; kill every sentinel and check the last topology stays.
//!
//! Run with `cargo test -p switchyard --test source_sentinel -- --nocapture`
//! for the figures.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use switchyard_core::{EndpointId, Intent};
use switchyard_redis::{redis, redis_error, RedisBackend};
use switchyard_router::source::Member;
use switchyard_router::{Cluster, ClusterConfig, SourceState};
use switchyard_sources::{SentinelConfig, SentinelSource};
use switchyard_testkit::{free_port, poll_until, SentinelCluster, SENTINEL_MASTER};
use tokio::time::Instant;

/// One acknowledged write: when it was sent (an ack that arrives just
/// after a kill may have been written just before it), and which endpoint
/// acknowledged it.
#[derive(Debug, Clone)]
struct Ack {
    at: Instant,
    endpoint: EndpointId,
}

fn config() -> ClusterConfig {
    let mut c = ClusterConfig {
        checkout_timeout: Duration::from_millis(500),
        failover_timeout: Duration::from_millis(400),
        ..ClusterConfig::default()
    };
    c.health.interval = Duration::from_millis(250);
    c.health.timeout = Duration::from_millis(250);
    c.health.fall = 2;
    c.health.rise = 1;
    c
}

fn source(urls: Vec<String>) -> SentinelSource {
    SentinelSource::new(SentinelConfig {
        sentinels: urls,
        master: SENTINEL_MASTER.into(),
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(300),
    })
    .unwrap()
}

fn backend(m: &Member) -> Result<Arc<RedisBackend>, switchyard_core::Error> {
    let b = RedisBackend::builder(m.name.as_str(), format!("redis://{}:{}", m.host, m.port))
        .max_size(4)
        .acquire_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(200))
        .recycle_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(300))
        .build()?;
    Ok(Arc::new(b))
}

/// Writes `SET w:<n> <n>` through the router until `stop`, logging each ack.
fn spawn_writer(
    cluster: Cluster<RedisBackend>,
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.is_cancelled() {
            n += 1;
            let sent = Instant::now();
            let write = async {
                let mut conn = cluster.checkout(Intent::Write, None).await?;
                let ep = conn.endpoint().clone();
                let mut raw = conn.raw()?;
                let () = redis::cmd("SET")
                    .arg(format!("w:{n}"))
                    .arg(n)
                    .query_async(&mut raw)
                    .await
                    .map_err(|e| redis_error(&ep, None, e))?;
                Ok::<_, switchyard_core::Error>(ep)
            };
            if let Ok(Ok(endpoint)) = tokio::time::timeout(Duration::from_millis(600), write).await
            {
                acks.lock().unwrap().push(Ack { at: sent, endpoint });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// Reads `GET hot` through the router until `stop`; counts successes.
fn spawn_reader(
    cluster: Cluster<RedisBackend>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut ok = 0;
        while !stop.is_cancelled() {
            let read = async {
                let mut conn = cluster.checkout(Intent::Read, None).await?;
                conn.get::<Option<String>>("hot").await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(600), read).await {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ok
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_follows_sentinel() {
    let wall = std::time::Instant::now();

    // An unreachable source at start is an error naming it.
    let nobody = format!("redis://127.0.0.1:{}", free_port().unwrap());
    let lonely = Cluster::<RedisBackend>::builder("nowhere")
        .engine("redis")
        .build()
        .unwrap();
    let err = lonely
        .follow(source(vec![nobody.clone()]), backend)
        .ready(Duration::from_secs(3))
        .await
        .unwrap_err();
    let text = err.to_string();
    println!("unreachable at start: {text}");
    assert!(text.contains("cluster nowhere"), "{text}");
    assert!(text.contains(&nobody.replace("redis://", "")), "{text}");
    assert!(text.contains("0 of 1 sentinels answered"), "{text}");
    lonely.close();

    let started = Instant::now();
    let bed = SentinelCluster::start(2).await.unwrap();
    println!(
        "sentinel bed (master + 2 replicas + 3 sentinels) started in {:?}",
        started.elapsed()
    );
    let old_master = bed.redis().master();
    let old_id = EndpointId::new(format!("127.0.0.1:{}", old_master.port()));

    let cluster = Cluster::<RedisBackend>::builder("cache")
        .engine("redis")
        .config(config())
        .build()
        .unwrap();
    cluster
        .follow(source(bed.sentinel_urls()), backend)
        .ready(Duration::from_secs(5))
        .await
        .unwrap();
    let status = poll_until(
        "the router to write to the master",
        Duration::from_secs(5),
        || async {
            let s = cluster.status();
            (s.writer.as_ref() == Some(&old_id)).then_some(s)
        },
    )
    .await
    .unwrap();
    let src = status.source.clone().unwrap();
    assert_eq!(src.state, SourceState::Following);
    assert_eq!(src.primary.as_ref(), Some(&old_id));
    assert_eq!(status.endpoints.len(), 3, "{status:#?}");

    // Test-side subscriptions on every sentinel timestamp Sentinel's own
    // decision: the first `+switch-master` any of them publishes.
    let (switch_tx, mut switch_rx) = tokio::sync::mpsc::unbounded_channel();
    for url in bed.sentinel_urls() {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe("+switch-master").await.unwrap();
        let tx = switch_tx.clone();
        tokio::spawn(async move {
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let _ = tx.send((Instant::now(), msg.get_payload::<String>().unwrap()));
            }
        });
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let acks = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..2)
        .map(|_| spawn_writer(cluster.clone(), acks.clone(), stop.clone()))
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| spawn_reader(cluster.clone(), stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Kill -9 the master.
    let killed = Instant::now();
    old_master.kill().await.unwrap();
    let (switched, payload) = tokio::time::timeout(Duration::from_secs(20), switch_rx.recv())
        .await
        .expect("no +switch-master within 20 s")
        .unwrap();
    println!("+switch-master {payload}");
    let new_port: u16 = payload.split(' ').nth(4).unwrap().parse().unwrap();
    let new_id = EndpointId::new(format!("127.0.0.1:{new_port}"));
    let first_new = poll_until(
        "a write acknowledged by the new master",
        Duration::from_secs(10),
        || async {
            acks.lock()
                .unwrap()
                .iter()
                .find(|a| a.endpoint == new_id)
                .map(|a| a.at)
        },
    )
    .await
    .unwrap();
    let failover = switched - killed;
    // Signed: the router's own subscription may hear a sentinel first.
    let lag_ms = if first_new >= switched {
        ms(first_new - switched)
    } else {
        -ms(switched - first_new)
    };
    let last_old = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.endpoint == old_id)
        .map(|a| a.at)
        .max()
        .unwrap();
    println!(
        "sentinel failover (kill -9 -> first +switch-master): {:.0} ms; router lag (+switch-master -> first write on the new master): {lag_ms:.0} ms; write gap: {:.0} ms",
        ms(failover),
        ms(first_new - last_old)
    );
    assert!(
        lag_ms < 500.0,
        "writes resumed {lag_ms} ms after +switch-master"
    );
    assert!(
        acks.lock()
            .unwrap()
            .iter()
            .all(|a| a.endpoint != old_id || a.at <= killed),
        "a write was acknowledged by the killed master"
    );

    // Restart the old master: it comes back empty and writable, until the
    // sentinels make it a replica of the new master.
    // The source lists the old master as a replica from the switch on, so
    // while it probes as a master it serves nothing.
    let before = cluster
        .status()
        .endpoint(old_id.as_str())
        .map_or(0, |e| e.counters.checkouts);
    old_master.restart().await.unwrap();
    let restarted = Instant::now();
    let mut window = Duration::ZERO;
    let client = redis::Client::open(old_master.url()).unwrap();
    let checkouts = || {
        cluster
            .status()
            .endpoint(old_id.as_str())
            .map_or(0, |e| e.counters.checkouts)
    };
    // The router's count as of the last time the node was seen a master,
    // read before that look: every checkout it includes happened while the
    // node was still an empty, writable master. (Once demoted it is a
    // replica, and a router probe can see that before this loop does.)
    let mut while_master = before;
    loop {
        let counted = checkouts();
        // The demotion drops client connections: a fresh one each round.
        let Ok(mut direct) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let checked: redis::RedisResult<(Vec<redis::Value>, i64)> = redis::pipe()
            .cmd("ROLE")
            .cmd("DBSIZE")
            .query_async(&mut direct)
            .await;
        let Ok((role, keys)) = checked else { continue };
        let master = matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master");
        if !master {
            break;
        }
        assert_eq!(
            keys, 0,
            "the restarted old master took writes while empty and writable"
        );
        while_master = counted;
        window = restarted.elapsed();
        assert!(window < Duration::from_secs(30), "never demoted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let writes_to_old = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.endpoint == old_id && a.at > killed)
        .count();
    println!(
        "restarted old master empty and writable for {:.0} ms: {} router checkouts, {writes_to_old} writes acknowledged",
        ms(window),
        while_master - before
    );
    assert_eq!(
        while_master, before,
        "the router sent checkouts to the empty old master"
    );
    assert_eq!(writes_to_old, 0);
    // Demoted and synced, it serves reads again.
    poll_until(
        "the old master to serve reads as a replica",
        Duration::from_secs(20),
        || async {
            cluster
                .status()
                .endpoint(old_id.as_str())
                .filter(|e| e.serves_reads)
                .map(drop)
        },
    )
    .await
    .unwrap();

    // Every sentinel gone: the last topology stays and writes still flow.
    for s in bed.sentinels() {
        s.kill().await.unwrap();
    }
    let lost = poll_until(
        "the source to be reported unreachable",
        Duration::from_secs(5),
        || async {
            cluster
                .status()
                .source
                .filter(|s| s.state == SourceState::Unreachable)
        },
    )
    .await
    .unwrap();
    println!("sentinels gone: {:?}", lost.last_error);
    assert!(lost
        .last_error
        .unwrap()
        .contains("0 of 3 sentinels answered"));
    let acked = acks.lock().unwrap().len();
    poll_until(
        "writes to go on without the sentinels",
        Duration::from_secs(5),
        || async { (acks.lock().unwrap().len() > acked + 20).then_some(()) },
    )
    .await
    .unwrap();
    // Sentinel may fail over again before its sentinels are killed (a new
    // master starved of CPU for `down-after-milliseconds` on a loaded
    // machine): the topology that stays is the last one the source reported,
    // and its master is the last `+switch-master` any sentinel published.
    let mut last_switch = payload;
    while let Ok((_, p)) = switch_rx.try_recv() {
        if p != last_switch {
            println!("+switch-master {p} (a later failover)");
        }
        last_switch = p;
    }
    let last_port: u16 = last_switch.split(' ').nth(4).unwrap().parse().unwrap();
    let last_id = EndpointId::new(format!("127.0.0.1:{last_port}"));
    assert_eq!(lost.primary.as_ref(), Some(&last_id));
    assert_eq!(cluster.status().writer.as_ref(), Some(&last_id));

    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 0);
    println!(
        "{} writes acknowledged, {reads} reads; test wall time {:.1} s",
        acks.lock().unwrap().len(),
        wall.elapsed().as_secs_f64()
    );
}
