//! The one place where errors become HTTP answers: `application/problem+json`
//! (RFC 9457) with a precise status.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hearth_api::{PROBLEM_CONTENT_TYPE, Problem};
use hearth_auth::AuthError;
use hearth_engine::InvokeError;
use hearth_invoker::Failure;
use hearth_metering::Outcome;
use hearth_registry::RegistryError;
use hearth_scheduler::{ManifestOverLimit, TenantRejection};
use http::{HeaderName, HeaderValue, StatusCode, header};
use uuid::Uuid;

/// Header carrying the invocation id on every invocation response.
pub const INVOCATION_ID_HEADER: HeaderName = HeaderName::from_static("x-hearth-invocation-id");

/// Seconds a client should wait before retrying after a capacity answer.
const RETRY_AFTER_S: &str = "1";

/// Every error the HTTP layer can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing or bad credentials (401).
    #[error("{0}")]
    Unauthorized(AuthError),
    /// Valid credentials, wrong role (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such thing, or not the caller's to see (404).
    #[error("{0}")]
    NotFound(String),
    /// A malformed request (400), optionally about one manifest key.
    #[error("{detail}")]
    BadRequest {
        /// What is wrong.
        detail: String,
        /// The manifest key at fault, if any.
        key: Option<String>,
    },
    /// The body is larger than allowed (413).
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// An answer the router or an extractor gave before a handler ran (a
    /// method the path does not take, a query that does not parse, a wrong
    /// content type), re-sent as a problem with its status.
    #[error("{detail}")]
    Framework {
        /// The status the router chose.
        status: StatusCode,
        /// Its explanation.
        detail: String,
    },
    /// The request conflicts with the current state of the resource (409).
    #[error("{0}")]
    Conflict(String),
    /// A well-formed request that cannot be carried out (422), such as an
    /// invalid component, optionally about one manifest key.
    #[error("{detail}")]
    Unprocessable {
        /// What is wrong.
        detail: String,
        /// The manifest key at fault, if any.
        key: Option<String>,
    },
    /// An invocation failed, with the status its usage record keeps: the
    /// guest's failure (500, 504 for the deadline), a refusal (429 when the
    /// function's own limit held it back, 503 when the server's capacity
    /// did), or a request it could not run.
    #[error("{0}")]
    Invocation(Failure),
    /// A per-tenant limit refused the request (429), naming the limit.
    #[error("{0}")]
    TenantLimit(TenantRejection),
    /// The server is shutting down or out of capacity (503).
    #[error("{0}")]
    Unavailable(String),
    /// A server-side failure (500); details are logged, not shown.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// HTTP status, a stable slug for the problem type, and its title.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        use StatusCode as S;
        match self {
            ApiError::Unauthorized(_) => (S::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => (S::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::NotFound(_) => (S::NOT_FOUND, "not-found", "Not found"),
            ApiError::BadRequest { key: Some(_), .. } => (S::BAD_REQUEST, "invalid-manifest", "Invalid manifest"),
            ApiError::BadRequest { .. } => (S::BAD_REQUEST, "bad-request", "Bad request"),
            ApiError::PayloadTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large"),
            ApiError::Conflict(_) => (S::CONFLICT, "conflict", "Conflict"),
            ApiError::Framework { status, .. } => {
                let slug = match *status {
                    S::METHOD_NOT_ALLOWED => "method-not-allowed",
                    S::PAYLOAD_TOO_LARGE => "payload-too-large",
                    S::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
                    S::UNPROCESSABLE_ENTITY => "unprocessable",
                    s if s.is_client_error() => "bad-request",
                    _ => "internal",
                };
                (*status, slug, status.canonical_reason().unwrap_or("Error"))
            }
            ApiError::Unprocessable { .. } => (S::UNPROCESSABLE_ENTITY, "unprocessable", "Cannot deploy"),
            ApiError::Invocation(failure) => {
                // The invoker chose the status (its record keeps it); only
                // the problem's type and title are picked here.
                let status = S::from_u16(failure.status()).unwrap_or(S::INTERNAL_SERVER_ERROR);
                let (slug, title) = match failure {
                    Failure::Guest(InvokeError::Trap { .. }) => ("guest-trap", "Function trapped"),
                    Failure::Guest(InvokeError::Timeout(_)) => ("timeout", "Function deadline exceeded"),
                    Failure::Guest(InvokeError::MemoryLimit { .. }) => {
                        ("memory-limit", "Function memory limit exceeded")
                    }
                    Failure::Guest(InvokeError::NoResponse | InvokeError::GuestError(_)) => {
                        ("guest-error", "Function failed")
                    }
                    Failure::Guest(InvokeError::Capacity | InvokeError::MemoryBudget { .. }) => {
                        ("capacity", "No capacity")
                    }
                    Failure::Rejected(r) if r.is_function_limit() => ("too-many-requests", "Function at its limit"),
                    Failure::Rejected(_) => ("capacity", "No capacity"),
                    Failure::TenantLimit(_) => ("tenant-limit", "Tenant limit reached"),
                    Failure::UsageLogDown | Failure::Unrecorded(_) => ("unavailable", "Service unavailable"),
                    Failure::PayloadTooLarge { .. } => ("payload-too-large", "Payload too large"),
                    Failure::RequestTimeout => ("request-timeout", "Request body timed out"),
                    Failure::Expired { .. } => ("expired", "Expired before it ran"),
                    Failure::BadRequest(_) => ("bad-request", "Bad request"),
                    Failure::UnsupportedEncoding(_) => ("unsupported-encoding", "Unsupported content encoding"),
                    Failure::Function(RegistryError::NotFound { .. }) => ("not-found", "Not found"),
                    Failure::Function(err) if err.is_unavailable() => ("unavailable", "Service unavailable"),
                    Failure::Model(_) if status.is_client_error() => ("bad-input", "Inputs the model does not take"),
                    Failure::Model(_) => ("model-error", "Model failed"),
                    Failure::Guest(InvokeError::Internal(_)) | Failure::Function(_) => ("internal", "Internal error"),
                };
                (status, slug, title)
            }
            ApiError::TenantLimit(_) => (S::TOO_MANY_REQUESTS, "tenant-limit", "Tenant limit reached"),
            ApiError::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable"),
            ApiError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }

    /// The usage outcome of an invocation that ended with this error, as
    /// the problem names it (none for requests refused as malformed).
    pub fn outcome(&self) -> Option<&'static str> {
        match self {
            ApiError::Invocation(Failure::Function(RegistryError::NotFound { .. })) => None,
            ApiError::Invocation(failure) => match failure.outcome() {
                Outcome::BadRequest => None,
                outcome => Some(outcome.as_str()),
            },
            ApiError::TenantLimit(_) | ApiError::Unavailable(_) => Some(Outcome::Rejected.as_str()),
            ApiError::Internal(_) => Some(Outcome::InternalError.as_str()),
            _ => None,
        }
    }

    /// The response, tagged with `invocation_id` when there is one.
    pub fn into_problem(self, invocation_id: Option<Uuid>) -> Response {
        self.render(invocation_id).map(axum::body::Body::from)
    }

    /// The problem answer, whole: status, headers and body.
    pub fn render(self, invocation_id: Option<Uuid>) -> http::Response<Bytes> {
        self.render_as(invocation_id, false)
    }

    /// [`ApiError::into_problem`] on the Open Inference Protocol's routes:
    /// the problem also carries its detail as `error`, where that
    /// protocol's clients read it.
    pub fn into_protocol_problem(self, invocation_id: Option<Uuid>) -> Response {
        self.render_as(invocation_id, true).map(axum::body::Body::from)
    }

    fn render_as(self, invocation_id: Option<Uuid>, protocol: bool) -> http::Response<Bytes> {
        let (status, slug, title) = self.classify();
        let internal = match &self {
            ApiError::Internal(cause) => Some(cause.clone()),
            ApiError::Invocation(failure @ (Failure::Guest(InvokeError::Internal(_)) | Failure::Function(_)))
                if status == StatusCode::INTERNAL_SERVER_ERROR =>
            {
                Some(failure.to_string())
            }
            _ => None,
        };
        let detail = match internal {
            Some(cause) => {
                tracing::error!(invocation_id = ?invocation_id, cause, "internal error");
                "internal error; the server log has the details".to_owned()
            }
            None => self.to_string(),
        };
        let key = match &self {
            ApiError::BadRequest { key, .. } | ApiError::Unprocessable { key, .. } => key.clone(),
            ApiError::TenantLimit(rejection) | ApiError::Invocation(Failure::TenantLimit(rejection)) => {
                Some(rejection.limit_name().to_owned())
            }
            _ => None,
        };
        let body = Problem {
            kind: format!("urn:hearth:problem:{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            error: protocol.then(|| detail.clone()),
            detail,
            invocation_id: invocation_id.map(|id| id.to_string()),
            outcome: invocation_id.and(self.outcome()).map(str::to_owned),
            key,
        };
        let mut response = http::Response::new(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
        match &self {
            ApiError::Unauthorized(AuthError::Missing) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"hearth\""),
                );
            }
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"hearth\", error=\"invalid_token\""),
                );
            }
            _ => {}
        }
        let retry_after = match &self {
            ApiError::Invocation(Failure::Rejected(rejection)) => Some(rejection.retry_after()),
            ApiError::TenantLimit(rejection) | ApiError::Invocation(Failure::TenantLimit(rejection)) => {
                Some(rejection.retry_after())
            }
            _ => None,
        };
        if let Some(wait) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
        } else if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        }
        if let Some(id) = invocation_id
            && let Ok(value) = HeaderValue::from_str(&id.to_string())
        {
            headers.insert(INVOCATION_ID_HEADER, value);
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_problem(None)
    }
}

