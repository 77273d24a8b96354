//! Row-level isolation: an ACL user per tenant, held by the server to the
//! tenant's key prefix.
//!
//! # Password scheme
//!
//! Every tenant user gets a password of its own, random, generated once by
//! the caller ([`AclPassword::generate`]) and kept where the service keeps its
//! secrets. switchyard never derives one from another: a derived scheme turns
//! one leaked master key into every tenant's password. The backend asks an
//! [`AclPasswords`] source at checkout (a [`StaticPasswords`] map or any
//! closure); [`provision_acl_users`] writes the same passwords to the server.
//! Passwords never appear in `Debug`, errors or logs.
//!
//! # Users and rules
//!
//! The user is named after the scope's target (the tier's template rendered for
//! the tenant, `tenant_acme` by default) and may touch keys and channels under
//! `<target>:` only. Its commands are denied by default and allowed one by one
//! from the handle's command table ([`tenant_user_commands`]), so the server
//! holds a tenant user to what the handle lets through, scripts included:
//!
//! ```text
//! ACL SETUSER tenant_acme reset on >… ~tenant_acme:* &tenant_acme:* -@all +get +set … +eval …
//! ```
//!
//! A category rule such as `+@all -@admin -@dangerous` is not enough: it
//! leaves `SCAN`, `RANDOMKEY`, `DBSIZE`, `SELECT` and `MOVE`, and key patterns
//! neither filter `SCAN`'s reply nor confine a user to one logical database,
//! so a script could list every tenant's key names or write into another
//! database. None of those are in the table's ACL list, nor are `KEYS`,
//! `COPY` (its `DB` option), `SORT`, `CLIENT`, `FLUSHALL`, `PUBSUB` or any
//! administrative command.
//!
//! A template that could name the user `default` (the administrator every
//! Redis has) or the pool's own user is refused when the tier is configured
//! ([`RedisBackend::validate_tier`](switchyard_core::Backend::validate_tier)):
//! provisioning would rewrite that user.
//!
//! ACL rules are not replicated: provision every node, replicas included.
//! A node keeps its users in memory only; users provisioned through a
//! backend are written again when that node restarts (see
//! [`RedisBackend`](crate::RedisBackend)).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use deadpool_redis::redis;
use switchyard_core::{BackendErrorKind, Error, Isolation, TenantId, TenantScope};

use crate::connection::RedisConnection;
use crate::error::redis_error;
use crate::keys::is_safe_target;

/// The ACL command rules of a tenant user: `-@all`, then `+<command>` for
/// every command the handle's table lets an ACL-confined connection send
/// (`+get`, `+object|encoding`, `+eval`, ...). Deny by default: a command
/// missing here is refused by the server, inside scripts too.
pub fn tenant_user_commands() -> Vec<String> {
    std::iter::once("-@all".to_owned())
        .chain(crate::table::acl_commands().map(|c| format!("+{c}")))
        .collect()
}

/// A tenant user's password. Cheap to clone; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AclPassword(Arc<str>);

impl AclPassword {
    /// Wraps a password the caller already has.
    pub fn new(password: impl Into<Arc<str>>) -> Self {
        Self(password.into())
    }

    /// A fresh random password: 32 bytes from the operating system's RNG, as
    /// 64 hex digits.
    pub fn generate() -> std::io::Result<Self> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self(hex.into()))
    }

    /// The password itself, to store or hand to the server. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AclPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AclPassword(***)")
    }
}

/// Where tenant users' passwords come from.
///
/// Called on the checkout path: answer from memory (a map, a cache), not over
/// the network.
pub trait AclPasswords: Send + Sync + 'static {
    /// The password of the ACL user serving `tenant`, or `None` if it has none.
    fn password(&self, tenant: &TenantId) -> Option<AclPassword>;
}

impl<F> AclPasswords for F
where
    F: Fn(&TenantId) -> Option<AclPassword> + Send + Sync + 'static,
{
    fn password(&self, tenant: &TenantId) -> Option<AclPassword> {
        self(tenant)
    }
}

/// Passwords held in memory, one per tenant.
#[derive(Clone, Default)]
pub struct StaticPasswords {
    by_tenant: HashMap<TenantId, AclPassword>,
}

impl StaticPasswords {
    /// No passwords yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh random password for each of `tenants`.
    pub fn generate<'a>(tenants: impl IntoIterator<Item = &'a TenantId>) -> std::io::Result<Self> {
        let mut out = Self::new();
        for tenant in tenants {
            out.insert(tenant.clone(), AclPassword::generate()?);
        }
        Ok(out)
    }

    /// Sets `tenant`'s password.
    pub fn insert(&mut self, tenant: TenantId, password: AclPassword) -> &mut Self {
        self.by_tenant.insert(tenant, password);
        self
    }

    /// `tenant`'s password.
    pub fn get(&self, tenant: &TenantId) -> Option<&AclPassword> {
        self.by_tenant.get(tenant)
    }

    /// Number of tenants with a password.
    pub fn len(&self) -> usize {
        self.by_tenant.len()
    }

    /// Whether no tenant has a password.
    pub fn is_empty(&self) -> bool {
        self.by_tenant.is_empty()
    }
}

impl AclPasswords for StaticPasswords {
    fn password(&self, tenant: &TenantId) -> Option<AclPassword> {
        self.by_tenant.get(tenant).cloned()
    }
}

impl fmt::Debug for StaticPasswords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut tenants: Vec<&str> = self.by_tenant.keys().map(TenantId::as_str).collect();
        tenants.sort_unstable();
        f.debug_struct("StaticPasswords")
            .field("tenants", &tenants)
            .finish()
    }
}

