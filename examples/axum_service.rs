//! An axum service in front of a switchyard cluster, with tenant isolation at
//! checkout.
//!
//! - A middleware layer reads the tenant from the `x-tenant-id` header and
//!   validates it with [`TenantId::new`]: missing or invalid → `400` with the
//!   typed error message; nothing reaches the database.
//! - The [`TenantConn`] extractor checks out a connection scoped to that tenant
//!   (`Intent::Read` for `GET`, `Intent::Write` otherwise) from the cluster in
//!   the router state: quota exceeded → `429`, no healthy endpoint / no primary
//!   / timeout → `503`.
//! - `GET /notes` lists the tenant's notes, `POST /notes` (`{"body": "..."}`)
//!   inserts one. Handlers write plain `notes`: schema isolation confines the
//!   connection's `search_path` to `tenant_<id>`.
//! - Read-your-writes: `POST` answers with an `x-switchyard-token` header (the
//!   write's causal token); a `GET` that sends it back is served by the standby
//!   once it has replayed that write (else, after a bounded wait, by the
//!   primary), so a client always sees its own notes. A malformed or foreign
//!   token is a `400`.
//!
//! `main` starts the test bed (a local PostgreSQL primary and standby),
//! provisions two tenants, serves on `127.0.0.1:0`, then acts as its own
//! client over a raw HTTP/1.1 socket and checks that each tenant sees only its
//! own notes, reading right after writing with the token and no other wait.
//! Run with `cargo run --example axum_service`.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use switchyard::postgres::{PgBackend, PgBackendConfig};
use switchyard::router::config::HealthConfig;
use switchyard::router::{CheckoutOptions, EndpointConfig};
use switchyard::{
    Checkout, Cluster, ClusterConfig, Error, Intent, Isolation, Role, TenantId, TenantRegistry,
    TierPolicy,
};
use switchyard_testkit::PgCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The header carrying the tenant.
const TENANT_HEADER: &str = "x-tenant-id";
/// The header carrying a causal token: out on writes, back in on reads.
const TOKEN_HEADER: &str = "x-switchyard-token";
/// The tenants provisioned by `main`.
const TENANTS: [&str; 2] = ["acme", "globex"];

type AppCluster = Cluster<PgBackend>;

// ---------------------------------------------------------------------------
// Errors as HTTP responses.

