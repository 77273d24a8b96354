//! Causal tokens on MongoDB: operation times in a replica set.
//!
//! This is what the driver's causally consistent sessions do, made to travel
//! between requests and endpoints: a session remembers the `operationTime`
//! of its last write and sends it with its next read as
//! `readConcern: {afterClusterTime: <time>}`, which a secondary answers only
//! once it has applied that time. Here the position travels in a
//! [`CausalToken`] instead of a session object, and the router picks the
//! node.
//!
//! - **The token** of a write is the primary's last applied operation,
//!   `hello`'s `lastWrite.opTime` (`{ts, t}`: its cluster time and election
//!   term), read after the write was answered (one round trip on the
//!   backend's client, which the write's acknowledgement already put past
//!   it), with the replica set's name. A server outside any replica set
//!   (a standalone `mongod`, the test bed's stand-in) reports no
//!   `lastWrite`: [`CausalError::Unsupported`].
//! - **A secondary** has applied a token when it answers a read sent with
//!   `afterClusterTime` at the token's time, bounded by a short `maxTimeMS`
//!   so that the router, not the server, decides how long to wait: an
//!   expired wait (`MaxTimeMSExpired`), or a token past the node's own cluster
//!   time (`InvalidOptions`: it has not even heard of that time yet), is
//!   [`Coverage::NotYet`]. The read is a `find` on a collection of the
//!   handle's own namespace (the tenant's database, its prefixed collection,
//!   or the shared one with the tenant condition), so it reads nothing and
//!   reaches nothing outside the scope. What the handle reads next comes from
//!   the same node (one backend per member, `directConnection`), whose
//!   snapshot only moves forward.
//! - **The primary** is asked with `hello`: another set's name is
//!   [`Coverage::Never`]; on the token's term, its last write at or past the
//!   token's time is covered, and before it `NotYet` (the router refuses it
//!   as [`CausalError::Future`](switchyard_core::CausalError::Future)); a
//!   term before the token's never wrote it (`NotYet`, so `Future`).
//!
//! # Across an election
//!
//! A primary of a later term holds the token's write only if the write was
//! in its log when it won. Where the primary's `replSetGetStatus` is
//! readable (the `clusterMonitor` role) and the token is from the term
//! just before, `electionCandidateMetrics.lastSeenOpTimeAtElection` says
//! exactly that: a token at or before it is covered, one after it was lost
//! in the election ([`Coverage::Never`], which the router refuses as
//! [`CausalError::Lost`](switchyard_core::CausalError::Lost)). Otherwise (no
//! such role, or two elections since) the primary covers a token its log has
//! passed, which is what MongoDB's own causal sessions do; so does a
//! secondary, which cannot tell terms from a read. Writes with
//! `w: "majority"` survive every election, and their tokens are then exact.
//!
//! # One backend for the whole set
//!
//! With [`Topology::ReplicaSet`](crate::Topology::ReplicaSet) the driver
//! picks the node of each operation, so a handle's reads follow the URL's
//! read preference rather than the node that was asked. Token reads there
//! are honoured only when that preference is `primary` (the default), and
//! refused with [`CausalError::Unsupported`] otherwise.

use std::time::Duration;

use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::options::{ReadPreference, SelectionCriteria};
use switchyard_core::{Backend, CausalBackend, CausalError, CausalToken, Coverage, Error, History};

use crate::backend::MongoBackend;
use crate::config::Topology;
use crate::conn::{Confinement, MongoConn};
use crate::error::{mongo_error, server_code, MongoError};

/// The collection a secondary's confirmation reads (in the handle's
/// namespace); it need not exist.
const PROBE_COLLECTION: &str = "switchyard_causal";

/// How long a secondary may hold a confirmation before answering that it
/// has not applied the token yet; the router asks again.
const CONFIRM_WAIT: Duration = Duration::from_millis(5);

/// `MaxTimeMSExpired`: the node did not apply the time within `maxTimeMS`.
const MAX_TIME_EXPIRED: i32 = 50;
/// `InvalidOptions`: `afterClusterTime` past the node's own cluster time.
const INVALID_OPTIONS: i32 = 72;

impl CausalBackend for MongoBackend {
    async fn written(
        &self,
        conn: &mut MongoConn,
        _line: Option<&History>,
    ) -> Result<History, Error> {
        let hello = conn.hello().await?;
        last_write(&hello).ok_or_else(|| self.unsupported())
    }

