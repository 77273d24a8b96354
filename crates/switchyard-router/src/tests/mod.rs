//! Cluster-level tests with `NoopBackend`: routing, failover, live topology,
//! tower. Time is paused; tasks are given turns with `settle`, never sleeps.

mod causal;
mod counters;
mod deadline;
mod failover;
mod fencing;
mod live;
mod metrics;
mod reconfig;
mod routing;

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::noop::NoopBackend;
use switchyard_core::{Intent, Role, TenantId};

use crate::{CheckoutOptions, Cluster, ClusterConfig, EndpointConfig};

pub use crate::testing::{settle, status_of};

/// Compile-time proof that checkout futures, `run` and the guard are `Send`.
#[allow(dead_code)]
fn futures_are_send(cluster: &Cluster<NoopBackend>, tenant: &TenantId) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&cluster.checkout(Intent::Read, Some(tenant)));
    is_send(&cluster.checkout_with(Intent::Write, None, CheckoutOptions::new()));
    is_send(
        &cluster.run(Intent::Read, None, CheckoutOptions::new(), async |conn| {
            Ok::<_, switchyard_core::Error>(conn.id)
        }),
    );
    let token = switchyard_core::CausalToken::new(
        "test",
        switchyard_core::History::Timeline {
            system: 1,
            timeline: 1,
            position: 1,
        },
    );
    if let Some(token) = token {
        is_send(&cluster.checkout_after(&token, Some(tenant), CheckoutOptions::new()));
        is_send(
            &cluster.run_after(&token, None, CheckoutOptions::new(), async |conn| {
                Ok::<_, switchyard_core::Error>(conn.id)
            }),
        );
    }
    is_send(
        &cluster.run_write(None, CheckoutOptions::new(), async |conn| {
            Ok::<_, switchyard_core::Error>(conn.id)
        }),
    );
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Cluster<NoopBackend>>();
    is_send_sync::<switchyard_core::Checkout<NoopBackend>>();
    fn is_send_type<T: Send>() {}
    is_send_type::<crate::ClusterService<NoopBackend>>();
}

/// Probes every second, falls after 2 and rises after 2; no ejection jitter.
pub fn config() -> ClusterConfig {
    let mut c = ClusterConfig::default();
    c.health.interval = Duration::from_secs(1);
    c.health.timeout = Duration::from_millis(500);
    c.health.fall = 2;
    c.health.rise = 2;
    c.health.eject_base = Duration::from_secs(1);
    c.health.eject_max = Duration::from_secs(8);
    c.health.eject_jitter = false;
    c.health.max_ejected_percent = 100;
    c.checkout_timeout = Duration::from_secs(5);
    c.failover_timeout = Duration::from_secs(3);
    c.retry.attempt_timeout = Duration::from_secs(1);
    c
}

/// A primary `p` and replicas `r1..=rN`, built and probed once.
pub async fn cluster(
    replicas: usize,
    config: ClusterConfig,
) -> (Cluster<NoopBackend>, Vec<Arc<NoopBackend>>) {
    let mut backends = vec![Arc::new(NoopBackend::with_role("p", Role::Primary))];
    let mut b = Cluster::builder("test")
        .config(config)
        .endpoint(backends[0].clone(), EndpointConfig::new(Role::Primary));
    for i in 1..=replicas {
        let r = Arc::new(NoopBackend::with_role(format!("r{i}"), Role::Replica));
        b = b.endpoint(r.clone(), EndpointConfig::new(Role::Replica));
        backends.push(r);
    }
    let cluster = b.build().unwrap();
    settle().await;
    (cluster, backends)
}

/// A PostgreSQL-like history on `timeline` of system 1.
pub fn timeline(timeline: u32) -> Option<switchyard_core::History> {
    Some(switchyard_core::History::Timeline {
        system: 1,
        timeline,
        position: 0,
    })
}

/// Where `n` sequential read (or write) checkouts went, by endpoint name.
pub async fn tally(
    cluster: &Cluster<NoopBackend>,
    intent: Intent,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..n {
        let c = cluster.checkout(intent, None).await.unwrap();
        *out.entry(c.endpoint().to_string()).or_default() += 1;
    }
    out
}

/// The endpoints that served `n` sequential checkouts, by name.
pub async fn served_by(cluster: &Cluster<NoopBackend>, intent: Intent, n: usize) -> Vec<String> {
    tally(cluster, intent, n).await.into_keys().collect()
}

/// Advances paused time in probe-interval steps, letting tasks run after each.
pub async fn run_for(d: Duration) {
    let step = Duration::from_millis(100);
    let mut left = d;
    while !left.is_zero() {
        let s = step.min(left);
        tokio::time::advance(s).await;
        settle().await;
        left -= s;
    }
}
