//! Predictive warming: keep open connections near a forecast of demand, so a
//! burst does not pay connection set-up.
//!
//! Every `interval` a per-endpoint task samples the endpoint's concurrent
//! checkouts and folds the sample into an exponentially weighted moving average
//! with time constant `window` ([`DemandForecast`]). The target is that
//! forecast, rounded up and clamped between `min_idle` and the pool's
//! `max_size`. When the pool holds fewer connections than the target, the task
//! checks out the idle ones plus up to `max_step` more at once (unscoped,
//! outside the in-flight count and quotas) and gives them straight back, which
//! makes the pool open the missing ones.
//!
//! Off by default: it briefly holds idle connections, and a pool that already
//! keeps `min_idle` (sqlx, deadpool with a pre-fill) may not need it. It never
//! warms an endpoint that is down or ejected.
//!
//! Turning `enabled` on or off with
//! [`Cluster::set_config`](crate::Cluster::set_config) starts or stops the
//! warmers at once; the other settings are read afresh at every step, so they
//! apply from each warmer's next step.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use switchyard_core::{Backend, PoolStats, Recycle};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::endpoint::Endpoint;

/// An exponentially weighted moving average of concurrent demand.
#[derive(Debug, Clone)]
pub struct DemandForecast {
    window: Duration,
    value: f64,
    last: Option<Instant>,
}

impl DemandForecast {
    /// A forecast that forgets with time constant `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            value: 0.0,
            last: None,
        }
    }

    /// Folds in a sample of `concurrent` checkouts taken at `now`; returns the
    /// forecast. Irregular sample spacing is weighted by the time it covers.
    pub fn sample(&mut self, concurrent: u32, now: Instant) -> f64 {
        let x = f64::from(concurrent);
        self.value = match self.last {
            None => x,
            Some(last) => {
                let dt = now.saturating_duration_since(last).as_secs_f64();
                let alpha = 1.0 - (-dt / self.window.as_secs_f64().max(f64::EPSILON)).exp();
                self.value + (x - self.value) * alpha
            }
        };
        self.last = Some(now);
        self.value
    }

    /// Changes the time constant for the samples to come.
    pub fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    /// The current forecast.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Connections to keep open: the forecast rounded up, within `min_idle..=max_size`.
    pub fn target(&self, min_idle: u32, max_size: u32) -> u32 {
        let want = self.value.ceil().clamp(0.0, f64::from(u32::MAX)) as u32;
        want.clamp(min_idle.min(max_size), max_size)
    }
}

/// How many connections to hold at once to bring the pool to `target`: the
/// idle ones plus up to `max_step` new ones; 0 when it is there already.
pub fn connections_to_hold(target: u32, stats: PoolStats, max_step: u32) -> u32 {
    if stats.size >= target {
        return 0;
    }
    stats
        .idle
        .saturating_add((target - stats.size).min(max_step))
}

/// Keeps `ep`'s pool near the forecast until `cancel` fires, with the
/// cluster's warming settings as they are at each step.
pub(crate) async fn run<B: Backend>(
    ep: Arc<Endpoint<B>>,
    config: Arc<ArcSwap<ClusterConfig>>,
    cancel: CancellationToken,
) {
    let mut forecast = DemandForecast::new(config.load().warming.window);
    let mut last_step: Option<Instant> = None;
    loop {
        let interval = config.load().warming.interval;
        let next = last_step.map_or_else(Instant::now, |t| t + interval);
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = sleep_until(next) => {}
        }
        last_step = Some(Instant::now());
        let cfg = config.load_full();
        let w = &cfg.warming;
        forecast.set_window(w.window);
        let value = forecast.sample(ep.state.load.in_flight().get(), Instant::now());
        ep.state.metrics.forecast.set(value);
        let serving = {
            let h = ep.state.health();
            h.up && !h.ejection.is_out()
        };
        if !serving {
            continue;
        }
        let stats = ep.backend.stats();
        let hold = connections_to_hold(
            forecast.target(w.min_idle, stats.max_size),
            stats,
            w.max_step,
        );
        if hold > 0 {
            warm(&ep, hold, cfg.health.timeout).await;
        }
    }
    tracing::debug!("warmer stopped");
}

async fn warm<B: Backend>(ep: &Endpoint<B>, hold: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let acquires = (0..hold).map(|_| ep.backend.acquire(None, deadline));
    let conns = futures_util::future::join_all(acquires).await;
    let mut warmed = 0u32;
    for conn in conns.into_iter().flatten() {
        warmed += 1;
        // Acquired for no owner and never used: clean by the contract.
        ep.backend.release(conn, Recycle::Keep);
    }
    tracing::debug!(hold, warmed, "warmed pool");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    #[tokio::test(start_paused = true)]
    async fn the_forecast_follows_demand_with_its_time_constant() {
        let mut f = DemandForecast::new(Duration::from_secs(10));
        assert_eq!(
            f.sample(4, Instant::now()),
            4.0,
            "the first sample is taken as is"
        );
        // A step from 4 to 14 closes 1 − 1/e of the gap in one time constant,
        // whether sampled once or ten times.
        let mut once = f.clone();
        advance(Duration::from_secs(10)).await;
        let one_step = once.sample(14, Instant::now());
        let mut t = Instant::now() - Duration::from_secs(10);
        for _ in 0..10 {
            t += Duration::from_secs(1);
            f.sample(14, t);
        }
        let want = 14.0 - 10.0 / std::f64::consts::E;
        assert!((one_step - want).abs() < 1e-9, "{one_step}");
        assert!((f.value() - want).abs() < 1e-9, "{}", f.value());
        assert_eq!(f.target(0, 100), 11);
        assert_eq!(f.target(12, 100), 12, "min_idle is a floor");
        assert_eq!(f.target(0, 8), 8, "max_size is a ceiling");
        // Demand gone: decays towards zero, never below the floor.
        advance(Duration::from_secs(60)).await;
        f.sample(0, Instant::now());
        assert_eq!(f.target(2, 100), 2);
    }

    #[test]
    fn holds_the_idle_connections_plus_a_bounded_step() {
        let stats = |size, idle| PoolStats {
            size,
            idle,
            max_size: 16,
            tenant_pools: 0,
        };
        assert_eq!(connections_to_hold(8, stats(8, 3), 4), 0);
        assert_eq!(connections_to_hold(8, stats(6, 2), 4), 4);
        assert_eq!(connections_to_hold(12, stats(2, 1), 4), 5);
    }
}
