//! A prepared model and the shapes it accepts.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::Runnable;
use tract_onnx::tract_hir::internal::DimLike as _;

use crate::{DeviceError, Result};

/// One dimension of a model input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// The symbolic leading dimension shared by all inputs and outputs: the
    /// batch axis the batcher concatenates along.
    Batch,
    /// Any other symbolic dimension (e.g. an image width).
    Any,
}

/// A named model input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    /// Its name in the model.
    pub name: String,
    /// Element type.
    pub dtype: DatumType,
    /// Dimensions, outermost first.
    pub dims: Vec<Dim>,
}

/// A model parsed, optimised and prepared for one device; shared by every
/// instance that uses it, run concurrently.
#[derive(Debug)]
pub struct PreparedModel {
    runnable: Arc<dyn Runnable>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    batchable: bool,
    size_bytes: u64,
}

impl PreparedModel {
    pub(crate) fn new(runnable: Arc<dyn Runnable>, inputs: Vec<IoSpec>, outputs: Vec<IoSpec>, size_bytes: u64) -> Self {
        let leading_batch = |specs: &[IoSpec]| {
            !specs.is_empty()
                && specs.iter().all(|s| {
                    s.dims.first() == Some(&Dim::Batch) && s.dims[1..].iter().all(|d| matches!(d, Dim::Fixed(_)))
                })
        };
        let batchable = leading_batch(&inputs) && leading_batch(&outputs);
        PreparedModel {
            runnable,
            inputs,
            outputs,
            batchable,
            size_bytes,
        }
    }

    /// The model's inputs, in order.
    pub fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    /// The model's outputs, in order.
    pub fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    /// Whether calls can be joined along a leading batch axis.
    pub fn batchable(&self) -> bool {
        self.batchable
    }

    /// Size of the model file, the measure the cache budgets by.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Checks one input's shape and type against the model.
    pub fn check_input(&self, index: usize, dtype: DatumType, shape: &[usize]) -> Result<()> {
        let spec = self
            .inputs
            .get(index)
            .ok_or_else(|| DeviceError::InvalidInput(format!("the model has no input #{index}")))?;
        if spec.dtype != dtype {
            return Err(DeviceError::InvalidInput(format!(
                "input `{}`: expected {:?} elements, got {dtype:?}",
                spec.name, spec.dtype
            )));
        }
        let fits = spec.dims.len() == shape.len()
            && spec.dims.iter().zip(shape).all(|(dim, &n)| match dim {
                Dim::Fixed(expected) => *expected == n,
                Dim::Batch | Dim::Any => n > 0,
            });
        if !fits {
            return Err(DeviceError::InvalidInput(format!(
                "input `{}`: expected shape {}, got {shape:?}",
                spec.name,
                describe(&spec.dims)
            )));
        }
        Ok(())
    }

    /// Runs the model once. Blocking: call from a blocking thread.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let outputs = self
            .runnable
            .run(inputs.into_iter().map(TValue::from).collect())
            .map_err(|e| DeviceError::Runtime(format!("{e:#}")))?;
        Ok(outputs.into_iter().map(TValue::into_tensor).collect())
    }
}

fn describe(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => n.to_string(),
            Dim::Batch => "N".into(),
            Dim::Any => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Reads the name, type and dimensions of each input and output of a typed
/// model; the first symbolic leading dimension found is the batch axis.
pub(crate) fn io_specs(model: &TypedModel) -> TractResult<(Vec<IoSpec>, Vec<IoSpec>)> {
    let mut batch_symbol: Option<TDim> = None;
    let mut spec = |outlet: OutletId, fact: &TypedFact| -> IoSpec {
        let name = model
            .outlet_label(outlet)
            .map(str::to_owned)
            .unwrap_or_else(|| model.node(outlet.node).name.clone());
        let dims = fact
            .shape
            .iter()
            .enumerate()
            .map(|(axis, dim)| match dim.to_usize() {
                Ok(n) => Dim::Fixed(n),
                Err(_) if axis == 0 && batch_symbol.as_ref().is_none_or(|b| b == &*dim) => {
                    batch_symbol = Some(dim.clone());
                    Dim::Batch
                }
                Err(_) => Dim::Any,
            })
            .collect();
        IoSpec {
            name,
            dtype: fact.datum_type,
            dims,
        }
    };
    let mut inputs = Vec::new();
    for (ix, outlet) in model.inputs.iter().enumerate() {
        inputs.push(spec(*outlet, model.input_fact(ix)?));
    }
    let mut outputs = Vec::new();
    for (ix, outlet) in model.outputs.iter().enumerate() {
        outputs.push(spec(*outlet, model.output_fact(ix)?));
    }
    Ok((inputs, outputs))
}
