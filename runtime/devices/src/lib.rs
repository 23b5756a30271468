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

pub use batcher::{BatchConfig, Batcher, DEFAULT_BATCH_WINDOW, DEFAULT_MAX_BATCH_ROWS};
pub use cache::{CacheConfig, CachedModel, LoadedModel, ModelCache};
pub use cpu::CpuDevice;
pub use cuda::{GpuInfo, discover_gpus};
pub use model::{Dim, IoSpec, PreparedModel};
pub use tract_onnx::prelude::{Datum, DatumType, Tensor, TractResult};

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
}

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
        if !gpus.is_empty() {
            tracing::warn!("GPU execution is not built into this Hearth yet: models run on the CPU");
        }
        DevicePool {
            cpu: Arc::new(CpuDevice::new()),
            gpus,
        }
    }

    /// A pool with the CPU only (tests, or `--no-gpu`).
    pub fn cpu_only() -> DevicePool {
        DevicePool {
            cpu: Arc::new(CpuDevice::new()),
            gpus: Vec::new(),
        }
    }

    /// The CPU device.
    pub fn cpu(&self) -> Arc<dyn Device> {
        self.cpu.clone()
    }

    /// Every device models can be placed on: the CPU first.
    pub fn all(&self) -> Vec<Arc<dyn Device>> {
        vec![self.cpu()]
    }

    /// GPUs found at start-up.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// Picks the device for a model: the manifest's wish first. Without a
    /// GPU backend every model runs on the CPU; a model that insists on a GPU
    /// is refused, with the reason.
    pub fn place(&self, placement: Placement) -> Result<Arc<dyn Device>> {
        if placement == Placement::Gpu {
            let reason = if self.gpus.is_empty() {
                "`device = \"gpu\"` but this server has no CUDA GPU; use `device = \"auto\"` to run on the CPU"
            } else {
                "`device = \"gpu\"` but GPU execution is not built into this server yet; use `device = \"auto\"`"
            };
            return Err(DeviceError::NoDevice(reason.into()));
        }
        Ok(self.cpu())
    }
}
