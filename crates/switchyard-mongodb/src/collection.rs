//! A collection seen through a checkout's tenant scope.

use std::future::IntoFuture;

use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document};
use mongodb::options::{
    AggregateOptions, CountOptions, DeleteOptions, DistinctOptions, FindOneOptions, FindOptions,
    InsertManyOptions, InsertOneOptions, ReplaceOptions, UpdateOptions,
};
use mongodb::results::{DeleteResult, InsertManyResult, InsertOneResult, UpdateResult};
use mongodb::{Collection, Cursor};
use switchyard_core::{BackendErrorKind, Error};

use crate::conn::{Confinement, MongoConn};
use crate::error::{mongo_error, rejected, MongoError};
use crate::pipeline::{confine, Policy};
use crate::row::check_operators;

/// One collection, confined to the tenant of the handle it came from
/// ([`MongoConn::collection`]).
///
/// It borrows the handle, so it cannot outlive the checkout. Every method
/// checks and rewrites its arguments for the handle's scope before anything is
/// sent (see the crate docs for the rules per isolation level), runs within the
/// backend's [`operation_timeout`](crate::MongoBackendConfig::operation_timeout),
/// and maps driver errors with [`mongo_error`]. Refused arguments come back as
/// [`Error::Backend`] of kind [`BackendErrorKind::Rejected`] whose source is a
/// [`MongoError`] (see [`mongo_cause`](crate::mongo_cause)).
///
/// Documents are [`bson::Document`](mongodb::bson::Document)s, because row-level
/// isolation has to read and extend them; convert typed values with
/// [`mongodb::bson::to_document`] and [`mongodb::bson::from_document`].
pub struct ScopedCollection<'a> {
    conn: &'a MongoConn,
    name: String,
    inner: Collection<Document>,
}

impl<'a> ScopedCollection<'a> {
    pub(crate) fn new(conn: &'a MongoConn, name: &str, inner: Collection<Document>) -> Self {
        Self {
            conn,
            name: name.to_owned(),
            inner,
        }
    }

    /// The name the caller asked for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The collection's real name on the server (`<prefix>__<name>` for a
    /// collection-prefix tenant).
    pub fn real_name(&self) -> &str {
        self.inner.name()
    }

    /// The database the collection lives in.
    pub fn database_name(&self) -> &str {
        self.conn.database_name()
    }

    fn refuse(&self, e: MongoError) -> Error {
        rejected(self.conn.endpoint(), self.conn.tenant(), e)
    }

    fn filter(&self, filter: Document) -> Document {
        match &self.conn.confinement {
            Confinement::Row(guard) => guard.filter(filter),
            _ => filter,
        }
    }

    /// The caller's `options`, refused when they carry a collation on a
    /// row-scoped handle: it would apply to the injected tenant condition as
    /// well as to the caller's filter.
    fn options<T: Collated>(
        &self,
        options: impl Into<Option<T>>,
        operation: &'static str,
    ) -> Result<Option<T>, Error> {
        let options = options.into();
        let row = matches!(self.conn.confinement, Confinement::Row(_));
        if row && options.as_ref().is_some_and(T::has_collation) {
            return Err(self.refuse(MongoError::CollationRefused { operation }));
        }
        Ok(options)
    }

    fn document(&self, doc: Document) -> Result<Document, Error> {
        match &self.conn.confinement {
            Confinement::Row(guard) => guard.document(doc).map_err(|e| self.refuse(e)),
            _ => Ok(doc),
        }
    }

    fn update(&self, mut update: Document, upsert: bool) -> Result<Document, Error> {
        check_operators(&update).map_err(|e| self.refuse(e))?;
        if let Confinement::Row(guard) = &self.conn.confinement {
            guard.check_update(&update).map_err(|e| self.refuse(e))?;
            if upsert {
                guard.seed_upsert(&mut update);
            }
        }
        Ok(update)
    }

