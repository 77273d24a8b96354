//! `&mut PgConn` as an sqlx executor, tracking queries left unfinished.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Describe, Either, Execute, Executor, Postgres, SqlStr};

use crate::connection::PgConn;

/// Runs queries on the underlying [`sqlx::PgConnection`], so `&mut *checkout`
/// works wherever sqlx wants an executor. Each query marks the connection in
/// flight until its future completes or its stream ends (or fails), so the
/// return path can tell a query abandoned mid-way.
impl<'c> Executor<'c> for &'c mut PgConn {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let (conn, in_flight) = self.split();
        *in_flight = true;
        Box::pin(Tracked {
            inner: conn.fetch_many(query),
            in_flight,
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let (conn, in_flight) = self.split();
        tracked(conn.fetch_optional(query), in_flight)
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        let (conn, in_flight) = self.split();
        tracked(conn.prepare_with(sql, parameters), in_flight)
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        let (conn, in_flight) = self.split();
        tracked(conn.describe(sql), in_flight)
    }
}

/// Marks `in_flight` until `fut` completes.
fn tracked<'e, T: Send + 'e>(fut: BoxFuture<'e, T>, in_flight: &'e mut bool) -> BoxFuture<'e, T> {
    *in_flight = true;
    Box::pin(async move {
        let out = fut.await;
        *in_flight = false;
        out
    })
}

/// A result stream that clears `in_flight` once it ends or fails.
struct Tracked<'e, T> {
    inner: BoxStream<'e, Result<T, sqlx::Error>>,
    in_flight: &'e mut bool,
}

impl<T> Stream for Tracked<'_, T> {
    type Item = Result<T, sqlx::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let polled = this.inner.poll_next_unpin(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            *this.in_flight = false;
        }
        polled
    }
}
