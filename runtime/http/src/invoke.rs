//! `ANY /fn/{tenant}/{function}/{rest...}`: run a function (matched by
//! [`Target::parse`], not by the router: see [`crate::App`]).
//!
//! `{function}` is a name (its alias `latest`), `name@3` (version 3) or
//! `name@prod` (an alias, which may split requests over versions; the
//! `x-hearth-sticky` header keeps a caller on one). This route resolves the
//! function, authenticates the caller (unless the
//! function is public), opens the invocation's record with the invoker and
//! shapes the guest's request; the invoker does the rest. The guest sees the
//! request as if served at the root (`/fn/acme/ocr/v1/read?x=1` arrives as
//! `/v1/read?x=1`), with the mount in `x-hearth-base-path`. Every answer,
//! success or problem, carries `x-hearth-invocation-id`; every answer of a
//! version, `x-hearth-version`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use hearth_auth::Action;
use hearth_invoker::{BASE_PATH_HEADER, Failure, arrival};
use hearth_manifest::Qos;
use http::{HeaderValue, Uri, header};
use http_body_util::{BodyExt as _, Limited};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    ApiError, AppState, INVOCATION_ID_HEADER, QOS_HEADER, STICKY_HEADER, VERSION_HEADER, authenticate,
    check_declared_length,
};

/// The function a request path names: `/fn/{tenant}/{function}`, then
/// optionally `/` and the path below the mount. The names are
/// percent-decoded; the rest is kept as written, so percent-encoding
/// reaches the guest untouched.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    tenant: String,
    function: String,
    rest: String,
}

impl Target {
    /// The target of `path`, or `None` if it is not below `/fn/` with both
    /// names present (and valid UTF-8 once decoded).
    pub(crate) fn parse(path: &str) -> Option<Target> {
        let (tenant, below) = path.strip_prefix("/fn/")?.split_once('/')?;
        let (function, rest) = below.split_once('/').unwrap_or((below, ""));
        if tenant.is_empty() || function.is_empty() {
            return None;
        }
        let decoded = |name: &str| {
            percent_encoding::percent_decode_str(name)
                .decode_utf8()
                .ok()
                .map(|name| name.into_owned())
        };
        Some(Target {
            tenant: decoded(tenant)?,
            function: decoded(function)?,
            rest: rest.to_owned(),
        })
    }
}

pub(crate) async fn run(state: Arc<AppState>, target: Target, request: Request) -> Response {
    let Target { tenant, function, rest } = target;
    let (id, started_at_us) = arrival();
    let span = tracing::info_span!("invocation", invocation_id = %id, tenant = %tenant, function = %function);
    let mut version = None;
    let result = invoke(
        &state,
        id,
        started_at_us,
        &tenant,
        &function,
        &rest,
        request,
        &mut version,
    )
    .instrument(span)
    .await;
    let mut response = match result {
        Ok(mut response) => {
            if let Ok(value) = HeaderValue::from_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer())) {
                response.headers_mut().insert(INVOCATION_ID_HEADER, value);
            }
            response
        }
        Err(err) => {
            tracing::info!(invocation_id = %id, tenant, function, error = %err, "invocation failed");
            err.into_problem(Some(id))
        }
    };
    if let Some(version) = version {
        response
            .headers_mut()
            .insert(VERSION_HEADER, HeaderValue::from(version));
    }
    response
}

