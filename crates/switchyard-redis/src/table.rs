//! The command table: which commands a confined connection may send, where
//! each keeps its keys, which replies name keys, and how long a blocking one
//! may hold its reply back.
//!
//! Positions count arguments after the command name. Where Redis itself parses
//! a key count or a `STREAMS` token, the table parses it the same way, so the
//! server and the table always agree on which arguments are keys.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// Where a command keeps its keys. Positions count arguments after the name.
#[derive(Clone, Copy, Debug)]
enum Keys {
    None,
    /// `first`, `first + step`, ... up to `last`; a negative `last` counts from
    /// the end (-1 is the last argument).
    Range {
        first: usize,
        last: isize,
        step: usize,
    },
    /// A key count at `at`, then that many keys.
    Counted {
        at: usize,
    },
    /// A destination key, a key count, then that many keys.
    DestCounted,
    /// After the `STREAMS` token: the first half of what follows.
    Streams,
}

/// Which replies name keys, so the prefix can be taken off again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Plain,
    /// `[key, ...]` or nil.
    KeyFirst,
    /// `[[key, entries], ...]` or nil.
    Streams,
}

/// Where a command may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Allowed {
    Everywhere,
    /// Sees the whole keyspace: confined only by a database of the tenant's own.
    DatabaseOnly,
    /// Computes key names the table cannot see: confined only by an ACL user.
    AclOnly,
    /// Has an option (`COPY ... DB`) the handle refuses but the server's ACL
    /// cannot: left out of tenant users' rules, so not for ACL isolation.
    NotAcl,
}

