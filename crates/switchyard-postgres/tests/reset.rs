#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A change of owner leaves nothing of the previous session behind.
//!
//! Each attack is one way tenant A can leave state on its session: a temporary
//! table shadowing the tenants' own `items`, a held cursor, a role, settings,
//! prepared statements, an advisory lock, a `LISTEN`, sequence state, an open
//! or failed transaction, a statement cancelled mid-flight. One scenario runs
//! every attack, for schema and for row isolation, with the affinity stash on
//! (the same owner's check on, and off: `affinity.check`) and off, on a pool of ONE connection so tenant B's next checkout reuses A's
//! session (unless the backend closed it, which is also a correct answer):
//!
//! 1. A checks out, reads its own rows, plants the state, drops the checkout;
//! 2. B checks out: its ordinary `SELECT`/`INSERT` must see and touch only B's
//!    rows, its session must carry exactly B's scope, and the attack's own
//!    probe must find nothing of A's;
//! 3. A checks out again and must not read anything B wrote.
//!
//! Every failure of every run is collected and reported at the end, named by
//! attack, isolation and affinity, with what leaked.

mod common;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use common::{exec, registry, Fixture, APP_DB, APP_ROLE, READ_ITEMS, TIMEOUT};
use sqlx::{AssertSqlSafe, PgConnection};
use switchyard_core::{Backend as _, Checkout, Isolation, TenantId, TenantRegistry};
use switchyard_postgres::{quote_ident, PgBackend, PgBackendConfig};

/// One run's bound: a checkout that never comes is a failure too.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Leaves state on the session.
const A: &str = "a";
/// Served next, on the same session.
const B: &str = "b";
/// A bystander whose rows A points B's session at.
const C: &str = "c";
/// A `BYPASSRLS` role the app role is a member of.
const AUDITOR: &str = "auditor";
/// A sequence every tenant may use.
const SEQUENCE: &str = "public.shared_seq";

/// One way to leave session state behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    /// `CREATE TEMP TABLE items`: `pg_temp` is searched before `search_path`.
    TempTable,
    /// `DECLARE ... CURSOR WITH HOLD` over A's rows.
    HeldCursor,
    /// `SET ROLE` to a `BYPASSRLS` role the app role is a member of.
    SetRole,
    /// `SET SESSION AUTHORIZATION` (the pool logs in as a superuser here).
    SessionAuthorization,
    /// `SET app.x` (a custom setting no scope touches).
    CustomSetting,
    /// `set_config('app.tenant_id', 'c', false)`: the row setting by hand.
    RowSettingByHand,
    /// `SET default_transaction_read_only = on`.
    ReadOnlyDefault,
    /// `statement_timeout`, `TimeZone`, `work_mem`, `DateStyle`.
    OrdinarySettings,
    /// `SET search_path` to another tenant's schema by hand.
    SearchPathByHand,
    /// `PREPARE` over A's rows.
    Prepared,
    /// A session-level advisory lock.
    AdvisoryLock,
    /// `LISTEN` on a channel.
    Listen,
    /// `nextval`, leaving `currval`/`lastval` defined.
    SequenceState,
    /// `BEGIN` plus an uncommitted write, left open.
    OpenTransaction,
    /// `BEGIN` plus a failing statement: an aborted transaction.
    FailedTransaction,
    /// The open transaction, hidden: A's own `statement_timestamp()` (that
    /// answers `transaction_timestamp()`) put ahead of `pg_catalog` on the
    /// `search_path`, so a check that calls it unqualified under A's
    /// settings sees no transaction block.
    ShadowedCheck,
    /// The pool's prepared same-owner check replaced by one that always
    /// answers true.
    ForgedCheck,
    /// A query over A's rows dropped mid-flight through the checkout.
    CancelledOnCheckout,
    /// The same, on the sqlx connection underneath (untracked).
    CancelledOnDriver,
}

