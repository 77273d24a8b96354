//! The tenant ACL users a node should have, and putting them back when it
//! lost them.
//!
//! ACL users live in a Redis server's memory (this backend runs no ACL file):
//! a node that restarts comes back with none, and every row-isolated checkout
//! there would fail `AUTH` with `WRONGPASS` although the tenant was
//! provisioned. So each backend remembers the users [`provision_acl_users`]
//! wrote through it (and forgets those [`remove_acl_users`] deleted), and
//! writes them again:
//!
//! - when a probe sees the server's `run_id` change (a restart), before the
//!   probe reports the node healthy, so reads that come back to it find their
//!   users;
//! - when `AUTH` for a remembered user fails with `WRONGPASS` on a server
//!   whose `run_id` changed (a checkout that raced the probe), on that same
//!   connection, which is still the pool's default user, and then `AUTH`
//!   again.
//!
//! Only users this backend provisioned are restored, only after a restart,
//! and with the password the backend's [`AclPasswords`] source gives: a user
//! removed with `remove_acl_users`, one deleted on a running server (an
//! operator revoking it by hand), and one never provisioned stay missing,
//! and their tenant gets `TenantNotProvisioned`. (A user revoked by hand and
//! then lost in a restart is restored: revoke with `remove_acl_users`.) Restoring needs the pool's user to be allowed
//! `ACL SETUSER`, as provisioning did; when it is not, the failure is logged
//! and the tenant's checkouts there fail as an endpoint failure, so reads
//! move to a node that has the user.
//!
//! [`provision_acl_users`]: crate::provision_acl_users
//! [`remove_acl_users`]: crate::remove_acl_users

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use deadpool_redis::redis::{self, aio::ConnectionLike, RedisResult};
use switchyard_core::{EndpointId, TenantScope};

use crate::acl::{acl_user, setuser, AclPasswords};
use crate::probe::field;

/// The tenant users provisioned on one node through its backend, and the
/// server run they were last written to.
#[derive(Debug, Default)]
pub(crate) struct TenantUsers {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// By user name.
    users: BTreeMap<String, TenantScope>,
    /// The `run_id` the users were last known to exist in.
    run_id: Option<String>,
}

impl TenantUsers {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `scope`'s user was written to the node.
    pub(crate) fn record(&self, scope: &TenantScope) {
        self.lock()
            .users
            .insert(acl_user(scope).to_owned(), scope.clone());
    }

    /// `user` was deleted from the node on purpose: never restore it.
    pub(crate) fn forget(&self, user: &str) {
        self.lock().users.remove(user);
    }

    /// Whether `scope`'s user was provisioned through this backend.
    pub(crate) fn knows(&self, scope: &TenantScope) -> bool {
        self.lock().users.contains_key(acl_user(scope))
    }

    /// Called by a probe that read the server's `run_id`: when it differs
    /// from the last one seen, the server restarted and lost its users, which
    /// are written again on `conn` (a connection as the pool's user) before
    /// the new run is remembered. A failure leaves the old `run_id`, so the
    /// next probe tries again.
    pub(crate) async fn after_probe(
        &self,
        conn: &mut impl ConnectionLike,
        run_id: Option<&str>,
        passwords: Option<&dyn AclPasswords>,
        endpoint: &EndpointId,
    ) -> RedisResult<()> {
        let Some(run_id) = run_id else {
            return Ok(());
        };
        let scopes: Vec<TenantScope> = {
            let mut state = self.lock();
            match state.run_id.as_deref() {
                Some(seen) if seen == run_id => return Ok(()),
                // The first run seen: users provisioned so far went to it.
                None => {
                    state.run_id = Some(run_id.to_owned());
                    return Ok(());
                }
                Some(_) => state.users.values().cloned().collect(),
            }
        };
        if !scopes.is_empty() {
            let Some(passwords) = passwords else {
                return Ok(());
            };
            tracing::warn!(endpoint = %endpoint, users = scopes.len(), "redis restarted (new run_id): restoring its tenant ACL users");
            for scope in &scopes {
                restore(conn, scope, passwords).await?;
            }
        }
        self.lock().run_id = Some(run_id.to_owned());
        Ok(())
    }
}

/// Whether the server behind `conn` is another run than the one the users
/// were last known to exist in (it restarted since).
pub(crate) async fn restarted(
    conn: &mut impl ConnectionLike,
    users: &TenantUsers,
) -> RedisResult<bool> {
    let server: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    let now = field(&server, "run_id");
    Ok(match (users.lock().run_id.as_deref(), now) {
        (Some(seen), Some(now)) => seen != now,
        _ => false,
    })
}

/// Writes `scope`'s user again with the password from `passwords`; a tenant
/// that no longer has a password is skipped (it cannot log in anyway).
pub(crate) async fn restore(
    conn: &mut impl ConnectionLike,
    scope: &TenantScope,
    passwords: &dyn AclPasswords,
) -> RedisResult<()> {
    let Some(password) = passwords.password(scope.tenant()) else {
        return Ok(());
    };
    let cmd = setuser(scope, &password);
    // The server echoes a rule it cannot parse; the caller logs this error,
    // so it must never carry the password.
    cmd.query_async::<()>(conn).await.map_err(|e| {
        if e.to_string().contains(password.expose()) {
            redis::RedisError::from((redis::ErrorKind::Client, "ACL SETUSER was refused"))
        } else {
            e
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{Isolation, TenantId};

    fn scope(tenant: &str) -> TenantScope {
        TenantScope::new(
            TenantId::new(tenant).unwrap(),
            Isolation::Row,
            format!("tenant_{tenant}"),
            "x",
        )
    }

    #[test]
    fn only_provisioned_and_not_removed_users_are_known() {
        let users = TenantUsers::default();
        users.record(&scope("acme"));
        users.record(&scope("globex"));
        users.forget("tenant_globex");
        assert!(users.knows(&scope("acme")));
        assert!(!users.knows(&scope("globex")));
        assert!(!users.knows(&scope("initech")));
    }
}