/// How a blocking command says how long it blocks.
#[derive(Clone, Copy, Debug)]
enum Block {
    No,
    /// Seconds (a float) at this position; negative counts from the end.
    Seconds(isize),
    /// `BLOCK <milliseconds>` among the options (XREAD).
    Option,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Spec {
    keys: Keys,
    /// Its "keys" are pub/sub channels.
    pub(crate) channels: bool,
    pub(crate) reply: Reply,
    pub(crate) allowed: Allowed,
    block: Block,
}

const fn spec(keys: Keys) -> Spec {
    Spec {
        keys,
        channels: false,
        reply: Reply::Plain,
        allowed: Allowed::Everywhere,
        block: Block::No,
    }
}

const ONE: Spec = spec(Keys::Range {
    first: 0,
    last: 0,
    step: 1,
});
const TWO: Spec = spec(Keys::Range {
    first: 0,
    last: 1,
    step: 1,
});
const ALL: Spec = spec(Keys::Range {
    first: 0,
    last: -1,
    step: 1,
});
const NONE: Spec = spec(Keys::None);
const SUB_ONE: Spec = spec(Keys::Range {
    first: 1,
    last: 1,
    step: 1,
});

/// The table: every command a confined connection may send, upper case;
/// container commands are listed as `NAME|SUB`. The ACL rules of tenant users
/// ([`acl_commands`]) come from this same list, so the server allows a tenant
/// user exactly what the handle lets through.
const TABLE: &[(&[&str], Spec)] = &[
    (&["PING", "ECHO", "TIME", "UNWATCH"], NONE),
    // Strings, counters, bits, HyperLogLog.
    (
        &[
            "GET",
            "SET",
            "SETNX",
            "SETEX",
            "PSETEX",
            "GETSET",
            "GETDEL",
            "GETEX",
            "GETRANGE",
            "SETRANGE",
            "APPEND",
            "STRLEN",
            "INCR",
            "INCRBY",
            "INCRBYFLOAT",
            "DECR",
            "DECRBY",
            "SETBIT",
            "GETBIT",
            "BITCOUNT",
            "BITPOS",
            "BITFIELD",
            "BITFIELD_RO",
            "PFADD",
        ],
        ONE,
    ),
    (
        &[
            "MGET",
            "DEL",
            "UNLINK",
            "EXISTS",
            "TOUCH",
            "WATCH",
            "PFCOUNT",
            "PFMERGE",
            "SINTER",
            "SUNION",
            "SDIFF",
            "SINTERSTORE",
            "SUNIONSTORE",
            "SDIFFSTORE",
        ],
        ALL,
    ),
    (
        &["MSET", "MSETNX"],
        spec(Keys::Range {
            first: 0,
            last: -1,
            step: 2,
        }),
    ),
    (
        &["BITOP"],
        spec(Keys::Range {
            first: 1,
            last: -1,
            step: 1,
        }),
    ),
    (&["LCS"], TWO),
    // Generic key commands.
    (
        &[
            "EXPIRE",
            "PEXPIRE",
            "EXPIREAT",
            "PEXPIREAT",
            "EXPIRETIME",
            "PEXPIRETIME",
            "PERSIST",
            "TTL",
            "PTTL",
            "TYPE",
            "DUMP",
        ],
        ONE,
    ),
    (&["RENAME", "RENAMENX"], TWO),
    // Its DB option reaches another database, and a script could pass it.
    (
        &["COPY"],
        Spec {
            allowed: Allowed::NotAcl,
            ..TWO
        },
    ),
    (
        &[
            "OBJECT|ENCODING",
            "OBJECT|FREQ",
            "OBJECT|IDLETIME",
            "OBJECT|REFCOUNT",
            "MEMORY|USAGE",
        ],
        SUB_ONE,
    ),
    // Hashes.
    (
        &[
            "HGET",
            "HSET",
            "HSETNX",
            "HMSET",
            "HMGET",
            "HDEL",
            "HEXISTS",
            "HGETALL",
            "HKEYS",
            "HVALS",
            "HLEN",
            "HSTRLEN",
            "HINCRBY",
            "HINCRBYFLOAT",
            "HRANDFIELD",
            "HSCAN",
        ],
        ONE,
    ),
    // Lists.
    (
        &[
            "LPUSH", "RPUSH", "LPUSHX", "RPUSHX", "LPOP", "RPOP", "LRANGE", "LLEN", "LINDEX",
            "LSET", "LINSERT", "LREM", "LTRIM", "LPOS",
        ],
        ONE,
    ),
    (&["RPOPLPUSH", "LMOVE"], TWO),
    (
        &["BRPOPLPUSH", "BLMOVE"],
        Spec {
            block: Block::Seconds(-1),
            ..TWO
        },
    ),
    (&["BLPOP", "BRPOP"], BLOCKING_POP),
    (
        &["LMPOP"],
        Spec {
            reply: Reply::KeyFirst,
            ..spec(Keys::Counted { at: 0 })
        },
    ),
    (
        &["BLMPOP"],
        Spec {
            reply: Reply::KeyFirst,
            block: Block::Seconds(0),
            ..spec(Keys::Counted { at: 1 })
        },
    ),
    // Sets.
    (
        &[
            "SADD",
            "SREM",
            "SMEMBERS",
            "SISMEMBER",
            "SMISMEMBER",
            "SCARD",
            "SPOP",
            "SRANDMEMBER",
            "SSCAN",
        ],
        ONE,
    ),
    (&["SMOVE"], TWO),
    (&["SINTERCARD"], spec(Keys::Counted { at: 0 })),
    // Sorted sets.
    (
        &[
            "ZADD",
            "ZREM",
            "ZSCORE",
            "ZMSCORE",
            "ZINCRBY",
            "ZCARD",
            "ZCOUNT",
            "ZLEXCOUNT",
            "ZRANGE",
            "ZRANGEBYSCORE",
            "ZRANGEBYLEX",
            "ZREVRANGE",
            "ZREVRANGEBYSCORE",
            "ZREVRANGEBYLEX",
            "ZRANK",
            "ZREVRANK",
            "ZPOPMIN",
            "ZPOPMAX",
            "ZRANDMEMBER",
            "ZREMRANGEBYRANK",
            "ZREMRANGEBYSCORE",
            "ZREMRANGEBYLEX",
            "ZSCAN",
        ],
        ONE,
    ),
    (&["ZRANGESTORE"], TWO),
    (
        &["ZUNION", "ZINTER", "ZDIFF", "ZINTERCARD"],
        spec(Keys::Counted { at: 0 }),
    ),
    (
        &["ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE"],
        spec(Keys::DestCounted),
    ),
    (
        &["ZMPOP"],
        Spec {
            reply: Reply::KeyFirst,
            ..spec(Keys::Counted { at: 0 })
        },
    ),
    (
        &["BZMPOP"],
        Spec {
            reply: Reply::KeyFirst,
            block: Block::Seconds(0),
            ..spec(Keys::Counted { at: 1 })
        },
    ),
    (&["BZPOPMIN", "BZPOPMAX"], BLOCKING_POP),
    // Geo (the GEORADIUS family's STORE options are left out).
    (
        &["GEOADD", "GEOPOS", "GEODIST", "GEOHASH", "GEOSEARCH"],
        ONE,
    ),
    (&["GEOSEARCHSTORE"], TWO),
    // Streams.
    (
        &[
            "XADD",
            "XLEN",
            "XRANGE",
            "XREVRANGE",
            "XDEL",
            "XTRIM",
            "XACK",
            "XPENDING",
            "XCLAIM",
            "XAUTOCLAIM",
            "XSETID",
        ],
        ONE,
    ),
    (
        &[
            "XGROUP|CREATE",
            "XGROUP|DESTROY",
            "XGROUP|CREATECONSUMER",
            "XGROUP|DELCONSUMER",
            "XGROUP|SETID",
            "XINFO|STREAM",
            "XINFO|GROUPS",
            "XINFO|CONSUMERS",
        ],
        SUB_ONE,
    ),
    (
        &["XREAD", "XREADGROUP"],
        Spec {
            reply: Reply::Streams,
            block: Block::Option,
            ..spec(Keys::Streams)
        },
    ),
    // Channels are namespaced like keys, in a database of the tenant's own
    // too: pub/sub is server-wide, not per database.
    (
        &["PUBLISH", "SPUBLISH"],
        Spec {
            channels: true,
            ..ONE
        },
    ),
    // Whole-keyspace commands: fine in a database of the tenant's own.
    (
        &["DBSIZE", "RANDOMKEY", "KEYS", "SCAN"],
        Spec {
            allowed: Allowed::DatabaseOnly,
            ..NONE
        },
    ),
    // Scripts name keys the table cannot see; the server's ACL can.
    (
        &[
            "EVAL",
            "EVAL_RO",
            "EVALSHA",
            "EVALSHA_RO",
            "FCALL",
            "FCALL_RO",
        ],
        Spec {
            allowed: Allowed::AclOnly,
            ..spec(Keys::Counted { at: 1 })
        },
    ),
    (
        &["SCRIPT|LOAD", "SCRIPT|EXISTS"],
        Spec {
            allowed: Allowed::AclOnly,
            ..NONE
        },
    ),
];

/// The spec of `name` (upper case, or `NAME|SUB`).
fn lookup(name: &str) -> Option<Spec> {
    static INDEX: OnceLock<HashMap<&'static str, Spec>> = OnceLock::new();
    INDEX
        .get_or_init(|| {
            TABLE
                .iter()
                .flat_map(|(names, spec)| names.iter().map(move |n| (*n, *spec)))
                .collect()
        })
        .get(name)
        .copied()
}

/// The commands an ACL (row-isolated) tenant user may run, as ACL rule
/// names (`get`, `object|encoding`): every entry of the table except those
/// that see a whole keyspace, which only a database of the tenant's own
/// confines. Everything else is denied, inside scripts too.
pub(crate) fn acl_commands() -> impl Iterator<Item = String> {
    TABLE
        .iter()
        .filter(|(_, spec)| matches!(spec.allowed, Allowed::Everywhere | Allowed::AclOnly))
        .flat_map(|(names, _)| names.iter().map(|n| n.to_ascii_lowercase()))
}

const BLOCKING_POP: Spec = Spec {
    reply: Reply::KeyFirst,
    block: Block::Seconds(-1),
    ..spec(Keys::Range {
        first: 0,
        last: -2,
        step: 1,
    })
};

/// Why a command outside the table is refused, for the ones worth explaining.
pub(crate) fn forbidden(name: &str) -> Option<&'static str> {
    Some(match name {
        "SELECT" | "SWAPDB" | "MOVE" | "MIGRATE" => "it reaches another logical database",
        "FLUSHALL" | "FLUSHDB" => "it wipes a keyspace other tenants share",
        "KEYS" | "SCAN" | "RANDOMKEY" | "DBSIZE" => {
            "it sees the whole keyspace; use the prefix-confined keys/scan methods"
        }
        "EVAL" | "EVAL_RO" | "EVALSHA" | "EVALSHA_RO" | "FCALL" | "FCALL_RO" | "SCRIPT" => {
            "a script can compute any key name; scripts need ACL (row) isolation"
        }
        "FUNCTION" => "it changes server-wide functions",
        "MULTI" | "EXEC" | "DISCARD" => "use transaction(), which sends MULTI and EXEC as one unit",
        "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" | "UNSUBSCRIBE" | "PUNSUBSCRIBE"
        | "SUNSUBSCRIBE" | "MONITOR" => "it turns a pooled connection into a push stream",
        "SORT" | "SORT_RO" | "GEORADIUS" | "GEORADIUSBYMEMBER" => {
            "its BY, GET or STORE options address keys by pattern"
        }
        "AUTH" | "HELLO" | "RESET" | "CLIENT" | "READONLY" | "READWRITE" => {
            "it changes who the connection is"
        }
        "ACL" | "CONFIG" | "DEBUG" | "SHUTDOWN" | "SYNC" | "PSYNC" | "REPLICAOF" | "SLAVEOF"
        | "SAVE" | "BGSAVE" | "BGREWRITEAOF" | "MODULE" | "SLOWLOG" | "LATENCY" | "INFO"
        | "LASTSAVE" | "FAILOVER" | "CLUSTER" | "COMMAND" | "MEMORY" | "OBJECT" | "PUBSUB"
        | "WAIT" | "WAITAOF" | "LOLWUT" | "RESTORE" => "it administers the server",
        _ => return None,
    })
}

