//! The handle a checkout derefs to: a client, the shared settings, and the
//! tenant confinement it applies to every collection it opens.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mongodb::{Client, Database};
use switchyard_core::{EndpointId, Error, GatePermit, Isolation, TenantId, TenantScope};

use crate::collection::ScopedCollection;
use crate::error::{rejected, MongoError};
use crate::names::{
    check_namespace, prefixed, validate_collection, validate_prefix, validate_shared_collection,
    validate_tenant_database,
};
use crate::row::RowGuard;

/// What every handle of one backend shares.
#[derive(Debug)]
pub(crate) struct HandleSettings {
    pub(crate) endpoint: EndpointId,
    pub(crate) database: Arc<str>,
    pub(crate) tenant_field: Arc<str>,
    pub(crate) operation_timeout: Duration,
}

/// Where a handle's collections live and what it adds to their operations.
#[derive(Debug, Clone)]
pub(crate) enum Confinement {
    /// No tenant: the shared database, nothing added.
    Unscoped,
    /// The tenant's own database.
    Database {
        tenant: TenantId,
        database: Arc<str>,
    },
    /// `<prefix>__<collection>` in the shared database.
    Prefix { tenant: TenantId, prefix: Arc<str> },
    /// The shared database, the tenant field on everything.
    Row(RowGuard),
}

impl Confinement {
    /// The confinement for `scope`, checked before anything is sent.
    pub(crate) fn for_scope(
        scope: &TenantScope,
        settings: &HandleSettings,
    ) -> Result<Self, MongoError> {
        let tenant = scope.tenant().clone();
        Ok(match scope.isolation() {
            Isolation::Database => {
                validate_tenant_database(scope.target(), &settings.database)?;
                Confinement::Database {
                    tenant,
                    database: Arc::from(scope.target()),
                }
            }
            Isolation::Schema => {
                validate_prefix(scope.target())?;
                Confinement::Prefix {
                    tenant,
                    prefix: Arc::from(scope.target()),
                }
            }
            Isolation::Row => {
                Confinement::Row(RowGuard::new(Arc::clone(&settings.tenant_field), tenant))
            }
        })
    }

    pub(crate) fn tenant(&self) -> Option<&TenantId> {
        match self {
            Confinement::Unscoped => None,
            Confinement::Database { tenant, .. } | Confinement::Prefix { tenant, .. } => {
                Some(tenant)
            }
            Confinement::Row(guard) => Some(guard.tenant()),
        }
    }

    /// The database and real collection name behind `name`, with `shared`
    /// the backend's shared database.
    pub(crate) fn namespace<'a>(
        &'a self,
        shared: &'a str,
        name: &str,
    ) -> Result<(&'a str, String), MongoError> {
        let (database, real) = match self {
            Confinement::Unscoped => {
                validate_collection(name)?;
                (shared, name.to_owned())
            }
            Confinement::Database { database, .. } => {
                validate_collection(name)?;
                (&**database, name.to_owned())
            }
            Confinement::Prefix { prefix, .. } => (shared, prefixed(prefix, name)?),
            Confinement::Row(_) => {
                validate_shared_collection(name)?;
                (shared, name.to_owned())
            }
        };
        check_namespace(database, &real)?;
        Ok((database, real))
    }

    fn isolation(&self) -> Option<Isolation> {
        match self {
            Confinement::Unscoped => None,
            Confinement::Database { .. } => Some(Isolation::Database),
            Confinement::Prefix { .. } => Some(Isolation::Schema),
            Confinement::Row(_) => Some(Isolation::Row),
        }
    }
}

/// A MongoDB handle from a [`MongoBackend`](crate::MongoBackend): what a
/// [`Checkout`](switchyard_core::Checkout) derefs to.
///
/// The driver pools connections itself and has no checkout object, so a handle
/// is not a connection: it holds a share of the backend's in-flight bound (one
/// of `max_size` permits) and knows which tenant it serves. Every collection it
/// opens ([`MongoConn::collection`]) is confined to that tenant:
///
/// - database isolation: the tenant's database (the scope's target);
/// - collection-prefix isolation: `<target>__<name>` in the shared database;
/// - row isolation: the shared database, with the tenant field added to every
///   filter, document, update and pipeline.
///
/// A scoped handle never hands out the driver's `Client`, `Database` or
/// `Collection` (each of which reaches every database through `.client()`);
/// [`MongoConn::client`] and [`MongoConn::database`] answer only on unscoped
/// checkouts.
pub struct MongoConn {
    client: Client,
    settings: Arc<HandleSettings>,
    pub(crate) confinement: Confinement,
    _permit: GatePermit,
}

impl MongoConn {
    pub(crate) fn new(client: Client, settings: Arc<HandleSettings>, permit: GatePermit) -> Self {
        Self {
            client,
            settings,
            confinement: Confinement::Unscoped,
            _permit: permit,
        }
    }

    /// The tenant this handle serves, if it is scoped.
    pub fn tenant(&self) -> Option<&TenantId> {
        self.confinement.tenant()
    }

    /// The isolation level applied, if it is scoped.
    pub fn isolation(&self) -> Option<Isolation> {
        self.confinement.isolation()
    }

    /// The endpoint the handle belongs to.
    pub fn endpoint(&self) -> &EndpointId {
        &self.settings.endpoint
    }

    /// The database this handle's collections live in: the tenant's own under
    /// database isolation, otherwise the shared database.
    pub fn database_name(&self) -> &str {
        match &self.confinement {
            Confinement::Database { database, .. } => database,
            _ => &self.settings.database,
        }
    }

    /// The collection `name` as this handle's tenant sees it.
    ///
    /// The name must be non-empty and hold no `$` or NUL, and `system.*`
    /// collections are not reachable. In the shared database (row-level and
    /// unscoped handles), names containing `__` are reserved for
    /// collection-prefix tenants and refused for row-level handles. Refusals
    /// are [`Error::Backend`] of kind `Rejected` with a [`MongoError`] source,
    /// raised before any I/O.
    pub fn collection(&self, name: &str) -> Result<ScopedCollection<'_>, Error> {
        let (database, real) = self
            .namespace(name)
            .map_err(|e| rejected(self.endpoint(), self.tenant(), e))?;
        let inner = self.client.database(database).collection(&real);
        Ok(ScopedCollection::new(self, name, inner))
    }

    /// The database and real collection name behind `name`.
    fn namespace(&self, name: &str) -> Result<(&str, String), MongoError> {
        self.confinement.namespace(&self.settings.database, name)
    }

    /// The driver's client, for unscoped checkouts only (administration,
    /// migrations, transactions). A scoped handle refuses with
    /// [`MongoError::ScopedHandle`].
    pub fn client(&self) -> Result<&Client, Error> {
        match self.confinement {
            Confinement::Unscoped => Ok(&self.client),
            _ => Err(rejected(
                self.endpoint(),
                self.tenant(),
                MongoError::ScopedHandle,
            )),
        }
    }

    /// The database `name`, for unscoped checkouts only.
    pub fn database(&self, name: &str) -> Result<Database, Error> {
        self.client().map(|c| c.database(name))
    }

    /// The driver's client whatever the scope, for this crate's own
    /// commands (never handed to a caller).
    pub(crate) fn raw_client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn settings(&self) -> &HandleSettings {
        &self.settings
    }
}

impl fmt::Debug for MongoConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConn")
            .field("endpoint", &self.settings.endpoint)
            .field("tenant", &self.tenant())
            .field("isolation", &self.isolation())
            .field("database", &self.database_name())
            .finish_non_exhaustive()
    }
}
