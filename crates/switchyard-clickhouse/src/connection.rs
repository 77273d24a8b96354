//! The handle a checkout derefs to: a client configured for one tenant, and
//! the only ways a scoped checkout can reach data.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use clickhouse::{RowOwned, RowRead};
use serde::Serialize;
use switchyard_core::{BackendErrorKind, Error, GatePermit, Isolation, TenantId};

use crate::backend::Shared;
use crate::error::{ch_error, rejected, ChError};
use crate::filter::{bind_all, quoted, Filter, Value};

/// What a handle is confined to.
#[derive(Debug, Clone)]
pub(crate) enum Scoped {
    /// The tenant's own database; unqualified names resolve there.
    Database {
        tenant: TenantId,
        database: Arc<str>,
    },
    /// Shared tables in the row database; every read and write carries
    /// `column = tenant`.
    Row { tenant: TenantId, column: Arc<str> },
}

/// A ClickHouse connection from a [`ChBackend`](crate::ChBackend): a slot of
/// the endpoint's in-flight bound plus a client configured for the checkout.
///
/// | checkout | [`client`](Self::client) | [`select`](Self::select), [`count`](Self::count), [`insert_rows`](Self::insert_rows) |
/// |---|---|---|
/// | unscoped | the endpoint's client | on the default database |
/// | database (or schema) scope | a client whose database is the tenant's | on the tenant's database |
/// | row scope | refused ([`ChError::Confined`]) | on the shared row database, with `tenant_column = tenant` added to every read and set or checked on every written row |
///
/// Names reach SQL only after [`validate_identifier`](crate::validate_identifier)
/// (so never with a `.` that would name another database), values only as
/// bound literals, and filters only as a [`Filter`].
pub struct ChConnection {
    shared: Arc<Shared>,
    client: clickhouse::Client,
    scoped: Option<Scoped>,
    _permit: GatePermit,
}

impl ChConnection {
    pub(crate) fn new(shared: Arc<Shared>, permit: GatePermit) -> Self {
        let client = shared.base.clone();
        Self {
            shared,
            client,
            scoped: None,
            _permit: permit,
        }
    }

    pub(crate) fn set_scope(&mut self, client: clickhouse::Client, scoped: Scoped) {
        self.client = client;
        self.scoped = Some(scoped);
    }

    pub(crate) fn reset(&mut self) {
        self.client = self.shared.base.clone();
        self.scoped = None;
    }

    /// The tenant this handle is confined to, if any.
    pub fn tenant(&self) -> Option<&TenantId> {
        match &self.scoped {
            Some(Scoped::Database { tenant, .. } | Scoped::Row { tenant, .. }) => Some(tenant),
            None => None,
        }
    }

    /// How this handle is confined: `Database` for a database (or schema)
    /// scope, `Row` for a row scope, `None` when unscoped.
    pub fn isolation(&self) -> Option<Isolation> {
        match &self.scoped {
            Some(Scoped::Database { .. }) => Some(Isolation::Database),
            Some(Scoped::Row { .. }) => Some(Isolation::Row),
            None => None,
        }
    }

    /// The database queries run in: the tenant's own, the shared row
    /// database, or the endpoint's default.
    pub fn database(&self) -> Option<&str> {
        self.client.database()
    }

    /// The `clickhouse::Client` behind this handle, for unscoped and
    /// database-scoped checkouts.
    ///
    /// A database-scoped client resolves unqualified table names in the
    /// tenant's database; a query that names another database explicitly
    /// (`other.events`) is not stopped by the handle. Where that matters, give
    /// each tenant a ClickHouse user limited to its database
    /// (`<allow_databases>` in users.xml, or `GRANT` on 20.4+) and use the
    /// typed methods, which never qualify names.
    ///
    /// A row-scoped checkout refuses with [`ChError::Confined`]: raw SQL could
    /// read any tenant's rows.
    pub fn client(&self) -> Result<&clickhouse::Client, Error> {
        match &self.scoped {
            Some(Scoped::Row { tenant, .. }) => Err(rejected(
                &self.shared.endpoint,
                Some(tenant),
                ChError::Confined {
                    tenant: tenant.clone(),
                    what: "the raw client",
                },
            )),
            _ => Ok(&self.client),
        }
    }