/// The spec of a command by its upper-cased name; container commands
/// (`OBJECT ENCODING`) are found by their subcommand.
pub(crate) fn find(upper: &str, args: &[Vec<u8>]) -> Option<Spec> {
    if let Some(spec) = lookup(upper) {
        return Some(spec);
    }
    if !matches!(upper, "OBJECT" | "MEMORY" | "XGROUP" | "XINFO" | "SCRIPT") {
        return None;
    }
    let sub = String::from_utf8_lossy(args.first()?).to_ascii_uppercase();
    lookup(&format!("{upper}|{sub}"))
}

impl Spec {
    /// The sorted positions of the key arguments.
    pub(crate) fn key_positions(&self, args: &[Vec<u8>]) -> Result<Vec<usize>, &'static str> {
        key_positions(self.keys, args)
    }

    /// How long the command may hold its reply back; refuses to block forever.
    pub(crate) fn block_time(&self, args: &[Vec<u8>]) -> Result<Option<Duration>, &'static str> {
        block_time(self, args)
    }
}

fn resolve(pos: isize, len: usize) -> Option<usize> {
    if pos >= 0 {
        usize::try_from(pos).ok()
    } else {
        len.checked_sub(pos.unsigned_abs())
    }
}

/// A count as Redis reads one: plain decimal digits, no sign, no leading zero.
fn parse_count(arg: &[u8]) -> Option<usize> {
    let canonical =
        !arg.is_empty() && arg.iter().all(u8::is_ascii_digit) && (arg.len() == 1 || arg[0] != b'0');
    if !canonical {
        return None;
    }
    std::str::from_utf8(arg).ok()?.parse().ok()
}

