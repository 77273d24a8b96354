//! The connection a Redis checkout derefs to: confined to its tenant when the
//! checkout was scoped, raw only when it was not.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{
    self, aio::ConnectionLike, Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value,
};
use switchyard_core::{EndpointId, Error, GatePermit, Isolation, TenantId};

use crate::error::{breaks_connection, redis_error, shown, ConfinementError};
use crate::keys::{prepare, strip_reply, Command, Confinement};
use crate::users::TenantUsers;

/// What the server-side session of a connection is known to be.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Session {
    /// A command was sent and its reply not yet read: its future was dropped.
    pub(crate) busy: bool,
    /// The socket broke or a reply timed out (it may still come, out of turn).
    pub(crate) broken: bool,
    /// `MULTI` went out through raw access without `EXEC` or `DISCARD`.
    pub(crate) in_multi: bool,
    /// The session may differ from the pool default (database, user, raw use).
    pub(crate) dirty: bool,
}

/// The pool's default session, restored before a connection goes back.
#[derive(Clone)]
pub(crate) struct SessionDefaults {
    pub(crate) db: i64,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

impl fmt::Debug for SessionDefaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionDefaults")
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// What an ACL-confined connection needs to run one command of the handle's
/// own as the pool's user and come back (see [`RedisConnection::send_as_pool`]).
#[derive(Clone)]
pub(crate) struct Reauth {
    pub(crate) user: String,
    pub(crate) password: crate::AclPassword,
    pub(crate) defaults: SessionDefaults,
}

/// A connection from a [`RedisBackend`](crate::RedisBackend), as a checkout
/// derefs to it.
///
/// Scoped checkouts are confined: every command goes through the command
/// table, which puts keys under the tenant's prefix (schema and row
/// isolation) and refuses what cannot be confined (`FLUSHALL`, `SELECT`,
/// `CLIENT`, ...). The underlying socket is never reachable from a scoped
/// checkout; [`raw`](Self::raw) works only on unscoped ones.
///
/// A command whose future is dropped before its reply arrives leaves the
/// connection marked busy; it is then discarded on return, never pooled.
pub struct RedisConnection {
    /// `None` only once detached (on drop or discard).
    inner: Option<deadpool_redis::Connection>,
    endpoint: EndpointId,
    tenant: Option<TenantId>,
    isolation: Option<Isolation>,
    confinement: Confinement,
    response_timeout: Duration,
    pub(crate) session: Session,
    /// Set while ACL-confined.
    pub(crate) reauth: Option<Reauth>,
    /// The backend's record of provisioned tenant users, which provisioning
    /// through this connection updates.
    users: Option<Arc<TenantUsers>>,
    /// The checkout's place in the backend's fair gate; declared last so it
    /// is handed on only after the connection went back to deadpool.
    permit: Option<GatePermit>,
}

impl RedisConnection {
    pub(crate) fn new(
        inner: deadpool_redis::Connection,
        endpoint: EndpointId,
        response_timeout: Duration,
    ) -> Self {
        Self {
            inner: Some(inner),
            endpoint,
            tenant: None,
            isolation: None,
            confinement: Confinement::Open,
            response_timeout,
            session: Session::default(),
            reauth: None,
            users: None,
            permit: None,
        }
    }

    /// Holds `permit` until the connection is dropped.
    pub(crate) fn holding(mut self, permit: GatePermit) -> Self {
        self.permit = Some(permit);
        self
    }

    /// Reports tenant users provisioned or removed through this connection to `users`.
    pub(crate) fn recording_users(mut self, users: Arc<TenantUsers>) -> Self {
        self.users = Some(users);
        self
    }

    /// `scope`'s ACL user was written through this connection.
    pub(crate) fn remember_user(&self, scope: &switchyard_core::TenantScope) {
        if let Some(users) = &self.users {
            users.record(scope);
        }
    }

