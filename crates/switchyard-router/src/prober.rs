//! The per-endpoint health task: probes on an interval, ends ejections, and
//! takes failures reported by dropped checkouts to the cluster.
//!
//! One task per endpoint owns every timer of that endpoint's health: the next
//! probe and the end of the current ejection. What it learns it hands to the
//! cluster as health events ([`ClusterState::apply`]). A probe starts every `interval`,
//! or as soon as the previous one answered or timed out if that took longer:
//! probes of one endpoint never overlap, and `timeout` may exceed `interval`. It reads the cluster's health
//! settings afresh on every round, and is woken when they change, so a new
//! `interval` or `timeout` applies to the probe already scheduled. It stops
//! when the endpoint is removed or the cluster dropped (its cancellation
//! token), and runs inside a `switchyard.prober` span naming the cluster and
//! endpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use switchyard_core::{Backend, Error};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::HealthConfig;
use crate::endpoint::Endpoint;
use crate::health::Event;
use crate::state::ClusterState;

/// Probes `ep` until `cancel` fires: at once when `last_probe` is `None` (the
/// configured role is only a guess), else one interval after it.
pub(crate) async fn run<B: Backend>(
    cluster: Arc<ClusterState<B>>,
    ep: Arc<Endpoint<B>>,
    last_probe: Option<Instant>,
    cancel: CancellationToken,
) {
    let mut last_probe = last_probe;
    let mut probe_at = Instant::now();
    loop {
        let cfg = cluster.config.load_full();
        let next_probe = last_probe.map_or(probe_at, |t| t + cfg.health.interval);
        let expiry = ep.state.health().ejection.until();
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = sleep_until(next_probe) => {
                // Probes never overlap, and the cadence is kept from each
                // probe's start: one slower than the interval (allowed: the
                // timeout, not the interval, tells slow from dead) is followed
                // by the next as soon as it answers or times out.
                let started = Instant::now();
                let event = probe_once(&ep, &cfg.health).await;
                cluster.apply(&ep.state, event);
                last_probe = Some(started);
            }
            () = sleep_until(expiry.unwrap_or(next_probe)), if expiry.is_some() => {
                cluster.apply(&ep.state, Event::BackoffOver);
            }
            // A probe is wanted now, the ejection timer moved, the settings
            // changed, or a dropped checkout reported a failure: the next
            // round re-reads the first three.
            () = ep.state.wake.notified() => {
                cluster.apply_reported();
                if ep.state.probe_now.swap(false, Ordering::AcqRel) {
                    last_probe = None;
                    probe_at = Instant::now();
                }
            }
        }
    }
    tracing::debug!("prober stopped");
}

async fn probe_once<B: Backend>(ep: &Endpoint<B>, cfg: &HealthConfig) -> Event {
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
        .pool(ep.backend.stats(), ep.state.load.in_flight().get());
    match result {
        Ok(probe) => Event::ProbePassed(probe),
        Err(error) => Event::ProbeFailed(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, EndpointConfig};
    use crate::health::Health;
    use crate::testing::{settle, status_of};
    use crate::tests::run_for;
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

    /// Probes every 100ms: what the chaos run used, where a primary 106ms
    /// away was marked down and writes stalled for 3.3 s.
    fn fast(timeout: Duration) -> ClusterConfig {
        let mut c = config();
        c.health.interval = Duration::from_millis(100);
        c.health.timeout = timeout;
        c.health.fall = 2;
        c
    }

    fn primary_and_replica(cfg: ClusterConfig) -> (Cluster<NoopBackend>, [Arc<NoopBackend>; 2]) {
        let p = Arc::new(NoopBackend::with_role("p", Role::Primary));
        let r = Arc::new(NoopBackend::with_role("r1", Role::Replica));
        let cluster = Cluster::builder("c")
            .config(cfg)
            .endpoint(p.clone(), EndpointConfig::new(Role::Primary))
            .endpoint(r.clone(), EndpointConfig::new(Role::Replica))
            .build()
            .unwrap();
        (cluster, [p, r])
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_slower_than_the_interval_passes_and_the_next_waits_for_it() {
        let (cluster, [p, r]) = primary_and_replica(fast(Duration::from_secs(1)));
        p.set_probe_rtt(Duration::from_millis(300));
        r.set_probe_rtt(Duration::from_millis(300));
        settle().await;
        run_for(Duration::from_secs(3)).await;
        for id in ["p", "r1"] {
            let st = status_of(&cluster, id);
            assert_eq!(st.health, Health::Up, "{id}: slow is not down");
            assert_eq!(st.probe_rtt, Some(Duration::from_millis(300)));
            assert!(st.latency >= Duration::from_millis(250), "{st:?}");
        }
        // One probe at a time, each started when the previous answered: 3 s
        // hold 10 of them (overlapping ones every 100ms would be 30).
        let probes = r.counters().probes;
        assert!((10..=11).contains(&probes), "{probes} probes");
    }

    #[tokio::test(start_paused = true)]
    async fn the_only_primary_is_not_marked_down_for_latency_alone() {
        // The old rule: timeout no longer than the interval. 106ms of latency
        // makes every probe time out.
        let (cluster, [p, r]) = primary_and_replica(fast(Duration::from_millis(100)));
        settle().await;
        p.set_probe_rtt(Duration::from_millis(106));
        r.set_probe_rtt(Duration::from_millis(106));
        run_for(Duration::from_secs(2)).await;
        let primary = status_of(&cluster, "p");
        assert_eq!(primary.health, Health::Up, "{primary:?}");
        assert!(primary.last_probe_error.unwrap().contains("timed out"));
        assert!(primary.latency >= Duration::from_millis(100));
        assert_eq!(
            status_of(&cluster, "r1").health,
            Health::Down,
            "a replica that does not answer in time goes down: reads have the primary"
        );
        let conn = cluster
            .checkout(switchyard_core::Intent::Write, None)
            .await
            .unwrap();
        assert_eq!(conn.endpoint().as_str(), "p");
        // Refused is dead, not slow.
        p.set_probe_rtt(Duration::ZERO);
        p.set_down(true);
        run_for(Duration::from_millis(300)).await;
        assert_eq!(status_of(&cluster, "p").health, Health::Down);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_primary_falls_once_another_primary_is_there() {
        let (cluster, [p, r]) = primary_and_replica(fast(Duration::from_millis(100)));
        settle().await;
        p.set_probe_rtt(Duration::from_secs(30));
        r.set_role(Role::Primary);
        run_for(Duration::from_secs(1)).await;
        assert_eq!(status_of(&cluster, "p").health, Health::Down);
        assert_eq!(
            cluster.status().writer.as_ref().map(|w| w.as_str()),
            Some("r1")
        );
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
