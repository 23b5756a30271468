//! `classify`: an MLP over 784 floats (an MNIST-shaped image), answered with
//! the five most likely classes.
//!
//! Request: `{"input": [784 numbers]}` as JSON, or `application/octet-stream`
//! of 784 little-endian `f32`. Response: `{"top": [{"class": N, "score": P}, ...]}`,
//! highest score first.

use hearth_guest::nn::{Model, Tensor};
use hearth_guest::prelude::*;
use serde::{Deserialize, Serialize};

hearth_guest::handler!(classify);

/// Values per image.
const INPUTS: usize = 784;
/// Classes reported.
const TOP: usize = 5;
/// The model's name in `hearth.toml`.
const MODEL: &str = "mnist-mlp";

#[derive(Deserialize)]
struct JsonRequest {
    input: Vec<f32>,
}

#[derive(Serialize)]
struct Class {
    class: usize,
    score: f32,
}

#[derive(Serialize)]
struct Answer {
    top: Vec<Class>,
}

async fn classify(mut request: Request<Body>) -> Result<Response<Body>> {
    if request.method() != Method::POST {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST a JSON {\"input\": [784 numbers]} or 784 little-endian f32",
        ));
    }
    let binary = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    let body = read_body(&mut request).await?;
    let input = if binary {
        if body.len() != INPUTS * 4 {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "expected {} bytes ({INPUTS} little-endian f32), got {}",
                    INPUTS * 4,
                    body.len()
                ),
            ));
        }
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        match serde_json::from_slice::<JsonRequest>(&body) {
            Ok(request) => request.input,
            Err(err) => {
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    &format!("expected {{\"input\": [{INPUTS} numbers]}}: {err}"),
                ));
            }
        }
    };
    if input.len() != INPUTS {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            &format!("expected {INPUTS} values, got {}", input.len()),
        ));
    }
    let model = match Model::load(MODEL) {
        Ok(model) => model,
        Err(err) => return Ok(err.response()),
    };
    let outputs = match model.infer(&[("input", Tensor::f32(&[1, INPUTS as u32], &input))]) {
        Ok(outputs) => outputs,
        Err(err) => return Ok(err.response()),
    };
    let Some(scores) = outputs.first().and_then(Tensor::to_f32) else {
        return Ok(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model returned no f32 output",
        ));
    };
    Ok(json(StatusCode::OK, &Answer { top: top(&scores, TOP) }))
}

/// The `k` highest scores, highest first; ties go to the lower class.
fn top(scores: &[f32], k: usize) -> Vec<Class> {
    let mut classes: Vec<Class> = scores
        .iter()
        .enumerate()
        .map(|(class, &score)| Class { class, score })
        .collect();
    classes.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.class.cmp(&b.class)));
    classes.truncate(k);
    classes
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}
