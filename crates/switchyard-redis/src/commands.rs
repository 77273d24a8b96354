//! Typed methods for the common commands. Each builds a [`Command`] and sends
//! it through [`RedisConnection::query`], so it is confined exactly like a
//! hand-built one: keys land under the tenant's prefix, replies naming keys
//! come back without it.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_redis::redis::{self, FromRedisValue, ToRedisArgs, Value};
use switchyard_core::Error;

use crate::connection::RedisConnection;
use crate::keys::Command;

impl RedisConnection {
    /// `GET key`.
    pub async fn get<T: FromRedisValue>(&mut self, key: &str) -> Result<T, Error> {
        self.query(&Command::new("GET").arg(key)).await
    }

    /// `SET key value`.
    pub async fn set<V: ToRedisArgs>(&mut self, key: &str, value: V) -> Result<(), Error> {
        self.query(&Command::new("SET").arg(key).arg(value)).await
    }

    /// `SET key value EX seconds`.
    pub async fn set_ex<V: ToRedisArgs>(
        &mut self,
        key: &str,
        value: V,
        ttl: Duration,
    ) -> Result<(), Error> {
        let secs = ttl.as_secs().max(1);
        self.query(&Command::new("SET").arg(key).arg(value).arg("EX").arg(secs))
            .await
    }

    /// `SET key value NX`: whether the key was set.
    pub async fn set_nx<V: ToRedisArgs>(&mut self, key: &str, value: V) -> Result<bool, Error> {
        let reply: Option<String> = self
            .query(&Command::new("SET").arg(key).arg(value).arg("NX"))
            .await?;
        Ok(reply.is_some())
    }

    /// `DEL key...`: how many keys were removed.
    pub async fn del(&mut self, keys: &[&str]) -> Result<u64, Error> {
        self.query(&Command::new("DEL").arg(keys)).await
    }

    /// `EXISTS key`.
    pub async fn exists(&mut self, key: &str) -> Result<bool, Error> {
        self.query(&Command::new("EXISTS").arg(key)).await
    }

    /// `INCRBY key delta`: the new value.
    pub async fn incr(&mut self, key: &str, delta: i64) -> Result<i64, Error> {
        self.query(&Command::new("INCRBY").arg(key).arg(delta))
            .await
    }

    /// `EXPIRE key seconds`: whether a timeout was set.
    pub async fn expire(&mut self, key: &str, ttl: Duration) -> Result<bool, Error> {
        self.query(&Command::new("EXPIRE").arg(key).arg(ttl.as_secs().max(1)))
            .await
    }

    /// `TTL key`: seconds left, -1 without expiry, -2 when missing.
    pub async fn ttl(&mut self, key: &str) -> Result<i64, Error> {
        self.query(&Command::new("TTL").arg(key)).await
    }

    /// `MGET key...`.
    pub async fn mget<T: FromRedisValue>(&mut self, keys: &[&str]) -> Result<Vec<T>, Error> {
        self.query(&Command::new("MGET").arg(keys)).await
    }

    /// `MSET key value [key value ...]`.
    pub async fn mset<V: ToRedisArgs>(&mut self, pairs: &[(&str, V)]) -> Result<(), Error> {
        let mut cmd = Command::new("MSET");
        for (key, value) in pairs {
            cmd = cmd.arg(*key).arg(value);
        }
        self.query(&cmd).await
    }

    /// `HGET key field`.
    pub async fn hget<T: FromRedisValue>(&mut self, key: &str, field: &str) -> Result<T, Error> {
        self.query(&Command::new("HGET").arg(key).arg(field)).await
    }

    /// `HSET key field value`: how many fields were added.
    pub async fn hset<V: ToRedisArgs>(
        &mut self,
        key: &str,
        field: &str,
        value: V,
    ) -> Result<u64, Error> {
        self.query(&Command::new("HSET").arg(key).arg(field).arg(value))
            .await
    }

    /// `HDEL key field...`: how many fields were removed.
    pub async fn hdel(&mut self, key: &str, fields: &[&str]) -> Result<u64, Error> {
        self.query(&Command::new("HDEL").arg(key).arg(fields)).await
    }

    /// `HGETALL key`.
    pub async fn hgetall<T: FromRedisValue>(
        &mut self,
        key: &str,
    ) -> Result<HashMap<String, T>, Error> {
        self.query(&Command::new("HGETALL").arg(key)).await
    }

    /// `LPUSH key value...`: the new length.
    pub async fn lpush<V: ToRedisArgs>(&mut self, key: &str, values: V) -> Result<u64, Error> {
        self.query(&Command::new("LPUSH").arg(key).arg(values))
            .await
    }