    async fn confirm(
        &self,
        conn: &mut MongoConn,
        token: &CausalToken,
        line: Option<&History>,
    ) -> Result<Coverage, Error> {
        let &History::OpTime { time, .. } = token.mark() else {
            return Ok(Coverage::Never);
        };
        if self.config().topology == Topology::ReplicaSet {
            if !self.reads_from_primary() {
                return Err(self.unsupported());
            }
            return self.confirm_on_primary(conn, token).await;
        }
        match line {
            // What a replica-set primary's probe reports.
            Some(History::Election { .. }) => self.confirm_on_primary(conn, token).await,
            _ => conn.read_after(time).await,
        }
    }
}

impl MongoBackend {
    fn unsupported(&self) -> Error {
        Error::Causal {
            cluster: self.endpoint().to_string(),
            reason: CausalError::Unsupported,
        }
    }

    /// Whether the set-mode client reads from the primary.
    fn reads_from_primary(&self) -> bool {
        matches!(
            self.client_options().selection_criteria,
            None | Some(SelectionCriteria::ReadPreference(ReadPreference::Primary))
        )
    }

    async fn confirm_on_primary(
        &self,
        conn: &MongoConn,
        token: &CausalToken,
    ) -> Result<Coverage, Error> {
        let hello = conn.hello().await?;
        let Some(applied) = last_write(&hello) else {
            return Ok(Coverage::Never);
        };
        match primary_coverage(token, &applied) {
            Elected::Decided(coverage) => Ok(coverage),
            Elected::After => {
                let status = conn.replication_status().await;
                Ok(election_coverage(token, &applied, status.as_ref()))
            }
        }
    }
}

impl MongoConn {
    /// `hello` on the handle's node (the primary, in set mode).
    async fn hello(&self) -> Result<Document, Error> {
        self.raw_client()
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|e| mongo_error(self.endpoint(), self.tenant(), e))
    }

    /// `replSetGetStatus`, where the backend's user may run it.
    async fn replication_status(&self) -> Option<Document> {
        self.raw_client()
            .database("admin")
            .run_command(doc! { "replSetGetStatus": 1 })
            .await
            .ok()
    }

    /// Whether this handle's node has applied `time`: a `find` in the
    /// handle's own namespace, sent with `afterClusterTime`.
    async fn read_after(&self, time: u64) -> Result<Coverage, Error> {
        let (database, command) = confirmation(&self.confinement, &self.settings().database, time)
            .map_err(|e| crate::error::rejected(self.endpoint(), self.tenant(), e))?;
        let answer = self
            .raw_client()
            .database(database)
            .run_command(command)
            .selection_criteria(SelectionCriteria::ReadPreference(
                ReadPreference::PrimaryPreferred { options: None },
            ))
            .await;
        match answer {
            // Only a replica-set member keeps operation times; another
            // server answers the read without having applied anything.
            Ok(reply) if reply.contains_key("operationTime") => Ok(Coverage::Covered),
            Ok(_) => Ok(Coverage::Never),
            Err(e) if matches!(server_code(&e), Some(MAX_TIME_EXPIRED | INVALID_OPTIONS)) => {
                Ok(Coverage::NotYet)
            }
            Err(e) => Err(mongo_error(self.endpoint(), self.tenant(), e)),
        }
    }
}

/// The database and command of a confirmation read at `time` under
/// `confinement` (with `shared` the backend's shared database): a `find` of
/// at most one `_id` on a collection of the scope's own namespace, with the
/// tenant condition for a row-level scope.
fn confirmation<'a>(
    confinement: &'a Confinement,
    shared: &'a str,
    time: u64,
) -> Result<(&'a str, Document), MongoError> {
    let (database, collection) = confinement.namespace(shared, PROBE_COLLECTION)?;
    let filter = match confinement {
        Confinement::Row(guard) => guard.condition(),
        _ => Document::new(),
    };
    let command = doc! {
        "find": collection,
        "filter": filter,
        "projection": { "_id": 1 },
        "limit": 1,
        "singleBatch": true,
        "readConcern": { "level": "local", "afterClusterTime": timestamp(time) },
        "maxTimeMS": i64::try_from(CONFIRM_WAIT.as_millis()).unwrap_or(5),
    };
    Ok((database, command))
}

/// A BSON timestamp from its 64-bit form.
fn timestamp(time: u64) -> Timestamp {
    Timestamp {
        time: u32::try_from(time >> 32).unwrap_or(u32::MAX),
        increment: u32::try_from(time & 0xFFFF_FFFF).unwrap_or(u32::MAX),
    }
}