/// Runs the invocation; `version` is set once the version that answers is
/// known (for its header on every answer, problems included).
#[expect(
    clippy::too_many_arguments,
    reason = "one call site, each argument a part of the request"
)]
async fn invoke(
    state: &AppState,
    id: Uuid,
    started_at_us: i64,
    tenant: &str,
    function: &str,
    rest: &str,
    request: Request,
    version: &mut Option<u32>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound(format!("function `{function}` not found in tenant `{tenant}`"));
    let Ok((name, selector)) = hearth_registry::Selector::split(function) else {
        return Err(not_found());
    };
    if hearth_manifest::validate_name(tenant).is_err() || hearth_manifest::validate_name(name).is_err() {
        return Err(not_found());
    }
    // Only a public function answers without a token. For anything else the
    // caller authenticates first, so an anonymous caller cannot tell a
    // private function from a missing one (both are 401). A token that is
    // sent is checked before the function is looked up (a bad one costs no
    // lookup), even for a public function.
    let invoker = &state.invoker;
    let principal = match request.headers().contains_key(header::AUTHORIZATION) {
        true => Some(authenticate(state, request.headers()).await?),
        false => None,
    };
    let sticky = request.headers().get(STICKY_HEADER).map(HeaderValue::as_bytes);
    let resolved = invoker.registry().route(tenant, name, selector, sticky).await;
    // While the store is away an uncached function cannot be told public
    // or private: it is unavailable to everyone (a token would not help).
    let resolved = match resolved {
        Err(err) if err.is_unavailable() => return Err(err.into()),
        resolved => resolved,
    };
    let public = matches!(&resolved, Ok(routed) if routed.deployed.manifest.public);
    if !public {
        principal
            .ok_or(ApiError::Unauthorized(hearth_auth::AuthError::Missing))?
            .authorize(Action::Invoke, tenant)?;
    }
    let routed = resolved?;
    let deployed = &routed.deployed;
    // From here on the invocation is the tenant's: every ending is recorded.
    let mut meter = invoker.begin(id, started_at_us, deployed);
    meter.through(routed.alias.as_deref());
    *version = Some(deployed.version.version);
    let (class, mut request) = match shape(state, deployed, tenant, function, rest, request) {
        Ok(shaped) => shaped,
        Err(failure) => return Err(meter.refuse(failure).await.into()),
    };
    if let Some(shadow) = &routed.shadow {
        // Both copies need the body: it is read once, within the limit.
        let (parts, body) = request.into_parts();
        let limit = invoker.config().max_body_bytes;
        let bytes = match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Err(meter.refuse(Failure::PayloadTooLarge { limit }).await.into()),
        };
        let copy = http::Request::from_parts(parts.clone(), bytes.clone());
        invoker.mirror(shadow.clone(), routed.alias.clone(), copy);
        request = Request::from_parts(parts, Body::from(bytes));
    }
    let mut response = invoker.invoke(meter, deployed, class, request).await?.map(Body::new);
    response
        .headers_mut()
        .insert(QOS_HEADER, HeaderValue::from_static(class.as_str()));
    Ok(response)
}

/// Checks the caller's request and turns it into the guest's: the class it
/// runs at and the request as the guest sees it.
fn shape(
    state: &AppState,
    deployed: &hearth_registry::Deployed,
    tenant: &str,
    function: &str,
    rest: &str,
    request: Request,
) -> Result<(Qos, Request), Failure> {
    let limit = state.invoker.config().max_body_bytes;
    check_declared_length(request.headers(), limit).map_err(|limit| Failure::PayloadTooLarge { limit })?;
    let class = requested_class(request.headers(), deployed.manifest.scaling.qos)?;
    let (mut parts, body) = request.into_parts();
    parts.uri = guest_uri(&parts.uri, parts.headers.get(header::HOST), rest)?;
    // Joined by hand: `format!` cost about a microsecond a request here.
    let mut base = String::with_capacity("/fn//".len() + tenant.len() + function.len());
    for piece in ["/fn/", tenant, "/", function] {
        base.push_str(piece);
    }
    // Names were validated, so the mount is a valid header value.
    if let Ok(base) = HeaderValue::try_from(base) {
        parts.headers.insert(BASE_PATH_HEADER, base);
    }
    // Credentials are for Hearth, not for the guest.
    parts.headers.remove(header::AUTHORIZATION);
    Ok((class, Request::from_parts(parts, body)))
}

