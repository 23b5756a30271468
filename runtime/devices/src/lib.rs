//! Where models run: devices, the warm model cache and the batcher.
//!
//! - [`DevicePool`] finds the devices once at start-up: the CPU always; CUDA
//!   GPUs when the driver loads (checked before any CUDA call, which would
//!   otherwise panic without a driver).
//! - [`Device::prepare`] turns ONNX bytes into a [`PreparedModel`]: optimised
//!   once, shared by every instance of every function that names the same
//!   model content (tract's `Runtime::prepare` → `Runnable`).
//! - [`ModelCache`] keeps prepared models warm, loads each one once even when
//!   asked concurrently, and evicts idle or least-recently-used ones.
//! - [`Batcher`] joins compute calls that arrive within a short window into
//!   one run along the batch axis, and splits the outputs back.

mod batcher;
mod cache;
mod cpu;
mod cuda;
mod model;

use std::fmt;
use std::sync::Arc;

pub use batcher::{BatchConfig, Batched, Batcher, CallTerms, DEFAULT_BATCH_WINDOW, DEFAULT_MAX_BATCH_ROWS};
pub use cache::{CacheConfig, CachedModel, LoadedModel, ModelCache};
pub use cache::{DEFAULT_MODEL_COLD_BUDGET, DEFAULT_MODEL_IDLE_TIMEOUT, DEFAULT_MODEL_MEMORY_BUDGET};
pub use cpu::CpuDevice;
pub use cuda::{GpuInfo, discover_gpus};
pub use model::{Dim, IoSpec, PreparedModel};
pub use tract_onnx::prelude::{Datum, DatumType, Tensor, TractResult, f16};

/// Result of a device operation.
pub type Result<T, E = DeviceError> = std::result::Result<T, E>;

/// Why a device operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// The model file is not a usable ONNX model.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// The inputs do not fit the model (caller's fault).
    #[error("{0}")]
    InvalidInput(String),
    /// The model failed while running.
    #[error("inference failed: {0}")]
    Runtime(String),
    /// No device can take the model.
    #[error("{0}")]
    NoDevice(String),
    /// The batcher or a worker went away (shutdown).
    #[error("model worker unavailable")]
    Unavailable,
}

/// A device kind and index, as usage records and status show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceId {
    /// The host CPU.
    Cpu,
    /// CUDA device N.
    Cuda(u32),
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Cpu => f.write_str("cpu"),
            DeviceId::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where a model asks to run (the manifest's `device`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placement {
    /// A GPU with room for it, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A GPU, or nothing.
    Gpu,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::Auto => "auto",
            Placement::Cpu => "cpu",
            Placement::Gpu => "gpu",
        })
    }
}

/// A place models run. Preparing is expensive and done once per model;
/// running is cheap and concurrent.
pub trait Device: Send + Sync + fmt::Debug + 'static {
    /// Which device this is.
    fn id(&self) -> DeviceId;
    /// Parses, optimises and prepares an ONNX model. Blocking (milliseconds
    /// to seconds): call it from a blocking thread.
    fn prepare(&self, onnx: &[u8]) -> Result<PreparedModel>;
}

/// The devices of this machine, found once at start-up.
#[derive(Debug, Clone)]
pub struct DevicePool {
    cpu: Arc<CpuDevice>,
    gpus: Vec<GpuInfo>,
    /// The GPU models run on, when a GPU backend loaded.
    gpu: Option<Arc<dyn Device>>,
    /// Bytes of model files placed on the GPU so far (placement budget).
    gpu_placed: Arc<std::sync::atomic::AtomicU64>,
}

/// Bytes of model placed on the GPU, given back when the loaded model is
/// dropped (evicted), so `auto` placement sees the room free again.
#[derive(Debug)]
pub(crate) struct GpuReservation {
    placed: Arc<std::sync::atomic::AtomicU64>,
    bytes: u64,
}

