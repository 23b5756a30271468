//! The control API under `/v1`: deploy, list, show and delete functions, and
//! the status of devices and warm models.
//!
//! Every call needs a bearer token. The tenant is the token's own, or for
//! operator tokens the `tenant` query parameter (default `default`). A tenant
//! the caller cannot see answers 404, exactly as a missing function does.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use hearth_auth::Action;
use hearth_manifest::{Manifest, Qos};
use hearth_registry::{FILE_PART_PREFIX, MODEL_PART_PREFIX, Upload};
use hearth_store::{ArtifactKind, FunctionVersion, format_ms};
use serde::{Deserialize, Serialize};

use crate::run::pool_key;
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
        .route("/tokens", post(crate::tokens::create).get(crate::tokens::list))
        .route("/tokens/{id}", axum::routing::delete(crate::tokens::revoke))
        .route("/usage", get(crate::usage::export))
        .route("/usage/summary", get(crate::usage::summary))
        .route("/functions/{name}/invocations", post(crate::asynchronous::submit))
        .route("/functions/{name}/invocations/{id}", get(crate::asynchronous::show))
        .route(
            "/functions/{name}/invocations/{id}/response",
            get(crate::asynchronous::response),
        )
        .route("/status", get(status))
}

#[derive(Debug, Deserialize)]
pub(crate) struct TenantQuery {
    pub(crate) tenant: Option<String>,
}

/// Authenticates the caller and picks the tenant the call acts in.
async fn scope(state: &AppState, headers: &HeaderMap, query: &TenantQuery, action: Action) -> Result<String, ApiError> {
    Ok(scoped_principal(state, headers, query, action).await?.0)
}

/// [`scope`], also returning who the caller is.
pub(crate) async fn scoped_principal(
    state: &AppState,
    headers: &HeaderMap,
    query: &TenantQuery,
    action: Action,
) -> Result<(String, hearth_auth::Principal), ApiError> {
    let principal = authenticate(state, headers).await?;
    let tenant = query.tenant.clone().unwrap_or_else(|| principal.tenant.clone());
    hearth_manifest::validate_name(&tenant).map_err(|reason| ApiError::BadRequest {
        detail: format!("tenant: {reason}"),
        key: None,
    })?;
    principal.authorize(action, &tenant)?;
    Ok((tenant, principal))
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    models: Vec<ArtifactView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    files: Vec<ArtifactView>,
}

/// A model or asset deployed with a version.
#[derive(Debug, Serialize)]
struct ArtifactView {
    name: String,
    digest: String,
    size: u64,
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
            models: artifacts(v, ArtifactKind::Model),
            files: artifacts(v, ArtifactKind::File),
        }
    }
}

fn artifacts(v: &FunctionVersion, kind: ArtifactKind) -> Vec<ArtifactView> {
    v.artifacts
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| ArtifactView {
            name: a.name.clone(),
            digest: format!("sha256:{}", a.digest),
            size: a.size,
        })
        .collect()
}

