//! Tenant affinity: a small stash of connections still scoped to the tenant
//! that last used them.
//!
//! A stashed connection stays checked out of the sqlx pool, so the stash is
//! kept honest towards the pool: it is capped, its entries age out, an acquire
//! that finds the pool empty takes the oldest stashed connection (to be reset)
//! before it waits, and nothing is stashed while an acquire waits for the pool,
//! so a waiter is never starved by connections parked here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use switchyard_core::TenantScope;
use tokio::time::Instant;

use crate::connection::PgConn;

struct Stashed {
    conn: PgConn,
    since: Instant,
}

#[derive(Default)]
struct State {
    /// Oldest first.
    entries: VecDeque<Stashed>,
    /// Acquires waiting on the sqlx pool.
    waiting: usize,
}

/// Affinity counters.
#[derive(Debug, Default)]
pub(crate) struct AffinityCounters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) stolen: AtomicU64,
    pub(crate) stashed: AtomicU64,
    pub(crate) evicted: AtomicU64,
}

/// What an acquire got from [`Stash::take`].
pub(crate) enum Take<'a> {
    /// A connection already scoped to the requested tenant.
    Hit(PgConn),
    /// An idle connection from the pool.
    Pool(PoolConnection<Postgres>),
    /// A stashed connection of another tenant, to be reset before use.
    Steal(PgConn),
    /// Nothing at hand: wait on the pool, counted as waiting until dropped.
    Wait(WaitTicket<'a>),
}

/// What became of a connection offered to [`Stash::put`].
pub(crate) enum Put {
    /// It is in the stash.
    Stashed,
    /// It is in the stash, and this older one was pushed out to make room.
    Evicted(PgConn),
    /// It was not taken (stashing off, or an acquire is waiting on the pool).
    Refused(PgConn),
}

/// Counts one acquire as waiting on the pool until dropped.
pub(crate) struct WaitTicket<'a>(&'a Stash);

impl Drop for WaitTicket<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.waiting = state.waiting.saturating_sub(1);
    }
}

/// The per-backend affinity stash.
pub(crate) struct Stash {
    cap: usize,
    max_age: Duration,
    state: Mutex<State>,
    pub(crate) counters: AffinityCounters,
}

impl Stash {
    pub(crate) fn new(cap: usize, max_age: Duration) -> Self {
        Self {
            cap,
            max_age,
            state: Mutex::new(State::default()),
            counters: AffinityCounters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether stashing is on at all.
    pub(crate) fn enabled(&self) -> bool {
        self.cap > 0
    }

    /// Connections stashed now.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Finds a connection for `scope`: the newest fresh stashed one for that
    /// exact scope, else an idle pooled one, else the oldest stashed one of
    /// anyone, else a ticket to wait on the pool. Expired entries met on the
    /// way are put in `expired` for the caller to reset.
    pub(crate) fn take(
        &self,
        scope: Option<&TenantScope>,
        pool: &PgPool,
        expired: &mut Vec<PgConn>,
    ) -> Take<'_> {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(scope) = scope.filter(|_| self.enabled()) {
            let found = state
                .entries
                .iter()
                .rposition(|e| e.conn.scoped.as_ref() == Some(scope));
            if let Some(entry) = found.and_then(|i| state.entries.remove(i)) {
                if now.saturating_duration_since(entry.since) < self.max_age {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    return Take::Hit(entry.conn);
                }
                expired.push(entry.conn);
            }
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(conn) = pool.try_acquire() {
            return Take::Pool(conn);
        }
        if let Some(entry) = state.entries.pop_front() {
            self.counters.stolen.fetch_add(1, Ordering::Relaxed);
            return Take::Steal(entry.conn);
        }
        state.waiting += 1;
        Take::Wait(WaitTicket(self))
    }

    /// Stashes a verified, scoped connection. Gives it back when stashing is off
    /// or an acquire is waiting on the pool; otherwise may give back the oldest
    /// entry, evicted to make room.
    pub(crate) fn put(&self, conn: PgConn) -> Put {
        let mut state = self.lock();
        if !self.enabled() || state.waiting > 0 {
            return Put::Refused(conn);
        }
        state.entries.push_back(Stashed {
            conn,
            since: Instant::now(),
        });
        self.counters.stashed.fetch_add(1, Ordering::Relaxed);
        if state.entries.len() > self.cap {
            if let Some(oldest) = state.entries.pop_front() {
                self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                return Put::Evicted(oldest.conn);
            }
        }
        Put::Stashed
    }

    /// Takes out every entry older than the age limit.
    pub(crate) fn take_expired(&self, now: Instant) -> Vec<PgConn> {
        let mut state = self.lock();
        let mut out = Vec::new();
        while let Some(front) = state.entries.front() {
            if now.saturating_duration_since(front.since) < self.max_age {
                break;
            }
            if let Some(entry) = state.entries.pop_front() {
                out.push(entry.conn);
            }
        }
        out
    }

    /// Takes out every entry.
    pub(crate) fn drain(&self) -> Vec<PgConn> {
        self.lock().entries.drain(..).map(|e| e.conn).collect()
    }
}
