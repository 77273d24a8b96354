//! Causal tokens: read-your-writes across replicas.
//!
//! A write hands back a [`CausalToken`] naming the position its engine's
//! replication history reached when the write was done; a read given the
//! token is served only by a node that has applied that position. The token
//! is opaque to the caller, small (under 80 bytes; a MongoDB token adds its
//! replica set's name, so under 200) and travels as a header- and
//! cookie-safe string ([`Display`](fmt::Display) / [`FromStr`]):
//!
//! ```text
//! sy1.<cluster tag>.t.<system>.<timeline>.<position>   (a numbered line: PostgreSQL)
//! sy1.<cluster tag>.l.<line id>.<offset>               (a named line: Redis)
//! sy1.<cluster tag>.o.<set>.<term>.<time>              (an operation time: MongoDB)
//! ```
//!
//! Every number is lower-case hex, and so is the replica set's name (its
//! bytes), which may hold any character. The cluster tag is a hash of the cluster's
//! name, so a token handed to the wrong cluster is refused
//! ([`CausalError::ForeignCluster`]) instead of read against an unrelated
//! history. Tokens are not signed: a forged one can name any position, and
//! the worst it does is a bounded wait and a read from the primary (or
//! [`CausalError::Future`] when the primary has not reached it either).
//!
//! Whether a node has applied a token is [`CausalToken::covered_by`] for what
//! a probe reported, and the engine's own confirmation
//! ([`CausalBackend::confirm`]) for what the node says now.

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use crate::backend::Backend;
use crate::error::Error;
use crate::history::History;

/// The version prefix of the string form.
const PREFIX: &str = "sy1";

/// A line id (Redis `master_replid`) is at most this long.
const MAX_LINE_ID: usize = 64;

/// A replica set's name in a token is at most this many bytes.
const MAX_SET_NAME: usize = 64;

/// A position a write reached, in one cluster's replication history.
///
/// Merge the tokens of one session or tenant with [`merge`](Self::merge): the
/// later position wins.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CausalToken {
    cluster: u32,
    mark: History,
}

/// Why a causal token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum CausalError {
    /// The string is not a token (truncated, altered, another format).
    #[error("not a causal token")]
    Malformed,
    /// The token was made by another cluster, or names another engine
    /// cluster's history (another PostgreSQL system identifier).
    #[error("the causal token belongs to another cluster")]
    ForeignCluster,
    /// The primary itself has not reached the token's position: the token
    /// was forged or comes from a history this cluster never wrote.
    #[error("the causal token names a position the primary has not reached")]
    Future,
    /// The line the token names was replaced before reaching its position:
    /// the write was lost in a failover, and no node holds it.
    #[error("the causal token's write was lost in a failover")]
    Lost,
    /// No node had applied the token within the causal wait, and the
    /// cluster is configured not to fall back to the primary.
    #[error("no replica applied the causal token in time")]
    NotApplied,
    /// The engine keeps no history the router can compare (or the writer
    /// was never probed): no token can be made.
    #[error("this cluster's engine gives no causal position")]
    Unsupported,
}

/// Whether a node has applied a token's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coverage {
    /// It has: a read there sees the write.
    Covered,
    /// Not yet (or not known): it may later.
    NotYet,
    /// It never will: another cluster's history, or (on a primary) a line
    /// the token's write did not survive on.
    Never,
}

impl CausalToken {
    /// A token for `mark` in the cluster named `cluster`; `None` for a
    /// history that names no position ([`History::Election`]). A lineage's
    /// `previous` is dropped: a token names one line.
    pub fn new(cluster: &str, mark: History) -> Option<Self> {
        let mark = match mark {
            History::Timeline { .. } => mark,
            History::OpTime { ref set, .. } if valid_set_name(set) => mark,
            History::Lineage { id, offset, .. } if valid_line_id(&id) => History::Lineage {
                id,
                previous: None,
                offset,
            },
            _ => return None,
        };
        Some(Self {
            cluster: cluster_tag(cluster),
            mark,
        })
    }

