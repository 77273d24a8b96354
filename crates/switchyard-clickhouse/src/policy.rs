//! Server-side row policies, for servers that have them (not 18.16).

use crate::error::ChError;
use crate::filter::{quoted, validate_identifier};

/// Where a row policy reads the current tenant from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyTenant {
    /// A custom setting sent with every query of a row-scoped checkout (set
    /// [`ChBackendConfig::row_policy_setting`](crate::ChBackendConfig::row_policy_setting)
    /// to the same name). The server must allow its prefix in
    /// `custom_settings_prefixes` (`SQL_` is the usual one).
    Setting(String),
    /// The ClickHouse user name: each tenant connects as a user named after
    /// its tenant id (one backend per tenant user).
    CurrentUser,
}

/// The `CREATE ROW POLICY` statement that confines reads of
/// `database.table` to rows whose `column` equals the current tenant.
///
/// This is the server-side alternative to the handle-enforced filter, for
/// servers that have row policies; it is **not** tested here (18.16 has
/// none). The policy is `RESTRICTIVE` and applies `TO ALL`, so every user's
/// reads of the table are filtered; run it with an administrative user and
/// keep that user out of tenant traffic. Row policies filter reads only:
/// writes still need the handle's check (or a `CHECK` constraint using the
/// same setting).
///
/// Server versions, as documented by ClickHouse rather than tested here:
/// SQL-driven access control (`CREATE ROW POLICY`, `CREATE USER`, `GRANT`)
/// arrived in the 20.x series (20.4 onwards); policies keyed on a custom
/// setting also need `getSetting` and `custom_settings_prefixes`, which
/// arrived later in the 20.x–21.x series, so plan on 21.x or newer for
/// [`PolicyTenant::Setting`]. Before that, 19.5+ can filter rows per user
/// with a `<filter>` under `<databases>` in users.xml. On 18.16 only the
/// handle-enforced filter exists.
///
/// ```
/// use switchyard_clickhouse::{row_policy_sql, PolicyTenant};
///
/// let sql = row_policy_sql(
///     "tenant_rows",
///     "shared",
///     "events",
///     "tenant_id",
///     &PolicyTenant::Setting("SQL_tenant".into()),
/// )
/// .unwrap();
/// assert_eq!(
///     sql,
///     "CREATE ROW POLICY OR REPLACE `tenant_rows` ON `shared`.`events` FOR SELECT \
///      USING `tenant_id` = getSetting('SQL_tenant') AS RESTRICTIVE TO ALL"
/// );
/// assert!(row_policy_sql("p", "shared", "events; DROP", "tenant_id", &PolicyTenant::CurrentUser).is_err());
/// ```
pub fn row_policy_sql(
    policy: &str,
    database: &str,
    table: &str,
    column: &str,
    tenant: &PolicyTenant,
) -> Result<String, ChError> {
    let policy = quoted(policy)?;
    let database = quoted(database)?;
    let table = quoted(table)?;
    let column = quoted(column)?;
    let source = match tenant {
        PolicyTenant::Setting(name) => {
            // A plain identifier: safe inside single quotes.
            validate_identifier(name)?;
            format!("getSetting('{name}')")
        }
        PolicyTenant::CurrentUser => "currentUser()".to_owned(),
    };
    Ok(format!(
        "CREATE ROW POLICY OR REPLACE {policy} ON {database}.{table} FOR SELECT \
         USING {column} = {source} AS RESTRICTIVE TO ALL"
    ))
}