impl Attack {
    const ALL: [Attack; 19] = [
        Attack::TempTable,
        Attack::HeldCursor,
        Attack::SetRole,
        Attack::SessionAuthorization,
        Attack::CustomSetting,
        Attack::RowSettingByHand,
        Attack::ReadOnlyDefault,
        Attack::OrdinarySettings,
        Attack::SearchPathByHand,
        Attack::Prepared,
        Attack::AdvisoryLock,
        Attack::Listen,
        Attack::SequenceState,
        Attack::OpenTransaction,
        Attack::FailedTransaction,
        Attack::ShadowedCheck,
        Attack::ForgedCheck,
        Attack::CancelledOnCheckout,
        Attack::CancelledOnDriver,
    ];

    /// Who the pool logs in as: `SET SESSION AUTHORIZATION` needs a superuser.
    fn login(self) -> &'static str {
        match self {
            Attack::SessionAuthorization => "postgres",
            _ => APP_ROLE,
        }
    }

    /// A's move, on A's checkout.
    async fn plant(self, conn: &mut Checkout<PgBackend>, run: &Run<'_>) {
        let n = run.n;
        match self {
            Attack::TempTable => {
                exec(
                    conn,
                    "CREATE TEMP TABLE items (tenant text NOT NULL, val text NOT NULL)",
                )
                .await
            }
            Attack::HeldCursor => {
                exec(
                    conn,
                    &format!("DECLARE cur_{n} CURSOR WITH HOLD FOR {READ_ITEMS}"),
                )
                .await
            }
            Attack::SetRole => exec(conn, &format!("SET ROLE {AUDITOR}")).await,
            Attack::SessionAuthorization => {
                exec(conn, &format!("SET SESSION AUTHORIZATION {APP_ROLE}")).await
            }
            Attack::CustomSetting => exec(conn, "SET app.x = 'left-by-a'").await,
            Attack::RowSettingByHand => {
                exec(
                    conn,
                    &format!("SELECT set_config('app.tenant_id', '{C}', false)"),
                )
                .await
            }
            Attack::ReadOnlyDefault => exec(conn, "SET default_transaction_read_only = on").await,
            Attack::OrdinarySettings => {
                exec(
                    conn,
                    "SET statement_timeout = '12345s'; SET TIME ZONE 'Pacific/Chatham'; \
                     SET work_mem = '7MB'; SET DateStyle = 'SQL, DMY'",
                )
                .await
            }
            Attack::SearchPathByHand => {
                exec(conn, &format!("SET search_path = {}, public", schema_of(C))).await
            }
            Attack::Prepared => exec(conn, &format!("PREPARE stmt_{n} AS {READ_ITEMS}")).await,
            Attack::AdvisoryLock => {
                exec(
                    conn,
                    &format!("SELECT pg_advisory_lock({})", run.lock_key()),
                )
                .await
            }
            Attack::Listen => exec(conn, &format!("LISTEN chan_{n}")).await,
            Attack::SequenceState => exec(conn, &format!("SELECT nextval('{SEQUENCE}')")).await,
            Attack::OpenTransaction => {
                exec(conn, "BEGIN").await;
                insert(conn, A, &run.tag).await.unwrap();
            }
            Attack::ShadowedCheck => {
                exec(
                    conn,
                    &format!(
                        "CREATE SCHEMA shadow_{n}; \
                         CREATE FUNCTION shadow_{n}.statement_timestamp() RETURNS timestamptz \
                         LANGUAGE sql AS 'SELECT pg_catalog.transaction_timestamp()'; \
                         SET search_path = shadow_{n}, pg_catalog, {}, public",
                        schema_of(A)
                    ),
                )
                .await;
                exec(conn, "BEGIN").await;
                insert(conn, A, &run.tag).await.unwrap();
            }
            Attack::ForgedCheck => {
                exec(
                    conn,
                    "DEALLOCATE switchyard_check; \
                     PREPARE switchyard_check(text, text) AS SELECT true",
                )
                .await
            }
            Attack::FailedTransaction => {
                exec(conn, "BEGIN").await;
                let failed = sqlx::raw_sql("SELECT 1/0").execute(&mut **conn).await;
                assert!(failed.is_err(), "1/0 did not fail");
            }
            Attack::CancelledOnCheckout | Attack::CancelledOnDriver => {
                // Same shape as READ_ITEMS: rows left unread on the wire would
                // pass for B's own if anyone handed them to B.
                let slow = sqlx::query_as::<_, (String, String)>(
                    "SELECT tenant, val FROM items CROSS JOIN pg_sleep(0.3)",
                );
                let cut = Duration::from_millis(50);
                let finished = if self == Attack::CancelledOnCheckout {
                    tokio::time::timeout(cut, slow.fetch_all(&mut **conn)).await
                } else {
                    let driver: &mut PgConnection = conn;
                    tokio::time::timeout(cut, slow.fetch_all(driver)).await
                };
                assert!(finished.is_err(), "the slow query was not cut short");
            }
        }
    }

    /// What B's checkout must not find of A's move (B's ordinary work is
    /// checked for every attack by [`ordinary`]).
    async fn probe(self, conn: &mut Checkout<PgBackend>, run: &Run<'_>, leaks: &mut Vec<String>) {
        let n = run.n;
        match self {
            Attack::TempTable => {
                let temp: i64 = scalar(
                    conn,
                    "SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_my_temp_schema()",
                )
                .await;
                if temp != 0 {
                    leaks.push(format!(
                        "{temp} temporary relation(s) of A's in B's session"
                    ));
                }
                // B's ordinary write must land in B's own table.
                match insert(conn, B, &run.tag).await {
                    Err(e) => leaks.push(format!("B's ordinary INSERT failed: {e}")),
                    Ok(()) => {
                        let landed = run.bed.count_in_own_table(run.isolation, B, &run.tag).await;
                        if landed != 1 {
                            leaks.push(format!(
                                "B's INSERT INTO items did not reach B's own table ({landed} rows there)"
                            ));
                        }
                    }
                }
            }
            Attack::HeldCursor => {
                let fetched = sqlx::query_as::<_, (String, String)>(AssertSqlSafe(format!(
                    "FETCH ALL FROM cur_{n}"
                )))
                .fetch_all(&mut **conn)
                .await;
                if let Ok(rows) = fetched {
                    leaks.push(format!("B fetched A's held cursor: {rows:?}"));
                }
                let open: i64 =
                    scalar(conn, "SELECT count(*) FROM pg_cursors WHERE name <> ''").await;
                if open != 0 {
                    leaks.push(format!("{open} cursor(s) open in B's session"));
                }
            }
            Attack::SetRole | Attack::SessionAuthorization => {
                let login = self.login();
                let (session, current, role): (String, String, String) = sqlx::query_as(
                    "SELECT session_user::text, current_user::text, current_setting('role')",
                )
                .fetch_one(&mut **conn)
                .await
                .unwrap();
                if (session.as_str(), current.as_str(), role.as_str()) != (login, login, "none") {
                    leaks.push(format!(
                        "B runs as session_user {session}, current_user {current}, role {role} \
                         (the pool logs in as {login})"
                    ));
                }
            }
            Attack::CustomSetting => {
                let x: Option<String> = scalar(conn, "SELECT current_setting('app.x', true)").await;
                if x.as_deref().is_some_and(|x| !x.is_empty()) {
                    leaks.push(format!("app.x = {x:?} in B's session"));
                }
            }
            Attack::RowSettingByHand => {
                // Bypassing search_path: only the row setting decides.
                let rows: Vec<String> = sqlx::query_scalar("SELECT tenant FROM public.items")
                    .fetch_all(&mut **conn)
                    .await
                    .unwrap_or_else(|e| vec![format!("error: {e}")]);
                let allowed = match run.isolation {
                    Isolation::Row => Some(B),
                    _ => None,
                };
                let foreign: Vec<_> = rows
                    .iter()
                    .filter(|t| Some(t.as_str()) != allowed)
                    .collect();
                if !foreign.is_empty() {
                    leaks.push(format!("B read public.items rows of {foreign:?}"));
                }
            }
            Attack::ReadOnlyDefault => {
                let setting: String = scalar(
                    conn,
                    "SELECT current_setting('default_transaction_read_only')",
                )
                .await;
                if setting != "off" {
                    leaks.push(format!(
                        "default_transaction_read_only = {setting} in B's session"
                    ));
                }
                if let Err(e) = insert(conn, B, &run.tag).await {
                    leaks.push(format!("B's ordinary INSERT failed: {e}"));
                }
            }
            Attack::OrdinarySettings => {
                let now = settings(conn).await;
                let fresh = run.bed.fresh_settings().await;
                if now != fresh {
                    leaks.push(format!("B's settings {now:?}, a fresh session's {fresh:?}"));
                }
            }
            Attack::SearchPathByHand => {} // `ordinary` checks search_path and rows.
            Attack::Prepared => {
                let executed = sqlx::query_as::<_, (String, String)>(AssertSqlSafe(format!(
                    "EXECUTE stmt_{n}"
                )))
                .fetch_all(&mut **conn)
                .await;
                if let Ok(rows) = executed {
                    leaks.push(format!(
                        "B executed A's prepared statement ({} rows)",
                        rows.len()
                    ));
                }
                let left: i64 = scalar(
                    conn,
                    &format!("SELECT count(*) FROM pg_prepared_statements WHERE name = 'stmt_{n}'"),
                )
                .await;
                if left != 0 {
                    leaks.push("A's prepared statement is still defined in B's session".into());
                }
            }
            Attack::AdvisoryLock => {
                let mut other = run.bed.fx.app(APP_DB).await;
                let key = run.lock_key();
                let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut other)
                    .await
                    .unwrap();
                if !taken {
                    leaks.push(format!(
                        "another session cannot take advisory lock {key} after A's checkout ended"
                    ));
                }
                let held: i64 = scalar(
                    conn,
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
                )
                .await;
                if held != 0 {
                    leaks.push(format!("B's session holds {held} advisory lock(s)"));
                }
            }
            Attack::Listen => {
                let channels: Vec<String> =
                    sqlx::query_scalar("SELECT pg_listening_channels()::text")
                        .fetch_all(&mut **conn)
                        .await
                        .unwrap();
                if !channels.is_empty() {
                    leaks.push(format!(
                        "B's session listens on {channels:?}: it receives A's notifications"
                    ));
                }
            }
            Attack::SequenceState => {
                for probe in ["SELECT lastval()", &format!("SELECT currval('{SEQUENCE}')")] {
                    let value = sqlx::query_scalar::<_, i64>(AssertSqlSafe(probe.to_owned()))
                        .fetch_one(&mut **conn)
                        .await;
                    if let Ok(v) = value {
                        leaks.push(format!("`{probe}` answered A's value {v} in B's session"));
                    }
                }
            }
            Attack::ForgedCheck => {
                let forged: i64 = scalar(
                    conn,
                    "SELECT count(*) FROM pg_prepared_statements \
                     WHERE name = 'switchyard_check' AND statement NOT LIKE '%current_setting%'",
                )
                .await;
                if forged != 0 {
                    leaks.push("B's session keeps A's forged check".into());
                }
            }
            Attack::OpenTransaction | Attack::ShadowedCheck => {
                // B's write commits on its own (autocommit), A's never does.
                if let Err(e) = insert(conn, B, &run.tag).await {
                    leaks.push(format!("B's ordinary INSERT failed: {e}"));
                }
                if run.bed.count_in_own_table(run.isolation, B, &run.tag).await != 1 {
                    leaks
                        .push("B's INSERT is not visible to other sessions (not committed)".into());
                }
                if run.bed.count_in_own_table(run.isolation, A, &run.tag).await != 0 {
                    leaks.push("A's uncommitted write was committed".into());
                }
            }
            Attack::FailedTransaction | Attack::CancelledOnCheckout | Attack::CancelledOnDriver => {
            } // `ordinary` must simply work.
        }
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `tenant_<id>`, quoted.
fn schema_of(id: &str) -> String {
    quote_ident(&format!("tenant_{id}"))
}

