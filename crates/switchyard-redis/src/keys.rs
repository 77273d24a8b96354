//! Key confinement: the [`Command`] a caller builds, and the rewriting that
//! puts its keys under the tenant's prefix before it is sent.
//!
//! A confined connection sends only commands in the command table
//! ([`crate::table`]). The table, not the caller, says which arguments are
//! keys, so a caller cannot mislabel a key as a plain argument to reach past
//! the prefix. Commands whose reach cannot be confined (a whole keyspace,
//! another database, server administration, the connection's own state) are
//! refused with a [`ConfinementError`] before anything is sent.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{self, ToRedisArgs, Value};

use crate::error::{shown, ConfinementError};
use crate::table::{self, Allowed, Reply};

/// A command for a possibly confined connection: a name and its arguments,
/// exactly as `redis-cli` would take them.
///
/// ```
/// use switchyard_redis::Command;
///
/// let cmd = Command::new("HINCRBY").arg("visits").arg("home").arg(1);
/// assert_eq!(cmd.name(), "HINCRBY");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    name: String,
    args: Vec<Vec<u8>>,
}

impl Command {
    /// A command with no arguments yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            args: Vec::new(),
        }
    }

    /// Appends an argument (a slice or vector appends each of its items).
    pub fn arg<T: ToRedisArgs>(mut self, arg: T) -> Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// The command name as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of arguments after the name.
    pub fn arg_count(&self) -> usize {
        self.args.len()
    }
}

impl std::fmt::Debug for Command {
    // Arguments may hold user data or secrets; show only their number.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("name", &shown(self.name.as_bytes()))
            .field("args", &self.args.len())
            .finish()
    }
}

/// What a connection's commands are confined to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Confinement {
    /// Unscoped: commands pass through untouched.
    Open,
    /// A logical database of the tenant's own: keys as given, but nothing that
    /// leaves the database; pub/sub channels (server-wide) under the prefix.
    Database(Arc<str>),
    /// Keys under a prefix (schema isolation).
    Prefix(Arc<str>),
    /// Keys under a prefix, and an ACL user the server holds to it (row
    /// isolation): scripts become confinable.
    Acl(Arc<str>),
}

/// Whether `target` can name a prefix, an ACL user and a glob pattern safely:
/// non-empty ASCII letters, digits, `_` and `-` (what tier templates render),
/// so no glob character or `:` can widen what it matches.
pub(crate) fn is_safe_target(target: &str) -> bool {
    !target.is_empty()
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Confinement {
    pub(crate) fn prefix(&self) -> &[u8] {
        match self {
            Confinement::Prefix(p) | Confinement::Acl(p) => p.as_bytes(),
            Confinement::Open | Confinement::Database(_) => b"",
        }
    }

    /// The prefix of pub/sub channels: the key prefix, and in a database of
    /// the tenant's own the same `<target>:`, because channels are not per
    /// database.
    pub(crate) fn channel_prefix(&self) -> &[u8] {
        match self {
            Confinement::Prefix(p) | Confinement::Acl(p) | Confinement::Database(p) => p.as_bytes(),
            Confinement::Open => b"",
        }
    }
}

/// A command ready to send: rewritten for its confinement.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) cmd: redis::Cmd,
    pub(crate) reply: Reply,
    /// How long the server may hold the reply back on purpose.
    pub(crate) blocks_for: Option<Duration>,
}

/// Checks `command` against the table and puts its keys under the prefix.
pub(crate) fn prepare(
    command: &Command,
    confinement: &Confinement,
) -> Result<Prepared, ConfinementError> {
    let upper = command.name.to_ascii_uppercase();
    let shown_name = || shown(command.name.as_bytes());
    let found = table::find(&upper, &command.args);
    if *confinement == Confinement::Open {
        // Unscoped: pass through; the table only tells how long it may block.
        let blocks_for = match found {
            Some(s) => s.block_time(&command.args).unwrap_or(None),
            None => None,
        };
        return Ok(Prepared {
            cmd: build(&command.name, &command.args, &[], b""),
            reply: Reply::Plain,
            blocks_for,
        });
    }
    let Some(spec) = found else {
        return Err(match table::forbidden(&upper) {
            Some(reason) => ConfinementError::Forbidden {
                command: shown_name(),
                reason,
            },
            None => ConfinementError::Unknown {
                command: shown_name(),
            },
        });
    };
    let permitted = match spec.allowed {
        Allowed::Everywhere => true,
        Allowed::DatabaseOnly => matches!(confinement, Confinement::Database(_)),
        Allowed::AclOnly => matches!(confinement, Confinement::Acl(_)),
        Allowed::NotAcl => !matches!(confinement, Confinement::Acl(_)),
    };
    if !permitted {
        return Err(ConfinementError::Forbidden {
            command: shown_name(),
            reason: table::forbidden(&upper).unwrap_or("not confinable at this isolation level"),
        });
    }
    let malformed = |reason| ConfinementError::Malformed {
        command: shown_name(),
        reason,
    };
    if upper == "COPY"
        && command
            .args
            .iter()
            .skip(2)
            .any(|a| a.eq_ignore_ascii_case(b"DB"))
    {
        return Err(ConfinementError::Forbidden {
            command: shown_name(),
            reason: "its DB option reaches another logical database",
        });
    }
    let positions = spec.key_positions(&command.args).map_err(malformed)?;
    let blocks_for = spec.block_time(&command.args).map_err(malformed)?;
    Ok(Prepared {
        cmd: build(
            &command.name,
            &command.args,
            &positions,
            if spec.channels {
                confinement.channel_prefix()
            } else {
                confinement.prefix()
            },
        ),
        reply: spec.reply,
        blocks_for,
    })
}

