//! Checkouts through the router: pick an endpoint, check out, fail over.
//!
//! Every connection is still created by [`switchyard_core::Checkout::acquire`],
//! so the tenant scope, quota and in-flight accounting stay in one place; the
//! router only decides where, and learns from the outcome through the
//! endpoint's observer.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    Backend, Checkout, CheckoutRequest, Deadline, EndpointId, Error, Intent, TenantEntry, TenantId,
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::config::ReadPreference;
use crate::endpoint::Endpoint;
use crate::health::Event;
use crate::state::ClusterState;
use crate::topology::{Rules, Snapshot};

/// Options for one checkout or [`run`](Cluster::run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckoutOptions {
    deadline: Option<Instant>,
    idempotent: bool,
    causal_wait: Option<Duration>,
}

impl CheckoutOptions {
    /// The defaults: the cluster's `checkout_timeout`, not idempotent.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives up at `deadline` instead of after the cluster's `checkout_timeout`.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Gives up after `timeout` from now.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.deadline(Instant::now() + timeout)
    }

    /// Marks a write as safe to repeat, so it is retried like a read.
    ///
    /// Only for operations that do the same thing when run twice (an upsert by
    /// key, a `SET`): a write that failed mid-flight may have been applied.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// For a read given a causal token: waits up to `wait` for a replica to
    /// apply it, instead of the cluster's `causal.wait`.
    pub fn causal_wait(mut self, wait: Duration) -> Self {
        self.causal_wait = Some(wait);
        self
    }

    /// The causal wait asked for, if any.
    pub(crate) fn causal_wait_or(&self, default: Duration) -> Duration {
        self.causal_wait.unwrap_or(default)
    }
}

/// When the current attempt started and when it must end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    pub started: Instant,
    pub ends: Instant,
    /// Which deadline `ends` is.
    pub deadline: Deadline,
}

/// What one checkout (or one `run`) may still spend on retries.
///
/// Its rules (timeouts, attempts) come from the routing snapshot of its first
/// pick ([`rule`](Self::rule)), so a reload mid-way cannot change the rules of
/// one checkout, and the checkout loads one `ArcSwap`, not two.
pub(crate) struct Budget {
    /// When the operation started: the one clock read a checkout that gets
    /// its connection at the first try needs.
    started: Instant,
    /// The deadline the caller asked for, if any.
    asked: Option<Instant>,
    /// The whole deadline: the asked one, else `checkout_timeout` from
    /// `started` (set by `rule`).
    deadline: Instant,
    retryable: bool,
    /// Attempts made so far.
    attempts: u32,
    /// Endpoints that already failed this operation (reads only; allocated on
    /// the first retry).
    avoid: Vec<EndpointId>,
    /// The rules, once the first pick has read them.
    rules: Option<Rules>,
    /// The attempt in progress: its start and end, set when it checks out.
    attempt: Attempt,
}

impl Budget {
    pub(crate) fn new(intent: Intent, opts: &CheckoutOptions) -> Self {
        let started = Instant::now();
        Self {
            started,
            asked: opts.deadline,
            deadline: opts.deadline.unwrap_or(started),
            retryable: intent == Intent::Read || opts.idempotent,
            attempts: 0,
            avoid: Vec::new(),
            rules: None,
            attempt: Attempt {
                started,
                ends: started,
                deadline: Deadline::Budget,
            },
        }
    }

    /// Takes the rules of the snapshot the first pick reads; later calls
    /// keep the first ones.
    #[inline]
    fn rule(&mut self, rules: &Rules) {
        if self.rules.is_some() {
            return;
        }
        self.rules = Some(*rules);
        self.deadline = self.asked.unwrap_or(self.started + rules.checkout_timeout);
    }

    /// Attempts still allowed after the ones made so far.
    fn attempts_left(&self) -> u32 {
        let max = match self.rules {
            Some(rules) if self.retryable => rules.max_attempts,
            _ => 1,
        };
        max.saturating_sub(self.attempts)
    }

    pub(crate) fn may_retry(&self, error: &Error) -> bool {
        self.retryable
            && error.is_retryable()
            && self.attempts_left() > 0
            && Instant::now() < self.deadline
    }

    /// Starts an attempt at `started`: it ends at `retry.attempt_timeout`
    /// while another attempt may follow, else at the whole deadline.
    #[inline]
    fn start_attempt(&mut self, started: Instant) -> Instant {
        let (ends, deadline) = if self.retryable && self.attempts_left() > 0 {
            let own = started + self.attempt_timeout();
            if own < self.deadline {
                (own, Deadline::Attempt)
            } else {
                (self.deadline, Deadline::Budget)
            }
        } else {
            (self.deadline, Deadline::Budget)
        };
        self.attempt = Attempt {
            started,
            ends,
            deadline,
        };
        ends
    }