impl Drop for GpuReservation {
    fn drop(&mut self) {
        self.placed.fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A model on a GPU takes several times its file size once optimised and
/// with activations; `auto` placement keeps this factor free.
const GPU_SIZE_FACTOR: u64 = 4;

impl DevicePool {
    /// Discovers devices and logs what was found, once.
    pub fn discover() -> DevicePool {
        let gpus = match discover_gpus() {
            Ok(gpus) => gpus,
            Err(reason) => {
                tracing::info!(%reason, "no CUDA GPU: running models on the CPU only");
                Vec::new()
            }
        };
        for gpu in &gpus {
            tracing::info!(device = %DeviceId::Cuda(gpu.ordinal), name = %gpu.name, free_bytes = gpu.free_bytes, "found GPU");
        }
        let gpu = if gpus.is_empty() { None } else { open_gpu() };
        DevicePool {
            cpu: Arc::new(CpuDevice::new()),
            gpus,
            gpu,
            gpu_placed: Default::default(),
        }
    }

    /// A pool with the CPU only (tests, or `--no-gpu`).
    pub fn cpu_only() -> DevicePool {
        DevicePool {
            cpu: Arc::new(CpuDevice::new()),
            gpus: Vec::new(),
            gpu: None,
            gpu_placed: Default::default(),
        }
    }

    /// The CPU device.
    pub fn cpu(&self) -> Arc<dyn Device> {
        self.cpu.clone()
    }

    /// Every device models can be placed on: the CPU first.
    pub fn all(&self) -> Vec<Arc<dyn Device>> {
        let mut all = vec![self.cpu()];
        all.extend(self.gpu.clone());
        all
    }

    /// GPUs found at start-up.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// Picks the device for a model of `size_bytes`: the manifest's wish
    /// first (`gpu` needs one, `cpu` never uses one), then for `auto` the GPU
    /// while its free memory (at start-up, less what was placed there) holds
    /// a few times the model, else the CPU. The GPU room it takes is held
    /// until the returned reservation is dropped (with the loaded model).
    pub(crate) fn place(
        &self,
        placement: Placement,
        size_bytes: u64,
    ) -> Result<(Arc<dyn Device>, Option<GpuReservation>)> {
        use std::sync::atomic::Ordering;
        self.check(placement)?;
        match (placement, &self.gpu) {
            (Placement::Cpu, _) | (Placement::Gpu, None) | (Placement::Auto, None) => Ok((self.cpu(), None)),
            (Placement::Gpu, Some(gpu)) => Ok((gpu.clone(), Some(self.reservation(size_bytes)))),
            (Placement::Auto, Some(gpu)) => {
                let free = self.gpus.first().map_or(0, |g| g.free_bytes);
                let placed = self.gpu_placed.load(Ordering::Relaxed);
                let needed = size_bytes.saturating_mul(GPU_SIZE_FACTOR);
                if placed.saturating_add(needed) <= free {
                    Ok((gpu.clone(), Some(self.reservation(size_bytes))))
                } else {
                    Ok((self.cpu(), None))
                }
            }
        }
    }

    fn reservation(&self, bytes: u64) -> GpuReservation {
        let scaled = bytes.saturating_mul(GPU_SIZE_FACTOR);
        self.gpu_placed.fetch_add(scaled, std::sync::atomic::Ordering::Relaxed);
        GpuReservation {
            placed: self.gpu_placed.clone(),
            bytes: scaled,
        }
    }

    /// Whether this server can honour `placement` at all (a deploy checks
    /// this before it reads any model): `gpu` needs a working GPU backend.
    pub fn check(&self, placement: Placement) -> Result<()> {
        if placement != Placement::Gpu || self.gpu.is_some() {
            return Ok(());
        }
        Err(DeviceError::NoDevice(if self.gpus.is_empty() {
            "`device = \"gpu\"` but this server has no CUDA GPU; use `device = \"auto\"` to run on the CPU".into()
        } else {
            "`device = \"gpu\"` but this server's GPU backend is not available (see its start-up log); use `device = \"auto\"`".into()
        }))
    }
}

#[cfg(feature = "cuda")]
fn open_gpu() -> Option<Arc<dyn Device>> {
    match cuda::CudaDevice::open() {
        Ok(device) => {
            tracing::info!("models placed on the GPU run on cuda:0 with tract-cuda");
            Some(Arc::new(device))
        }
        Err(reason) => {
            tracing::warn!(%reason, "a GPU is present but tract-cuda cannot run on it: models run on the CPU");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_gpu() -> Option<Arc<dyn Device>> {
    tracing::warn!("a GPU is present but this Hearth was built without the `cuda` feature: models run on the CPU");
    None
}
