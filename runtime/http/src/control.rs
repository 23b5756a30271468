//! The control API under `/v1`: deploy, list, show and delete functions.
//!
//! Every call needs a bearer token. The tenant is the token's own, or for
//! operator tokens the `tenant` query parameter (default `default`). A tenant
//! the caller cannot see answers 404, exactly as a missing function does.

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use hearth_auth::Action;
use hearth_manifest::Manifest;
use hearth_store::{FunctionVersion, format_ms};
use serde::{Deserialize, Serialize};

use crate::{ApiError, AppState, authenticate, check_declared_length};

/// Largest manifest accepted, in bytes.
const MAX_MANIFEST_BYTES: usize = 64 * 1024;

pub(crate) fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route(
            "/functions",
            // Uploads are limited while they stream (see `deploy`), not by
            // axum's buffering default.
            post(deploy).get(list).layer(DefaultBodyLimit::disable()),
        )
        .route("/functions/{name}", get(show).delete(delete))
}

#[derive(Debug, Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

/// Authenticates the caller and picks the tenant the call acts in.
async fn scope(state: &AppState, headers: &HeaderMap, query: &TenantQuery, action: Action) -> Result<String, ApiError> {
    let principal = authenticate(state, headers).await?;
    let tenant = query.tenant.clone().unwrap_or_else(|| principal.tenant.clone());
    hearth_manifest::validate_name(&tenant).map_err(|reason| ApiError::BadRequest {
        detail: format!("tenant: {reason}"),
        key: None,
    })?;
    principal.authorize(action, &tenant)?;
    Ok(tenant)
}

/// A function version as the API shows it.
#[derive(Debug, Serialize)]
struct VersionView {
    tenant: String,
    name: String,
    version: u32,
    component: String,
    component_size: u64,
    created_at: String,
    invoke_path: String,
}

impl From<&FunctionVersion> for VersionView {
    fn from(v: &FunctionVersion) -> Self {
        VersionView {
            tenant: v.tenant.clone(),
            name: v.name.clone(),
            version: v.version,
            component: format!("sha256:{}", v.component),
            component_size: v.component_size,
            created_at: format_ms(v.created_at_ms),
            invoke_path: format!("/fn/{}/{}/", v.tenant, v.name),
        }
    }
}

/// `POST /v1/functions`: a `multipart/form-data` upload with a `manifest`
/// part (the `hearth.toml` text) first, then a `component` part (the
/// `.wasm`). The component streams to a staging file; it is compiled and
/// checked before anything is recorded.
async fn deploy(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<VersionView>), ApiError> {
    let tenant = scope(&state, &headers, &query, Action::Deploy).await?;
    let limit = state.limits.max_upload_bytes;
    check_declared_length(&headers, limit)?;
    let mut multipart = multipart.map_err(|e| bad_request(format!("expected a multipart/form-data upload: {e}")))?;

    let mut manifest: Option<Manifest> = None;
    let mut component = None;
    let mut received: u64 = 0;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| bad_request(format!("malformed upload: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "manifest" => {
                let mut text = Vec::new();
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| bad_request(format!("malformed upload: {e}")))?
                {
                    received += chunk.len() as u64;
                    text.extend_from_slice(&chunk);
                    if text.len() > MAX_MANIFEST_BYTES {
                        return Err(bad_request(format!("the manifest exceeds {MAX_MANIFEST_BYTES} bytes")));
                    }
                }
                let text = String::from_utf8(text).map_err(|_| bad_request("the manifest is not UTF-8 text".into()))?;
                manifest = Some(Manifest::from_toml(&text).map_err(hearth_registry::RegistryError::from)?);
            }
            "component" => {
                if manifest.is_none() {
                    return Err(bad_request(
                        "the `manifest` part must come before the `component` part".into(),
                    ));
                }
                let mut staged = state
                    .registry
                    .blobs()
                    .stage()
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| bad_request(format!("malformed upload: {e}")))?
                {
                    received += chunk.len() as u64;
                    if received > limit {
                        return Err(ApiError::PayloadTooLarge { limit });
                    }
                    staged
                        .write(&chunk)
                        .await
                        .map_err(|e| ApiError::Internal(e.to_string()))?;
                }
                component = Some(staged);
            }
            other => {
                return Err(bad_request(format!(
                    "unexpected upload part `{other}`: send `manifest` and `component`"
                )));
            }
        }
        if received > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
    }
    let manifest = manifest.ok_or_else(|| bad_request("the upload has no `manifest` part".into()))?;
    let component = component.ok_or_else(|| bad_request("the upload has no `component` part".into()))?;
    let version = state.registry.deploy(&tenant, manifest, component).await?;
    Ok((StatusCode::CREATED, Json(VersionView::from(&version))))
}

fn bad_request(detail: String) -> ApiError {
    ApiError::BadRequest { detail, key: None }
}

/// `GET /v1/functions`: the newest version of each function.
async fn list(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = scope(&state, &headers, &query, Action::ReadFunctions).await?;
    let functions: Vec<VersionView> = state
        .registry
        .list(&tenant)
        .await?
        .iter()
        .map(VersionView::from)
        .collect();
    Ok(Json(serde_json::json!({ "functions": functions })))
}

/// `GET /v1/functions/{name}`: the function, its manifest and every version.
async fn show(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = scope(&state, &headers, &query, Action::ReadFunctions).await?;
    check_name(&name)?;
    let current = state.registry.resolve(&tenant, &name).await?;
    let versions: Vec<VersionView> = state
        .registry
        .versions(&tenant, &name)
        .await?
        .iter()
        .map(VersionView::from)
        .collect();
    Ok(Json(serde_json::json!({
        "function": VersionView::from(&current.version),
        "manifest": current.manifest,
        "versions": versions,
    })))
}

/// `DELETE /v1/functions/{name}`.
async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let tenant = scope(&state, &headers, &query, Action::Deploy).await?;
    check_name(&name)?;
    state.registry.delete(&tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    hearth_manifest::validate_name(name).map_err(|reason| bad_request(format!("function name: {reason}")))
}