/// `POST /v1/functions`: a `multipart/form-data` upload with a `manifest`
/// part (the `hearth.toml` text) first, then a `component` part (the
/// `.wasm`), a `model:<name>` part for each `[[models]]` entry and a
/// `file:<index>` part for each `[[files]]` entry (0-based), in any order. Every part
/// streams to a staging file; the whole is checked (component compiled,
/// models loaded) before anything is recorded.
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
    let mut models = HashMap::new();
    let mut files = HashMap::new();
    let mut received: u64 = 0;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| bad_request(format!("malformed upload: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "manifest" {
            let mut text = Vec::new();
            while let Some(chunk) = next_chunk(&mut field).await? {
                received += chunk.len() as u64;
                text.extend_from_slice(&chunk);
                if text.len() > MAX_MANIFEST_BYTES {
                    return Err(bad_request(format!("the manifest exceeds {MAX_MANIFEST_BYTES} bytes")));
                }
            }
            let text = String::from_utf8(text).map_err(|_| bad_request("the manifest is not UTF-8 text".into()))?;
            manifest = Some(Manifest::from_toml(&text).map_err(hearth_registry::RegistryError::from)?);
            continue;
        }
        let Some(declared) = &manifest else {
            return Err(bad_request(format!(
                "the `manifest` part must come first (got `{name}` before it)"
            )));
        };
        // Only parts the manifest declares are stored, each once.
        let slot = if name == "component" {
            &mut component
        } else if let Some(model) = name.strip_prefix(MODEL_PART_PREFIX) {
            if !declared.models.iter().any(|m| m.name == model) {
                return Err(bad_request(format!(
                    "upload part `{name}`: the manifest has no model named `{model}`"
                )));
            }
            models.entry(model.to_owned()).or_insert(None)
        } else if let Some(index) = name.strip_prefix(FILE_PART_PREFIX) {
            // Files are numbered by their place in `[[files]]`: a guest path
            // is not a safe multipart name.
            let Some(file) = index.parse::<usize>().ok().and_then(|i| declared.files.get(i)) else {
                return Err(bad_request(format!(
                    "upload part `{name}`: the manifest has no `[[files]]` entry {index}"
                )));
            };
            files.entry(file.target.clone()).or_insert(None)
        } else {
            return Err(bad_request(format!(
                "unexpected upload part `{name}`: send `manifest`, `component`, `{MODEL_PART_PREFIX}<name>` and `{FILE_PART_PREFIX}<index>`"
            )));
        };
        if slot.is_some() {
            return Err(bad_request(format!("upload part `{name}` appears twice")));
        }
        let mut staged = state
            .registry
            .blobs()
            .stage()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        while let Some(chunk) = next_chunk(&mut field).await? {
            received += chunk.len() as u64;
            if received > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            staged
                .write(&chunk)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        *slot = Some(staged);
        if received > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
    }
    let manifest = manifest.ok_or_else(|| bad_request("the upload has no `manifest` part".into()))?;
    let component = component.ok_or_else(|| bad_request("the upload has no `component` part".into()))?;
    check_holdings(&state, &tenant, &manifest, &models).await?;
    let upload = Upload {
        manifest,
        component,
        models: models.into_iter().filter_map(|(k, v)| Some((k, v?))).collect(),
        files: files.into_iter().filter_map(|(k, v)| Some((k, v?))).collect(),
    };
    let version = state.registry.deploy(&tenant, upload).await?;
    // Instances of the previous version go now, not at their idle timeout;
    // a function that keeps instances warm gets new ones in the background.
    let key = pool_key(&tenant, &version.name);
    state.pools.retire(&key);
    if let Ok(deployed) = state.registry.resolve(&tenant, &version.name).await {
        // The deploy compiled and loaded the component: it scales to zero
        // like any other if it is never called.
        state.pools.track_loaded(&key, &crate::run::spec(&deployed));
        if deployed.manifest.scaling.min_instances > 0 {
            let state = state.clone();
            tokio::spawn(async move { crate::keep_warm(&state, &deployed).await });
        }
    }
    Ok((StatusCode::CREATED, Json(VersionView::from(&version))))
}

/// Refuses (429) a deploy that would take `tenant` past its function count
/// or model bytes.
async fn check_holdings(
    state: &AppState,
    tenant: &str,
    manifest: &Manifest,
    models: &HashMap<String, Option<hearth_store::StagedBlob>>,
) -> Result<(), ApiError> {
    let limits = state.tenants.limits(tenant);
    if limits.max_functions.is_none() && limits.max_model_bytes.is_none() {
        return Ok(());
    }
    let functions = state.registry.list(tenant).await?;
    let others = functions.iter().filter(|f| f.name != manifest.name);
    let other_model_bytes: u64 = others
        .clone()
        .flat_map(|f| f.artifacts.iter())
        .filter(|a| a.kind == ArtifactKind::Model)
        .map(|a| a.size)
        .sum();
    let new_model_bytes: u64 = models.values().flatten().map(|blob| blob.len()).sum();
    let count = others.count() as u64 + 1;
    state
        .tenants
        .check_deploy(tenant, count, other_model_bytes + new_model_bytes)?;
    Ok(())
}

