//! The faults of the failover scenarios, written once over [`Node`]: the
//! engine tests, the `failover` bench and `switchyard demo` inject and undo
//! them through here, each watching the router its own way.

use crate::error::Result;
use crate::node::Node;

/// One fault on a primary and one of its replicas, and how service comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The replica is SIGKILLed; it comes back by a restart.
    KilledReplica,
    /// The replica is SIGSTOPped (connections hang); it comes back by SIGCONT.
    PausedReplica,
    /// The primary is SIGKILLed; the replica is promoted in its place.
    KilledPrimary,
}

impl Fault {
    /// Every fault, in the order the scenarios run them.
    pub const ALL: [Fault; 3] = [
        Fault::KilledReplica,
        Fault::PausedReplica,
        Fault::KilledPrimary,
    ];

    /// `killed_replica`, `paused_replica`, `killed_primary`.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KilledReplica => "killed_replica",
            Fault::PausedReplica => "paused_replica",
            Fault::KilledPrimary => "killed_primary",
        }
    }

    /// What [`inject`](Self::inject) does, for a timeline.
    pub fn injection(self) -> &'static str {
        match self {
            Fault::KilledReplica | Fault::KilledPrimary => "kill (SIGKILL)",
            Fault::PausedReplica => "pause (SIGSTOP)",
        }
    }

    /// What [`recover`](Self::recover) does, for a timeline.
    pub fn recovery(self) -> &'static str {
        match self {
            Fault::KilledReplica => "restart",
            Fault::PausedReplica => "resume (SIGCONT)",
            Fault::KilledPrimary => "promote",
        }
    }

    /// Whether the fault takes the writer away.
    pub fn hits_primary(self) -> bool {
        self == Fault::KilledPrimary
    }

    /// The node the fault hits.
    pub fn victim<'a, N: Node>(self, primary: &'a N, replica: &'a N) -> &'a N {
        if self.hits_primary() {
            primary
        } else {
            replica
        }
    }

    /// Breaks the victim; returns once the fault is in effect (a killed
    /// node's processes are gone).
    pub async fn inject<N: Node>(self, primary: &N, replica: &N) -> Result<()> {
        match self {
            Fault::KilledReplica | Fault::KilledPrimary => {
                self.victim(primary, replica).kill().await
            }
            Fault::PausedReplica => replica.pause().await,
        }
    }

    /// Brings service back: the replica restarted or resumed, or promoted in
    /// the killed primary's place (which stays down).
    pub async fn recover<N: Node>(self, replica: &N) -> Result<()> {
        match self {
            Fault::KilledReplica => replica.restart().await,
            Fault::PausedReplica => replica.resume().await,
            Fault::KilledPrimary => replica.promote().await,
        }
    }
}
