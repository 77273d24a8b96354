//! Which tenant databases, schemas or indices were recently seen to exist, so
//! that a checkout does not ask the server every time.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Most names remembered; past this, expired entries are dropped, then all.
const MAX_ENTRIES: usize = 10_000;

/// Names seen to exist, each trusted for `ttl`. Only positive answers are
/// kept: a missing one is asked about again on the next checkout. Bounded:
/// past 10,000 names, expired entries are dropped, then all.
#[derive(Debug)]
pub struct ProvisionCache {
    ttl: Duration,
    seen: Mutex<HashMap<String, Instant>>,
}

impl ProvisionCache {
    /// A cache trusting each positive answer for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `name` was seen to exist less than `ttl` ago.
    pub fn is_fresh(&self, name: &str) -> bool {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(name).is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Records that `name` exists.
    pub fn mark(&self, name: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            seen.retain(|_, at| at.elapsed() < ttl);
            if seen.len() >= MAX_ENTRIES {
                seen.clear();
            }
        }
        seen.insert(name.to_owned(), Instant::now());
    }

    /// Forgets `name` (it was found missing after all).
    pub fn forget(&self, name: &str) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_and_can_be_forgotten() {
        let cache = ProvisionCache::new(Duration::from_secs(10));
        assert!(!cache.is_fresh("a"));
        cache.mark("a");
        assert!(cache.is_fresh("a"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!cache.is_fresh("a"));
        cache.mark("a");
        cache.forget("a");
        assert!(!cache.is_fresh("a"));
    }
}
