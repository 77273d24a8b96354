//! A TCP proxy that injects network faults between a client and one upstream.
//!
//! There is no netem on these machines and nftables rules are machine-wide, so
//! faults are made here, in user space, on the proxy's own port: latency per chunk,
//! blackholes (new connections or all of them), resets (RST, via `SO_LINGER 0`) and
//! refusal (the listening socket is closed). Faults are switched at runtime from any
//! thread through a [`FaultHandle`]; every connection watches one
//! [`tokio::sync::watch`] channel, so a change applies to open connections at once.

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, TestkitError};
use crate::pgwire::{FrontendParser, PgMessages, Tally};
use crate::port::loopback;

/// The faults in force. Copied out of the watch channel, never held across awaits.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    latency: Duration,
    stall_new: bool,
    stall_all: bool,
    refuse: bool,
    /// Bumped by `reset_all`: connections opened under an older value are reset.
    resets: u64,
}

#[derive(Debug)]
struct Shared {
    faults: watch::Sender<Faults>,
    addr: SocketAddr,
    upstream: SocketAddr,
    accepted: AtomicU64,
    active: AtomicU64,
    /// Client messages, when the proxy speaks for a PostgreSQL server.
    postgres: Option<Tally>,
}

/// A cheap, cloneable remote control for a [`FaultProxy`], usable from any thread.
/// Once the proxy is dropped, changes have no effect.
#[derive(Debug, Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl FaultHandle {
    fn modify(&self, change: impl FnOnce(&mut Faults)) {
        self.shared.faults.send_modify(change);
    }

    /// Delays every chunk forwarded, in each direction, by `latency` (zero turns
    /// it off).
    pub fn set_latency(&self, latency: Duration) {
        self.modify(|f| f.latency = latency);
    }

    /// While on, new connections are accepted but never connected upstream, so
    /// requests on them hang. They go through once this is turned off.
    pub fn stall_new(&self, on: bool) {
        self.modify(|f| f.stall_new = on);
    }

    /// While on, nothing is forwarded on any connection, open or new (a
    /// blackhole). Data already read is delivered once this is turned off.
    pub fn stall_all(&self, on: bool) {
        self.modify(|f| f.stall_all = on);
    }

    /// Closes every open connection with a TCP reset, on both sides.
    pub fn reset_all(&self) {
        self.modify(|f| f.resets += 1);
    }

    /// While on, the proxy stops listening, so new connections are refused; open
    /// ones continue. A connection that races with the switch is reset instead.
    pub fn refuse(&self, on: bool) {
        self.modify(|f| f.refuse = on);
    }

    /// Clears latency, stalls and refusal.
    pub fn heal(&self) {
        self.modify(|f| {
            *f = Faults {
                resets: f.resets,
                ..Faults::default()
            }
        });
    }

    /// The proxy's listening address; point clients here.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }

    /// Where connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// How many client connections the proxy has accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// How many client connections are open right now.
    pub fn active(&self) -> u64 {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// The PostgreSQL client messages counted so far, over every connection;
    /// `None` unless the proxy was started with
    /// [`FaultProxy::start_counting_postgres`].
    pub fn pg_messages(&self) -> Option<PgMessages> {
        self.shared.postgres.as_ref().map(Tally::snapshot)
    }
}

/// A running fault-injecting proxy in front of one upstream address. It derefs to
/// its [`FaultHandle`]; dropping it stops the listener and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    handle: FaultHandle,
    cancel: CancellationToken,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        Self::start_with(upstream, None).await
    }

    /// [`FaultProxy::start`] in front of a PostgreSQL server (or PgBouncer),
    /// also counting the client's protocol messages
    /// ([`FaultHandle::pg_messages`]): round trips on the wire.
    pub async fn start_counting_postgres(upstream: SocketAddr) -> Result<Self> {
        Self::start_with(upstream, Some(Tally::default())).await
    }

    async fn start_with(upstream: SocketAddr, postgres: Option<Tally>) -> Result<Self> {
        let listener = listen(loopback(0))
            .map_err(TestkitError::io("binding the fault proxy to 127.0.0.1:0"))?;
        let addr = listener
            .local_addr()
            .map_err(TestkitError::io("reading the fault proxy's address"))?;
        let (faults, _) = watch::channel(Faults::default());
        let shared = Arc::new(Shared {
            faults,
            addr,
            upstream,
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            postgres,
        });
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone()));
        tracing::debug!(%addr, %upstream, "fault proxy started");
        Ok(Self {
            handle: FaultHandle { shared },
            cancel,
        })
    }

    /// A handle to steer this proxy from elsewhere (another task or thread).
    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }
}

