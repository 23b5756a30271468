//! Asynchronous invocations over HTTP: `POST /v1/functions/{name}/invocations`
//! accepts a request at once (202 with an id) and hands it to the invoker,
//! whose runner executes it at the `batch` class when capacity allows;
//! `GET .../invocations/{id}` returns its state and the stored response.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hearth_api::{SubmitQuery, TenantQuery};
use hearth_auth::Action;
use hearth_store::{AsyncInvocation, AsyncState, StoredMessage, format_ms, now_ms};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use uuid::Uuid;

use hearth_http::{ApiError, AppState, FunctionAnswer, INVOCATION_ID_HEADER, authenticate, check_declared_length};

/// `POST /v1/functions/{name}/invocations`: stores the request and answers
/// 202 with the invocation's id and where to ask for its result.
pub(crate) async fn submit(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<SubmitQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let principal = authenticate(&state, request.headers()).await?;
    let tenant = query.tenant.clone().unwrap_or_else(|| principal.tenant.clone());
    principal.authorize(Action::Invoke, &tenant)?;
    let deployed = state.invoker.registry().resolve(&tenant, &name).await?;
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
    let limit = state.invoker.config().max_body_bytes;
    check_declared_length(request.headers(), limit).map_err(|limit| ApiError::PayloadTooLarge { limit })?;
    // Admitted before the body is read, which is read only as far as the
    // tenant's queue has room: a tenant at its limit costs no buffering.
    let room = state.invoker.submission_room(&tenant).await?;
    let queue_full = || ApiError::from(state.invoker.async_queue_full(&tenant));
    let bound = room.map_or(limit, |room| room.min(limit));
    if room.is_some() && check_declared_length(request.headers(), bound).is_err() {
        return Err(queue_full());
    }
    let (parts, body) = request.into_parts();
    let body = Limited::new(body, usize::try_from(bound).unwrap_or(usize::MAX))
        .collect()
        .await
        .map_err(|_| {
            if bound < limit {
                queue_full()
            } else {
                ApiError::PayloadTooLarge { limit }
            }
        })?
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
    state.invoker.submit(invocation.clone()).await?;
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
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<hearth_api::AsyncInvocation>, ApiError> {
    let invocation = find(&state, &name, &id, query.tenant, &headers).await?;
    Ok(Json(view(&invocation, true)))
}

/// `GET /v1/functions/{name}/invocations/{id}/response`: the stored response
/// as the function sent it; 409 while it has not finished.
pub(crate) async fn response(
    State(state): State<Arc<AppState>>,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<TenantQuery>,
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
    response.extensions_mut().insert(FunctionAnswer);
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
        .invoker
        .store()
        .async_invocation(&tenant, id)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(not_found)?;
    if invocation.function != name {
        return Err(not_found());
    }
    Ok(invocation)
}

/// An invocation as the API shows it, with its stored response if asked.
fn view(invocation: &AsyncInvocation, with_response: bool) -> hearth_api::AsyncInvocation {
    let response = invocation
        .response
        .as_ref()
        .filter(|_| with_response)
        .map(|r| hearth_api::StoredResponse {
            status: r.status,
            headers: r.headers.clone(),
            body: std::str::from_utf8(&r.body).ok().map(str::to_owned),
            body_base64: base64::engine::general_purpose::STANDARD.encode(&r.body),
        });
    hearth_api::AsyncInvocation {
        id: invocation.id.clone(),
        function: invocation.function.clone(),
        state: invocation.state.as_str().to_owned(),
        attempts: invocation.attempts,
        submitted_at: format_ms(invocation.submitted_at_ms),
        started_at: invocation.started_at_ms.map(format_ms),
        finished_at: invocation.finished_at_ms.map(format_ms),
        response,
    }
}