/// The sorted positions of the key arguments.
fn key_positions(keys: Keys, args: &[Vec<u8>]) -> Result<Vec<usize>, &'static str> {
    let len = args.len();
    match keys {
        Keys::None => Ok(Vec::new()),
        Keys::Range { first, last, step } => {
            let Some(last) = resolve(last, len) else {
                return Ok(Vec::new());
            };
            let last = last.min(len.saturating_sub(1));
            if len == 0 || first > last {
                return Ok(Vec::new());
            }
            Ok((first..=last).step_by(step).collect())
        }
        Keys::Counted { at } => {
            let n = args
                .get(at)
                .and_then(|a| parse_count(a))
                .ok_or("the key count is missing or not a number")?;
            if at + 1 + n > len {
                return Err("the key count does not match the arguments");
            }
            Ok((at + 1..at + 1 + n).collect())
        }
        Keys::DestCounted => {
            let n = args
                .get(1)
                .and_then(|a| parse_count(a))
                .ok_or("the key count is missing or not a number")?;
            if 2 + n > len || n == 0 {
                return Err("the key count does not match the arguments");
            }
            Ok(std::iter::once(0).chain(2..2 + n).collect())
        }
        Keys::Streams => {
            let start = streams_start(args)?;
            let rest = len - start;
            if rest == 0 || !rest.is_multiple_of(2) {
                return Err("STREAMS needs as many ids as keys");
            }
            Ok((start..start + rest / 2).collect())
        }
    }
}

