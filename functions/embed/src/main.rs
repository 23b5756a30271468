//! `embed`: sentence embeddings with all-MiniLM-L6-v2.
//!
//! Request: `{"texts": ["...", ...]}` (1 to 64 texts; `"return_token_ids":
//! true` adds the token ids). Response: `{"embeddings": [[384 floats], ...],
//! "model": "all-MiniLM-L6-v2", "tokens": N}`, one embedding per text, mean
//! pooled and L2-normalised (so a dot product is the cosine similarity);
//! `tokens` counts the tokens the model saw, special ones included.
//!
//! Texts are tokenized here, in the guest, by HuggingFace's `tokenizers`
//! from the model's own `tokenizer.json`, truncated at 256 tokens as
//! sentence-transformers does. The texts of a request are padded together to
//! one of a few lengths ([`LENGTH_BUCKETS`]) so that concurrent requests of
//! similar length join one model run on the host.

use std::sync::OnceLock;

use hearth_guest::nn::{LENGTH_BUCKETS, Model, pad_tokens};
use hearth_guest::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::{Tokenizer, TruncationParams};

hearth_guest::handler!(embed);

/// The model's name in `hearth.toml`.
const MODEL: &str = "minilm";
/// What the answers call the model.
const MODEL_ID: &str = "all-MiniLM-L6-v2";
/// Where `hearth.toml` puts the tokenizer.
const TOKENIZER: &str = "/tokenizer.json";
/// Longest input in tokens (sentence-transformers' `max_seq_length`).
const MAX_TOKENS: usize = 256;
/// Most texts per request.
const MAX_TEXTS: usize = 64;
/// Floats per embedding.
const DIMENSIONS: usize = 384;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedRequest {
    texts: Vec<String>,
    #[serde(default)]
    return_token_ids: bool,
}

#[derive(Serialize)]
struct EmbedResponse {
    embeddings: Vec<Vec<f32>>,
    model: &'static str,
    tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<Vec<Vec<u32>>>,
}

/// The tokenizer, read once per instance (an instance serves many requests).
fn tokenizer() -> Result<&'static Tokenizer, String> {
    static TOKENIZER_CELL: OnceLock<Result<Tokenizer, String>> = OnceLock::new();
    TOKENIZER_CELL
        .get_or_init(|| {
            let mut tokenizer = Tokenizer::from_file(TOKENIZER).map_err(|e| format!("{TOKENIZER}: {e}"))?;
            // The file pads and truncates to 128; the model takes 256, and
            // padding is done per request, to a bucket.
            tokenizer.with_padding(None);
            tokenizer
                .with_truncation(Some(TruncationParams {
                    max_length: MAX_TOKENS,
                    ..TruncationParams::default()
                }))
                .map_err(|e| format!("{TOKENIZER}: {e}"))?;
            Ok(tokenizer)
        })
        .as_ref()
        .map_err(Clone::clone)
}

async fn embed(mut request: Request<Body>) -> Result<Response<Body>> {
    if request.method() != Method::POST {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST {\"texts\": [\"...\", ...]}",
        ));
    }
    let body = read_body(&mut request).await?;
    let request: EmbedRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"texts\": [\"...\", ...]}}: {err}"),
            ));
        }
    };
    if request.texts.is_empty() || request.texts.len() > MAX_TEXTS {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            &format!("`texts` must hold 1 to {MAX_TEXTS} texts, got {}", request.texts.len()),
        ));
    }
    let tokenizer = match tokenizer() {
        Ok(tokenizer) => tokenizer,
        Err(err) => return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, &err)),
    };
    let mut sequences = Vec::with_capacity(request.texts.len());
    for text in &request.texts {
        match tokenizer.encode(text.as_str(), true) {
            Ok(encoding) => sequences.push(encoding.get_ids().to_vec()),
            Err(err) => return Ok(error(StatusCode::BAD_REQUEST, &format!("tokenizing: {err}"))),
        }
    }
    let tokens = sequences.iter().map(Vec::len).sum();
    let padded = pad_tokens(&sequences, LENGTH_BUCKETS, 0);

    let model = match Model::load(MODEL) {
        Ok(model) => model,
        Err(err) => return Ok(err.response()),
    };
    let outputs = match model.infer(&[("input_ids", padded.ids), ("attention_mask", padded.attention_mask)]) {
        Ok(outputs) => outputs,
        Err(err) => return Ok(err.response()),
    };
    let Some(values) = outputs.get("embeddings").and_then(|t| t.to_f32()) else {
        return Ok(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model has no f32 `embeddings` output",
        ));
    };
    if values.len() != sequences.len() * DIMENSIONS {
        return Ok(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!(
                "expected {} floats from the model, got {}",
                sequences.len() * DIMENSIONS,
                values.len()
            ),
        ));
    }
    Ok(json(
        StatusCode::OK,
        &EmbedResponse {
            embeddings: values.chunks_exact(DIMENSIONS).map(<[f32]>::to_vec).collect(),
            model: MODEL_ID,
            tokens,
            token_ids: request.return_token_ids.then_some(sequences),
        },
    ))
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}
