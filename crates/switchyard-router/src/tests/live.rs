use std::sync::Arc;
use std::time::Duration;

use switchyard_core::noop::NoopBackend;
use switchyard_core::{EndpointId, Error, Intent, Role};
use tower::{Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::{Route, StrategyKind};

#[tokio::test(start_paused = true)]
async fn endpoints_join_leave_and_reweight_while_checkouts_are_held() {
    let (cluster, b) = cluster(1, config()).await;
    let held: Vec<_> =
        futures_util::future::join_all((0..4).map(|_| cluster.checkout(Intent::Read, None)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let r2 = Arc::new(NoopBackend::with_role("r2", Role::Replica));
    cluster
        .add_endpoint(r2.clone(), EndpointConfig::new(Role::Replica))
        .unwrap();
    settle().await;
    assert_eq!(
        r2.counters().probes,
        1,
        "the new endpoint is probed at once"
    );
    assert!(
        cluster
            .add_endpoint(r2.clone(), EndpointConfig::default())
            .is_err(),
        "duplicate"
    );
    // least_conn sends the next four reads to the idle newcomer.
    let more: Vec<_> =
        futures_util::future::join_all((0..4).map(|_| cluster.checkout(Intent::Read, None))).await;
    assert!(more
        .iter()
        .all(|c| c.as_ref().unwrap().endpoint().as_str() == "r2"));

    // Removing r1 while four of its checkouts are held: they finish normally.
    assert!(cluster.remove_endpoint(&EndpointId::new("r1")));
    assert!(!cluster.remove_endpoint(&EndpointId::new("r1")));
    assert_eq!(served_by(&cluster, Intent::Read, 20).await, ["r2"]);
    let probes = b[1].counters().probes;
    drop(held);
    settle().await;
    assert_eq!(b[1].counters().live, 0, "held connections went back");
    run_for(Duration::from_secs(3)).await;
    assert_eq!(b[1].counters().probes, probes, "its prober stopped");

    // Re-weighting and switching strategy live.
    cluster
        .add_endpoint(
            Arc::new(NoopBackend::with_role("r3", Role::Replica)),
            EndpointConfig::default(),
        )
        .unwrap();
    cluster.set_weight(&EndpointId::new("r3"), 3).unwrap();
    assert!(cluster.set_weight(&EndpointId::new("r3"), 0).is_err());
    assert!(cluster.set_weight(&EndpointId::new("zz"), 1).is_err());
    cluster.set_strategy(StrategyKind::WeightedRoundRobin);
    drop(more);
    let reads = tally(&cluster, Intent::Read, 400).await;
    assert_eq!((reads["r2"], reads["r3"]), (100, 300));
    assert_eq!(cluster.status().strategy, StrategyKind::WeightedRoundRobin);
}

#[tokio::test(start_paused = true)]
async fn checkouts_keep_flowing_during_concurrent_reconfiguration() {
    let (cluster, _) = cluster(2, config()).await;
    let worker = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..2000 {
                if cluster.checkout(Intent::Read, None).await.is_ok() {
                    ok += 1;
                }
                tokio::task::yield_now().await;
            }
            ok
        })
    };
    for i in 0..50 {
        let id = format!("x{i}");
        cluster
            .add_endpoint(
                Arc::new(NoopBackend::with_role(id.as_str(), Role::Replica)),
                EndpointConfig::default(),
            )
            .unwrap();
        cluster.set_strategy(if i % 2 == 0 {
            StrategyKind::Latency
        } else {
            StrategyKind::LeastConn
        });
        tokio::task::yield_now().await;
        cluster.remove_endpoint(&EndpointId::new(id));
    }
    assert_eq!(worker.await.unwrap(), 2000);
}