    /// The position the token names.
    pub fn mark(&self) -> &History {
        &self.mark
    }

    /// Whether the token was made by the cluster named `cluster`.
    pub fn belongs_to(&self, cluster: &str) -> bool {
        self.cluster == cluster_tag(cluster)
    }

    /// The later of two tokens (`self` earlier, `other` later): on one
    /// numbered line the greater (timeline, position); on one named line the
    /// greater offset; in one replica set the greater (term, time);
    /// otherwise (another line, another cluster) `other`, the one received
    /// last.
    #[must_use]
    pub fn merge(self, other: Self) -> Self {
        if self.cluster != other.cluster {
            return other;
        }
        match (&self.mark, &other.mark) {
            (
                History::Timeline {
                    system: a,
                    timeline: ta,
                    position: pa,
                },
                History::Timeline {
                    system: b,
                    timeline: tb,
                    position: pb,
                },
            ) if a == b && (ta, pa) > (tb, pb) => self,
            (
                History::Lineage {
                    id: a, offset: oa, ..
                },
                History::Lineage {
                    id: b, offset: ob, ..
                },
            ) if a == b && oa > ob => self,
            (
                History::OpTime {
                    set: a,
                    term: ta,
                    time: pa,
                },
                History::OpTime {
                    set: b,
                    term: tb,
                    time: pb,
                },
            ) if a == b && (ta, pa) > (tb, pb) => self,
            _ => other,
        }
    }

    /// Whether a node at `applied` (as a probe reported it) has applied the
    /// token. Conservative: `Covered` only when certain. A named line's
    /// predecessor is `NotYet` here, since only the engine knows where it was
    /// replaced (see [`CausalBackend::confirm`]). An operation time is
    /// covered by a later one of the same term; a later term is `NotYet`
    /// (only the engine knows whether the token's write survived the
    /// election), and a replica set's election (what a primary's probe
    /// reports) says only which set it is.
    pub fn covered_by(&self, applied: &History) -> Coverage {
        match (&self.mark, applied) {
            (
                History::Timeline {
                    system,
                    timeline,
                    position,
                },
                History::Timeline {
                    system: s,
                    timeline: t,
                    position: p,
                },
            ) => {
                if system != s {
                    Coverage::Never
                } else if t >= timeline && p >= position {
                    // Positions continue across a promotion: a later
                    // timeline holds the earlier one up to its fork.
                    Coverage::Covered
                } else {
                    Coverage::NotYet
                }
            }
            (
                History::Lineage { id, offset, .. },
                History::Lineage {
                    id: i, offset: o, ..
                },
            ) => {
                if id == i && o >= offset {
                    Coverage::Covered
                } else {
                    Coverage::NotYet
                }
            }
            (
                History::OpTime { set, term, time },
                History::OpTime {
                    set: s,
                    term: t,
                    time: p,
                },
            ) => {
                if set != s {
                    Coverage::Never
                } else if term == t && p >= time {
                    Coverage::Covered
                } else {
                    Coverage::NotYet
                }
            }
            (History::OpTime { set, .. }, History::Election { set: s, .. }) if set == s => {
                Coverage::NotYet
            }
            _ => Coverage::Never,
        }
    }
}

impl fmt::Display for CausalToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{:x}.", self.cluster)?;
        match &self.mark {
            History::Timeline {
                system,
                timeline,
                position,
            } => write!(f, "t.{system:x}.{timeline:x}.{position:x}"),
            History::Lineage { id, offset, .. } => write!(f, "l.{id}.{offset:x}"),
            History::OpTime { set, term, time } => {
                f.write_str("o.")?;
                for b in set.bytes() {
                    write!(f, "{b:02x}")?;
                }
                write!(f, ".{term:x}.{time:x}")
            }
            // Never constructed (see `new`).
            _ => Ok(()),
        }
    }
}

impl FromStr for CausalToken {
    type Err = CausalError;

