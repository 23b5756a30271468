//! `/v1/functions` and `/v1/status`: deploy, list, show and delete functions, and
//! the status of devices and warm models.
//!
//! Every call needs a bearer token. The tenant is the token's own, or for
//! operator tokens the `tenant` query parameter (default `default`). A tenant
//! the caller cannot see answers 404, exactly as a missing function does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use hearth_api::{
    ArtifactInfo, DeviceStatus, FunctionDetail, FunctionList, FunctionStatus, FunctionVersion, InstanceStatus,
    NamedModel, NodeStatus, Status, TenantQuery, WarmModel,
};
use hearth_auth::Action;
use hearth_invoker::Invoker;
use hearth_manifest::{Manifest, Qos};
use hearth_registry::{FILE_PART_PREFIX, MODEL_PART_PREFIX, Upload};
use hearth_store::{ArtifactKind, format_ms};

use hearth_http::{ApiError, AppState, check_declared_length, scope};

/// Largest manifest accepted, in bytes.
const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// A stored function version as the API shows it.
pub(crate) fn version_view(v: &hearth_store::FunctionVersion) -> FunctionVersion {
    FunctionVersion {
        tenant: v.tenant.clone(),
        name: v.name.clone(),
        version: v.version,
        component: format!("sha256:{}", v.component),
        component_size: v.component_size,
        created_at: format_ms(v.created_at_ms),
        invoke_path: format!("/fn/{}/{}/", v.tenant, v.name),
        models: artifacts(v, ArtifactKind::Model),
        files: artifacts(v, ArtifactKind::File),
        start_up: None,
    }
}

fn start_up_view(start_up: &hearth_engine::StartUp) -> hearth_api::StartUp {
    match start_up {
        hearth_engine::StartUp::Snapshot => hearth_api::StartUp::Snapshot,
        hearth_engine::StartUp::Plain { reason } => hearth_api::StartUp::Plain { reason: reason.clone() },
    }
}

fn artifacts(v: &hearth_store::FunctionVersion, kind: ArtifactKind) -> Vec<ArtifactInfo> {
    v.artifacts
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| ArtifactInfo {
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
pub(crate) async fn deploy(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<FunctionVersion>), ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::Deploy).await?;
    let limit = state.max_upload_bytes;
    check_declared_length(&headers, limit).map_err(|limit| ApiError::PayloadTooLarge { limit })?;
    let registry = state.invoker.registry();
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
            // Once: every part counts against the upload limit, and a
            // repeated manifest would be read whole each time.
            if manifest.is_some() {
                return Err(bad_request("upload part `manifest` appears twice".into()));
            }
            let mut text = Vec::new();
            while let Some(chunk) = next_chunk(&mut field).await? {
                received += chunk.len() as u64;
                if received > limit {
                    return Err(ApiError::PayloadTooLarge { limit });
                }
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
        let mut staged = registry
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
    state.invoker.tenants().check_manifest(&tenant, &manifest)?;
    check_holdings(&state.invoker, &tenant, &manifest, &models).await?;
    let upload = Upload {
        manifest,
        component,
        models: models.into_iter().filter_map(|(k, v)| Some((k, v?))).collect(),
        files: files.into_iter().filter_map(|(k, v)| Some((k, v?))).collect(),
    };
    let version = registry.deploy(&tenant, upload).await?;
    if let Ok(deployed) = registry.resolve(&tenant, &version.name).await {
        state.invoker.deployed(deployed);
    }
    let mut view = version_view(&version);
    view.start_up = state
        .invoker
        .engine()
        .start_up(version.component.as_str())
        .map(|start_up| start_up_view(&start_up));
    Ok((StatusCode::CREATED, Json(view)))
}

/// Refuses (429) a deploy that would take `tenant` past its function count
/// or model bytes.
async fn check_holdings(
    invoker: &Invoker,
    tenant: &str,
    manifest: &Manifest,
    models: &HashMap<String, Option<hearth_store::StagedBlob>>,
) -> Result<(), ApiError> {
    let limits = invoker.tenants().limits(tenant);
    if limits.max_functions.is_none() && limits.max_model_bytes.is_none() {
        return Ok(());
    }
    let functions = invoker.registry().list(tenant).await?;
    let others = functions.iter().filter(|f| f.name != manifest.name);
    let other_model_bytes: u64 = others
        .clone()
        .flat_map(|f| f.artifacts.iter())
        .filter(|a| a.kind == ArtifactKind::Model)
        .map(|a| a.size)
        .sum();
    let new_model_bytes: u64 = models.values().flatten().map(|blob| blob.len()).sum();
    let count = others.count() as u64 + 1;
    invoker
        .tenants()
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
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<FunctionList>, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::ReadFunctions).await?;
    let functions = state.invoker.registry().list(&tenant).await?;
    Ok(Json(FunctionList {
        functions: functions.iter().map(version_view).collect(),
    }))
}