    /// The attempt that checked out last.
    pub(crate) fn attempt(&self) -> Attempt {
        self.attempt
    }

    /// `retry.attempt_timeout` (zero before the first pick, which never
    /// matters: nothing reads it before an attempt).
    pub(crate) fn attempt_timeout(&self) -> Duration {
        self.rules.map_or(Duration::ZERO, |r| r.attempt_timeout)
    }

    fn failover_timeout(&self) -> Duration {
        self.rules.map_or(Duration::ZERO, |r| r.failover_timeout)
    }

    /// Keeps the rest of this operation's reads off `id`.
    pub(crate) fn avoid(&mut self, id: EndpointId) {
        self.avoid.push(id);
    }
}

/// The half-open trial a checkout holds. Its verdict goes to the cluster; a
/// checkout that ends without one (cancelled, or failed for a reason that
/// says nothing about the endpoint) gives it back on drop.
struct Trial<'a, B: Backend> {
    cluster: &'a ClusterState<B>,
    ep: Arc<Endpoint<B>>,
}

impl<B: Backend> Trial<'_, B> {
    /// The trial checkout got its connection: the endpoint is back.
    fn passed(self) {
        self.cluster.apply(&self.ep.state, Event::TrialPassed);
    }
}

impl<B: Backend> Drop for Trial<'_, B> {
    fn drop(&mut self) {
        self.cluster.apply(&self.ep.state, Event::TrialAbandoned);
    }
}

type Chosen<'a, B> = (Arc<Endpoint<B>>, Option<Trial<'a, B>>);

/// What one attempt's result means: the checkout's result, or another
/// attempt (with the error that ended this one, if any).
enum Step<B: Backend> {
    Done(Result<Checkout<B>, Error>),
    Retry(Option<Error>),
}

/// `error`, once the task has taken a unit of tokio's cooperative budget, as
/// tokio's own resources take one, yielding if it had none left.
///
/// A checkout that fails before anything waited (an unknown tenant, no
/// endpoint to go to) takes one, and so does one that is about to wait for
/// an endpoint: what ends such a failure is other tasks' work (a registry
/// reload, the probers, a topology source), and a loop that retries at once
/// must let them run. A checkout that finds an endpoint at the first look
/// depends on no other task, and takes none.
async fn with_budget_taken(error: Error) -> Error {
    tokio::task::coop::consume_budget().await;
    error
}

/// The request of the next attempt, which starts now (the first when the
/// operation did, unless it had to wait for an endpoint: no clock read).
fn request(budget: &mut Budget, at_once: bool, entry: Option<&TenantEntry>) -> CheckoutRequest {
    let started = if budget.attempts == 1 && at_once {
        budget.started
    } else {
        Instant::now()
    };
    let deadline = budget.start_attempt(started);
    let req = CheckoutRequest::new(deadline).started_at(started);
    match entry {
        Some(entry) => req.tenant(entry),
        None => req,
    }
}

impl<B: Backend> Cluster<B> {
    /// Checks out a connection for `intent`, scoped to `tenant` when given.
    ///
    /// Writes go to the current primary, waiting up to `failover_timeout` for
    /// one to appear; reads go to replicas per the read preference. A read that
    /// fails with a retryable error is retried on another endpoint within
    /// `retry.max_attempts` and the deadline; a write is not (see
    /// [`checkout_with`](Self::checkout_with)).
    ///
    /// A checkout that finds no endpoint to go to, or names a tenant the
    /// registry does not know, takes a unit of tokio's cooperative budget
    /// (see `tokio::task::coop`): a loop that retries it at once still lets
    /// the health checks that end an outage, or the reload that brings the
    /// tenant, run.
    pub async fn checkout(
        &self,
        intent: Intent,
        tenant: Option<&TenantId>,
    ) -> Result<Checkout<B>, Error> {
        // Not through `checkout_with`: one future fewer to move the result
        // through.
        let mut budget = Budget::new(intent, &CheckoutOptions::default());
        self.checkout_budgeted(intent, tenant, &mut budget).await
    }

    /// [`checkout`](Self::checkout) with a deadline or the idempotent flag.
    pub async fn checkout_with(
        &self,
        intent: Intent,
        tenant: Option<&TenantId>,
        opts: CheckoutOptions,
    ) -> Result<Checkout<B>, Error> {
        let mut budget = Budget::new(intent, &opts);
        self.checkout_budgeted(intent, tenant, &mut budget).await
    }

