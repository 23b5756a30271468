//! `/v2/...`: the Open Inference Protocol (KServe v2, Triton's HTTP
//! protocol), so clients such as `tritonclient` call Hearth's models as
//! they call any inference server.
//!
//! A model is served when its function's manifest says so (`[[models]]
//! serve = true`); its protocol name is `{function}.{model}`, within the
//! caller's tenant (the token's), and its versions are the function's.
//! `infer` runs the model directly on its device through the shared warm
//! cache and batcher, with no guest; it is authenticated, admitted, metered
//! and billed like an invocation of the function (one usage record).
//! Tensors travel as JSON, or as raw bytes after the JSON with the binary
//! tensor data extension (`Inference-Header-Content-Length`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hearth_auth::Action;
use hearth_bridge::{Inferred, TensorHandle, TensorType};
use hearth_devices::{DatumType, Dim, IoSpec, LoadedModel, f16};
use hearth_http::{ApiError, AppState, INVOCATION_ID_HEADER, QOS_HEADER, VERSION_HEADER, authenticate};
use hearth_invoker::{Failure, now_us};
use hearth_registry::{Routed, Selector};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Header of the binary tensor data extension: the length of the JSON part
/// of a body whose tensors follow as raw bytes.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The `/v2` routes, to hand to `hearth_http::App::new`.
pub fn routes() -> axum::Router<Arc<AppState>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(metadata))
        .route("/v2/models/{model}/ready", get(readiness))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}", get(metadata))
        .route("/v2/models/{model}/versions/{version}/ready", get(readiness))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
}

/// A protocol error: the problem answer with `error` set.
struct ProtocolError(ApiError, Option<Uuid>);

impl From<ApiError> for ProtocolError {
    fn from(err: ApiError) -> Self {
        ProtocolError(err, None)
    }
}

impl IntoResponse for ProtocolError {
    fn into_response(self) -> Response {
        self.0.into_protocol_problem(self.1)
    }
}

type Answer = Result<Response, ProtocolError>;

