//! Database and collection names: what a tenant scope may point at, and how a
//! collection-prefix tenant's collections are named.
//!
//! Schema-level tenants share one database; tenant `T` (target `tenant_t`) sees
//! its collection `orders` as `tenant_t__orders`. The separator is a double
//! underscore, not a dot (MongoDB's own `fs.files` idiom), because wire-compatible
//! servers built on SQL tables (the nx-27017 stand-in among them) refuse dots in
//! collection names; and not a single underscore, because that is ambiguous:
//! `tenant_a` + `b_orders` and `tenant_a_b` + `orders` would both give
//! `tenant_a_b_orders`. A prefix may therefore neither contain `__` nor end with
//! `_`; then the first `__` in a name always ends the prefix, so two different
//! (prefix, collection) pairs never produce the same name. Row-level and unscoped
//! handles in the shared database may not use names containing `__`, so they can
//! never open a prefixed tenant's collection.

use crate::error::MongoError;

/// The separator between a tenant prefix and a collection name.
pub const PREFIX_SEPARATOR: &str = "__";

/// The longest database name accepted, in bytes (MongoDB's limit is 63).
pub const MAX_DATABASE_LEN: usize = 63;

/// The longest namespace (`database.collection`) MongoDB accepts, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 255;

/// Databases a tenant scope may never point at.
pub(crate) const RESERVED_DATABASES: &[&str] = &["admin", "local", "config"];

/// Whether `c` may appear in a database name or tenant prefix.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Checks a database name: 1 to 63 ASCII letters, digits, `_` or `-`.
pub(crate) fn validate_database(name: &str) -> Result<(), MongoError> {
    let bad = |reason: &'static str| MongoError::InvalidName {
        what: "database",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_DATABASE_LEN {
        return Err(bad("it is longer than 63 bytes"));
    }
    if !name.chars().all(is_name_char) {
        return Err(bad("only ASCII letters, digits, '_' and '-' are allowed"));
    }
    Ok(())
}

/// Checks a tenant database (the target of a database-isolated scope): a valid
/// database name that is neither a system database nor the shared database.
pub(crate) fn validate_tenant_database(target: &str, shared: &str) -> Result<(), MongoError> {
    validate_database(target)?;
    let bad = |reason: &'static str| MongoError::InvalidName {
        what: "tenant database",
        name: target.to_owned(),
        reason,
    };
    if RESERVED_DATABASES
        .iter()
        .any(|r| r.eq_ignore_ascii_case(target))
    {
        return Err(bad("it is a system database"));
    }
    if target.eq_ignore_ascii_case(shared) {
        return Err(bad("it is the shared database of row and prefix tenants"));
    }
    Ok(())
}

/// Checks a collection prefix (the target of a schema-isolated scope).
pub(crate) fn validate_prefix(target: &str) -> Result<(), MongoError> {
    let bad = |reason: &'static str| MongoError::InvalidName {
        what: "collection prefix",
        name: target.to_owned(),
        reason,
    };
    if target.is_empty() {
        return Err(bad("it is empty"));
    }
    if target.len() > MAX_DATABASE_LEN {
        return Err(bad("it is longer than 63 bytes"));
    }
    if !target.chars().all(is_name_char) {
        return Err(bad("only ASCII letters, digits, '_' and '-' are allowed"));
    }
    if target.contains(PREFIX_SEPARATOR) {
        return Err(bad("it contains the separator \"__\""));
    }
    if target.ends_with('_') {
        return Err(bad("it ends with '_', which would blur the separator"));
    }
    Ok(())
}

/// Checks a collection name as a caller gives it.
pub(crate) fn validate_collection(name: &str) -> Result<(), MongoError> {
    let bad = |reason: &'static str| MongoError::InvalidName {
        what: "collection",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.contains('$') {
        return Err(bad("'$' is not allowed"));
    }
    if name.contains('\0') {
        return Err(bad("NUL is not allowed"));
    }
    if name.starts_with("system.") {
        return Err(bad("system collections are not reachable"));
    }
    Ok(())
}

/// Checks a collection name for the shared database, where `__` is reserved
/// for prefixed tenants.
pub(crate) fn validate_shared_collection(name: &str) -> Result<(), MongoError> {
    validate_collection(name)?;
    if name.contains(PREFIX_SEPARATOR) {
        return Err(MongoError::InvalidName {
            what: "collection",
            name: name.to_owned(),
            reason: "\"__\" is reserved for collection-prefix tenants in the shared database",
        });
    }
    Ok(())
}

/// The real name of a prefix tenant's collection `name`.
pub(crate) fn prefixed(prefix: &str, name: &str) -> Result<String, MongoError> {
    validate_collection(name)?;
    Ok(format!("{prefix}{PREFIX_SEPARATOR}{name}"))
}

/// Checks that `database.collection` fits MongoDB's namespace limit.
pub(crate) fn check_namespace(database: &str, collection: &str) -> Result<(), MongoError> {
    if database.len() + 1 + collection.len() > MAX_NAMESPACE_LEN {
        return Err(MongoError::InvalidName {
            what: "collection",
            name: collection.to_owned(),
            reason: "the namespace would exceed 255 bytes",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unambiguous() {
        // With a single '_' these two would collide; with "__" and the prefix
        // rules they cannot.
        assert_eq!(
            prefixed("tenant_a", "b_orders").unwrap(),
            "tenant_a__b_orders"
        );
        assert_eq!(
            prefixed("tenant_a_b", "orders").unwrap(),
            "tenant_a_b__orders"
        );
        assert!(validate_prefix("tenant_a").is_ok());
        assert!(validate_prefix("tenant_a__b").is_err());
        assert!(validate_prefix("tenant_").is_err());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("t.a").is_err());
        assert!(validate_prefix(&"p".repeat(64)).is_err());
        // A collection may start with '_' or contain "__": the first "__" still
        // ends the prefix.
        assert_eq!(prefixed("t", "_x__y").unwrap(), "t___x__y");
    }

    #[test]
    fn collection_names_reject_operators_and_system_collections() {
        for bad in ["", "$cmd", "a$b", "system.users", "a\0b"] {
            assert!(validate_collection(bad).is_err(), "{bad:?}");
        }
        assert!(validate_collection("orders.archive").is_ok());
        assert!(validate_shared_collection("tenant_b__orders").is_err());
        assert!(validate_shared_collection("order_items").is_ok());
    }

    #[test]
    fn tenant_databases_exclude_system_and_shared_databases() {
        assert!(validate_tenant_database("tenant_a", "app").is_ok());
        for bad in ["admin", "LOCAL", "config", "app", "", "a.b", "../x", "a b"] {
            assert!(validate_tenant_database(bad, "app").is_err(), "{bad:?}");
        }
        assert!(validate_database(&"x".repeat(64)).is_err());
        assert!(check_namespace("db", &"c".repeat(252)).is_ok());
        assert!(check_namespace("db", &"c".repeat(253)).is_err());
    }
}