    /// Starts a `SELECT` of `T`'s columns from `table`.
    ///
    /// On a row-scoped handle the query always carries
    /// `WHERE tenant_column = <tenant>`, ANDed with whatever [`Filter`] is added.
    ///
    /// ```no_run
    /// # async fn demo(conn: switchyard_core::Checkout<switchyard_clickhouse::ChBackend>)
    /// # -> Result<(), switchyard_core::Error> {
    /// use switchyard_clickhouse::Filter;
    ///
    /// #[derive(clickhouse::Row, serde::Deserialize)]
    /// struct Event {
    ///     tenant_id: String,
    ///     ts: u64,
    ///     kind: String,
    /// }
    ///
    /// let clicks: Vec<Event> = conn
    ///     .select::<Event>("events")
    ///     .filter(Filter::eq("kind", "click"))
    ///     .order_by_desc("ts")
    ///     .limit(100)
    ///     .fetch_all()
    ///     .await?;
    /// # let _ = clicks; Ok(()) }
    /// ```
    pub fn select<T>(&self, table: &str) -> Select<'_, T>
    where
        T: RowOwned + RowRead,
    {
        Select {
            conn: self,
            table: table.to_owned(),
            filter: Filter::all(),
            order: Vec::new(),
            limit: None,
            _row: PhantomData,
        }
    }

    /// Counts the rows of `table` matching `filter` (only the tenant's rows
    /// on a row-scoped handle).
    pub async fn count(&self, table: &str, filter: Filter) -> Result<u64, Error> {
        let (mut sql, binds) = self.table_and_filter(table, &filter)?;
        self.check_row_table(table).await?;
        sql.insert_str(0, "SELECT count() ");
        let query = bind_all(self.client.query(&sql), &binds);
        self.run(query.fetch_one::<u64>()).await
    }

    /// Inserts `rows` into `table` (as `JSONEachRow`; each row is serialized
    /// with serde and must be a struct or map whose keys are column names).
    ///
    /// On a row-scoped handle every row's tenant column is set to the
    /// checkout's tenant when missing or null, and a row naming another
    /// tenant fails the whole batch with [`ChError::ForeignTenant`] before
    /// anything is sent. Returns the number of rows sent.
    pub async fn insert_rows<T, I>(&self, table: &str, rows: I) -> Result<u64, Error>
    where
        T: Serialize,
        I: IntoIterator<Item = T>,
    {
        let table = quoted(table).map_err(|e| self.rejected(e))?;
        let mut body = Vec::new();
        let mut count = 0_u64;
        for (index, row) in rows.into_iter().enumerate() {
            let value = self.checked_row(index, &row)?;
            serde_json::to_writer(&mut body, &value)
                .map_err(|source| self.rejected(ChError::Serialize { index, source }))?;
            body.push(b'\n');
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        self.check_row_table(&table[1..table.len() - 1]).await?;
        let sql = format!("INSERT INTO {table} FORMAT JSONEachRow");
        let mut insert = self.client.insert_formatted_with(sql);
        self.run(async move {
            insert.send(bytes::Bytes::from(body)).await?;
            insert.end().await
        })
        .await?;
        Ok(count)
    }

    /// On a row-scoped handle, checks (once per cache period) that `table`'s
    /// tenant column is a string: with a numeric one, tenant `007`'s rows
    /// would be stored and matched as tenant `7`'s.
    async fn check_row_table(&self, table: &str) -> Result<(), Error> {
        match &self.scoped {
            Some(Scoped::Row { tenant, .. }) => {
                self.shared.check_tenant_column(tenant, table).await
            }
            _ => Ok(()),
        }
    }

    /// Serializes one row and applies the row scope's tenant rule to it.
    fn checked_row<T: Serialize>(&self, index: usize, row: &T) -> Result<serde_json::Value, Error> {
        let mut value = serde_json::to_value(row)
            .map_err(|source| self.rejected(ChError::Serialize { index, source }))?;
        let Some(object) = value.as_object_mut() else {
            return Err(self.rejected(ChError::NotARow { index }));
        };
        if let Some(Scoped::Row { tenant, column }) = &self.scoped {
            match object.get(&**column) {
                None | Some(serde_json::Value::Null) => {
                    object.insert(column.to_string(), tenant.as_str().into());
                }
                Some(serde_json::Value::String(s)) if s == tenant.as_str() => {}
                Some(other) => {
                    let found = match other {
                        serde_json::Value::String(s) => s.chars().take(80).collect(),
                        other => other.to_string().chars().take(80).collect(),
                    };
                    return Err(self.rejected(ChError::ForeignTenant {
                        index,
                        column: column.to_string(),
                        tenant: tenant.clone(),
                        found,
                    }));
                }
            }
        }
        Ok(value)
    }

    /// `FROM table WHERE <tenant> AND (<filter>)` with its bound values.
    fn table_and_filter(
        &self,
        table: &str,
        filter: &Filter,
    ) -> Result<(String, Vec<Value>), Error> {
        let table = quoted(table).map_err(|e| self.rejected(e))?;
        let mut sql = format!("FROM {table} WHERE ");
        let mut binds = Vec::new();
        if let Some(Scoped::Row { tenant, column }) = &self.scoped {
            let column = quoted(column).map_err(|e| self.rejected(e))?;
            sql.push_str(&column);
            sql.push_str(" = ? AND (");
            binds.push(Value::Str(tenant.as_str().to_owned()));
            filter
                .render(&mut sql, &mut binds)
                .map_err(|e| self.rejected(e))?;
            sql.push(')');
        } else {
            filter
                .render(&mut sql, &mut binds)
                .map_err(|e| self.rejected(e))?;
        }
        Ok((sql, binds))
    }

    fn rejected(&self, error: ChError) -> Error {
        rejected(&self.shared.endpoint, self.tenant(), error)
    }

    fn scope_for_errors(&self) -> Option<switchyard_core::TenantScope> {
        self.scoped.as_ref().map(|s| match s {
            Scoped::Database { tenant, database } => switchyard_core::TenantScope::new(
                tenant.clone(),
                Isolation::Database,
                Arc::clone(database),
                "",
            ),
            Scoped::Row { tenant, column } => switchyard_core::TenantScope::new(
                tenant.clone(),
                Isolation::Row,
                tenant.as_str(),
                Arc::clone(column),
            ),
        })
    }

    /// Runs one query within the query timeout and maps its error; a tenant
    /// database found missing is forgotten by the provisioning cache.
    async fn run<T>(
        &self,
        fut: impl Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, Error> {
        let timeout = self.shared.query_timeout;
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                let scope = self.scope_for_errors();
                let error = ch_error(&self.shared.endpoint, scope.as_ref(), e);
                if let Error::TenantNotProvisioned { name, .. } = &error {
                    self.shared.provisioned.forget(name);
                }
                Err(error)
            }
            Err(_) => Err(Error::backend(
                &self.shared.endpoint,
                self.tenant(),
                BackendErrorKind::Io,
                ChError::QueryTimeout(timeout),
            )),
        }
    }
}

