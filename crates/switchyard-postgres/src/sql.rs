//! Quoting and the few SQL texts this crate sends.
//!
//! Tenant names reach SQL only as bound parameters or through [`quote_ident`] /
//! [`quote_literal`]. [`TenantId`](switchyard_core::TenantId) already forbids
//! quotes, but the quoting here does not rely on that: a [`TenantScope`] can be
//! built by hand with any target.

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
pub(crate) const OUTSIDE_TRANSACTION: &str = "transaction_timestamp() = statement_timestamp()";

/// One simple-protocol round trip that undoes `scoped` (if any) and answers
/// whether the connection is outside a transaction block.
pub(crate) fn reset_sql(scoped: Option<&TenantScope>) -> String {
    match scoped.map(|s| (s.isolation(), s)) {
        // RESET ROLE: a tenant role (privilege-enforced mode) never outlives
        // its checkout, and neither does a role the application switched to.
        // And both levels reset what the other one scopes: the application
        // may have set either itself.
        Some((Isolation::Schema | Isolation::Row, scope)) => format!(
            "RESET ROLE; RESET search_path; SELECT {OUTSIDE_TRANSACTION}, set_config({}, '', false)",
            quote_literal(scope.row_setting())
        ),
        Some((Isolation::Database, _)) | None => {
            format!("RESET ROLE; RESET search_path; SELECT {OUTSIDE_TRANSACTION}")
        }
    }
}

/// One simple-protocol round trip that answers whether the connection is outside
/// a transaction block and still carries exactly `scope` (for the affinity stash).
pub(crate) fn verify_sql(scope: &TenantScope) -> String {
    match scope.isolation() {
        Isolation::Schema => format!(
            "SELECT {OUTSIDE_TRANSACTION} AND current_setting('search_path') = {}",
            quote_literal(&quote_ident(scope.target()))
        ),
        Isolation::Row => format!(
            "SELECT {OUTSIDE_TRANSACTION} AND current_setting({}, true) = {}",
            quote_literal(scope.row_setting()),
            quote_literal(scope.tenant().as_str())
        ),
        Isolation::Database => format!("SELECT {OUTSIDE_TRANSACTION}"),
    }
}

/// Sets `search_path` to the schema in `$1` (a quoted identifier) only if that
/// schema exists; answers NULL when it does not.
pub(crate) const APPLY_SCHEMA: &str = "SELECT CASE WHEN to_regnamespace($1) IS NULL THEN NULL \
     ELSE set_config('search_path', $1, false) END";

/// Sets the row setting `$1` to the tenant `$2` for the session.
pub(crate) const APPLY_ROW: &str = "SELECT set_config($1, $2, false)";

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
    fn reset_and_verify_texts() {
        let t = TenantId::new("Acme-1").unwrap();
        let schema = TenantScope::new(t.clone(), Isolation::Schema, "tenant_Acme-1", "app.t");
        let row = TenantScope::new(t.clone(), Isolation::Row, "tenant_Acme-1", "app.t");
        assert_eq!(
            reset_sql(Some(&schema)),
            "RESET ROLE; RESET search_path; SELECT transaction_timestamp() = statement_timestamp(), set_config('app.t', '', false)"
        );
        assert_eq!(
            reset_sql(Some(&row)),
            "RESET ROLE; RESET search_path; SELECT transaction_timestamp() = statement_timestamp(), set_config('app.t', '', false)"
        );
        assert_eq!(
            reset_sql(None),
            "RESET ROLE; RESET search_path; SELECT transaction_timestamp() = statement_timestamp()"
        );
        assert!(
            verify_sql(&schema).ends_with("current_setting('search_path') = '\"tenant_Acme-1\"'")
        );
        assert!(verify_sql(&row).ends_with("current_setting('app.t', true) = 'Acme-1'"));
    }
}
