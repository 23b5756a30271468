//! Running models through the host's `wasi:nn`, typed.
//!
//! Models are deployed with the function (`[[models]]` in `hearth.toml`) and
//! kept warm by the host, shared by every instance; [`Model::load`] finds one
//! by name and [`Model::infer`] runs it. The host checks every tensor against
//! the model and may batch the call with concurrent ones; the outputs are
//! always this call's own.
//!
//! ```ignore
//! use hearth_guest::nn::{Model, Tensor};
//!
//! let model = Model::load("mnist-mlp")?;
//! let outputs = model.infer(&[("input", Tensor::f32(&[1, 784], &pixels))])?;
//! let scores = outputs.first().and_then(Tensor::to_f32);
//! ```

use std::fmt;

use crate::{Body, Response, StatusCode};

mod wit {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "wasi:nn/ml",
        generate_all,
    });
}

use wit::wasi::nn::{errors, graph, inference, tensor};

pub use wit::wasi::nn::errors::ErrorCode;
pub use wit::wasi::nn::tensor::TensorType;

/// A model deployed with the function, with an execution context ready.
pub struct Model {
    // Fields drop in declaration order: the context before its graph.
    context: inference::GraphExecutionContext,
    _graph: graph::Graph,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model").finish_non_exhaustive()
    }
}

impl Model {
    /// Loads the model the manifest names `name` (warm on the host: cheap
    /// after the first load of any instance).
    pub fn load(name: &str) -> Result<Model, NnError> {
        let graph = graph::load_by_name(name).map_err(NnError::from_host)?;
        let context = graph.init_execution_context().map_err(NnError::from_host)?;
        Ok(Model { context, _graph: graph })
    }

    /// Runs the model on `inputs` (every model input, by name) and returns
    /// every output, in the model's order.
    pub fn infer(&self, inputs: &[(&str, Tensor)]) -> Result<Outputs, NnError> {
        let inputs: Vec<(String, tensor::Tensor)> = inputs
            .iter()
            .map(|(name, t)| ((*name).to_owned(), tensor::Tensor::new(&t.dims, t.ty, &t.data)))
            .collect();
        let outputs = self.context.compute(inputs).map_err(NnError::from_host)?;
        Ok(Outputs(
            outputs
                .into_iter()
                .map(|(name, t)| {
                    let tensor = Tensor {
                        dims: t.dimensions(),
                        ty: t.ty(),
                        data: t.data(),
                    };
                    (name, tensor)
                })
                .collect(),
        ))
    }
}

/// A tensor in the guest: dimensions, element type and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