async fn scalar<T>(conn: &mut PgConnection, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
        .fetch_one(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `INSERT INTO items` as any application writes it: unqualified.
async fn insert(conn: &mut PgConnection, tenant: &str, val: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO items (tenant, val) VALUES ($1, $2)")
        .bind(tenant)
        .bind(val)
        .execute(conn)
        .await
        .map(drop)
}

/// Settings that no scope touches, as `SHOW`n.
async fn settings(conn: &mut PgConnection) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["statement_timeout", "TimeZone", "work_mem", "DateStyle"] {
        out.push(
            sqlx::query_scalar::<_, String>("SELECT current_setting($1)")
                .bind(name)
                .fetch_one(&mut *conn)
                .await
                .unwrap(),
        );
    }
    out
}

/// The test bed: one PostgreSQL, tenants `a`, `b` and `c` as schemas and as
/// rows of `public.items` under RLS.
struct Bed {
    fx: Fixture,
}

impl Bed {
    async fn start() -> Self {
        let fx = Fixture::start(0).await;
        fx.create_row_table().await;
        for id in [A, B, C] {
            fx.create_schema_tenant(id).await;
            fx.create_row_tenant(id).await;
        }
        let mut admin = fx.admin(APP_DB).await;
        exec(
            &mut admin,
            &format!(
                "CREATE ROLE {AUDITOR} NOLOGIN BYPASSRLS; GRANT {AUDITOR} TO {APP_ROLE}; \
                 GRANT SELECT, INSERT ON public.items TO {AUDITOR}; \
                 CREATE SEQUENCE {SEQUENCE}; GRANT USAGE, SELECT ON SEQUENCE {SEQUENCE} TO {APP_ROLE}"
            ),
        )
        .await;
        let mut app = fx.app(APP_DB).await;
        for id in [A, B, C] {
            let schema = schema_of(id);
            exec(
                &mut app,
                &format!(
                    "GRANT USAGE ON SCHEMA {schema} TO {AUDITOR}; \
                     GRANT SELECT, INSERT ON {schema}.items TO {AUDITOR}"
                ),
            )
            .await;
        }
        Self { fx }
    }

    /// A pool of ONE connection, so the next checkout reuses the session.
    fn backend(&self, login: &str, affinity: Affinity) -> Arc<PgBackend> {
        let mut config = PgBackendConfig::new("pg-reset", self.fx.url(login, APP_DB));
        config.pool = self.fx.config(1).pool;
        config.affinity.enabled = affinity != Affinity::Off;
        config.affinity.check = affinity != Affinity::Unchecked;
        self.fx.backend(config)
    }

    /// Rows of `tenant` with value `val` in its own table, seen by a superuser.
    async fn count_in_own_table(&self, isolation: Isolation, tenant: &str, val: &str) -> i64 {
        let table = match isolation {
            Isolation::Schema => format!("{}.items", schema_of(tenant)),
            _ => "public.items".to_owned(),
        };
        let mut admin = self.fx.admin(APP_DB).await;
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE tenant = $1 AND val = $2"
        )))
        .bind(tenant)
        .bind(val)
        .fetch_one(&mut admin)
        .await
        .unwrap()
    }

    async fn fresh_settings(&self) -> Vec<String> {
        settings(&mut self.fx.app(APP_DB).await).await
    }
}

