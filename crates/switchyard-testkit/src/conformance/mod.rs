//! The tenant isolation conformance suite: one set of scenarios, written once,
//! that every engine crate runs for every isolation level it offers.
//!
//! The promise under test is switchyard's central one: a checkout for tenant A
//! never sees or changes tenant B's data, whatever A's application sends. The
//! suite plays the attacker through the public API, as an ordinary application
//! would use it. An engine takes part by implementing [`Fixture`] in its own
//! test file (the testkit depends on none of switchyard's crates, so the
//! fixture speaks in plain strings) and calling [`run`]:
//!
//! 1. **Data**: every tenant of [`TENANTS`] writes its [`marker`] and a name of
//!    its own ([`owned_name`]); each then reads back exactly its own marker.
//!    Look-alike ids (`7` and `007`, `acme` and `ACME`) must stay apart.
//! 2. **Enumeration**: what a tenant can list never names another tenant's key.
//! 3. **Hostile ids**: each of [`HOSTILE_IDS`] is refused before any I/O.
//! 4. **Reserved namespaces**: each template of
//!    [`Fixture::reserved_templates`] is refused when the tier is configured,
//!    and the ordinary `tenant_{id}` is accepted (so the case can fail).
//! 5. **Escapes**: each engine-specific attack of [`Fixture::escapes`] (escape
//!    commands and options, wrong-typed values, session state left for the
//!    next checkout) either is refused or runs without showing the victim's
//!    data; afterwards both tenants read back exactly their own marker, so a
//!    planted write or a leaked session shows up too.
//!
//! [`run`] prints one line per case and panics at the end naming every failed
//! case, so one test per isolation level reports everything at once. A case a
//! stand-in server cannot show is printed as `skipped: needs a real ...`.
//!
//! ```no_run
//! use switchyard_testkit::conformance::{self, Attempt, Category, Fixture};
//!
//! struct Memory;
//!
//! impl Fixture for Memory {
//!     type Escape = &'static str;
//!     fn label(&self) -> String { "memory/row".into() }
//!     async fn write(&self, _tenant: &str, _key: &str, _value: &str) -> Result<(), String> { Ok(()) }
//!     async fn read(&self, _tenant: &str, _key: &str) -> Result<Vec<String>, String> { Ok(vec![]) }
//!     async fn names(&self, _tenant: &str) -> Result<Vec<String>, String> { Ok(vec![]) }
//!     async fn checkout(&self, _tenant: &str) -> Result<(), String> { Ok(()) }
//!     fn reserved_templates(&self) -> Vec<(String, &'static str)> { vec![] }
//!     async fn configure(&self, _template: &str) -> Result<(), String> { Ok(()) }
//!     fn escapes(&self) -> Vec<(Category, Self::Escape)> { vec![] }
//!     async fn attempt(&self, _e: Self::Escape, _attacker: &str, _victim: &str) -> Attempt {
//!         Attempt::Refused("nothing to try".into())
//!     }
//! }
//! # async fn demo() { conformance::run(&Memory).await; }
//! ```

use std::fmt;

/// The tenants every fixture must be able to serve at its level (provisioned
/// before [`run`]): two ordinary ones and look-alikes of each.
pub const TENANTS: [&str; 5] = ["acme", "globex", "ACME", "7", "007"];

/// Pairs that must stay apart although an engine could confuse them (a
/// case-insensitive comparison, a numeric column).
pub const LOOK_ALIKES: [(&str, &str); 2] = [("acme", "ACME"), ("007", "7")];

/// Tenant ids that must be refused before any I/O: injection, path steps,
/// globs, control characters, non-ASCII, empty and too long.
pub const HOSTILE_IDS: &[&str] = &[
    "a'; DROP TABLE x; --",
    "a\"b",
    "a`b",
    "../x",
    "a.b",
    "*",
    "a*",
    "a b",
    "a\r\nFLUSHALL",
    "a\0",
    "tenant:other",
    "{a}",
    "$where",
    "zürich",
    "",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
];

/// The key every tenant writes its marker under.
pub const MARKER_KEY: &str = "marker";

/// The marker value of `tenant`: what only `tenant` may ever read.
pub fn marker(tenant: &str) -> String {
    format!("marker-of-{tenant}")
}