fn build(name: &str, args: &[Vec<u8>], keys: &[usize], prefix: &[u8]) -> redis::Cmd {
    let mut cmd = redis::cmd(name);
    for (i, arg) in args.iter().enumerate() {
        if !prefix.is_empty() && keys.binary_search(&i).is_ok() {
            let mut key = Vec::with_capacity(prefix.len() + arg.len());
            key.extend_from_slice(prefix);
            key.extend_from_slice(arg);
            cmd.arg(key);
        } else {
            cmd.arg(arg.as_slice());
        }
    }
    cmd
}

/// Takes the prefix off the keys a reply names.
pub(crate) fn strip_reply(
    reply: Reply,
    value: Value,
    prefix: &[u8],
) -> Result<Value, &'static str> {
    if prefix.is_empty() {
        return Ok(value);
    }
    match (reply, value) {
        (Reply::Plain, v) => Ok(v),
        (Reply::KeyFirst, Value::Array(mut items)) => {
            if let Some(first) = items.first_mut() {
                strip_key(first, prefix)?;
            }
            Ok(Value::Array(items))
        }
        (Reply::Streams, Value::Array(mut streams)) => {
            for stream in &mut streams {
                if let Value::Array(pair) = stream {
                    if let Some(key) = pair.first_mut() {
                        strip_key(key, prefix)?;
                    }
                }
            }
            Ok(Value::Array(streams))
        }
        (Reply::Streams, Value::Map(mut streams)) => {
            for (key, _) in &mut streams {
                strip_key(key, prefix)?;
            }
            Ok(Value::Map(streams))
        }
        (_, v) => Ok(v),
    }
}

