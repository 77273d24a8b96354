//! Where an endpoint stands in its engine's own replication history.
//!
//! A probe reports it so the router can tell, by the engine's own account and
//! never by when it happened to see a node, which of two primaries is the one
//! writes moved to, and whether a replica follows that primary at all. Three
//! shapes cover the engines that keep such a history; each names the engine it
//! was made for only as an example, since core knows no engine:
//!
//! - [`History::Timeline`]: a numbered line that only grows on promotion,
//!   inside one cluster identity (PostgreSQL's system identifier, timeline id
//!   and WAL position);
//! - [`History::Lineage`]: a line named by a random id, where a promoted node
//!   names the line it replaced (Redis's `master_replid`, `master_replid2` and
//!   `master_repl_offset`);
//! - [`History::Election`]: a replica set's election id and configuration
//!   version, ordered as the MongoDB driver specification orders them;
//! - [`History::OpTime`]: one operation in a replica set's log, by the
//!   election term it was written in and its cluster time (MongoDB's oplog
//!   `{ts, t}`). Probes do not report it; it is what a causal token names
//!   where the engine's position is a time rather than a byte offset.
//!
//! How two histories compare is the router's business (one pure function);
//! this module only carries the facts.

use std::fmt;

/// One endpoint's place in its replication history, as its probe saw it.
///
/// On a primary it is the line the primary writes; on a replica, the line the
/// replica follows (and how far it has applied it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum History {
    /// A numbered line inside one cluster identity; a promotion starts the
    /// next number.
    Timeline {
        /// The cluster identity (PostgreSQL: `system_identifier`): two
        /// endpoints with different ones share no history.
        system: u64,
        /// The line (PostgreSQL: the timeline id).
        timeline: u32,
        /// How far along the line (PostgreSQL: a WAL position in bytes).
        position: u64,
    },
    /// A line named by a random id; a node promoted from a line names it as
    /// `previous`.
    Lineage {
        /// The line this node writes or follows (Redis: `master_replid`).
        id: String,
        /// The line a promotion replaced, if any (Redis: `master_replid2`,
        /// absent when it is all zeros).
        previous: Option<String>,
        /// How far along the line (Redis: `master_repl_offset`).
        offset: u64,
    },
    /// An elected primary of a replica set.
    Election {
        /// The replica set's name: different names share no history.
        set: String,
        /// The election id (MongoDB: `electionId`, an ObjectId whose bytes
        /// grow with each election).
        election_id: [u8; 12],
        /// The set's configuration version (MongoDB: `setVersion`).
        set_version: i64,
    },
    /// One operation in a replica set's log.
    OpTime {
        /// The replica set's name: different names share no history.
        set: String,
        /// The election term the operation was written in (MongoDB: the
        /// oplog entry's `t`, also the low 8 bytes of the primary's
        /// `electionId`).
        term: u64,
        /// Its cluster time (MongoDB: the oplog entry's `ts`, a BSON
        /// timestamp as seconds << 32 | increment).
        time: u64,
    },
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            History::Timeline {
                system,
                timeline,
                position,
            } => write!(
                f,
                "system {system} timeline {timeline} at {:X}/{:X}",
                position >> 32,
                position & 0xFFFF_FFFF
            ),
            History::Lineage {
                id,
                previous,
                offset,
            } => {
                write!(f, "replid {id} at {offset}")?;
                match previous {
                    Some(p) => write!(f, " (replaced {p})"),
                    None => Ok(()),
                }
            }
            History::Election {
                set,
                election_id,
                set_version,
            } => {
                write!(f, "set {set} election ")?;
                for b in election_id {
                    write!(f, "{b:02x}")?;
                }
                write!(f, " version {set_version}")
            }
            History::OpTime { set, term, time } => write!(
                f,
                "set {set} term {term} at Timestamp({}, {})",
                time >> 32,
                time & 0xFFFF_FFFF
            ),
        }
    }
}
