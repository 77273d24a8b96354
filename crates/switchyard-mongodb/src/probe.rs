//! Health probes: `hello` for liveness and role, `buildInfo` for the version,
//! `replSetGetStatus` for a secondary's lag, all over a small client of the
//! probe's own.
//!
//! The driver reports an unreachable server as "no server selected" only once
//! its server selection timeout has passed, which may well be longer than the
//! probe's timeout. So once a probe has failed (or before the first one), the
//! next one first opens a plain TCP connection to the endpoint: a refused or
//! unreachable endpoint then fails at once with a `Connect` error, while a hung
//! one (accepting connections but never answering) runs into the probe's own
//! timeout. A healthy endpoint costs no extra connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mongodb::action::Action;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{ClientOptions, ReadPreference, SelectionCriteria, ServerAddress};
use mongodb::Client;
use switchyard_core::{BackendErrorKind, EndpointId, Error, History, Probe, Role};
use tokio::time::Instant;

use crate::error::{classify, mongo_error, server_code, MongoError};
use crate::tls::Handshake;

/// CommandNotFound: a server too old for `hello`.
const COMMAND_NOT_FOUND: i32 = 59;

/// Probes one endpoint (or replica set) over a client of its own.
pub(crate) struct Prober {
    options: ClientOptions,
    client: OnceLock<Client>,
    /// The endpoint's one host, in direct mode.
    direct_host: Option<ServerAddress>,
    /// Whether the last probe failed (or none ran yet).
    suspect: AtomicBool,
    /// The certificate check, with TLS in direct mode.
    handshake: Option<Arc<Handshake>>,
}

/// Why a probe query failed.
enum Failure {
    Driver(mongodb::error::Error),
    NotServing(String),
}

impl From<mongodb::error::Error> for Failure {
    fn from(e: mongodb::error::Error) -> Self {
        Failure::Driver(e)
    }
}

impl Prober {
    pub(crate) fn new(
        options: ClientOptions,
        direct_host: Option<ServerAddress>,
        handshake: Option<Arc<Handshake>>,
    ) -> Self {
        Self {
            options,
            client: OnceLock::new(),
            direct_host,
            suspect: AtomicBool::new(true),
            handshake,
        }
    }

    /// With TLS in direct mode and no handshake accepted since the last
    /// refused one: one now, within `deadline`. Only a refused certificate
    /// fails; a connection problem is left for the driver to report.
    pub(crate) async fn check_certificate(
        &self,
        endpoint: &EndpointId,
        deadline: Instant,
    ) -> Result<(), Error> {
        let Some(handshake) = self.handshake.as_ref().filter(|h| !h.verified()) else {
            return Ok(());
        };
        match tokio::time::timeout_at(deadline, handshake.check(endpoint)).await {
            Ok(Err(refused)) => Err(refused),
            Ok(Ok(_)) | Err(_) => Ok(()),
        }
    }

    fn client(&self, endpoint: &EndpointId) -> Result<&Client, Error> {
        if let Some(client) = self.client.get() {
            return Ok(client);
        }
        let client = crate::backend::new_client(endpoint, self.options.clone())?;
        Ok(self.client.get_or_init(|| client))
    }

    /// Shuts the probe client down, if it was ever started.
    pub(crate) async fn shutdown(&self) {
        if let Some(client) = self.client.get() {
            client.clone().shutdown().await;
        }
    }