/// A key named after `tenant`, which enumeration by anyone else must not show.
pub fn owned_name(tenant: &str) -> String {
    format!("owned_by_{tenant}")
}

/// `error` and each of its sources, joined by `: `, for [`Attempt::Refused`]
/// and fixture errors (the top-level message alone often names only the
/// endpoint).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// What an escape is trying to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// Read or write another tenant's data.
    CrossData,
    /// List another tenant's names (keys, tables, collections, indices).
    Enumeration,
    /// Leave session or connection state for the next tenant's checkout.
    SessionState,
    /// Reach a reserved or shared namespace.
    Reserved,
    /// A hostile id or a value of the wrong type.
    HostileValue,
    /// One of the engine's own escape-capable commands or options.
    EngineCommand,
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Category::CrossData => "cross-tenant data",
            Category::Enumeration => "enumeration",
            Category::SessionState => "session state",
            Category::Reserved => "reserved namespace",
            Category::HostileValue => "hostile value",
            Category::EngineCommand => "engine command",
        })
    }
}

/// What happened when an escape was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The handle or the server refused it; the error as shown to the caller.
    Refused(String),
    /// It ran; everything it returned, which must not show the victim's
    /// marker or names.
    Ran(String),
    /// The fixture saw the boundary broken itself (on the server, through an
    /// administrative connection): what it found.
    Breached(String),
    /// This server cannot show the case (a stand-in); the reason, printed as
    /// `skipped: needs a real ...`.
    Skipped(String),
    /// It ran and reached the other tenant, and this isolation level
    /// documents that it trusts the application not to do it (raw SQL naming
    /// another schema, say); printed as `trusted: ...` so the line is seen,
    /// not counted as broken. A level that enforces the boundary must never
    /// answer this.
    Trusted(String),
}

impl Attempt {
    /// [`Ran`](Self::Ran) with what an operation returned, or
    /// [`Refused`](Self::Refused) with its [`error_chain`].
    pub fn of<T: fmt::Debug, E: std::error::Error>(result: Result<T, E>) -> Self {
        match result {
            Ok(value) => Self::Ran(format!("{value:?}")),
            Err(e) => Self::Refused(error_chain(&e)),
        }
    }
}

/// One engine at one isolation level, as the suite drives it.
///
/// Every method checks out a connection of its own through the engine's
/// public API, scoped to the tenant it is given, and returns it before
/// answering. Errors are returned as text (the suite only shows them).
#[allow(async_fn_in_trait)]
pub trait Fixture {
    /// The engine's own list of attacks.
    type Escape: Copy + fmt::Debug;

    /// `engine/level`, e.g. `redis/row`, shown on every line.
    fn label(&self) -> String;

    /// Writes `value` under `key` as `tenant`.
    async fn write(&self, tenant: &str, key: &str, value: &str) -> Result<(), String>;

    /// Every value `tenant` sees under `key` (more than one is a leak on a
    /// shared table).
    async fn read(&self, tenant: &str, key: &str) -> Result<Vec<String>, String>;

    /// Every name `tenant` can list (keys, rows' keys, collections, ...).
    async fn names(&self, tenant: &str) -> Result<Vec<String>, String>;

    /// Resolves `tenant` (any string) and checks out a scoped connection.
    async fn checkout(&self, tenant: &str) -> Result<(), String>;

    /// Tier templates that can render a reserved or shared namespace at this
    /// level, each with what it would reach.
    fn reserved_templates(&self) -> Vec<(String, &'static str)>;

    /// Configures a tier at this level with `template` (as building a
    /// cluster or backend would); reserved ones must fail here.
    async fn configure(&self, template: &str) -> Result<(), String>;

    /// The engine-specific attacks, each with its category.
    fn escapes(&self) -> Vec<(Category, Self::Escape)>;

    /// Tries `escape` as `attacker` against `victim`.
    async fn attempt(&self, escape: Self::Escape, attacker: &str, victim: &str) -> Attempt;

    /// Why this server cannot serve `tenant` of [`TENANTS`] next to the
    /// others (a stand-in whose names ignore case, say), printed as skipped;
    /// `None` (the default) runs every tenant.
    fn cannot_serve(&self, tenant: &str) -> Option<String> {
        let _ = tenant;
        None
    }
}

/// The tenants of [`TENANTS`] that `fixture` can serve, reporting the others.
fn served<F: Fixture>(fixture: &F, report: &mut Report) -> Vec<&'static str> {
    let mut out = Vec::new();
    for tenant in TENANTS {
        match fixture.cannot_serve(tenant) {
            Some(why) => report.push(format!("tenant {tenant}"), Verdict::Skipped(why)),
            None => out.push(tenant),
        }
    }
    out
}

