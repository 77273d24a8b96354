//! Quoting and the few SQL texts this crate sends.
//!
//! Tenant names reach SQL only as bound parameters, through [`quote_ident`] /
//! [`quote_literal`] (provisioning statements), or, in the messages the
//! checkout path sends, as hex digits ([`text_value`]): those are
//! multi-statement simple-protocol messages, which cannot carry parameters.
//! [`TenantId`](switchyard_core::TenantId) already forbids quotes, but the
//! quoting here does not rely on that: a [`TenantScope`] can be built by hand
//! with any target.

use switchyard_core::{Isolation, TenantScope};

/// Quotes `name` as a PostgreSQL identifier: wraps it in double quotes and
/// doubles any embedded double quote, as PostgreSQL's own `quote_ident` does.
///
/// The result is always quoted, so case and characters such as `-` survive.
///
/// ```
/// use switchyard_postgres::quote_ident;
///
/// assert_eq!(quote_ident("tenant_acme"), "\"tenant_acme\"");
/// assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
/// ```
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes `value` as a PostgreSQL string literal, doubling single quotes; a value
/// with a backslash becomes an `E'…'` literal with doubled backslashes, so the
/// result is the same whatever `standard_conforming_strings` says.
///
/// ```
/// use switchyard_postgres::quote_literal;
///
/// assert_eq!(quote_literal("app.tenant_id"), "'app.tenant_id'");
/// assert_eq!(quote_literal("it's"), "'it''s'");
/// assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
/// ```
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    if value.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A text value as SQL that the server's lexer reads only as hex digits:
/// `pg_catalog.convert_from(pg_catalog.decode('<hex of the UTF-8 bytes>', 'hex'), 'UTF8')`.
///
/// Tenant ids and names go into the owner-change message this way, where a
/// bound parameter is not possible (a multi-statement simple-protocol
/// message). Like a bound parameter, the value is never lexed as SQL: the
/// literal holds only `[0-9a-f]`, so no quote, backslash or byte ≥ 0x80 of
/// the value reaches the lexer, and the message reads the same whatever the
/// previous owner left in `standard_conforming_strings`, `backslash_quote` or
/// `client_encoding` (the whole message is converted and lexed before its
/// `RESET ALL` runs).
///
/// A value made only of ASCII letters, digits, `_`, `-` and `"` (every valid
/// tenant id, and a quoted identifier of one) is written as a plain `'...'`
/// literal instead: those bytes read the same in every client encoding and
/// under every setting above, and the server is spared resolving and calling
/// two functions on every check.
pub(crate) fn text_value(value: &str) -> String {
    use std::fmt::Write as _;
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'"');
    if value.bytes().all(plain) {
        return format!("'{value}'");
    }
    let mut out = String::with_capacity(value.len() * 2 + 40);
    out.push_str("pg_catalog.convert_from(pg_catalog.decode('");
    for byte in value.bytes() {
        let _ = write!(out, "{byte:02x}");
    }
    out.push_str("', 'hex'), 'UTF8')");
    out
}

/// Checks a custom setting name for row-level isolation (`app.tenant_id`): ASCII
/// letters, digits and `_` in at least two non-empty parts joined by single dots.
///
/// PostgreSQL only accepts dotted names for settings it does not know, and the
/// name is interpolated into policies and resets, so anything else is refused
/// before any I/O.
pub fn validate_setting_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !ok_chars {
        return Err(format!(
            "setting name {name:?} may hold only ASCII letters, digits, '_' and '.'"
        ));
    }
    if !name.contains('.') || name.split('.').any(str::is_empty) {
        return Err(format!(
            "setting name {name:?} must be dotted parts such as \"app.tenant_id\""
        ));
    }
    Ok(())
}

/// SQL that is true when the session is not inside a transaction block.
///
/// Sent with the simple query protocol: within one `Query` message outside a
/// transaction block, the implicit transaction starts at the statement's own
/// timestamp, so the two are equal; inside a block opened by an earlier message
/// (`BEGIN` left open by the caller) they differ. A session in a failed
/// transaction rejects the query instead, which also counts as dirty.
pub(crate) const OUTSIDE_TRANSACTION: &str =
    "pg_catalog.transaction_timestamp() = pg_catalog.statement_timestamp()";

