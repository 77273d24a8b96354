//! The connection pool of one database: slots of `PgConnection`s, each
//! remembering the owner its session last served, and a queue of waiting
//! checkouts.
//!
//! switchyard pools sqlx's `PgConnection`s itself rather than stacking on
//! `PgPool` (which pings on acquire and on release: two round trips of its own
//! per checkout) or on deadpool (whose slots are one FIFO queue behind a
//! semaphore, blind to owners): tenant affinity needs to choose *which* idle
//! connection a checkout gets and *which* waiter a returned connection goes to.
//! The shape follows deadpool's `PoolInner` (a mutex over idle slots, a size
//! that counts connections being opened) and sqlx's `PoolInner` (the waiter
//! hand-off), with owners added.
//!
//! - A checkout takes, in order: the most recently returned idle connection of
//!   its own owner; a new connection while the pool has room; the least
//!   recently returned idle connection of another owner (to be reset); else it
//!   queues.
//! - A returned connection goes to the oldest waiter of its own owner, unless
//!   the head of the queue has already been passed over `max_bypass` times;
//!   then (or with no waiter of its owner) to the head. So a tenant's burst is
//!   served by its warm connections, and no waiter is passed over more than
//!   `max_bypass` times.
//! - A closed connection frees its slot at once; the head waiter is then told
//!   to open a new one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use sqlx::postgres::PgConnectOptions;
use sqlx::PgConnection;
use switchyard_core::TenantScope;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A pooled connection: the sqlx connection, the owner its session last
/// served, and the slot it occupies.
pub(crate) struct Pooled {
    pub(crate) raw: PgConnection,
    /// `None` for unscoped checkouts; the scope of the last tenant otherwise.
    pub(crate) owner: Option<TenantScope>,
    /// Never handed out yet: the session is as the server started it.
    pub(crate) fresh: bool,
    pub(crate) created: Instant,
    /// When a check last vouched for its session (the return check of a
    /// return that needed one); `None` once handed out again.
    pub(crate) vouched: Option<Instant>,
    slot: Slot,
}

impl Pooled {
    /// Closes the connection: the slot is free at once, the goodbye to the
    /// server goes on a task (or the socket is simply dropped without a runtime).
    pub(crate) fn close(self) {
        let Pooled { raw, slot, .. } = self;
        drop(slot);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = sqlx::Connection::close(raw).await;
            });
        }
    }
}

/// One occupied place in a [`Slots`]; frees it when dropped.
struct Slot(Weak<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.0.upgrade() {
            slots.vacate();
        }
    }
}

/// Permission to open one connection, holding its place in the pool.
pub(crate) struct Reservation(Slot);

impl Reservation {
    /// Turns the reservation into a pooled connection.
    pub(crate) fn fill(self, raw: PgConnection) -> Pooled {
        let now = Instant::now();
        Pooled {
            raw,
            owner: None,
            fresh: true,
            created: now,
            vouched: None,
            slot: self.0,
        }
    }
}

/// What a waiter is given.
pub(crate) enum Grant {
    /// A returned connection (checked when handed out, see `crate::lifecycle`).
    Conn(Pooled),
    /// A free place: open a connection.
    Open(Reservation),
}

/// What [`Slots::take`] found.
pub(crate) enum Take {
    /// An idle connection (of the asked owner, or of another to be reset).
    Idle(Pooled),
    /// Room for a new connection.
    Open(Reservation),
    /// Nothing: wait for a returned connection or a free place.
    Wait(oneshot::Receiver<Grant>),
    /// The pool is closed.
    Closed,
}

struct Idle {
    conn: Pooled,
    since: Instant,
}

struct Waiter {
    owner: Option<TenantScope>,
    tx: oneshot::Sender<Grant>,
    bypassed: u32,
}

#[derive(Default)]
struct State {
    /// Oldest first.
    idle: VecDeque<Idle>,
    /// Connections open or being opened, idle or out.
    size: u32,
    /// Oldest first.
    waiters: VecDeque<Waiter>,
    closed: bool,
}

/// Occupancy of one [`Slots`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Occupancy {
    pub(crate) size: u32,
    pub(crate) idle: u32,
}