/// The affinity stash of a run's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Affinity {
    Off,
    /// On, the same owner's checkout checked (the default).
    Checked,
    /// On, with `affinity.check` off: what only the owner's own next
    /// checkout may skip; B's must still find nothing of A's.
    Unchecked,
}

/// One run of the scenario.
struct Run<'a> {
    bed: &'a Bed,
    attack: Attack,
    isolation: Isolation,
    affinity: Affinity,
    arrival: Arrival,
    /// Unique per run: names cursors, statements, channels, lock keys.
    n: usize,
    /// A value B (or A) writes, unique per run.
    tag: String,
}

impl Run<'_> {
    fn lock_key(&self) -> i64 {
        424_200 + self.n as i64
    }

    fn name(&self) -> String {
        format!(
            "{} / {} / affinity {} / B arrives {}",
            self.attack,
            self.isolation,
            match self.affinity {
                Affinity::Off => "off",
                Affinity::Checked => "on",
                Affinity::Unchecked => "on, unchecked",
            },
            match self.arrival {
                Arrival::Later => "later",
                Arrival::Waiting => "waiting",
            }
        )
    }
}

async fn checkout(
    backend: &Arc<PgBackend>,
    tenants: &TenantRegistry,
    id: &str,
) -> Checkout<PgBackend> {
    let entry = tenants.resolve(&TenantId::new(id).unwrap()).unwrap();
    common::checkout(backend, Some(&entry)).await
}

