//! Hearth's HTTP front: where every request enters.
//!
//! - `/fn/{tenant}/{function}/...` runs a function ([`invoke`]): it resolves
//!   and authenticates, shapes the guest's request and hands it to the
//!   invoker (`hearth-invoker`), which runs it and records it;
//! - `/healthz` and `/readyz` are for load balancers and orchestrators;
//! - `/metrics` is for Prometheus;
//! - the other surfaces stand on this crate and are handed to [`App::new`]:
//!   the control API `/v1` (`hearth-control`) and the Open Inference
//!   Protocol `/v2` (`hearth-oip`).
//!
//! Every error leaves through [`ApiError`], the one place that maps errors to
//! statuses and `application/problem+json` bodies; [`AppState`],
//! [`authenticate`] and [`scope`] are what every surface's handlers share.

mod invoke;
mod problem;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hearth_api::{Health, TenantQuery};
use hearth_auth::{Action, Auth, Principal};
use hearth_invoker::{Invoker, RenderFailure};
use hearth_metering::UsageQueries;
use http::{HeaderMap, HeaderName, HeaderValue, header};

pub use invoke::requested_class;
pub use problem::{ApiError, FunctionAnswer, INVOCATION_ID_HEADER};

/// Default largest deploy upload (manifest and component together): 256 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 256 << 20;
/// How long `/readyz` stays ready while the store does not answer: a node
/// serves deployed functions from its caches and spools usage records
/// locally, so a brief outage of a cluster's PostgreSQL (a restart, a
/// failover) must not take every node out of its load balancer at once.
pub const STORE_OUTAGE_GRACE: Duration = Duration::from_secs(30);
/// Longest `/readyz` waits for the store to answer.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Request header that lowers an invocation's QoS class (never raises it);
/// the response echoes the class it ran at.
pub const QOS_HEADER: HeaderName = HeaderName::from_static("x-hearth-qos");
/// Response header: the version of the function that answered.
pub const VERSION_HEADER: HeaderName = HeaderName::from_static("x-hearth-version");
/// Request header: a caller's key that keeps it on one version of an
/// alias's split (hashed; the same key, the same version).
pub const STICKY_HEADER: HeaderName = HeaderName::from_static("x-hearth-sticky");

/// Who may read `/metrics`: it names every tenant's functions and their
/// traffic, so by default only operator tokens and the metrics token may.
#[derive(Debug, Clone, Default)]
pub struct MetricsAccess {
    /// A token for scrapers (`--metrics-token`), besides operator tokens.
    pub token: Option<String>,
    /// Anyone may scrape (`--public-metrics`: a private network only).
    pub public: bool,
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// Runs invocations; owns the runtime below it.
    pub invoker: Arc<Invoker>,
    /// Token checks.
    pub auth: Auth,
    /// Largest deploy upload, in bytes.
    pub max_upload_bytes: u64,
    /// Where usage exports read: this node's log, or in a cluster the
    /// fleet's ledger (`None` with metering off).
    pub usage: Option<Arc<dyn UsageQueries>>,
    /// Who may read `/metrics`.
    pub metrics: MetricsAccess,
    draining: AtomicBool,
    /// When the store last answered `/readyz` (Unix ms).
    store_answered_at_ms: AtomicI64,
}

impl AppState {
    /// Shared state for the router.
    pub fn new(
        invoker: Arc<Invoker>,
        auth: Auth,
        max_upload_bytes: u64,
        usage: Option<Arc<dyn UsageQueries>>,
        metrics: MetricsAccess,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            invoker,
            auth,
            max_upload_bytes,
            usage,
            metrics,
            draining: AtomicBool::new(false),
            store_answered_at_ms: AtomicI64::new(hearth_store::now_ms()),
        })
    }

    /// Marks the server as shutting down: `/readyz` answers 503 from now on,
    /// so load balancers stop sending new work while in-flight work finishes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}

/// How the asynchronous runner stores a failed run: the problem answer the
/// synchronous route would have sent.
pub fn render_failure() -> RenderFailure {
    Arc::new(|failure, id| ApiError::from(failure).render(id))
}

/// Hearth's HTTP service: the invocation route, health, readiness and
/// metrics, and the `surfaces` that stand on this crate (the control API,
/// the inference protocol). Errors on every route but a function's own
/// answers leave as problem bodies.
///
/// `/fn/{tenant}/{function}/...` is matched by hand and goes straight to
/// [`invoke`]: it is every invocation's path, and axum's route table,
/// path extractor and boxed per-route services, with their allocations,
/// cost a warm `hello` about 5 µs of ~85 µs of CPU (`scripts/load-ab.sh`,
/// 32 connections). Everything else goes through the axum router.
#[derive(Clone)]
pub struct App {
    state: Arc<AppState>,
    router: Router,
}

