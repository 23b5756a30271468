//! CUDA discovery through cudarc's dynamically loaded driver.
//!
//! cudarc panics on its first call when the driver library is missing, so
//! nothing here calls CUDA before `is_culib_present` says the library loads.

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