    /// `user` was deleted through this connection.
    pub(crate) fn forget_user(&self, user: &str) {
        if let Some(users) = &self.users {
            users.forget(user);
        }
    }

    /// The endpoint this connection belongs to.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// The tenant the connection is confined to, if any.
    pub fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }

    /// How the connection is confined, if it is.
    pub fn isolation(&self) -> Option<Isolation> {
        self.isolation
    }

    /// The prefix put before every key (`tenant_acme:`), if keys are prefixed.
    pub fn key_prefix(&self) -> Option<&str> {
        match &self.confinement {
            Confinement::Prefix(p) | Confinement::Acl(p) => Some(p),
            Confinement::Open | Confinement::Database(_) => None,
        }
    }

    /// The redis connection itself, for an unscoped checkout.
    ///
    /// Anything sent through it is unconfined, so a scoped checkout gets a
    /// [`ConfinementError::Raw`] instead. The session is reset before the
    /// connection goes back to the pool (`RESET`, then the pool's default user
    /// and database); a `MULTI` left open discards it.
    pub fn raw(&mut self) -> Result<RawConnection<'_>, Error> {
        if let Some(tenant) = &self.tenant {
            return Err(ConfinementError::Raw {
                tenant: tenant.clone(),
            }
            .into_error(&self.endpoint, Some(tenant)));
        }
        self.session.dirty = true;
        Ok(RawConnection { conn: self })
    }

    /// Sends `command` within the connection's confinement and converts the reply.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut switchyard_redis::RedisConnection) -> Result<(), switchyard_core::Error> {
    /// use switchyard_redis::Command;
    /// let n: i64 = conn.query(&Command::new("HINCRBY").arg("visits").arg("home").arg(1)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn query<T: FromRedisValue>(&mut self, command: &Command) -> Result<T, Error> {
        let prepared = prepare(command, &self.confinement).map_err(|e| self.refused(e))?;
        let value = self
            .send(&prepared.cmd, prepared.blocks_for)
            .await
            .map_err(|e| self.fail(e))?;
        let value = strip_reply(prepared.reply, value, self.confinement.prefix())
            .map_err(|reason| self.malformed(command, reason))?;
        self.convert(value)
    }

    /// Sends `commands` in one round trip, each confined; the reply is the
    /// array of their replies. Blocking commands cannot be pipelined.
    pub async fn pipeline<T: FromRedisValue>(&mut self, commands: &[Command]) -> Result<T, Error> {
        self.batch(commands, false).await
    }

    /// Sends `commands` as one `MULTI`/`EXEC` transaction, each confined; the
    /// reply is `EXEC`'s (nil when a `WATCH`ed key changed).
    pub async fn transaction<T: FromRedisValue>(
        &mut self,
        commands: &[Command],
    ) -> Result<T, Error> {
        self.batch(commands, true).await
    }

    async fn batch<T: FromRedisValue>(
        &mut self,
        commands: &[Command],
        atomic: bool,
    ) -> Result<T, Error> {
        let mut pipe = redis::pipe();
        if atomic {
            pipe.atomic();
        }
        let mut replies = Vec::with_capacity(commands.len());
        for command in commands {
            let prepared = prepare(command, &self.confinement).map_err(|e| self.refused(e))?;
            // Inside MULTI a blocking command does not block; in a plain
            // pipeline it would stall every reply behind it.
            if prepared.blocks_for.is_some() && !atomic {
                return Err(self.malformed(command, "blocking commands cannot be pipelined"));
            }
            replies.push(prepared.reply);
            pipe.add_command(prepared.cmd);
        }
        let value = self.send_pipeline(&pipe).await.map_err(|e| self.fail(e))?;
        let value = match value {
            Value::Array(items) if items.len() == replies.len() => {
                let mut out = Vec::with_capacity(items.len());
                for (item, reply) in items.into_iter().zip(&replies) {
                    let stripped = strip_reply(*reply, item, self.confinement.prefix())
                        .map_err(|reason| self.malformed(&commands[out.len()], reason))?;
                    out.push(stripped);
                }
                Value::Array(out)
            }
            other => other,
        };
        self.convert(value)
    }

    /// Sends one command, keeping track of whether its reply was read.
    pub(crate) async fn send(
        &mut self,
        cmd: &Cmd,
        blocks_for: Option<Duration>,
    ) -> RedisResult<Value> {
        let Some(socket) = self.inner.as_mut() else {
            return Err(detached());
        };
        if let Some(extra) = blocks_for {
            socket.set_response_timeout(self.response_timeout.saturating_add(extra));
        }
        self.session.busy = true;
        let result = socket.req_packed_command(cmd).await;
        self.session.busy = false;
        if blocks_for.is_some() {
            socket.set_response_timeout(self.response_timeout);
        }
        self.note(result.and_then(Value::extract_error))
    }

    /// Sends `cmd`, built by the handle itself with the tenant's prefix in
    /// place (a `SCAN ... MATCH <prefix>*`), as the pool's user when the
    /// connection is ACL-confined, since the tenant user may not run it; then
    /// authenticates as the tenant again, all in one pipeline. If any step
    /// fails the connection is marked broken and never reused: it could be
    /// left as the pool's user.
    pub(crate) async fn send_as_pool(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let Some(reauth) = self.reauth.clone() else {
            return self.send(cmd, None).await;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("RESET");
        if let Some(password) = &reauth.defaults.password {
            let auth = pipe.cmd("AUTH");
            if let Some(user) = &reauth.defaults.username {
                auth.arg(user);
            }
            auth.arg(password);
        }
        if reauth.defaults.db != 0 {
            pipe.cmd("SELECT").arg(reauth.defaults.db);
        }
        pipe.add_command(cmd.clone());
        pipe.cmd("AUTH")
            .arg(&reauth.user)
            .arg(reauth.password.expose());
        let result = self.send_pipeline(&pipe).await;
        let mut replies = match result {
            Ok(Value::Array(replies)) if replies.len() >= 2 => replies,
            Ok(_) => {
                self.session.broken = true;
                return Err(std::io::Error::other("unexpected pipeline reply").into());
            }
            Err(e) => {
                self.session.broken = true;
                return Err(e);
            }
        };
        replies.pop();
        Ok(replies.pop().unwrap_or(Value::Nil))
    }

    /// Sends a pipeline, keeping track of whether its replies were read.
    pub(crate) async fn send_pipeline(&mut self, pipe: &Pipeline) -> RedisResult<Value> {
        let Some(socket) = self.inner.as_mut() else {
            return Err(detached());
        };
        self.session.busy = true;
        let result = pipe.query_async::<Value>(socket).await;
        self.session.busy = false;
        self.note(result)
    }

    fn note<T>(&mut self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result {
            if breaks_connection(e) {
                self.session.broken = true;
            }
        }
        result
    }

    fn convert<T: FromRedisValue>(&self, value: Value) -> Result<T, Error> {
        redis::from_redis_value(value).map_err(|e| self.fail(e.into()))
    }

    pub(crate) fn fail(&self, e: redis::RedisError) -> Error {
        redis_error(&self.endpoint, self.tenant.as_ref(), e)
    }

    fn refused(&self, e: ConfinementError) -> Error {
        e.into_error(&self.endpoint, self.tenant.as_ref())
    }

    pub(crate) fn malformed(&self, command: &Command, reason: &'static str) -> Error {
        self.refused(ConfinementError::Malformed {
            command: shown(command.name().as_bytes()),
            reason,
        })
    }

    pub(crate) fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// Confines the connection (the server side was already switched).
    pub(crate) fn confine(
        &mut self,
        tenant: TenantId,
        isolation: Isolation,
        confinement: Confinement,
    ) {
        self.tenant = Some(tenant);
        self.isolation = Some(isolation);
        self.confinement = confinement;
    }

    /// Forgets the confinement (the server side was already reset).
    pub(crate) fn release_confinement(&mut self) {
        self.reauth = None;
        self.tenant = None;
        self.isolation = None;
        self.confinement = Confinement::Open;
    }

    /// Whether the connection may go back to the pool (after a reset if dirty).
    pub(crate) fn reusable(&self) -> bool {
        !(self.session.busy || self.session.broken || self.session.in_multi)
    }

    /// Restores the pool's default session in one round trip: `RESET` (which
    /// leaves any transaction, watch, subscription, database and user), then
    /// the default user and database.
    pub(crate) async fn reset(&mut self, defaults: &SessionDefaults) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("RESET");
        if let Some(password) = &defaults.password {
            let auth = pipe.cmd("AUTH");
            if let Some(user) = &defaults.username {
                auth.arg(user);
            }
            auth.arg(password);
        }
        if defaults.db != 0 {
            pipe.cmd("SELECT").arg(defaults.db);
        }
        self.send_pipeline(&pipe).await?;
        self.session.dirty = false;
        self.session.in_multi = false;
        self.release_confinement();
        Ok(())
    }

    /// Detaches the socket from the pool so it closes instead of being reused.
    pub(crate) fn into_detached(mut self) -> Option<redis::aio::MultiplexedConnection> {
        self.inner.take().map(deadpool_redis::Connection::take)
    }
}

