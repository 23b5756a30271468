//! The host side of `wasi:nn` (the WIT in `wit/wasi-nn.wit`), async.
//!
//! [`NnHost`] is the one way in, in the three phases of a host capability:
//! linking once per engine ([`NnHost::add_to_linker`]), a grant per function
//! version ([`NnHost::grant`]: the models it may load, by name), and a
//! context per instance ([`NnHost::instance`]) whose inference usage the
//! engine takes after each call ([`NnCtx::take_usage`]). It also owns the
//! shared [`ModelCache`], which the registry (deploy checks, warm-ups) and the
//! status and metrics pages reach through [`NnHost::cache`].
//!
//! Each instance's [`NnCtx`] holds its grant and a [`ResourceTable`] of the
//! handles it created.
//! `load-by-name` resolves to the process-wide warm [`ModelCache`], so every
//! instance of every function naming the same model shares one prepared copy;
//! `compute` goes through that model's batcher and awaits it, so a guest
//! waiting for a batch never blocks a runtime thread.
//!
//! A model a manifest gives `cache_entries` answers identical inputs from
//! its tenant's [`InferenceCache`] ([`memo`]) without running.
//!
//! Every guest-supplied value is checked before it reaches a model: element
//! type, dimensions against the model, byte length against dims × element size
//! (overflow-safe), a size cap, and a cap on handles per instance. Bad input
//! is a `wasi:nn` error the guest can handle, never a trap or a host panic.

mod memo;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use memo::InferenceCache;

use hearth_devices::{CallTerms, Datum, DatumType, DeviceError, DeviceId, LoadedModel, ModelCache, Placement, Tensor};
use wasmtime::component::{HasData, Resource, ResourceTable};

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "wasi:nn/ml",
    imports: { default: async | trappable },
    with: {
        "wasi:nn/tensor.tensor": crate::TensorHandle,
        "wasi:nn/graph.graph": crate::GraphHandle,
        "wasi:nn/inference.graph-execution-context": crate::ContextHandle,
        "wasi:nn/errors.error": crate::NnError,
    },
});

pub use wasi::nn::errors::ErrorCode;
use wasi::nn::graph::{ExecutionTarget, GraphEncoding};
pub use wasi::nn::tensor::TensorType;

/// Largest tensor a guest may create or receive, in bytes.
pub const MAX_TENSOR_BYTES: u64 = 64 << 20;
/// Most live `wasi:nn` handles (tensors, graphs, contexts, errors) per instance.
pub const MAX_HANDLES: usize = 4096;

/// A guest-owned tensor.
#[derive(Debug, Clone)]
pub struct TensorHandle {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
    /// Bytes the guest handed over that were not kept: keeping them would
    /// have passed the instance's memory limit. Using the tensor is then a
    /// `too-large` error.
    refused: usize,
}

impl TensorHandle {
    /// A tensor from its dimensions, element type and little-endian
    /// element bytes; checked against the model when it is used.
    pub fn new(dims: Vec<u32>, ty: TensorType, data: Vec<u8>) -> TensorHandle {
        TensorHandle {
            dims,
            ty,
            data,
            refused: 0,
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

    /// The elements' little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// One instance's memory: its linear memory (grown through the engine's
/// limiter) and the bytes the host holds for it through `wasi:nn` (tensors
/// it created, outputs kept for it), both counted against one limit. A
/// guest cannot make the host hold more for it than it could hold itself.
#[derive(Debug)]
pub struct InstanceMemory {
    limit: usize,
    linear: AtomicUsize,
    host: AtomicUsize,
}

impl InstanceMemory {
    /// A fresh account for an instance limited to `limit` bytes.
    pub fn new(limit: usize) -> Arc<InstanceMemory> {
        Arc::new(InstanceMemory {
            limit,
            linear: AtomicUsize::new(0),
            host: AtomicUsize::new(0),
        })
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes the host holds for the instance now.
    pub fn host_bytes(&self) -> usize {
        self.host.load(Ordering::Relaxed)
    }

    /// Whether linear memory may grow to `desired` bytes; records it if so.
    pub fn grow_linear(&self, desired: usize) -> bool {
        if desired.saturating_add(self.host_bytes()) > self.limit {
            return false;
        }
        self.linear.store(desired, Ordering::Relaxed);
        true
    }

    /// Charges `bytes` held by the host, if they fit under the limit.
    fn charge(&self, bytes: usize) -> bool {
        let linear = self.linear.load(Ordering::Relaxed);
        self.host
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |host| {
                let total = linear.checked_add(host)?.checked_add(bytes)?;
                (total <= self.limit).then_some(host + bytes)
            })
            .is_ok()
    }

    /// Gives back `bytes` the host no longer holds.
    fn release(&self, bytes: usize) {
        let _ = self.host.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |host| {
            Some(host.saturating_sub(bytes))
        });
    }
}

/// A loaded model, held by a guest (keeps it warm), with the inference
/// cache its grant gives it.
#[derive(Debug, Clone)]
pub struct GraphHandle {
    name: Arc<str>,
    model: Arc<LoadedModel>,
    memo: Option<Arc<InferenceCache>>,
    terms: CallTerms,
}

/// An execution context of a graph.
#[derive(Debug, Clone)]
pub struct ContextHandle {
    name: Arc<str>,
    model: Arc<LoadedModel>,
    memo: Option<Arc<InferenceCache>>,
    terms: CallTerms,
}

/// An error returned to the guest.
#[derive(Debug, Clone)]
pub struct NnError {
    code: ErrorCode,
    message: String,
}

/// A model the function may load by name.
#[derive(Debug, Clone)]
pub struct ModelRef {
    /// Content key (SHA-256 of the ONNX file).
    pub key: String,
    /// Where the file is.
    pub path: PathBuf,
    /// The device the manifest asks for.
    pub placement: Placement,
    /// Calls whose outputs its tenant's inference cache keeps (0: none).
    pub cache_entries: usize,
    /// The manifest's batching settings for it (`max_batch`,
    /// `max_delay_ms`; unset: the server's); the urgency is the call's.
    pub batch: CallTerms,
}

/// The models one function version may load, by the name its guest uses,
/// each with its tenant's inference cache when it asks for one. Built once
/// per version ([`NnHost::grant`]) and shared by its instances.
pub type NnGrant = Arc<HashMap<String, (ModelRef, Option<Arc<InferenceCache>>)>>;

/// The `wasi:nn` host of a process: the shared warm model cache, and the
/// linking, grants and per-instance contexts that reach it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NnHost {
    cache: Arc<ModelCache>,
    /// Inference caches by tenant and model key.
    memos: Arc<dashmap::DashMap<(String, String), Arc<InferenceCache>>>,
}

impl NnHost {
    /// The host over `cache`, which every instance of every function shares.
    pub fn new(cache: Arc<ModelCache>) -> NnHost {
        NnHost {
            cache,
            memos: Arc::default(),
        }
    }