/// The pool of one database.
pub(crate) struct Slots {
    /// How to open a connection (holds the password: never printed).
    pub(crate) options: PgConnectOptions,
    max: u32,
    max_bypass: u32,
    state: Mutex<State>,
    this: Weak<Slots>,
    /// Connections handed to a waiter of their own owner ahead of others.
    pub(crate) handoffs: AtomicU64,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connect options hold the password: show only the counts.
        let occupancy = self.occupancy();
        f.debug_struct("Slots")
            .field("size", &occupancy.size)
            .field("idle", &occupancy.idle)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Slots {
    pub(crate) fn new(options: PgConnectOptions, max: u32, max_bypass: u32) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            options,
            max,
            max_bypass,
            state: Mutex::new(State::default()),
            this: this.clone(),
            handoffs: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reserve(&self, state: &mut State) -> Reservation {
        state.size += 1;
        Reservation(Slot(self.this.clone()))
    }

    /// Finds a connection for `owner` (see the module docs for the order).
    pub(crate) fn take(&self, owner: Option<&TenantScope>) -> Take {
        let mut state = self.lock();
        if state.closed {
            return Take::Closed;
        }
        let mine = state
            .idle
            .iter()
            .rposition(|i| i.conn.owner.as_ref() == owner);
        if let Some(idle) = mine.and_then(|i| state.idle.remove(i)) {
            return Take::Idle(idle.conn);
        }
        if state.size < self.max {
            return Take::Open(self.reserve(&mut state));
        }
        if let Some(idle) = state.idle.pop_front() {
            return Take::Idle(idle.conn);
        }
        let (tx, rx) = oneshot::channel();
        state.waiters.push_back(Waiter {
            owner: owner.cloned(),
            tx,
            bypassed: 0,
        });
        Take::Wait(rx)
    }

    /// Takes back a returned connection: to a waiter
    /// (its own owner's first, within the bypass bound), else idle.
    pub(crate) fn put(&self, mut conn: Pooled) {
        loop {
            let waiter = {
                let mut state = self.lock();
                if state.closed {
                    drop(state);
                    conn.close();
                    return;
                }
                state.waiters.retain(|w| !w.tx.is_closed());
                match self.pick(&mut state, conn.owner.as_ref()) {
                    Some(pick) => state.waiters.remove(pick),
                    None => {
                        state.idle.push_back(Idle {
                            conn,
                            since: Instant::now(),
                        });
                        return;
                    }
                }
            };
            // Sent outside the lock: a refused grant drops its slot, which locks.
            let Some(waiter) = waiter else { continue };
            match waiter.tx.send(Grant::Conn(conn)) {
                Ok(()) => return,
                // The waiter gave up in the meantime: next one.
                Err(Grant::Conn(back)) => conn = back,
                Err(Grant::Open(_)) => return,
            }
        }
    }

    /// The waiter a connection of `owner` goes to, counting the bypass of
    /// every waiter ahead of it.
    fn pick(&self, state: &mut State, owner: Option<&TenantScope>) -> Option<usize> {
        let head = state.waiters.front()?;
        if head.owner.as_ref() == owner || head.bypassed >= self.max_bypass {
            return Some(0);
        }
        let Some(mine) = state.waiters.iter().position(|w| w.owner.as_ref() == owner) else {
            return Some(0);
        };
        for ahead in state.waiters.iter_mut().take(mine) {
            ahead.bypassed += 1;
        }
        self.handoffs.fetch_add(1, Ordering::Relaxed);
        Some(mine)
    }

    /// A connection closed: its place goes to the head waiter, if any.
    fn vacate(&self) {
        let (waiter, reservation) = {
            let mut state = self.lock();
            state.size = state.size.saturating_sub(1);
            if state.closed {
                return;
            }
            state.waiters.retain(|w| !w.tx.is_closed());
            match state.waiters.pop_front() {
                Some(waiter) => (waiter, self.reserve(&mut state)),
                None => return,
            }
        };
        // A refused grant is dropped here, outside the lock: its slot vacates
        // again and goes to the next waiter.
        let _ = waiter.tx.send(Grant::Open(reservation));
    }

    /// Takes out every idle connection returned before `before`.
    pub(crate) fn take_idle_since(&self, before: Instant) -> Vec<Pooled> {
        let mut state = self.lock();
        let mut out = Vec::new();
        while state.idle.front().is_some_and(|i| i.since < before) {
            if let Some(idle) = state.idle.pop_front() {
                out.push(idle.conn);
            }
        }
        out
    }

    /// Reserves places to open up to `min` connections in all.
    pub(crate) fn top_up(&self, min: u32) -> Vec<Reservation> {
        let mut state = self.lock();
        let want = min.min(self.max).saturating_sub(state.size);
        if state.closed {
            return Vec::new();
        }
        (0..want).map(|_| self.reserve(&mut state)).collect()
    }

    pub(crate) fn occupancy(&self) -> Occupancy {
        let state = self.lock();
        Occupancy {
            size: state.size,
            idle: u32::try_from(state.idle.len()).unwrap_or(u32::MAX),
        }
    }

    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Whether nothing is open and nobody waits (a tenant pool that may go).
    pub(crate) fn is_unused(&self) -> bool {
        let state = self.lock();
        state.size == 0 && state.waiters.is_empty()
    }

    /// Closes the pool: idle connections now, the others as they come back;
    /// waiters are told by their channel closing.
    pub(crate) fn close(&self) {
        let (idle, waiters) = {
            let mut state = self.lock();
            state.closed = true;
            (
                std::mem::take(&mut state.idle),
                std::mem::take(&mut state.waiters),
            )
        };
        drop(waiters);
        for idle in idle {
            idle.conn.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use switchyard_core::{Isolation, TenantId};

    fn owner(id: &str) -> Option<TenantScope> {
        let tenant = TenantId::new(id).unwrap();
        Some(TenantScope::new(
            tenant,
            Isolation::Row,
            format!("row_{id}"),
            "app.tenant_id",
        ))
    }

    fn slots(max: u32, max_bypass: u32) -> Arc<Slots> {
        // Never connects: these tests hand out places, not connections.
        Slots::new(PgConnectOptions::new(), max, max_bypass)
    }

    /// Queues waiters of `owners` (in order) as `take` would, keeping their
    /// receivers open.
    fn queue(slots: &Slots, owners: &[&str]) -> Vec<oneshot::Receiver<Grant>> {
        owners
            .iter()
            .map(|o| match slots.take(owner(o).as_ref()) {
                Take::Wait(rx) => rx,
                _ => panic!("expected to wait"),
            })
            .collect()
    }

    /// Which queued owner each of `returns` (owners of returned connections)
    /// goes to, choosing as `put` does.
    fn hand_out(slots: &Slots, returns: &[&str]) -> Vec<String> {
        returns
            .iter()
            .map(|r| {
                let mut state = slots.lock();
                let pick = slots.pick(&mut state, owner(r).as_ref()).unwrap();
                let waiter = state.waiters.remove(pick).unwrap();
                waiter.owner.unwrap().tenant().as_str().to_owned()
            })
            .collect()
    }

    #[test]
    fn a_returned_connection_goes_to_its_own_owner_at_most_max_bypass_times_ahead_of_the_head() {
        let slots = slots(1, 2);
        let _held = match slots.take(None) {
            Take::Open(r) => r,
            _ => panic!("room for one"),
        };
        let _rx = queue(&slots, &["b", "a", "a", "a", "c"]);
        // `a`'s connections serve `a`'s waiters ahead of `b` twice; then `b`,
        // passed over max_bypass times, is served though an `a` still waits.
        assert_eq!(hand_out(&slots, &["a", "a", "a"]), ["a", "a", "b"]);
        // The left `a` heads now, never passed over: `c` may go ahead of it.
        assert_eq!(hand_out(&slots, &["c", "c"]), ["c", "a"]);
        assert_eq!(slots.handoffs.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn without_bypass_waiters_are_served_strictly_in_order() {
        let slots = slots(1, 0);
        let _held = match slots.take(None) {
            Take::Open(r) => r,
            _ => panic!("room for one"),
        };
        let _rx = queue(&slots, &["b", "a", "c", "a"]);
        assert_eq!(
            hand_out(&slots, &["a", "a", "a", "a"]),
            ["b", "a", "c", "a"]
        );
        assert_eq!(slots.handoffs.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_connection_with_no_waiter_of_its_owner_goes_to_the_head() {
        let slots = slots(1, 4);
        let _held = match slots.take(None) {
            Take::Open(r) => r,
            _ => panic!("room for one"),
        };
        let _rx = queue(&slots, &["b", "c"]);
        assert_eq!(hand_out(&slots, &["a"]), ["b"]);
        // Unscoped is an owner like any other.
        let _more = queue(&slots, &["d"]);
        let mut state = slots.lock();
        assert_eq!(slots.pick(&mut state, None), Some(0));
    }

    /// A waiter that gave up (its checkout timed out, the clock paused and
    /// advanced past its deadline) is skipped; the freed place goes to the
    /// next one, and the pool's size stays exact.
    #[tokio::test(start_paused = true)]
    async fn a_freed_place_skips_waiters_that_timed_out() {
        let slots = slots(1, 4);
        let held = match slots.take(owner("a").as_ref()) {
            Take::Open(r) => r,
            _ => panic!("room for one"),
        };
        let mut rx = queue(&slots, &["b", "c"]);
        let c = rx.pop().unwrap();
        let b = rx.pop().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let timed_out = tokio::time::timeout_at(deadline, b).await;
        assert!(timed_out.is_err(), "nothing was freed");
        // `b`'s receiver is gone with its timeout; `c` still waits.
        drop(held);
        match tokio::time::timeout(Duration::from_secs(1), c).await {
            Ok(Ok(Grant::Open(reservation))) => drop(reservation),
            _ => panic!("the waiter still waiting gets the place"),
        }
        assert_eq!(slots.occupancy().size, 0);
        assert!(slots.is_unused());
    }

    #[tokio::test(start_paused = true)]
    async fn closing_the_pool_wakes_every_waiter_with_an_error() {
        let slots = slots(1, 4);
        let _held = match slots.take(None) {
            Take::Open(r) => r,
            _ => panic!("room for one"),
        };
        let rx = queue(&slots, &["a", "b"]);
        slots.close();
        for waiter in rx {
            assert!(waiter.await.is_err());
        }
        assert!(matches!(slots.take(None), Take::Closed));
    }
}