    fn pipeline(&self, pipeline: Vec<Document>) -> Result<Vec<Document>, Error> {
        let database = self.conn.database_name();
        let policy = match &self.conn.confinement {
            Confinement::Unscoped => Policy::Open,
            Confinement::Database { .. } => Policy::Database { database },
            Confinement::Prefix { prefix, .. } => Policy::Prefix { database, prefix },
            Confinement::Row(_) => Policy::Row,
        };
        let mut pipeline = confine(pipeline, policy).map_err(|e| self.refuse(e))?;
        if let Confinement::Row(guard) = &self.conn.confinement {
            let mut first = Document::new();
            first.insert("$match", guard.condition());
            pipeline.insert(0, first);
        }
        Ok(pipeline)
    }

    /// Runs one operation within the operation timeout, mapping its errors.
    async fn run<T>(
        &self,
        op: impl IntoFuture<Output = mongodb::error::Result<T>>,
    ) -> Result<T, Error> {
        let settings = self.conn.settings();
        match tokio::time::timeout(settings.operation_timeout, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(mongo_error(&settings.endpoint, self.conn.tenant(), e)),
            Err(_) => Err(Error::backend(
                &settings.endpoint,
                self.conn.tenant(),
                BackendErrorKind::Io,
                MongoError::OperationTimeout {
                    timeout: settings.operation_timeout,
                },
            )),
        }
    }

    /// The tenant's documents matching `filter`, all of them collected (bound
    /// the result with `limit` in `options`).
    pub async fn find(
        &self,
        filter: Document,
        options: impl Into<Option<FindOptions>>,
    ) -> Result<Vec<Document>, Error> {
        let filter = self.filter(filter);
        let options = self.options(options, "find")?;
        self.run(async {
            let cursor = self.inner.find(filter).with_options(options).await?;
            cursor.try_collect().await
        })
        .await
    }

    /// Like [`find`](Self::find), but returns the driver's cursor after the
    /// first batch. Later batches are fetched as the cursor is read, outside
    /// the operation timeout; they come from the same confined query.
    pub async fn find_cursor(
        &self,
        filter: Document,
        options: impl Into<Option<FindOptions>>,
    ) -> Result<Cursor<Document>, Error> {
        let filter = self.filter(filter);
        let options = self.options(options, "find")?;
        self.run(self.inner.find(filter).with_options(options))
            .await
    }

    /// The tenant's first document matching `filter`.
    pub async fn find_one(
        &self,
        filter: Document,
        options: impl Into<Option<FindOneOptions>>,
    ) -> Result<Option<Document>, Error> {
        let filter = self.filter(filter);
        let options = self.options(options, "find")?;
        self.run(self.inner.find_one(filter).with_options(options))
            .await
    }

    /// Inserts `doc` (for a row-level tenant, with the tenant field set).
    pub async fn insert_one(
        &self,
        doc: Document,
        options: impl Into<Option<InsertOneOptions>>,
    ) -> Result<InsertOneResult, Error> {
        let doc = self.document(doc)?;
        let options = options.into();
        self.run(self.inner.insert_one(doc).with_options(options))
            .await
    }

    /// Inserts `docs`; if any one of them is refused, none is sent.
    pub async fn insert_many(
        &self,
        docs: impl IntoIterator<Item = Document>,
        options: impl Into<Option<InsertManyOptions>>,
    ) -> Result<InsertManyResult, Error> {
        let docs = docs
            .into_iter()
            .map(|d| self.document(d))
            .collect::<Result<Vec<_>, _>>()?;
        let options = options.into();
        self.run(self.inner.insert_many(docs).with_options(options))
            .await
    }

    /// Applies the update operators in `update` to the tenant's first document
    /// matching `filter`. An upsert inserts a document that carries the tenant.
    pub async fn update_one(
        &self,
        filter: Document,
        update: Document,
        options: impl Into<Option<UpdateOptions>>,
    ) -> Result<UpdateResult, Error> {
        let options = self.options(options, "update")?;
        let upsert = options.as_ref().and_then(|o| o.upsert) == Some(true);
        let update = self.update(update, upsert)?;
        let filter = self.filter(filter);
        self.run(self.inner.update_one(filter, update).with_options(options))
            .await
    }