    /// Runs one probe, all of it within `timeout`.
    pub(crate) async fn probe(
        &self,
        endpoint: &EndpointId,
        timeout: Duration,
    ) -> Result<Probe, Error> {
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, self.run(endpoint)).await {
            Ok(result) => result,
            Err(_) => Err(Error::ProbeTimeout {
                endpoint: endpoint.clone(),
                elapsed: started.elapsed(),
            }),
        };
        self.suspect.store(result.is_err(), Ordering::Relaxed);
        result
    }

    async fn run(&self, endpoint: &EndpointId) -> Result<Probe, Error> {
        let client = self.client(endpoint)?;
        if self.suspect.load(Ordering::Relaxed) {
            self.reachable(endpoint).await?;
        }
        let set_mode = self.direct_host.is_none();
        match query(client, set_mode).await {
            Ok(probe) => return Ok(probe),
            Err(Failure::Driver(e)) if is_network(&e) => {
                // A pooled connection from before a restart, or a server that
                // went away: look before trying once more.
                tracing::debug!(%endpoint, kind = %classify(&e), "probe failed on the network; retrying once");
                self.reachable(endpoint).await?;
            }
            Err(failure) => return Err(failed(endpoint, failure)),
        }
        query(client, set_mode)
            .await
            .map_err(|failure| failed(endpoint, failure))
    }

    /// Opens (and drops) a TCP connection to the endpoint's host, in direct
    /// mode, so that a refused or unreachable endpoint fails at once; with
    /// TLS, shakes hands on it too, so that a refused certificate does.
    async fn reachable(&self, endpoint: &EndpointId) -> Result<(), Error> {
        if let Some(handshake) = &self.handshake {
            return handshake
                .check(endpoint)
                .await?
                .map_err(|io| Error::backend(endpoint, None, BackendErrorKind::Connect, io));
        }
        let result = match &self.direct_host {
            Some(ServerAddress::Tcp { host, port }) => {
                tokio::net::TcpStream::connect((host.as_str(), port.unwrap_or(27017)))
                    .await
                    .map(drop)
            }
            #[cfg(unix)]
            Some(ServerAddress::Unix { path }) => {
                tokio::net::UnixStream::connect(path).await.map(drop)
            }
            _ => Ok(()),
        };
        result.map_err(|io| Error::backend(endpoint, None, BackendErrorKind::Connect, io))
    }
}

fn is_network(e: &mongodb::error::Error) -> bool {
    matches!(
        classify(e),
        BackendErrorKind::Connect | BackendErrorKind::Io
    )
}

fn failed(endpoint: &EndpointId, failure: Failure) -> Error {
    match failure {
        Failure::Driver(e) => mongo_error(endpoint, None, e),
        Failure::NotServing(state) => Error::backend(
            endpoint,
            None,
            BackendErrorKind::Connect,
            MongoError::NotServing { state },
        ),
    }
}

/// `hello` (or legacy `isMaster`), then `buildInfo`, then the lag on a
/// secondary.
async fn query(client: &Client, set_mode: bool) -> Result<Probe, Failure> {
    let admin = client.database("admin");
    // In replica-set mode the driver picks the node: the primary while there is
    // one, else a secondary. A direct client has only its one node.
    let selection = set_mode.then(|| {
        SelectionCriteria::ReadPreference(ReadPreference::PrimaryPreferred { options: None })
    });
    let started = Instant::now();
    let hello = match admin
        .run_command(doc! { "hello": 1 })
        .optional(selection.clone(), |a, s| a.selection_criteria(s))
        .await
    {
        Err(e) if server_code(&e) == Some(COMMAND_NOT_FOUND) => {
            admin
                .run_command(doc! { "isMaster": 1 })
                .optional(selection.clone(), |a, s| a.selection_criteria(s))
                .await?
        }
        other => other?,
    };
    let rtt = started.elapsed();
    let role = role(&hello).map_err(Failure::NotServing)?;
    let version = match admin
        .run_command(doc! { "buildInfo": 1 })
        .optional(selection, |a, s| a.selection_criteria(s))
        .await
    {
        Ok(info) => info.get_str("version").ok().map(str::to_owned),
        Err(e) if is_network(&e) => return Err(e.into()),
        Err(_) => None,
    };
    let lag = match role {
        Role::Replica if !set_mode => replica_lag(client).await,
        _ => None,
    };
    let mut probe = Probe::new(role, rtt);
    probe.lag = lag;
    probe.version = version;
    probe.history = history(&hello);
    Ok(probe)
}

/// A replica-set primary's election, from its `hello` reply: `setName`,
/// `electionId` and `setVersion` (the MongoDB server discovery specification
/// orders primaries by the last two). `None` for a standalone server, a
/// mongos or a secondary, which report no election.
pub(crate) fn history(hello: &Document) -> Option<History> {
    let set = hello.get_str("setName").ok()?.to_owned();
    let election_id = hello.get_object_id("electionId").ok()?.bytes();
    let set_version = match hello.get("setVersion")? {
        Bson::Int32(v) => i64::from(*v),
        Bson::Int64(v) => *v,
        _ => return None,
    };
    Some(History::Election {
        set,
        election_id,
        set_version,
    })
}