    /// Calls answered from inference caches, and calls they did not hold,
    /// since start (every tenant and model).
    pub fn inference_cache_counts(&self) -> (u64, u64) {
        self.memos.iter().fold((0, 0), |(hits, misses), memo| {
            (hits + memo.hits(), misses + memo.misses())
        })
    }

    /// The warm model cache (devices, loaded models, their counters).
    pub fn cache(&self) -> &Arc<ModelCache> {
        &self.cache
    }

    /// Adds the `wasi:nn` imports to `linker`, reaching each instance's
    /// [`NnCtx`] through `get`. Once per engine.
    pub fn add_to_linker<T: Send + 'static>(
        linker: &mut wasmtime::component::Linker<T>,
        get: fn(&mut T) -> &mut NnCtx,
    ) -> wasmtime::Result<()> {
        Ml::add_to_linker::<T, WasiNn>(linker, get)
    }

    /// The grant of a version of `tenant`'s function whose manifest names
    /// `models`. Once per version, when it is resolved.
    pub fn grant(&self, tenant: &str, models: impl IntoIterator<Item = (String, ModelRef)>) -> NnGrant {
        let granted = models.into_iter().map(|(name, model)| {
            let memo = (model.cache_entries > 0).then(|| {
                let memo = self
                    .memos
                    .entry((tenant.to_owned(), model.key.clone()))
                    .or_insert_with(|| Arc::new(InferenceCache::new(model.cache_entries)))
                    .clone();
                memo.widen(model.cache_entries);
                memo
            });
            (name, (model, memo))
        });
        Arc::new(granted.collect())
    }

    /// A fresh context for one instance of a function holding `grant`,
    /// whose host-held bytes count against `memory`. Once per instance, when
    /// its store is made.
    pub fn instance(&self, grant: &NnGrant, memory: Arc<InstanceMemory>) -> NnCtx {
        NnCtx {
            cache: self.cache.clone(),
            models: grant.clone(),
            table: ResourceTable::new(),
            live: 0,
            usage: InferenceUsage::default(),
            memory,
            urgency: CallTerms::default().urgency,
            held: Vec::new(),
        }
    }

    /// The model `name` of a grant, loaded (or found warm) in the cache.
    pub async fn load(&self, grant: &NnGrant, name: &str) -> Result<Arc<LoadedModel>, InferError> {
        let Some((model, _)) = grant.get(name) else {
            return refuse(ErrorCode::NotFound, format!("no model named `{name}`"));
        };
        self.cache
            .get(&model.key, &model.path, model.placement)
            .await
            .map_err(|err| InferError {
                code: ErrorCode::RuntimeError,
                message: format!("model `{name}`: {err}"),
            })
    }

    /// Runs the model `name` of a function's grant on `inputs`, with no
    /// guest, exactly as a guest's `compute` would: the same checks, warm
    /// copy, inference cache and batcher (at `urgency`, on the manifest's
    /// batching settings). For the Open Inference Protocol.
    pub async fn infer(
        &self,
        grant: &NnGrant,
        name: &str,
        inputs: &[(&str, &TensorHandle)],
        urgency: u8,
    ) -> Result<Inferred, InferError> {
        let loaded = self.load(grant, name).await?;
        let Some((model, memo)) = grant.get(name) else {
            return refuse(ErrorCode::NotFound, format!("no model named `{name}`"));
        };
        let terms = CallTerms { urgency, ..model.batch };
        infer(name, &loaded, memo.as_deref(), inputs, terms).await
    }

    /// Loads every model `grant` names into the warm cache; returns how many
    /// loaded and, for each that did not, its name and why.
    pub async fn preload(&self, grant: &NnGrant) -> (usize, Vec<(String, DeviceError)>) {
        let mut loaded = 0;
        let mut failed = Vec::new();
        for (name, (model, _)) in grant.iter() {
            match self.cache.get(&model.key, &model.path, model.placement).await {
                Ok(_) => loaded += 1,
                Err(err) => failed.push((name.clone(), err)),
            }
        }
        (loaded, failed)
    }
}