async fn server_metadata() -> Response {
    axum::Json(serde_json::json!({
        "name": "hearth",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

async fn live() -> Response {
    axum::Json(serde_json::json!({ "live": true })).into_response()
}

/// Ready while `/readyz` is: not shutting down, and the usage log writes.
async fn ready(State(state): State<Arc<AppState>>) -> Answer {
    let _ready = hearth_http::readyz(State(state)).await?;
    Ok(axum::Json(serde_json::json!({ "ready": true })).into_response())
}

/// A served model, resolved for the caller: the function version that holds
/// it and its name there.
struct Served {
    routed: Routed,
    model: String,
}

/// Resolves `{function}.{model}` (at `version`, else the function's
/// `latest`) in the caller's tenant.
async fn resolve(state: &AppState, headers: &HeaderMap, name: &str, version: Option<&str>) -> Result<Served, ApiError> {
    let principal = authenticate(state, headers).await?;
    let tenant = principal.tenant.clone();
    principal.authorize(Action::Invoke, &tenant)?;
    let not_served = || {
        ApiError::NotFound(format!(
            "no served model `{name}` in tenant `{tenant}` (names are `function.model`)"
        ))
    };
    let (function, model) = name.split_once('.').ok_or_else(not_served)?;
    if hearth_manifest::validate_name(function).is_err() || hearth_manifest::validate_name(model).is_err() {
        return Err(not_served());
    }
    let selector = match version {
        None => Selector::LATEST,
        Some(v) => match v.parse::<u32>() {
            Ok(v) if v > 0 => Selector::Version(v),
            _ => return Err(ApiError::NotFound(format!("model `{name}` has no version `{v}`"))),
        },
    };
    let routed = state
        .invoker
        .registry()
        .route(&tenant, function, selector, None)
        .await
        .map_err(|err| match err {
            hearth_registry::RegistryError::NotFound { .. } => not_served(),
            err => err.into(),
        })?;
    let manifest = &routed.deployed.manifest;
    match manifest.models.iter().find(|m| m.name == model) {
        Some(spec) if spec.serve => Ok(Served {
            routed,
            model: model.to_owned(),
        }),
        Some(_) => Err(ApiError::NotFound(format!(
            "model `{model}` of function `{function}` is not served: set `serve = true` in its [[models]] entry"
        ))),
        None => Err(not_served()),
    }
}

#[derive(Serialize)]
struct TensorMetadata {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

fn metadata_of(spec: &IoSpec) -> TensorMetadata {
    TensorMetadata {
        name: spec.name.clone(),
        datatype: datatype_name(spec.dtype),
        shape: spec
            .dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                Dim::Batch | Dim::Any => -1,
            })
            .collect(),
    }
}

fn datatype_name(dtype: DatumType) -> String {
    match dtype {
        DatumType::F32 => "FP32".into(),
        DatumType::F64 => "FP64".into(),
        DatumType::F16 => "FP16".into(),
        DatumType::I64 => "INT64".into(),
        DatumType::I32 => "INT32".into(),
        DatumType::I8 => "INT8".into(),
        DatumType::U8 => "UINT8".into(),
        DatumType::Bool => "BOOL".into(),
        other => format!("{other:?}").to_uppercase(),
    }
}

/// The protocol's datatypes the bridge takes, with their element sizes.
fn tensor_type(datatype: &str) -> Option<(TensorType, usize)> {
    match datatype {
        "FP32" => Some((TensorType::Fp32, 4)),
        "INT32" => Some((TensorType::I32, 4)),
        "INT64" => Some((TensorType::I64, 8)),
        "FP64" => Some((TensorType::Fp64, 8)),
        "FP16" => Some((TensorType::Fp16, 2)),
        "UINT8" => Some((TensorType::U8, 1)),
        _ => None,
    }
}

fn datatype_of(ty: TensorType) -> &'static str {
    match ty {
        TensorType::Fp32 => "FP32",
        TensorType::I32 => "INT32",
        TensorType::I64 => "INT64",
        TensorType::Fp16 => "FP16",
        TensorType::Fp64 => "FP64",
        TensorType::Bf16 => "BF16",
        TensorType::U8 => "UINT8",
    }
}

/// `{function}.{model}`, and the version when the route names one.
#[derive(Deserialize)]
struct ModelPath {
    model: String,
    #[serde(default)]
    version: Option<String>,
}

/// A served model's version, loaded (or found warm) on its device.
async fn load(state: &AppState, headers: &HeaderMap, path: &ModelPath) -> Result<(Served, Arc<LoadedModel>), ApiError> {
    let served = resolve(state, headers, &path.model, path.version.as_deref()).await?;
    let loaded = state
        .invoker
        .nn()
        .load(&served.routed.deployed.grants.models, &served.model)
        .await
        .map_err(|err| ApiError::Unavailable(err.message))?;
    Ok((served, loaded))
}

async fn metadata(State(state): State<Arc<AppState>>, Path(path): Path<ModelPath>, headers: HeaderMap) -> Answer {
    let (served, loaded) = load(&state, &headers, &path).await?;
    let version = &served.routed.deployed.version;
    let body = serde_json::json!({
        "name": path.model,
        "versions": state
            .invoker
            .registry()
            .routed_versions(&version.tenant, &version.name)
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>(),
        "platform": "onnx",
        "inputs": loaded.model.inputs().iter().map(metadata_of).collect::<Vec<_>>(),
        "outputs": loaded.model.outputs().iter().map(metadata_of).collect::<Vec<_>>(),
    });
    Ok(with_version(axum::Json(body).into_response(), version.version))
}

/// Ready once the model is loaded (warm) on its device: asking loads it.
async fn readiness(State(state): State<Arc<AppState>>, Path(path): Path<ModelPath>, headers: HeaderMap) -> Answer {
    let (served, _loaded) = load(&state, &headers, &path).await?;
    let answer = axum::Json(serde_json::json!({ "name": path.model, "ready": true })).into_response();
    Ok(with_version(answer, served.routed.deployed.version.version))
}

fn with_version(mut response: Response, version: u32) -> Response {
    response
        .headers_mut()
        .insert(VERSION_HEADER, HeaderValue::from(version));
    response
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
    #[serde(default)]
    parameters: Parameters,
}

#[derive(Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parameters: Parameters,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Parameters,
}

#[derive(Deserialize, Default)]
struct Parameters {
    #[serde(default)]
    binary_data_size: Option<u64>,
    #[serde(default)]
    binary_data: Option<bool>,
    #[serde(default)]
    binary_data_output: Option<bool>,
}

async fn infer(State(state): State<Arc<AppState>>, Path(path): Path<ModelPath>, request: Request) -> Response {
    let id = Uuid::now_v7();
    let started_at_us = now_us();
    let mut answered_version = None;
    let name = &path.model;
    let version = path.version.as_deref();
    let result = run_infer(&state, id, started_at_us, name, version, request, &mut answered_version).await;
    let mut response = match result {
        Ok(response) => response,
        Err(ProtocolError(err, recorded)) => {
            tracing::info!(invocation_id = %id, model = %name, error = %err, "inference failed");
            err.into_protocol_problem(recorded)
        }
    };
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(INVOCATION_ID_HEADER, value);
    }
    match answered_version {
        Some(version) => with_version(response, version),
        None => response,
    }
}