/// How one case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Held; with what was seen (the refusal, or what ran).
    Held(String),
    /// Broke; why.
    Broke(String),
    /// Not shown on this server.
    Skipped(String),
    /// Not enforced at this level, by its documented trust model.
    Trusted(String),
}

/// One case's result.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case's name.
    pub case: String,
    /// Its verdict.
    pub verdict: Verdict,
}

/// Everything [`run`] found, in order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The fixture's label.
    pub label: String,
    /// One entry per case.
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// The cases that broke.
    pub fn failures(&self) -> Vec<&CaseResult> {
        self.cases
            .iter()
            .filter(|c| matches!(c.verdict, Verdict::Broke(_)))
            .collect()
    }

    fn push(&mut self, case: String, verdict: Verdict) {
        let line = match &verdict {
            Verdict::Held(seen) => format!("ok ({})", short(seen)),
            Verdict::Broke(why) => format!("BROKEN: {why}"),
            Verdict::Skipped(why) => format!("skipped: {why}"),
            Verdict::Trusted(why) => format!("trusted (documented, not enforced): {why}"),
        };
        println!("conformance {}: {case} ... {line}", self.label);
        self.cases.push(CaseResult { case, verdict });
    }
}

fn short(text: &str) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() > 140 {
        format!("{}...", one_line.chars().take(140).collect::<String>())
    } else {
        one_line
    }
}

/// Runs every case against `fixture` and panics naming each one that broke.
pub async fn run<F: Fixture>(fixture: &F) -> Report {
    let report = check(fixture).await;
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{} broke {} isolation case(s):\n{}",
        report.label,
        failures.len(),
        failures
            .iter()
            .map(|c| format!("  {}: {:?}", c.case, c.verdict))
            .collect::<Vec<_>>()
            .join("\n")
    );
    report
}

/// Runs every case against `fixture` and returns the report without judging.
pub async fn check<F: Fixture>(fixture: &F) -> Report {
    let mut report = Report {
        label: fixture.label(),
        cases: Vec::new(),
    };
    let tenants = served(fixture, &mut report);
    seed(fixture, &mut report, &tenants).await;
    own_data(fixture, &mut report, &tenants).await;
    enumeration(fixture, &mut report, &tenants).await;
    hostile_ids(fixture, &mut report).await;
    reserved(fixture, &mut report).await;
    for (category, escape) in fixture.escapes() {
        escape_case(fixture, &mut report, category, escape).await;
    }
    report
}

async fn seed<F: Fixture>(fixture: &F, report: &mut Report, tenants: &[&str]) {
    for &tenant in tenants {
        let written = async {
            fixture.write(tenant, MARKER_KEY, &marker(tenant)).await?;
            fixture.write(tenant, &owned_name(tenant), "1").await
        }
        .await;
        if let Err(e) = written {
            report.push(
                format!("seed {tenant}"),
                Verdict::Broke(format!("could not write as {tenant}: {e}")),
            );
        }
    }
}

/// Whether `tenant` reads back exactly its own marker.
async fn reads_own<F: Fixture>(fixture: &F, tenant: &str) -> Result<String, String> {
    let seen = fixture.read(tenant, MARKER_KEY).await?;
    if seen == [marker(tenant)] {
        Ok(format!("{tenant} reads {seen:?}"))
    } else {
        Err(format!(
            "{tenant} reads {seen:?}, expected only {:?}",
            marker(tenant)
        ))
    }
}

async fn own_data<F: Fixture>(fixture: &F, report: &mut Report, tenants: &[&str]) {
    for &tenant in tenants {
        let verdict = match reads_own(fixture, tenant).await {
            Ok(seen) => Verdict::Held(seen),
            Err(why) => Verdict::Broke(why),
        };
        let look_alike = LOOK_ALIKES
            .iter()
            .find(|(a, b)| *a == tenant || *b == tenant);
        let case = match look_alike {
            Some((a, b)) => format!("cross-tenant data: {tenant} (look-alikes {a}/{b})"),
            None => format!("cross-tenant data: {tenant}"),
        };
        report.push(case, verdict);
    }
}

