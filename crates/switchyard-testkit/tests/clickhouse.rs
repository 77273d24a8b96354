#![allow(clippy::unwrap_used, clippy::expect_used)]
//! ClickHouse against a real `clickhouse-server` process, over raw HTTP.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use switchyard_testkit::ClickHouse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET /ping` by hand, so this test does not go through the crate's own client.
async fn ping(ch: &ClickHouse) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(ch.addr()).await?;
    stream
        .write_all(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::test]
async fn create_insert_select_and_faults() {
    let started = Instant::now();
    let ch = ClickHouse::start().await.unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "clickhouse started in {} ms at {}",
        started.elapsed().as_millis(),
        ch.http_url()
    );
    let version = ch.query("SELECT version()").await.unwrap();
    eprintln!("clickhouse version {}", version.trim());

    ch.query("CREATE TABLE events (id UInt32, name String) ENGINE = MergeTree ORDER BY id")
        .await
        .unwrap();
    ch.query("INSERT INTO events VALUES (1, 'one'), (2, 'two')")
        .await
        .unwrap();
    let rows = ch
        .query("SELECT id, name FROM events ORDER BY id")
        .await
        .unwrap();
    assert_eq!(rows, "1\tone\n2\ttwo\n");
    assert!(ch.query("SELECT * FROM missing_table").await.is_err());

    assert!(ping(&ch).await.unwrap().ends_with("Ok.\n"));
    ch.pause().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), ping(&ch))
            .await
            .is_err(),
        "a paused clickhouse must not answer"
    );
    ch.resume().await.unwrap();
    assert!(ping(&ch).await.unwrap().ends_with("Ok.\n"));

    ch.kill().await.unwrap();
    assert_eq!(
        TcpStream::connect(ch.addr()).await.unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    let restarted = Instant::now();
    ch.restart().await.unwrap();
    eprintln!(
        "clickhouse restart took {} ms",
        restarted.elapsed().as_millis()
    );
    let count = ch.query("SELECT count() FROM events").await.unwrap();
    assert_eq!(count.trim(), "2");
}
