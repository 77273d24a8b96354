//! One trait over replicated servers, so a fault scenario (kill, pause,
//! promote, restart, rejoin) is written once and run per engine: the test
//! bed's own nodes, and servers it did not start, broken through a proxy.

use std::future::Future;
use std::net::SocketAddr;

use sqlx::{Connection, PgConnection};

use crate::error::{Result, TestkitError};
use crate::postgres::{PgCluster, PgNode};
use crate::proxy::FaultProxy;
use crate::redis::{RedisCluster, RedisNode};

/// A PostgreSQL or Redis server, as fault scenarios use it.
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

/// A primary and its replicas started by the test bed, as fault scenarios
/// use them.
pub trait ReplicaSet: Sized + Send + Sync {
    /// One server of the set.
    type Node: Node;
    /// Starts a primary and `replicas` replicas following it.
    fn start(replicas: usize) -> impl Future<Output = Result<Self>> + Send;
    /// Every server, the primary first.
    fn nodes(&self) -> &[Self::Node];
}

impl ReplicaSet for PgCluster {
    type Node = PgNode;
    fn start(replicas: usize) -> impl Future<Output = Result<Self>> + Send {
        PgCluster::start(replicas)
    }
    fn nodes(&self) -> &[PgNode] {
        PgCluster::nodes(self)
    }
}

impl ReplicaSet for RedisCluster {
    type Node = RedisNode;
    fn start(replicas: usize) -> impl Future<Output = Result<Self>> + Send {
        RedisCluster::start(replicas)
    }
    fn nodes(&self) -> &[RedisNode] {
        RedisCluster::nodes(self)
    }
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

/// How a [`ProxiedNode`]'s server is promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// PostgreSQL: `SELECT pg_promote(true, 60)`.
    Postgres,
    /// Redis: `REPLICAOF NO ONE`.
    Redis,
}

/// A server the test bed did not start (a user's, in docker), reached
/// through a [`FaultProxy`]: the faults are the proxy's (a killed node
/// refuses and resets every connection, a paused one forwards nothing),
/// while a promotion is real, sent to the server itself.
pub struct ProxiedNode {
    proxy: FaultProxy,
    /// The server's own URL, with its credentials: used for the promotion
    /// only, never printed.
    url: String,
    promotion: Promotion,
}

impl std::fmt::Debug for ProxiedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxiedNode")
            .field("addr", &self.proxy.addr())
            .field("upstream", &self.proxy.upstream())
            .field("promotion", &self.promotion)
            .finish_non_exhaustive()
    }
}

impl ProxiedNode {
    /// Starts a proxy in front of `upstream`, the server at `url`.
    pub async fn start(upstream: SocketAddr, url: String, promotion: Promotion) -> Result<Self> {
        Ok(Self {
            proxy: FaultProxy::start(upstream).await?,
            url,
            promotion,
        })
    }

    fn unsupported(&self, operation: &'static str) -> TestkitError {
        TestkitError::Unsupported {
            operation,
            server: format!("the server behind proxy {}", self.proxy.addr()),
        }
    }
}

impl Node for ProxiedNode {
    /// The proxy's address: where clients connect.
    fn addr(&self) -> SocketAddr {
        self.proxy.addr()
    }
    async fn kill(&self) -> Result<()> {
        self.proxy.refuse(true);
        self.proxy.reset_all();
        Ok(())
    }
    async fn pause(&self) -> Result<()> {
        self.proxy.stall_all(true);
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        self.proxy.stall_all(false);
        Ok(())
    }
    /// Heals the proxy: the server itself never stopped, so an old primary
    /// comes back as the primary it still is.
    async fn restart(&self) -> Result<()> {
        self.proxy.heal();
        Ok(())
    }
    async fn promote(&self) -> Result<()> {
        let node = self.proxy.upstream().to_string();
        match self.promotion {
            Promotion::Postgres => {
                let promoted = async {
                    let mut conn = PgConnection::connect(&self.url).await?;
                    let done: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
                        .fetch_one(&mut conn)
                        .await?;
                    let _ = conn.close().await;
                    Ok::<_, sqlx::Error>(done)
                };
                let done = promoted
                    .await
                    .map_err(|source| TestkitError::Postgres { node, source })?;
                if !done {
                    return Err(TestkitError::Timeout {
                        what: format!("{} to finish promoting", self.proxy.addr()),
                        elapsed: std::time::Duration::from_secs(60),
                    });
                }
                Ok(())
            }
            Promotion::Redis => {
                let promoted = async {
                    let client = ::redis::Client::open(self.url.as_str())?;
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    ::redis::cmd("REPLICAOF")
                        .arg("NO")
                        .arg("ONE")
                        .query_async::<()>(&mut conn)
                        .await
                };
                promoted
                    .await
                    .map_err(|source| TestkitError::Redis { node, source })
            }
        }
    }
    /// Not done to a user's server: re-pointing or re-cloning it is theirs.
    async fn rejoin(&self, _primary: &Self) -> Result<()> {
        Err(self.unsupported("rejoin"))
    }
}