async fn backend_pid(conn: &mut PgConnection) -> i32 {
    scalar(conn, "SELECT pg_backend_pid()").await
}

/// What every checkout of `id` must find, whatever came before: exactly its
/// own scope, and an ordinary `SELECT` that answers its own rows only
/// (`must_have`: its marker row).
async fn ordinary(
    conn: &mut Checkout<PgBackend>,
    run: &Run<'_>,
    id: &str,
    leaks: &mut Vec<String>,
) {
    let who = if id == A { "A" } else { "B" };
    // A superuser login bypasses RLS, so row isolation cannot bind it.
    let rls_binds = run.isolation != Isolation::Row || run.attack.login() == APP_ROLE;
    match sqlx::query_as::<_, (String, String)>(READ_ITEMS)
        .fetch_all(&mut **conn)
        .await
    {
        Err(e) => leaks.push(format!("{who}'s ordinary SELECT failed: {e}")),
        Ok(rows) => {
            let foreign: Vec<_> = rows.iter().filter(|(t, _)| t != id).collect();
            if rls_binds && !foreign.is_empty() {
                leaks.push(format!("{who}'s ordinary SELECT read {foreign:?}"));
            }
            if !rows.iter().any(|(_, v)| *v == format!("marker-{id}")) {
                leaks.push(format!(
                    "{who}'s ordinary SELECT missed its own rows: {rows:?}"
                ));
            }
        }
    }
    let scope = sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT current_setting('search_path'), current_setting('app.tenant_id', true)",
    )
    .fetch_one(&mut **conn)
    .await;
    let (path, setting) = match scope {
        Ok((path, setting)) => (path, setting.unwrap_or_default()),
        Err(e) => {
            leaks.push(format!("{who}'s scope could not be read: {e}"));
            return;
        }
    };
    let (want_path, want_setting) = match run.isolation {
        Isolation::Schema => (schema_of(id), String::new()),
        _ => ("\"$user\", public".to_owned(), id.to_owned()),
    };
    if (path.as_str(), setting.as_str()) != (want_path.as_str(), want_setting.as_str()) {
        leaks.push(format!(
            "{who}'s session has search_path {path:?} and app.tenant_id {setting:?}, \
             not {want_path:?} and {want_setting:?}"
        ));
    }
}

