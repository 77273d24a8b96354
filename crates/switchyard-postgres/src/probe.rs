//! Health probes over a dedicated connection, outside the pool, so that a full
//! pool never makes a live endpoint look dead.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use switchyard_core::{EndpointId, Error, History, Probe, Role};
use tokio::time::Instant;

use crate::error::{classify, pg_error};

/// The probe query: role, version, on a standby the replay lag in seconds and
/// in WAL bytes, and the history: system identifier, timeline, WAL position
/// and (on a standby) whether the WAL receiver is streaming.
///
/// `now() - pg_last_xact_replay_timestamp()` keeps growing on a standby that
/// has replayed everything while the primary is idle, so when everything
/// received has been replayed the time lag is reported as zero. That holds
/// only while the receiver streams: a receiver cut off from its primary
/// receives nothing, so "all received is replayed" says nothing about the
/// primary; the probe then reports the standby as not streaming and the lag
/// as unknown.
///
/// The timeline of a primary is the one it writes (the first eight hex digits
/// of its current WAL file name); of a standby, the one its receiver follows,
/// or its last restartpoint's when no receiver runs. Without
/// `pg_read_all_stats` (`pg_monitor`) the receiver's state is hidden: a running
/// receiver then counts as streaming.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), version(), \
    CASE WHEN pg_is_in_recovery() THEN \
        CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0::float8 \
        ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END \
    END, \
    CASE WHEN pg_is_in_recovery() THEN \
        pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::int8 \
    END, \
    (SELECT system_identifier FROM pg_control_system()), \
    CASE WHEN pg_is_in_recovery() THEN \
        coalesce((SELECT received_tli FROM pg_stat_wal_receiver WHERE pid IS NOT NULL), \
                 (SELECT timeline_id FROM pg_control_checkpoint()))::int8 \
    ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int4::int8 END, \
    pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                    ELSE pg_current_wal_lsn() END, '0/0')::int8, \
    CASE WHEN pg_is_in_recovery() THEN EXISTS (SELECT 1 FROM pg_stat_wal_receiver \
        WHERE pid IS NOT NULL AND coalesce(status, 'streaming') = 'streaming') END";

/// One row of [`PROBE_SQL`].
type Row = (
    bool,
    String,
    Option<f64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<bool>,
);

/// Probes one endpoint, keeping one connection between probes.
pub(crate) struct Prober {
    options: PgConnectOptions,
    cached: Mutex<Option<PgConnection>>,
}

impl Prober {
    pub(crate) fn new(options: PgConnectOptions) -> Self {
        Self {
            options: options.application_name("switchyard-probe"),
            cached: Mutex::new(None),
        }
    }

    fn take_cached(&self) -> Option<PgConnection> {
        self.cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn keep(&self, conn: PgConnection) {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.is_none() {
            *cached = Some(conn);
        }
    }

    /// Runs one probe, all of it (connecting included) within `timeout`.
    ///
    /// The kept connection is taken out while in use and put back only after a
    /// clean answer, so a cancelled or failed probe never leaves a half-read
    /// connection behind. If the kept connection fails for any reason other
    /// than the timeout, the probe retries once on a fresh connection, so a
    /// stale socket does not count against the endpoint and a dead endpoint
    /// reports the connect error.
    pub(crate) async fn probe(
        &self,
        endpoint: &EndpointId,
        timeout: Duration,
    ) -> Result<Probe, Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let timed_out = || Error::ProbeTimeout {
            endpoint: endpoint.clone(),
            elapsed: started.elapsed(),
        };
        if let Some(mut conn) = self.take_cached() {
            match tokio::time::timeout_at(deadline, query(&mut conn)).await {
                Ok(Ok(probe)) => {
                    self.keep(conn);
                    return Ok(probe);
                }
                Ok(Err(error)) => {
                    tracing::debug!(%endpoint, kind = %classify(&error), "probe connection failed; reconnecting");
                }
                Err(_) => return Err(timed_out()),
            }
        }
        let mut conn = match tokio::time::timeout_at(
            deadline,
            PgConnection::connect_with(&self.options),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => return Err(pg_error(endpoint, None, error)),
            Err(_) => return Err(timed_out()),
        };
        match tokio::time::timeout_at(deadline, query(&mut conn)).await {
            Ok(Ok(probe)) => {
                self.keep(conn);
                Ok(probe)
            }
            Ok(Err(error)) => Err(pg_error(endpoint, None, error)),
            Err(_) => Err(timed_out()),
        }
    }
}

async fn query(conn: &mut PgConnection) -> Result<Probe, sqlx::Error> {
    let started = Instant::now();
    let row: Row = sqlx::query_as(PROBE_SQL).fetch_one(&mut *conn).await?;
    let mut probe = interpret(row);
    probe.rtt = started.elapsed();
    Ok(probe)
}

/// Reads a probe out of the query's row (the round trip is the caller's).
fn interpret(row: Row) -> Probe {
    let (in_recovery, version, lag_secs, lag_bytes, system, timeline, position, streaming) = row;
    let mut probe = Probe::new(
        if in_recovery {
            Role::Replica
        } else {
            Role::Primary
        },
        Duration::ZERO,
    );
    probe.version = Some(version);
    probe.streaming = streaming;
    // A receiver that does not stream receives nothing: lag unknown, not zero.
    if streaming != Some(false) {
        probe.lag = lag_secs.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok());
        probe.lag_bytes = lag_bytes.map(|b| u64::try_from(b).unwrap_or(0));
    }
    if let (Some(system), Some(timeline), Some(position)) = (system, timeline, position) {
        probe.history = Some(History::Timeline {
            // An unsigned 64-bit number stored in a signed column: keep the bits.
            system: system as u64,
            timeline: u32::try_from(timeline).unwrap_or(0),
            position: u64::try_from(position).unwrap_or(0),
        });
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(in_recovery: bool, streaming: Option<bool>) -> Row {
        (
            in_recovery,
            "PostgreSQL 15".into(),
            Some(0.0),
            Some(0),
            Some(-7_000_000_000_000_000_000),
            Some(2),
            Some(0x1_0000_0010),
            streaming,
        )
    }

    #[test]
    fn a_primary_reports_its_timeline_and_position() {
        let p = interpret(row(false, None));
        assert_eq!(p.role, Role::Primary);
        assert_eq!(
            p.history,
            Some(History::Timeline {
                system: (-7_000_000_000_000_000_000_i64) as u64,
                timeline: 2,
                position: 0x1_0000_0010,
            })
        );
        assert_eq!(p.streaming, None);
    }

    #[test]
    fn a_standby_cut_off_from_its_primary_has_unknown_lag_not_zero() {
        let streaming = interpret(row(true, Some(true)));
        assert_eq!(
            (streaming.lag, streaming.streaming),
            (Some(Duration::ZERO), Some(true))
        );
        let orphaned = interpret(row(true, Some(false)));
        assert_eq!(orphaned.streaming, Some(false));
        assert_eq!((orphaned.lag, orphaned.lag_bytes), (None, None));
        assert!(orphaned.history.is_some(), "the timeline it was on is kept");
    }
}