/// `GET /v1/functions/{name}`: the function, its manifest and every version.
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<FunctionDetail>, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::ReadFunctions).await?;
    check_name(&name)?;
    let registry = state.invoker.registry();
    let current = registry.resolve(&tenant, &name).await?;
    let versions = registry.versions(&tenant, &name).await?;
    Ok(Json(FunctionDetail {
        function: version_view(&current.version),
        manifest: serde_json::to_value(&current.manifest).map_err(|e| ApiError::Internal(e.to_string()))?,
        versions: versions.iter().map(version_view).collect(),
    }))
}

/// `DELETE /v1/functions/{name}`.
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::Deploy).await?;
    check_name(&name)?;
    state.invoker.registry().delete(&tenant, &name).await?;
    state.invoker.deleted(&tenant, &name);
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
    hearth_manifest::validate_name(name).map_err(|reason| bad_request(format!("function name: {reason}")))
}

/// `GET /v1/status`: the devices, the models warm on them, and the tenant's
/// functions with the models they name. Operators see every warm model;
/// others only those their tenant's functions name.
pub(crate) async fn status(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<Status>, ApiError> {
    let (tenant, principal) = scope(&state, &headers, &query, Action::ReadFunctions).await?;
    let invoker = &state.invoker;
    let (instances, queued) = invoker.pools().totals();
    let cache = invoker.nn().cache();
    let functions = invoker.registry().list(&tenant).await?;
    // The counters are read before the list: a model is counted once it is
    // in its slot, so a client that sees a load counted sees the model too
    // (read the other way round, a load finishing in between is counted
    // but not listed).
    let (model_loads, model_revivals) = (cache.loads(), cache.revivals());
    let warm = cache.cached();
    let named: HashSet<String> = functions
        .iter()
        .flat_map(|f| f.artifacts.iter())
        .filter(|a| a.kind == ArtifactKind::Model)
        .map(|a| a.digest.to_string())
        .collect();
    let models = warm
        .iter()
        .filter(|m| principal.operator || named.contains(&m.key))
        .map(|m| WarmModel {
            digest: format!("sha256:{}", m.key),
            placement: m.placement.to_string(),
            device: m.device.to_string(),
            size: m.size_bytes,
            users: u64::try_from(m.users).unwrap_or(u64::MAX),
            runs: m.runs,
            calls: m.calls,
            busy_ms: m.busy_ns as f64 / 1e6,
        })
        .collect();
    let cpu = DeviceStatus {
        id: "cpu".into(),
        kind: "cpu".into(),
        name: None,
        total_bytes: None,
        free_bytes_at_start: None,
    };
    let gpus = cache.devices().gpus().iter().map(|gpu| DeviceStatus {
        id: format!("cuda:{}", gpu.ordinal),
        kind: "cuda".into(),
        name: Some(gpu.name.clone()),
        total_bytes: Some(gpu.total_bytes),
        free_bytes_at_start: Some(gpu.free_bytes),
    });
    let functions = functions
        .iter()
        .map(|f| {
            let models = f
                .artifacts
                .iter()
                .filter(|a| a.kind == ArtifactKind::Model)
                .map(|a| {
                    let key = a.digest.to_string();
                    NamedModel {
                        name: a.name.clone(),
                        digest: format!("sha256:{key}"),
                        warm: warm.iter().any(|m| m.key == key),
                    }
                })
                .collect();
            let pool = invoker.pools().function_stats(&Invoker::key(f)).unwrap_or_default();
            FunctionStatus {
                name: f.name.clone(),
                version: f.version,
                models,
                instances: InstanceStatus {
                    idle: pool.idle,
                    busy: pool.busy,
                    queued: Qos::ALL
                        .iter()
                        .map(|class| (class.to_string(), pool.queued[*class as usize]))
                        .collect(),
                    cold_starts: pool.cold_starts,
                    warm_starts: pool.warm_starts,
                    scale_downs: pool.scale_downs,
                    unloads: pool.unloads,
                    rejected: pool.rejected,
                    loaded: invoker.engine().is_loaded(f.component.as_str()),
                },
            }
        })
        .collect();
    let nodes = if principal.operator {
        let lease = invoker.config().async_lease;
        invoker
            .store()
            .live_nodes(lease)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
    } else {
        Vec::new()
    };
    let nodes = nodes
        .into_iter()
        .map(|n| NodeStatus {
            id: n.id,
            url: n.url,
            started_at: format_ms(n.started_at_ms),
            heartbeat_at: format_ms(n.heartbeat_at_ms),
            details: serde_json::from_str(&n.details).unwrap_or(serde_json::Value::Null),
        })
        .collect();
    Ok(Json(Status {
        nodes,
        tenant,
        devices: std::iter::once(cpu).chain(gpus).collect(),
        models,
        model_loads,
        model_revivals,
        cold_model_bytes: cache.cold_bytes(),
        instances,
        max_instances: invoker.pools().config().max_instances,
        queued,
        functions,
    }))
}