impl From<ManifestOverLimit> for ApiError {
    fn from(over: ManifestOverLimit) -> Self {
        ApiError::Unprocessable {
            key: Some(over.key.to_owned()),
            detail: over.to_string(),
        }
    }
}

impl From<TenantRejection> for ApiError {
    fn from(rejection: TenantRejection) -> Self {
        ApiError::TenantLimit(rejection)
    }
}

impl From<Failure> for ApiError {
    fn from(failure: Failure) -> Self {
        ApiError::Invocation(failure)
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Forbidden { .. } => ApiError::Forbidden(err.to_string()),
            AuthError::OtherTenant => ApiError::NotFound("not found".into()),
            AuthError::Throttled { .. } => ApiError::Unavailable(err.to_string()),
            AuthError::Store(e) if e.is_unavailable() => ApiError::Unavailable(e.to_string()),
            AuthError::Store(e) => ApiError::Internal(e.to_string()),
            other => ApiError::Unauthorized(other),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::NotFound { .. } | RegistryError::NoTarget { .. } => ApiError::NotFound(err.to_string()),
            RegistryError::Conflict { .. } => ApiError::Conflict(err.to_string()),
            RegistryError::InvalidAlias(detail) => ApiError::Unprocessable { detail, key: None },
            RegistryError::Manifest(e) => ApiError::BadRequest {
                key: e.key().map(str::to_owned),
                detail: e.to_string(),
            },
            RegistryError::Upload(detail) => ApiError::BadRequest { detail, key: None },
            RegistryError::Unsupported { ref key, .. } | RegistryError::Model { ref key, .. } => {
                ApiError::Unprocessable {
                    key: Some(key.clone()),
                    detail: err.to_string(),
                }
            }
            RegistryError::Component(_) | RegistryError::EmptyComponent => ApiError::Unprocessable {
                key: None,
                detail: err.to_string(),
            },
            RegistryError::Store(_) if err.is_unavailable() => ApiError::Unavailable(err.to_string()),
            RegistryError::Store(_) | RegistryError::Engine(_) => ApiError::Internal(err.to_string()),
        }
    }
}