/// What an instance's `wasi:nn` calls used since the last
/// [`NnCtx::take_usage`]: the inference part of a usage record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InferenceUsage {
    /// Compute calls made.
    pub calls: u64,
    /// Sum over compute calls of the number of calls in their batch.
    pub batched_with: u64,
    /// Model compute billed to these calls: each call's share (by rows) of
    /// its run's busy time, on every device.
    pub compute: std::time::Duration,
    /// The part of `compute` that ran on GPUs.
    pub gpu: std::time::Duration,
    /// The part of `compute` that ran on the caller's own thread, inside
    /// its poll: also counted in the guest's CPU time, from which the
    /// engine takes it out so it is billed once.
    pub on_caller: std::time::Duration,
    /// The devices the calls ran on, in order of first use (empty before
    /// any).
    pub devices: Vec<DeviceId>,
    /// Calls answered from an inference cache (not in `calls`: nothing ran).
    pub cache_hits: u64,
    /// The same calls per model, as Triton-compatible metrics count them.
    pub models: Vec<ModelCalls>,
}

/// One model's calls within an [`InferenceUsage`], counted as Triton
/// counts a model's requests (its `nv_inference_*` metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelCalls {
    /// The model's name in the function's manifest.
    pub model: String,
    /// Calls answered (from a run or the inference cache).
    pub success: u64,
    /// Calls that failed (inputs the model does not take, or the model).
    pub failure: u64,
    /// Inferences: the rows (batch axis) of the calls answered.
    pub inferences: u64,
    /// Model runs these calls led (a joined run counts once, for its first
    /// call): summed over functions, every run of the model once.
    pub executions: u64,
    /// Time from each call's arrival at the host to its outputs.
    pub request: std::time::Duration,
    /// Time the calls waited for their runs.
    pub queued: std::time::Duration,
    /// The calls' shares of their runs' compute.
    pub compute: std::time::Duration,
}

impl ModelCalls {
    fn add(&mut self, other: &ModelCalls) {
        self.success += other.success;
        self.failure += other.failure;
        self.inferences += other.inferences;
        self.executions += other.executions;
        self.request += other.request;
        self.queued += other.queued;
        self.compute += other.compute;
    }
}

impl InferenceUsage {
    /// Adds another call's usage to this one.
    pub fn add(&mut self, other: InferenceUsage) {
        self.calls += other.calls;
        self.batched_with += other.batched_with;
        self.compute += other.compute;
        self.gpu += other.gpu;
        self.on_caller += other.on_caller;
        self.cache_hits += other.cache_hits;
        for device in other.devices {
            if !self.devices.contains(&device) {
                self.devices.push(device);
            }
        }
        for calls in other.models {
            match self.models.iter_mut().find(|m| m.model == calls.model) {
                Some(known) => known.add(&calls),
                None => self.models.push(calls),
            }
        }
    }

    /// The usage of one call of `model` that failed.
    pub fn failed(model: &str) -> InferenceUsage {
        InferenceUsage {
            models: vec![ModelCalls {
                model: model.to_owned(),
                failure: 1,
                ..ModelCalls::default()
            }],
            ..InferenceUsage::default()
        }
    }

    /// The devices as a record names them: `cpu`, `cuda:0`, or several
    /// joined with `+` (`cpu+cuda:0`); `cpu` when there was no inference.
    pub fn device_label(&self) -> String {
        if self.devices.is_empty() {
            return DeviceId::Cpu.to_string();
        }
        let names: Vec<String> = self.devices.iter().map(DeviceId::to_string).collect();
        names.join("+")
    }
}

/// Per-instance `wasi:nn` state, made by [`NnHost::instance`].
#[derive(Debug)]
pub struct NnCtx {
    cache: Arc<ModelCache>,
    models: NnGrant,
    table: ResourceTable,
    /// Live handles in `table`, checked against [`MAX_HANDLES`].
    live: usize,
    usage: InferenceUsage,
    memory: Arc<InstanceMemory>,
    /// The current call's urgency (its QoS class), for the batcher.
    urgency: u8,
    /// Every model this instance has loaded, held until the instance goes:
    /// a warm instance keeps its models warm (the cache evicts only models
    /// nobody holds), so scale to zero goes instance, then code, then
    /// model, and a warm instance never waits for a model reload.
    held: Vec<Arc<LoadedModel>>,
}

impl NnCtx {
    /// The inference usage since the last take, and a fresh count from
    /// here: the engine takes it when a call ends, so the next call of a
    /// reused instance starts at zero.
    pub fn take_usage(&mut self) -> InferenceUsage {
        std::mem::take(&mut self.usage)
    }

    /// Sets the urgency of the call the instance serves next (its QoS
    /// class): when its model calls join a batch, more urgent rows are
    /// taken first.
    pub fn set_urgency(&mut self, urgency: u8) {
        self.urgency = urgency;
    }

    fn push<T: Send + 'static>(&mut self, value: T) -> wasmtime::Result<Result<Resource<T>, Resource<NnError>>> {
        if self.live >= MAX_HANDLES {
            return self.fail(
                ErrorCode::TooLarge,
                format!("more than {MAX_HANDLES} live wasi-nn handles"),
            );
        }
        self.live += 1;
        Ok(Ok(self.table.push(value)?))
    }

    /// Frees a handle the guest dropped.
    fn release<T: 'static>(&mut self, handle: Resource<T>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        self.live = self.live.saturating_sub(1);
        Ok(())
    }

    fn fail<T>(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        // Errors count against the cap too, but the cap never stops an error
        // from being reported: past it, the instance traps instead.
        if self.live > MAX_HANDLES {
            wasmtime::bail!("guest leaked more than {MAX_HANDLES} wasi-nn handles");
        }
        self.live += 1;
        let error = self.table.push(NnError {
            code,
            message: message.into(),
        })?;
        Ok(Err(error))
    }
}

