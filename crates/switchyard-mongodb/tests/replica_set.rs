#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Roles, lag and failover on a real replica set.
//!
//! These need `SWITCHYARD_MONGODB_URL` to point at a MongoDB replica set (for
//! example the one in docker-compose.yml). Against the nx-27017 stand-in, which
//! has no replica sets, they say so loudly and return: the one skip in this
//! crate's tests.

mod common;

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Bson};
use switchyard_core::{Backend, BackendErrorKind, Checkout, CheckoutRequest, Role};
use switchyard_mongodb::{MongoBackend, MongoBackendConfig, Topology};
use switchyard_testkit::{poll_until, wait_until, MongoServer, ServerKind};

use common::*;

const SKIP: &str = "skipped: needs a real MongoDB replica set (set SWITCHYARD_MONGODB_URL); \
                    the nx-27017 stand-in has no replica sets";

/// The server and its members' `host:port`s, or `None` (after saying so) when
/// there is no replica set to test.
async fn replica_set() -> Option<(MongoServer, Vec<String>)> {
    let server = server().await;
    if server.kind() != ServerKind::Real {
        loud(SKIP);
        return None;
    }
    let hello = hello(server.url()).await;
    let Ok(set) = hello.get_str("setName") else {
        loud(&format!(
            "{SKIP} (SWITCHYARD_MONGODB_URL points at a server outside any replica set)"
        ));
        return None;
    };
    let hosts: Vec<String> = hello
        .get_array("hosts")
        .unwrap()
        .iter()
        .filter_map(Bson::as_str)
        .map(str::to_owned)
        .collect();
    eprintln!("replica set {set} with members {hosts:?}");
    Some((server, hosts))
}

fn member(server: &MongoServer, host: &str, database: &str) -> Arc<MongoBackend> {
    let mut config = config(&direct_url(server.url(), host), database, 4);
    config.endpoint = switchyard_core::EndpointId::new(host);
    config.server_selection_timeout = Some(Duration::from_secs(2));
    config.heartbeat_interval = Duration::from_millis(500);
    Arc::new(MongoBackend::new(config).unwrap())
}

fn whole_set(server: &MongoServer, database: &str) -> Arc<MongoBackend> {
    let mut config: MongoBackendConfig = config(server.url(), database, 4);
    config.topology = Topology::ReplicaSet;
    config.server_selection_timeout = Some(Duration::from_secs(5));
    Arc::new(MongoBackend::new(config).unwrap())
}

async fn roles(members: &[Arc<MongoBackend>]) -> Vec<Option<Role>> {
    let mut roles = Vec::new();
    for m in members {
        roles.push(m.probe(Duration::from_secs(3)).await.ok().map(|p| p.role));
    }
    roles
}