/// An operation time `{ts, t}` as a position in `set`.
fn op_time(set: &str, optime: &Document) -> Option<History> {
    let ts = optime.get_timestamp("ts").ok()?;
    let term = match optime.get("t")? {
        Bson::Int64(t) => u64::try_from(*t).ok()?,
        Bson::Int32(t) => u64::try_from(*t).ok()?,
        _ => return None,
    };
    Some(History::OpTime {
        set: set.to_owned(),
        term,
        time: u64::from(ts.time) << 32 | u64::from(ts.increment),
    })
}

/// The node's last applied operation, from its `hello` reply
/// (`setName`, `lastWrite.opTime`); `None` outside a replica set.
pub(crate) fn last_write(hello: &Document) -> Option<History> {
    let set = hello.get_str("setName").ok()?;
    let optime = hello
        .get_document("lastWrite")
        .ok()?
        .get_document("opTime")
        .ok()?;
    op_time(set, optime)
}

/// What a primary's own last write says of a token.
#[derive(Debug, PartialEq, Eq)]
enum Elected {
    Decided(Coverage),
    /// The primary was elected after the token's term: it depends on what
    /// it held when it won.
    After,
}

fn primary_coverage(token: &CausalToken, applied: &History) -> Elected {
    let (
        History::OpTime { set, term, .. },
        History::OpTime {
            set: own, term: t, ..
        },
    ) = (token.mark(), applied)
    else {
        return Elected::Decided(Coverage::Never);
    };
    if set != own {
        Elected::Decided(Coverage::Never)
    } else if t > term {
        Elected::After
    } else {
        // The token's term (its time decides) or a term before it, which
        // never wrote it.
        Elected::Decided(token.covered_by(applied))
    }
}