    /// `RPUSH key value...`: the new length.
    pub async fn rpush<V: ToRedisArgs>(&mut self, key: &str, values: V) -> Result<u64, Error> {
        self.query(&Command::new("RPUSH").arg(key).arg(values))
            .await
    }

    /// `LRANGE key start stop`.
    pub async fn lrange<T: FromRedisValue>(
        &mut self,
        key: &str,
        start: isize,
        stop: isize,
    ) -> Result<Vec<T>, Error> {
        self.query(&Command::new("LRANGE").arg(key).arg(start).arg(stop))
            .await
    }

    /// `BLPOP key... timeout`: the key (without prefix) and the value, or
    /// `None` when `timeout` passed. A zero timeout (block forever) is refused.
    pub async fn blpop<T: FromRedisValue>(
        &mut self,
        keys: &[&str],
        timeout: Duration,
    ) -> Result<Option<(String, T)>, Error> {
        let secs = format!("{:.3}", timeout.as_secs_f64());
        self.query(&Command::new("BLPOP").arg(keys).arg(secs)).await
    }

    /// `SADD key member...`: how many members were added.
    pub async fn sadd<V: ToRedisArgs>(&mut self, key: &str, members: V) -> Result<u64, Error> {
        self.query(&Command::new("SADD").arg(key).arg(members))
            .await
    }

    /// `SREM key member...`: how many members were removed.
    pub async fn srem<V: ToRedisArgs>(&mut self, key: &str, members: V) -> Result<u64, Error> {
        self.query(&Command::new("SREM").arg(key).arg(members))
            .await
    }

    /// `SMEMBERS key`.
    pub async fn smembers<T: FromRedisValue>(&mut self, key: &str) -> Result<Vec<T>, Error> {
        self.query(&Command::new("SMEMBERS").arg(key)).await
    }

    /// `SISMEMBER key member`.
    pub async fn sismember<V: ToRedisArgs>(&mut self, key: &str, member: V) -> Result<bool, Error> {
        self.query(&Command::new("SISMEMBER").arg(key).arg(member))
            .await
    }

    /// `PUBLISH channel message` (the channel is namespaced like a key): how
    /// many subscribers received it.
    pub async fn publish<V: ToRedisArgs>(
        &mut self,
        channel: &str,
        message: V,
    ) -> Result<u64, Error> {
        self.query(&Command::new("PUBLISH").arg(channel).arg(message))
            .await
    }

    /// One `SCAN` step over the tenant's keys: `pattern` is a glob under the
    /// tenant's prefix (or database), `*` for all. Returns the next cursor (0
    /// when done) and the keys, without prefix.
    pub async fn scan(
        &mut self,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), Error> {
        // Built here rather than through the table: the pattern is confined by
        // construction, which the table cannot express for a caller's SCAN.
        let prefix = self.confinement().prefix().to_vec();
        let mut full = prefix.clone();
        full.extend_from_slice(pattern.as_bytes());
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(full)
            .arg("COUNT")
            .arg(count.max(1));
        // A tenant ACL user may not run SCAN (its reply is not filtered by
        // key patterns); this one, prefix built in, runs as the pool's user.
        let value = self.send_as_pool(&cmd).await.map_err(|e| self.fail(e))?;
        let (next, keys): (u64, Vec<Vec<u8>>) = match value {
            Value::Array(mut parts) if parts.len() == 2 => {
                let keys = parts.pop().unwrap_or(Value::Nil);
                let next = parts.pop().unwrap_or(Value::Nil);
                (self.decode(next)?, self.decode(keys)?)
            }
            _ => {
                let scan = Command::new("SCAN");
                return Err(self.malformed(&scan, "SCAN gave an unexpected reply"));
            }
        };
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(rest) = key.strip_prefix(prefix.as_slice()) else {
                let scan = Command::new("SCAN");
                return Err(self.malformed(
                    &scan,
                    "the reply named a key outside the tenant's namespace",
                ));
            };
            out.push(String::from_utf8_lossy(rest).into_owned());
        }
        Ok((next, out))
    }

    /// Every key of the tenant matching `pattern` (a glob under its prefix or
    /// database), without prefix. Walks `SCAN` to the end instead of sending
    /// `KEYS`, which would block the server and is refused to tenant users.
    pub async fn keys(&mut self, pattern: &str) -> Result<Vec<String>, Error> {
        let mut cursor = 0;
        let mut out = Vec::new();
        loop {
            let (next, keys) = self.scan(cursor, pattern, 500).await?;
            out.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// `PING`: a round trip within the connection's confinement.
    pub async fn ping(&mut self) -> Result<(), Error> {
        let _: String = self.query(&Command::new("PING")).await?;
        Ok(())
    }

    fn decode<T: FromRedisValue>(&self, value: Value) -> Result<T, Error> {
        redis::from_redis_value(value).map_err(|e| self.fail(e.into()))
    }
}