/// The class an invocation runs at: the function's, or a lower one asked
/// for in the `x-hearth-qos` header. Asking for a higher class is refused
/// (400): urgency is the deployer's decision, not the caller's.
pub fn requested_class(headers: &http::HeaderMap, function: Qos) -> Result<Qos, Failure> {
    let Some(value) = headers.get(QOS_HEADER) else {
        return Ok(function);
    };
    let bad = Failure::BadRequest;
    let asked: Qos = value
        .to_str()
        .map_err(|_| bad(format!("`{QOS_HEADER}` is not text")))?
        .trim()
        .parse()
        .map_err(|e| bad(format!("`{QOS_HEADER}`: {e}")))?;
    if asked > function {
        return Err(bad(format!(
            "`{QOS_HEADER}: {asked}` would raise this function's class `{function}`; a request may only lower it"
        )));
    }
    Ok(asked)
}

/// The URI the guest sees: the path below the function's mount, the original
/// query, and an authority (wasi:http requires one) from the Host header.
fn guest_uri(original: &Uri, host: Option<&HeaderValue>, rest: &str) -> Result<Uri, Failure> {
    let query = original.query();
    let mut path_and_query = String::with_capacity(1 + rest.len() + query.map_or(0, |q| 1 + q.len()));
    path_and_query.push('/');
    path_and_query.push_str(rest);
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    let authority = host.and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let bad = |e: &dyn std::fmt::Display| Failure::BadRequest(format!("cannot forward this request: {e}"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(http::uri::Authority::try_from(authority).map_err(|e| bad(&e))?);
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(path_and_query).map_err(|e| bad(&e))?);
    Uri::from_parts(parts).map_err(|e| bad(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_sees_the_path_below_the_mount() {
        let uri: Uri = "/fn/acme/ocr/v1/read?x=1".parse().expect("uri");
        let host = HeaderValue::from_static("example.com:8080");
        let guest = guest_uri(&uri, Some(&host), "v1/read").expect("uri");
        assert_eq!(guest.to_string(), "http://example.com:8080/v1/read?x=1");
        let root = guest_uri(&"/fn/acme/ocr".parse().expect("uri"), None, "").expect("uri");
        assert_eq!(root.to_string(), "http://localhost/");
    }

    #[test]
    fn a_path_names_its_function_and_the_rest_is_what_follows_the_mount() {
        let target = |tenant: &str, function: &str, rest: &str| {
            Some(Target {
                tenant: tenant.into(),
                function: function.into(),
                rest: rest.into(),
            })
        };
        assert_eq!(Target::parse("/fn/acme/ocr/v1/read"), target("acme", "ocr", "v1/read"));
        assert_eq!(Target::parse("/fn/acme/ocr/"), target("acme", "ocr", ""));
        assert_eq!(Target::parse("/fn/acme/ocr"), target("acme", "ocr", ""));
        assert_eq!(Target::parse("/fn/acme/ocr@2/a//b"), target("acme", "ocr@2", "a//b"));
        // Names are decoded; the rest goes to the guest as written.
        assert_eq!(Target::parse("/fn/ac%6De/ocr/v1%2Fx"), target("acme", "ocr", "v1%2Fx"));
        for elsewhere in [
            "/fn/acme",
            "/fn/acme/",
            "/fn//ocr",
            "/fn/%FF/ocr",
            "/v1/functions",
            "/fnx/a/b",
            "/",
        ] {
            assert_eq!(Target::parse(elsewhere), None, "{elsewhere}");
        }
    }

    #[test]
    fn the_qos_header_only_lowers_the_class() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(requested_class(&headers, Qos::Standard).ok(), Some(Qos::Standard));
        headers.insert(QOS_HEADER, HeaderValue::from_static("batch"));
        assert_eq!(requested_class(&headers, Qos::Realtime).ok(), Some(Qos::Batch));
        headers.insert(QOS_HEADER, HeaderValue::from_static("realtime"));
        assert!(matches!(
            requested_class(&headers, Qos::Standard),
            Err(Failure::BadRequest(_))
        ));
        headers.insert(QOS_HEADER, HeaderValue::from_static("urgent"));
        assert!(matches!(
            requested_class(&headers, Qos::Realtime),
            Err(Failure::BadRequest(_))
        ));
    }
}