    /// Applies the update operators in `update` to every tenant document
    /// matching `filter`.
    pub async fn update_many(
        &self,
        filter: Document,
        update: Document,
        options: impl Into<Option<UpdateOptions>>,
    ) -> Result<UpdateResult, Error> {
        let options = self.options(options, "update")?;
        let upsert = options.as_ref().and_then(|o| o.upsert) == Some(true);
        let update = self.update(update, upsert)?;
        let filter = self.filter(filter);
        self.run(self.inner.update_many(filter, update).with_options(options))
            .await
    }

    /// Replaces the tenant's first document matching `filter` with
    /// `replacement` (for a row-level tenant, with the tenant field set).
    pub async fn replace_one(
        &self,
        filter: Document,
        replacement: Document,
        options: impl Into<Option<ReplaceOptions>>,
    ) -> Result<UpdateResult, Error> {
        let replacement = self.document(replacement)?;
        let filter = self.filter(filter);
        let options = self.options(options, "replace")?;
        self.run(
            self.inner
                .replace_one(filter, replacement)
                .with_options(options),
        )
        .await
    }

    /// Deletes the tenant's first document matching `filter`.
    pub async fn delete_one(
        &self,
        filter: Document,
        options: impl Into<Option<DeleteOptions>>,
    ) -> Result<DeleteResult, Error> {
        let filter = self.filter(filter);
        let options = self.options(options, "delete")?;
        self.run(self.inner.delete_one(filter).with_options(options))
            .await
    }

    /// Deletes every tenant document matching `filter`.
    pub async fn delete_many(
        &self,
        filter: Document,
        options: impl Into<Option<DeleteOptions>>,
    ) -> Result<DeleteResult, Error> {
        let filter = self.filter(filter);
        let options = self.options(options, "delete")?;
        self.run(self.inner.delete_many(filter).with_options(options))
            .await
    }

    /// Counts the tenant's documents matching `filter`.
    pub async fn count_documents(
        &self,
        filter: Document,
        options: impl Into<Option<CountOptions>>,
    ) -> Result<u64, Error> {
        let filter = self.filter(filter);
        let options = self.options(options, "count")?;
        self.run(self.inner.count_documents(filter).with_options(options))
            .await
    }

    /// The distinct values of `field` among the tenant's documents matching
    /// `filter`.
    pub async fn distinct(
        &self,
        field: &str,
        filter: Document,
        options: impl Into<Option<DistinctOptions>>,
    ) -> Result<Vec<Bson>, Error> {
        let filter = self.filter(filter);
        let options = self.options(options, "distinct")?;
        self.run(self.inner.distinct(field, filter).with_options(options))
            .await
    }

    /// Runs `pipeline` over the tenant's documents and collects the results.
    ///
    /// Row-level pipelines start with `{$match: {<field>: <tenant>}}`; stages
    /// that could reach other data are refused or confined (see the crate docs).
    pub async fn aggregate(
        &self,
        pipeline: impl IntoIterator<Item = Document>,
        options: impl Into<Option<AggregateOptions>>,
    ) -> Result<Vec<Document>, Error> {
        let pipeline = self.pipeline(pipeline.into_iter().collect())?;
        let options = self.options(options, "aggregate")?;
        self.run(async {
            let cursor = self.inner.aggregate(pipeline).with_options(options).await?;
            cursor.try_collect().await
        })
        .await
    }
}

impl std::fmt::Debug for ScopedCollection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedCollection")
            .field("name", &self.name)
            .field("database", &self.database_name())
            .field("real_name", &self.real_name())
            .field("tenant", &self.conn.tenant())
            .finish()
    }
}

/// Driver options that may carry a collation.
trait Collated {
    fn has_collation(&self) -> bool;
}

macro_rules! collated {
    ($($options:ty),*) => {
        $(impl Collated for $options {
            fn has_collation(&self) -> bool {
                self.collation.is_some()
            }
        })*
    };
}

collated!(
    AggregateOptions,
    CountOptions,
    DeleteOptions,
    DistinctOptions,
    FindOneOptions,
    FindOptions,
    ReplaceOptions,
    UpdateOptions
);
