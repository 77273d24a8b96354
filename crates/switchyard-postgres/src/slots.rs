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
//!   recently returned idle connection of another owner not kept for its owner
//!   (to be reset); else it queues.
//! - Waiters queue in core's [`FairQueue`]: tenants take turns (weighted by
//!   tier), untenanted checkouts are one more class. The *head* is the waiter
//!   whose turn it is.
//! - A returned connection goes to the oldest waiter of its own owner while
//!   that tenant is fewer than `max_bypass` grants ahead of the tenant whose
//!   turn it is (grants counted since each started waiting, per unit of
//!   weight; within a FIFO tier's one class, while the head has been passed
//!   over fewer than `max_bypass` times: [`FairQueue::pop_ahead`]); then (or
//!   with no waiter of its owner) to the head. So tenants served about
//!   equally, each by its own warm connections, need no owner change, and no
//!   tenant runs more than `max_bypass` grants ahead of the one whose turn it
//!   is.
//! - While others wait, a connection whose owner has nobody waiting and holds
//!   less than an equal share of the pool (among the classes that want
//!   connections) is kept idle for that owner for at most the linger, then
//!   goes on to the head: a tenant that checks out again at once keeps its
//!   warm session instead of costing two owner changes, and a tenant below
//!   its share keeps the connections it uses. Connections out are counted by
//!   the class of the checkout holding them ([`Slot`]'s holder).
//! - A closed connection frees its slot at once; the head waiter is then told
//!   to open a new one.
//! - A waiter that gives up takes itself out of the queue ([`Wait`]'s drop);
//!   a grant that reached it in the same instant goes to the next waiter.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::PgConnection;
use switchyard_core::{FairQueue, LingerTimer, QueueClass, TenantScope, WaitKey};
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
    /// The session holds the prepared check this connection prepared
    /// ([`prepare_check`](crate::sql::prepare_check)), as far as we know.
    pub(crate) has_check: bool,
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
struct Slot {
    slots: Weak<Slots>,
    /// The queue class of the checkout holding the connection, while one
    /// does (counted in [`State::held`]).
    holder: Option<QueueClass>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.upgrade() {
            slots.vacate(self.holder.take());
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
            has_check: false,
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
    Wait(Wait),
    /// The pool is closed.
    Closed,
}

struct Idle {
    conn: Pooled,
    since: Instant,
    /// Kept for its owner's next checkout while others wait (see
    /// [`Slots::put`]): no other owner takes it until the linger ends.
    kept: bool,
}

struct Waiter {
    owner: Option<TenantScope>,
    tx: oneshot::Sender<Grant>,
}

#[derive(Default)]
struct State {
    /// Oldest first.
    idle: VecDeque<Idle>,
    /// Connections open or being opened, idle or out.
    size: u32,
    /// In turn by tenant class (see the module docs).
    waiters: FairQueue<Waiter>,
    /// Connections out (or being opened), by the queue class of the checkout
    /// holding them; classes holding none are absent.
    held: HashMap<QueueClass, u32>,
    /// Ends the lingers of kept connections.
    linger_timer: LingerTimer,
    closed: bool,
}

impl State {
    /// Counts the connection in `slot` as held by a checkout of `class`.
    fn hand(&mut self, slot: &mut Slot, class: QueueClass) {
        *self.held.entry(class.clone()).or_insert(0) += 1;
        slot.holder = Some(class);
    }

    /// Counts the connection in `slot` as no longer held by its checkout.
    fn unhand(&mut self, slot: &mut Slot) {
        self.release(slot.holder.take());
    }

    fn release(&mut self, holder: Option<QueueClass>) {
        let Some(class) = holder else { return };
        if let Entry::Occupied(mut held) = self.held.entry(class) {
            *held.get_mut() -= 1;
            if *held.get() == 0 {
                held.remove();
            }
        }
    }

