//! Fair queuing of checkouts waiting for a saturated pool.
//!
//! PgBouncer, sqlx and deadpool serve waiters first come, first served: when a
//! noisy tenant has 200 checkouts waiting, a quiet tenant's one checkout waits
//! behind all of them. [`FairQueue`] serves waiting *classes* in turn instead,
//! with deficit round robin (Shreedhar and Varghese, "Efficient Fair Queuing
//! using Deficit Round Robin", SIGCOMM 1995). Every checkout costs one unit, so
//! a class whose turn it is gets `weight` grants in a row, then goes to the back
//! of the ring; a class that runs out of waiters leaves the ring and rejoins at
//! the back. Within a class, waiters are served in arrival order.
//!
//! A class is a tenant (weighted by its tier's
//! [`queue_weight`](crate::TierPolicy::queue_weight)), all the tenants of a tier
//! that asked for [`QueueOrder::Fifo`] together, or the untenanted checkouts.
//!
//! The queue is a value: the pool that owns it keeps it under its own lock and
//! decides what a grant is (a connection, a place to open one, a permit).
//! [`FairGate`](crate::FairGate) is the one for pools that only need a count.
//!
//! ```
//! use std::num::NonZeroU32;
//! use switchyard_core::{FairQueue, QueueClass, TenantId};
//!
//! let noisy = QueueClass::Tenant(TenantId::new("noisy").unwrap());
//! let quiet = QueueClass::Tenant(TenantId::new("quiet").unwrap());
//! let one = NonZeroU32::MIN;
//! let mut queue = FairQueue::new();
//! for n in 0..3 {
//!     queue.push(noisy.clone(), one, ("noisy", n));
//! }
//! queue.push(quiet.clone(), one, ("quiet", 0));
//! let order: Vec<_> = std::iter::from_fn(|| queue.pop().map(|(_, w)| w)).collect();
//! assert_eq!(order, [("noisy", 0), ("quiet", 0), ("noisy", 1), ("noisy", 2)]);
//! ```

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};

use tokio::time::Instant;

use crate::tenant::{TenantId, TenantScope};

/// How a tier's tenants queue for a saturated pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueOrder {
    /// Each tenant is a class of its own, served in turn with the others.
    #[default]
    Fair,
    /// The tier's tenants share one class, first come, first served.
    Fifo,
}

/// A scope's place in a fair queue: its tier's weight, and the tier's name
/// when the tier queues its tenants together ([`QueueOrder::Fifo`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Share {
    weight: NonZeroU32,
    fifo_tier: Option<Arc<str>>,
}

impl Default for Share {
    fn default() -> Self {
        Self {
            weight: NonZeroU32::MIN,
            fifo_tier: None,
        }
    }
}

impl Share {
    /// A share of `weight` grants per turn; `fifo_tier` names the tier whose
    /// tenants queue as one class, `None` for a class per tenant.
    pub fn new(weight: NonZeroU32, fifo_tier: Option<Arc<str>>) -> Self {
        Self { weight, fifo_tier }
    }

    /// Grants per turn.
    pub fn weight(&self) -> NonZeroU32 {
        self.weight
    }
}

/// Who a waiting checkout queues with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QueueClass {
    /// Checkouts with no tenant.
    Untenanted,
    /// One tenant's checkouts.
    Tenant(TenantId),
    /// The checkouts of every tenant of a FIFO tier, by tier name.
    Tier(Arc<str>),
}

impl QueueClass {
    /// The class and weight a checkout for `scope` (or for no tenant) queues in.
    pub fn of(scope: Option<&TenantScope>) -> (QueueClass, NonZeroU32) {
        match scope {
            None => (QueueClass::Untenanted, NonZeroU32::MIN),
            Some(scope) => {
                let share = scope.share();
                let class = match &share.fifo_tier {
                    Some(tier) => QueueClass::Tier(Arc::clone(tier)),
                    None => QueueClass::Tenant(scope.tenant().clone()),
                };
                (class, share.weight)
            }
        }
    }
}

/// The one timer of a pool (or gate) that ends the lingers of what it keeps
/// for a tenant ([`FairQueue::may_keep_for`]): set for the earliest, and set
/// again for the next when it fires.
#[derive(Debug, Default)]
pub struct LingerTimer {
    armed: bool,
}

