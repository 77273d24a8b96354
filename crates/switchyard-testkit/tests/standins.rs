#![allow(clippy::unwrap_used, clippy::expect_used)]
//! MongoDB and Elasticsearch: the real servers when their URLs are in the
//! environment, else the stand-ins. Every test prints which one it ran against.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use elasticsearch::http::transport::Transport;
use elasticsearch::params::Refresh;
use elasticsearch::{Elasticsearch, IndexParts, SearchParts};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use switchyard_testkit::{ElasticServer, MongoServer, ServerKind, TestkitError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn mongodb_round_trip() {
    let started = Instant::now();
    let server = MongoServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} (started in {} ms)",
        server.describe(),
        started.elapsed().as_millis()
    );

    let client = mongodb::Client::with_uri_str(server.url()).await.unwrap();
    let db_name = format!("testkit_{}", std::process::id());
    let items = client.database(&db_name).collection::<Document>("items");
    items
        .insert_one(doc! { "name": "one", "n": 1 })
        .await
        .unwrap();
    let found = items
        .find_one(doc! { "name": "one" })
        .await
        .unwrap()
        .expect("inserted document not found");
    assert_eq!(found.get_i32("n").unwrap(), 1);
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 1);

    match server.kind() {
        ServerKind::StandIn { name } => {
            assert_eq!(name, "nx-27017");
            assert!(server.describe().starts_with("MongoDB stand-in nx-27017 "));
            let addr = server.addr().unwrap();
            server.kill().await.unwrap();
            let refused = TcpStream::connect(addr).await.unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
            server.restart().await.unwrap();
            let client = mongodb::Client::with_uri_str(server.url()).await.unwrap();
            client
                .database(&db_name)
                .run_command(doc! { "ping": 1 })
                .await
                .unwrap();
        }
        ServerKind::Real => {
            let err = server.kill().await.unwrap_err();
            assert!(matches!(err, TestkitError::Unsupported { .. }), "{err}");
            client.database(&db_name).drop().await.unwrap();
        }
    }
}

#[tokio::test]
async fn elasticsearch_index_and_search() {
    let started = Instant::now();
    let server = ElasticServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} (started in {} ms)",
        server.describe(),
        started.elapsed().as_millis()
    );

    let client = Elasticsearch::new(Transport::single_node(server.url()).unwrap());
    let index = format!("testkit-{}", std::process::id());
    let indexed = client
        .index(IndexParts::IndexId(&index, "1"))
        .body(json!({ "title": "switchyard", "n": 1 }))
        .refresh(Refresh::True)
        .send()
        .await
        .unwrap();
    assert!(indexed.status_code().is_success(), "{indexed:?}");

    let response = client
        .search(SearchParts::Index(&[&index]))
        .body(json!({ "query": { "match": { "title": "switchyard" } } }))
        .send()
        .await
        .unwrap();
    assert!(response.status_code().is_success());
    let body: Value = response.json().await.unwrap();
    let hits = body["hits"]["hits"].as_array().expect("no hits array");
    assert_eq!(hits.len(), 1, "{body}");
    assert_eq!(hits[0]["_source"]["title"], "switchyard");

    if let ServerKind::StandIn { name } = server.kind() {
        assert_eq!(name, "noida-db");
        server.pause().await.unwrap();
        // A fresh connection, not the client's pool: a keep-alive connection the
        // stand-in closed just before the pause fails at once, which says nothing
        // about whether a paused server answers.
        let mut stream = TcpStream::connect(server.addr().unwrap()).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        let hung = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
        assert!(hung.is_err(), "a paused stand-in must not answer: {hung:?}");
        drop(stream);
        server.resume().await.unwrap();
        let ping = client.ping().send().await.unwrap();
        assert!(ping.status_code().is_success());
        server.kill().await.unwrap();
        let refused = TcpStream::connect(server.addr().unwrap())
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
        // The stand-in comes back on the same port (its data may not survive a kill).
        server.restart().await.unwrap();
        let ping = client.ping().send().await.unwrap();
        assert!(ping.status_code().is_success());
    }
}
