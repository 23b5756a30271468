//! CUDA: discovery through cudarc's dynamically loaded driver, and (with the
//! `cuda` feature) a device that runs models with tract-cuda.
//!
//! cudarc panics on its first call when the driver library is missing, so
//! nothing here calls CUDA before `is_culib_present` says the library loads,
//! and tract-cuda is only used after its runtime's `check` passes (it probes
//! the driver, cudart, NVRTC, cuBLAS and cuDNN the same way).

/// A GPU found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// CUDA device ordinal.
    pub ordinal: u32,
    /// Marketing name.
    pub name: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Free memory in bytes at discovery.
    pub free_bytes: u64,
}

/// Lists the CUDA GPUs, or says why there are none.
pub fn discover_gpus() -> Result<Vec<GpuInfo>, String> {
    #[expect(unsafe_code, reason = "probing for the CUDA driver library")]
    // SAFETY: `is_culib_present` only tries to dlopen the driver library and
    // reports whether it loaded; it dereferences nothing of ours.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    if !present {
        return Err("the CUDA driver library (libcuda) is not installed".into());
    }
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| format!("cuInit failed: {e}"))?;
    let mut gpus = Vec::new();
    for ordinal in 0..count.max(0) {
        let ordinal = ordinal as usize;
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (free, total) = ctx.mem_get_info().map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        gpus.push(GpuInfo {
            ordinal: ordinal as u32,
            name,
            total_bytes: total as u64,
            free_bytes: free as u64,
        });
    }
    if gpus.is_empty() {
        return Err("the CUDA driver reports no devices".into());
    }
    Ok(gpus)
}

#[cfg(feature = "cuda")]
pub(crate) use gpu::CudaDevice;

#[cfg(feature = "cuda")]
mod gpu {
    use tract_onnx::tract_core::runtime::{Runtime, runtime_for_name};

    use crate::{Device, DeviceId, PreparedModel, Result, Tensor};

    // Linking tract-cuda registers its runtime under the name `cuda`.
    use tract_cuda as _;

    /// Runs models on a GPU with tract-cuda. tract-cuda keeps one
    /// process-wide context on device 0, so every model shares it (and only
    /// `cuda:0` is used).
    #[derive(Debug)]
    pub(crate) struct CudaDevice {
        runtime: &'static dyn Runtime,
    }

    impl CudaDevice {
        /// The tract-cuda runtime, if its libraries load; else why not.
        pub(crate) fn open() -> std::result::Result<CudaDevice, String> {
            match runtime_for_name("cuda") {
                Ok(Some(runtime)) => Ok(CudaDevice { runtime }),
                Ok(None) => Err("this build has no tract-cuda runtime".into()),
                Err(err) => Err(format!("{err:#}")),
            }
        }
    }

    impl Device for CudaDevice {
        fn id(&self) -> DeviceId {
            DeviceId::Cuda(0)
        }

        fn prepare(&self, onnx: &[u8]) -> Result<PreparedModel> {
            Ok(PreparedModel::compile(onnx, self.runtime)?.with_timer(time_on_gpu))
        }
    }

    /// Times `run` with CUDA events on this thread's tract-cuda stream (the
    /// stream the run's kernels go to). A failure to time is logged, never
    /// fails the run.
    fn time_on_gpu(run: &mut dyn FnMut() -> Result<Vec<Tensor>>) -> Result<(Vec<Tensor>, Option<std::time::Duration>)> {
        // cudarc's default event flags disable timing: ask for timing events.
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = tract_cuda::with_cuda_stream(|stream| Ok(stream.record_event(timing)?));
        let outputs = run()?;
        let elapsed = start.and_then(|start| {
            tract_cuda::with_cuda_stream(|stream| {
                let end = stream.record_event(timing)?;
                end.synchronize()?;
                Ok(start.elapsed_ms(&end)?)
            })
        });
        match elapsed {
            Ok(ms) => Ok((
                outputs,
                Some(std::time::Duration::from_secs_f64(f64::from(ms) / 1000.0)),
            )),
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "timing a GPU run failed");
                Ok((outputs, None))
            }
        }
    }
}
