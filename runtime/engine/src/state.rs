//! Per-instance host state: what a guest's imports see.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// Bytes of guest stdout/stderr kept per invocation; more is dropped.
pub(crate) const CAPTURED_OUTPUT_BYTES: usize = 64 * 1024;

/// Everything one instance's host calls can reach.
pub(crate) struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) hooks: OutgoingPolicy,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) stdout: GuestOutput,
    pub(crate) stderr: GuestOutput,
    pub(crate) nn: hearth_bridge::NnCtx,
    /// When the current request's time is up (read by the epoch callback).
    pub(crate) deadline: Instant,
    /// This instance's share of the server's memory budget: held, never
    /// read, and given back when the instance (so this state) is dropped.
    pub(crate) _reservation: Option<crate::budget::Reservation>,
}

impl HostState {
    pub(crate) fn new(
        memory: Arc<hearth_bridge::InstanceMemory>,
        reservation: Option<crate::budget::Reservation>,
        nn: hearth_bridge::NnCtx,
        assets: Option<&Path>,
        outbound: Arc<[hearth_manifest::Origin]>,
        network: crate::OutboundPolicy,
    ) -> wasmtime::Result<HostState> {
        let stdout = GuestOutput::new(CAPTURED_OUTPUT_BYTES);
        let stderr = GuestOutput::new(CAPTURED_OUTPUT_BYTES);
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
            hooks: OutgoingPolicy {
                allowed: outbound,
                network,
            },
            limiter: MemoryLimiter::new(memory),
            stdout,
            stderr,
            nn,
            deadline: Instant::now(),
            _reservation: reservation,
        })
    }
}

/// A guest's stdout or stderr: kept in memory up to a capacity per request
/// and drained after each one (an instance may serve many requests, so the
/// buffer must not fill up for good). Bytes past the capacity are dropped
/// rather than failing the guest's write.
#[derive(Debug, Clone)]
pub(crate) struct GuestOutput {
    buffer: Arc<Mutex<Vec<u8>>>,
    capacity: usize,
}

impl GuestOutput {
    fn new(capacity: usize) -> GuestOutput {
        GuestOutput {
            buffer: Arc::default(),
            capacity,
        }
    }

    /// What was written since the last call.
    pub(crate) fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.buffer.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.capacity.saturating_sub(buffer.len());
        buffer.extend_from_slice(&buf[..buf.len().min(room)]);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
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

/// `wasi:http` hooks that let a guest's outgoing request through only to the
/// origins its manifest lists (`allowed_outbound_hosts`), checked on every
/// request (a guest that follows a redirect sends a new, checked request).
pub(crate) struct OutgoingPolicy {
    allowed: Arc<[hearth_manifest::Origin]>,
    network: crate::OutboundPolicy,
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<wasmtime_wasi_http::WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for OutgoingPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        if !self.allowed.iter().any(|origin| origin.matches(request.uri())) {
            tracing::debug!(uri = %request.uri(), "outgoing request denied");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let network = self.network.clone();
        Box::new(async move {
            use http_body_util::BodyExt;
            let mut request = request;
            pin_destination(&mut request, &network).await?;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            ))
        })
    }
}

/// Checks where `request` would land against the operator's `network`
/// policy, after resolution (literals, `localhost` and names alike). Plain
/// HTTP is then sent to the checked address (the `Host` header keeps the
/// name), so a second lookup cannot swap it (DNS rebinding); HTTPS keeps the
/// name for TLS, whose certificate check a rebound address would fail.
async fn pin_destination<B>(
    request: &mut http::Request<B>,
    network: &crate::OutboundPolicy,
) -> Result<(), wasmtime_wasi_http::Error> {
    use wasmtime_wasi_http::Error;
    let uri = request.uri();
    let host = uri.host().ok_or(Error::HttpRequestUriInvalid)?;
    let (https, port) = hearth_manifest::scheme_and_port(uri).ok_or(Error::HttpRequestUriInvalid)?;
    let resolved = network.resolve(host, port).await.map_err(|denied| match denied {
        crate::outbound::Denied::Internal { address } => {
            tracing::debug!(host, %address, "outgoing request denied: internal address");
            Error::DestinationIpProhibited
        }
        crate::outbound::Denied::Unresolved { reason, .. } => Error::DnsError {
            rcode: Some(reason),
            info_code: None,
        },
    })?;
    if !https {
        let mut parts = uri.clone().into_parts();
        parts.authority = Some(
            resolved[0]
                .to_string()
                .parse()
                .map_err(|_| Error::HttpRequestUriInvalid)?,
        );
        *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| Error::HttpRequestUriInvalid)?;
    }
    Ok(())
}

/// Enforces a function's memory limit (linear memory and what the host
/// holds for the instance through `wasi:nn`, together) and records the
/// peak linear memory reached.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    memory: Arc<hearth_bridge::InstanceMemory>,
    pub(crate) peak: usize,
    pub(crate) exceeded: bool,
}

impl MemoryLimiter {
    fn new(memory: Arc<hearth_bridge::InstanceMemory>) -> MemoryLimiter {
        MemoryLimiter {
            memory,
            peak: 0,
            exceeded: false,
        }
    }

    pub(crate) fn limit_bytes(&self) -> usize {
        self.memory.limit()
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Trap rather than fail the grow: a guest that ignores a failed
        // `memory.grow` would go on to fault elsewhere, with a vaguer message.
        if !self.memory.grow_linear(desired) {
            self.exceeded = true;
            wasmtime::bail!(
                "memory limit of {} MiB exceeded ({} MiB held for it through wasi-nn)",
                self.memory.limit() >> 20,
                self.memory.host_bytes() >> 20
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> http::Request<()> {
        http::Request::get(uri).body(()).expect("request")
    }

    #[tokio::test]
    async fn destinations_are_checked_and_pinned() {
        let network = crate::OutboundPolicy::allowing(["127.0.0.2/32".parse().expect("cidr")]);
        for denied in ["http://127.1:8080/x", "http://localhost:8080/x", "http://[::1]:8080/x"] {
            let mut sneaky = request(denied);
            assert!(
                matches!(
                    pin_destination(&mut sneaky, &network).await,
                    Err(wasmtime_wasi_http::Error::DestinationIpProhibited)
                ),
                "{denied}"
            );
        }
        let mut admitted = request("http://127.0.0.2:8080/x");
        pin_destination(&mut admitted, &network).await.expect("admitted");
        assert_eq!(admitted.uri(), "http://127.0.0.2:8080/x");
    }
}
