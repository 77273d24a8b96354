//! The checkout path: a connection from the right pool, made to serve exactly
//! one owner, in at most one round trip of our own.
//!
//! A connection records the owner its session last served (a tenant scope, or
//! none for unscoped checkouts). Its return makes no round trip unless sqlx
//! has work queued on it (see [`crate::returns`]); the check moves to the next
//! checkout, where it rides on the one message that checkout needs anyway.
//! What a checkout costs, besides the caller's own queries:
//!
//! | the connection | round trips | what is sent |
//! |---|---|---|
//! | returned to the same owner | 1 | the check ([`check`]): outside a transaction block, still exactly that scope ([`verify_sql`]; database isolation also resets role and `search_path`; unscoped: a bare `SELECT` and the transaction status it reports, nothing reset), alive |
//! | ... vouched for by a return check < 1 s ago, or with `affinity.check` off | 0 | nothing (with the check off, what the owner's SQL left stays: see [`AffinitySettings::check`](crate::AffinitySettings::check)) |
//! | used by another owner | 1 | [`switch_sql`]: the complete reset ([`RESET_SESSION`](crate::sql::RESET_SESSION)), the next owner's check prepared afresh ([`prepare_check`](crate::sql::prepare_check)), then one `SELECT` with the new scope, the transaction check, the advisory-lock release and the list of SQL-level prepared statements: one simple-protocol message |
//! | ... whose owner `PREPARE`d statements in SQL | +1 | their `DEALLOCATE`s |
//! | new | 0 unscoped or database, 1 scoped | the scope and the prepared check ([`apply_sql`]) |
//!
//! sqlx's own `PgPool` spends two of its own (a ping on acquire and one on
//! release) and resets nothing; the peer approach adds the scope statement.
//!
//! The transaction check is `transaction_timestamp() = statement_timestamp()`
//! in a simple-protocol message: true only when the message opened its own
//! implicit transaction; a session in a failed transaction rejects it, which
//! counts as dirty too. A connection that fails a check is closed (rolling
//! back whatever it had open) and the checkout takes another one. The check
//! also drains what a query abandoned on the raw sqlx connection left, within
//! `reset_timeout`, or the connection is closed.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use switchyard_core::{BackendErrorKind, Error, Isolation, TenantScope};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::Shared;
use crate::connection::PgConn;
use crate::error::{classify, timed_pg_error, PgError};
use crate::slots::{Grant, Pooled, Reservation, Slots, Take};
use crate::sql::{apply_sql, switch_sql, validate_setting_name, verify_sql};
use crate::stats::bump;
use crate::tenant_pools::TenantLease;

/// A connection whose return check passed less than this long ago is handed
/// to its own owner without another check; a server that died since shows up
/// on the first query like on any other connection.
const CHECKED_RECENTLY: Duration = Duration::from_secs(1);

/// What getting a connection ready ended in.
enum Ready {
    /// Serving the asked owner.
    Yes,
    /// This used connection failed its check: close it and take another.
    Stale,
}

impl Shared {
    /// A connection ready for `scope`, traced in a `pg.acquire` span (debug
    /// level) when a subscriber may want it: with `tracing`'s `log` feature,
    /// which sqlx turns on, even a disabled span costs every checkout its
    /// enter, exit and drop (see `switchyard_core::Checkout::acquire`).
    pub(crate) async fn acquire(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<PgConn, Error> {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return self.acquire_untraced(scope, deadline).await;
        }
        let span = tracing::debug_span!(
            "pg.acquire",
            endpoint = %self.config.endpoint,
            tenant = scope.map(|s| s.tenant().as_str()),
        );
        self.acquire_untraced(scope, deadline)
            .instrument(span)
            .await
    }

