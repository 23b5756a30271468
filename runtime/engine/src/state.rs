//! Per-instance host state: what a guest's imports see.

use std::path::Path;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// Bytes of guest stdout/stderr kept per invocation; more is dropped.
pub(crate) const CAPTURED_OUTPUT_BYTES: usize = 64 * 1024;

/// Everything one instance's host calls can reach.
pub(crate) struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) hooks: DenyOutgoing,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) stdout: MemoryOutputPipe,
    pub(crate) stderr: MemoryOutputPipe,
    pub(crate) nn: hearth_bridge::NnCtx,
}

impl HostState {
    pub(crate) fn new(
        memory_limit_bytes: usize,
        nn: hearth_bridge::NnCtx,
        assets: Option<&Path>,
    ) -> wasmtime::Result<HostState> {
        let stdout = MemoryOutputPipe::new(CAPTURED_OUTPUT_BYTES);
        let stderr = MemoryOutputPipe::new(CAPTURED_OUTPUT_BYTES);
        // No environment, no arguments, no network, and no directory but the
        // function's own assets, read-only: the builder grants nothing unless
        // asked.
        let mut wasi = WasiCtx::builder();
        wasi.stdout(stdout.clone()).stderr(stderr.clone());
        if let Some(dir) = assets {
            wasi.preopened_dir(dir, "/", FsPerms::ReadOnly)?;
        }
        let wasi = wasi.build();
        Ok(HostState {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: DenyOutgoing,
            limiter: MemoryLimiter::new(memory_limit_bytes),
            stdout,
            stderr,
            nn,
        })
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// `wasi:http` hooks that refuse every outgoing request.
pub(crate) struct DenyOutgoing;

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<wasmtime_wasi_http::WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// Enforces a function's memory limit and records the peak it reached.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: usize,
    pub(crate) peak: usize,
    pub(crate) exceeded: bool,
}

impl MemoryLimiter {
    fn new(limit: usize) -> MemoryLimiter {
        MemoryLimiter {
            limit,
            peak: 0,
            exceeded: false,
        }
    }
}

impl MemoryLimiter {
    pub(crate) fn limit_bytes(&self) -> usize {
        self.limit
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Trap rather than fail the grow: a guest that ignores a failed
        // `memory.grow` would go on to fault elsewhere, with a vaguer message.
        if desired > self.limit {
            self.exceeded = true;
            wasmtime::bail!("memory limit of {} MiB exceeded", self.limit >> 20);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Upper bound on any table's elements, so a guest cannot exhaust host memory
/// through tables.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
