//! Asynchronous invocations: `POST /v1/functions/{name}/invocations` accepts
//! a request at once (202 with an id), a runner executes it at the `batch`
//! class when capacity allows, and `GET .../invocations/{id}` returns its
//! state and the stored response. Requests and responses live in the store,
//! so both survive a restart; a run cut short by a stop runs again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hearth_auth::Action;
use hearth_manifest::Qos;
use hearth_store::{AsyncInvocation, AsyncState, StoredMessage, format_ms, now_ms};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::meter::{Meter, now_us};
use crate::run::run_function;
use crate::{ApiError, AppState, BASE_PATH_HEADER, INVOCATION_ID_HEADER, authenticate, check_declared_length};

/// Default number of asynchronous invocations running at once.
pub const DEFAULT_ASYNC_CONCURRENCY: usize = 16;
/// How long the runner waits after the scheduler refused a run before it
/// tries the queue again.
const REFUSED_BACKOFF: Duration = Duration::from_secs(1);
/// Largest response body stored for an asynchronous invocation; a larger
/// one fails the invocation (fetch big results synchronously).
const MAX_STORED_RESPONSE_BYTES: usize = 32 << 20;
/// How often the runner looks at the queue without being woken (a safety
/// net: submissions wake it at once).
const POLL_EVERY: Duration = Duration::from_secs(5);

/// `?path=/below/the/mount?x=1&method=PUT`: what the guest will see.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Submit {
    #[serde(default = "root")]
    path: String,
    #[serde(default = "post")]
    method: String,
    tenant: Option<String>,
}

fn root() -> String {
    "/".into()
}

fn post() -> String {
    "POST".into()
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct TenantOnly {
    tenant: Option<String>,
}

/// `POST /v1/functions/{name}/invocations`: stores the request and answers
/// 202 with the invocation's id and where to ask for its result.
pub(crate) async fn submit(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<Submit>,
    request: Request,
) -> Result<Response, ApiError> {
    let principal = authenticate(&state, request.headers()).await?;
    let tenant = query.tenant.clone().unwrap_or_else(|| principal.tenant.clone());
    principal.authorize(Action::Invoke, &tenant)?;
    let deployed = state.registry.resolve(&tenant, &name).await?;
    let method: http::Method = query.method.parse().map_err(|_| ApiError::BadRequest {
        detail: format!("`method={}` is not an HTTP method", query.method),
        key: None,
    })?;
    if !query.path.starts_with('/') || query.path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(ApiError::BadRequest {
            detail: format!(
                "`path={}` must be an absolute path (with an optional query)",
                query.path
            ),
            key: None,
        });
    }
    let limit = state.limits.max_body_bytes;
    check_declared_length(request.headers(), limit)?;
    let (parts, body) = request.into_parts();
    let body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })?
        .to_bytes();
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| *name != header::AUTHORIZATION && *name != header::HOST && *name != header::CONTENT_LENGTH)
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect();
    let id = Uuid::now_v7().to_string();
    let invocation = AsyncInvocation {
        id: id.clone(),
        tenant: tenant.clone(),
        function: deployed.version.name.clone(),
        state: AsyncState::Queued,
        attempts: 0,
        submitted_at_ms: now_ms(),
        started_at_ms: None,
        finished_at_ms: None,
        request: StoredMessage {
            method: method.to_string(),
            uri: query.path,
            status: 0,
            headers,
            body: body.to_vec(),
        },
        response: None,
    };
    state
        .store
        .insert_async(invocation.clone())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    state.async_queue.notify_one();
    let location = format!("/v1/functions/{name}/invocations/{id}");
    let mut response = (StatusCode::ACCEPTED, Json(view(&invocation, false))).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(INVOCATION_ID_HEADER, value);
    }
    Ok(response)
}

/// `GET /v1/functions/{name}/invocations/{id}`: state, times and, once
/// finished, the response (status, headers, body as text when it is UTF-8
/// and always as base64).
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<TenantOnly>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let invocation = find(&state, &name, &id, query.tenant, &headers).await?;
    Ok(Json(view(&invocation, true)))
}

/// `GET /v1/functions/{name}/invocations/{id}/response`: the stored response
/// as the function sent it; 409 while it has not finished.
pub(crate) async fn response(
    State(state): State<Arc<AppState>>,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<TenantOnly>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let invocation = find(&state, &name, &id, query.tenant, &headers).await?;
    let Some(stored) = invocation.response else {
        return Err(ApiError::Conflict(format!(
            "invocation {id} has not finished (it is {})",
            invocation.state.as_str()
        )));
    };
    let mut response = Response::new(Body::from(stored.body));
    response.extensions_mut().insert(crate::problem::FunctionAnswer);
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}

async fn find(
    state: &AppState,
    name: &str,
    id: &str,
    tenant: Option<String>,
    headers: &HeaderMap,
) -> Result<AsyncInvocation, ApiError> {
    let principal = authenticate(state, headers).await?;
    let tenant = tenant.unwrap_or_else(|| principal.tenant.clone());
    principal.authorize(Action::Invoke, &tenant)?;
    let not_found = || ApiError::NotFound(format!("no invocation {id} of `{name}` in tenant `{tenant}`"));
    let invocation = state
        .store
        .async_invocation(&tenant, id)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(not_found)?;
    if invocation.function != name {
        return Err(not_found());
    }
    Ok(invocation)
}