/// Marks a response on a control route that carries a function's own answer
/// (a stored asynchronous result), which is passed on as the function sent it.
#[derive(Debug, Clone, Copy)]
pub struct FunctionAnswer;

/// Re-sends the router's and extractors' own error answers (a bare 405, a
/// plain-text 400 for a query that does not parse, ...) as problem bodies,
/// keeping their status and `Allow`. Only for Hearth's own routes: a
/// function's answers are the function's.
pub(crate) async fn framework_errors_as_problems(response: Response) -> Response {
    if response.extensions().get::<FunctionAnswer>().is_some() {
        return response;
    }
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    // These bodies are short texts built by axum, already in memory.
    let text = match axum::body::to_bytes(response.into_body(), 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let detail = match (&allow, text.is_empty()) {
        (Some(allow), _) => format!("this path allows {}", allow.to_str().unwrap_or("other methods")),
        (None, false) => text,
        (None, true) => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let mut problem = ApiError::Framework { status, detail }.into_response();
    if let Some(allow) = allow {
        problem.headers_mut().insert(header::ALLOW, allow);
    }
    problem
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    async fn render(err: ApiError, id: Option<Uuid>) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let response = err.into_problem(id);
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).expect("json"),
        )
    }

    #[tokio::test]
    async fn problems_carry_status_type_and_headers() {
        let id = Uuid::now_v7();
        let (status, headers, body) = render(
            Failure::from(InvokeError::MemoryLimit { limit_mb: 16 }).into(),
            Some(id),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(body["outcome"], "memory_limit");
        assert_eq!(body["invocation_id"], id.to_string());
        assert_eq!(headers[INVOCATION_ID_HEADER], id.to_string().as_str());

        let (status, headers, body) = render(AuthError::Unknown.into(), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            headers[header::WWW_AUTHENTICATE]
                .to_str()
                .expect("ascii")
                .contains("invalid_token")
        );
        assert_eq!(body["type"], "urn:hearth:problem:unauthorized");

        let (status, headers, _) = render(Failure::from(InvokeError::Capacity).into(), Some(id)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key(header::RETRY_AFTER));

        let (status, _, body) = render(ApiError::Internal("secret path /x".into()), None).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!body["detail"].as_str().expect("detail").contains("secret"));
    }
}