/// The [`HasData`] marker for adding `wasi:nn` to a linker.
#[derive(Debug)]
pub struct WasiNn;

impl HasData for WasiNn {
    type Data<'a> = &'a mut NnCtx;
}

fn element_size(ty: TensorType) -> Option<(usize, DatumType)> {
    match ty {
        TensorType::Fp32 => Some((4, DatumType::F32)),
        TensorType::I32 => Some((4, DatumType::I32)),
        TensorType::I64 => Some((8, DatumType::I64)),
        TensorType::Fp64 => Some((8, DatumType::F64)),
        TensorType::Fp16 => Some((2, DatumType::F16)),
        TensorType::U8 => Some((1, DatumType::U8)),
        // tract has no bfloat16.
        TensorType::Bf16 => None,
    }
}

fn tensor_type(dt: DatumType) -> Option<TensorType> {
    match dt {
        DatumType::F32 => Some(TensorType::Fp32),
        DatumType::I32 => Some(TensorType::I32),
        DatumType::I64 => Some(TensorType::I64),
        DatumType::F64 => Some(TensorType::Fp64),
        DatumType::F16 => Some(TensorType::Fp16),
        DatumType::U8 => Some(TensorType::U8),
        _ => None,
    }
}

/// Checks a guest tensor and converts it to a model tensor.
fn to_model_tensor(t: &TensorHandle) -> Result<Tensor, String> {
    let (size, dt) = element_size(t.ty).ok_or_else(|| format!("tensor type {:?} is not supported", t.ty))?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    // The dimensions' span (a zero counted as one) is bounded too: a zero
    // makes the element count 0 whatever the rest, and the strides of the
    // others would overflow (found by `fuzz/fuzz_targets/tensor.rs`).
    let span = shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d.max(1) as u64))
        .filter(|&n| n <= MAX_TENSOR_BYTES);
    if span.is_none() {
        return Err(format!(
            "tensor dimensions {:?} exceed {MAX_TENSOR_BYTES} bytes",
            t.dims
        ));
    }
    let expected = shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| n <= MAX_TENSOR_BYTES)
        .ok_or_else(|| format!("tensor dimensions {:?} exceed {MAX_TENSOR_BYTES} bytes", t.dims))?;
    if t.data.len() as u64 != expected {
        return Err(format!(
            "tensor data is {} bytes but dimensions {:?} of {:?} need {expected}",
            t.data.len(),
            t.dims,
            t.ty
        ));
    }
    let result = match dt {
        DatumType::F32 => decode(&t.data, &shape, f32::from_le_bytes),
        DatumType::I32 => decode(&t.data, &shape, i32::from_le_bytes),
        DatumType::F64 => decode(&t.data, &shape, f64::from_le_bytes),
        DatumType::F16 => decode(&t.data, &shape, hearth_devices::f16::from_le_bytes),
        DatumType::U8 => decode(&t.data, &shape, u8::from_le_bytes),
        _ => decode(&t.data, &shape, i64::from_le_bytes),
    };
    result.map_err(|e| e.to_string())
}

/// Little-endian element bytes (length already checked) to a tensor.
fn decode<T: Datum + Copy, const N: usize>(
    data: &[u8],
    shape: &[usize],
    from_le: fn([u8; N]) -> T,
) -> hearth_devices::TractResult<Tensor> {
    let values: Vec<T> = data
        .chunks_exact(N)
        .map(|chunk| from_le(chunk.try_into().unwrap_or([0; N])))
        .collect();
    Tensor::from_shape(shape, &values)
}

fn from_model_tensor(t: &Tensor) -> Result<TensorHandle, String> {
    let ty = tensor_type(t.datum_type())
        .ok_or_else(|| format!("model output type {:?} is not supported", t.datum_type()))?;
    let dims = t
        .shape()
        .iter()
        .map(|&d| u32::try_from(d).map_err(|_| "output dimension too large".to_owned()))
        .collect::<Result<Vec<u32>, String>>()?;
    Ok(TensorHandle {
        dims,
        ty,
        data: t.as_bytes().to_vec(),
        refused: 0,
    })
}

type NnResult<T> = wasmtime::Result<Result<T, Resource<NnError>>>;

impl wasi::nn::tensor::Host for &mut NnCtx {}

impl wasi::nn::tensor::HostTensor for &mut NnCtx {
    async fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<TensorHandle>> {
        // The constructor cannot return an error: contents (type, length,
        // size cap, and data the memory limit refused) are checked at
        // compute, where an error can be returned. Only hoarding handles
        // traps.
        if self.live >= MAX_HANDLES {
            wasmtime::bail!("guest created more than {MAX_HANDLES} live wasi-nn handles");
        }
        self.live += 1;
        let tensor = if self.memory.charge(data.len()) {
            TensorHandle {
                dims: dimensions,
                ty,
                data,
                refused: 0,
            }
        } else {
            // Dropped here: the host keeps nothing it cannot charge.
            TensorHandle {
                dims: dimensions,
                ty,
                refused: data.len(),
                data: Vec::new(),
            }
        };
        Ok(self.table.push(tensor)?)
    }

    async fn dimensions(&mut self, tensor: Resource<TensorHandle>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dims.clone())
    }

    async fn ty(&mut self, tensor: Resource<TensorHandle>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&tensor)?.ty)
    }

    async fn data(&mut self, tensor: Resource<TensorHandle>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    async fn drop(&mut self, tensor: Resource<TensorHandle>) -> wasmtime::Result<()> {
        let tensor = self.table.delete(tensor)?;
        self.live = self.live.saturating_sub(1);
        self.memory.release(tensor.data.len());
        Ok(())
    }
}