/// The statements of the complete reset: held cursors, session authorization
/// and role (`SET SESSION AUTHORIZATION DEFAULT` also resets `SET ROLE`),
/// every setting (`RESET ALL`, which skips the two above), listen channels,
/// temporary relations and sequences' `currval`/`lastval`. Advisory locks and
/// SQL-level prepared statements are handled by [`switch_sql`]'s final
/// `SELECT`.
///
/// That is `DISCARD ALL` without its two last parts: `DEALLOCATE ALL` would
/// drop the statements sqlx has prepared and cached for this connection (sqlx
/// then fails with `prepared statement "sqlx_s_N" does not exist`), so only
/// SQL-level `PREPARE`d statements are deallocated (the final `SELECT` lists
/// them); and `DISCARD PLANS` is not needed because the plan cache re-plans
/// when `search_path` or the role changes. `DISCARD ALL` itself cannot run in
/// a multi-statement message (an implicit transaction block), and this can.
pub(crate) const RESET_SESSION: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; \
     RESET ALL; UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES";

/// The name of the prepared check ([`PREPARE_CHECK`]).
pub(crate) const CHECK: &str = "switchyard_check";

/// The same owner's check of a schema- or row-scoped session, prepared on the
/// session in the message that gives it its scope: `$1` names the setting
/// that carries the scope, `$2` the value it must still have. Run as
/// `EXECUTE` ([`verify_sql`]), it costs the server a parse of the short
/// `EXECUTE` and a cached plan, where the `SELECT` it stands for costs a
/// parse, analysis and plan on every checkout (about half the server's work
/// of a checkout, measured with pgbench).
///
/// It still runs in the simple-protocol message of the `EXECUTE`, so the
/// transaction check ([`OUTSIDE_TRANSACTION`]) holds. A tenant can drop it
/// (its next check fails: the connection is closed) or replace it (that
/// fools only the same tenant's own next check; the owner change drops
/// whatever has the name and prepares it again, see [`switch_sql`]).
pub(crate) const PREPARE_CHECK: &str = "PREPARE switchyard_check(text, text) AS SELECT \
     pg_catalog.transaction_timestamp() = pg_catalog.statement_timestamp() \
     AND pg_catalog.current_setting($1, true) = $2";

/// Whether a session serving `scope` is checked with the prepared check.
pub(crate) fn uses_check(scope: Option<&TenantScope>) -> bool {
    scope.is_some_and(|s| matches!(s.isolation(), Isolation::Schema | Isolation::Row))
}

/// One simple-protocol round trip that answers whether a session serving
/// `owner` is outside a transaction block and still carries exactly that
/// scope. `None` for an unscoped session, which has no scope to keep (see
/// [`crate::lifecycle::check`]).
pub(crate) fn verify_sql(owner: Option<&TenantScope>) -> Option<String> {
    let owner = owner?;
    Some(match owner.isolation() {
        Isolation::Schema => format!(
            "EXECUTE {CHECK}('search_path', {})",
            text_value(&quote_ident(owner.target()))
        ),
        Isolation::Row => format!(
            "EXECUTE {CHECK}({}, {})",
            quote_literal(owner.row_setting()),
            text_value(owner.tenant().as_str())
        ),
        // The connection's database is the scope, and nothing on the session
        // to compare: undo the two session changes that would break the
        // tenant's next checkout (a role, a search_path set by hand), in the
        // same round trip.
        Isolation::Database => {
            format!("RESET ROLE; RESET search_path; SELECT {OUTSIDE_TRANSACTION}")
        }
    })
}

/// The expression that puts `scope` on a session: true once set, false when
/// the tenant's schema does not exist. `None` for database isolation, where
/// the connection's database is the scope.
fn apply_expr(scope: &TenantScope, as_role: bool) -> Option<String> {
    // Privilege-enforced mode (see `crate::roles`): the same message also
    // switches to the tenant's role, so the server checks what it reaches.
    let role = if as_role {
        format!(
            " AND pg_catalog.set_config('role', {}, false) IS NOT NULL",
            text_value(scope.target())
        )
    } else {
        String::new()
    };
    match scope.isolation() {
        Isolation::Schema => {
            let path = text_value(&quote_ident(scope.target()));
            Some(format!(
                "CASE WHEN pg_catalog.to_regnamespace({path}) IS NULL THEN false \
                 ELSE pg_catalog.set_config('search_path', {path}, false) IS NOT NULL{role} END"
            ))
        }
        Isolation::Row => Some(format!(
            "pg_catalog.set_config({}, {}, false) IS NOT NULL{role}",
            quote_literal(scope.row_setting()),
            text_value(scope.tenant().as_str())
        )),
        Isolation::Database => None,
    }
}

