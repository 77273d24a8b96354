//! Row-level security policies for row isolation.

use sqlx::{AssertSqlSafe, PgConnection};

use crate::error::PgError;
use crate::sql::{quote_ident, quote_literal, validate_setting_name};

/// The name of the policy [`enable_row_level_security`] creates.
pub const POLICY_NAME: &str = "tenant_isolation";

/// Confines `table` to the tenant in the session setting `setting`.
///
/// Runs, in one implicit transaction:
///
/// ```sql
/// ALTER TABLE <table> ENABLE ROW LEVEL SECURITY;
/// ALTER TABLE <table> FORCE ROW LEVEL SECURITY;
/// DROP POLICY IF EXISTS tenant_isolation ON <table>;
/// CREATE POLICY tenant_isolation ON <table>
///     USING (<tenant_column> = current_setting('<setting>', true))
///     WITH CHECK (<tenant_column> = current_setting('<setting>', true));
/// ```
///
/// so it can be run again safely. `table` may be `schema.table`; each part and
/// the column are quoted identifiers, `setting` a quoted literal after
/// [`validate_setting_name`]. The tenant column should be `text` (or
/// `varchar`): it is compared with the setting's text. With the setting unset
/// or empty, no row is visible and none can be written.
///
/// `FORCE` makes the policy bind the table's owner too. It never binds
/// superusers or roles with `BYPASSRLS`: connect the backend as an ordinary
/// role (see the crate docs).
pub async fn enable_row_level_security(
    conn: &mut PgConnection,
    table: &str,
    tenant_column: &str,
    setting: &str,
) -> Result<(), PgError> {
    validate_setting_name(setting).map_err(PgError::InvalidSetting)?;
    let table = qualified_ident(table)?;
    let column = checked_ident(tenant_column)?;
    let predicate = format!(
        "{column} = current_setting({}, true)",
        quote_literal(setting)
    );
    let sql = format!(
        "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; \
         ALTER TABLE {table} FORCE ROW LEVEL SECURITY; \
         DROP POLICY IF EXISTS {POLICY_NAME} ON {table}; \
         CREATE POLICY {POLICY_NAME} ON {table} USING ({predicate}) WITH CHECK ({predicate})"
    );
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

fn checked_ident(name: &str) -> Result<String, PgError> {
    if name.is_empty() || name.contains('\0') {
        return Err(PgError::InvalidIdentifier(name.to_owned()));
    }
    Ok(quote_ident(name))
}

/// `table` or `schema.table`, each part quoted.
fn qualified_ident(name: &str) -> Result<String, PgError> {
    match name.split_once('.') {
        Some((schema, table)) => Ok(format!(
            "{}.{}",
            checked_ident(schema)?,
            checked_ident(table)?
        )),
        None => checked_ident(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_per_part() {
        assert_eq!(qualified_ident("items").unwrap(), "\"items\"");
        assert_eq!(qualified_ident("app.items").unwrap(), "\"app\".\"items\"");
        assert_eq!(
            qualified_ident("x\"; DROP TABLE t; --").unwrap(),
            "\"x\"\"; DROP TABLE t; --\""
        );
        assert!(qualified_ident("").is_err());
        assert!(qualified_ident("a.").is_err());
        assert!(checked_ident("a\0b").is_err());
    }
}