impl wasi::nn::graph::Host for &mut NnCtx {
    async fn load(
        &mut self,
        _builder: Vec<Vec<u8>>,
        _encoding: GraphEncoding,
        _target: ExecutionTarget,
    ) -> NnResult<Resource<GraphHandle>> {
        self.fail(
            ErrorCode::UnsupportedOperation,
            "loading model bytes from a guest is not allowed: deploy the model with the function ([[models]] in hearth.toml) and use load-by-name",
        )
    }

    async fn load_by_name(&mut self, name: String) -> NnResult<Resource<GraphHandle>> {
        let Some((model, memo)) = self.models.get(&name).cloned() else {
            return self.fail(
                ErrorCode::NotFound,
                format!("no model named `{name}` in this function's manifest"),
            );
        };
        match self.cache.get(&model.key, &model.path, model.placement).await {
            Ok(loaded) => {
                if !self.held.iter().any(|held| Arc::ptr_eq(held, &loaded)) {
                    self.held.push(loaded.clone());
                }
                self.push(GraphHandle {
                    name: name.into(),
                    model: loaded,
                    memo,
                    terms: model.batch,
                })
            }
            Err(err) => self.fail(ErrorCode::RuntimeError, format!("model `{name}`: {err}")),
        }
    }
}

impl wasi::nn::graph::HostGraph for &mut NnCtx {
    async fn init_execution_context(&mut self, graph: Resource<GraphHandle>) -> NnResult<Resource<ContextHandle>> {
        let GraphHandle {
            name,
            model,
            memo,
            terms,
        } = self.table.get(&graph)?.clone();
        self.push(ContextHandle {
            name,
            model,
            memo,
            terms,
        })
    }

    async fn drop(&mut self, graph: Resource<GraphHandle>) -> wasmtime::Result<()> {
        self.release(graph)
    }
}

impl wasi::nn::inference::Host for &mut NnCtx {}

impl wasi::nn::inference::HostGraphExecutionContext for &mut NnCtx {
    async fn compute(
        &mut self,
        context: Resource<ContextHandle>,
        inputs: Vec<(String, Resource<TensorHandle>)>,
    ) -> NnResult<Vec<(String, Resource<TensorHandle>)>> {
        let ContextHandle {
            name: model_name,
            model,
            memo,
            terms,
        } = self.table.get(&context)?.clone();
        let mut named = Vec::with_capacity(inputs.len());
        for (name, tensor) in &inputs {
            let tensor = self.table.get(tensor)?;
            if tensor.refused > 0 {
                let limit_mb = self.memory.limit() >> 20;
                return self.fail(
                    ErrorCode::TooLarge,
                    format!(
                        "input `{name}`: its {} bytes were not kept: holding them would have passed the \
                         instance's memory limit of {limit_mb} MiB (tensors count against it)",
                        tensor.refused
                    ),
                );
            }
            named.push((name.as_str(), tensor));
        }
        let terms = CallTerms {
            urgency: self.urgency,
            ..terms
        };
        match infer(&model_name, &model, memo.as_deref(), &named, terms).await {
            Ok(inferred) => {
                self.usage.add(inferred.usage);
                self.hand_out(inferred.outputs)
            }
            Err(err) => {
                self.usage.add(InferenceUsage::failed(&model_name));
                self.fail(err.code, err.message)
            }
        }
    }

    async fn drop(&mut self, context: Resource<ContextHandle>) -> wasmtime::Result<()> {
        self.release(context)
    }
}

/// The outputs of one inference and what it used.
#[derive(Debug)]
pub struct Inferred {
    /// Every output, named as the model names it, in the model's order.
    pub outputs: Vec<(String, TensorHandle)>,
    /// This one call's usage.
    pub usage: InferenceUsage,
}

/// Why an inference did not run: a `wasi:nn` error code (the caller's
/// fault or the model's) and a message that says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InferError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, naming the input and the shape expected.
    pub message: String,
}

fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, InferError> {
    Err(InferError {
        code,
        message: message.into(),
    })
}

