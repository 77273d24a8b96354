//! tower glue: a cluster as a `Service` that yields checkouts.
//!
//! With it, tower's own layers compose in front of the router: `timeout`,
//! `retry`, `concurrency_limit`, `load_shed`, `buffer`.
//!
//! `poll_ready` is ready while the cluster has any endpoint that could serve a
//! checkout, and pending (woken by the next routing change) while it has none,
//! so `load_shed` rejects at once instead of queueing behind a dead cluster.
//! Ready does not promise a primary: a write may still wait for one, up to
//! `failover_timeout`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use switchyard_core::{Backend, Checkout, Error, Intent, TenantId};

use crate::checkout::CheckoutOptions;
use crate::cluster::Cluster;

/// A request to a [`ClusterService`]: what the checkout is for and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Read or write.
    pub intent: Intent,
    /// The tenant to scope the connection to, if any.
    pub tenant: Option<TenantId>,
    /// Deadline and idempotency.
    pub options: CheckoutOptions,
}

impl Route {
    /// An unscoped read.
    pub fn read() -> Self {
        Self {
            intent: Intent::Read,
            tenant: None,
            options: CheckoutOptions::default(),
        }
    }

    /// An unscoped write.
    pub fn write() -> Self {
        Self {
            intent: Intent::Write,
            ..Self::read()
        }
    }

    /// Scopes the checkout to `tenant`.
    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Sets the options.
    pub fn options(mut self, options: CheckoutOptions) -> Self {
        self.options = options;
        self
    }
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A [`Cluster`] as a [`tower::Service`]`<`[`Route`]`>` whose response is a
/// [`Checkout`].
pub struct ClusterService<B: Backend> {
    cluster: Cluster<B>,
    wait: Option<Wait>,
}

impl<B: Backend> ClusterService<B> {
    /// Wraps `cluster`.
    pub fn new(cluster: Cluster<B>) -> Self {
        Self {
            cluster,
            wait: None,
        }
    }
}

impl<B: Backend> Clone for ClusterService<B> {
    fn clone(&self) -> Self {
        Self::new(self.cluster.clone())
    }
}

impl<B: Backend> fmt::Debug for ClusterService<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterService")
            .field("cluster", &self.cluster.name())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Cluster<B> {
    /// This cluster as a tower service.
    pub fn service(&self) -> ClusterService<B> {
        ClusterService::new(self.clone())
    }
}

impl<B: Backend> tower::Service<Route> for ClusterService<B> {
    type Response = Checkout<B>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<Checkout<B>, Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            let shared = &self.cluster.shared;
            if self.wait.is_none() {
                // Subscribe before looking, so a change in between is not missed.
                let mut changes = shared.generation.subscribe();
                if shared.snapshot.load().any_available() {
                    return Poll::Ready(Ok(()));
                }
                self.wait = Some(Box::pin(async move {
                    let _ = changes.changed().await;
                }));
            }
            let Some(wait) = self.wait.as_mut() else {
                continue;
            };
            match wait.as_mut().poll(cx) {
                Poll::Ready(()) => self.wait = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn call(&mut self, route: Route) -> Self::Future {
        let cluster = self.cluster.clone();
        Box::pin(async move {
            cluster
                .checkout_with(route.intent, route.tenant.as_ref(), route.options)
                .await
        })
    }
}
