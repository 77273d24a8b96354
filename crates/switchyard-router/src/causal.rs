//! Causal reads: read-your-writes on replicas.
//!
//! A write through [`Cluster::run_write`] (or [`Cluster::token`] after a
//! write checkout) yields a [`CausalToken`] naming the position its write
//! reached. A read given the token ([`Cluster::checkout_after`],
//! [`Cluster::run_after`]) is picked by the cluster's strategy as usual, then
//! served only if its node has applied the token:
//!
//! 1. the node's last probe already shows the position applied: served, no
//!    round trip;
//! 2. otherwise the node is asked ([`CausalBackend::confirm`], one round trip)
//!    and asked again, backing off from 0.5ms to 10ms, until it has applied
//!    it or the causal wait (`causal.wait`, or
//!    [`CheckoutOptions::causal_wait`]) is over;
//! 3. a node that fails, or does not answer a confirmation within the wait
//!    (a paused replica), is charged with a failure like an overrun
//!    operation and avoided: the read moves to another replica;
//! 4. when the wait is over, the read falls back to the primary (or fails
//!    with [`CausalError::NotApplied`], per `causal.fallback`); the primary is
//!    asked too, so a forged or future token is refused
//!    ([`CausalError::Future`]) and one whose write a failover lost
//!    ([`CausalError::Lost`]), rather than served as if it held.
//!
//! The no-token checkout path is untouched: all of this runs only for
//! checkouts given a token.

use std::time::Duration;

use switchyard_core::{
    CausalBackend, CausalError, CausalToken, Checkout, Coverage, Deadline, EndpointId, Error,
    History, Intent, OperationError, TenantId,
};
use tokio::time::Instant;

use crate::checkout::{Budget, CheckoutOptions};
use crate::cluster::Cluster;
use crate::config::{CausalFallback, ClusterConfig};
pub use crate::metrics::CausalStats;

/// The first pause between confirmations of one node.
const FIRST_POLL: Duration = Duration::from_micros(500);
/// The longest pause between confirmations.
const MAX_POLL: Duration = Duration::from_millis(10);

/// What asking one node came to.
struct Applied {
    coverage: Coverage,
    /// How long this node was waited for, when it had to be.
    waited: Option<Duration>,
}

impl<B: CausalBackend> Cluster<B> {
    /// Reads a token from a header or cookie, refusing one that is malformed
    /// or was made by another cluster (or names another engine cluster's
    /// history).
    pub fn parse_token(&self, text: &str) -> Result<CausalToken, Error> {
        let token: CausalToken = text.parse().map_err(|reason| self.causal_error(reason))?;
        self.check_token(&token)?;
        Ok(token)
    }

    /// The token for the writes done so far on `conn` (committed: take it
    /// after the commit). One round trip on PostgreSQL (the WAL insert
    /// position), Redis (the master's replication offset) and MongoDB (the
    /// primary's last applied operation time).
    pub async fn token(&self, conn: &mut Checkout<B>) -> Result<CausalToken, Error> {
        let line = self.probed(conn.endpoint());
        let (backend, raw) = conn.split();
        let mark = backend.written(raw, line.as_ref()).await?;
        CausalToken::new(&self.shared.name, mark)
            .ok_or_else(|| self.causal_error(CausalError::Unsupported))
    }

    /// [`run`](Self::run) of a write, followed on the same connection by
    /// [`token`](Self::token): the write's value and its token.
    pub async fn run_write<T, E, F>(
        &self,
        tenant: Option<&TenantId>,
        opts: CheckoutOptions,
        mut op: F,
    ) -> Result<(T, CausalToken), Error>
    where
        F: AsyncFnMut(&mut Checkout<B>) -> Result<T, E> + Send,
        E: OperationError<B::Connection>,
    {
        // Owned captures only (the cluster is an `Arc`), so the future stays
        // `Send` (see `run`).
        let cluster = self.clone();
        self.run(Intent::Write, tenant, opts, async move |conn| {
            let value = match op(conn).await {
                Ok(value) => value,
                Err(error) => return Err(error.into_error(conn.endpoint(), conn.scope())),
            };
            let token = cluster.token(conn).await?;
            Ok::<_, Error>((value, token))
        })
        .await
    }