    /// Whether a connection `owner` just returned may be kept idle for its
    /// next checkout while others wait ([`FairQueue::may_keep_for`]).
    fn may_keep_for(&self, owner: Option<&TenantScope>, max: u32) -> bool {
        let (class, _) = QueueClass::of(owner);
        let held = self.held.get(&class).copied().unwrap_or(0);
        self.waiters.may_keep_for(&class, held, max)
    }
}

/// How returned connections are handed on (from the affinity settings).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HandOff {
    /// Most times the head waiter may be passed over for a returned
    /// connection's own owner (0: strict turns).
    pub(crate) max_bypass: u32,
    /// Longest a returned connection is kept for its owner (0: never).
    pub(crate) linger: Duration,
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
    /// How long a returned connection may be kept for its owner (0: never).
    linger: Duration,
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
    pub(crate) fn new(options: PgConnectOptions, max: u32, handoff: HandOff) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            options,
            max,
            max_bypass: handoff.max_bypass,
            linger: handoff.linger,
            state: Mutex::new(State::default()),
            this: this.clone(),
            handoffs: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves a place, held by a checkout of `holder` if there is one.
    fn reserve(&self, state: &mut State, holder: Option<QueueClass>) -> Reservation {
        state.size += 1;
        let mut slot = Slot {
            slots: self.this.clone(),
            holder: None,
        };
        if let Some(class) = holder {
            state.hand(&mut slot, class);
        }
        Reservation(slot)
    }