    async fn acquire_untraced(
        &self,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<PgConn, Error> {
        let started = Instant::now();
        let deadline = deadline.min(started + self.config.pool.acquire_timeout);
        if self.is_closed() {
            return Err(Error::Closed);
        }
        match scope {
            Some(s) if s.isolation() == Isolation::Database => {
                let (slots, name, lease) = self.tenant_slots(s)?;
                let got = self
                    .checkout_from(slots, Some(name), Some(lease), scope, deadline, started)
                    .await;
                if let Err(Error::TenantNotProvisioned { .. }) = &got {
                    // No pool kept for a database that does not exist.
                    self.tenants.forget_if_empty(s.target());
                }
                got
            }
            Some(s) => {
                if s.isolation() == Isolation::Row {
                    // Refused before any I/O.
                    validate_setting_name(s.row_setting()).map_err(|message| {
                        Error::CheckoutRefused {
                            endpoint: self.config.endpoint.clone(),
                            tenant: Some(s.tenant().clone()),
                            reason: format!("row_setting: {message}"),
                        }
                    })?;
                }
                let slots = Arc::clone(&self.slots);
                self.checkout_from(slots, None, None, scope, deadline, started)
                    .await
            }
            None => {
                let slots = Arc::clone(&self.slots);
                self.checkout_from(slots, None, None, scope, deadline, started)
                    .await
            }
        }
    }

    /// Takes a connection from `slots` and gets it ready for `scope`.
    async fn checkout_from(
        &self,
        slots: Arc<Slots>,
        database: Option<Arc<str>>,
        lease: Option<TenantLease>,
        scope: Option<&TenantScope>,
        deadline: Instant,
        started: Instant,
    ) -> Result<PgConn, Error> {
        loop {
            let pooled = match slots.take(scope) {
                Take::Idle(pooled) => pooled,
                Take::Open(reservation) => {
                    self.open(&slots, reservation, scope, deadline, started)
                        .await?
                }
                Take::Wait(granted) => match tokio::time::timeout_at(deadline, granted).await {
                    Ok(Ok(Grant::Conn(pooled))) => pooled,
                    Ok(Ok(Grant::Open(reservation))) => {
                        self.open(&slots, reservation, scope, deadline, started)
                            .await?
                    }
                    Ok(Err(_)) => return Err(Error::Closed),
                    Err(_) => return Err(self.timeout(scope, started)),
                },
                Take::Closed => return Err(Error::Closed),
            };
            let mut conn = PgConn::new(pooled, Arc::clone(&slots), database.clone(), lease.clone());
            match self.ready(&mut conn, scope, deadline).await {
                Ok(Ready::Yes) => return Ok(conn),
                Ok(Ready::Stale) => conn.close(),
                Err(error) => {
                    if matches!(error, Error::TenantNotProvisioned { .. }) {
                        // The session was reset (or never scoped): clean.
                        conn.pooled_mut().owner = None;
                        conn.return_to_pool();
                    }
                    return Err(error);
                }
            }
        }
    }

    fn tenant_slots(
        &self,
        scope: &TenantScope,
    ) -> Result<
        (
            std::sync::Arc<Slots>,
            std::sync::Arc<str>,
            crate::tenant_pools::TenantLease,
        ),
        Error,
    > {
        let database = scope.target();
        let refused = |e: PgError| {
            Error::backend(
                self.endpoint(),
                Some(scope.tenant()),
                BackendErrorKind::Rejected,
                e,
            )
        };
        if self.reserved.iter().any(|r| r == database) {
            return Err(refused(PgError::ReservedDatabase {
                database: database.to_owned(),
            }));
        }
        self.tenants.get(database).map_err(refused)
    }

    /// Opens a connection in `reservation`'s place.
    async fn open(
        &self,
        slots: &Slots,
        reservation: Reservation,
        scope: Option<&TenantScope>,
        deadline: Instant,
        started: Instant,
    ) -> Result<Pooled, Error> {
        let connect = <sqlx::PgConnection as sqlx::Connection>::connect_with(&slots.options);
        match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(raw)) => Ok(reservation.fill(raw)),
            Ok(Err(error)) => {
                drop(reservation);
                Err(timed_pg_error(
                    self.endpoint(),
                    scope,
                    error,
                    started.elapsed(),
                ))
            }
            Err(_) => Err(self.timeout(scope, started)),
        }
    }

    /// Makes `conn` serve `scope`'s owner (see the module docs for the cost).
    async fn ready(
        &self,
        conn: &mut PgConn,
        scope: Option<&TenantScope>,
        deadline: Instant,
    ) -> Result<Ready, Error> {
        let pooled = conn.pooled_mut();
        if pooled.fresh {
            pooled.fresh = false;
            bump(&self.returns.misses);
            let Some(apply) = scope.and_then(|s| apply_sql(s, self.config.tenant_roles)) else {
                pooled.owner = scope.cloned();
                return Ok(Ready::Yes);
            };
            let limit = deadline.min(Instant::now() + self.config.reset_timeout);
            let rows = tokio::time::timeout_at(limit, run(&mut pooled.raw, apply))
                .await
                .map_err(|_| self.timeout(scope, Instant::now()))?
                .map_err(|e| self.scope_error(scope, e))?;
            pooled.has_check = true;
            return self.applied(conn, scope, &rows).map(|()| Ready::Yes);
        }
        // A tenant-role session is never reused unreset: SQL inside the checkout
        // could have left the role (see `crate::roles`).
        let same = self.config.affinity.enabled
            && !self.config.tenant_roles
            && pooled.owner.as_ref() == scope;
        let vouched = pooled.vouched.take();
        let unchecked = !self.config.affinity.check
            || vouched.is_some_and(|at| at.elapsed() < CHECKED_RECENTLY);
        if same && unchecked {
            bump(&self.returns.hits);
            return Ok(Ready::Yes);
        }
        let limit = deadline.min(Instant::now() + self.config.reset_timeout);
        if same {
            bump(&self.returns.hits);
            let checked = tokio::time::timeout_at(limit, check(&mut pooled.raw, scope)).await;
            return Ok(if self.judge(scope, checked) {
                Ready::Yes
            } else {
                Ready::Stale
            });
        }
        bump(&self.returns.misses);
        self.switch(conn, scope, limit).await
    }

    /// The owner change: transaction check, complete reset and new scope.
    async fn switch(
        &self,
        conn: &mut PgConn,
        scope: Option<&TenantScope>,
        limit: Instant,
    ) -> Result<Ready, Error> {
        let pooled = conn.pooled_mut();
        // Marked before any I/O: a cancelled switch can never be taken for
        // the old owner's session.
        pooled.owner = None;
        let (sql, has_check) = switch_sql(scope, self.config.tenant_roles, pooled.has_check);
        pooled.has_check = false;
        let sent = tokio::time::timeout_at(limit, run(&mut pooled.raw, sql)).await;
        let rows = match sent {
            Ok(Ok(rows)) => rows,
            Ok(Err(error)) if classify(&error) == BackendErrorKind::Rejected => {
                // A failed transaction block rejects the message.
                self.judge(scope, Ok(Ok(false)));
                return Ok(Ready::Stale);
            }
            other => {
                self.judge(scope, other.map(|r| r.map(|_| false)));
                return Ok(Ready::Stale);
            }
        };
        // The one row of `switch_sql`'s final `SELECT`: scope applied,
        // outside a transaction block, `DEALLOCATE`s.
        let answer = rows.last();
        let outside = answer.and_then(|r| r.try_get::<Option<bool>, _>(1).ok().flatten());
        if outside != Some(true) {
            self.judge(scope, Ok(Ok(false)));
            return Ok(Ready::Stale);
        }
        let prepared = answer.and_then(|r| r.try_get::<Option<String>, _>(2).ok().flatten());
        if let Some(deallocate) = prepared {
            let done = tokio::time::timeout_at(limit, run(&mut pooled.raw, deallocate)).await;
            if !matches!(done, Ok(Ok(_))) {
                self.judge(scope, done.map(|r| r.map(|_| false)));
                return Ok(Ready::Stale);
            }
        }
        bump(&self.returns.resets);
        pooled.has_check = has_check;
        self.applied(conn, scope, &rows)?;
        Ok(Ready::Yes)
    }

    /// Reads the scope's answer (the last row) and records the new owner.
    fn applied(
        &self,
        conn: &mut PgConn,
        scope: Option<&TenantScope>,
        rows: &[PgRow],
    ) -> Result<(), Error> {
        let pooled = conn.pooled_mut();
        let Some(scope) = scope.filter(|s| s.isolation() != Isolation::Database) else {
            pooled.owner = scope.cloned();
            return Ok(());
        };
        let set = rows
            .last()
            .and_then(|r| r.try_get::<Option<bool>, _>(0).ok().flatten());
        if set == Some(true) {
            pooled.owner = Some(scope.clone());
            return Ok(());
        }
        Err(Error::TenantNotProvisioned {
            endpoint: self.endpoint().clone(),
            tenant: scope.tenant().clone(),
            what: "schema",
            name: scope.target().to_owned(),
        })
    }

    /// Makes `conn` serve `scope` when the checkout's acquire was for another
    /// owner (the guard always acquires for the scope it applies, so this is
    /// normally free).
    pub(crate) async fn scope(&self, conn: &mut PgConn, scope: &TenantScope) -> Result<(), Error> {
        let wrong_database = |have: &str| Error::Scope {
            endpoint: self.endpoint().clone(),
            tenant: scope.tenant().clone(),
            action: "apply",
            source: Box::new(PgError::WrongDatabase {
                have: have.to_owned(),
                want: scope.target().to_owned(),
            }),
        };
        if scope.isolation() == Isolation::Database {
            return match conn.database.as_deref() {
                Some(db) if db == scope.target() => Ok(()),
                Some(db) => Err(wrong_database(&format!("database {db:?}"))),
                None => Err(wrong_database("the shared pool")),
            };
        }
        if let Some(db) = conn.database.as_deref() {
            return Err(wrong_database(&format!("database {db:?}")));
        }
        if conn.session_scope() == Some(scope) {
            return Ok(());
        }
        let limit = Instant::now() + self.config.reset_timeout;
        match self.switch(conn, Some(scope), limit).await? {
            Ready::Yes => Ok(()),
            Ready::Stale => Err(Error::Scope {
                endpoint: self.endpoint().clone(),
                tenant: scope.tenant().clone(),
                action: "reset",
                source: "the previous owner's session could not be reset".into(),
            }),
        }
    }

    fn timeout(&self, scope: Option<&TenantScope>, started: Instant) -> Error {
        Error::Timeout {
            endpoint: self.endpoint().clone(),
            tenant: scope.map(|s| s.tenant().clone()),
            elapsed: started.elapsed(),
        }
    }

    /// A broken connection is an endpoint failure; anything else the server
    /// said is a failed scope.
    fn scope_error(&self, scope: Option<&TenantScope>, error: sqlx::Error) -> Error {
        match (classify(&error), scope) {
            (BackendErrorKind::Connect | BackendErrorKind::Io, _) | (_, None) => {
                timed_pg_error(self.endpoint(), scope, error, Duration::ZERO)
            }
            (_, Some(scope)) => Error::Scope {
                endpoint: self.endpoint().clone(),
                tenant: scope.tenant().clone(),
                action: "apply",
                source: Box::new(error),
            },
        }
    }
}