    /// A read checkout that sees every write `token` names: on a replica that
    /// has applied it, else (after the causal wait) on the primary; see the
    /// [module documentation](crate::causal).
    pub async fn checkout_after(
        &self,
        token: &CausalToken,
        tenant: Option<&TenantId>,
        opts: CheckoutOptions,
    ) -> Result<Checkout<B>, Error> {
        let mut budget = Budget::new(Intent::Read, &opts);
        self.checkout_after_budgeted(token, tenant, opts, &mut budget)
            .await
    }

    /// `checkout_after` within `budget` (one `run_after` spends one budget
    /// over its attempts).
    async fn checkout_after_budgeted(
        &self,
        token: &CausalToken,
        tenant: Option<&TenantId>,
        opts: CheckoutOptions,
        budget: &mut Budget,
    ) -> Result<Checkout<B>, Error> {
        self.check_token(token)?;
        let config = self.shared.config.load_full();
        let until = Instant::now() + opts.causal_wait_or(config.causal.wait);
        let mut avoided = false;
        loop {
            let mut conn = match self.checkout_budgeted(Intent::Read, tenant, budget).await {
                Ok(conn) => conn,
                Err(_) if avoided => return self.fall_back(token, tenant, opts, &config).await,
                Err(error) => return Err(error),
            };
            let on_writer = self.shared.snapshot.load().writer() == Some(conn.endpoint());
            if on_writer && avoided {
                // The replicas ran out before the wait did: a fallback.
                drop(conn);
                return self.fall_back(token, tenant, opts, &config).await;
            }
            let applied = self
                .applied(&mut conn, token, until, on_writer, &config)
                .await;
            match applied {
                Ok(Applied {
                    coverage: Coverage::Covered,
                    waited,
                }) => {
                    self.shared.causal.served(on_writer, waited);
                    return Ok(conn);
                }
                Ok(Applied { coverage, .. }) if on_writer => {
                    return Err(self.refused_by_primary(coverage));
                }
                Ok(Applied { waited, .. }) => {
                    if let Some(waited) = waited {
                        self.shared.causal.waited(waited);
                    }
                    budget.avoid(conn.endpoint().clone());
                    drop(conn);
                    if Instant::now() >= until {
                        return self.fall_back(token, tenant, opts, &config).await;
                    }
                }
                Err(error) => {
                    conn.report_failure(&error);
                    if on_writer {
                        return Err(error);
                    }
                    tracing::debug!(endpoint = %conn.endpoint(), %error, "causal confirmation failed; moving the read");
                    budget.avoid(conn.endpoint().clone());
                }
            }
            avoided = true;
        }
    }