/// The ACL user name of a row-isolated scope.
pub fn acl_user(scope: &TenantScope) -> &str {
    scope.target()
}

/// The key prefix of a scope confined by prefix or ACL user: `<target>:`.
pub fn key_prefix(scope: &TenantScope) -> String {
    format!("{}:", scope.target())
}

/// The `ACL SETUSER` arguments for `scope`, password last but one.
pub(crate) fn setuser(scope: &TenantScope, password: &AclPassword) -> redis::Cmd {
    let prefix = key_prefix(scope);
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(acl_user(scope))
        .arg("reset")
        .arg("on")
        .arg(format!(">{}", password.expose()))
        .arg(format!("~{prefix}*"))
        .arg(format!("&{prefix}*"));
    for rule in tenant_user_commands() {
        cmd.arg(rule);
    }
    cmd
}

/// Creates or replaces the ACL user of every row-isolated scope in `scopes` on
/// the node behind `conn`, with the password `passwords` gives it; scopes at
/// other isolation levels are skipped. Returns how many users were written.
///
/// `conn` must be an unscoped checkout whose user may run `ACL SETUSER`.
/// A tenant without a password is [`Error::TenantNotProvisioned`]. Run it on
/// every node: ACL rules do not replicate.
pub async fn provision_acl_users<'a>(
    conn: &mut RedisConnection,
    scopes: impl IntoIterator<Item = &'a TenantScope>,
    passwords: &dyn AclPasswords,
) -> Result<usize, Error> {
    let endpoint = conn.endpoint().clone();
    let mut written = 0;
    for scope in scopes {
        if scope.isolation() != Isolation::Row {
            continue;
        }
        let tenant = scope.tenant();
        if !is_safe_target(scope.target()) {
            return Err(Error::CheckoutRefused {
                endpoint,
                tenant: Some(tenant.clone()),
                reason: format!("scope target {:?} cannot name an ACL user", scope.target()),
            });
        }
        let password = passwords
            .password(tenant)
            .ok_or_else(|| Error::TenantNotProvisioned {
                endpoint: endpoint.clone(),
                tenant: tenant.clone(),
                what: "acl password",
                name: acl_user(scope).to_owned(),
            })?;
        let cmd = setuser(scope, &password);
        let mut raw = conn.raw()?;
        if let Err(e) = cmd.query_async::<()>(&mut raw).await {
            // The server echoes a rule it cannot parse; never let that be the password.
            if e.to_string().contains(password.expose()) {
                return Err(Error::backend(
                    &endpoint,
                    Some(tenant),
                    BackendErrorKind::Rejected,
                    std::io::Error::other("ACL SETUSER was refused"),
                ));
            }
            return Err(redis_error(&endpoint, Some(tenant), e));
        }
        conn.remember_user(scope);
        written += 1;
    }
    Ok(written)
}

/// Deletes the ACL user of every row-isolated scope in `scopes` on the node
/// behind `conn` (an unscoped checkout). The server disconnects clients
/// authenticated as a deleted user. Returns how many users existed.
pub async fn remove_acl_users<'a>(
    conn: &mut RedisConnection,
    scopes: impl IntoIterator<Item = &'a TenantScope>,
) -> Result<usize, Error> {
    let endpoint = conn.endpoint().clone();
    let users: Vec<&str> = scopes
        .into_iter()
        .filter(|s| s.isolation() == Isolation::Row)
        .map(acl_user)
        .collect();
    if users.is_empty() {
        return Ok(0);
    }
    let mut raw = conn.raw()?;
    let existed = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&users)
        .query_async::<usize>(&mut raw)
        .await
        .map_err(|e| redis_error(&endpoint, None, e))?;
    for user in users {
        conn.forget_user(user);
    }
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_random_and_hidden() {
        let a = AclPassword::generate().unwrap();
        let b = AclPassword::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
        assert_eq!(format!("{a:?}"), "AclPassword(***)");
        let t = TenantId::new("acme").unwrap();
        let p = StaticPasswords::generate([&t]).unwrap();
        let shown = format!("{p:?}");
        assert!(shown.contains("acme"));
        assert!(!shown.contains(p.get(&t).unwrap().expose()));
    }

    #[test]
    fn users_are_limited_to_their_prefix() {
        let scope = TenantScope::new(
            TenantId::new("acme").unwrap(),
            Isolation::Row,
            "tenant_acme",
            "app.tenant_id",
        );
        let cmd = setuser(&scope, &AclPassword::new("pw"));
        let args: Vec<String> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(
            args[..9],
            [
                "ACL",
                "SETUSER",
                "tenant_acme",
                "reset",
                "on",
                ">pw",
                "~tenant_acme:*",
                "&tenant_acme:*",
                "-@all",
            ]
        );
        for allowed in [
            "+get",
            "+eval",
            "+object|encoding",
            "+publish",
            "+script|load",
        ] {
            assert!(args.iter().any(|a| a == allowed), "{allowed} missing");
        }
        for denied in [
            "scan",
            "keys",
            "randomkey",
            "dbsize",
            "select",
            "move",
            "swapdb",
            "copy",
            "sort",
            "client",
            "flushall",
            "flushdb",
            "pubsub",
            "config",
            "acl",
            "migrate",
            "function",
        ] {
            assert!(
                !args
                    .iter()
                    .any(|a| a.trim_start_matches('+').split('|').next() == Some(denied)),
                "{denied} must not be allowed"
            );
        }
        assert!(args[9..].iter().all(|a| a.starts_with('+')));
    }
}
