#![allow(clippy::unwrap_used, clippy::expect_used)]
//! FaultProxy in front of a tiny echo server and in front of a real Redis.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchyard_testkit::{poll_until, wait_until, FaultProxy, RedisCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SHORT: Duration = Duration::from_millis(300);

/// An echo server on a free port; it runs until the test's runtime ends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(message).await?;
    let mut reply = vec![0; message.len()];
    stream.read_exact(&mut reply).await?;
    Ok(reply)
}

#[tokio::test]
async fn forwards_and_adds_latency() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut conn, b"hello").await.unwrap(), b"hello");
    assert_eq!(proxy.accepted(), 1);

    let latency = Duration::from_millis(100);
    proxy.set_latency(latency);
    let started = Instant::now();
    assert_eq!(round_trip(&mut conn, b"slow").await.unwrap(), b"slow");
    let elapsed = started.elapsed();
    eprintln!("echo round trip with 100 ms latency per chunk: {elapsed:?}");
    assert!(elapsed >= latency, "{elapsed:?}");

    proxy.heal();
    let started = Instant::now();
    round_trip(&mut conn, b"fast").await.unwrap();
    eprintln!("echo round trip after heal: {:?}", started.elapsed());
}

#[tokio::test]
async fn reset_breaks_open_connections() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut conn, b"ping").await.unwrap();
    wait_until(Duration::from_secs(5), || async { proxy.active() == 1 })
        .await
        .unwrap();

    proxy.reset_all();
    let mut buf = [0; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("reset did not reach the client");
    assert_eq!(read.unwrap_err().kind(), ErrorKind::ConnectionReset);

    // New connections work after a reset.
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut fresh, b"again").await.unwrap(), b"again");
}

#[tokio::test]
async fn stalls_time_out_and_heal_recovers() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut open, b"warm").await.unwrap();

    // New connections hang; open ones keep working.
    proxy.stall_new(true);
    let mut stalled = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(
        tokio::time::timeout(SHORT, round_trip(&mut stalled, b"new"))
            .await
            .is_err()
    );
    round_trip(&mut open, b"still").await.unwrap();

    // Blackhole: open connections stop too.
    proxy.stall_all(true);
    assert!(tokio::time::timeout(SHORT, round_trip(&mut open, b"hole"))
        .await
        .is_err());

    proxy.heal();
    // The requests made during the stall are delivered once healed.
    let mut late = [0; 4];
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut late))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&late, b"hole");
    let mut late = [0; 3];
    tokio::time::timeout(Duration::from_secs(5), stalled.read_exact(&mut late))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&late, b"new");
    assert_eq!(round_trip(&mut open, b"ok").await.unwrap(), b"ok");
}

#[tokio::test]
async fn refuse_closes_the_port_until_healed() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut open, b"before").await.unwrap();

    proxy.refuse(true);
    wait_until(Duration::from_secs(5), || async {
        matches!(TcpStream::connect(proxy.addr()).await, Err(e) if e.kind() == ErrorKind::ConnectionRefused)
    })
    .await
    .unwrap();
    // Open connections are not affected.
    round_trip(&mut open, b"during").await.unwrap();

    proxy.heal();
    let mut fresh = wait_until_connected(proxy.addr()).await;
    assert_eq!(round_trip(&mut fresh, b"after").await.unwrap(), b"after");
}

async fn wait_until_connected(addr: SocketAddr) -> TcpStream {
    poll_until(
        "the proxy to accept again",
        Duration::from_secs(5),
        || async move { TcpStream::connect(addr).await.ok() },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn dead_upstream_is_a_reset() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    drop(upstream);
    let proxy = FaultProxy::start(addr).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Err(ref e) if e.kind() == ErrorKind::ConnectionReset)
            || matches!(read, Ok(0))
    );
}

#[tokio::test]
async fn in_front_of_redis() {
    let redis = RedisCluster::start(0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy = FaultProxy::start(redis.master().addr()).await.unwrap();
    let client = redis::Client::open(format!("redis://{}", proxy.addr())).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");

    let latency = Duration::from_millis(50);
    proxy.set_latency(latency);
    let started = Instant::now();
    let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    let elapsed = started.elapsed();
    eprintln!("redis PING through the proxy with 50 ms latency: {elapsed:?}");
    assert!(elapsed >= latency, "{elapsed:?}");

    proxy.heal();
    proxy.stall_all(true);
    let stalled =
        tokio::time::timeout(SHORT, redis::cmd("PING").query_async::<String>(&mut conn)).await;
    assert!(stalled.is_err(), "a blackholed PING must time out");

    proxy.heal();
    proxy.reset_all();
    let mut fresh = wait_until_redis(&client).await;
    let pong: String = redis::cmd("PING").query_async(&mut fresh).await.unwrap();
    assert_eq!(pong, "PONG");
    assert!(proxy.accepted() >= 2);
}

async fn wait_until_redis(client: &redis::Client) -> redis::aio::MultiplexedConnection {
    poll_until(
        "redis through the proxy",
        Duration::from_secs(5),
        || async {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let pong = redis::cmd("PING").query_async::<String>(&mut conn).await;
            pong.ok().map(|_| conn)
        },
    )
    .await
    .unwrap()
}
