//! Health probes: `ROLE`, `INFO replication` and `INFO server` on a connection
//! of the probe's own.
//!
//! # What a probe reports
//!
//! - `role`: `master` is [`Role::Primary`], `slave` is [`Role::Replica`].
//! - `lag_bytes`, on a replica whose link to its master is up: the replication
//!   stream it has read but not yet applied (`slave_read_repl_offset -
//!   slave_repl_offset`, usually 0). A replica cannot see its master's offset,
//!   so how far it is behind the master's latest write is not known here; the
//!   master's `ROLE` lists every replica's acknowledged offset.
//! - `lag`, on a replica whose link is down: how long it has been down
//!   (`master_link_down_since_seconds`), or 2^32 seconds if the link was never
//!   up (no data worth reading). `None` while the link is up.
//! - `version`: `redis_version` from `INFO server`.
//! - `history`: the replication id lineage: `master_replid` (the line a master
//!   writes, or a replica follows), `master_replid2` (on a promoted replica,
//!   the line of the master it replaced; absent when all zeros) and
//!   `master_repl_offset`. A master restarted without its data starts a new,
//!   unrelated line.
//! - `streaming`, on a replica: whether its link to its master is up.
//! - `unsynced`, on a replica: its link was never up since it started or
//!   became a replica (`master_link_down_since_seconds:-1`: an empty restarted
//!   node, or a demoted master still holding its own data), a full resync is
//!   under way (`master_sync_in_progress:1`: the data set is about to be
//!   replaced). With Redis's default `replica-serve-stale-data yes` such a
//!   replica still answers reads, from a data set that is no copy of the
//!   master's, so the router gives it none. (One loading a data set answers
//!   `LOADING`, an endpoint failure, so reads move on without this.)
//!
//! A probe also notices a restart (`run_id` in `INFO server` changed) and
//! restores the tenant ACL users the node lost before it answers.

use std::time::Duration;

use deadpool_redis::redis::{self, RedisResult, Value};
use switchyard_core::{EndpointId, History, Probe, Role};

use crate::acl::AclPasswords;
use crate::users::TenantUsers;

/// A replica whose link never came up is this stale.
const NEVER_LINKED: Duration = Duration::from_secs(1 << 32);

/// What a probe needs to restore a restarted node's tenant users.
pub(crate) struct Restore<'a> {
    pub users: &'a TenantUsers,
    pub passwords: Option<&'a dyn AclPasswords>,
    pub endpoint: &'a EndpointId,
}

/// Runs the probe's commands on a fresh connection from `client`; a server
/// that restarted since the last probe (a new `run_id`) gets its tenant users
/// back before the probe answers.
pub(crate) async fn run(
    client: &redis::Client,
    timeout: Duration,
    restore: Restore<'_>,
) -> RedisResult<Probe> {
    // The caller's own deadline is the one that counts; these only keep the
    // driver from giving up first with a less precise error.
    let slack = timeout.saturating_add(Duration::from_secs(1));
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(slack))
        .set_response_timeout(Some(slack));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let (role, replication, server): (Value, String, String) = redis::pipe()
        .cmd("ROLE")
        .cmd("INFO")
        .arg("replication")
        .cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let restored = restore
        .users
        .after_probe(
            &mut conn,
            field(&server, "run_id"),
            restore.passwords,
            restore.endpoint,
        )
        .await;
    if let Err(error) = restored {
        // Not a failed probe: the node serves everything else. Its tenant
        // checkouts fail over until a later probe restores the users.
        tracing::warn!(endpoint = %restore.endpoint, %error, "could not restore tenant ACL users after a restart; trying again at the next probe");
    }
    Ok(interpret(&role, &replication, &server))
}

/// Reads a probe out of the replies.
pub(crate) fn interpret(role: &Value, replication: &str, server: &str) -> Probe {
    let role_name = match role {
        Value::Array(items) => items.first().and_then(text),
        _ => None,
    };
    let is_replica = match role_name.as_deref() {
        Some("slave" | "replica") => true,
        Some(_) => false,
        None => field(replication, "role") == Some("slave"),
    };
    let mut probe = Probe::new(
        if is_replica {
            Role::Replica
        } else {
            Role::Primary
        },
        Duration::ZERO,
    );
    probe.version = field(server, "redis_version").map(str::to_owned);
    probe.history = lineage(replication);
    if is_replica {
        probe.streaming = Some(field(replication, "master_link_status") == Some("up"));
        if field(replication, "master_link_status") == Some("up") {
            let read = number(replication, "slave_read_repl_offset");
            let applied = number(replication, "slave_repl_offset");
            probe.lag_bytes = match (read, applied) {
                (Some(read), Some(applied)) => Some(read.saturating_sub(applied)),
                (None, Some(_)) => Some(0),
                _ => None,
            };
        } else {
            probe.lag = Some(
                field(replication, "master_link_down_since_seconds")
                    .and_then(|s| s.parse::<u64>().ok())
                    .map_or(NEVER_LINKED, Duration::from_secs),
            );
        }
        probe.unsynced = unsynced(replication);
    }
    probe
}

