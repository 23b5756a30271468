//! Hearth's HTTP front: where every request enters.
//!
//! - `/fn/{tenant}/{function}/...` runs a function ([`invoke`]);
//! - `/v1/...` is the control API, behind bearer tokens ([`control`]);
//! - `/healthz` and `/readyz` are for load balancers and orchestrators;
//! - `/metrics` is for Prometheus ([`metrics`]).
//!
//! Every error leaves through [`ApiError`], the one place that maps errors to
//! statuses and `application/problem+json` bodies.

mod asynchronous;
mod body;
mod control;
mod invoke;
mod meter;
mod metrics;
mod problem;
mod run;
mod tokens;
mod usage;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::{any, get};
use hearth_auth::Auth;
use hearth_engine::Engine;
use hearth_registry::Registry;
use hearth_store::Store;

pub use asynchronous::{DEFAULT_ASYNC_CONCURRENCY, spawn_async_runner};
pub use metrics::observe;
pub use problem::{ApiError, INVOCATION_ID_HEADER};
pub use run::{Pools, keep_warm, spawn_reaper};
pub use usage::NEXT_CURSOR_HEADER;

/// Default largest invocation request body: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 << 20;
/// Default largest deploy upload (manifest and component together): 256 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 256 << 20;
/// Header with the path a function is mounted at, passed to the guest.
pub const BASE_PATH_HEADER: &str = "x-hearth-base-path";
/// Request header that lowers an invocation's QoS class (never raises it);
/// the response echoes the class it ran at.
pub const QOS_HEADER: &str = "x-hearth-qos";
/// Default longest wait in a function's queue before 429/503.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits applied at the HTTP edge.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest invocation request body, in bytes.
    pub max_body_bytes: u64,
    /// Largest deploy upload, in bytes.
    pub max_upload_bytes: u64,
    /// Longest a request waits for an instance before it is refused.
    pub queue_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// Functions and versions.
    pub registry: Registry,
    /// Token checks.
    pub auth: Auth,
    /// The wasmtime engine.
    pub engine: Engine,
    /// Admission, queues and the instance pools.
    pub pools: Pools,
    /// Per-tenant limits.
    pub tenants: hearth_scheduler::TenantGate,
    /// The metadata store (for readiness).
    pub store: Arc<dyn Store>,
    /// Edge limits.
    pub limits: HttpLimits,
    /// Where usage records go; `None` runs without metering (benchmarks).
    pub usage: Option<hearth_metering::UsageLog>,
    /// Prices records.
    pub prices: Arc<hearth_metering::PriceTable>,
    /// Metrics.
    pub telemetry: Arc<hearth_telemetry::Telemetry>,
    /// Wakes the asynchronous invocation runner (a submission, a slot freed).
    async_queue: tokio::sync::Notify,
    draining: AtomicBool,
}

impl AppState {
    /// Shared state for the router.
    #[expect(
        clippy::too_many_arguments,
        reason = "each part is built by `serve` from its own flags"
    )]
    pub fn new(
        registry: Registry,
        auth: Auth,
        engine: Engine,
        pools: Pools,
        tenants: hearth_scheduler::TenantGate,
        store: Arc<dyn Store>,
        limits: HttpLimits,
        usage: Option<hearth_metering::UsageLog>,
        prices: hearth_metering::PriceTable,
        telemetry: Arc<hearth_telemetry::Telemetry>,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            registry,
            auth,
            engine,
            pools,
            tenants,
            store,
            limits,
            usage,
            prices: Arc::new(prices),
            telemetry,
            async_queue: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
        })
    }

    /// Marks the server as shutting down: `/readyz` answers 503 from now on,
    /// so load balancers stop sending new work while in-flight work finishes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}

/// The complete HTTP router.
pub fn router(state: Arc<AppState>) -> Router {
    let own = Router::new()
        .nest("/v1", control::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::metrics))
        .route("/readyz", get(readyz))
        .layer(axum::middleware::map_response(problem::framework_errors_as_problems));
    Router::new()
        .route("/fn/{tenant}/{function}", any(invoke::handle))
        .route("/fn/{tenant}/{function}/", any(invoke::handle))
        .route("/fn/{tenant}/{function}/{*rest}", any(invoke::handle))
        .merge(own)
        .fallback(not_found)
        .with_state(state)
}

/// Authenticates the request's `Authorization` header.
pub(crate) async fn authenticate(
    state: &AppState,
    headers: &http::HeaderMap,
) -> Result<hearth_auth::Principal, ApiError> {
    let authorization = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    Ok(state.auth.authenticate(authorization).await?)
}

/// Refuses (413) a body whose declared `Content-Length` exceeds `limit`,
/// before any of it is read; bodies without one are counted as they stream.
pub(crate) fn check_declared_length(headers: &http::HeaderMap, limit: u64) -> Result<(), ApiError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit => Err(ApiError::PayloadTooLarge { limit }),
        _ => Ok(()),
    }
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable("shutting down".into()));
    }
    state
        .store
        .tenant_exists(hearth_auth::DEFAULT_TENANT)
        .await
        .map_err(|e| ApiError::Unavailable(format!("store unavailable: {e}")))?;
    Ok(axum::Json(serde_json::json!({ "status": "ready" })))
}

async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}