/// One inference of `loaded` on `inputs` (named as the model names them, in
/// any order): checks every input against the model, answers from `memo`
/// when it holds the call, else runs it through the model's batcher on
/// `terms`. The one path of guests' `compute` and of the Open Inference
/// Protocol.
async fn infer(
    name: &str,
    loaded: &LoadedModel,
    memo: Option<&InferenceCache>,
    inputs: &[(&str, &TensorHandle)],
    terms: CallTerms,
) -> Result<Inferred, InferError> {
    let arrived = std::time::Instant::now();
    let specs = loaded.model.inputs();
    let mut ordered: Vec<Option<Tensor>> = vec![None; specs.len()];
    for (name, tensor) in inputs {
        let Some(index) = specs.iter().position(|s| &s.name == name) else {
            let known: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return refuse(
                ErrorCode::InvalidArgument,
                format!("the model has no input `{name}` (inputs: {known:?})"),
            );
        };
        let tensor = match to_model_tensor(tensor) {
            Ok(tensor) => tensor,
            Err(message) => return refuse(ErrorCode::InvalidArgument, format!("input `{name}`: {message}")),
        };
        if let Err(err) = loaded.model.check_input(index, tensor.datum_type(), tensor.shape()) {
            return refuse(ErrorCode::InvalidArgument, err.to_string());
        }
        ordered[index] = Some(tensor);
    }
    let mut model_inputs = Vec::with_capacity(ordered.len());
    for (spec, tensor) in specs.iter().zip(ordered) {
        match tensor {
            Some(tensor) => model_inputs.push(tensor),
            None => return refuse(ErrorCode::InvalidArgument, format!("missing input `{}`", spec.name)),
        }
    }
    let rows = if loaded.model.batchable() {
        let rows = model_inputs[0].shape()[0];
        if model_inputs.iter().any(|t| t.shape()[0] != rows) {
            return refuse(ErrorCode::InvalidArgument, "inputs disagree on the batch dimension");
        }
        rows as u64
    } else {
        1
    };
    let memo_key = memo.map(|_| {
        // Every input was found above; keyed in the model's order.
        let keyed = specs.iter().filter_map(|spec| {
            inputs
                .iter()
                .find(|(name, _)| *name == spec.name)
                .map(|(n, t)| (*n, *t))
        });
        InferenceCache::key(keyed)
    });
    let mut usage = InferenceUsage::default();
    if let (Some(memo), Some(key)) = (memo, &memo_key)
        && let Some(stored) = memo.get(key)
    {
        usage.cache_hits = 1;
        usage.models.push(ModelCalls {
            model: name.to_owned(),
            success: 1,
            inferences: rows,
            request: arrived.elapsed(),
            ..ModelCalls::default()
        });
        let names = loaded.model.outputs().iter().map(|spec| spec.name.clone());
        return Ok(Inferred {
            outputs: names.zip(stored.iter().cloned()).collect(),
            usage,
        });
    }
    let span = tracing::info_span!("inference", model = %loaded.key, device = %loaded.device);
    let batched = match tracing::Instrument::instrument(loaded.batcher.run(model_inputs, terms), span).await {
        Ok(batched) => batched,
        Err(err) => return refuse(ErrorCode::RuntimeError, err.to_string()),
    };
    usage.calls = 1;
    usage.batched_with = batched.calls as u64;
    usage.compute = batched.compute;
    if matches!(loaded.device, DeviceId::Cuda(_)) {
        usage.gpu = batched.compute;
    }
    if batched.on_caller {
        usage.on_caller = batched.compute;
    }
    usage.devices.push(loaded.device);
    let mut outputs = Vec::with_capacity(batched.outputs.len());
    for (spec, tensor) in loaded.model.outputs().iter().zip(&batched.outputs) {
        match from_model_tensor(tensor) {
            Ok(handle) => outputs.push((spec.name.clone(), handle)),
            Err(message) => return refuse(ErrorCode::RuntimeError, message),
        }
    }
    if let (Some(memo), Some(key)) = (memo, memo_key) {
        memo.insert(key, outputs.iter().map(|(_, handle)| handle.clone()).collect());
    }
    usage.models.push(ModelCalls {
        model: name.to_owned(),
        success: 1,
        inferences: rows,
        executions: u64::from(batched.leads),
        request: arrived.elapsed(),
        queued: batched.queued,
        compute: batched.compute,
        ..ModelCalls::default()
    });
    Ok(Inferred { outputs, usage })
}

impl NnCtx {
    /// Gives `outputs` to the guest as handles, each charged against the
    /// instance's memory.
    fn hand_out(&mut self, outputs: Vec<(String, TensorHandle)>) -> NnResult<Vec<(String, Resource<TensorHandle>)>> {
        let mut handles = Vec::with_capacity(outputs.len());
        for (name, handle) in outputs {
            let size = handle.data.len();
            if !self.memory.charge(size) {
                return self.fail(
                    ErrorCode::TooLarge,
                    format!(
                        "output `{name}` ({size} bytes) would pass the instance's memory limit of {} MiB",
                        self.memory.limit() >> 20
                    ),
                );
            }
            match self.push(handle)? {
                Ok(resource) => handles.push((name, resource)),
                Err(error) => {
                    self.memory.release(size);
                    return Ok(Err(error));
                }
            }
        }
        Ok(Ok(handles))
    }
}

impl wasi::nn::errors::Host for &mut NnCtx {}

impl wasi::nn::errors::HostError for &mut NnCtx {
    async fn code(&mut self, error: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    async fn data(&mut self, error: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.message.clone())
    }

