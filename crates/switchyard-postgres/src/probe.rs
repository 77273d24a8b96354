//! Health probes over a dedicated connection, outside the pool, so that a full
//! pool never makes a live endpoint look dead.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use switchyard_core::{EndpointId, Error, Probe, Role};
use tokio::time::Instant;

use crate::error::{classify, pg_error};

/// The probe query: role, version, and on a standby the replay lag in seconds
/// and in WAL bytes.
///
/// `now() - pg_last_xact_replay_timestamp()` keeps growing on a standby that
/// has replayed everything while the primary is idle, so when everything
/// received has been replayed the time lag is reported as zero.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), version(), \
    CASE WHEN pg_is_in_recovery() THEN \
        CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0::float8 \
        ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END \
    END, \
    CASE WHEN pg_is_in_recovery() THEN \
        pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::int8 \
    END";

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
    let (in_recovery, version, lag_secs, lag_bytes): (bool, String, Option<f64>, Option<i64>) =
        sqlx::query_as(PROBE_SQL).fetch_one(&mut *conn).await?;
    let rtt = started.elapsed();
    let role = if in_recovery {
        Role::Replica
    } else {
        Role::Primary
    };
    Ok(Probe {
        role,
        lag: lag_secs.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok()),
        lag_bytes: lag_bytes.map(|b| u64::try_from(b).unwrap_or(0)),
        version: Some(version),
        rtt,
    })
}