/// What one run found.
struct Found {
    name: String,
    /// B got A's very session (the backend reset it rather than closing it).
    reused: bool,
    leaks: Vec<String>,
}

/// When B asks for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// After A's connection is back in the pool (or stash): the idle path.
    Later,
    /// While A still holds it: the connection goes straight to a waiter.
    Waiting,
}

/// Waits until no connection of `backend` is out, so the next checkout finds
/// the returned one idle (or stashed) instead of waiting for it.
async fn settle(backend: &Arc<PgBackend>) {
    switchyard_testkit::wait_until(TIMEOUT, || async { backend.stats().in_use() == 0 })
        .await
        .unwrap_or_else(|e| panic!("the connection never came back: {e}"));
}

/// The scenario, written once: A plants, B must find nothing, A comes back.
async fn scenario(run: Run<'_>) -> Found {
    let tenants = Arc::new(registry(
        &[(A, run.isolation), (B, run.isolation), (C, run.isolation)],
        None,
    ));
    let backend = run.bed.backend(run.attack.login(), run.affinity);
    let mut leaks = Vec::new();

    let mut conn = checkout(&backend, &tenants, A).await;
    let pid_a = backend_pid(&mut conn).await;
    let mut setup = Vec::new();
    ordinary(&mut conn, &run, A, &mut setup).await;
    assert!(
        setup.is_empty(),
        "{}: A's first checkout: {setup:?}",
        run.name()
    );
    run.attack.plant(&mut conn, &run).await;
    let mut conn = match run.arrival {
        Arrival::Later => {
            drop(conn);
            settle(&backend).await;
            checkout(&backend, &tenants, B).await
        }
        Arrival::Waiting => {
            let waiter = {
                let (backend, tenants) = (backend.clone(), tenants.clone());
                tokio::spawn(async move { checkout(&backend, &tenants, B).await })
            };
            // Only picks the path (B queued before A returns); no assertion
            // depends on it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(conn);
            waiter.await.unwrap()
        }
    };
    let pid_b = backend_pid(&mut conn).await;
    ordinary(&mut conn, &run, B, &mut leaks).await;
    run.attack.probe(&mut conn, &run, &mut leaks).await;
    // Whatever B wrote, A must not read it later. (A failed write is
    // reported by the probe where it matters: the read-only default.)
    let _ = insert(&mut conn, B, &format!("{}-later", run.tag)).await;
    drop(conn);
    settle(&backend).await;

    let mut conn = checkout(&backend, &tenants, A).await;
    ordinary(&mut conn, &run, A, &mut leaks).await;
    drop(conn);
    settle(&backend).await;
    if tokio::time::timeout(Duration::from_secs(5), backend.close())
        .await
        .is_err()
    {
        eprintln!("      (closing the backend took over 5 s)");
    }

    Found {
        name: run.name(),
        reused: pid_a == pid_b,
        leaks,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_finds_nothing_of_the_previous_session() {
    let bed = Bed::start().await;
    let mut found = Vec::new();
    let mut n = 0;
    // `RESET_ATTACK=TempTable` runs the attacks whose name contains that.
    let only = std::env::var("RESET_ATTACK").unwrap_or_default();
    for attack in Attack::ALL {
        if !attack.to_string().contains(&only) {
            continue;
        }
        for isolation in [Isolation::Schema, Isolation::Row] {
            for (affinity, arrival) in [Affinity::Checked, Affinity::Unchecked, Affinity::Off]
                .into_iter()
                .flat_map(|a| [(a, Arrival::Later), (a, Arrival::Waiting)])
            {
                n += 1;
                let run = Run {
                    bed: &bed,
                    attack,
                    isolation,
                    affinity,
                    arrival,
                    n,
                    tag: format!("w-{n}"),
                };
                let name = run.name();
                eprintln!("run   {name}");
                match tokio::time::timeout(RUN_LIMIT, scenario(run)).await {
                    Ok(f) => found.push(f),
                    Err(_) => found.push(Found {
                        name,
                        reused: false,
                        leaks: vec![format!("hung for {RUN_LIMIT:?}")],
                    }),
                }
            }
        }
    }
    let mut failed = Vec::new();
    for f in &found {
        let reuse = if f.reused {
            "same session"
        } else {
            "new session"
        };
        if f.leaks.is_empty() {
            eprintln!("ok    {} ({reuse})", f.name);
        } else {
            eprintln!("LEAK  {} ({reuse}): {}", f.name, f.leaks.join("; "));
            failed.push(format!("{}: {}", f.name, f.leaks.join("; ")));
        }
    }
    eprintln!(
        "{} runs, {} leaked, {} reused A's session",
        found.len(),
        failed.len(),
        found.iter().filter(|f| f.reused).count()
    );
    assert!(
        failed.is_empty(),
        "{} of {} runs leaked:\n{}",
        failed.len(),
        found.len(),
        failed.join("\n")
    );
}