    async fn drop(&mut self, error: Resource<NnError>) -> wasmtime::Result<()> {
        self.release(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_devices::{CacheConfig, DevicePool};
    use hearth_fixtures::models::{MLP_CLASSES, MLP_INPUTS, mlp, mlp_input};
    use wasi::nn::graph::{Host as _, HostGraph as _};
    use wasi::nn::inference::HostGraphExecutionContext as _;
    use wasi::nn::tensor::HostTensor as _;

    fn ctx(dir: &std::path::Path) -> NnCtx {
        ctx_within(dir, InstanceMemory::new(usize::MAX))
    }

    fn ctx_within(dir: &std::path::Path, memory: Arc<InstanceMemory>) -> NnCtx {
        ctx_with(dir, "mnist-mlp", &mlp(1), memory)
    }

    /// An instance's context granted one model, `model`, named `name`.
    fn ctx_with(dir: &std::path::Path, name: &str, model: &[u8], memory: Arc<InstanceMemory>) -> NnCtx {
        let path = dir.join(format!("{name}.onnx"));
        std::fs::write(&path, model).expect("write");
        let models = [(
            name.to_owned(),
            ModelRef {
                key: name.into(),
                path,
                placement: Placement::Auto,
                cache_entries: 0,
                batch: CallTerms::default(),
            },
        )];
        let host = NnHost::new(ModelCache::new(DevicePool::cpu_only(), CacheConfig::default()));
        host.instance(&host.grant("acme", models), memory)
    }

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    async fn code_of(ctx: &mut NnCtx, error: Resource<NnError>) -> ErrorCode {
        wasi::nn::errors::HostError::code(&mut &mut *ctx, error)
            .await
            .expect("code")
    }

    /// An execution context of the granted model named `model`.
    async fn execution_context(ctx: &mut NnCtx, model: &str) -> Resource<ContextHandle> {
        let mut host = &mut *ctx;
        let graph = host.load_by_name(model.into()).await.expect("host").expect("graph");
        host.init_execution_context(graph)
            .await
            .expect("host")
            .expect("context")
    }

    async fn compute(
        ctx: &mut NnCtx,
        name: &str,
        dims: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    ) -> Result<Vec<(String, Resource<TensorHandle>)>, ErrorCode> {
        let context = execution_context(ctx, "mnist-mlp").await;
        let mut host = &mut *ctx;
        let tensor = host.new(dims, ty, data).await.expect("tensor");
        match host.compute(context, vec![(name.into(), tensor)]).await.expect("host") {
            Ok(outputs) => Ok(outputs),
            Err(error) => Err(code_of(ctx, error).await),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_tensor_type_tract_runs_crosses_the_bridge_both_ways() {
        use hearth_devices::f16;
        let dir = tempfile::tempdir().expect("tempdir");
        let casts = hearth_fixtures::models::casts();
        let mut ctx = ctx_with(dir.path(), "casts", &casts, InstanceMemory::new(usize::MAX));
        let context = execution_context(&mut ctx, "casts").await;
        let mut host = &mut ctx;
        let halves: Vec<u8> = [0.5f32, -2.0, 1024.0]
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let doubles: Vec<u8> = [1.25f64, 3.0, 200.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut inputs = Vec::new();
        for (name, ty, data) in [
            ("bytes", TensorType::U8, vec![0, 7, 255]),
            ("halves", TensorType::Fp16, halves),
            ("doubles", TensorType::Fp64, doubles),
        ] {
            inputs.push((name.to_owned(), host.new(vec![1, 3], ty, data).await.expect("tensor")));
        }
        let outputs = host.compute(context, inputs).await.expect("host").expect("compute");
        let mut got = std::collections::BTreeMap::new();
        for (name, tensor) in outputs {
            let ty = host.ty(Resource::new_borrow(tensor.rep())).await.expect("ty");
            let data = host.data(Resource::new_borrow(tensor.rep())).await.expect("data");
            got.insert(name, (ty, data));
        }
        let f64s = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f16s = |v: &[f32]| {
            v.iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect::<Vec<u8>>()
        };
        assert_eq!(got["bytes_as_doubles"], (TensorType::Fp64, f64s(&[0.0, 7.0, 255.0])));
        assert_eq!(got["halves_as_floats"], (TensorType::Fp32, f32s(&[0.5, -2.0, 1024.0])));
        assert_eq!(got["doubles_as_halves"], (TensorType::Fp16, f16s(&[1.25, 3.0, 200.0])));
        assert_eq!(got["doubles_as_bytes"], (TensorType::U8, vec![1, 3, 200]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instance_holds_the_models_it_loaded_until_it_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ctx = ctx(dir.path());
        let cache = ctx.cache.clone();
        let mut host = &mut ctx;
        let graph = host
            .load_by_name("mnist-mlp".into())
            .await
            .expect("host")
            .expect("graph");
        wasi::nn::graph::HostGraph::drop(&mut host, graph).await.expect("drop");
        // The guest let go of its graph; idle past any timeout, the model
        // stays while the instance lives.
        let evict = || cache.evict_idle_older_than(std::time::Duration::ZERO);
        assert_eq!(evict(), 0, "a live instance's model stays loaded");
        assert_eq!(cache.cached().len(), 1);
        drop(ctx);
        assert_eq!(evict(), 1, "then goes with the instance");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compute_runs_the_named_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ctx = ctx(dir.path());
        let outputs = compute(
            &mut ctx,
            "input",
            vec![1, MLP_INPUTS as u32],
            TensorType::Fp32,
            bytes(&mlp_input(0)),
        )
        .await
        .expect("compute");
        assert_eq!(outputs[0].0, "output");
        let mut host = &mut ctx;
        let out = &outputs[0].1;
        let dims = host.dimensions(Resource::new_borrow(out.rep())).await.expect("dims");
        assert_eq!(dims, [1, MLP_CLASSES as u32]);
        let data = host.data(Resource::new_borrow(out.rep())).await.expect("data");
        let probabilities: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let usage = ctx.take_usage();
        assert_eq!((usage.calls, usage.batched_with), (1, 1));
        assert_eq!(usage.devices, [DeviceId::Cpu]);
        assert_eq!(usage.device_label(), "cpu");
        assert!(!usage.compute.is_zero(), "a CPU run is billed its compute");
        assert!(usage.gpu.is_zero());
        // Taken means counted once: a reused instance's next call starts at zero.
        assert_eq!(ctx.take_usage(), InferenceUsage::default());
    }

    /// The first output's bytes of one MLP call on input number `input`.
    async fn output_of(ctx: &mut NnCtx, input: u64) -> Vec<u8> {
        let input = bytes(&mlp_input(input));
        let outputs = compute(ctx, "input", vec![1, MLP_INPUTS as u32], TensorType::Fp32, input)
            .await
            .expect("compute");
        let mut host = &mut *ctx;
        host.data(Resource::new_borrow(outputs[0].1.rep())).await.expect("data")
    }

    /// A model with `cache_entries` answers identical inputs from its
    /// tenant's cache: the same bytes, no run; another tenant's identical
    /// call runs its own model.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_inputs_are_answered_from_the_tenants_inference_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mlp.onnx");
        std::fs::write(&path, mlp(1)).expect("write");
        let host = NnHost::new(ModelCache::new(DevicePool::cpu_only(), CacheConfig::default()));
        let instance = |tenant: &str| {
            let models = [(
                "mnist-mlp".to_owned(),
                ModelRef {
                    key: "mlp-1".into(),
                    path: path.clone(),
                    placement: Placement::Auto,
                    cache_entries: 8,
                    batch: CallTerms::default(),
                },
            )];
            host.instance(&host.grant(tenant, models), InstanceMemory::new(usize::MAX))
        };
        let mut acme = instance("acme");
        let first = output_of(&mut acme, 0).await;
        let usage = acme.take_usage();
        assert_eq!((usage.calls, usage.cache_hits), (1, 0));
        // Another instance of the tenant: a hit, bit for bit.
        let mut again = instance("acme");
        assert_eq!(output_of(&mut again, 0).await, first);
        let usage = again.take_usage();
        assert_eq!((usage.calls, usage.cache_hits), (0, 1), "no model ran");
        assert!(usage.compute.is_zero());
        assert_ne!(output_of(&mut again, 1).await, first, "another input runs");
        assert_eq!(again.take_usage().calls, 1);
        // The same call from another tenant is never answered from acme's.
        let mut other = instance("globex");
        assert_eq!(output_of(&mut other, 0).await, first);
        assert_eq!(other.take_usage().cache_hits, 0);
        assert_eq!(host.inference_cache_counts(), (1, 3));
    }

    /// Tensors count against the instance's memory limit with its linear
    /// memory: past it their data is not kept, and using one is a
    /// `too-large` error; dropping one gives its bytes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tensors_count_against_the_instances_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let memory = InstanceMemory::new(1 << 20);
        assert!(memory.grow_linear(256 << 10), "a quarter for linear memory");
        let mut ctx = ctx_within(dir.path(), memory.clone());
        let row = bytes(&mlp_input(0));
        let dims = vec![1, MLP_INPUTS as u32];
        let mut host = &mut ctx;
        let kept = host
            .new(vec![600_000], TensorType::U8, vec![1; 600_000])
            .await
            .expect("kept");
        assert_eq!(memory.host_bytes(), 600_000);
        assert!(
            !memory.grow_linear(512 << 10),
            "linear memory cannot take what tensors hold"
        );
        let refused = host
            .new(vec![300_000], TensorType::U8, vec![1; 300_000])
            .await
            .expect("handle");
        assert_eq!(memory.host_bytes(), 600_000, "nothing held for the refused tensor");
        assert!(
            host.data(Resource::new_borrow(refused.rep()))
                .await
                .expect("data")
                .is_empty()
        );
        wasi::nn::tensor::HostTensor::drop(&mut host, refused)
            .await
            .expect("drop");
        // Compute refuses an input whose data was not kept.
        let over = InstanceMemory::new(1 << 20);
        assert!(over.grow_linear(1 << 20));
        let mut full = ctx_within(dir.path(), over);
        let code = compute(&mut full, "input", dims.clone(), TensorType::Fp32, row.clone()).await;
        assert_eq!(code.expect_err("refused"), ErrorCode::TooLarge);

        let mut host = &mut ctx;
        wasi::nn::tensor::HostTensor::drop(&mut host, kept).await.expect("drop");
        assert_eq!(memory.host_bytes(), 0, "dropping gives the bytes back");
        compute(&mut ctx, "input", dims, TensorType::Fp32, row)
            .await
            .expect("fits again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_inputs_are_wasi_nn_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ctx = ctx(dir.path());
        let row = bytes(&mlp_input(0));
        let n = MLP_INPUTS as u32;
        let cases: Vec<(&str, Vec<u32>, TensorType, Vec<u8>)> = vec![
            ("input", vec![1, n - 1], TensorType::Fp32, row[..row.len() - 4].to_vec()),
            ("input", vec![1, n], TensorType::Fp32, row[..row.len() - 1].to_vec()),
            (
                "input",
                vec![u32::MAX, u32::MAX, u32::MAX],
                TensorType::Fp32,
                vec![0; 16],
            ),
            // A zero among huge dimensions: no elements, but strides that
            // overflow (a fuzzer's find).
            (
                "input",
                vec![
                    2_442_199_185,
                    697_405_841,
                    0,
                    2_444_333_312,
                    26_289_449,
                    2_442_236_160,
                    722_078_353,
                ],
                TensorType::Fp32,
                Vec::new(),
            ),
            ("input", vec![1, n], TensorType::Fp16, row.clone()),
            ("input", vec![1, n], TensorType::I32, row.clone()),
            ("nope", vec![1, n], TensorType::Fp32, row.clone()),
        ];
        for (name, dims, ty, data) in cases {
            let result = compute(&mut ctx, name, dims.clone(), ty, data).await;
            assert_eq!(result.err(), Some(ErrorCode::InvalidArgument), "{name} {dims:?} {ty:?}");
        }
        let mut host = &mut ctx;
        let missing = host
            .load_by_name("other".into())
            .await
            .expect("host")
            .expect_err("unknown");
        assert_eq!(code_of(&mut ctx, missing).await, ErrorCode::NotFound);
        let mut host = &mut ctx;
        let refused = host
            .load(vec![mlp(1)], GraphEncoding::Onnx, ExecutionTarget::Cpu)
            .await
            .expect("host")
            .expect_err("raw bytes");
        assert_eq!(code_of(&mut ctx, refused).await, ErrorCode::UnsupportedOperation);
    }
}