/// The message that puts `scope` on a new session (and prepares the check
/// its owner's next checkouts run), answering false when the tenant's schema
/// does not exist. `None` for database isolation.
pub(crate) fn apply_sql(scope: &TenantScope, as_role: bool) -> Option<String> {
    apply_expr(scope, as_role).map(|apply| format!("{PREPARE_CHECK}; SELECT {apply}"))
}

/// One simple-protocol round trip that hands a used session to `next`: the
/// complete reset ([`RESET_SESSION`]), the check `next` will need prepared
/// afresh, then one `SELECT` answering, in this order: the new scope applied
/// (true when there is none to apply), whether the session was outside a
/// transaction block, and the `DEALLOCATE` statements for what the previous
/// owner `PREPARE`d in SQL (NULL when nothing); it also releases every
/// advisory lock.
///
/// `had_check`: this connection's own [`PREPARE_CHECK`] was prepared on it
/// before. For a schema or row scope the message then drops whatever now has
/// that name (the previous owner may have replaced it) and prepares it again;
/// without one it only prepares it, which fails (and the connection is
/// closed) if the previous owner left a statement of that name. The name is
/// kept out of the `DEALLOCATE` list whenever it is the connection's own.
/// Returns the message and whether the connection has its check afterwards.
///
/// The `SELECT` is one aggregate over `pg_prepared_statement()`, not a
/// subquery over the `pg_prepared_statements` view next to separate
/// `SELECT`s: planned and run once, that is a third of the server's work of
/// the three statements it replaces. It runs after `RESET ALL` and the
/// authorization reset, so the previous owner's `search_path` or role has no
/// say in it (names are qualified with `pg_catalog` all the same). The
/// transaction check still answers for the session as the previous owner
/// left it: inside a transaction block, every statement of the message runs
/// in that block, whose start time is older than the message.
pub(crate) fn switch_sql(
    next: Option<&TenantScope>,
    as_role: bool,
    had_check: bool,
) -> (String, bool) {
    let apply = next
        .and_then(|scope| apply_expr(scope, as_role))
        .unwrap_or_else(|| "true".to_owned());
    let prepare = match (uses_check(next), had_check) {
        (true, true) => format!("DEALLOCATE {CHECK}; {PREPARE_CHECK}; "),
        (true, false) => format!("{PREPARE_CHECK}; "),
        (false, _) => String::new(),
    };
    let has_check = uses_check(next) || had_check;
    let listed = if has_check {
        format!("p.from_sql AND p.name <> '{CHECK}'")
    } else {
        "p.from_sql".to_owned()
    };
    let sql = format!(
        "{RESET_SESSION}; {prepare}SELECT {apply}, {OUTSIDE_TRANSACTION}, \
         pg_catalog.string_agg('DEALLOCATE ' || pg_catalog.quote_ident(p.name), '; ') \
         FILTER (WHERE {listed}), pg_catalog.pg_advisory_unlock_all() IS NULL \
         FROM pg_catalog.pg_prepared_statement() p"
    );
    (sql, has_check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::TenantId;

    #[test]
    fn identifiers_are_always_quoted_and_quotes_doubled() {
        assert_eq!(quote_ident(""), "\"\"");
        assert_eq!(quote_ident("Tenant-1"), "\"Tenant-1\"");
        assert_eq!(
            quote_ident("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
        assert_eq!(quote_ident("\"\""), "\"\"\"\"\"\"");
    }

    #[test]
    fn literals_double_quotes_and_escape_backslashes() {
        assert_eq!(quote_literal(""), "''");
        assert_eq!(
            quote_literal("a'; DROP TABLE x; --"),
            "'a''; DROP TABLE x; --'"
        );
        assert_eq!(quote_literal(r"\'"), r"E'\\'''");
        assert_eq!(quote_literal("zürich"), "'zürich'");
    }

    #[test]
    fn setting_names_must_be_dotted_and_plain() {
        for ok in ["app.tenant_id", "a.b.c", "My_App.t1"] {
            assert!(validate_setting_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "tenant_id",
            ".x",
            "x.",
            "a..b",
            "app.tenant id",
            "app.x'; DROP TABLE t; --",
            "app.\"x\"",
            "app.zürich",
        ] {
            assert!(validate_setting_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn switch_and_verify_texts() {
        let t = TenantId::new("Acme-1").unwrap();
        let schema = TenantScope::new(t.clone(), Isolation::Schema, "tenant_Acme-1", "app.t");
        let row = TenantScope::new(t.clone(), Isolation::Row, "tenant_Acme-1", "app.t");
        let db = TenantScope::new(t, Isolation::Database, "tenant_Acme-1", "app.t");
        // "tenant_Acme-1" quoted as an identifier, as a plain literal.
        let path = "'\"tenant_Acme-1\"'";
        let answer = |listed: &str| {
            format!(
                "pg_catalog.transaction_timestamp() = pg_catalog.statement_timestamp(), \
                 pg_catalog.string_agg('DEALLOCATE ' || pg_catalog.quote_ident(p.name), '; ') \
                 FILTER (WHERE {listed}), pg_catalog.pg_advisory_unlock_all() IS NULL \
                 FROM pg_catalog.pg_prepared_statement() p"
            )
        };
        let (all, but_check) = ("p.from_sql", "p.from_sql AND p.name <> 'switchyard_check'");
        let reset = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
             DISCARD TEMP; DISCARD SEQUENCES;";
        let prepare = "PREPARE switchyard_check(text, text) AS SELECT \
             pg_catalog.transaction_timestamp() = pg_catalog.statement_timestamp() \
             AND pg_catalog.current_setting($1, true) = $2;";
        let apply_schema = format!(
            "CASE WHEN pg_catalog.to_regnamespace({path}) IS NULL THEN false \
             ELSE pg_catalog.set_config('search_path', {path}, false) IS NOT NULL END"
        );
        // A connection without its check: prepared; with one: dropped (it
        // may have been replaced) and prepared again.
        assert_eq!(
            switch_sql(Some(&schema), false, false),
            (
                format!(
                    "{reset} {prepare} SELECT {apply_schema}, {}",
                    answer(but_check)
                ),
                true
            )
        );
        assert_eq!(
            switch_sql(Some(&schema), false, true),
            (
                format!(
                    "{reset} DEALLOCATE switchyard_check; {prepare} SELECT {apply_schema}, {}",
                    answer(but_check)
                ),
                true
            )
        );
        let id = "'Acme-1'";
        assert_eq!(
            switch_sql(Some(&row), false, false).0,
            format!(
                "{reset} {prepare} SELECT pg_catalog.set_config('app.t', {id}, false) IS NOT NULL, {}",
                answer(but_check)
            )
        );
        // Unscoped or database next: nothing prepared; a check the connection
        // has is kept, anything else of that name is deallocated.
        for next in [None, Some(&db)] {
            assert_eq!(
                switch_sql(next, false, false),
                (format!("{reset} SELECT true, {}", answer(all)), false)
            );
            assert_eq!(
                switch_sql(next, false, true),
                (format!("{reset} SELECT true, {}", answer(but_check)), true)
            );
        }
        assert_eq!(
            apply_sql(&row, false).unwrap(),
            format!("{prepare} SELECT pg_catalog.set_config('app.t', {id}, false) IS NOT NULL")
        );
        assert_eq!(apply_sql(&db, false), None);
        assert_eq!(verify_sql(None), None);
        assert_eq!(
            verify_sql(Some(&db)).unwrap(),
            "RESET ROLE; RESET search_path; \
             SELECT pg_catalog.transaction_timestamp() = pg_catalog.statement_timestamp()"
        );
        assert_eq!(
            verify_sql(Some(&schema)).unwrap(),
            format!("EXECUTE switchyard_check('search_path', {path})")
        );
        assert_eq!(
            verify_sql(Some(&row)).unwrap(),
            format!("EXECUTE switchyard_check('app.t', {id})")
        );
        // Anything but the plain bytes, and the SQL around it is ASCII hex digits.
        assert_eq!(
            text_value("tenant x"),
            "pg_catalog.convert_from(pg_catalog.decode('74656e616e742078', 'hex'), 'UTF8')"
        );
        assert!(text_value("a\\b").starts_with("pg_catalog.convert_from"));
        assert!(text_value("z\u{fc}rich").starts_with("pg_catalog.convert_from"));
        assert!(text_value("it's").starts_with("pg_catalog.convert_from"));
        let hostile = text_value("x'\\\u{8cea}\"; --");
        assert_eq!(
            hostile,
            "pg_catalog.convert_from(pg_catalog.decode('78275ce8b3aa223b202d2d', 'hex'), 'UTF8')"
        );
    }
}
