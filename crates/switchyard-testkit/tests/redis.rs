#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Redis master + replicas against real `redis-server` processes.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use switchyard_testkit::{wait_until, RedisCluster};
use tokio::net::TcpStream;

const SHORT: Duration = Duration::from_millis(500);

async fn connect(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("connect timed out")
    .expect("connect failed")
}

async fn start(replicas: usize) -> RedisCluster {
    let started = Instant::now();
    let cluster = RedisCluster::start(replicas)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "redis master+{replicas} replicas started in {} ms",
        started.elapsed().as_millis()
    );
    cluster
}

#[tokio::test]
async fn replicas_see_what_the_master_writes() {
    let redis = start(2).await;
    assert_eq!(redis.replicas().len(), 2);
    assert_eq!(redis.master().role().await.unwrap(), "master");

    let mut master = connect(&redis.master().url()).await;
    let _: () = master.set("greeting", "hello").await.unwrap();

    for replica in redis.replicas() {
        assert_eq!(replica.role().await.unwrap(), "slave");
        let mut conn = connect(&replica.url()).await;
        wait_until(Duration::from_secs(5), || {
            let mut conn = conn.clone();
            async move {
                let value: Option<String> = conn.get("greeting").await.unwrap_or(None);
                value.as_deref() == Some("hello")
            }
        })
        .await
        .unwrap();
        let err = conn.set::<_, _, ()>("k", "v").await.unwrap_err();
        assert!(err.to_string().to_lowercase().contains("read"), "{err}");
    }
}

#[tokio::test]
async fn pause_hangs_kill_refuses_restart_recovers() {
    let redis = start(0).await;
    let node = redis.master();
    let mut conn = connect(&node.url()).await;

    node.pause().await.unwrap();
    // No PONG: either our timeout or the driver's own reply timeout fires first.
    let ping =
        tokio::time::timeout(SHORT, redis::cmd("PING").query_async::<String>(&mut conn)).await;
    assert!(
        !matches!(ping, Ok(Ok(_))),
        "PING on a paused redis must not answer: {ping:?}"
    );
    let attempt = tokio::time::timeout(SHORT, TcpStream::connect(node.addr())).await;
    assert!(
        matches!(attempt, Ok(Ok(_))),
        "a paused redis still accepts TCP connections"
    );

    node.resume().await.unwrap();
    let mut fresh = connect(&node.url()).await;
    let pong: String = redis::cmd("PING").query_async(&mut fresh).await.unwrap();
    assert_eq!(pong, "PONG");

    node.kill().await.unwrap();
    assert!(node.pid().is_none());
    let refused = TcpStream::connect(node.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    node.restart().await.unwrap();
    let mut again = connect(&node.url()).await;
    let pong: String = redis::cmd("PING").query_async(&mut again).await.unwrap();
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn promoted_replica_accepts_writes() {
    let redis = start(1).await;
    let replica = &redis.replicas()[0];
    redis.master().kill().await.unwrap();

    let promoted = Instant::now();
    replica.promote().await.unwrap();
    eprintln!("redis promote took {} ms", promoted.elapsed().as_millis());
    assert_eq!(replica.role().await.unwrap(), "master");

    let mut conn = connect(&replica.url()).await;
    let _: () = conn.set("after", "failover").await.unwrap();
    let value: String = conn.get("after").await.unwrap();
    assert_eq!(value, "failover");

    // Restarted after the promotion, it stays a master (a restart keeps what
    // the operator last said) until it is re-pointed at the restarted master.
    redis.master().restart().await.unwrap();
    replica.restart().await.unwrap();
    assert_eq!(replica.role().await.unwrap(), "master");
    replica.replicaof(redis.master()).await.unwrap();
    assert_eq!(replica.role().await.unwrap(), "slave");
}
