//! Which primary writes go to, decided by the engines' own histories, and
//! which primaries are fenced.
//!
//! A failover leaves old primaries behind: killed and restarted, a PostgreSQL
//! primary comes back on its old timeline, a Redis master comes back empty on
//! a fresh replication id. Were writes given to whichever primary the router
//! saw first (or longest), one probe missed by the promoted node would hand
//! them back to the stale one. So every primary is placed by the history its
//! probe reports ([`History`]) relative to the **line** writes last followed:
//!
//! - a primary on that line, or ahead of it (a later timeline, a replication
//!   id that names the line as the one it replaced, a later election), may
//!   take writes; of several, the one ahead of all others does;
//! - a primary behind that line, or on a line unrelated to it, is **fenced**:
//!   no writes, no reads, until it is demoted or an operator names it
//!   ([`Cluster::unfence`](crate::Cluster::unfence)), which makes its line the
//!   one writes follow;
//! - primaries that nothing orders (no line known yet and unrelated histories,
//!   two primaries on one line) are a **split brain**: writes are refused with
//!   [`Error::SplitBrain`](switchyard_core::Error::SplitBrain), never guessed.
//!
//! Engines that report no history (or endpoints whose probe did not) are
//! ordered only by incumbency: the endpoint writes went to keeps them while it
//! is a primary; another primary takes them only once it is the only one.
//!
//! The same comparison tells whether a replica follows the writer's line
//! ([`follows`]): one that follows an older or unrelated line (an orphaned
//! standby, a replica resynced from a fenced master) serves no reads that need
//! freshness.
//!
//! This is the ordering the MongoDB server discovery specification applies to
//! `electionId`/`setVersion`, extended to PostgreSQL timelines and Redis
//! replication ids. Everything here is a pure function of its arguments.

use switchyard_core::{EndpointId, History};

/// How one history stands relative to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// The same line (positions aside).
    Same,
    /// A later line that descends from the other.
    Ahead,
    /// An earlier line the other descends from.
    Behind,
    /// No common line, or no way to tell.
    Unrelated,
}

/// Where `a` stands relative to `b`.
pub(crate) fn order(a: &History, b: &History) -> Order {
    use std::cmp::Ordering::{Equal, Greater, Less};
    match (a, b) {
        (
            History::Timeline {
                system: sa,
                timeline: ta,
                ..
            },
            History::Timeline {
                system: sb,
                timeline: tb,
                ..
            },
        ) if sa == sb => match ta.cmp(tb) {
            Greater => Order::Ahead,
            Less => Order::Behind,
            Equal => Order::Same,
        },
        (
            History::Lineage {
                id: ia,
                previous: pa,
                ..
            },
            History::Lineage {
                id: ib,
                previous: pb,
                ..
            },
        ) => {
            if ia == ib {
                Order::Same
            } else if pa.as_ref() == Some(ib) {
                Order::Ahead
            } else if pb.as_ref() == Some(ia) {
                Order::Behind
            } else {
                Order::Unrelated
            }
        }
        (
            History::Election {
                set: sa,
                election_id: ea,
                set_version: va,
            },
            History::Election {
                set: sb,
                election_id: eb,
                set_version: vb,
            },
        ) if sa == sb => match (ea, va).cmp(&(eb, vb)) {
            Greater => Order::Ahead,
            Less => Order::Behind,
            Equal => Order::Same,
        },
        _ => Order::Unrelated,
    }
}

/// The line writes last followed: the endpoint they went to and the history
/// it last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub writer: EndpointId,
    pub history: Option<History>,
}

/// A primary standing for election.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Primary<'a> {
    pub id: &'a EndpointId,
    pub history: Option<&'a History>,
}

/// What an election decided, as indices into the primaries given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Election {
    /// The primary writes go to.
    pub writer: Option<usize>,
    /// Primaries behind the line, or off it: no writes, no reads.
    pub fenced: Vec<usize>,
    /// Primaries nothing orders: writes are refused while there are any.
    pub split_brain: Vec<usize>,
}