    fn from_str(s: &str) -> Result<Self, CausalError> {
        let mut parts = s.split('.');
        let mut next = || parts.next().ok_or(CausalError::Malformed);
        if next()? != PREFIX {
            return Err(CausalError::Malformed);
        }
        let cluster = hex::<u32>(next()?)?;
        let mark = match next()? {
            "t" => History::Timeline {
                system: hex(next()?)?,
                timeline: hex(next()?)?,
                position: hex(next()?)?,
            },
            "l" => {
                let id = next()?;
                if !valid_line_id(id) {
                    return Err(CausalError::Malformed);
                }
                History::Lineage {
                    id: id.to_owned(),
                    previous: None,
                    offset: hex(next()?)?,
                }
            }
            "o" => History::OpTime {
                set: set_name(next()?)?,
                term: hex(next()?)?,
                time: hex(next()?)?,
            },
            _ => return Err(CausalError::Malformed),
        };
        if parts.next().is_some() {
            return Err(CausalError::Malformed);
        }
        Ok(Self { cluster, mark })
    }
}

/// A lower-case hex number, no sign, no prefix, no leading zeros beyond one.
fn hex<T: TryFrom<u64>>(s: &str) -> Result<T, CausalError> {
    let canonical = !s.is_empty()
        && s.len() <= 16
        && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return Err(CausalError::Malformed);
    }
    let n = u64::from_str_radix(s, 16).map_err(|_| CausalError::Malformed)?;
    T::try_from(n).map_err(|_| CausalError::Malformed)
}

/// A replica set's name from its hex form: lower-case pairs of digits that
/// spell a valid name.
fn set_name(s: &str) -> Result<String, CausalError> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        _ => Err(CausalError::Malformed),
    };
    if !s.len().is_multiple_of(2) {
        return Err(CausalError::Malformed);
    }
    let bytes = s
        .as_bytes()
        .chunks(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect::<Result<Vec<u8>, CausalError>>()?;
    let name = String::from_utf8(bytes).map_err(|_| CausalError::Malformed)?;
    if !valid_set_name(&name) {
        return Err(CausalError::Malformed);
    }
    Ok(name)
}

/// A replica set's name: non-empty, short, no control characters.
fn valid_set_name(set: &str) -> bool {
    !set.is_empty() && set.len() <= MAX_SET_NAME && !set.chars().any(char::is_control)
}