    /// [`checkout_after`](Self::checkout_after), then `op` on the connection,
    /// as [`run`](Self::run) does a read: within the attempt's deadline (an
    /// overrun cancels `op` and closes the connection), and a failed or
    /// overrun `op` is retried on another endpoint, with the same token,
    /// within the retry budget.
    pub async fn run_after<T, E, F>(
        &self,
        token: &CausalToken,
        tenant: Option<&TenantId>,
        opts: CheckoutOptions,
        mut op: F,
    ) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Checkout<B>) -> Result<T, E>,
        E: OperationError<B::Connection>,
    {
        let mut budget = Budget::new(Intent::Read, &opts);
        loop {
            let conn = self
                .checkout_after_budgeted(token, tenant, opts, &mut budget)
                .await?;
            if let Some(done) = self.attempt(Intent::Read, conn, &mut budget, &mut op).await {
                return done;
            }
        }
    }

    /// The primary, when the replicas did not apply `token` in time.
    async fn fall_back(
        &self,
        token: &CausalToken,
        tenant: Option<&TenantId>,
        opts: CheckoutOptions,
        config: &ClusterConfig,
    ) -> Result<Checkout<B>, Error> {
        self.shared.causal.fell_back();
        if config.causal.fallback == CausalFallback::Fail {
            return Err(self.causal_error(CausalError::NotApplied));
        }
        let mut budget = Budget::new(Intent::Write, &opts);
        let mut conn = self
            .checkout_budgeted(Intent::Write, tenant, &mut budget)
            .await?;
        let applied = self
            .applied(&mut conn, token, Instant::now(), true, config)
            .await?;
        match applied.coverage {
            Coverage::Covered => {
                self.shared.causal.served(true, None);
                Ok(conn)
            }
            coverage => Err(self.refused_by_primary(coverage)),
        }
    }

    /// Whether `conn`'s node has applied `token`, asking it until `until`
    /// (once, on the writer). A confirmation that gets no answer within the
    /// causal wait is cancelled, its connection closed, and the node
    /// charged as for an overrun attempt.
    async fn applied(
        &self,
        conn: &mut Checkout<B>,
        token: &CausalToken,
        until: Instant,
        on_writer: bool,
        config: &ClusterConfig,
    ) -> Result<Applied, Error> {
        let line = self.probed(conn.endpoint());
        if line
            .as_ref()
            .is_some_and(|h| token.covered_by(h) == Coverage::Covered)
        {
            return Ok(Applied {
                coverage: Coverage::Covered,
                waited: None,
            });
        }
        let started = Instant::now();
        let mut pause = FIRST_POLL;
        let mut polled = false;
        loop {
            let answer_by = until.max(Instant::now() + config.causal.wait);
            let (backend, raw) = conn.split();
            let asked = backend.confirm(raw, token, line.as_ref());
            let coverage = match tokio::time::timeout_at(answer_by, asked).await {
                Ok(answer) => answer?,
                Err(_) => {
                    conn.discard_on_drop();
                    return Err(Error::OperationTimeout {
                        endpoint: conn.endpoint().clone(),
                        tenant: conn.tenant().cloned(),
                        deadline: Deadline::Attempt,
                        elapsed: started.elapsed(),
                    });
                }
            };
            if coverage != Coverage::NotYet || on_writer || Instant::now() + pause > until {
                let waited = polled.then(|| started.elapsed());
                return Ok(Applied { coverage, waited });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
            polled = true;
        }
    }

    /// Refuses a token of another cluster, or of another engine cluster's
    /// history than the line writes follow.
    fn check_token(&self, token: &CausalToken) -> Result<(), Error> {
        let foreign = !token.belongs_to(&self.shared.name)
            || self
                .shared
                .snapshot
                .load()
                .writer()
                .and_then(|id| self.probed(id))
                .is_some_and(|line| token.covered_by(&line) == Coverage::Never);
        if foreign {
            return Err(self.causal_error(CausalError::ForeignCluster));
        }
        Ok(())
    }

    fn refused_by_primary(&self, coverage: Coverage) -> Error {
        self.causal_error(match coverage {
            Coverage::Never => CausalError::Lost,
            _ => CausalError::Future,
        })
    }

    /// The endpoint's history as its last probe saw it.
    fn probed(&self, id: &EndpointId) -> Option<History> {
        self.shared
            .snapshot
            .load()
            .endpoints
            .iter()
            .find(|ep| ep.id() == id)
            .and_then(|ep| ep.state.health().history.clone())
    }
}

impl<B: switchyard_core::Backend> Cluster<B> {
    /// What causal reads did since the cluster was built.
    pub fn causal_stats(&self) -> CausalStats {
        self.shared.causal.stats()
    }

    fn causal_error(&self, reason: CausalError) -> Error {
        Error::Causal {
            cluster: self.shared.name.to_string(),
            reason,
        }
    }
}