async fn next_chunk(field: &mut axum::extract::multipart::Field<'_>) -> Result<Option<bytes::Bytes>, ApiError> {
    field
        .chunk()
        .await
        .map_err(|e| bad_request(format!("malformed upload: {e}")))
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
    state.pools.retire(&pool_key(&tenant, &name));
    Ok(StatusCode::NO_CONTENT)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    hearth_manifest::validate_name(name).map_err(|reason| bad_request(format!("function name: {reason}")))
}

/// `GET /v1/status`: the devices, the models warm on them, and the tenant's
/// functions with the models they name. Operators see every warm model;
/// others only those their tenant's functions name.
async fn status(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (tenant, principal) = scoped_principal(&state, &headers, &query, Action::ReadFunctions).await?;
    let (instances, queued) = state.pools.totals();
    let cache = &state.engine.config().models;
    let functions = state.registry.list(&tenant).await?;
    let warm = cache.cached();
    let named: std::collections::HashSet<String> = functions
        .iter()
        .flat_map(|f| f.artifacts.iter())
        .filter(|a| a.kind == ArtifactKind::Model)
        .map(|a| a.digest.to_string())
        .collect();
    let models: Vec<serde_json::Value> = warm
        .iter()
        .filter(|m| principal.operator || named.contains(&m.key))
        .map(|m| {
            serde_json::json!({
                "digest": format!("sha256:{}", m.key),
                "placement": m.placement.to_string(),
                "device": m.device.to_string(),
                "size": m.size_bytes,
                "users": m.users,
                "runs": m.runs,
                "calls": m.calls,
            })
        })
        .collect();
    let mut devices = vec![serde_json::json!({ "id": "cpu", "kind": "cpu" })];
    for gpu in cache.devices().gpus() {
        devices.push(serde_json::json!({
            "id": format!("cuda:{}", gpu.ordinal),
            "kind": "cuda",
            "name": gpu.name,
            "total_bytes": gpu.total_bytes,
            "free_bytes_at_start": gpu.free_bytes,
        }));
    }
    let functions: Vec<serde_json::Value> = functions
        .iter()
        .map(|f| {
            let models: Vec<serde_json::Value> = f
                .artifacts
                .iter()
                .filter(|a| a.kind == ArtifactKind::Model)
                .map(|a| {
                    let key = a.digest.to_string();
                    serde_json::json!({
                        "name": a.name,
                        "digest": format!("sha256:{key}"),
                        "warm": warm.iter().any(|m| m.key == key),
                    })
                })
                .collect();
            let pool = state
                .pools
                .function_stats(&pool_key(&tenant, &f.name))
                .unwrap_or_default();
            let queued: serde_json::Map<String, serde_json::Value> = Qos::ALL
                .iter()
                .rev()
                .map(|class| (class.to_string(), pool.queued[*class as usize].into()))
                .collect();
            serde_json::json!({
                "name": f.name,
                "version": f.version,
                "models": models,
                "instances": {
                    "idle": pool.idle,
                    "busy": pool.busy,
                    "queued": queued,
                    "cold_starts": pool.cold_starts,
                    "warm_starts": pool.warm_starts,
                    "scale_downs": pool.scale_downs,
                    "unloads": pool.unloads,
                    "rejected": pool.rejected,
                    "loaded": state.engine.is_loaded(f.component.as_str()),
                },
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "tenant": tenant,
        "devices": devices,
        "models": models,
        "model_loads": cache.loads(),
        "instances": instances,
        "max_instances": state.pools.config().max_instances,
        "queued": queued,
        "functions": functions,
    })))
}
