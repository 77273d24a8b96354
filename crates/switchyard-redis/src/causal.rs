//! Causal tokens on Redis: replication offsets on a named line.
//!
//! A write's token is the master's `master_replid` and `master_repl_offset`
//! read after the write was answered (the offset then includes it); a
//! replica has applied a token when it follows the token's line and its own
//! `master_repl_offset` (what it has applied) has reached the token's offset.
//! Both are one `INFO replication` on the backend's own multiplexed
//! connection (with the URL's credentials): a tenant's ACL user may not run
//! `INFO`, and a shared multiplexed link takes no pool slot. No `WAIT`.
//!
//! # Across a promotion
//!
//! A promoted replica starts a new line id and keeps the old one as
//! `master_replid2`, sharing it up to `second_repl_offset`. A token of the
//! old line is covered on the new one when its offset is below that point.
//! At or past it, or on an unrelated line, a node never will cover it
//! ([`Coverage::Never`]): the new master's answer makes the router refuse
//! the token as lost (the write went with the old master), and a replica's
//! (one that resynced from the new master, or switched lines earlier than
//! the master did) moves the read on at once instead of waiting on it. So a
//! token of the old master never waits past the causal wait and never
//! reads older data than it names as if it held.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::redis::{self, aio::MultiplexedConnection};
use switchyard_core::{Backend, CausalBackend, CausalToken, Coverage, Error, History};

use crate::backend::RedisBackend;
use crate::connection::RedisConnection;
use crate::error::redis_error;
use crate::probe::field;

/// The backend's own connection for `INFO replication`, opened on first use
/// and reopened after an error.
pub(crate) struct Link {
    client: redis::Client,
    timeout: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl Link {
    pub(crate) fn new(client: redis::Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            conn: Mutex::new(None),
        }
    }

    async fn replication(&self) -> redis::RedisResult<String> {
        let cached = self
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut conn = match cached {
            Some(conn) => conn,
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                let conn = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
                conn
            }
        };
        let answer = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await;
        if answer.is_err() {
            *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        answer
    }
}

impl CausalBackend for RedisBackend {
    async fn written(
        &self,
        _conn: &mut RedisConnection,
        _line: Option<&History>,
    ) -> Result<History, Error> {
        let info = self.replication().await?;
        Ok(History::Lineage {
            id: field(&info, "master_replid").unwrap_or_default().to_owned(),
            previous: None,
            offset: number(&info, "master_repl_offset").unwrap_or(0),
        })
    }

    async fn confirm(
        &self,
        _conn: &mut RedisConnection,
        token: &CausalToken,
        _line: Option<&History>,
    ) -> Result<Coverage, Error> {
        let info = self.replication().await?;
        Ok(coverage(token, &info))
    }
}

impl RedisBackend {
    async fn replication(&self) -> Result<String, Error> {
        self.causal_link()
            .replication()
            .await
            .map_err(|e| redis_error(self.endpoint(), None, e))
    }
}

/// Whether the node whose `INFO replication` is `info` has applied `token`.
fn coverage(token: &CausalToken, info: &str) -> Coverage {
    let History::Lineage { id, offset, .. } = token.mark() else {
        return Coverage::Never;
    };
    let applied = number(info, "master_repl_offset").unwrap_or(0);
    let reached = if applied >= *offset {
        Coverage::Covered
    } else {
        Coverage::NotYet
    };
    if field(info, "master_replid") == Some(id.as_str()) {
        return reached;
    }
    // The line replaced (`master_replid2`) is shared up to
    // `second_repl_offset` (exclusive), and never grows again.
    let shared = field(info, "master_replid2") == Some(id.as_str())
        && number(info, "second_repl_offset").is_some_and(|at| *offset < at);
    if shared {
        return reached;
    }
    Coverage::Never
}

fn number(info: &str, name: &str) -> Option<u64> {
    field(info, name)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
    const NEW: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";

    fn token(offset: u64) -> CausalToken {
        CausalToken::new(
            "c",
            History::Lineage {
                id: OLD.into(),
                previous: None,
                offset,
            },
        )
        .expect("a position")
    }

    fn info(role: &str, id: &str, id2: &str, second: i64, offset: u64) -> String {
        format!(
            "# Replication\r\nrole:{role}\r\nmaster_replid:{id}\r\nmaster_replid2:{id2}\r\n\
             master_repl_offset:{offset}\r\nsecond_repl_offset:{second}\r\n"
        )
    }

    const ZEROS: &str = "0000000000000000000000000000000000000000";

    #[test]
    fn the_same_line_covers_up_to_its_offset() {
        let replica = |offset| info("slave", OLD, ZEROS, -1, offset);
        assert_eq!(coverage(&token(100), &replica(100)), Coverage::Covered);
        assert_eq!(coverage(&token(100), &replica(99)), Coverage::NotYet);
    }

    #[test]
    fn a_promotion_covers_the_old_line_only_up_to_where_it_was_replaced() {
        // Promoted at offset 100 (the new line shares 0..=100).
        let master = info("master", NEW, OLD, 101, 500);
        assert_eq!(coverage(&token(100), &master), Coverage::Covered);
        assert_eq!(coverage(&token(150), &master), Coverage::Never, "lost");
        // A replica that switched lines at 101 cannot get 150 any more.
        let replica = info("slave", NEW, OLD, 101, 500);
        assert_eq!(coverage(&token(150), &replica), Coverage::Never);
        assert_eq!(coverage(&token(90), &replica), Coverage::Covered);
        // An unrelated line (a master restarted empty, a replica that fully
        // resynced from the new master): never, not worth a wait.
        let restarted = info("master", NEW, ZEROS, -1, 10);
        assert_eq!(coverage(&token(5), &restarted), Coverage::Never);
        let resynced = info("slave", NEW, ZEROS, -1, 500);
        assert_eq!(coverage(&token(5), &resynced), Coverage::Never);
    }
}