impl fmt::Debug for ChConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChConnection")
            .field("endpoint", &self.shared.endpoint)
            .field("tenant", &self.tenant())
            .field("isolation", &self.isolation())
            .field("database", &self.database())
            .finish_non_exhaustive()
    }
}

/// A `SELECT` being built on a [`ChConnection`]; see [`ChConnection::select`].
#[must_use = "a select does nothing until fetch_all is awaited"]
pub struct Select<'c, T> {
    conn: &'c ChConnection,
    table: String,
    filter: Filter,
    order: Vec<(String, bool)>,
    limit: Option<u64>,
    _row: PhantomData<fn() -> T>,
}

impl<T> Select<'_, T>
where
    T: RowOwned + RowRead,
{
    /// Adds a filter (ANDed with any before it and with the tenant rule).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = std::mem::take(&mut self.filter).and(filter);
        self
    }

    /// Orders by `column`, ascending.
    pub fn order_by(mut self, column: &str) -> Self {
        self.order.push((column.to_owned(), false));
        self
    }

    /// Orders by `column`, descending.
    pub fn order_by_desc(mut self, column: &str) -> Self {
        self.order.push((column.to_owned(), true));
        self
    }

    /// Returns at most `n` rows.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Runs the query and collects every row.
    pub async fn fetch_all(self) -> Result<Vec<T>, Error> {
        let conn = self.conn;
        let (table_and_filter, binds) = conn.table_and_filter(&self.table, &self.filter)?;
        let mut sql = format!("SELECT ?fields {table_and_filter}");
        for (i, (column, desc)) in self.order.iter().enumerate() {
            let column = quoted(column).map_err(|e| conn.rejected(e))?;
            sql.push_str(if i == 0 { " ORDER BY " } else { ", " });
            sql.push_str(&column);
            sql.push_str(if *desc { " DESC" } else { " ASC" });
        }
        if let Some(n) = self.limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        // Only once everything the caller passed is validated: a refused
        // query does no I/O at all.
        conn.check_row_table(&self.table).await?;
        let query = bind_all(conn.client.query(&sql), &binds);
        conn.run(query.fetch_all::<T>()).await
    }
}

impl<T> fmt::Debug for Select<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Select")
            .field("table", &self.table)
            .field("filter", &self.filter)
            .field("order", &self.order)
            .field("limit", &self.limit)
            .finish()
    }
}