/// The role a `hello` reply describes: a writable primary (a standalone server
/// or mongos included) is [`Role::Primary`], a secondary [`Role::Replica`];
/// anything else (arbiter, recovering, starting up) is not serving.
pub(crate) fn role(hello: &Document) -> Result<Role, String> {
    let flag = |key: &str| hello.get_bool(key).unwrap_or(false);
    if flag("isWritablePrimary") || flag("ismaster") {
        return Ok(Role::Primary);
    }
    if flag("secondary") {
        return Ok(Role::Replica);
    }
    Err(if flag("arbiterOnly") {
        "arbiter".to_owned()
    } else if flag("isreplicaset") {
        "replica set member without a configuration".to_owned()
    } else {
        "recovering or starting up".to_owned()
    })
}

/// How far this secondary's last applied write is behind the primary's, from
/// `replSetGetStatus` (which needs the `clusterMonitor` role). `None` when the
/// command is refused or no primary is listed.
async fn replica_lag(client: &Client) -> Option<Duration> {
    let status = client
        .database("admin")
        .run_command(doc! { "replSetGetStatus": 1 })
        .await
        .ok()?;
    lag_from_status(&status)
}

/// The lag in a `replSetGetStatus` reply: the primary member's `optimeDate`
/// minus the one marked `self`, never negative.
pub(crate) fn lag_from_status(status: &Document) -> Option<Duration> {
    let members = status.get_array("members").ok()?;
    let members = members.iter().filter_map(Bson::as_document);
    let mut own = None;
    let mut primary = None;
    for member in members {
        let optime = member.get_datetime("optimeDate").ok().copied();
        if member.get_bool("self").unwrap_or(false) {
            own = optime;
        }
        let is_primary = member.get_str("stateStr").is_ok_and(|s| s == "PRIMARY")
            || matches!(member.get("state"), Some(Bson::Int32(1) | Bson::Int64(1)));
        if is_primary {
            primary = optime;
        }
    }
    let behind = primary?.timestamp_millis() - own?.timestamp_millis();
    Some(Duration::from_millis(u64::try_from(behind).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::DateTime;

    #[test]
    fn roles_follow_the_hello_reply() {
        assert_eq!(role(&doc! { "isWritablePrimary": true }), Ok(Role::Primary));
        assert_eq!(
            role(&doc! { "ismaster": true, "msg": "isdbgrid" }),
            Ok(Role::Primary)
        );
        assert_eq!(
            role(&doc! { "isWritablePrimary": false, "secondary": true, "setName": "rs0" }),
            Ok(Role::Replica)
        );
        assert!(
            role(&doc! { "isWritablePrimary": false, "arbiterOnly": true })
                .unwrap_err()
                .contains("arbiter")
        );
        assert!(role(&doc! { "isWritablePrimary": false }).is_err());
    }

    #[test]
    fn a_set_primary_reports_its_election() {
        use mongodb::bson::oid::ObjectId;
        let id = ObjectId::from_bytes([0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 3]);
        let hello =
            doc! { "isWritablePrimary": true, "setName": "rs0", "electionId": id, "setVersion": 2 };
        assert_eq!(
            history(&hello),
            Some(History::Election {
                set: "rs0".into(),
                election_id: id.bytes(),
                set_version: 2
            })
        );
        assert_eq!(
            history(&doc! { "isWritablePrimary": true }),
            None,
            "a standalone server"
        );
        assert_eq!(
            history(&doc! { "secondary": true, "setName": "rs0", "setVersion": 2 }),
            None
        );
    }

    #[test]
    fn lag_is_primary_optime_minus_own() {
        let at = |ms: i64| Bson::DateTime(DateTime::from_millis(ms));
        let status = doc! { "members": [
            { "name": "a", "stateStr": "PRIMARY", "state": 1, "optimeDate": at(10_500) },
            { "name": "b", "stateStr": "SECONDARY", "state": 2, "optimeDate": at(10_000), "self": true },
        ] };
        assert_eq!(lag_from_status(&status), Some(Duration::from_millis(500)));
        // A secondary that is ahead of a stale primary entry is not behind.
        let ahead = doc! { "members": [
            { "stateStr": "PRIMARY", "optimeDate": at(1_000) },
            { "stateStr": "SECONDARY", "optimeDate": at(2_000), "self": true },
        ] };
        assert_eq!(lag_from_status(&ahead), Some(Duration::ZERO));
        let no_primary = doc! { "members": [
            { "stateStr": "SECONDARY", "optimeDate": at(2_000), "self": true },
        ] };
        assert_eq!(lag_from_status(&no_primary), None);
        assert_eq!(lag_from_status(&doc! { "ok": 1, "result": [] }), None);
    }
}