fn strip_key(value: &mut Value, prefix: &[u8]) -> Result<(), &'static str> {
    const FOREIGN: &str = "the reply named a key outside the tenant's namespace";
    match value {
        Value::BulkString(bytes) => {
            if !bytes.starts_with(prefix) {
                return Err(FOREIGN);
            }
            bytes.drain(..prefix.len());
            Ok(())
        }
        Value::SimpleString(s) => match s.strip_prefix(std::str::from_utf8(prefix).unwrap_or("")) {
            Some(rest) => {
                *s = rest.to_owned();
                Ok(())
            }
            None => Err(FOREIGN),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> Confinement {
        Confinement::Prefix("tenant_a:".into())
    }

    fn sent(cmd: &Command, c: &Confinement) -> Vec<String> {
        let p = prepare(cmd, c).unwrap();
        p.cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<cursor>".into(),
            })
            .collect()
    }

    #[test]
    fn single_and_multi_key_commands_are_prefixed() {
        let c = prefix();
        assert_eq!(
            sent(&Command::new("get").arg("k"), &c),
            ["get", "tenant_a:k"]
        );
        assert_eq!(
            sent(&Command::new("MSET").arg("a").arg(1).arg("b").arg(2), &c),
            ["MSET", "tenant_a:a", "1", "tenant_a:b", "2"]
        );
        assert_eq!(
            sent(&Command::new("DEL").arg(&["x", "y"][..]), &c),
            ["DEL", "tenant_a:x", "tenant_a:y"]
        );
        assert_eq!(
            sent(&Command::new("RENAME").arg("a").arg("b"), &c),
            ["RENAME", "tenant_a:a", "tenant_a:b"]
        );
        assert_eq!(
            sent(&Command::new("BLPOP").arg("l1").arg("l2").arg(1), &c),
            ["BLPOP", "tenant_a:l1", "tenant_a:l2", "1"]
        );
        assert_eq!(
            sent(&Command::new("BITOP").arg("AND").arg("d").arg("s"), &c),
            ["BITOP", "AND", "tenant_a:d", "tenant_a:s"]
        );
        assert_eq!(
            sent(&Command::new("HSET").arg("h").arg("f").arg("v"), &c),
            ["HSET", "tenant_a:h", "f", "v"]
        );
        assert_eq!(
            sent(&Command::new("object").arg("encoding").arg("k"), &c),
            ["object", "encoding", "tenant_a:k"]
        );
    }

    #[test]
    fn counted_keys_follow_the_count() {
        let c = prefix();
        assert_eq!(
            sent(
                &Command::new("ZUNIONSTORE")
                    .arg("d")
                    .arg(2)
                    .arg("x")
                    .arg("y")
                    .arg("WEIGHTS")
                    .arg(1)
                    .arg(2),
                &c
            ),
            [
                "ZUNIONSTORE",
                "tenant_a:d",
                "2",
                "tenant_a:x",
                "tenant_a:y",
                "WEIGHTS",
                "1",
                "2"
            ]
        );
        assert_eq!(
            sent(&Command::new("LMPOP").arg(1).arg("l").arg("LEFT"), &c),
            ["LMPOP", "1", "tenant_a:l", "LEFT"]
        );
        for bad in ["01", "+1", "-1", "x", "3"] {
            let cmd = Command::new("LMPOP").arg(bad).arg("l").arg("LEFT");
            assert!(
                matches!(prepare(&cmd, &c), Err(ConfinementError::Malformed { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn scripts_are_confined_only_by_acl() {
        let cmd = Command::new("EVAL")
            .arg("return redis.call('GET', KEYS[1])")
            .arg(1)
            .arg("k")
            .arg("v");
        assert!(matches!(
            prepare(&cmd, &prefix()),
            Err(ConfinementError::Forbidden { .. })
        ));
        assert!(matches!(
            prepare(&cmd, &Confinement::Database("tenant_a:".into())),
            Err(ConfinementError::Forbidden { .. })
        ));
        let acl = Confinement::Acl("tenant_a:".into());
        assert_eq!(sent(&cmd, &acl)[3], "tenant_a:k");
        assert_eq!(sent(&cmd, &acl)[4], "v");
    }

    #[test]
    fn streams_are_found_where_the_server_finds_them() {
        let c = prefix();
        let cmd = Command::new("XREAD")
            .arg("COUNT")
            .arg(2)
            .arg("STREAMS")
            .arg("s1")
            .arg("s2")
            .arg("0")
            .arg("0");
        assert_eq!(
            sent(&cmd, &c),
            [
                "XREAD",
                "COUNT",
                "2",
                "STREAMS",
                "tenant_a:s1",
                "tenant_a:s2",
                "0",
                "0"
            ]
        );
        let odd = Command::new("XREAD")
            .arg("STREAMS")
            .arg("s1")
            .arg("s2")
            .arg("0");
        assert!(prepare(&odd, &c).is_err());
        let block0 = Command::new("XREAD")
            .arg("BLOCK")
            .arg(0)
            .arg("STREAMS")
            .arg("s")
            .arg("$");
        assert!(prepare(&block0, &c).is_err());
    }

    #[test]
    fn unconfinable_commands_are_refused_with_a_reason() {
        for c in [
            prefix(),
            Confinement::Database("tenant_a:".into()),
            Confinement::Acl("t:".into()),
        ] {
            for name in [
                "FLUSHALL",
                "flushdb",
                "SELECT",
                "SWAPDB",
                "MOVE",
                "MIGRATE",
                "CLIENT",
                "CONFIG",
                "ACL",
                "AUTH",
                "MULTI",
                "SUBSCRIBE",
                "SORT",
                "OBJECT",
                "INFO",
            ] {
                let err = prepare(&Command::new(name).arg("x").arg("0"), &c).unwrap_err();
                assert!(
                    matches!(err, ConfinementError::Forbidden { .. }),
                    "{name}: {err}"
                );
            }
            let err = prepare(&Command::new("a\r\nFLUSHALL"), &c).unwrap_err();
            assert!(matches!(err, ConfinementError::Unknown { .. }), "{err}");
            let copy = Command::new("COPY").arg("a").arg("b").arg("db").arg(3);
            assert!(prepare(&copy, &c).is_err());
        }
        for name in ["KEYS", "SCAN", "DBSIZE", "RANDOMKEY"] {
            assert!(prepare(&Command::new(name).arg("*"), &prefix()).is_err());
            assert!(prepare(
                &Command::new(name).arg("*"),
                &Confinement::Database("tenant_a:".into())
            )
            .is_ok());
        }
        assert!(prepare(&Command::new("BLPOP").arg("l").arg(0), &prefix()).is_err());
    }

    #[test]
    fn open_connections_pass_everything_through() {
        let p = prepare(&Command::new("FLUSHALL"), &Confinement::Open).unwrap();
        assert_eq!(p.blocks_for, None);
        let p = prepare(&Command::new("BLPOP").arg("l").arg(2), &Confinement::Open).unwrap();
        assert_eq!(p.blocks_for, Some(Duration::from_secs(2)));
    }

    #[test]
    fn replies_lose_the_prefix_and_foreign_keys_are_errors() {
        let v = Value::Array(vec![
            Value::BulkString(b"tenant_a:l".to_vec()),
            Value::BulkString(b"x".to_vec()),
        ]);
        let out = strip_reply(Reply::KeyFirst, v, b"tenant_a:").unwrap();
        assert_eq!(
            out,
            Value::Array(vec![
                Value::BulkString(b"l".to_vec()),
                Value::BulkString(b"x".to_vec())
            ])
        );
        let foreign = Value::Array(vec![Value::BulkString(b"tenant_b:l".to_vec())]);
        assert!(strip_reply(Reply::KeyFirst, foreign, b"tenant_a:").is_err());
        assert_eq!(
            strip_reply(Reply::KeyFirst, Value::Nil, b"tenant_a:").unwrap(),
            Value::Nil
        );
    }
}