/// Where a primary stands relative to the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// On the line or ahead of it: may take writes.
    Eligible,
    /// Behind or off the line: fenced.
    Stale,
}

fn standing(p: &Primary<'_>, line: Option<&Line>) -> Standing {
    let Some(line) = line else {
        return Standing::Eligible;
    };
    let incumbent = p.id == &line.writer;
    match (p.history, &line.history) {
        (Some(h), Some(lh)) => match order(h, lh) {
            Order::Same | Order::Ahead => Standing::Eligible,
            Order::Behind => Standing::Stale,
            // The writer's own endpoint back on a new line (a node restarted
            // without its data): nothing else continues the line it held, so
            // it is no worse than any other candidate.
            Order::Unrelated if incumbent => Standing::Eligible,
            Order::Unrelated => Standing::Stale,
        },
        // Without histories to compare, only incumbency says anything.
        _ => Standing::Eligible,
    }
}

/// Whether `a` is known to be the newer of two eligible primaries.
fn beats(a: &Primary<'_>, b: &Primary<'_>, line: Option<&Line>) -> bool {
    match (a.history, b.history) {
        (Some(ha), Some(hb)) => match order(ha, hb) {
            Order::Ahead => true,
            // One of them is the incumbent back on a new line (see
            // `standing`): the one that continues the line wins.
            Order::Unrelated => line.and_then(|l| l.history.as_ref()).is_some_and(|lh| {
                let continues = |h: &History| matches!(order(h, lh), Order::Same | Order::Ahead);
                continues(ha) && !continues(hb)
            }),
            _ => false,
        },
        // No history on one side: incumbency decides.
        _ => line.is_some_and(|l| a.id == &l.writer),
    }
}