impl LingerTimer {
    /// Makes sure `end` runs on `owner` at `at` at the latest: a timer
    /// already set fires no later (kept items end in the order they were
    /// kept). False without a runtime to run the timer on: keep nothing then.
    pub fn arm<T: Send + Sync + 'static>(
        &mut self,
        at: Instant,
        owner: &Weak<T>,
        end: fn(&T),
    ) -> bool {
        if self.armed {
            return true;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        self.armed = true;
        let owner = owner.clone();
        rt.spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(owner) = owner.upgrade() {
                end(&owner);
            }
        });
        true
    }

    /// The timer fired: whatever is still kept needs a new one.
    pub fn fired(&mut self) {
        self.armed = false;
    }
}

/// Names one waiter in a [`FairQueue`], to take it out if it gives up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitKey {
    class: QueueClass,
    seq: u64,
}

impl WaitKey {
    /// The class the waiter queued in.
    pub fn class(&self) -> &QueueClass {
        &self.class
    }
}

struct Class<W> {
    weight: u32,
    /// Grants left in the class's current turn (refilled when the turn ends).
    credit: u32,
    /// Grants since the class started waiting, counted from the level of the
    /// class whose turn it was then (see [`FairQueue::pop_ahead`]).
    served: u64,
    /// Times the class's oldest waiter, while the head, was passed over for a
    /// younger waiter of the same class (see [`FairQueue::pop_ahead`]).
    passed: u32,
    /// Oldest first; sequence numbers ascend.
    waiters: VecDeque<(u64, W)>,
}

/// Waiters served class by class in deficit round robin (see the module docs).
///
/// Every operation is O(1) but [`remove`](Self::remove) (a binary search in
/// the waiter's class, then a shift) and a class leaving the ring (linear in
/// the number of waiting classes).
pub struct FairQueue<W> {
    classes: HashMap<QueueClass, Class<W>>,
    /// Classes with waiters; the front is the one whose turn it is.
    ring: VecDeque<QueueClass>,
    next_seq: u64,
    len: usize,
}

impl<W> Default for FairQueue<W> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W> std::fmt::Debug for FairQueue<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairQueue")
            .field("waiters", &self.len)
            .field("classes", &self.ring.len())
            .finish()
    }
}

