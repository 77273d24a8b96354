//! Privilege-enforced isolation: a PostgreSQL role per tenant.
//!
//! With [`tenant_roles`](crate::PgBackendConfig::tenant_roles) on, a schema- or
//! row-scoped checkout also runs as the tenant's own role, switched in the same
//! round trip as the scope (`set_config('role', <target>, false)`, which is
//! `SET ROLE`) and reset on return. The role is named like the scope's target
//! (`tenant_acme`) and holds privileges only on what is the tenant's:
//!
//! - schema isolation: `USAGE` on its schema and DML on its tables (granted
//!   by [`provision_tenant_role`]); a qualified `tenant_b.items` inside
//!   tenant A's checkout fails with `permission denied for schema tenant_b`;
//! - row isolation: DML on the shared tables, filtered by a row-level
//!   security policy keyed on the role ([`enable_role_row_security`]:
//!   `'tenant_' || tenant_column = current_user`), so a `set_config` of the
//!   row setting inside a checkout changes nothing.
//!
//! The backend's login role must be a member of every tenant role (the helper
//! grants it) and should own nothing a tenant reaches; it needs `CREATEROLE`
//! (or a superuser) only to run the helper. Privileges the login role holds
//! are not used while a tenant role is active.
//!
//! **Limit (PostgreSQL 15):** `SET ROLE` is checked against the *login*
//! role's memberships, so SQL that itself runs `SET ROLE tenant_b` or
//! `RESET ROLE` inside a checkout leaves the tenant's role. This mode makes the
//! server refuse cross-tenant reads and writes by name, but still trusts the
//! application not to switch roles. (PostgreSQL 16's `GRANT ... WITH SET
//! FALSE` cannot help here either; a login role per tenant would.)

use sqlx::{AssertSqlSafe, PgConnection};
use switchyard_core::{Isolation, NameTemplate, TenantScope};

use crate::error::PgError;
use crate::sql::{quote_ident, quote_literal};

/// The name of the policy [`enable_role_row_security`] creates.
pub const ROLE_POLICY_NAME: &str = "tenant_role_isolation";

/// Creates (if missing) the role of `scope`'s tenant, makes `login_role` a
/// member so the backend can switch to it, and grants it what the tenant
/// may reach: for schema isolation `USAGE` on its schema and `SELECT, INSERT,
/// UPDATE, DELETE` on every table in it (and on tables created there later by
/// `login_role`), for row isolation the same on each of `shared_tables`
/// (`schema.table` or `table`).
///
/// Run it as a role with `CREATEROLE` (or a superuser), once per tenant.
/// Every name is a quoted identifier.
pub async fn provision_tenant_role(
    conn: &mut PgConnection,
    scope: &TenantScope,
    login_role: &str,
    shared_tables: &[&str],
) -> Result<(), PgError> {
    let role = quote_ident(scope.target());
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(scope.target())
            .fetch_one(&mut *conn)
            .await?;
    let mut sql = String::new();
    if !exists {
        sql.push_str(&format!("CREATE ROLE {role} NOLOGIN NOINHERIT; "));
    }
    sql.push_str(&format!("GRANT {role} TO {}; ", quote_ident(login_role)));
    match scope.isolation() {
        Isolation::Schema => {
            let schema = quote_ident(scope.target());
            sql.push_str(&format!(
                "GRANT USAGE ON SCHEMA {schema} TO {role}; \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}; \
                 GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}; \
                 ALTER DEFAULT PRIVILEGES FOR ROLE {login} IN SCHEMA {schema} \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
                login = quote_ident(login_role)
            ));
        }
        Isolation::Row => {
            for table in shared_tables {
                sql.push_str(&format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {role}; ",
                    qualified(table)?
                ));
            }
        }
        Isolation::Database => {}
    }
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

/// Confines `table` to the tenant whose role is current: enables and forces
/// row-level security and creates the policy
///
/// ```sql
/// CREATE POLICY tenant_role_isolation ON <table>
///     USING (<prefix> || <tenant_column> || <suffix> = current_user)
///     WITH CHECK (<prefix> || <tenant_column> || <suffix> = current_user);
/// ```
///
/// where `template` is the row tier's name template (`tenant_{id}`), so the
/// role `tenant_acme` sees and writes only rows whose tenant column is `acme`.
/// The setting-based policy ([`POLICY_NAME`](crate::POLICY_NAME)) is dropped:
/// policies are ORed, and it would let a `set_config` inside a checkout widen
/// what the role sees.
pub async fn enable_role_row_security(
    conn: &mut PgConnection,
    table: &str,
    tenant_column: &str,
    template: &NameTemplate,
) -> Result<(), PgError> {
    let table = qualified(table)?;
    let column = quote_ident(tenant_column);
    let shown = template.to_string();
    let (prefix, suffix) = shown.split_once("{id}").unwrap_or(("", ""));
    let predicate = format!(
        "{} || {column} || {} = current_user",
        quote_literal(prefix),
        quote_literal(suffix)
    );
    let sql = format!(
        "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; \
         ALTER TABLE {table} FORCE ROW LEVEL SECURITY; \
         DROP POLICY IF EXISTS {policy} ON {table}; \
         DROP POLICY IF EXISTS {ROLE_POLICY_NAME} ON {table}; \
         CREATE POLICY {ROLE_POLICY_NAME} ON {table} USING ({predicate}) WITH CHECK ({predicate})",
        policy = crate::POLICY_NAME
    );
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

/// `table` or `schema.table`, each part quoted.
fn qualified(name: &str) -> Result<String, PgError> {
    let part = |p: &str| {
        if p.is_empty() || p.contains('\0') {
            Err(PgError::InvalidIdentifier(name.to_owned()))
        } else {
            Ok(quote_ident(p))
        }
    };
    match name.split_once('.') {
        Some((schema, table)) => Ok(format!("{}.{}", part(schema)?, part(table)?)),
        None => part(name),
    }
}