    /// Finds a connection for `owner` (see the module docs for the order).
    pub(crate) fn take(&self, owner: Option<&TenantScope>) -> Take {
        let mut state = self.lock();
        if state.closed {
            return Take::Closed;
        }
        let (class, weight) = QueueClass::of(owner);
        let mine = state
            .idle
            .iter()
            .rposition(|i| i.conn.owner.as_ref() == owner);
        if let Some(mut idle) = mine.and_then(|i| state.idle.remove(i)) {
            state.hand(&mut idle.conn.slot, class);
            return Take::Idle(idle.conn);
        }
        if state.size < self.max {
            return Take::Open(self.reserve(&mut state, Some(class)));
        }
        let other = state.idle.iter().position(|i| !i.kept);
        if let Some(mut idle) = other.and_then(|i| state.idle.remove(i)) {
            state.hand(&mut idle.conn.slot, class);
            return Take::Idle(idle.conn);
        }
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            owner: owner.cloned(),
            tx,
        };
        let key = state.waiters.push(class, weight, waiter);
        Take::Wait(Wait {
            slots: self.this.clone(),
            key: Some(key),
            rx,
        })
    }

    /// Takes back a returned connection: to a waiter (its own owner's first,
    /// within the bypass bound), else idle. While others wait, a connection
    /// whose owner has nobody waiting and holds less than an equal share of
    /// the pool is kept idle for that owner's next checkout, for at most the
    /// linger: a tenant that checks out again at once (a loop, a burst) keeps
    /// its warm connection instead of costing two owner changes.
    pub(crate) fn put(&self, conn: Pooled) {
        self.give_back(conn, true);
    }

    fn give_back(&self, mut conn: Pooled, may_keep: bool) {
        loop {
            let waiter = {
                let mut state = self.lock();
                state.unhand(&mut conn.slot);
                if state.closed {
                    drop(state);
                    conn.close();
                    return;
                }
                // When kept: since when. The clock is read only for a
                // connection that stays idle, never for a hand-off.
                let mut kept = None;
                if may_keep
                    && !self.linger.is_zero()
                    && state.may_keep_for(conn.owner.as_ref(), self.max)
                {
                    let now = Instant::now();
                    if state
                        .linger_timer
                        .arm(now + self.linger, &self.this, Self::end_lingers)
                    {
                        kept = Some(now);
                    }
                }
                let pick = match kept {
                    Some(_) => None,
                    None => self.pick(&mut state, conn.owner.as_ref()),
                };
                match pick {
                    Some(waiter) => {
                        let (class, _) = QueueClass::of(waiter.owner.as_ref());
                        state.hand(&mut conn.slot, class);
                        waiter
                    }
                    None => {
                        state.idle.push_back(Idle {
                            conn,
                            since: kept.unwrap_or_else(Instant::now),
                            kept: kept.is_some(),
                        });
                        return;
                    }
                }
            };
            // Sent outside the lock: a refused grant drops its slot, which locks.
            match waiter.tx.send(Grant::Conn(conn)) {
                Ok(()) => return,
                // The waiter gave up in the meantime: next one.
                Err(Grant::Conn(back)) => conn = back,
                Err(Grant::Open(_)) => return,
            }
        }
    }

    /// Gives the connections kept for their owner for the whole linger to
    /// whoever waits (or leaves them plainly idle), and sets the timer for the
    /// next.
    fn end_lingers(&self) {
        let ended: Vec<Pooled> = {
            let mut state = self.lock();
            state.linger_timer.fired();
            let now = Instant::now();
            let mut ended = Vec::new();
            let mut kept = VecDeque::with_capacity(state.idle.len());
            for idle in state.idle.drain(..) {
                if idle.kept && idle.since + self.linger <= now {
                    ended.push(idle.conn);
                } else {
                    kept.push_back(idle);
                }
            }
            state.idle = kept;
            let next = state.idle.iter().find(|i| i.kept).map(|i| i.since);
            if let Some(since) = next {
                // Set from a timer task: there is a runtime.
                state
                    .linger_timer
                    .arm(since + self.linger, &self.this, Self::end_lingers);
            }
            ended
        };
        for conn in ended {
            self.give_back(conn, false);
        }
    }

    /// The waiter a connection of `owner` goes to, taken out of the queue:
    /// the oldest waiter of `owner` within the `max_bypass` bound
    /// ([`FairQueue::pop_ahead`]), else the head.
    fn pick(&self, state: &mut State, owner: Option<&TenantScope>) -> Option<Waiter> {
        let head = state.waiters.peek()?;
        if head.owner.as_ref() == owner || self.max_bypass == 0 {
            return state.waiters.pop().map(|(_, w)| w);
        }
        let (class, _) = QueueClass::of(owner);
        let mine = state
            .waiters
            .pop_ahead(&class, self.max_bypass, |w| w.owner.as_ref() == owner);
        match mine {
            Some((_, mine)) => {
                self.handoffs.fetch_add(1, Ordering::Relaxed);
                Some(mine)
            }
            None => state.waiters.pop().map(|(_, w)| w),
        }
    }

    /// A connection closed (held by a checkout of `holder`, if any): its
    /// place goes to the head waiter, if any.
    fn vacate(&self, holder: Option<QueueClass>) {
        let (waiter, reservation) = {
            let mut state = self.lock();
            state.release(holder);
            state.size = state.size.saturating_sub(1);
            if state.closed {
                return;
            }
            match state.waiters.pop() {
                Some((_, waiter)) => {
                    let (class, _) = QueueClass::of(waiter.owner.as_ref());
                    let reservation = self.reserve(&mut state, Some(class));
                    (waiter, reservation)
                }
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

    /// Takes out the idle connections returned before `before` whose session
    /// has been used and not checked since.
    pub(crate) fn take_unchecked_idle_since(&self, before: Instant) -> Vec<Pooled> {
        let mut state = self.lock();
        let unchecked =
            |idle: &Idle| idle.since < before && !idle.conn.fresh && idle.conn.vouched.is_none();
        if !state.idle.iter().any(unchecked) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(state.idle.len());
        for idle in state.idle.drain(..) {
            if unchecked(&idle) {
                out.push(idle.conn);
            } else {
                kept.push_back(idle);
            }
        }
        state.idle = kept;
        out
    }

    /// Reserves places to open up to `min` connections in all.
    pub(crate) fn top_up(&self, min: u32) -> Vec<Reservation> {
        let mut state = self.lock();
        let want = min.min(self.max).saturating_sub(state.size);
        if state.closed {
            return Vec::new();
        }
        (0..want).map(|_| self.reserve(&mut state, None)).collect()
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
            (std::mem::take(&mut state.idle), state.waiters.drain())
        };
        drop(waiters);
        for idle in idle {
            idle.conn.close();
        }
    }
}

/// A checkout queued in a [`Slots`]: resolves to its grant, or to an error
/// when the pool closes. Dropped before that, it takes itself out of the
/// queue, and a grant that reached it in the same instant goes on: a
/// connection to the next waiter, a free place back to the pool.
pub(crate) struct Wait {
    slots: Weak<Slots>,
    /// `Some` while queued.
    key: Option<WaitKey>,
    rx: oneshot::Receiver<Grant>,
}

impl Future for Wait {
    type Output = Result<Grant, oneshot::error::RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = std::task::ready!(Pin::new(&mut self.rx).poll(cx));
        self.key = None;
        Poll::Ready(out)
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let Some(slots) = self.slots.upgrade() else {
            return;
        };
        let granted = {
            let mut state = slots.lock();
            if state.waiters.remove(&key).is_some() {
                return;
            }
            // Already picked: its grant may have been sent in the meantime.
            self.rx.close();
            self.rx.try_recv().ok()
        };
        match granted {
            Some(Grant::Conn(conn)) => slots.put(conn),
            // Dropping the reservation frees the place for the next waiter.
            Some(Grant::Open(reservation)) => drop(reservation),
            None => {}
        }
    }
}
