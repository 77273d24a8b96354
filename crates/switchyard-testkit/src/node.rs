//! One trait over the test bed's replicated servers, so a fault scenario
//! (kill, pause, promote, restart, rejoin) is written once and run per engine.

use std::future::Future;
use std::net::SocketAddr;

use crate::error::Result;
use crate::postgres::PgNode;
use crate::redis::RedisNode;

/// A PostgreSQL or Redis server of the test bed, as fault scenarios use it.
pub trait Node: Send + Sync {
    /// `127.0.0.1:PORT`.
    fn addr(&self) -> SocketAddr;
    /// SIGKILL: connections are refused until a restart.
    fn kill(&self) -> impl Future<Output = Result<()>> + Send;
    /// SIGSTOP: connections hang.
    fn pause(&self) -> impl Future<Output = Result<()>> + Send;
    /// SIGCONT after [`pause`](Node::pause).
    fn resume(&self) -> impl Future<Output = Result<()>> + Send;
    /// Kill, then start again in the role it last had: an old primary comes
    /// back as an independent primary (a split brain).
    fn restart(&self) -> impl Future<Output = Result<()>> + Send;
    /// Makes a replica a primary.
    fn promote(&self) -> impl Future<Output = Result<()>> + Send;
    /// What an operator does after a failover: makes this node a replica of
    /// `primary` (PostgreSQL: re-point a standby that can follow the new
    /// timeline, else re-clone it; Redis: `REPLICAOF`).
    fn rejoin(&self, primary: &Self) -> impl Future<Output = Result<()>> + Send;
}

impl Node for PgNode {
    fn addr(&self) -> SocketAddr {
        PgNode::addr(self)
    }
    fn kill(&self) -> impl Future<Output = Result<()>> + Send {
        PgNode::kill(self)
    }
    fn pause(&self) -> impl Future<Output = Result<()>> + Send {
        PgNode::pause(self)
    }
    fn resume(&self) -> impl Future<Output = Result<()>> + Send {
        PgNode::resume(self)
    }
    fn restart(&self) -> impl Future<Output = Result<()>> + Send {
        PgNode::restart(self)
    }
    fn promote(&self) -> impl Future<Output = Result<()>> + Send {
        PgNode::promote(self)
    }
    async fn rejoin(&self, primary: &Self) -> Result<()> {
        if matches!(self.is_in_recovery().await, Ok(true))
            && matches!(self.can_follow(primary).await, Ok(true))
        {
            return self.follow(primary).await;
        }
        self.reclone(primary).await
    }
}

impl Node for RedisNode {
    fn addr(&self) -> SocketAddr {
        RedisNode::addr(self)
    }
    fn kill(&self) -> impl Future<Output = Result<()>> + Send {
        RedisNode::kill(self)
    }
    fn pause(&self) -> impl Future<Output = Result<()>> + Send {
        RedisNode::pause(self)
    }
    fn resume(&self) -> impl Future<Output = Result<()>> + Send {
        RedisNode::resume(self)
    }
    fn restart(&self) -> impl Future<Output = Result<()>> + Send {
        RedisNode::restart(self)
    }
    fn promote(&self) -> impl Future<Output = Result<()>> + Send {
        RedisNode::promote(self)
    }
    fn rejoin(&self, primary: &Self) -> impl Future<Output = Result<()>> + Send {
        self.replicaof(primary)
    }
}