async fn run_infer(
    state: &AppState,
    id: Uuid,
    started_at_us: i64,
    name: &str,
    version: Option<&str>,
    request: Request,
    answered_version: &mut Option<u32>,
) -> Answer {
    let served = resolve(state, request.headers(), name, version).await?;
    let deployed = &served.routed.deployed;
    *answered_version = Some(deployed.version.version);
    let invoker = &state.invoker;
    // From here on the call is the tenant's: every ending is recorded.
    let mut meter = invoker.begin(id, started_at_us, deployed);
    meter.through(served.routed.alias.as_deref());
    let (parts, body) = request.into_parts();
    let class = match hearth_http::requested_class(&parts.headers, deployed.manifest.scaling.qos) {
        Ok(class) => class,
        Err(failure) => {
            let failure = meter.refuse(failure).await;
            return Err(ProtocolError(failure.into(), Some(id)));
        }
    };
    let limit = invoker.config().max_body_bytes;
    let body = match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let failure = meter.refuse(Failure::PayloadTooLarge { limit }).await;
            return Err(ProtocolError(failure.into(), Some(id)));
        }
    };
    meter.set_bytes_in(body.len() as u64);
    let body = match decoded(&parts.headers, body, limit) {
        Ok(body) => body,
        Err(failure) => {
            let failure = meter.refuse(failure).await;
            return Err(ProtocolError(failure.into(), Some(id)));
        }
    };
    let parsed = match parse_request(&parts.headers, &body) {
        Ok(parsed) => parsed,
        Err(detail) => {
            let failure = meter.refuse(Failure::BadRequest(detail)).await;
            return Err(ProtocolError(failure.into(), Some(id)));
        }
    };
    let inputs: Vec<(&str, &TensorHandle)> = parsed.inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let model_name = name.to_owned();
    let model_version = deployed.version.version.to_string();
    let request_id = parsed.id.clone();
    let wanted = parsed.outputs;
    let binary_default = parsed.binary_outputs;
    let render = move |inferred: &Inferred| {
        render_outputs(
            &model_name,
            &model_version,
            request_id,
            &wanted,
            binary_default,
            inferred,
        )
    };
    match invoker
        .infer(meter, deployed, &served.model, &inputs, class, render)
        .await
    {
        Ok(response) => {
            let mut response = response.map(Body::new);
            response
                .headers_mut()
                .insert(QOS_HEADER, HeaderValue::from_static(class.as_str()));
            Ok(response)
        }
        Err(failure) => Err(ProtocolError(failure.into(), Some(id))),
    }
}

/// `body` as its `Content-Encoding` says to read it: as it is, or
/// decompressed (gzip, or deflate as zlib, what tritonclient's
/// `request_compression_algorithm` sends), at most `limit` bytes once
/// decompressed, so a small body cannot expand past the body limit.
fn decoded(headers: &HeaderMap, body: Bytes, limit: u64) -> Result<Bytes, Failure> {
    use std::io::Read as _;
    let Some(encoding) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(body);
    };
    let encoding = String::from_utf8_lossy(encoding.as_bytes()).trim().to_ascii_lowercase();
    let reader: Box<dyn std::io::Read + '_> = match encoding.as_str() {
        "" | "identity" => return Ok(body),
        "gzip" | "x-gzip" => Box::new(flate2::read::GzDecoder::new(&body[..])),
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(&body[..])),
        _ => return Err(Failure::UnsupportedEncoding(encoding)),
    };
    let mut plain = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut plain)
        .map_err(|err| Failure::BadRequest(format!("the body is not valid {encoding}: {err}")))?;
    if plain.len() as u64 > limit {
        return Err(Failure::PayloadTooLarge { limit });
    }
    Ok(Bytes::from(plain))
}

/// An `infer` request, checked and decoded.
struct Parsed {
    id: Option<String>,
    inputs: Vec<(String, TensorHandle)>,
    /// Outputs asked for by name, each with whether it goes as binary
    /// (`None`: every output, each as `binary_outputs` says).
    outputs: Option<Vec<(String, bool)>>,
    binary_outputs: bool,
}