impl<W> FairQueue<W> {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            classes: HashMap::new(),
            ring: VecDeque::new(),
            next_seq: 0,
            len: 0,
        }
    }

    /// Waiters in the queue.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Classes with waiters.
    pub fn classes(&self) -> usize {
        self.ring.len()
    }

    /// Whether `class` has waiters.
    pub fn is_waiting(&self, class: &QueueClass) -> bool {
        self.classes.contains_key(class)
    }

    /// Whether a connection (or permit) that `class` just gave back may be
    /// kept for that class's next checkout for a moment (the linger) while
    /// others wait: nobody of `class` waits (its own waiter would get it
    /// anyway), and `class` holds (`held`, not counting this one) fewer than
    /// an equal share of `max` among the classes that want one. A tenant that
    /// checks out again at once keeps its warm connection instead of queueing
    /// behind a noisy one; a tenant at its share waits its turn.
    pub fn may_keep_for(&self, class: &QueueClass, held: u32, max: u32) -> bool {
        if self.is_empty() || self.is_waiting(class) {
            return false;
        }
        let wanting = u32::try_from(self.classes())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        held < max / wanting
    }

    /// Queues `waiter` at the back of `class` (which gets `weight` grants per
    /// turn; the weight of a class already waiting is kept).
    pub fn push(&mut self, class: QueueClass, weight: NonZeroU32, waiter: W) -> WaitKey {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.len += 1;
        // A class that starts waiting starts level with the one whose turn
        // it is (scaled by weight): no credit for the time it did not wait.
        let level = self
            .ring
            .front()
            .and_then(|head| self.classes.get(head))
            .map_or(0, |head| {
                head.served * u64::from(weight.get()) / u64::from(head.weight)
            });
        let entry = self.classes.entry(class.clone()).or_insert_with(|| Class {
            weight: weight.get(),
            credit: weight.get(),
            served: level,
            passed: 0,
            waiters: VecDeque::new(),
        });
        if entry.waiters.is_empty() {
            self.ring.push_back(class.clone());
        }
        entry.waiters.push_back((seq, waiter));
        WaitKey { class, seq }
    }

    /// Takes out the waiter `key` names, if it is still queued. A class left
    /// without waiters leaves the ring: a cancelled checkout leaves no trace.
    pub fn remove(&mut self, key: &WaitKey) -> Option<W> {
        let class = self.classes.get_mut(&key.class)?;
        let at = class
            .waiters
            .binary_search_by_key(&key.seq, |(seq, _)| *seq)
            .ok()?;
        let (_, waiter) = class.waiters.remove(at)?;
        self.len -= 1;
        if at == 0 {
            class.passed = 0;
        }
        if class.waiters.is_empty() {
            self.leave(&key.class);
        }
        Some(waiter)
    }

    /// The waiter whose turn it is, taken out of the queue.
    pub fn pop(&mut self) -> Option<(WaitKey, W)> {
        let name = self.ring.front()?.clone();
        let class = self.classes.get_mut(&name)?;
        let (seq, waiter) = class.waiters.pop_front()?;
        self.len -= 1;
        class.served += 1;
        class.passed = 0;
        if class.waiters.is_empty() {
            self.leave(&name);
        } else {
            class.credit -= 1;
            if class.credit == 0 {
                // Its turn is over: refill for the next one, to the back.
                class.credit = class.weight;
                self.ring.rotate_left(1);
            }
        }
        Some((WaitKey { class: name, seq }, waiter))
    }

    /// The waiter whose turn it is, without taking it out.
    pub fn peek(&self) -> Option<&W> {
        let class = self.classes.get(self.ring.front()?)?;
        class.waiters.front().map(|(_, w)| w)
    }

    /// Takes out the oldest waiter of `class` for which `wanted` holds, out
    /// of turn (an affinity hand-off), within `max_lead`, and counts the
    /// grant for `class` (its turn's credit is not charged):
    ///
    /// - from another class than the head's, while `class` is fewer than
    ///   `max_lead` grants ahead of the head's class (grants counted since
    ///   each started waiting, per unit of weight): so classes served about
    ///   equally, each by its own warm connections, keep being served out of
    ///   turn, and none runs more than `max_lead` grants ahead;
    /// - from the head's own class (a FIFO tier's tenants share one), where
    ///   the match stands behind the head, while the head has been passed
    ///   over fewer than `max_lead` times.
    pub fn pop_ahead(
        &mut self,
        class: &QueueClass,
        max_lead: u32,
        mut wanted: impl FnMut(&W) -> bool,
    ) -> Option<(WaitKey, W)> {
        let in_turn = self.ring.front()? == class;
        let at = self
            .classes
            .get(class)?
            .waiters
            .iter()
            .position(|(_, w)| wanted(w))?;
        if in_turn {
            if at == 0 {
                // The match is the head itself: an ordinary grant in turn.
                return self.pop();
            }
            let head = self.classes.get_mut(class)?;
            if head.passed >= max_lead {
                return None;
            }
            head.passed += 1;
        } else {
            let head = self.classes.get(self.ring.front()?)?;
            let (head_served, head_weight) = (u128::from(head.served), u128::from(head.weight));
            let entry = self.classes.get(class)?;
            let ahead = u128::from(entry.served) * head_weight
                >= (head_served + u128::from(max_lead)) * u128::from(entry.weight);
            if ahead {
                return None;
            }
        }
        let entry = self.classes.get_mut(class)?;
        let (seq, waiter) = entry.waiters.remove(at)?;
        self.len -= 1;
        entry.served += 1;
        if at == 0 {
            entry.passed = 0;
        }
        if entry.waiters.is_empty() {
            self.leave(class);
        }
        let key = WaitKey {
            class: class.clone(),
            seq,
        };
        Some((key, waiter))
    }

    /// Keeps only the waiters for which `keep` holds (to drop waiters whose
    /// checkout has gone).
    pub fn retain(&mut self, mut keep: impl FnMut(&W) -> bool) {
        let mut emptied = Vec::new();
        for (name, class) in &mut self.classes {
            let before = class.waiters.len();
            class.waiters.retain(|(_, w)| keep(w));
            self.len -= before - class.waiters.len();
            if class.waiters.is_empty() {
                emptied.push(name.clone());
            }
        }
        for name in emptied {
            self.leave(&name);
        }
    }

    /// Takes out every waiter.
    pub fn drain(&mut self) -> Vec<W> {
        let mut out = Vec::with_capacity(self.len);
        while let Some((_, w)) = self.pop() {
            out.push(w);
        }
        out
    }

    /// `class` has no waiters left: out of the ring and the map.
    fn leave(&mut self, class: &QueueClass) {
        self.classes.remove(class);
        if let Some(at) = self.ring.iter().position(|c| c == class) {
            self.ring.remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> QueueClass {
        QueueClass::Tenant(TenantId::new(name).unwrap())
    }

    fn weight(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn order(queue: &mut FairQueue<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| queue.pop().map(|(_, w)| w)).collect()
    }

    #[test]
    fn classes_take_turns_in_arrival_order_within_each() {
        let mut queue = FairQueue::new();
        for w in ["a1", "a2", "a3"] {
            queue.push(tenant("a"), weight(1), w);
        }
        queue.push(tenant("b"), weight(1), "b1");
        queue.push(QueueClass::Untenanted, weight(1), "u1");
        queue.push(tenant("b"), weight(1), "b2");
        assert_eq!((queue.len(), queue.classes()), (6, 3));
        assert_eq!(order(&mut queue), ["a1", "b1", "u1", "a2", "b2", "a3"]);
        assert!(queue.is_empty());
        assert_eq!(queue.classes(), 0);
    }

    #[test]
    fn a_weight_is_grants_per_turn() {
        let mut queue = FairQueue::new();
        for w in ["g1", "g2", "g3", "g4", "g5"] {
            queue.push(tenant("gold"), weight(3), w);
        }
        for w in ["f1", "f2", "f3"] {
            queue.push(tenant("free"), weight(1), w);
        }
        assert_eq!(
            order(&mut queue),
            ["g1", "g2", "g3", "f1", "g4", "g5", "f2", "f3"]
        );
    }

    #[test]
    fn a_class_that_empties_rejoins_at_the_back() {
        let mut queue = FairQueue::new();
        queue.push(tenant("a"), weight(1), "a1");
        queue.push(tenant("b"), weight(1), "b1");
        queue.push(tenant("b"), weight(1), "b2");
        assert_eq!(queue.pop().unwrap().1, "a1");
        // a comes back while b is waiting: behind b, not ahead of it.
        queue.push(tenant("a"), weight(1), "a2");
        assert_eq!(order(&mut queue), ["b1", "a2", "b2"]);
    }

    #[test]
    fn a_removed_waiter_leaves_no_trace() {
        let mut queue = FairQueue::new();
        let a1 = queue.push(tenant("a"), weight(2), "a1");
        let b1 = queue.push(tenant("b"), weight(1), "b1");
        let a2 = queue.push(tenant("a"), weight(2), "a2");
        assert_eq!(queue.remove(&b1), Some("b1"));
        assert_eq!(queue.remove(&b1), None);
        assert_eq!(queue.classes(), 1);
        assert_eq!(queue.remove(&a2), Some("a2"));
        assert_eq!(queue.remove(&a1), Some("a1"));
        assert!(queue.is_empty());
        assert_eq!((queue.classes(), queue.classes.len()), (0, 0));
        // A fresh class after the removals starts a full turn.
        queue.push(tenant("b"), weight(1), "b2");
        queue.push(tenant("a"), weight(2), "a3");
        queue.push(tenant("a"), weight(2), "a4");
        assert_eq!(order(&mut queue), ["b2", "a3", "a4"]);
    }

    #[test]
    fn an_out_of_turn_pop_takes_the_oldest_match_of_its_class() {
        let mut queue = FairQueue::new();
        queue.push(tenant("a"), weight(1), "a1");
        queue.push(QueueClass::Tier("shared".into()), weight(1), "x1");
        queue.push(QueueClass::Tier("shared".into()), weight(1), "y1");
        queue.push(QueueClass::Tier("shared".into()), weight(1), "y2");
        let tier = QueueClass::Tier("shared".into());
        assert_eq!(
            queue.pop_ahead(&tier, 1, |w| w.starts_with('y')).unwrap().1,
            "y1"
        );
        assert!(queue.pop_ahead(&tenant("zz"), 1, |_| true).is_none());
        assert_eq!(queue.peek(), Some(&"a1"));
        assert_eq!(order(&mut queue), ["a1", "x1", "y2"]);
    }

    #[test]
    fn out_of_turn_grants_stop_at_the_lead_over_the_class_whose_turn_it_is() {
        let mut queue = FairQueue::new();
        for n in 0..10 {
            queue.push(tenant("a"), weight(1), ("a", n));
            queue.push(tenant("b"), weight(1), ("b", n));
        }
        // a's turn; b runs ahead by at most 3 grants, then waits for a.
        let b = tenant("b");
        for n in 0..3 {
            assert_eq!(queue.pop_ahead(&b, 3, |_| true).unwrap().1, ("b", n));
        }
        assert!(queue.pop_ahead(&b, 3, |_| true).is_none());
        assert_eq!(queue.pop().unwrap().1, ("a", 0));
        // Now it is b's turn, and a, behind b, may go out of turn.
        assert_eq!(queue.peek(), Some(&("b", 3)));
        let a = tenant("a");
        assert_eq!(queue.pop_ahead(&a, 3, |_| true).unwrap().1, ("a", 1));
        // No lead at all: only while behind the head.
        assert_eq!(queue.pop_ahead(&a, 0, |_| true).unwrap().1, ("a", 2));
        assert!(queue.pop_ahead(&a, 0, |_| true).is_none());
    }

    #[test]
    fn classes_served_about_equally_keep_going_out_of_turn() {
        let mut queue = FairQueue::new();
        for n in 0..10 {
            queue.push(tenant("a"), weight(1), ("a", n));
            queue.push(tenant("b"), weight(1), ("b", n));
            queue.push(tenant("c"), weight(2), ("c", n));
        }
        let (a, b, c) = (tenant("a"), tenant("b"), tenant("c"));
        for n in 0..4 {
            assert_eq!(queue.pop_ahead(&b, 1, |_| true).unwrap().1, ("b", n));
            assert_eq!(queue.pop_ahead(&a, 1, |_| true).unwrap().1, ("a", n));
            // c weighs twice as much: two grants per one of a's.
            assert_eq!(queue.pop_ahead(&c, 1, |_| true).unwrap().1, ("c", 2 * n));
            assert_eq!(
                queue.pop_ahead(&c, 1, |_| true).unwrap().1,
                ("c", 2 * n + 1)
            );
        }
        // Its lead is counted per unit of weight: two of its own grants.
        assert_eq!(queue.pop_ahead(&c, 1, |_| true).unwrap().1, ("c", 8));
        assert_eq!(queue.pop_ahead(&c, 1, |_| true).unwrap().1, ("c", 9));
        assert!(queue.pop_ahead(&c, 1, |_| true).is_none());
    }

    #[test]
    fn a_class_that_starts_waiting_starts_level_with_the_head() {
        let mut queue = FairQueue::new();
        for n in 0..10 {
            queue.push(tenant("a"), weight(1), ("a", n));
        }
        let a = tenant("a");
        for n in 0..5 {
            assert_eq!(queue.pop_ahead(&a, 2, |_| true).unwrap().1, ("a", n));
        }
        // b arrives after a was served five times: a may lead b by two, not
        // by seven.
        queue.push(tenant("b"), weight(1), ("b", 0));
        assert_eq!(queue.pop().unwrap().1, ("a", 5));
        assert_eq!(queue.peek(), Some(&("b", 0)));
        assert_eq!(queue.pop_ahead(&a, 2, |_| true).unwrap().1, ("a", 6));
        assert!(queue.pop_ahead(&a, 2, |_| true).is_none());
    }

    #[test]
    fn within_a_fifo_class_the_oldest_waiter_is_passed_over_at_most_max_lead_times() {
        // One FIFO tier: q's waiter is first in line, then noisy's. noisy's
        // returned connections go to noisy's waiters out of turn, but q's
        // waiter, the head, is passed at most twice.
        let tier = QueueClass::Tier("shared".into());
        let mut queue = FairQueue::new();
        queue.push(tier.clone(), weight(1), ("q", 0));
        for n in 0..5 {
            queue.push(tier.clone(), weight(1), ("noisy", n));
        }
        let noisy = |w: &(&str, u32)| w.0 == "noisy";
        assert_eq!(queue.pop_ahead(&tier, 2, noisy).unwrap().1, ("noisy", 0));
        assert_eq!(queue.pop_ahead(&tier, 2, noisy).unwrap().1, ("noisy", 1));
        assert!(queue.pop_ahead(&tier, 2, noisy).is_none());
        assert_eq!(queue.pop().unwrap().1, ("q", 0));
        // noisy's oldest is the head now: a plain grant in turn.
        assert_eq!(queue.pop_ahead(&tier, 0, noisy).unwrap().1, ("noisy", 2));
    }

    #[test]
    fn retain_drops_waiters_and_their_empty_classes() {
        let mut queue = FairQueue::new();
        queue.push(tenant("a"), weight(1), "a1");
        queue.push(tenant("b"), weight(1), "b1");
        queue.push(tenant("a"), weight(1), "a2");
        queue.retain(|w| *w != "b1");
        assert_eq!((queue.len(), queue.classes()), (2, 1));
        assert_eq!(queue.drain(), ["a1", "a2"]);
    }

    #[test]
    fn scopes_map_to_classes() {
        let t = TenantId::new("acme").unwrap();
        let scope = TenantScope::new(t.clone(), crate::Isolation::Row, "tenant_acme", "x");
        assert_eq!(
            QueueClass::of(Some(&scope)),
            (QueueClass::Tenant(t.clone()), weight(1))
        );
        let fifo = scope
            .clone()
            .with_share(Share::new(weight(4), Some("internal".into())));
        assert_eq!(
            QueueClass::of(Some(&fifo)),
            (QueueClass::Tier("internal".into()), weight(4))
        );
        assert_eq!(QueueClass::of(None), (QueueClass::Untenanted, weight(1)));
    }
}