/// Where the keys start in XREAD / XREADGROUP, walking the options as the
/// server does so both agree on where `STREAMS` is.
fn streams_start(args: &[Vec<u8>]) -> Result<usize, &'static str> {
    let mut i = 0;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match opt.as_slice() {
            b"STREAMS" => return Ok(i + 1),
            b"COUNT" | b"BLOCK" => i += 2,
            b"GROUP" => i += 3,
            b"NOACK" => i += 1,
            _ => return Err("unknown option before STREAMS"),
        }
    }
    Err("STREAMS is missing")
}

/// How long a blocking command may hold its reply back; refuses to block forever.
fn block_time(spec: &Spec, args: &[Vec<u8>]) -> Result<Option<Duration>, &'static str> {
    let parse_secs = |arg: &[u8]| -> Result<Duration, &'static str> {
        let secs: f64 = std::str::from_utf8(arg)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("the timeout is not a number")?;
        if !(secs > 0.0 && secs < 1e9) {
            return Err("blocking forever (timeout 0) would hold a pooled connection indefinitely");
        }
        Ok(Duration::from_secs_f64(secs))
    };
    match spec.block {
        Block::No => Ok(None),
        Block::Seconds(pos) => {
            let arg = resolve(pos, args.len())
                .and_then(|i| args.get(i))
                .ok_or("the timeout is missing")?;
            parse_secs(arg).map(Some)
        }
        Block::Option => {
            let Some(i) = args.iter().position(|a| a.eq_ignore_ascii_case(b"BLOCK")) else {
                return Ok(None);
            };
            let ms = args
                .get(i + 1)
                .and_then(|a| parse_count(a))
                .ok_or("BLOCK needs milliseconds")?;
            if ms == 0 {
                return Err(
                    "blocking forever (BLOCK 0) would hold a pooled connection indefinitely",
                );
            }
            Ok(Some(Duration::from_millis(ms as u64)))
        }
    }
}