/// Decodes the JSON part and any binary tensor data after it.
fn parse_request(headers: &HeaderMap, body: &Bytes) -> Result<Parsed, String> {
    let json_length = match headers.get(HEADER_LENGTH) {
        Some(value) => {
            let length = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| format!("`{HEADER_LENGTH}` is not a byte count"))?;
            if length > body.len() {
                return Err(format!(
                    "`{HEADER_LENGTH}: {length}` is longer than the body ({} bytes)",
                    body.len()
                ));
            }
            length
        }
        None => body.len(),
    };
    let request: InferRequest = serde_json::from_slice(&body[..json_length])
        .map_err(|e| format!("the request is not an inference request: {e}"))?;
    let mut binary = &body[json_length..];
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let name = input.name;
        let (ty, size) = tensor_type(&input.datatype).ok_or_else(|| {
            format!(
                "input `{name}`: datatype `{}` is not supported (FP32, FP64, FP16, INT32, INT64, UINT8)",
                input.datatype
            )
        })?;
        let dims = input
            .shape
            .iter()
            .map(|&d| {
                u32::try_from(d).map_err(|_| format!("input `{name}`: shape {:?} has a bad dimension", input.shape))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
            .filter(|&n| n <= hearth_bridge::MAX_TENSOR_BYTES)
            .ok_or_else(|| format!("input `{name}`: shape {:?} is too large", input.shape))?;
        let data = match (input.parameters.binary_data_size, input.data) {
            (Some(size_bytes), None) => {
                let size_bytes = usize::try_from(size_bytes).unwrap_or(usize::MAX);
                if size_bytes > binary.len() {
                    return Err(format!(
                        "input `{name}`: binary_data_size {size_bytes} passes the end of the body"
                    ));
                }
                let (own, rest) = binary.split_at(size_bytes);
                binary = rest;
                own.to_vec()
            }
            (None, Some(data)) => encode(&name, &data, ty, elements, size)?,
            (Some(_), Some(_)) => return Err(format!("input `{name}`: both `data` and `binary_data_size`")),
            (None, None) => return Err(format!("input `{name}`: no `data` and no `binary_data_size`")),
        };
        inputs.push((name, TensorHandle::new(dims, ty, data)));
    }
    if !binary.is_empty() {
        return Err(format!("{} bytes of binary data belong to no input", binary.len()));
    }
    let binary_outputs = request.parameters.binary_data_output.unwrap_or(false);
    let outputs = request.outputs.map(|outputs| {
        outputs
            .into_iter()
            .map(|o| (o.name, o.parameters.binary_data.unwrap_or(binary_outputs)))
            .collect()
    });
    Ok(Parsed {
        id: request.id,
        inputs,
        outputs,
        binary_outputs,
    })
}

/// JSON tensor data (flat or nested, row-major) as little-endian bytes.
fn encode(name: &str, data: &Value, ty: TensorType, elements: u64, size: usize) -> Result<Vec<u8>, String> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    if flat.len() as u64 != elements {
        return Err(format!(
            "input `{name}`: {} values for a shape of {elements} elements",
            flat.len()
        ));
    }
    let mut bytes = Vec::with_capacity(flat.len() * size);
    for value in flat {
        let bad = || format!("input `{name}`: `{value}` is not a {} value", datatype_of(ty));
        match ty {
            TensorType::Fp32 => bytes.extend((value.as_f64().ok_or_else(bad)? as f32).to_le_bytes()),
            TensorType::Fp64 => bytes.extend(value.as_f64().ok_or_else(bad)?.to_le_bytes()),
            TensorType::Fp16 => bytes.extend(f16::from_f64(value.as_f64().ok_or_else(bad)?).to_le_bytes()),
            TensorType::I32 => {
                let v = value.as_i64().and_then(|v| i32::try_from(v).ok()).ok_or_else(bad)?;
                bytes.extend(v.to_le_bytes());
            }
            TensorType::U8 => {
                let v = value.as_u64().and_then(|v| u8::try_from(v).ok()).ok_or_else(bad)?;
                bytes.push(v);
            }
            _ => bytes.extend(value.as_i64().ok_or_else(bad)?.to_le_bytes()),
        }
    }
    Ok(bytes)
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        other => out.push(other),
    }
}

