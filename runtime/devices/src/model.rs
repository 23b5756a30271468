//! A prepared model and the shapes it accepts.

use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{Runnable, Runtime};
use tract_onnx::tract_hir::infer::Factoid as _;
use tract_onnx::tract_hir::internal::{DimLike as _, Op};

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

/// Most shape-specialised plans kept per model (see [`Plans::PerShape`]).
pub const MAX_SHAPE_PLANS: usize = 32;

/// The input shapes a plan was optimised for, and the plan.
type ShapePlan = (Vec<Vec<usize>>, Arc<dyn Runnable>);

/// How a model's runnable plans are kept.
#[derive(Debug)]
enum Plans {
    /// One plan for every input shape (symbolic dimensions resolved at run
    /// time), optimised once.
    Shared(Arc<dyn Runnable>),
    /// Models whose graph only types with concrete input shapes (PaddleOCR's
    /// reshapes, for one): the analysed model is kept and a plan optimised
    /// for each input shape met, the most recent [`MAX_SHAPE_PLANS`] kept.
    PerShape {
        model: Box<InferenceModel>,
        runtime: &'static dyn Runtime,
        /// Most recently used first.
        plans: Mutex<Vec<ShapePlan>>,
    },
}

/// Times a run on its device (a GPU's own clock, with events) around the
/// closure that performs it.
pub(crate) type DeviceTimer =
    fn(&mut dyn FnMut() -> Result<Vec<Tensor>>) -> Result<(Vec<Tensor>, Option<std::time::Duration>)>;

/// A model parsed, optimised and prepared for one device; shared by every
/// instance that uses it, run concurrently.
#[derive(Debug)]
pub struct PreparedModel {
    plans: Plans,
    timer: Option<DeviceTimer>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    batchable: bool,
    size_bytes: u64,
}

impl PreparedModel {
    /// Parses ONNX bytes and prepares them with `runtime`: optimised once for
    /// all shapes when the graph allows it, else per input shape on first
    /// use. Blocking.
    pub fn compile(onnx: &[u8], runtime: &'static dyn Runtime) -> Result<PreparedModel> {
        let invalid = |e: TractError| DeviceError::InvalidModel(format!("{e:#}"));
        let model = tract_onnx::onnx().model_for_read(&mut &onnx[..]).map_err(invalid)?;
        let size = onnx.len() as u64;
        match model.clone().into_optimized() {
            Ok(typed) => {
                let (inputs, outputs) = io_specs(&typed).map_err(invalid)?;
                let runnable = runtime.prepare(typed).map_err(invalid)?;
                Ok(PreparedModel::new(
                    Plans::Shared(Arc::from(runnable)),
                    inputs,
                    outputs,
                    size,
                ))
            }
            Err(shared_error) => {
                let (inputs, outputs) = inference_io_specs(&model).map_err(invalid)?;
                tracing::debug!(error = %format!("{shared_error:#}"), "model needs concrete input shapes: planning per shape");
                let plans = Plans::PerShape {
                    model: Box::new(model),
                    runtime,
                    plans: Mutex::new(Vec::new()),
                };
                Ok(PreparedModel::new(plans, inputs, outputs, size))
            }
        }
    }