    pub(crate) async fn checkout_budgeted(
        &self,
        intent: Intent,
        tenant: Option<&TenantId>,
        budget: &mut Budget,
    ) -> Result<Checkout<B>, Error> {
        // No span unless a subscriber may want it (see `Checkout::acquire`).
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return self.attempts(intent, tenant, budget, false).await;
        }
        let span = tracing::debug_span!(
            "switchyard.checkout",
            engine = self.shared.engine,
            cluster = %self.shared.name,
            %intent,
            tenant = tenant.map(TenantId::as_str),
            endpoint = tracing::field::Empty,
            attempts = tracing::field::Empty,
            wait_us = tracing::field::Empty,
        );
        self.attempts(intent, tenant, budget, true)
            .instrument(span)
            .await
    }

    /// Attempts until one hands out a connection or the budget says stop, each
    /// a table of steps: choose an endpoint, check out, take the trial's
    /// verdict or the endpoint's failure to the cluster, judge the result.
    /// `traced`: it runs in the operation's span, which takes its outcome.
    async fn attempts(
        &self,
        intent: Intent,
        tenant: Option<&TenantId>,
        budget: &mut Budget,
        traced: bool,
    ) -> Result<Checkout<B>, Error> {
        let entry = match tenant {
            Some(t) => match self.shared.tenants.load().resolve(t) {
                Ok(entry) => Some(entry),
                // Boxed: only a failing checkout builds it.
                Err(error) => return Err(Box::pin(with_budget_taken(error)).await),
            },
            None => None,
        };
        let mut last_error: Option<Error> = None;
        loop {
            budget.attempts += 1;
            let chosen = match self.choose(intent, budget) {
                Some(chosen) => Ok((chosen, true)),
                None => Box::pin(self.wait_for_endpoint(intent, budget))
                    .await
                    .map(|chosen| (chosen, false)),
            };
            let ((ep, trial), at_once) = match chosen {
                Ok(chosen) => chosen,
                Err(error) => {
                    self.shared.metrics.no_endpoint(&error);
                    return Err(match (intent, last_error) {
                        (Intent::Read, Some(last)) => last,
                        _ => error,
                    });
                }
            };
            let req = request(budget, at_once, entry.as_deref());
            let result = Checkout::acquire(&ep, req).await;
            if trial.is_some() || result.is_err() {
                self.settle(&ep, trial, &result);
            }
            if traced {
                let span = tracing::Span::current();
                span.record("endpoint", ep.id().as_str());
                span.record("attempts", budget.attempts);
                if result.is_ok() {
                    span.record("wait_us", budget.started.elapsed().as_micros() as u64);
                }
            }
            // The common case leaves as it came: a result moved through
            // `verdict` is copied twice more.
            if result.is_ok() && (intent == Intent::Read || self.writes_to(&ep)) {
                return result;
            }
            match self.verdict(intent, &ep, result, budget) {
                Step::Done(done) => return done,
                Step::Retry(error) => last_error = error.or(last_error),
            }
        }
    }

    /// Takes what the attempt's result says about the endpoint to the
    /// cluster: the half-open trial passed (before the writer check of
    /// [`verdict`](Self::verdict): a trial write re-admits the writer it went
    /// to), or the endpoint failed, which decides a trial too.
    fn settle(
        &self,
        ep: &Endpoint<B>,
        trial: Option<Trial<'_, B>>,
        result: &Result<Checkout<B>, Error>,
    ) {
        match (result, trial) {
            (Ok(_), Some(trial)) => trial.passed(),
            (Err(error), _) if error.is_endpoint_failure() => {
                let reason = error.to_string();
                let event = Event::CheckoutFailed {
                    reason,
                    refused: None,
                };
                self.shared.apply(&ep.state, event);
            }
            _ => {}
        }
    }

    /// What the attempt's result means for the checkout, once the caller has
    /// returned a connection it can hand out (see `attempts`).
    fn verdict(
        &self,
        intent: Intent,
        ep: &Endpoint<B>,
        result: Result<Checkout<B>, Error>,
        budget: &mut Budget,
    ) -> Step<B> {
        let started = budget.started;
        match result {
            // The caller returned every other connection: this is a write
            // whose endpoint is no longer the writer. A write connection is
            // handed out only by the endpoint that is the writer now: a
            // checkout that waited through a failover (the old primary
            // killed, then back as an independent primary) must not write
            // there. Nothing was sent yet, so retrying is safe.
            Ok(conn) => {
                tracing::warn!(endpoint = %ep.id(), "endpoint stopped being the writer while a write checkout waited; retrying");
                drop(conn);
                self.shared.metrics.retry(intent);
                // Bounded by the deadline, not the retry budget: this retries the
                // checkout, never an operation, so it is safe for any write.
                if Instant::now() >= budget.deadline {
                    return Step::Done(Err(Error::NoPrimary {
                        cluster: self.shared.name.to_string(),
                        waited: started.elapsed(),
                    }));
                }
                Step::Retry(None)
            }
            Err(error) => {
                if !budget.may_retry(&error) {
                    return Step::Done(Err(error));
                }
                self.shared.metrics.retry(intent);
                tracing::debug!(endpoint = %ep.id(), %error, "checkout failed; retrying on another endpoint");
                if intent == Intent::Read {
                    budget.avoid.push(ep.id().clone());
                }
                Step::Retry(Some(error))
            }
        }
    }

    /// Whether `ep` is the writer now.
    #[inline]
    fn writes_to(&self, ep: &Endpoint<B>) -> bool {
        self.shared.snapshot.load().writer() == Some(ep.id())
    }

    /// An endpoint for `intent` at the first look, which takes no lock; the
    /// caller waits for one ([`wait_for_endpoint`](Self::wait_for_endpoint))
    /// when there is none. Registering with `changed` locks its waiter list,
    /// which every checkout would contend on; the wait is boxed, or every
    /// checkout's future would carry its timer.
    fn choose(&self, intent: Intent, budget: &mut Budget) -> Option<Chosen<'_, B>> {
        // The first attempt starts with the operation: its clock reading is
        // the pick's time too.
        let now = if budget.attempts == 1 {
            budget.started
        } else {
            Instant::now()
        };
        let snap = self.snapshot();
        budget.rule(&snap.rules);
        self.pick_in(&snap, intent, &budget.avoid, now)
    }

    /// [`choose`](Self::choose) once the first look found nothing.
    async fn wait_for_endpoint(
        &self,
        intent: Intent,
        budget: &Budget,
    ) -> Result<Chosen<'_, B>, Error> {
        // A unit of the cooperative budget (see `with_budget_taken`).
        tokio::task::coop::consume_budget().await;
        let shared = &self.shared;
        let mut waiting_since: Option<Instant> = None;
        loop {
            // Registered before looking again, so a primary that appears in
            // between wakes us.
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found = self.pick_in(&self.snapshot(), intent, &budget.avoid, Instant::now());
            if let Some(chosen) = found {
                if let Some(since) = waiting_since {
                    shared.metrics.waited_for_primary(since.elapsed());
                }
                return Ok(chosen);
            }
            if shared.cancel.is_cancelled() {
                return Err(Error::Closed);
            }
            let split_brain = &shared.snapshot.load().split_brain;
            if intent == Intent::Write && !split_brain.is_empty() {
                return Err(Error::SplitBrain {
                    cluster: shared.name.to_string(),
                    primaries: split_brain.clone(),
                });
            }
            if intent == Intent::Read {
                return Err(Error::NoHealthyEndpoint {
                    cluster: shared.name.to_string(),
                    intent,
                });
            }
            let since = *waiting_since.get_or_insert_with(Instant::now);
            let until = budget.deadline.min(since + budget.failover_timeout());
            if tokio::time::timeout_at(until, notified).await.is_err() {
                let waited = since.elapsed();
                shared.metrics.waited_for_primary(waited);
                return Err(Error::NoPrimary {
                    cluster: shared.name.to_string(),
                    waited,
                });
            }
        }
    }

    /// The routing snapshot, once the failures dropped checkouts reported
    /// are applied.
    #[inline]
    fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot<B>>> {
        self.shared.apply_reported();
        self.shared.snapshot.load()
    }

    /// One look at `snap`: a half-open trial first, then the strategy (at
    /// `now`, a clock reading the caller has just made).
    fn pick_in(
        &self,
        snap: &Snapshot<B>,
        intent: Intent,
        avoid: &[EndpointId],
        now: Instant,
    ) -> Option<Chosen<'_, B>> {
        let trial = snap
            .trials(intent, avoid)
            .find(|ep| self.shared.apply(&ep.state, Event::TrialClaimed));
        if let Some(ep) = trial {
            let trial = Trial {
                cluster: &self.shared,
                ep: Arc::clone(ep),
            };
            return Some((Arc::clone(ep), Some(trial)));
        }
        if let Some(ep) = snap.candidates(intent).pick(avoid, now) {
            return Some((Arc::clone(ep), None));
        }
        // A read retry that ran out of replicas may still use the primary.
        if intent == Intent::Read
            && !avoid.is_empty()
            && snap.read_preference != ReadPreference::ReplicasOnly
        {
            return snap.write.pick(avoid, now).map(|ep| (Arc::clone(ep), None));
        }
        None
    }
}