#[tokio::test(start_paused = true)]
async fn the_cluster_is_a_tower_service() {
    let (cluster, b) = cluster(1, config()).await;
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .concurrency_limit(8)
        .service(cluster.service());
    let conn = svc
        .ready()
        .await
        .unwrap()
        .call(Route::write())
        .await
        .unwrap();
    assert_eq!(conn.endpoint().as_str(), "p");
    let conn = cluster.service().oneshot(Route::read()).await.unwrap();
    assert_eq!(conn.endpoint().as_str(), "r1");

    // With every endpoint down, poll_ready is pending and load_shed rejects at once.
    for x in &b {
        x.set_down(true);
    }
    run_for(Duration::from_secs(2)).await;
    let mut shed = ServiceBuilder::new().load_shed().service(cluster.service());
    let err = shed
        .ready()
        .await
        .unwrap()
        .call(Route::read())
        .await
        .unwrap_err();
    assert!(err.is::<tower::load_shed::error::Overloaded>(), "{err}");

    // poll_ready wakes up when an endpoint comes back.
    let mut plain = cluster.service();
    let ready = tokio::spawn(async move { plain.ready().await.map(|_| ()) });
    settle().await;
    assert!(!ready.is_finished());
    b[1].set_down(false);
    run_for(Duration::from_secs(2)).await;
    ready.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn status_reports_every_endpoint() {
    let (cluster, b) = cluster(1, config()).await;
    let held = cluster.checkout(Intent::Read, None).await.unwrap();
    b[1].set_down(true);
    run_for(Duration::from_secs(1)).await;
    let st = cluster.status();
    assert_eq!(st.name, "test");
    let r1 = st.endpoint("r1").unwrap();
    assert_eq!((r1.role, r1.in_flight, r1.weight), (Role::Replica, 1, 1));
    assert_eq!(r1.pool.size, 1);
    assert!(r1
        .last_probe_error
        .as_deref()
        .unwrap()
        .contains("connect error on r1"));
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["endpoints"][0]["health"], "up");
    assert_eq!(json["writer"], "p");
    drop(held);
    let err = Cluster::<NoopBackend>::builder("bad")
        .config({
            let mut c = config();
            c.retry.max_attempts = 0;
            c
        })
        .endpoint(
            Arc::new(NoopBackend::new("a")),
            EndpointConfig::default().weight(0),
        )
        .endpoint(Arc::new(NoopBackend::new("a")), EndpointConfig::default())
        .build()
        .unwrap_err();
    let msg = err.to_string();
    for want in [
        "retry.max_attempts",
        "endpoints[0].weight",
        "duplicate endpoint a",
    ] {
        assert!(msg.contains(want), "{want} missing in {msg}");
    }
    assert!(matches!(err, Error::Config { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_over_many_replicas_spreads_held_checkouts_after_concurrent_traffic() {
    // 40 replicas: above the scan limit, so reads use the power of two choices.
    let (cluster, _) = cluster(40, config()).await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                for _ in 0..500 {
                    let a = cluster.checkout(Intent::Read, None).await.unwrap();
                    let b = cluster.checkout(Intent::Read, None).await.unwrap();
                    tokio::task::yield_now().await;
                    drop((a, b));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let replicas = |st: &crate::ClusterStatus| -> Vec<u32> {
        st.endpoints
            .iter()
            .filter(|e| e.role == Role::Replica)
            .map(|e| e.in_flight)
            .collect()
    };
    assert!(
        replicas(&cluster.status()).iter().all(|&n| n == 0),
        "every release was counted"
    );
    // Quiescent again: 200 held checkouts (five per replica) picked on this
    // thread's seeded RNG. Each pick takes the lighter of two random
    // replicas, so none ends up far from five (a uniformly random pick
    // typically leaves the busiest with about twice that).
    fastrand::seed(5);
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(cluster.checkout(Intent::Read, None).await.unwrap());
    }
    let loads = replicas(&cluster.status());
    assert_eq!(loads.len(), 40);
    assert!(loads.iter().all(|&n| (3..=7).contains(&n)), "{loads:?}");
}
