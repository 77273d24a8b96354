//! The test bed for switchyard: starts real database engines on loopback ports in
//! scratch folders and hands back handles to break them.
//!
//! - [`PgCluster`]: a PostgreSQL primary plus streaming standbys.
//! - [`RedisCluster`]: a Redis master plus replicas.
//! - [`SentinelCluster`]: a Redis master plus replicas watched by three sentinels.
//! - [`PatroniCluster`]: etcd plus three Patroni-managed PostgreSQL nodes.
//! - [`ClickHouse`]: one ClickHouse server.
//! - [`MongoServer`], [`ElasticServer`]: the real engine when its URL is in the
//!   environment, else a wire-compatible stand-in (see [`ServerKind`]).
//! - [`TestCa`]: a throwaway CA and certificates; PostgreSQL, Redis and
//!   ClickHouse start with TLS from it, and [`TlsFront`] puts a TLS listener
//!   in front of a stand-in that speaks none.
//! - [`FaultProxy`]: a TCP proxy in front of any of them that adds latency,
//!   blackholes, resets or refuses connections; in front of PostgreSQL it can
//!   also count the client's messages ([`PgMessages`]: round trips on the wire).
//! - [`conformance`]: the tenant isolation suite every engine crate runs.
//! - [`PgBouncer`]: Debian's PgBouncer in session or transaction mode in front
//!   of a [`PgNode`], the proxy peer the benches compare with.
//!
//! Every node can be killed (SIGKILL: connections are refused), paused (SIGSTOP:
//! connections hang), resumed and restarted on the same port; replicas can be
//! promoted, and after a failover an operator's moves are there too: a
//! PostgreSQL standby re-pointed ([`PgNode::follow`]) or an old primary
//! re-cloned ([`PgNode::reclone`]), a Redis replica re-pointed
//! ([`RedisNode::replicaof`]); [`Node`] is the one trait fault scenarios are
//! written against, implemented too by a [`ProxiedNode`] (a server the test
//! bed did not start, broken through a proxy), and [`Fault`] the faults they
//! inject. Each server is its own process with its own port and folder, so tests
//! run in parallel. Dropping a handle stops its servers and removes their folders;
//! folders and servers left by an aborted run are cleaned up by the next run.
//!
//! A missing engine binary is an error ([`TestkitError::MissingBinary`]) that names
//! the install command, never a skipped test. Linux only (`/proc`, signals).
//!
//! ```no_run
//! use std::time::Duration;
//! use switchyard_testkit::{FaultProxy, PgCluster};
//!
//! # async fn demo() -> switchyard_testkit::Result<()> {
//! let pg = PgCluster::start(1).await?;
//! println!("primary at {}", pg.primary().url());
//!
//! // Writes on the primary reach the standby.
//! pg.wait_replayed(&pg.standbys()[0], Duration::from_secs(5)).await?;
//!
//! // Put a proxy in front of the standby and make it slow, then hang it.
//! let proxy = FaultProxy::start(pg.standbys()[0].addr()).await?;
//! proxy.set_latency(Duration::from_millis(50));
//! pg.standbys()[0].pause().await?;
//! pg.standbys()[0].resume().await?;
//!
//! // Fail over.
//! pg.primary().kill().await?;
//! pg.standbys()[0].promote().await?;
//! # Ok(())
//! # }
//! ```

mod clickhouse;
pub mod conformance;
mod error;
mod http;
mod node;
mod patroni;
mod pgbouncer;
mod pgwire;
mod port;
mod postgres;
mod process;
mod proxy;
mod redis;
mod scenario;
mod scratch;
mod sentinel;
mod standin;
mod tls;
mod tls_front;
mod wait;

pub use crate::clickhouse::ClickHouse;
pub use crate::error::{Result, TestkitError};
pub use crate::node::{Node, Promotion, ProxiedNode, ReplicaSet};
pub use crate::patroni::{PatroniCluster, PatroniMember, PatroniNode};
pub use crate::pgbouncer::{PgBouncer, PoolMode};
pub use crate::pgwire::PgMessages;
pub use crate::port::{free_port, loopback};
pub use crate::postgres::{wait_replayed_at, PgCluster, PgNode};
pub use crate::process::{descendants, is_alive, signal_tree};
pub use crate::proxy::{FaultHandle, FaultProxy};
pub use crate::redis::{RedisCluster, RedisNode};
pub use crate::scenario::Fault;
pub use crate::sentinel::{SentinelCluster, SentinelNode, SENTINEL_MASTER};
pub use crate::standin::{ElasticServer, MongoServer, ServerKind};
pub use crate::tls::{TestCa, CLIENT_NAME, SERVER_NAME};
pub use crate::tls_front::TlsFront;
pub use crate::wait::{poll_until, wait_until, POLL_INTERVAL};

/// Signals for [`signal_tree`], re-exported so callers need no `nix` dependency.
pub use nix::sys::signal::Signal;