/// Everything a request can fail with, mapped to a status code.
#[derive(Debug)]
enum ApiError {
    /// No `x-tenant-id` header (or not valid UTF-8).
    MissingTenant,
    /// A switchyard error: invalid tenant, checkout or query failure.
    Switchyard(Error),
    /// A database error from a handler's query.
    Sql(sqlx::Error),
    /// A malformed request body.
    BadBody(&'static str),
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self::Switchyard(e)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::Sql(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            Self::MissingTenant => (
                StatusCode::BAD_REQUEST,
                format!("missing {TENANT_HEADER} header"),
            ),
            Self::BadBody(why) => (StatusCode::BAD_REQUEST, (*why).to_string()),
            Self::Switchyard(e) => {
                let status = match e {
                    Error::InvalidTenant(_) => StatusCode::BAD_REQUEST,
                    Error::UnknownTenant { .. } | Error::TenantNotProvisioned { .. } => {
                        StatusCode::FORBIDDEN
                    }
                    Error::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
                    Error::Causal { reason, .. } => match reason {
                        switchyard::CausalError::NotApplied => StatusCode::SERVICE_UNAVAILABLE,
                        switchyard::CausalError::Lost => StatusCode::CONFLICT,
                        _ => StatusCode::BAD_REQUEST,
                    },
                    Error::NoHealthyEndpoint { .. }
                    | Error::NoPrimary { .. }
                    | Error::Timeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                (status, e.to_string())
            }
            Self::Sql(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

// ---------------------------------------------------------------------------
// The tenant layer and the scoped-connection extractor.

/// The validated tenant of a request, put in its extensions by [`tenant_layer`].
#[derive(Debug, Clone)]
struct Tenant(TenantId);

/// Middleware: reads and validates `x-tenant-id`, rejecting the request before
/// any handler or database work if it is missing or invalid.
async fn tenant_layer(mut req: Request, next: Next) -> Result<Response, ApiError> {
    let raw = req
        .headers()
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::MissingTenant)?;
    let tenant = TenantId::new(raw).map_err(Error::from)?;
    req.extensions_mut().insert(Tenant(tenant));
    Ok(next.run(req).await)
}

/// A connection checked out for the request's tenant, scoped to it, returned
/// to the pool (and unscoped) when the handler drops it.
struct TenantConn(Checkout<PgBackend>);

impl FromRequestParts<AppCluster> for TenantConn {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        cluster: &AppCluster,
    ) -> Result<Self, Self::Rejection> {
        let Tenant(tenant) = parts
            .extensions
            .get::<Tenant>()
            .ok_or(ApiError::MissingTenant)?;
        let intent = match parts.method {
            Method::GET | Method::HEAD => Intent::Read,
            _ => Intent::Write,
        };
        let token = parts
            .headers
            .get(TOKEN_HEADER)
            .map(|v| cluster.parse_token(v.to_str().unwrap_or_default()))
            .transpose()?;
        let conn = match (intent, token) {
            // A read after the client's own write: somewhere that has it.
            (Intent::Read, Some(token)) => {
                cluster
                    .checkout_after(&token, Some(tenant), CheckoutOptions::new())
                    .await?
            }
            _ => cluster.checkout(intent, Some(tenant)).await?,
        };
        Ok(Self(conn))
    }
}

// ---------------------------------------------------------------------------
// Handlers: plain SQL on `notes`, the scope decides whose.

async fn list_notes(TenantConn(mut conn): TenantConn) -> Result<Json<Value>, ApiError> {
    let notes: Vec<String> = sqlx::query_scalar("SELECT body FROM notes ORDER BY id")
        .fetch_all(&mut *conn)
        .await?;
    Ok(Json(json!({
        "tenant": conn.tenant().map(TenantId::as_str),
        "endpoint": conn.endpoint().as_str(),
        "notes": notes,
    })))
}

async fn add_note(
    State(cluster): State<AppCluster>,
    TenantConn(mut conn): TenantConn,
    Json(body): Json<Value>,
) -> Result<(StatusCode, [(&'static str, String); 1], Json<Value>), ApiError> {
    let text = body
        .get("body")
        .and_then(Value::as_str)
        .ok_or(ApiError::BadBody("expected {\"body\": \"...\"}"))?;
    let id: i64 = sqlx::query_scalar("INSERT INTO notes (body) VALUES ($1) RETURNING id")
        .bind(text)
        .fetch_one(&mut *conn)
        .await?;
    // Committed (autocommit): the token names where the write reached.
    let token = cluster.token(&mut conn).await?;
    Ok((
        StatusCode::CREATED,
        [(TOKEN_HEADER, token.to_string())],
        Json(json!({ "id": id, "endpoint": conn.endpoint().as_str() })),
    ))
}

fn app(cluster: AppCluster) -> Router {
    Router::new()
        .route("/notes", get(list_notes).post(add_note))
        .layer(middleware::from_fn(tenant_layer))
        .with_state(cluster)
}

// ---------------------------------------------------------------------------
// main: test bed, cluster, server, and a self-check as the client.

#[tokio::main]
async fn main() -> Result<(), Box<dyn StdError>> {
    let started = Instant::now();
    let pg = PgCluster::start(1).await?;
    println!(
        "test bed: PostgreSQL primary {} + standby {} up in {} ms",
        pg.primary().addr(),
        pg.standbys()[0].addr(),
        started.elapsed().as_millis()
    );

    let primary = Arc::new(PgBackend::new(PgBackendConfig::new(
        "pg-primary",
        pg.primary().url(),
    ))?);
    let standby = Arc::new(PgBackend::new(PgBackendConfig::new(
        "pg-standby",
        pg.standbys()[0].url(),
    ))?);

    // Provision each tenant's schema, as an operator would.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(pg.primary().url()).await?;
    for t in TENANTS {
        for ddl in [
            format!("CREATE SCHEMA IF NOT EXISTS tenant_{t}"),
            format!(
                "CREATE TABLE IF NOT EXISTS tenant_{t}.notes \
                 (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text NOT NULL)"
            ),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
                .execute(&mut admin)
                .await?;
        }
    }
    pg.wait_replayed(&pg.standbys()[0], Duration::from_secs(5))
        .await?;

    let tenants = TenantRegistry::new()
        .with_tier(
            "standard",
            TierPolicy::new(Isolation::Schema).with_max_connections(4),
        )
        .with_default_tier("standard");
    let cluster = Cluster::builder("notes")
        .engine("postgres")
        .config(ClusterConfig {
            health: HealthConfig {
                interval: Duration::from_millis(250),
                timeout: Duration::from_millis(200),
                ..HealthConfig::default()
            },
            ..ClusterConfig::default()
        })
        .tenants(tenants)
        .endpoint(primary, EndpointConfig::new(Role::Primary))
        .endpoint(standby, EndpointConfig::new(Role::Replica))
        .build()?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app(cluster)).await });
    println!("serving on http://{addr}");

    // Each tenant writes its own notes, keeping the last write's token...
    let mut tokens = Vec::new();
    for t in TENANTS {
        let mut last = None;
        for n in 1..=2 {
            let body = json!({ "body": format!("{t} note {n}") }).to_string();
            let (status, reply, token) = http(addr, "POST", Some(t), Some(&body), None).await?;
            println!(
                "POST /notes  x-tenant-id: {t:<7} -> {status} {reply} {TOKEN_HEADER}: {token:?}"
            );
            check(status == 201, "POST should be 201")?;
            last = token;
        }
        tokens.push(last.ok_or("POST should answer with a token")?);
    }
    // ...and at once reads back exactly those, sending the token back: the
    // read sees the writes wherever it is served, with no wait in between.
    for (t, token) in TENANTS.into_iter().zip(&tokens) {
        let (status, reply, _) = http(addr, "GET", Some(t), None, Some(token)).await?;
        println!("GET  /notes  x-tenant-id: {t:<7} {TOKEN_HEADER}: {token} -> {status} {reply}");
        check(status == 200, "GET should be 200")?;
        let reply: Value = serde_json::from_str(&reply)?;
        let want: Vec<Value> = (1..=2).map(|n| json!(format!("{t} note {n}"))).collect();
        check(
            reply["notes"].as_array() == Some(&want),
            "a tenant must see exactly its own notes",
        )?;
    }

    // Bad and missing tenants are turned away before any checkout.
    let bad = "acme'; DROP SCHEMA tenant_acme; --";
    let (status, reply, _) = http(addr, "GET", Some(bad), None, None).await?;
    println!("GET  /notes  x-tenant-id: {bad:?} -> {status} {reply}");
    check(status == 400, "an invalid tenant should be 400")?;
    let (status, reply, _) = http(addr, "GET", None, None, None).await?;
    println!("GET  /notes  (no x-tenant-id) -> {status} {reply}");
    check(status == 400, "a missing tenant should be 400")?;
    let (status, reply, _) = http(addr, "GET", Some("acme"), None, Some("sy1.0.t.1.1.1")).await?;
    println!("GET  /notes  {TOKEN_HEADER}: (another cluster's) -> {status} {reply}");
    check(status == 400, "a foreign token should be 400")?;

    server.abort();
    println!(
        "ok: 2 tenants isolated and reading their own writes, invalid/missing tenant rejected ({} ms)",
        started.elapsed().as_millis()
    );
    Ok(())
}

fn check(ok: bool, what: &str) -> Result<(), Box<dyn StdError>> {
    if ok {
        Ok(())
    } else {
        Err(format!("self-check failed: {what}").into())
    }
}

/// A minimal HTTP/1.1 client: one request per connection (`Connection:
/// close`), returning the status code, the body and the token header.
async fn http(
    addr: SocketAddr,
    method: &str,
    tenant: Option<&str>,
    body: Option<&str>,
    token: Option<&str>,
) -> Result<(u16, String, Option<String>), Box<dyn StdError>> {
    let mut req = format!("{method} /notes HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = tenant {
        req.push_str(&format!("{TENANT_HEADER}: {t}\r\n"));
    }
    if let Some(token) = token {
        req.push_str(&format!("{TOKEN_HEADER}: {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));

    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await??;
    let raw = String::from_utf8(raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("malformed response")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("malformed status line")?;
    let token = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case(TOKEN_HEADER)
            .then(|| value.trim().to_string())
    });
    Ok((status, body.to_string(), token))
}
