//! Passive ejection: an endpoint that fails real traffic is taken out at once,
//! for a backoff that doubles with each consecutive ejection, then let back in
//! through one trial checkout (a half-open circuit breaker).

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::HealthConfig;

/// Where an endpoint stands with passive ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Serving traffic.
    Admitted,
    /// Out until the instant given.
    Ejected {
        /// When the half-open trial becomes available.
        until: Instant,
    },
    /// One trial checkout may go through; its result decides.
    HalfOpen {
        /// Whether a checkout holds the trial now.
        taken: bool,
    },
}

/// One endpoint's ejection state.
#[derive(Debug, Clone)]
pub(crate) struct Ejection {
    pub phase: Phase,
    /// Consecutive ejections; the backoff is `eject_base · 2^(level − 1)`.
    pub level: u32,
    /// The backoff of the current or last ejection.
    pub backoff: Duration,
    /// When the endpoint was last admitted; a long quiet spell resets `level`.
    admitted_at: Instant,
    /// Ejections so far, for status.
    pub total: u64,
}

/// What status shows of an ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EjectionStatus {
    /// Consecutive ejections, 1 for the first.
    pub level: u32,
    /// How long this ejection lasts.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Time left before the half-open trial (zero once half-open).
    #[serde(with = "humantime_serde")]
    pub remaining: Duration,
    /// Ejections of this endpoint since it joined.
    pub total: u64,
}

impl Ejection {
    pub fn new(now: Instant) -> Self {
        Self {
            phase: Phase::Admitted,
            level: 0,
            backoff: Duration::ZERO,
            admitted_at: now,
            total: 0,
        }
    }

    /// The backoff for ejection number `level` (1-based), before jitter.
    pub fn backoff_for(cfg: &HealthConfig, level: u32) -> Duration {
        let doublings = level.saturating_sub(1).min(31);
        cfg.eject_base
            .checked_mul(1u32 << doublings)
            .unwrap_or(cfg.eject_max)
            .min(cfg.eject_max)
    }

    /// Takes the endpoint out; returns the backoff chosen.
    ///
    /// An endpoint that stayed admitted for `eject_max` starts again at the base
    /// backoff: its earlier trouble is history.
    pub fn eject(&mut self, cfg: &HealthConfig, now: Instant) -> Duration {
        if self.phase == Phase::Admitted
            && now.saturating_duration_since(self.admitted_at) >= cfg.eject_max
        {
            self.level = 0;
        }
        self.level = self.level.saturating_add(1);
        let mut backoff = Self::backoff_for(cfg, self.level);
        if cfg.eject_jitter {
            // Up to +10%, so endpoints ejected by one incident are not retried in lockstep.
            backoff += backoff.mul_f64(fastrand::f64() * 0.1);
        }
        self.backoff = backoff;
        self.total += 1;
        self.phase = Phase::Ejected {
            until: now + backoff,
        };
        backoff
    }

    /// Moves an expired ejection to half-open; true when it did.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Ejected { until } if until <= now => {
                self.phase = Phase::HalfOpen { taken: false };
                true
            }
            _ => false,
        }
    }

    /// The trial succeeded: back in service, keeping the level so a relapse backs off longer.
    pub fn readmit(&mut self, now: Instant) -> bool {
        if let Phase::HalfOpen { .. } = self.phase {
            self.phase = Phase::Admitted;
            self.admitted_at = now;
            return true;
        }
        false
    }

    /// Hands the half-open trial out (`take`) or takes it back; true when
    /// that changed anything: one trial per half-open spell at a time.
    pub fn take_trial(&mut self, take: bool) -> bool {
        match &mut self.phase {
            Phase::HalfOpen { taken } if *taken != take => {
                *taken = take;
                true
            }
            _ => false,
        }
    }

    /// Whether the half-open trial is there for the taking.
    pub fn trial_free(&self) -> bool {
        self.phase == Phase::HalfOpen { taken: false }
    }

    /// When the current ejection ends, if ejected.
    pub fn until(&self) -> Option<Instant> {
        match self.phase {
            Phase::Ejected { until } => Some(until),
            _ => None,
        }
    }

    pub fn is_out(&self) -> bool {
        self.phase != Phase::Admitted
    }

    pub fn status(&self, now: Instant) -> Option<EjectionStatus> {
        let remaining = match self.phase {
            Phase::Admitted => return None,
            Phase::Ejected { until } => until.saturating_duration_since(now),
            Phase::HalfOpen { .. } => Duration::ZERO,
        };
        Some(EjectionStatus {
            level: self.level,
            backoff: self.backoff,
            remaining,
            total: self.total,
        })
    }
}

/// How many endpoints of `total` may be ejected at once under `percent`.
///
/// At least one, as in Envoy, so a single bad endpoint in a small cluster can
/// always be taken out; `0` percent disables passive ejection.
pub(crate) fn ejection_cap(total: usize, percent: u8) -> usize {
    if percent == 0 {
        return 0;
    }
    (total * usize::from(percent) / 100).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn cfg() -> HealthConfig {
        HealthConfig {
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(10),
            eject_jitter: false,
            ..HealthConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap_and_expires_to_half_open() {
        let cfg = cfg();
        let mut e = Ejection::new(Instant::now());
        let mut seen = Vec::new();
        for _ in 0..6 {
            let b = e.eject(&cfg, Instant::now());
            seen.push(b.as_secs());
            assert!(!e.expire(Instant::now()));
            advance(b - Duration::from_millis(1)).await;
            assert!(!e.expire(Instant::now()), "not before the backoff");
            advance(Duration::from_millis(1)).await;
            assert!(e.expire(Instant::now()));
            assert_eq!(e.phase, Phase::HalfOpen { taken: false });
            // The trial fails: eject again from half-open.
        }
        assert_eq!(seen, [1, 2, 4, 8, 10, 10]);
        assert!(e.readmit(Instant::now()));
        assert_eq!(e.total, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_healthy_spell_resets_the_level() {
        let cfg = cfg();
        let mut e = Ejection::new(Instant::now());
        e.eject(&cfg, Instant::now());
        advance(Duration::from_secs(1)).await;
        e.expire(Instant::now());
        e.readmit(Instant::now());
        // Relapse soon after: longer backoff.
        advance(Duration::from_secs(1)).await;
        assert_eq!(e.eject(&cfg, Instant::now()), Duration::from_secs(2));
        advance(Duration::from_secs(2)).await;
        e.expire(Instant::now());
        e.readmit(Instant::now());
        // Relapse after eject_max of health: back to the base.
        advance(Duration::from_secs(10)).await;
        assert_eq!(e.eject(&cfg, Instant::now()), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_adds_at_most_ten_percent() {
        fastrand::seed(9);
        let cfg = HealthConfig {
            eject_jitter: true,
            ..cfg()
        };
        for _ in 0..100 {
            let mut e = Ejection::new(Instant::now());
            let b = e.eject(&cfg, Instant::now());
            assert!(
                b >= Duration::from_secs(1) && b <= Duration::from_millis(1100),
                "{b:?}"
            );
        }
    }

    #[test]
    fn the_cap_allows_at_least_one() {
        assert_eq!(ejection_cap(3, 50), 1);
        assert_eq!(ejection_cap(10, 50), 5);
        assert_eq!(ejection_cap(1, 10), 1);
        assert_eq!(ejection_cap(5, 0), 0);
        assert_eq!(ejection_cap(4, 100), 4);
    }
}