fn view(invocation: &AsyncInvocation, with_response: bool) -> serde_json::Value {
    let response = invocation.response.as_ref().filter(|_| with_response).map(|r| {
        serde_json::json!({
            "status": r.status,
            "headers": r.headers,
            "body": std::str::from_utf8(&r.body).ok(),
            "body_base64": base64::engine::general_purpose::STANDARD.encode(&r.body),
        })
    });
    serde_json::json!({
        "id": invocation.id,
        "function": invocation.function,
        "state": invocation.state.as_str(),
        "attempts": invocation.attempts,
        "submitted_at": format_ms(invocation.submitted_at_ms),
        "started_at": invocation.started_at_ms.map(format_ms),
        "finished_at": invocation.finished_at_ms.map(format_ms),
        "response": response,
    })
}

/// Runs queued asynchronous invocations, at most `concurrency` at once, at
/// the `batch` class. Invocations a stopped server left running go back to
/// the queue first.
pub fn spawn_async_runner(state: &Arc<AppState>, concurrency: usize) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        match state.store.requeue_running_async().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                invocations = n,
                "re-queued asynchronous invocations cut short by a stop"
            ),
            Err(err) => tracing::error!(error = %err, "cannot re-queue asynchronous invocations"),
        }
        let slots = Arc::new(Semaphore::new(concurrency.max(1)));
        let refused = Arc::new(AtomicBool::new(false));
        loop {
            let free = slots.available_permits();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                state.store.claim_async(free).await.unwrap_or_else(|err| {
                    tracing::error!(error = %err, "cannot read the asynchronous invocation queue");
                    Vec::new()
                })
            };
            for invocation in claimed {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (state, refused) = (state.clone(), refused.clone());
                tokio::spawn(async move {
                    let (final_state, response) = match run_one(&state, &invocation).await {
                        Some(done) => done,
                        None => {
                            refused.store(true, Ordering::Relaxed);
                            (AsyncState::Queued, None)
                        }
                    };
                    if let Err(err) = state.store.finish_async(&invocation.id, final_state, response).await {
                        tracing::error!(id = %invocation.id, error = %err, "cannot store an asynchronous result");
                    }
                    drop(permit);
                    state.async_queue.notify_one();
                });
            }
            let _ = tokio::time::timeout(POLL_EVERY, state.async_queue.notified()).await;
            // The scheduler refused a run: the function (or the server) is
            // full, so give it a moment before claiming again.
            if refused.swap(false, Ordering::Relaxed) {
                tokio::time::sleep(REFUSED_BACKOFF).await;
            }
        }
    })
}

/// Runs one invocation; `None` when the scheduler refused it (it stays
/// queued), else its final state and stored response.
async fn run_one(state: &AppState, invocation: &AsyncInvocation) -> Option<(AsyncState, Option<StoredMessage>)> {
    let id = Uuid::parse_str(&invocation.id).ok();
    let deployed = match state.registry.resolve(&invocation.tenant, &invocation.function).await {
        Ok(deployed) => deployed,
        Err(err) => return failed_with_body(err.into(), id).await,
    };
    let base = format!("/fn/{}/{}", invocation.tenant, invocation.function);
    let request = match build_request(&invocation.request, &base) {
        Ok(request) => request,
        Err(err) => return failed_with_body(err, id).await,
    };
    let deadline = tokio::time::Instant::now() + state.limits.queue_timeout;
    let mut meter = Meter::new(state, &invocation.id, now_us(), &deployed);
    meter.set_bytes_in(invocation.request.body.len() as u64);
    match run_function(state, &deployed, Qos::Batch, deadline, meter, false, request).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            match Limited::new(body, MAX_STORED_RESPONSE_BYTES).collect().await {
                Ok(body) => {
                    let response = Response::from_parts(parts, ());
                    Some((
                        AsyncState::Succeeded,
                        Some(head_of(&response, body.to_bytes().to_vec())),
                    ))
                }
                Err(err) => {
                    failed_with_body(
                        ApiError::Invocation(hearth_engine::InvokeError::GuestError(err.to_string())),
                        id,
                    )
                    .await
                }
            }
        }
        // Refused for now (queue full, or the usage log recovering): it
        // stays queued and runs later under the same id.
        Err(ApiError::Rejected(_) | ApiError::TenantLimit(_) | ApiError::Unavailable(_)) => None,
        Err(err) => failed_with_body(err, id).await,
    }
}

/// The problem response for `err`, stored whole.
async fn failed_with_body(err: ApiError, id: Option<Uuid>) -> Option<(AsyncState, Option<StoredMessage>)> {
    let (parts, body) = err.into_problem(id).into_parts();
    let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
    Some((
        AsyncState::Failed,
        Some(head_of(&Response::from_parts(parts, ()), body)),
    ))
}

fn head_of<B>(response: &Response<B>, body: Vec<u8>) -> StoredMessage {
    StoredMessage {
        method: String::new(),
        uri: String::new(),
        status: response.status().as_u16(),
        headers: response
            .headers()
            .iter()
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect(),
        body,
    }
}

fn build_request(stored: &StoredMessage, base: &str) -> Result<hyper::Request<Full<bytes::Bytes>>, ApiError> {
    let mut request = hyper::Request::builder()
        .method(stored.method.as_str())
        .uri(format!("http://localhost{}", stored.uri))
        .header(BASE_PATH_HEADER, base);
    for (name, value) in &stored.headers {
        request = request.header(name, value);
    }
    request
        .body(Full::new(bytes::Bytes::from(stored.body.clone())))
        .map_err(|e| ApiError::Internal(format!("rebuilding a stored request: {e}")))
}