impl Deref for FaultProxy {
    type Target = FaultHandle;

    fn deref(&self) -> &FaultHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A listener with `SO_REUSEADDR`, so that it can be re-bound to the same port after
/// a `refuse` while connections from before are still open.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Drops the connection with an RST instead of a FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut faults = shared.faults.subscribe();
    let mut listener = Some(listener);
    loop {
        let refusing = faults.borrow_and_update().refuse;
        if refusing {
            // Closing the listening socket is what makes new connects fail.
            listener = None;
        } else if listener.is_none() {
            match listen(shared.addr) {
                Ok(l) => listener = Some(l),
                Err(err) => {
                    tracing::warn!(addr = %shared.addr, %err, "fault proxy could not listen again; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                    }
                }
            }
        }
        let Some(active_listener) = listener.as_ref() else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = faults.changed() => if changed.is_err() { return },
            }
            continue;
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = faults.changed() => if changed.is_err() { return },
            accepted = active_listener.accept() => match accepted {
                Ok((client, _)) => {
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                    if shared.faults.borrow().refuse {
                        abort(&client);
                        continue;
                    }
                    let _ = client.set_nodelay(true);
                    tokio::spawn(connection(client, shared.clone(), cancel.clone()));
                }
                Err(err) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::debug!(%err, "fault proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
        }
    }
}

/// Counts a connection as active for as long as it lives.
struct Active(Arc<Shared>);

impl Active {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.active.fetch_add(1, Ordering::Relaxed);
        Self(shared.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Stop {
    Cancelled,
    Reset,
}

async fn connection(mut client: TcpStream, shared: Arc<Shared>, cancel: CancellationToken) {
    let _active = Active::new(&shared);
    let faults = shared.faults.subscribe();
    let epoch = faults.borrow().resets;
    let stop = async {
        tokio::select! {
            _ = cancel.cancelled() => Stop::Cancelled,
            _ = reset_requested(faults.clone(), epoch) => Stop::Reset,
        }
    };
    tokio::pin!(stop);

    let mut upstream = tokio::select! {
        stop = &mut stop => {
            if matches!(stop, Stop::Reset) {
                abort(&client);
            }
            return;
        }
        upstream = connect_when_allowed(shared.upstream, faults.clone()) => match upstream {
            Ok(upstream) => upstream,
            Err(err) => {
                // Mirror a dead upstream to the client as a reset.
                tracing::debug!(upstream = %shared.upstream, %err, "fault proxy could not reach upstream");
                abort(&client);
                return;
            }
        },
    };
    let _ = upstream.set_nodelay(true);

    let reset = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let relay = async {
            let tap = shared
                .postgres
                .as_ref()
                .map(|tally| (FrontendParser::new(), tally));
            tokio::try_join!(
                pump(client_read, upstream_write, faults.clone(), tap),
                pump(upstream_read, client_write, faults.clone(), None),
            )
        };
        tokio::select! {
            stop = &mut stop => matches!(stop, Stop::Reset),
            // An error on one side (e.g. the upstream reset) is passed on as a reset.
            relayed = relay => relayed.is_err(),
        }
    };
    if reset {
        abort(&client);
        abort(&upstream);
    }
}

async fn reset_requested(mut faults: watch::Receiver<Faults>, epoch: u64) {
    loop {
        if faults.borrow_and_update().resets != epoch {
            return;
        }
        if faults.changed().await.is_err() {
            // The proxy is gone; cancellation ends the connection.
            std::future::pending::<()>().await;
        }
    }
}

async fn connect_when_allowed(
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
) -> io::Result<TcpStream> {
    while faults.borrow_and_update().stall_new {
        if faults.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
    TcpStream::connect(upstream).await
}

/// Copies one direction, chunk by chunk, applying latency and stalls to each
/// chunk; `tap` parses what a PostgreSQL client sends.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut faults: watch::Receiver<Faults>,
    mut tap: Option<(FrontendParser, &Tally)>,
) -> io::Result<()> {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the other direction may still have data.
            let _ = to.shutdown().await;
            return Ok(());
        }
        if let Some((parser, tally)) = tap.as_mut() {
            parser.feed(&buf[..n], tally);
        }
        let latency = loop {
            let now = *faults.borrow_and_update();
            if !now.stall_all {
                break now.latency;
            }
            if faults.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}