/// Whether a replica's `INFO replication` says it holds no copy of its
/// master's data: its link was never up since it started or became a
/// replica, or a full resync is under way (see the module docs).
pub(crate) fn unsynced(replication: &str) -> bool {
    let never_linked = field(replication, "master_link_status") != Some("up")
        && field(replication, "master_link_down_since_seconds")
            .and_then(|s| s.parse::<u64>().ok())
            .is_none();
    never_linked || field(replication, "master_sync_in_progress") == Some("1")
}

/// The replication id lineage in `INFO replication`.
fn lineage(replication: &str) -> Option<History> {
    let id = field(replication, "master_replid")?.to_owned();
    let previous = field(replication, "master_replid2")
        .filter(|p| !p.is_empty() && p.bytes().any(|b| b != b'0'))
        .map(str::to_owned);
    Some(History::Lineage {
        id,
        previous,
        offset: number(replication, "master_repl_offset").unwrap_or(0),
    })
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The value of `name:value` in an `INFO` section.
pub(crate) fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (key, value) = line.trim_end().split_once(':')?;
        (key == name).then_some(value)
    })
}

fn number(info: &str, name: &str) -> Option<u64> {
    field(info, name)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    const SERVER: &str = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";

    #[test]
    fn a_master_is_primary() {
        let role = Value::Array(vec![bulk("master"), Value::Int(42), Value::Array(vec![])]);
        let p = interpret(&role, "# Replication\r\nrole:master\r\n", SERVER);
        assert_eq!(p.role, Role::Primary);
        assert_eq!(p.version.as_deref(), Some("7.0.15"));
        assert_eq!((p.lag, p.lag_bytes), (None, None));
        assert_eq!(p.history, None, "no replid in the reply");
    }

    #[test]
    fn a_promoted_replica_names_the_line_it_replaced() {
        let role = Value::Array(vec![bulk("master"), Value::Int(42), Value::Array(vec![])]);
        let info =
            "role:master\r\nmaster_replid:bbbb\r\nmaster_replid2:aaaa\r\nmaster_repl_offset:42\r\n";
        assert_eq!(
            interpret(&role, info, SERVER).history,
            Some(History::Lineage {
                id: "bbbb".into(),
                previous: Some("aaaa".into()),
                offset: 42
            })
        );
        let fresh = "role:master\r\nmaster_replid:cccc\r\nmaster_replid2:0000000000000000000000000000000000000000\r\nmaster_repl_offset:0\r\n";
        assert_eq!(
            interpret(&role, fresh, SERVER).history,
            Some(History::Lineage {
                id: "cccc".into(),
                previous: None,
                offset: 0
            })
        );
    }

    #[test]
    fn a_linked_replica_reports_unapplied_bytes() {
        let role = Value::Array(vec![
            bulk("slave"),
            bulk("127.0.0.1"),
            Value::Int(6379),
            bulk("connected"),
            Value::Int(100),
        ]);
        let info = "role:slave\r\nmaster_link_status:up\r\nslave_read_repl_offset:130\r\nslave_repl_offset:100\r\n";
        let p = interpret(&role, info, SERVER);
        assert_eq!(p.role, Role::Replica);
        assert_eq!(p.lag_bytes, Some(30));
        assert_eq!(p.lag, None);
        assert_eq!(p.streaming, Some(true));
    }

    #[test]
    fn a_cut_off_replica_reports_how_long() {
        let role = Value::Array(vec![bulk("slave")]);
        let info = "role:slave\r\nmaster_link_status:down\r\nmaster_link_down_since_seconds:7\r\n";
        assert_eq!(
            interpret(&role, info, SERVER).lag,
            Some(Duration::from_secs(7))
        );
        assert_eq!(interpret(&role, info, SERVER).streaming, Some(false));
        let never =
            "role:slave\r\nmaster_link_status:down\r\nmaster_link_down_since_seconds:-1\r\n";
        assert_eq!(interpret(&role, never, SERVER).lag, Some(NEVER_LINKED));
    }

    #[test]
    fn a_replica_never_synced_or_resyncing_holds_no_copy_of_its_master() {
        let role = Value::Array(vec![bulk("slave")]);
        let down = "role:slave\r\nmaster_link_status:down\r\nmaster_link_down_since_seconds:7\r\nmaster_sync_in_progress:0\r\n";
        assert!(!interpret(&role, down, SERVER).unsynced, "a copy, 7s old");
        let never =
            "role:slave\r\nmaster_link_status:down\r\nmaster_link_down_since_seconds:-1\r\n";
        assert!(interpret(&role, never, SERVER).unsynced);
        let resync = "role:slave\r\nmaster_link_status:down\r\nmaster_link_down_since_seconds:0\r\nmaster_sync_in_progress:1\r\n";
        assert!(interpret(&role, resync, SERVER).unsynced);
        let up = "role:slave\r\nmaster_link_status:up\r\nmaster_sync_in_progress:0\r\n";
        assert!(!interpret(&role, up, SERVER).unsynced);
        let master = Value::Array(vec![bulk("master")]);
        let syncing_master = "role:master\r\nmaster_sync_in_progress:1\r\n";
        assert!(!interpret(&master, syncing_master, SERVER).unsynced);
    }
}
