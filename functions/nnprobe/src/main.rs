//! `nnprobe`, a test function: hands the host whatever the caller asks for,
//! so tests can check Hearth's `wasi:nn` validation and asset mount end to end.
//!
//! - `POST /compute` with `{"model": NAME, "input": NAME, "dims": [..],
//!   "type": "fp32"|"fp16"|"i32"|"i64"|"u8", "bytes": N}` sends a zero tensor of
//!   `bytes` bytes; answers the output shapes, or the wasi-nn error as a 4xx/5xx.
//! - `GET /file?path=/x` reads a file from the guest's filesystem; 404 with
//!   the OS error when it cannot.
//! - `POST /write?path=/x` tries to create a file (the mount is read-only).
//! - `GET /handle?kind=K` passes the host a tensor handle the guest has no
//!   right to: `random` (never created), `freed` (dropped already), `leak`
//!   (creates a tensor, keeps it, answers its handle number) and `use&n=N`
//!   (a number from somewhere else, such as another instance's `leak`). The
//!   canonical ABI checks handles against this instance's own table, so each
//!   wrong one traps this instance and reaches nothing else.
//! - `GET /hoard?model=M&kb=N&count=C` hands the host `C` tensors of `N` KiB
//!   each and keeps them all, then computes model `M` on the last one:
//!   answers `{"created": C, "code": .., "error": ..}` with the wasi-nn
//!   error (or the output count when there was none).

use hearth_guest::nn::{Model, Tensor, TensorType};
use hearth_guest::prelude::*;
use serde::Deserialize;

// Deliberately a guest pre-initialisation cannot handle: its start-up reads
// the clock, an import, which traps at deploy. The tests check that such a
// guest still deploys, says why it was not pre-initialised, and runs.
hearth_guest::handler!(probe, init = read_clock);

fn read_clock() {
    std::hint::black_box(std::time::SystemTime::now());
}

/// Raw bindings, for the handle tests: the SDK never hands out handles.
mod raw {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "wasi:nn/ml",
        generate_all,
    });
}

#[derive(Deserialize)]
struct Compute {
    model: String,
    input: String,
    dims: Vec<u32>,
    #[serde(rename = "type")]
    ty: String,
    bytes: usize,
}

async fn probe(mut request: Request<Body>) -> Result<Response<Body>> {
    let path = request.uri().path().to_owned();
    let query_path = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("path=")))
        .unwrap_or("/")
        .to_owned();
    match path.as_str() {
        "/compute" => {
            let body = read_body(&mut request).await?;
            let call: Compute = match serde_json::from_slice(&body) {
                Ok(call) => call,
                Err(err) => return Ok(message(StatusCode::BAD_REQUEST, &err.to_string())),
            };
            let ty = match call.ty.as_str() {
                "fp16" => TensorType::Fp16,
                "fp32" => TensorType::Fp32,
                "i32" => TensorType::I32,
                "i64" => TensorType::I64,
                "u8" => TensorType::U8,
                other => return Ok(message(StatusCode::BAD_REQUEST, &format!("unknown type {other}"))),
            };
            // Capped so the guest itself stays within its memory limit.
            let tensor = Tensor::from_bytes(&call.dims, ty, vec![0; call.bytes.min(64 << 20)]);
            let model = match Model::load(&call.model) {
                Ok(model) => model,
                Err(err) => return Ok(err.response()),
            };
            match model.infer(&[(call.input.as_str(), tensor)]) {
                Ok(outputs) => {
                    let shapes: Vec<serde_json::Value> = outputs
                        .iter()
                        .map(|(name, t)| serde_json::json!({ "name": name, "dims": t.dims() }))
                        .collect();
                    Ok(json(StatusCode::OK, &serde_json::json!({ "outputs": shapes })))
                }
                Err(err) => Ok(err.response()),
            }
        }
        "/file" => match std::fs::read(&query_path) {
            Ok(bytes) => Ok(Response::new(Body::from(bytes))),
            Err(err) => Ok(message(StatusCode::NOT_FOUND, &err.to_string())),
        },
        "/write" => match std::fs::write(&query_path, b"x") {
            Ok(()) => Ok(message(StatusCode::OK, "written")),
            Err(err) => Ok(message(StatusCode::FORBIDDEN, &err.to_string())),
        },
        "/handle" => Ok(handle(request.uri().query().unwrap_or_default())),
        "/hoard" => Ok(hoard(request.uri().query().unwrap_or_default())),
        _ => Ok(message(
            StatusCode::NOT_FOUND,
            "try /compute, /file, /write, /handle or /hoard",
        )),
    }
}

fn handle(query: &str) -> Response<Body> {
    use raw::wasi::nn::tensor::{Tensor as RawTensor, TensorType as RawType};
    let param = |name: &str| param(query, name);
    let dims_of = |handle: u32| {
        // SAFETY: not safe at all: the point is to hand the host a handle this
        // instance does not own; the runtime must trap, not follow it.
        let tensor = unsafe { RawTensor::from_handle(handle) };
        let dims = tensor.dimensions();
        std::mem::forget(tensor);
        message(StatusCode::OK, &format!("{dims:?}"))
    };
    match param("kind") {
        "random" => dims_of(0x5eed_1234),
        "freed" => {
            let tensor = RawTensor::new(&[1], RawType::U8, &[0]);
            let handle = tensor.handle();
            drop(tensor);
            dims_of(handle)
        }
        "leak" => {
            let tensor = RawTensor::new(&[1], RawType::U8, &[0]);
            json(StatusCode::OK, &serde_json::json!({ "handle": tensor.take_handle() }))
        }
        "use" => match param("n").parse() {
            Ok(handle) => dims_of(handle),
            Err(_) => message(StatusCode::BAD_REQUEST, "n=HANDLE"),
        },
        other => message(StatusCode::BAD_REQUEST, &format!("unknown kind {other:?}")),
    }
}

fn hoard(query: &str) -> Response<Body> {
    use raw::wasi::nn::graph;
    use raw::wasi::nn::tensor::{Tensor as RawTensor, TensorType as RawType};
    let param = |name: &str| param(query, name);
    let (Ok(kb), Ok(count)) = (param("kb").parse::<usize>(), param("count").parse::<usize>()) else {
        return message(StatusCode::BAD_REQUEST, "kb=N&count=C");
    };
    // The model and its context first: the tensors may take every handle
    // left.
    let context = match graph::load_by_name(param("model")).and_then(|g| g.init_execution_context()) {
        Ok(context) => context,
        Err(err) => return message(StatusCode::NOT_FOUND, &err.data()),
    };
    let data = vec![7u8; kb << 10];
    let mut hoard: Vec<RawTensor> = (0..count)
        .map(|_| RawTensor::new(&[(kb << 10) as u32], RawType::U8, &data))
        .collect();
    let Some(last) = hoard.pop() else {
        return message(StatusCode::BAD_REQUEST, "count must be at least 1");
    };
    let answer = match context.compute(vec![("input".to_owned(), last)]) {
        Ok(outputs) => serde_json::json!({ "created": count, "outputs": outputs.len() }),
        Err(err) => serde_json::json!({
            "created": count,
            "code": format!("{:?}", err.code()),
            "error": err.data(),
        }),
    };
    json(StatusCode::OK, &answer)
}

/// The value of `name=` in `query` (empty when absent).
fn param<'a>(query: &'a str, name: &str) -> &'a str {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_default()
}

fn message(status: StatusCode, text: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": text }))
}