    fn new(plans: Plans, inputs: Vec<IoSpec>, outputs: Vec<IoSpec>, size_bytes: u64) -> Self {
        // Other axes may be free too (a sequence length): the batcher joins
        // only calls whose inputs agree on them.
        let leading_batch =
            |specs: &[IoSpec]| !specs.is_empty() && specs.iter().all(|s| s.dims.first() == Some(&Dim::Batch));
        let batchable = leading_batch(&inputs) && leading_batch(&outputs);
        PreparedModel {
            plans,
            timer: None,
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

    /// Times runs with `timer` (the device's clock).
    #[cfg_attr(not(feature = "cuda"), expect(dead_code, reason = "only GPUs time runs"))]
    pub(crate) fn with_timer(mut self, timer: DeviceTimer) -> Self {
        self.timer = Some(timer);
        self
    }

    /// Runs the model once, and says how long the device was busy with it:
    /// measured by the device where it can tell (GPUs, with events), else
    /// the run's own time on the thread that ran it (CPU). This is the
    /// compute an invocation is billed for. Blocking.
    pub fn run_timed(&self, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, std::time::Duration)> {
        let started = std::time::Instant::now();
        let (outputs, measured) = match self.timer {
            Some(timer) => {
                let mut inputs = Some(inputs);
                timer(&mut || self.run(inputs.take().unwrap_or_default()))?
            }
            None => (self.run(inputs)?, None),
        };
        Ok((outputs, measured.unwrap_or_else(|| started.elapsed())))
    }

    /// Runs the model once. Blocking: call from a blocking thread.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let runnable = self.plan_for(&inputs)?;
        let outputs = runnable
            .run(inputs.into_iter().map(TValue::from).collect())
            .map_err(|e| DeviceError::Runtime(format!("{e:#}")))?;
        Ok(outputs.into_iter().map(TValue::into_tensor).collect())
    }

    /// Whether a plan for these inputs' shapes exists (running them will not
    /// optimise the model first, which can take a long time).
    pub fn is_planned(&self, inputs: &[Tensor]) -> bool {
        match &self.plans {
            Plans::Shared(_) => true,
            Plans::PerShape { plans, .. } => {
                let plans = plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                plans.iter().any(|(shapes, _)| {
                    shapes.len() == inputs.len() && shapes.iter().zip(inputs).all(|(s, t)| s == t.shape())
                })
            }
        }
    }

    /// The plan for these inputs' shapes, optimised now if it is new.
    fn plan_for(&self, inputs: &[Tensor]) -> Result<Arc<dyn Runnable>> {
        let (model, runtime, plans) = match &self.plans {
            Plans::Shared(runnable) => return Ok(runnable.clone()),
            Plans::PerShape { model, runtime, plans } => (model, runtime, plans),
        };
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let lock = || plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        {
            let mut plans = lock();
            if let Some(at) = plans.iter().position(|(s, _)| *s == shapes) {
                let entry = plans.remove(at);
                let runnable = entry.1.clone();
                plans.insert(0, entry);
                return Ok(runnable);
            }
        }
        // Optimised outside the lock: other shapes keep running meanwhile.
        let mut concrete = (**model).clone();
        for (ix, (tensor, spec)) in inputs.iter().zip(&self.inputs).enumerate() {
            let fact = InferenceFact::dt_shape(spec.dtype, tensor.shape());
            concrete
                .set_input_fact(ix, fact)
                .map_err(|e| DeviceError::InvalidInput(format!("input `{}`: {e:#}", spec.name)))?;
        }
        let typed = concrete.into_optimized().map_err(|e| {
            DeviceError::InvalidInput(format!("the model does not accept input shapes {shapes:?}: {e:#}"))
        })?;
        let runnable: Arc<dyn Runnable> = Arc::from(
            runtime
                .prepare(typed)
                .map_err(|e| DeviceError::Runtime(format!("{e:#}")))?,
        );
        let mut plans = lock();
        plans.insert(0, (shapes, runnable.clone()));
        plans.truncate(MAX_SHAPE_PLANS);
        Ok(runnable)
    }
}

/// Reads input and output specs of a model that does not type without
/// concrete shapes: known sizes are fixed, anything else is free.
fn inference_io_specs(model: &InferenceModel) -> TractResult<(Vec<IoSpec>, Vec<IoSpec>)> {
    collect_io_specs(model, |name, fact: &InferenceFact| {
        let dims = fact
            .shape
            .dims()
            .map(|d| match d.concretize().and_then(|d| d.to_usize().ok()) {
                Some(n) => Dim::Fixed(n),
                None => Dim::Any,
            })
            .collect();
        IoSpec {
            name,
            // An unknown element type is checked when the plan is built.
            dtype: fact.datum_type.concretize().unwrap_or(DatumType::F32),
            dims,
        }
    })
}

/// Every input, then every output, of `model` as an [`IoSpec`]: named by its
/// outlet label (else its node's name), typed and shaped by `spec` from its
/// fact.
fn collect_io_specs<F, O>(
    model: &Graph<F, O>,
    mut spec: impl FnMut(String, &F) -> IoSpec,
) -> TractResult<(Vec<IoSpec>, Vec<IoSpec>)>
where
    F: Fact + Clone + 'static,
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
{
    let mut specs = |outlets: &[OutletId]| {
        outlets
            .iter()
            .map(|&outlet| {
                let name = model
                    .outlet_label(outlet)
                    .map(str::to_owned)
                    .unwrap_or_else(|| model.node(outlet.node).name.clone());
                Ok(spec(name, model.outlet_fact(outlet)?))
            })
            .collect::<TractResult<Vec<_>>>()
    };
    let inputs = specs(&model.inputs)?;
    let outputs = specs(&model.outputs)?;
    Ok((inputs, outputs))
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
    collect_io_specs(model, |name, fact: &TypedFact| {
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
    })
}