async fn enumeration<F: Fixture>(fixture: &F, report: &mut Report, tenants: &[&str]) {
    for &tenant in tenants {
        let verdict = match fixture.names(tenant).await {
            Err(e) => Verdict::Broke(format!("listing failed: {e}")),
            Ok(names) => {
                let foreign: Vec<&String> = names
                    .iter()
                    .filter(|n| {
                        TENANTS
                            .iter()
                            .any(|t| *t != tenant && n.contains(&owned_name(t)))
                    })
                    .collect();
                if !names.iter().any(|n| n.contains(&owned_name(tenant))) {
                    Verdict::Broke(format!("{tenant}'s own name is missing from {names:?}"))
                } else if foreign.is_empty() {
                    Verdict::Held(format!("{} name(s), all its own", names.len()))
                } else {
                    Verdict::Broke(format!("{tenant} lists {foreign:?}"))
                }
            }
        };
        report.push(format!("enumeration: names listed by {tenant}"), verdict);
    }
}

async fn hostile_ids<F: Fixture>(fixture: &F, report: &mut Report) {
    for id in HOSTILE_IDS {
        let verdict = match fixture.checkout(id).await {
            Err(e) => Verdict::Held(format!("refused: {e}")),
            Ok(()) => Verdict::Broke("a checkout was handed out".into()),
        };
        report.push(format!("hostile id {id:?}"), verdict);
    }
    let verdict = match fixture.checkout(TENANTS[0]).await {
        Ok(()) => Verdict::Held("an ordinary id checks out".into()),
        Err(e) => Verdict::Broke(format!("an ordinary id was refused: {e}")),
    };
    report.push("hostile id control (acme)".into(), verdict);
}

async fn reserved<F: Fixture>(fixture: &F, report: &mut Report) {
    for (template, reaches) in fixture.reserved_templates() {
        let verdict = match fixture.configure(&template).await {
            Err(e) => Verdict::Held(format!("refused: {e}")),
            Ok(()) => Verdict::Broke(format!("accepted; it can reach {reaches}")),
        };
        report.push(
            format!("reserved namespace: template {template:?} ({reaches})"),
            verdict,
        );
    }
    let verdict = match fixture.configure("tenant_{id}").await {
        Ok(()) => Verdict::Held("tenant_{id} accepted".into()),
        Err(e) => Verdict::Broke(format!("the ordinary template was refused: {e}")),
    };
    report.push("reserved namespace control (tenant_{id})".into(), verdict);
}

async fn escape_case<F: Fixture>(
    fixture: &F,
    report: &mut Report,
    category: Category,
    escape: F::Escape,
) {
    let (attacker, victim) = ("acme", "globex");
    let case = format!("{category}: {escape:?}");
    let attempt = fixture.attempt(escape, attacker, victim).await;
    let verdict = match attempt {
        Attempt::Skipped(why) => Verdict::Skipped(why),
        Attempt::Breached(evidence) => Verdict::Broke(evidence),
        Attempt::Trusted(why) => Verdict::Trusted(why),
        Attempt::Refused(e) => {
            after_escape(fixture, attacker, victim, format!("refused: {e}")).await
        }
        Attempt::Ran(output) => {
            let tells = [marker(victim), owned_name(victim)];
            match tells.iter().find(|t| output.contains(t.as_str())) {
                Some(tell) => {
                    Verdict::Broke(format!("it ran and showed {tell:?}: {}", short(&output)))
                }
                None => after_escape(fixture, attacker, victim, format!("ran: {output}")).await,
            }
        }
    };
    report.push(case, verdict);
}

/// After an escape, both tenants must still read exactly their own markers.
async fn after_escape<F: Fixture>(
    fixture: &F,
    attacker: &str,
    victim: &str,
    seen: String,
) -> Verdict {
    for tenant in [victim, attacker] {
        if let Err(why) = reads_own(fixture, tenant).await {
            return Verdict::Broke(format!("afterwards {why} ({})", short(&seen)));
        }
    }
    Verdict::Held(seen)
}
