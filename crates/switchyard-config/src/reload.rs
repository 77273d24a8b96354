//! Hot reload: re-load, validate and apply the configuration while traffic flows.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::ConfigError;
use crate::router_set::{check_engines, ApplyReport, RouterSet};
use crate::settings::Settings;
use crate::source::ConfigSource;

/// A running router set that follows its configuration files.
///
/// [`reload`](Self::reload) loads and validates the files; a valid
/// configuration is applied to the running clusters and swapped in, an invalid
/// one is rejected with every problem logged, and the running configuration
/// stays. Nothing in the files needs a restart: routers, pools, endpoints,
/// clusters and tenant tiers all change live.
#[derive(Debug)]
pub struct LiveConfig {
    source: ConfigSource,
    current: ArcSwap<Settings>,
    routers: RouterSet,
    /// Bumped after every accepted reload.
    generation: watch::Sender<ReloadEvent>,
    /// Held for a whole reload: load, compare, apply and swap.
    reloading: Mutex<()>,
}

/// The outcome of the latest reload attempt, for watchers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadEvent {
    /// Accepted reloads so far.
    pub accepted: u64,
    /// Rejected reloads so far.
    pub rejected: u64,
    /// The problems of the latest rejected reload (its error, when it was
    /// not a list of problems).
    pub last_problems: Vec<String>,
}

impl LiveConfig {
    /// Loads `source`, validates it and starts its routers.
    pub fn start(source: ConfigSource) -> Result<Self, ConfigError> {
        let settings = source.load()?;
        let routers = RouterSet::build(&settings)?;
        Ok(Self {
            source,
            current: ArcSwap::from_pointee(settings),
            routers,
            generation: watch::Sender::new(ReloadEvent::default()),
            reloading: Mutex::new(()),
        })
    }

    /// The configuration in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.current.load_full()
    }

    /// The running routers.
    pub fn routers(&self) -> &RouterSet {
        &self.routers
    }

    /// Where the configuration is read from.
    pub fn source(&self) -> &ConfigSource {
        &self.source
    }

    /// Follows reload outcomes.
    pub fn subscribe(&self) -> watch::Receiver<ReloadEvent> {
        self.generation.subscribe()
    }

    /// Loads the files again; applies and swaps in a valid configuration, or
    /// logs every problem of an invalid one and keeps the running one.
    ///
    /// Everything applies live (see [`RouterSet::apply`]): router and pool
    /// settings, endpoints, clusters added, removed or changing engine, and
    /// tenant tiers. A cluster whose engine this build cannot run rejects the
    /// whole configuration, as a validation problem does. Reloads run one at a
    /// time. Must run inside a tokio runtime.
    pub fn reload(&self) -> Result<ApplyReport, ConfigError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let loaded = self
            .source
            .load()
            .and_then(|next| check_engines(&next).map(|()| next));
        match loaded {
            Ok(next) => {
                let prev = self.current.load_full();
                let report = self.routers.apply(&prev, &next);
                for change in &report.changes {
                    tracing::info!(%change, "configuration change applied");
                }
                for failure in &report.failed {
                    tracing::error!(%failure, "configuration change refused");
                }
                self.current.store(Arc::new(next));
                self.generation.send_modify(|e| e.accepted += 1);
                Ok(report)
            }
            Err(error) => {
                for problem in error.problems() {
                    tracing::error!(%problem, "configuration rejected; the running one stays");
                }
                let mut lines: Vec<String> =
                    error.problems().iter().map(ToString::to_string).collect();
                if lines.is_empty() {
                    tracing::error!(%error, "configuration rejected; the running one stays");
                    lines.push(error.to_string());
                }
                self.generation.send_modify(|e| {
                    e.rejected += 1;
                    e.last_problems = lines;
                });
                Err(error)
            }
        }
    }

    /// Watches the files: every `interval` their contents, and those of the
    /// files the running configuration reads secrets from (`${file:…}`,
    /// `password_file`), are compared with the last seen, and a change triggers
    /// [`reload`](Self::reload): a rotated password reaches new connections
    /// without a restart. The watch stops when the returned handle is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> WatchHandle {
        let cancel = CancellationToken::new();
        let live = Arc::downgrade(self);
        let token = cancel.clone();
        let mut seen = fingerprint(&self.source, &self.settings());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(live) = live.upgrade() else { break };
                if fingerprint(&live.source, &live.settings()) != seen {
                    tracing::info!(dir = %live.source.dir().display(), "configuration or secret files changed; reloading");
                    let _ = live.reload();
                    // What the configuration now reads secrets from may differ.
                    seen = fingerprint(&live.source, &live.settings());
                }
            }
        });
        WatchHandle {
            _guard: cancel.drop_guard(),
        }
    }
}

/// Keeps a [`LiveConfig::watch`] running; dropping it stops the watch.
#[derive(Debug)]
pub struct WatchHandle {
    _guard: DropGuard,
}

/// A hash of every layer file's and secret file's path and content (missing
/// files included as such). Only the hash is kept; contents are never logged.
fn fingerprint(source: &ConfigSource, settings: &Settings) -> u64 {
    let mut h = DefaultHasher::new();
    let secrets = settings.secret_files().map(Path::to_path_buf);
    for file in source.candidate_files().into_iter().chain(secrets) {
        file.hash(&mut h);
        std::fs::read(&file).ok().hash(&mut h);
    }
    h.finish()
}