/// Redis line ids are 40 hex digits; anything header-safe and short passes.
fn valid_line_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_LINE_ID && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// FNV-1a of the cluster name: a token's cluster tag.
fn cluster_tag(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5_u32, |hash, b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// What an engine adds to [`Backend`] to make and honour causal tokens.
///
/// Implemented by engines whose writes reach a position the router can name
/// ([`History::Timeline`], [`History::Lineage`], [`History::OpTime`]); the
/// router's causal checkouts ask for it.
pub trait CausalBackend: Backend {
    /// The position a write just done on `conn` (committed, answered)
    /// reached on its node. `line` is the node's history as its last probe
    /// saw it, for what the connection cannot cheaply read itself.
    fn written(
        &self,
        conn: &mut Self::Connection,
        line: Option<&History>,
    ) -> impl Future<Output = Result<History, Error>> + Send;

    /// Whether the node behind `conn` has applied `token` now. On a primary,
    /// `NotYet` means the token is ahead of everything written, and `Never`
    /// that its write did not survive a failover.
    fn confirm(
        &self,
        conn: &mut Self::Connection,
        token: &CausalToken,
        line: Option<&History>,
    ) -> impl Future<Output = Result<Coverage, Error>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal(timeline: u32, position: u64) -> History {
        History::Timeline {
            system: 7_300_000_000_000_000_001,
            timeline,
            position,
        }
    }

    fn line(id: &str, offset: u64) -> History {
        History::Lineage {
            id: id.into(),
            previous: None,
            offset,
        }
    }

    const REPLID: &str = "8f1c0d5e3b2a4c6d7e8f9a0b1c2d3e4f5a6b7c8d";

    fn optime(set: &str, term: u64, seconds: u64, increment: u64) -> History {
        History::OpTime {
            set: set.into(),
            term,
            time: seconds << 32 | increment,
        }
    }

    #[test]
    fn an_operation_time_token_round_trips_and_stays_header_safe() {
        let longest = "r".repeat(MAX_SET_NAME);
        for mark in [
            optime("rs0", 3, 1_764_470_000, 7),
            optime("prod set/eu-1 é", u64::MAX, u64::MAX >> 32, 0),
            optime(&longest, 1, 0, 0),
        ] {
            let token = CausalToken::new("orders", mark.clone()).expect("a position");
            let text = token.to_string();
            assert!(text.len() < 200, "{text}");
            assert!(
                text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'),
                "header and cookie safe: {text}"
            );
            assert_eq!(text.parse::<CausalToken>(), Ok(token.clone()));
            assert_eq!(token.mark(), &mark);
        }
        for set in [String::new(), "r".repeat(MAX_SET_NAME + 1), "a\nb".into()] {
            assert!(
                CausalToken::new("orders", optime(&set, 1, 1, 1)).is_none(),
                "{set:?}"
            );
        }
    }

    #[test]
    fn altered_operation_time_strings_are_malformed() {
        let good = CausalToken::new("orders", optime("rs0", 2, 5, 1))
            .expect("a position")
            .to_string();
        assert!(good.contains(".o.727330."), "{good}");
        let cases = [
            good.replace(".727330.", ".72733."),    // odd length
            good.replace(".727330.", ".72733g."),   // not hex
            good.replace(".727330.", ".7273300a."), // a control character
            good.replace(".727330.", ".."),         // empty
            good.replace(".727330.", ".c328."),     // not UTF-8
            good.replace(".727330.", ".727330.2."), // a field too many
            format!("sy1.0.o.{}.1.1", "72".repeat(MAX_SET_NAME + 1)),
            good.to_uppercase(),
        ];
        for case in cases {
            assert_eq!(
                case.parse::<CausalToken>(),
                Err(CausalError::Malformed),
                "{case:?}"
            );
        }
    }

    #[test]
    fn operation_times_merge_and_cover_within_one_set_and_term() {
        let t = |mark| CausalToken::new("orders", mark).expect("a position");
        let early = t(optime("rs0", 2, 100, 1));
        let late = t(optime("rs0", 2, 100, 2));
        let next_term = t(optime("rs0", 3, 90, 1));
        assert_eq!(late.clone().merge(early.clone()), late);
        assert_eq!(early.clone().merge(late.clone()), late);
        // A later term wins even at an earlier time: it descends from the
        // election, which came after.
        assert_eq!(next_term.clone().merge(late.clone()), next_term);
        // Another set: the one received last.
        let other = t(optime("rs1", 9, 999, 0));
        assert_eq!(other.clone().merge(early.clone()), early);

        let token = t(optime("rs0", 2, 100, 5));
        assert_eq!(
            token.covered_by(&optime("rs0", 2, 100, 5)),
            Coverage::Covered
        );
        assert_eq!(
            token.covered_by(&optime("rs0", 2, 101, 0)),
            Coverage::Covered
        );
        assert_eq!(
            token.covered_by(&optime("rs0", 2, 100, 4)),
            Coverage::NotYet
        );
        // A later term: only the engine knows whether the write survived.
        assert_eq!(
            token.covered_by(&optime("rs0", 3, 500, 0)),
            Coverage::NotYet
        );
        assert_eq!(token.covered_by(&optime("rs1", 2, 500, 0)), Coverage::Never);
        let election = |set: &str| History::Election {
            set: set.into(),
            election_id: [0; 12],
            set_version: 1,
        };
        assert_eq!(token.covered_by(&election("rs0")), Coverage::NotYet);
        assert_eq!(token.covered_by(&election("rs1")), Coverage::Never);
        assert_eq!(token.covered_by(&wal(2, 1 << 40)), Coverage::Never);
        let wal_token = t(wal(2, 100));
        assert_eq!(
            wal_token.covered_by(&optime("rs0", 2, 500, 0)),
            Coverage::Never
        );
    }

    #[test]
    fn a_token_round_trips_through_its_string_and_stays_small() {
        for mark in [wal(3, 0x1_6B37_4D48), line(REPLID, 1 << 40), wal(1, 0)] {
            let token = CausalToken::new("orders", mark).expect("a position");
            let text = token.to_string();
            assert!(text.len() < 80, "{text}");
            assert!(
                text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'),
                "header and cookie safe: {text}"
            );
            assert_eq!(text.parse::<CausalToken>(), Ok(token));
        }
        assert!(CausalToken::new(
            "orders",
            History::Election {
                set: "rs".into(),
                election_id: [0; 12],
                set_version: 1
            }
        )
        .is_none());
    }

    #[test]
    fn altered_or_foreign_strings_are_malformed() {
        let good = CausalToken::new("orders", wal(2, 0x2000))
            .expect("a position")
            .to_string();
        let cases = [
            String::new(),
            "sy1".into(),
            good.replace("sy1", "sy2"),
            format!("{good}.0"),
            good.replace(".t.", ".x."),
            good.replace(".2000", ".02000"),
            good.replace(".2000", ".-1"),
            good.replace(".2000", ".1ffffffffffffffff"),
            good.to_uppercase(),
            format!("sy1.0.l.{}.1", "a".repeat(65)),
            "sy1.0.l.ab;cd.1".into(),
            "sy1.0.t.1.100000000.1".into(),
        ];
        for case in cases {
            assert_eq!(
                case.parse::<CausalToken>(),
                Err(CausalError::Malformed),
                "{case:?}"
            );
        }
    }

    #[test]
    fn a_token_knows_its_cluster() {
        let token = CausalToken::new("orders", wal(1, 5)).expect("a position");
        assert!(token.belongs_to("orders"));
        assert!(!token.belongs_to("billing"));
    }

    #[test]
    fn merging_keeps_the_later_position() {
        let t = |mark| CausalToken::new("orders", mark).expect("a position");
        assert_eq!(t(wal(1, 90)).merge(t(wal(1, 10))), t(wal(1, 90)));
        assert_eq!(t(wal(1, 10)).merge(t(wal(1, 90))), t(wal(1, 90)));
        assert_eq!(t(wal(2, 10)).merge(t(wal(1, 90))), t(wal(2, 10)));
        assert_eq!(
            t(line(REPLID, 9)).merge(t(line(REPLID, 3))),
            t(line(REPLID, 9))
        );
        // Another line: the one received last.
        assert_eq!(t(line(REPLID, 9)).merge(t(line("ab", 3))), t(line("ab", 3)));
        let other = CausalToken::new("billing", wal(1, 1)).expect("a position");
        assert_eq!(t(wal(1, 90)).merge(other.clone()), other);
    }

    #[test]
    fn coverage_follows_the_line_and_the_position() {
        let token = CausalToken::new("orders", wal(2, 100)).expect("a position");
        assert_eq!(token.covered_by(&wal(2, 100)), Coverage::Covered);
        assert_eq!(token.covered_by(&wal(3, 120)), Coverage::Covered);
        assert_eq!(token.covered_by(&wal(2, 99)), Coverage::NotYet);
        assert_eq!(token.covered_by(&wal(1, 500)), Coverage::NotYet);
        let foreign = History::Timeline {
            system: 1,
            timeline: 2,
            position: 500,
        };
        assert_eq!(token.covered_by(&foreign), Coverage::Never);
        assert_eq!(token.covered_by(&line(REPLID, 500)), Coverage::Never);

        let token = CausalToken::new("orders", line(REPLID, 100)).expect("a position");
        assert_eq!(token.covered_by(&line(REPLID, 100)), Coverage::Covered);
        assert_eq!(token.covered_by(&line(REPLID, 99)), Coverage::NotYet);
        // A successor line: only the engine knows where it forked.
        let successor = History::Lineage {
            id: "ab".into(),
            previous: Some(REPLID.into()),
            offset: 500,
        };
        assert_eq!(token.covered_by(&successor), Coverage::NotYet);
    }
}