/// Runs one simple-protocol message and collects its rows.
pub(crate) async fn run(raw: &mut PgConnection, sql: String) -> Result<Vec<PgRow>, sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(raw).await
}

/// The check of a session serving `owner`: outside a transaction block and
/// still carrying exactly that scope. A session in a failed transaction
/// block rejects the check: dirty, like one inside an open block.
pub(crate) async fn check(
    raw: &mut PgConnection,
    owner: Option<&TenantScope>,
) -> Result<bool, sqlx::Error> {
    let clean = match verify_sql(owner) {
        None => outside_transaction(raw).await,
        Some(sql) => run(raw, sql).await.and_then(|rows| {
            let row = rows.last().ok_or(sqlx::Error::RowNotFound)?;
            Ok(row.try_get::<Option<bool>, _>(0)?.unwrap_or(false))
        }),
    };
    match clean {
        Err(error) if classify(&error) == BackendErrorKind::Rejected => Ok(false),
        clean => clean,
    }
}

/// The check of an unscoped session: whether it is outside a transaction
/// block, asked for almost nothing on the server. `SELECT` with no target
/// list needs no catalog lookup and changes no setting, and a session in a
/// failed transaction still rejects it (an error, so dirty). The answer is
/// the transaction status PostgreSQL reports after every message; sqlx keeps
/// it to itself except through `begin_with`, whose contract is to fail with
/// `BeginFailed` when the statement leaves the session outside a
/// transaction: here that failure is the clean answer. A session the
/// statement finds inside a block is dirty; dropping the `Transaction` sqlx
/// hands back queues its `ROLLBACK`, and the connection is closed anyway.
///
/// Nothing else is undone: the next checkout is unscoped too, no tenant's,
/// and what the service's own unscoped code set on the session (a role, a
/// `search_path`) stays for it, as on sqlx's own pool. A tenant's checkout
/// gets the complete reset first.
async fn outside_transaction(raw: &mut PgConnection) -> Result<bool, sqlx::Error> {
    match raw.begin_with("SELECT").await {
        Err(sqlx::Error::BeginFailed) => Ok(true),
        Ok(open) => {
            drop(open);
            Ok(false)
        }
        Err(error) => Err(error),
    }
}