async fn unscoped(backend: &Arc<MongoBackend>) -> Checkout<MongoBackend> {
    Checkout::acquire(
        backend,
        CheckoutRequest::with_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn members_report_their_roles_and_secondaries_their_lag() {
    let Some((server, hosts)) = replica_set().await else {
        return;
    };
    let db = unique("rs");
    let members: Vec<_> = hosts.iter().map(|h| member(&server, h, &db)).collect();
    let mut primaries = 0;
    for (host, backend) in hosts.iter().zip(&members) {
        let probe = backend.probe(Duration::from_secs(5)).await.unwrap();
        eprintln!("{host}: {probe:?}");
        match probe.role {
            Role::Primary => {
                primaries += 1;
                assert_eq!(probe.lag, None);
            }
            Role::Replica => {
                if probe.lag.is_none() {
                    eprintln!(
                        "{host}: no lag reported (replSetGetStatus needs the clusterMonitor role)"
                    );
                }
            }
            Role::Standalone => panic!("{host} reported standalone"),
        }
        assert!(probe.version.is_some());
    }
    assert_eq!(primaries, 1, "exactly one primary");

    // The whole set behind one backend: the driver finds the primary.
    let set = whole_set(&server, &db);
    assert_eq!(
        set.probe(Duration::from_secs(5)).await.unwrap().role,
        Role::Primary
    );
    let conn = unscoped(&set).await;
    conn.collection("items")
        .unwrap()
        .insert_one(doc! { "n": 1 }, None)
        .await
        .unwrap();
    drop(conn);

    // A secondary reached directly refuses writes as read-only, and serves reads.
    for (backend, role) in members.iter().zip(roles(&members).await) {
        if role != Some(Role::Replica) {
            continue;
        }
        let conn = unscoped(backend).await;
        let items = conn.collection("items").unwrap();
        let err = items.insert_one(doc! { "n": 2 }, None).await.unwrap_err();
        assert_eq!(
            err.backend_kind(),
            Some(BackendErrorKind::ReadOnly),
            "{err:?}"
        );
        assert!(err.is_retryable() && !err.is_endpoint_failure());
        wait_until(Duration::from_secs(10), || async {
            items
                .find(doc! { "n": 1 }, None)
                .await
                .is_ok_and(|d| d.len() == 1)
        })
        .await
        .unwrap();
    }
    cleanup(&server, server.url(), [db]).await;
}

#[tokio::test]
async fn after_a_step_down_probes_follow_the_new_primary() {
    let Some((server, hosts)) = replica_set().await else {
        return;
    };
    if hosts.len() < 2 {
        loud(&format!(
            "{SKIP} (the set has a single member, so there is nothing to fail over to)"
        ));
        return;
    }
    let db = unique("fo");
    let members: Vec<_> = hosts.iter().map(|h| member(&server, h, &db)).collect();
    let before = roles(&members).await;
    let old = before
        .iter()
        .position(|r| *r == Some(Role::Primary))
        .expect("a primary");
    eprintln!("primary before: {}", hosts[old]);

    let conn = unscoped(&members[old]).await;
    // The primary may close connections while stepping down; the answer does
    // not matter, the probes do.
    let step = conn
        .client()
        .unwrap()
        .database("admin")
        .run_command(doc! { "replSetStepDown": 30, "secondaryCatchUpPeriodSecs": 10 })
        .await;
    eprintln!("replSetStepDown: {step:?}");
    drop(conn);

    let new = poll_until("a new primary", Duration::from_secs(90), || {
        let members = &members;
        async move {
            let now = roles(members).await;
            now.iter()
                .enumerate()
                .find(|(i, r)| *i != old && **r == Some(Role::Primary))
                .map(|(i, _)| i)
        }
    })
    .await
    .unwrap();
    eprintln!("primary after: {}", hosts[new]);
    wait_until(Duration::from_secs(30), || async {
        members[old]
            .probe(Duration::from_secs(3))
            .await
            .is_ok_and(|p| p.role == Role::Replica)
    })
    .await
    .unwrap();

    // Writes through the old primary are refused as read-only; the new one and
    // the whole-set backend take them.
    let conn = unscoped(&members[old]).await;
    let err = conn
        .collection("items")
        .unwrap()
        .insert_one(doc! { "n": 1 }, None)
        .await
        .unwrap_err();
    assert_eq!(
        err.backend_kind(),
        Some(BackendErrorKind::ReadOnly),
        "{err:?}"
    );
    drop(conn);
    let conn = unscoped(&members[new]).await;
    conn.collection("items")
        .unwrap()
        .insert_one(doc! { "n": 2 }, None)
        .await
        .unwrap();
    drop(conn);
    let set = whole_set(&server, &db);
    let conn = unscoped(&set).await;
    let items = conn.collection("items").unwrap();
    wait_until(Duration::from_secs(30), || async {
        items.insert_one(doc! { "n": 3 }, None).await.is_ok()
    })
    .await
    .unwrap();
    drop(items);
    drop(conn);
    assert_eq!(
        set.probe(Duration::from_secs(5)).await.unwrap().role,
        Role::Primary
    );
    cleanup(&server, server.url(), [db]).await;
}