fn detached() -> redis::RedisError {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "connection was detached").into()
}

impl Drop for RedisConnection {
    /// The last line of defence: a connection dropped anywhere (a cancelled
    /// reset task, a runtime shutting down) goes back to the pool only if its
    /// session is known to be the pool's default; otherwise its socket closes.
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            if self.session.dirty || !self.reusable() {
                drop(deadpool_redis::Connection::take(inner));
            }
        }
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection")
            .field("endpoint", &self.endpoint)
            .field("tenant", &self.tenant)
            .field("isolation", &self.isolation)
            .field("key_prefix", &self.key_prefix())
            .finish_non_exhaustive()
    }
}

/// Unconfined access to an unscoped connection, for the `redis` crate's own
/// command API (`redis::cmd(..).query_async(&mut raw)`).
pub struct RawConnection<'a> {
    conn: &'a mut RedisConnection,
}

impl fmt::Debug for RawConnection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RawConnection").field(&self.conn).finish()
    }
}

/// How a command changes the transaction state: `Some(true)` opens, `Some(false)` closes.
fn multi_effect(cmd: &Cmd) -> Option<bool> {
    let name = match cmd.args_iter().next()? {
        redis::Arg::Simple(name) => name,
        _ => return None,
    };
    if name.eq_ignore_ascii_case(b"MULTI") {
        Some(true)
    } else if name.eq_ignore_ascii_case(b"EXEC")
        || name.eq_ignore_ascii_case(b"DISCARD")
        || name.eq_ignore_ascii_case(b"RESET")
    {
        Some(false)
    } else {
        None
    }
}

impl ConnectionLike for RawConnection<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let conn = &mut *self.conn;
            let Some(socket) = conn.inner.as_mut() else {
                return Err(detached());
            };
            conn.session.busy = true;
            let result = socket.req_packed_command(cmd).await;
            conn.session.busy = false;
            if let Some(open) = multi_effect(cmd) {
                conn.session.in_multi = open;
            }
            conn.note(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let conn = &mut *self.conn;
            let Some(socket) = conn.inner.as_mut() else {
                return Err(detached());
            };
            conn.session.busy = true;
            let result = socket.req_packed_commands(pipeline, offset, count).await;
            conn.session.busy = false;
            // An atomic pipeline brings its own EXEC; a plain one may leave MULTI open.
            if !pipeline.is_transaction() {
                if let Some(open) = pipeline.cmd_iter().filter_map(multi_effect).last() {
                    conn.session.in_multi = open;
                }
            }
            conn.note(result)
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.inner.as_ref().map_or(0, |c| c.get_db())
    }
}