impl App {
    /// The service over `state`, with `surfaces` beside the built-in routes.
    pub fn new(state: Arc<AppState>, surfaces: impl IntoIterator<Item = Router<Arc<AppState>>>) -> App {
        let own = surfaces.into_iter().fold(
            Router::new()
                .route("/healthz", get(healthz))
                .route("/metrics", get(metrics))
                .route("/readyz", get(readyz)),
            Router::merge,
        );
        let router = Router::new()
            .merge(own.layer(axum::middleware::map_response(problem::framework_errors_as_problems)))
            .fallback(not_found)
            .with_state(state.clone());
        App { state, router }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl<B> tower::Service<http::Request<B>> for App
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let request = request.map(axum::body::Body::new);
        match invoke::Target::parse(request.uri().path()) {
            Some(target) => {
                let state = self.state.clone();
                Box::pin(async move { Ok(invoke::run(state, target, request).await) })
            }
            None => Box::pin(self.router.call(request)),
        }
    }
}

/// Authenticates the request's `Authorization` header.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    Ok(state.auth.authenticate(authorization).await?)
}

/// Authenticates the caller and picks the tenant a control call acts in:
/// the token's own, or for operator tokens `?tenant=` (default `default`).
pub async fn scope(
    state: &AppState,
    headers: &HeaderMap,
    query: &TenantQuery,
    action: Action,
) -> Result<(String, Principal), ApiError> {
    let principal = authenticate(state, headers).await?;
    let tenant = query.tenant.clone().unwrap_or_else(|| principal.tenant.clone());
    hearth_manifest::validate_name(&tenant).map_err(|reason| ApiError::BadRequest {
        detail: format!("tenant: {reason}"),
        key: None,
    })?;
    principal.authorize(action, &tenant)?;
    Ok((tenant, principal))
}

/// Refuses (413) a body whose declared `Content-Length` exceeds `limit`,
/// before any of it is read; bodies without one are counted as they stream.
pub fn check_declared_length(headers: &HeaderMap, limit: u64) -> Result<(), u64> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit => Err(limit),
        _ => Ok(()),
    }
}

async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok".into() })
}

/// `GET /readyz`: 503 while shutting down, while the usage log cannot
/// write (invocations are refused then), or once the store has not answered
/// for [`STORE_OUTAGE_GRACE`]; ready otherwise.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<axum::Json<Health>, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable("shutting down".into()));
    }
    // Every invocation is refused while the usage log cannot write.
    if let Some(log) = state.invoker.usage()
        && !log.healthy()
    {
        return Err(ApiError::Unavailable("the usage log cannot write".into()));
    }
    let check = state.invoker.store().tenant_exists(hearth_auth::DEFAULT_TENANT);
    let error = match tokio::time::timeout(STORE_CHECK_TIMEOUT, check).await {
        Ok(Ok(_)) => {
            state
                .store_answered_at_ms
                .store(hearth_store::now_ms(), Ordering::Release);
            return Ok(axum::Json(Health { status: "ready".into() }));
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no answer within {STORE_CHECK_TIMEOUT:?}"),
    };
    let silent_ms = hearth_store::now_ms() - state.store_answered_at_ms.load(Ordering::Acquire);
    let grace_ms = i64::try_from(STORE_OUTAGE_GRACE.as_millis()).unwrap_or(i64::MAX);
    if silent_ms >= grace_ms {
        return Err(ApiError::Unavailable(format!(
            "the store has not answered for {} s: {error}",
            silent_ms / 1000
        )));
    }
    tracing::warn!(error = %error, "the store does not answer; serving from caches");
    Ok(axum::Json(Health {
        status: "ready (the store does not answer; serving from caches)".into(),
    }))
}

/// `GET /metrics`: OpenTelemetry metrics in the Prometheus text format, for
/// the metrics token or an operator token (see [`MetricsAccess`]).
async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    if !state.metrics.public {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let scraper = matches!((&state.metrics.token, bearer), (Some(token), Some(given)) if hearth_auth::secrets_match(token, given));
        if !scraper && !authenticate(&state, &headers).await?.operator {
            return Err(ApiError::Forbidden(
                "/metrics needs an operator token or the metrics token (--metrics-token)".into(),
            ));
        }
    }
    let text = state
        .invoker
        .telemetry()
        .render()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(hearth_telemetry::PROMETHEUS_CONTENT_TYPE),
    );
    Ok(response)
}

async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}
