//! Causal tokens on PostgreSQL: WAL positions.
//!
//! A write's token is the primary's WAL insert position, read on the write's
//! own connection after its commit (one round trip:
//! `pg_current_wal_insert_lsn()`, with the timeline from its WAL file name).
//! The insert position is at or past the commit record whatever
//! `synchronous_commit` says; the flush position (`pg_current_wal_lsn()`)
//! would not be with it off. The system identifier comes from the probe
//! (`pg_control_system()` needs a monitoring role).
//!
//! A standby has applied a token when its replay position
//! (`pg_last_wal_replay_lsn()`, one round trip on the read's own connection,
//! so what it then reads is at least that fresh) has reached the token's
//! position on the token's timeline or a later one; its system and timeline
//! are the probe's. Every function used is executable by any role, so a
//! tenant-scoped connection can run them.

use sqlx::PgConnection;
use switchyard_core::{Backend, CausalBackend, CausalError, CausalToken, Coverage, Error, History};

use crate::backend::PgBackend;
use crate::connection::PgConn;
use crate::error::pg_error;

/// The primary's timeline and WAL insert position.
const WRITTEN_SQL: &str =
    "SELECT ('x' || substr(pg_walfile_name(lsn), 1, 8))::bit(32)::int4::int8, \
    pg_wal_lsn_diff(lsn, '0/0')::int8 FROM (SELECT pg_current_wal_insert_lsn() AS lsn) AS s";

/// How far the node has replayed (a standby) or written (a primary: its
/// insert position).
const APPLIED_SQL: &str = "SELECT pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() \
    THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END, '0/0')::int8";

impl CausalBackend for PgBackend {
    async fn written(&self, conn: &mut PgConn, line: Option<&History>) -> Result<History, Error> {
        let Some(&History::Timeline { system, .. }) = line else {
            return Err(self.unsupported());
        };
        let (timeline, position): (i64, i64) = sqlx::query_as(WRITTEN_SQL)
            .fetch_one(session(conn))
            .await
            .map_err(|e| pg_error(self.endpoint(), conn.session_scope(), e))?;
        Ok(History::Timeline {
            system,
            timeline: u32::try_from(timeline).unwrap_or(0),
            position: u64::try_from(position).unwrap_or(0),
        })
    }

    async fn confirm(
        &self,
        conn: &mut PgConn,
        token: &CausalToken,
        line: Option<&History>,
    ) -> Result<Coverage, Error> {
        let position: Option<i64> = sqlx::query_scalar(APPLIED_SQL)
            .fetch_one(session(conn))
            .await
            .map_err(|e| pg_error(self.endpoint(), conn.session_scope(), e))?;
        let (
            Some(&History::Timeline {
                system, timeline, ..
            }),
            Some(position),
        ) = (line, position)
        else {
            // Never probed, or a standby that replayed nothing yet.
            return Ok(Coverage::NotYet);
        };
        let applied = History::Timeline {
            system,
            timeline,
            position: u64::try_from(position).unwrap_or(0),
        };
        Ok(token.covered_by(&applied))
    }
}

/// The sqlx connection itself: these queries are the router's, bounded and
/// cancelled by it (a cancelled one closes the connection).
fn session(conn: &mut PgConn) -> &mut PgConnection {
    conn
}

impl PgBackend {
    fn unsupported(&self) -> Error {
        Error::Causal {
            cluster: self.endpoint().to_string(),
            reason: CausalError::Unsupported,
        }
    }
}