/// A primary elected after the token's term: with the election's metrics,
/// covered up to what it held when it won; without them (or two elections
/// on), as far as its log reaches.
fn election_coverage(
    token: &CausalToken,
    applied: &History,
    status: Option<&Document>,
) -> Coverage {
    let History::OpTime { set, term, time } = token.mark() else {
        return Coverage::Never;
    };
    let held = status
        .and_then(|s| s.get_document("electionCandidateMetrics").ok())
        .and_then(|m| m.get_document("lastSeenOpTimeAtElection").ok())
        .and_then(|optime| op_time(set, optime));
    if let Some(History::OpTime {
        term: t, time: at, ..
    }) = held
    {
        if t == *term {
            return if at >= *time {
                Coverage::Covered
            } else {
                Coverage::Never
            };
        }
    }
    match applied {
        History::OpTime { time: at, .. } if at >= time => Coverage::Covered,
        _ => Coverage::NotYet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optime(seconds: u32, increment: u32, term: i64) -> Document {
        doc! { "ts": Timestamp { time: seconds, increment }, "t": term }
    }

    fn at(set: &str, term: u64, seconds: u64, increment: u64) -> History {
        History::OpTime {
            set: set.into(),
            term,
            time: seconds << 32 | increment,
        }
    }

    fn token(set: &str, term: u64, seconds: u64, increment: u64) -> CausalToken {
        CausalToken::new("catalog", at(set, term, seconds, increment)).expect("a position")
    }

    #[test]
    fn a_write_is_the_primarys_last_applied_operation() {
        let hello = doc! {
            "isWritablePrimary": true,
            "setName": "rs0",
            "lastWrite": { "opTime": optime(1_764_470_000, 3, 2), "majorityOpTime": optime(1, 1, 2) },
        };
        assert_eq!(last_write(&hello), Some(at("rs0", 2, 1_764_470_000, 3)));
        let legacy_term = doc! { "setName": "rs0", "lastWrite": { "opTime": { "ts": Timestamp { time: 9, increment: 1 }, "t": 4_i32 } } };
        assert_eq!(last_write(&legacy_term), Some(at("rs0", 4, 9, 1)));
        // A standalone server (the stand-in's reply), no lastWrite, no term.
        for outside in [
            doc! { "isWritablePrimary": true, "maxWireVersion": 25 },
            doc! { "setName": "rs0", "isWritablePrimary": true },
            doc! { "setName": "rs0", "lastWrite": { "opTime": { "ts": Timestamp { time: 9, increment: 1 } } } },
            doc! { "setName": "rs0", "lastWrite": { "opTime": optime(9, 1, -1) } },
        ] {
            assert_eq!(last_write(&outside), None, "{outside}");
        }
    }

    #[test]
    fn a_primary_of_the_tokens_term_covers_what_it_has_written() {
        let applied = at("rs0", 2, 100, 5);
        let decided = |t: CausalToken| primary_coverage(&t, &applied);
        assert_eq!(
            decided(token("rs0", 2, 100, 5)),
            Elected::Decided(Coverage::Covered)
        );
        assert_eq!(
            decided(token("rs0", 2, 99, 9)),
            Elected::Decided(Coverage::Covered)
        );
        // Ahead of the primary: the router refuses it as Future.
        assert_eq!(
            decided(token("rs0", 2, 100, 6)),
            Elected::Decided(Coverage::NotYet)
        );
        // A term the set has not reached: never written here (Future).
        assert_eq!(
            decided(token("rs0", 3, 1, 0)),
            Elected::Decided(Coverage::NotYet)
        );
        assert_eq!(
            decided(token("rs1", 2, 1, 0)),
            Elected::Decided(Coverage::Never)
        );
        assert_eq!(decided(token("rs0", 1, 1, 0)), Elected::After);
    }

    #[test]
    fn after_an_election_the_primary_covers_only_what_it_held_when_it_won() {
        let applied = at("rs0", 3, 200, 0);
        let status = doc! { "electionCandidateMetrics": {
            "electionTerm": 3_i64,
            "lastSeenOpTimeAtElection": optime(150, 2, 2),
        } };
        let elected = |t: CausalToken, s: Option<&Document>| election_coverage(&t, &applied, s);
        assert_eq!(
            elected(token("rs0", 2, 150, 2), Some(&status)),
            Coverage::Covered
        );
        assert_eq!(
            elected(token("rs0", 2, 120, 0), Some(&status)),
            Coverage::Covered
        );
        // Written by the old primary after what the new one had: lost.
        assert_eq!(
            elected(token("rs0", 2, 150, 3), Some(&status)),
            Coverage::Never
        );
        assert_eq!(
            elected(token("rs0", 2, 190, 0), Some(&status)),
            Coverage::Never
        );
        // Two elections on, or no clusterMonitor role: as far as the log reaches.
        assert_eq!(
            elected(token("rs0", 1, 190, 0), Some(&status)),
            Coverage::Covered
        );
        assert_eq!(elected(token("rs0", 2, 190, 0), None), Coverage::Covered);
        assert_eq!(elected(token("rs0", 2, 201, 0), None), Coverage::NotYet);
    }

    #[test]
    fn a_confirmation_reads_only_inside_the_tenants_own_namespace() {
        use std::sync::Arc;
        use switchyard_core::TenantId;

        use crate::row::RowGuard;

        let tenant = TenantId::new("acme").unwrap();
        let time = 1_764_470_000_u64 << 32 | 7;
        let scopes = [
            (Confinement::Unscoped, "app", "switchyard_causal", doc! {}),
            (
                Confinement::Database {
                    tenant: tenant.clone(),
                    database: Arc::from("tenant_acme"),
                },
                "tenant_acme",
                "switchyard_causal",
                doc! {},
            ),
            (
                Confinement::Prefix {
                    tenant: tenant.clone(),
                    prefix: Arc::from("tenant_acme"),
                },
                "app",
                "tenant_acme__switchyard_causal",
                doc! {},
            ),
            (
                Confinement::Row(RowGuard::new(Arc::from("tenant_id"), tenant.clone())),
                "app",
                "switchyard_causal",
                doc! { "tenant_id": "acme" },
            ),
        ];
        for (confinement, database, collection, filter) in scopes {
            let (db, command) = confirmation(&confinement, "app", time).unwrap();
            assert_eq!(db, database, "{confinement:?}");
            assert_eq!(command.get_str("find").unwrap(), collection);
            assert_eq!(command.get_document("filter").unwrap(), &filter);
            let concern = command.get_document("readConcern").unwrap();
            assert_eq!(
                concern.get_timestamp("afterClusterTime").unwrap(),
                timestamp(time)
            );
            assert_eq!(command.get_i64("maxTimeMS").unwrap(), 5);
        }
    }

    #[test]
    fn timestamps_keep_seconds_and_increment() {
        let time = 1_764_470_000_u64 << 32 | 7;
        assert_eq!(
            timestamp(time),
            Timestamp {
                time: 1_764_470_000,
                increment: 7
            }
        );
    }
}