#[derive(Serialize)]
struct OutputTensor {
    name: String,
    datatype: &'static str,
    shape: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

/// The answer: JSON, then the binary outputs' bytes in order if any.
fn render_outputs(
    model_name: &str,
    model_version: &str,
    id: Option<String>,
    wanted: &Option<Vec<(String, bool)>>,
    binary_default: bool,
    inferred: &Inferred,
) -> (http::response::Parts, Bytes) {
    let mut outputs = Vec::new();
    let mut binary = Vec::new();
    for (name, tensor) in &inferred.outputs {
        let as_binary = match wanted {
            Some(wanted) => match wanted.iter().find(|(n, _)| n == name) {
                Some((_, binary)) => *binary,
                None => continue,
            },
            None => binary_default,
        };
        let shape = tensor.dims().iter().map(|&d| u64::from(d)).collect();
        let datatype = datatype_of(tensor.ty());
        if as_binary {
            binary.extend_from_slice(tensor.data());
            outputs.push(OutputTensor {
                name: name.clone(),
                datatype,
                shape,
                data: None,
                parameters: Some(serde_json::json!({ "binary_data_size": tensor.data().len() })),
            });
        } else {
            outputs.push(OutputTensor {
                name: name.clone(),
                datatype,
                shape,
                data: Some(decode(tensor)),
                parameters: None,
            });
        }
    }
    let mut body = serde_json::json!({
        "model_name": model_name,
        "model_version": model_version,
        "outputs": outputs,
    });
    if let Some(id) = id {
        body["id"] = Value::String(id);
    }
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let (mut head, ()) = http::Response::new(()).into_parts();
    head.status = StatusCode::OK;
    if binary.is_empty() {
        head.headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return (head, Bytes::from(json));
    }
    head.headers.insert(HEADER_LENGTH, HeaderValue::from(json.len()));
    head.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let mut whole = json;
    whole.extend_from_slice(&binary);
    (head, Bytes::from(whole))
}

/// A tensor's elements as JSON values, flat and row-major.
fn decode(tensor: &TensorHandle) -> Vec<Value> {
    let float = |v: f64| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
    let data = tensor.data();
    match tensor.ty() {
        TensorType::Fp32 => data
            .chunks_exact(4)
            .map(|c| float(f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))))
            .collect(),
        TensorType::Fp64 => data
            .chunks_exact(8)
            .map(|c| float(f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])))
            .collect(),
        TensorType::Fp16 => data
            .chunks_exact(2)
            .map(|c| float(f16::from_le_bytes([c[0], c[1]]).to_f64()))
            .collect(),
        TensorType::U8 => data.iter().map(|&b| Value::from(b)).collect(),
        TensorType::I32 => data
            .chunks_exact(4)
            .map(|c| Value::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => data
            .chunks_exact(8)
            .map(|c| Value::from(i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_bodies_are_read_within_the_limit() {
        fn compress<W: std::io::Write>(mut encoder: W, data: &[u8]) -> W {
            encoder.write_all(data).expect("compress");
            encoder
        }
        let level = flate2::Compression::default();
        let json: &[u8] = br#"{"inputs": []}"#;
        let gzip = compress(flate2::write::GzEncoder::new(Vec::new(), level), json)
            .finish()
            .expect("gzip");
        let zlib = compress(flate2::write::ZlibEncoder::new(Vec::new(), level), json)
            .finish()
            .expect("zlib");
        let with = |encoding: &'static str| {
            let mut map = HeaderMap::new();
            map.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
            map
        };
        let read = |headers: &HeaderMap, body: &[u8], limit| decoded(headers, Bytes::copy_from_slice(body), limit);
        assert_eq!(read(&with("gzip"), &gzip, 1024).expect("gzip"), json);
        assert_eq!(read(&with("deflate"), &zlib, 1024).expect("deflate"), json);
        assert_eq!(read(&with("identity"), json, 1024).expect("identity"), json);
        assert_eq!(read(&HeaderMap::new(), json, 1024).expect("plain"), json);
        // 1 MiB of zeros is about a kilobyte compressed: it must not get
        // past a 64 KiB limit once expanded.
        let bomb = compress(flate2::write::GzEncoder::new(Vec::new(), level), &vec![0; 1 << 20])
            .finish()
            .expect("bomb");
        assert!(bomb.len() < 4096);
        let limited = read(&with("gzip"), &bomb, 64 << 10);
        assert!(
            matches!(limited, Err(Failure::PayloadTooLarge { limit: 65536 })),
            "{limited:?}"
        );
        let unknown = read(&with("br"), &gzip, 1024);
        assert!(
            matches!(&unknown, Err(Failure::UnsupportedEncoding(e)) if e == "br"),
            "{unknown:?}"
        );
        let broken = read(&with("gzip"), b"not gzip", 1024);
        assert!(matches!(broken, Err(Failure::BadRequest(_))), "{broken:?}");
    }

    fn parse(headers: &[(&str, &str)], body: &[u8]) -> Result<Parsed, String> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        parse_request(&map, &Bytes::copy_from_slice(body))
    }

    #[test]
    fn json_tensors_flat_or_nested_become_little_endian_bytes() {
        let body = br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]},
            {"name":"ids","shape":[3],"datatype":"INT64","data":[1,-2,3]}]}"#;
        let parsed = parse(&[], body).expect("parsed");
        let (name, x) = &parsed.inputs[0];
        assert_eq!((name.as_str(), x.dims(), x.ty()), ("x", &[2, 2][..], TensorType::Fp32));
        let floats: Vec<f32> = x
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(floats, [1.0, 2.0, 3.0, 4.5]);
        assert_eq!(parsed.inputs[1].1.data()[8..16], (-2i64).to_le_bytes());
    }

    #[test]
    fn fp64_fp16_and_uint8_tensors_go_both_ways_as_json() {
        let body = br#"{"inputs":[{"name":"d","shape":[2],"datatype":"FP64","data":[0.1,-3]},
            {"name":"h","shape":[2],"datatype":"FP16","data":[0.5,1024]},
            {"name":"b","shape":[3],"datatype":"UINT8","data":[0,7,255]}]}"#;
        let parsed = parse(&[], body).expect("parsed");
        let tensors: Vec<&TensorHandle> = parsed.inputs.iter().map(|(_, t)| t).collect();
        let types: Vec<TensorType> = tensors.iter().map(|t| t.ty()).collect();
        assert_eq!(types, [TensorType::Fp64, TensorType::Fp16, TensorType::U8]);
        assert_eq!(
            tensors[1].data(),
            [f16::from_f32(0.5).to_le_bytes(), f16::from_f32(1024.0).to_le_bytes()].concat()
        );
        assert_eq!(tensors[2].data(), [0, 7, 255]);
        // And back, as an output would be rendered.
        let values: Vec<Vec<Value>> = tensors.iter().map(|t| decode(t)).collect();
        assert_eq!(values[0], [Value::from(0.1), Value::from(-3.0)]);
        assert_eq!(values[1], [Value::from(0.5), Value::from(1024.0)]);
        assert_eq!(values[2], [Value::from(0), Value::from(7), Value::from(255)]);
        for (datatype, value) in [("UINT8", "256"), ("UINT8", "-1"), ("UINT8", "1.5"), ("FP64", "\"x\"")] {
            let body = format!(r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"{datatype}","data":[{value}]}}]}}"#);
            let refused = parse(&[], body.as_bytes()).err().unwrap_or_default();
            assert!(
                refused.contains(&format!("not a {datatype} value")),
                "{datatype} {value}: {refused}"
            );
        }
    }

    #[test]
    fn binary_inputs_are_cut_from_after_the_json() {
        let json = br#"{"inputs":[{"name":"a","shape":[1],"datatype":"INT32","parameters":{"binary_data_size":4}},{"name":"b","shape":[1],"datatype":"INT32","parameters":{"binary_data_size":4}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = json.to_vec();
        body.extend(7i32.to_le_bytes());
        body.extend(9i32.to_le_bytes());
        let length = json.len().to_string();
        let parsed = parse(&[(HEADER_LENGTH, &length)], &body).expect("parsed");
        assert_eq!(parsed.inputs[0].1.data(), 7i32.to_le_bytes());
        assert_eq!(parsed.inputs[1].1.data(), 9i32.to_le_bytes());
        assert_eq!(parsed.outputs, Some(vec![("y".to_owned(), true)]));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        for (body, expected) in [
            (
                &br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#[..],
                "2 values",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["a"]}]}"#,
                "not supported",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#,
                "bad dimension",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}]}"#,
                "not a INT64",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
                "no `data`",
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#,
                "passes the end",
            ),
            (br#"{"nope":1}"#, "not an inference request"),
        ] {
            let error = parse(&[], body).err().expect("refused");
            assert!(error.contains(expected), "{error}");
        }
        let error = parse(&[(HEADER_LENGTH, "999")], b"{}").err().expect("refused");
        assert!(error.contains("longer than the body"), "{error}");
    }
}
