#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A red cluster and provisioning errors against Elasticsearch (the real
//! server when `SWITCHYARD_ELASTICSEARCH_URL` is set, else the noida-db
//! stand-in). Its probes, faults and in-flight bound are
//! `tests/http_engines.rs` at the workspace root.

mod common;

use std::time::Duration;

use common::{backend_for, checkout, tenant, Fixture};
use serde_json::json;
use switchyard_core::{Backend, Error};
use switchyard_elasticsearch::elasticsearch::cluster::ClusterHealthParts;
use switchyard_elasticsearch::elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteAliasParts, IndicesDeleteParts, IndicesExistsParts,
};
use switchyard_elasticsearch::{EsError, Refresh};
use switchyard_testkit::wait_until;

/// A red cluster is down for the router. Needs a server whose health turns
/// red when a primary cannot be allocated.
#[tokio::test]
async fn a_red_cluster_fails_the_probe() {
    let fx = Fixture::start("red").await;
    let backend = backend_for(fx.es.url(), 4);
    let admin = checkout(&backend, None).await.unwrap();
    let client = admin.client().unwrap().clone();
    let index = format!("{}_unassignable", fx.run);
    // A primary that may only live on a node that does not exist.
    let created = client
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(json!({ "settings": {
            "index.routing.allocation.require._name": "no-such-node",
            "number_of_replicas": 0,
            "index.routing.allocation.enable": "all",
        } }))
        .send()
        .await
        .unwrap();
    assert!(created.status_code().is_success(), "{created:?}");
    let health: serde_json::Value = client
        .cluster()
        .health(ClusterHealthParts::None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if health["status"] != "red" {
        eprintln!(
            "SKIPPED: needs real Elasticsearch (set SWITCHYARD_ELASTICSEARCH_URL); {} \
             lacks shard allocation: an index whose primary cannot be allocated leaves \
             cluster health {} instead of red",
            fx.es.describe(),
            health["status"]
        );
        assert!(!fx.is_real(), "a real server must turn red here: {health}");
    } else {
        let err = backend.probe(Duration::from_secs(5)).await.unwrap_err();
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<EsError>());
        assert!(matches!(source, Some(EsError::ClusterRed { .. })), "{err}");
        assert!(err.is_endpoint_failure(), "{err}");
        eprintln!("red cluster: {err}");
    }
    let _ = client
        .indices()
        .delete(IndicesDeleteParts::Index(&[&index]))
        .send()
        .await;
    wait_until(Duration::from_secs(30), || async {
        backend.probe(Duration::from_secs(2)).await.is_ok()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn missing_indices_and_aliases_are_not_provisioned_errors() {
    let fx = Fixture::start("provisioning").await;
    let backend = backend_for(fx.es.url(), 4);
    let reg = fx.registry(&["present".into(), "absent".into()]);
    fx.seed(&backend, &reg, &["present".into()], &["rowpresent".into()])
        .await;

    // An unscoped checkout has no tenant target.
    let unscoped = checkout(&backend, None).await.unwrap();
    let err = unscoped.search(json!({})).await.unwrap_err();
    let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<EsError>());
    assert!(matches!(source, Some(EsError::Unscoped { .. })), "{err}");
    drop(unscoped);

    for (name, what) in [("absent", "index"), ("rowabsent", "alias")] {
        let entry = reg.resolve(&tenant(name)).unwrap();
        let err = checkout(&backend, Some(&entry)).await.unwrap_err();
        assert!(
            matches!(&err, Error::TenantNotProvisioned { what: w, name: n, .. } if *w == what && n.ends_with(name)),
            "{err}"
        );
        assert!(!err.is_retryable());
    }
    assert_eq!(backend.stats().in_use(), 0);

    // Deleted while cached as present: the next request says not provisioned,
    // and the next checkout asks again.
    let present = reg.resolve(&tenant("present")).unwrap();
    let conn = checkout(&backend, Some(&present)).await.unwrap();
    assert_eq!(conn.count(None).await.unwrap(), 3);
    let index = conn.target().unwrap().to_owned();
    let admin = checkout(&backend, None).await.unwrap();
    let deleted = admin
        .client()
        .unwrap()
        .indices()
        .delete(IndicesDeleteParts::Index(&[&index]))
        .send()
        .await
        .unwrap();
    assert!(deleted.status_code().is_success());
    drop(admin);
    let err = conn.search(json!({})).await.unwrap_err();
    assert!(
        matches!(&err, Error::TenantNotProvisioned { what: "index", name, .. } if *name == index),
        "{err}"
    );
    drop(conn);
    let err = checkout(&backend, Some(&present)).await.unwrap_err();
    assert!(matches!(err, Error::TenantNotProvisioned { .. }), "{err}");

    // A row write to an alias removed under it fails (`require_alias`) rather
    // than creating an index by that name.
    let rowpresent = reg.resolve(&tenant("rowpresent")).unwrap();
    let row = checkout(&backend, Some(&rowpresent)).await.unwrap();
    row.index("x", json!({ "label": "fine" }), Refresh::True)
        .await
        .unwrap();
    let alias = row.target().unwrap().to_owned();
    let admin = checkout(&backend, None).await.unwrap();
    let shared = fx.shared_index();
    let removed = admin
        .client()
        .unwrap()
        .indices()
        .delete_alias(IndicesDeleteAliasParts::IndexName(&[&shared], &[&alias]))
        .send()
        .await
        .unwrap();
    assert!(removed.status_code().is_success(), "{removed:?}");
    let err = row
        .index("y", json!({ "label": "lost" }), Refresh::True)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::TenantNotProvisioned { what: "alias", name, .. } if *name == alias),
        "{err}"
    );
    let exists = admin
        .client()
        .unwrap()
        .indices()
        .exists(IndicesExistsParts::Index(&[&alias]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        exists.status_code().as_u16(),
        404,
        "no index was created for {alias}"
    );
    drop(row);
    fx.cleanup(&backend, &reg, &[]).await;
}
