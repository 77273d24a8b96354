//! The per-endpoint health task: probes on an interval and ends ejections.
//!
//! One task per endpoint owns every timer of that endpoint's health: the next
//! probe and the end of the current ejection. It reads the cluster's health
//! settings afresh on every round, and is woken when they change, so a new
//! `interval` or `timeout` applies to the probe already scheduled. It stops
//! when the endpoint is removed or the cluster dropped (its cancellation
//! token), and runs inside a `switchyard.prober` span naming the cluster and
//! endpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use switchyard_core::{Backend, Error};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, HealthConfig};
use crate::endpoint::Endpoint;

/// Probes `ep` until `cancel` fires: at once when `last_probe` is `None` (the
/// configured role is only a guess), else one interval after it.
pub(crate) async fn run<B: Backend>(
    ep: Arc<Endpoint<B>>,
    config: Arc<ArcSwap<ClusterConfig>>,
    last_probe: Option<Instant>,
    cancel: CancellationToken,
) {
    let mut last_probe = last_probe;
    let mut probe_at = Instant::now();
    loop {
        let cfg = config.load_full();
        let next_probe = last_probe.map_or(probe_at, |t| t + cfg.health.interval);
        let expiry = ep.state.health().ejection.until();
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = sleep_until(next_probe) => {
                probe_once(&ep, &cfg.health).await;
                last_probe = Some(Instant::now());
            }
            () = sleep_until(expiry.unwrap_or(next_probe)), if expiry.is_some() => {
                if let Some(hooks) = ep.state.hooks.upgrade() {
                    hooks.ejection_expired(&ep.state);
                }
            }
            // A probe is wanted now, the ejection timer moved, or the settings
            // changed: the next round re-reads all three.
            () = ep.state.wake.notified() => {
                if ep.state.probe_now.swap(false, Ordering::AcqRel) {
                    last_probe = None;
                    probe_at = Instant::now();
                }
            }
        }
    }
    tracing::debug!("prober stopped");
}

async fn probe_once<B: Backend>(ep: &Endpoint<B>, cfg: &HealthConfig) {
    let started = Instant::now();
    let result = match tokio::time::timeout(cfg.timeout, ep.backend.probe(cfg.timeout)).await {
        Ok(result) => result,
        Err(_) => Err(Error::ProbeTimeout {
            endpoint: ep.id().clone(),
            elapsed: started.elapsed(),
        }),
    };
    ep.state
        .metrics
        .pool(ep.backend.stats(), ep.state.in_flight.get());
    if let Some(hooks) = ep.state.hooks.upgrade() {
        hooks.probed(&ep.state, result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, EndpointConfig};
    use crate::health::Health;
    use crate::testing::{settle, status_of};
    use crate::Cluster;
    use std::time::Duration;
    use switchyard_core::noop::NoopBackend;
    use switchyard_core::Role;
    use tokio::time::advance;

    fn config() -> ClusterConfig {
        let mut c = ClusterConfig::default();
        c.health.interval = Duration::from_secs(1);
        c.health.timeout = Duration::from_millis(500);
        c.health.fall = 3;
        c.health.rise = 2;
        c
    }

    #[tokio::test(start_paused = true)]
    async fn fall_marks_down_and_rise_brings_back_on_the_interval() {
        let b = Arc::new(NoopBackend::with_role("r1", Role::Replica));
        let cluster = Cluster::builder("c")
            .config(config())
            .endpoint(b.clone(), EndpointConfig::new(Role::Replica))
            .build()
            .unwrap();
        settle().await;
        assert_eq!(b.counters().probes, 1, "first probe at once");
        b.set_down(true);
        for n in 1..=2 {
            advance(Duration::from_secs(1)).await;
            settle().await;
            assert_eq!(
                status_of(&cluster, "r1").health,
                Health::Up,
                "after {n} failures"
            );
        }
        advance(Duration::from_secs(1)).await;
        settle().await;
        let st = status_of(&cluster, "r1");
        assert_eq!(st.health, Health::Down, "third failure marks it down");
        assert!(st.last_probe_error.unwrap().contains("connect error on r1"));
        b.set_down(false);
        advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(
            status_of(&cluster, "r1").health,
            Health::Down,
            "one pass is not enough"
        );
        advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(status_of(&cluster, "r1").health, Health::Up);
        assert_eq!(b.counters().probes, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_times_out_and_counts_as_failed() {
        let b = Arc::new(NoopBackend::with_role("r1", Role::Replica));
        b.set_probe_rtt(Duration::from_secs(30));
        let mut cfg = config();
        cfg.health.fall = 1;
        let cluster = Cluster::builder("c")
            .config(cfg)
            .endpoint(b.clone(), EndpointConfig::new(Role::Replica))
            .build()
            .unwrap();
        settle().await;
        advance(Duration::from_millis(500)).await;
        settle().await;
        let st = status_of(&cluster, "r1");
        assert_eq!(st.health, Health::Down);
        assert!(st.last_probe_error.unwrap().contains("timed out"));
    }

    #[tokio::test(start_paused = true)]
    async fn probers_stop_when_the_cluster_is_dropped() {
        let b = Arc::new(NoopBackend::with_role("r1", Role::Replica));
        let cluster = Cluster::builder("c")
            .config(config())
            .endpoint(b.clone(), EndpointConfig::new(Role::Replica))
            .build()
            .unwrap();
        settle().await;
        drop(cluster);
        settle().await;
        let probes = b.counters().probes;
        advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(b.counters().probes, probes);
        assert_eq!(Arc::strong_count(&b), 1, "the task let go of the backend");
    }
}