/// Elects the writer among `primaries` (each up and admitted or half-open),
/// relative to the `line` writes last followed.
pub(crate) fn elect(primaries: &[Primary<'_>], line: Option<&Line>) -> Election {
    let mut election = Election::default();
    let mut eligible = Vec::new();
    for (i, p) in primaries.iter().enumerate() {
        match standing(p, line) {
            Standing::Eligible => eligible.push(i),
            Standing::Stale => election.fenced.push(i),
        }
    }
    let winner = eligible.iter().copied().find(|&i| {
        eligible
            .iter()
            .all(|&j| j == i || beats(&primaries[i], &primaries[j], line))
    });
    match winner {
        Some(w) => {
            election.writer = Some(w);
            election
                .fenced
                .extend(eligible.into_iter().filter(|&i| i != w));
            election.fenced.sort_unstable();
        }
        None => election.split_brain = eligible,
    }
    election
}

/// Whether a replica reporting `history` follows the line writes follow
/// (`line`), as far as anyone can tell: a replica on an older or unrelated
/// line does not, one without history or with no line known is given the
/// benefit of the doubt (its lag still applies).
pub(crate) fn follows(history: Option<&History>, line: Option<&History>) -> bool {
    match (history, line) {
        (Some(h), Some(l)) => order(h, l) == Order::Same,
        _ => true,
    }
}

/// The part of a history that says which line it is on (positions dropped),
/// so that a probe changes routing only when the line changes.
pub(crate) fn line_of(history: &History) -> History {
    match history {
        History::Timeline {
            system, timeline, ..
        } => History::Timeline {
            system: *system,
            timeline: *timeline,
            position: 0,
        },
        History::Lineage { id, previous, .. } => History::Lineage {
            id: id.clone(),
            previous: previous.clone(),
            offset: 0,
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(timeline: u32) -> History {
        History::Timeline {
            system: 7,
            timeline,
            position: 100,
        }
    }

    fn other_system(timeline: u32) -> History {
        History::Timeline {
            system: 8,
            timeline,
            position: 0,
        }
    }

    fn rid(id: &str, previous: Option<&str>) -> History {
        History::Lineage {
            id: id.into(),
            previous: previous.map(Into::into),
            offset: 5,
        }
    }

    fn el(election: u8, set_version: i64) -> History {
        let mut election_id = [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
        election_id[11] = election;
        History::Election {
            set: "rs0".into(),
            election_id,
            set_version,
        }
    }

    #[test]
    fn histories_order_by_the_engines_own_account() {
        use Order::*;
        let other_set = History::Election {
            set: "rs1".into(),
            election_id: [0; 12],
            set_version: 1,
        };
        let table: &[(History, History, Order, &str)] = &[
            (tl(2), tl(1), Ahead, "a promotion starts the next timeline"),
            (
                tl(1),
                tl(2),
                Behind,
                "an old primary restarted on its timeline",
            ),
            (tl(2), tl(2), Same, "one timeline, whatever the positions"),
            (
                other_system(3),
                tl(2),
                Unrelated,
                "another cluster altogether",
            ),
            (
                rid("b", Some("a")),
                rid("a", None),
                Ahead,
                "promoted from a",
            ),
            (
                rid("a", None),
                rid("b", Some("a")),
                Behind,
                "the master b replaced",
            ),
            (
                rid("c", None),
                rid("b", Some("a")),
                Unrelated,
                "a master restarted empty",
            ),
            (
                rid("c", Some("a")),
                rid("b", Some("a")),
                Unrelated,
                "two promotions from a",
            ),
            (
                rid("b", Some("a")),
                rid("b", None),
                Same,
                "a replica following b",
            ),
            (
                el(2, 1),
                el(1, 5),
                Ahead,
                "a later election wins over any version",
            ),
            (
                el(2, 1),
                el(2, 2),
                Behind,
                "same election, older configuration",
            ),
            (el(2, 2), el(2, 2), Same, "the same primary"),
            (other_set, el(2, 2), Unrelated, "another replica set"),
            (
                tl(2),
                rid("a", None),
                Unrelated,
                "different kinds of history",
            ),
        ];
        for (a, b, want, why) in table {
            assert_eq!(order(a, b), *want, "{a} vs {b}: {why}");
        }
    }

    fn ids(n: usize) -> Vec<EndpointId> {
        (0..n).map(|i| EndpointId::new(format!("e{i}"))).collect()
    }

    fn run(histories: &[Option<History>], line: Option<(usize, Option<History>)>) -> Election {
        let ids = ids(histories.len().max(4));
        let primaries: Vec<Primary<'_>> = histories
            .iter()
            .enumerate()
            .map(|(i, h)| Primary {
                id: &ids[i],
                history: h.as_ref(),
            })
            .collect();
        let line = line.map(|(w, history)| Line {
            writer: ids[w].clone(),
            history,
        });
        elect(&primaries, line.as_ref())
    }

    fn writer(w: usize, fenced: &[usize]) -> Election {
        Election {
            writer: Some(w),
            fenced: fenced.to_vec(),
            split_brain: vec![],
        }
    }

    #[test]
    fn the_writer_is_the_newest_primary_by_history_never_by_sight() {
        let split = |s: &[usize], fenced: &[usize]| Election {
            writer: None,
            fenced: fenced.to_vec(),
            split_brain: s.to_vec(),
        };
        let none_fenced = |fenced: &[usize]| Election {
            writer: None,
            fenced: fenced.to_vec(),
            split_brain: vec![],
        };
        #[allow(clippy::type_complexity)]
        let table: Vec<(
            &str,
            Vec<Option<History>>,
            Option<(usize, Option<History>)>,
            Election,
        )> = vec![
            ("one primary", vec![Some(tl(1))], None, writer(0, &[])),
            (
                "promoted standby seen while the old primary still answers",
                vec![Some(tl(1)), Some(tl(2))],
                Some((0, Some(tl(1)))),
                writer(1, &[0]),
            ),
            (
                "old primary back on its timeline, promoted one up",
                vec![Some(tl(1)), Some(tl(2))],
                Some((1, Some(tl(2)))),
                writer(1, &[0]),
            ),
            (
                "old primary back while the promoted one stalls",
                vec![Some(tl(1))],
                Some((1, Some(tl(2)))),
                none_fenced(&[0]),
            ),
            (
                "no line yet: timelines still order",
                vec![Some(tl(1)), Some(tl(2))],
                None,
                writer(1, &[0]),
            ),
            (
                "two primaries on one timeline",
                vec![Some(tl(2)), Some(tl(2))],
                None,
                split(&[0, 1], &[]),
            ),
            (
                "unrelated clusters, no line",
                vec![Some(tl(1)), Some(other_system(1))],
                None,
                split(&[0, 1], &[]),
            ),
            (
                "redis: promoted replica over the old master",
                vec![Some(rid("a", None)), Some(rid("b", Some("a")))],
                Some((0, Some(rid("a", None)))),
                writer(1, &[0]),
            ),
            (
                "redis: old master back empty, promoted one up",
                vec![Some(rid("c", None)), Some(rid("b", Some("a")))],
                Some((1, Some(rid("b", Some("a"))))),
                writer(1, &[0]),
            ),
            (
                "redis: old master back empty while the promoted one stalls",
                vec![Some(rid("c", None))],
                Some((1, Some(rid("b", Some("a"))))),
                none_fenced(&[0]),
            ),
            (
                "redis: the writer itself restarted empty",
                vec![Some(rid("d", None))],
                Some((0, Some(rid("b", Some("a"))))),
                writer(0, &[]),
            ),
            (
                "redis: the writer restarted empty and a stranger",
                vec![Some(rid("d", None)), Some(rid("c", None))],
                Some((0, Some(rid("b", Some("a"))))),
                writer(0, &[1]),
            ),
            (
                "redis: the writer restarted empty and the line's successor",
                vec![Some(rid("d", None)), Some(rid("e", Some("b")))],
                Some((0, Some(rid("b", Some("a"))))),
                writer(1, &[0]),
            ),
            (
                "redis: fresh masters, no line",
                vec![Some(rid("c", None)), Some(rid("d", None))],
                None,
                split(&[0, 1], &[]),
            ),
            (
                "mongo: later election",
                vec![Some(el(1, 1)), Some(el(2, 1))],
                None,
                writer(1, &[0]),
            ),
            (
                "no histories: the incumbent keeps writes",
                vec![None, None],
                Some((0, None)),
                writer(0, &[1]),
            ),
            (
                "no histories: a sole primary takes over",
                vec![None],
                Some((1, None)),
                writer(0, &[]),
            ),
            (
                "no histories, no line, two primaries",
                vec![None, None],
                None,
                split(&[0, 1], &[]),
            ),
            (
                "no primary",
                vec![],
                Some((0, Some(tl(1)))),
                Election::default(),
            ),
        ];
        for (why, histories, line, want) in table {
            assert_eq!(run(&histories, line), want, "{why}");
        }
    }

    #[test]
    fn replicas_follow_only_the_writers_line() {
        assert!(follows(Some(&tl(2)), Some(&tl(2))));
        assert!(
            !follows(Some(&tl(1)), Some(&tl(2))),
            "orphaned on the old timeline"
        );
        assert!(
            !follows(Some(&rid("c", None)), Some(&rid("b", Some("a")))),
            "resynced from a fenced master"
        );
        assert!(
            !follows(Some(&rid("a", None)), Some(&rid("b", Some("a")))),
            "still on the replaced master's line"
        );
        assert!(follows(None, Some(&tl(2))));
        assert!(follows(Some(&tl(1)), None));
        assert_eq!(
            line_of(&tl(3)),
            History::Timeline {
                system: 7,
                timeline: 3,
                position: 0
            }
        );
    }
}