impl Tensor {
    /// An `f32` tensor. The host checks that `values` fills `dims`.
    pub fn f32(dims: &[u32], values: &[f32]) -> Tensor {
        Tensor::from_bytes(
            dims,
            TensorType::Fp32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// An `i64` tensor.
    pub fn i64(dims: &[u32], values: &[i64]) -> Tensor {
        Tensor::from_bytes(
            dims,
            TensorType::I64,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// A tensor from raw little-endian element bytes, unchecked here (the
    /// host checks length against dims × element size).
    pub fn from_bytes(dims: &[u32], ty: TensorType, data: Vec<u8>) -> Tensor {
        Tensor {
            dims: dims.to_vec(),
            ty,
            data,
        }
    }

    /// Dimensions, outermost first.
    pub fn dims(&self) -> &[u32] {
        &self.dims
    }

    /// Element type.
    pub fn ty(&self) -> TensorType {
        self.ty
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The elements as `f32`, if this is an `f32` tensor.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.ty == TensorType::Fp32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }
}

/// Sequence lengths [`pad_tokens`] pads to by default. Calls join one model
/// run only when their shapes match on every axis but the batch axis, so
/// padding every sequence to one of a few lengths lets concurrent calls of
/// different lengths share runs; a short sequence pays at most twice its own
/// length.
pub const LENGTH_BUCKETS: &[usize] = &[16, 32, 64, 128, 256];

/// Token sequences padded to one length, as a transformer takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedTokens {
    /// `i64[sequences, length]`: the ids, `pad_id` after each sequence's end.
    pub ids: Tensor,
    /// `i64[sequences, length]`: 1 for a real token, 0 for padding.
    pub attention_mask: Tensor,
    /// The padded length: the smallest bucket holding the longest
    /// sequence, or that sequence's own length past the last bucket.
    pub length: usize,
}

/// Pads `sequences` (token ids) with `pad_id` to the smallest of `buckets`
/// (ascending; [`LENGTH_BUCKETS`] for the usual ones) that holds the longest,
/// and builds the attention mask. Truncating is the tokenizer's job: a
/// sequence longer than the last bucket sets the length itself.
pub fn pad_tokens<S: AsRef<[u32]>>(sequences: &[S], buckets: &[usize], pad_id: i64) -> PaddedTokens {
    let longest = sequences.iter().map(|s| s.as_ref().len()).max().unwrap_or(0);
    let length = buckets
        .iter()
        .copied()
        .find(|&b| b >= longest)
        .unwrap_or(longest)
        .max(1);
    let mut ids = Vec::with_capacity(sequences.len() * length);
    let mut mask = Vec::with_capacity(sequences.len() * length);
    for sequence in sequences {
        let sequence = sequence.as_ref();
        ids.extend(sequence.iter().map(|&id| i64::from(id)));
        ids.extend(std::iter::repeat_n(pad_id, length - sequence.len()));
        mask.extend(std::iter::repeat_n(1i64, sequence.len()));
        mask.extend(std::iter::repeat_n(0i64, length - sequence.len()));
    }
    let dims = [sequences.len() as u32, length as u32];
    PaddedTokens {
        ids: Tensor::i64(&dims, &ids),
        attention_mask: Tensor::i64(&dims, &mask),
        length,
    }
}

/// The outputs of one [`Model::infer`], in the model's order.
#[derive(Debug, Clone)]
pub struct Outputs(Vec<(String, Tensor)>);

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The first output (most models have one).
    pub fn first(&self) -> Option<&Tensor> {
        self.0.first().map(|(_, t)| t)
    }

    /// Every output with its name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t))
    }
}

/// A `wasi:nn` error from the host: a code and the host's explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct NnError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// The host's message (names the input and the shape expected).
    pub message: String,
}

impl NnError {
    fn from_host(error: errors::Error) -> NnError {
        NnError {
            code: error.code(),
            message: error.data(),
        }
    }

    /// The HTTP status that fits: the caller's fault (bad tensor, too large)
    /// is a 4xx, a missing model 404, a failing model 500.
    pub fn status(&self) -> StatusCode {
        match self.code {
            ErrorCode::InvalidArgument | ErrorCode::InvalidEncoding => StatusCode::BAD_REQUEST,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Security => StatusCode::FORBIDDEN,
            ErrorCode::UnsupportedOperation => StatusCode::NOT_IMPLEMENTED,
            ErrorCode::RuntimeError | ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A JSON error response (`{"error": message, "code": "invalid-argument"}`)
    /// with [`NnError::status`].
    pub fn response(&self) -> Response<Body> {
        crate::json(
            self.status(),
            &serde_json::json!({ "error": self.message, "code": code_name(self.code) }),
        )
    }
}

fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidArgument => "invalid-argument",
        ErrorCode::InvalidEncoding => "invalid-encoding",
        ErrorCode::Timeout => "timeout",
        ErrorCode::RuntimeError => "runtime-error",
        ErrorCode::UnsupportedOperation => "unsupported-operation",
        ErrorCode::TooLarge => "too-large",
        ErrorCode::NotFound => "not-found",
        ErrorCode::Security => "security",
        ErrorCode::Unknown => "unknown",
    }
}

impl fmt::Display for NnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wasi-nn {}: {}", code_name(self.code), self.message)
    }
}

impl std::error::Error for NnError {}
