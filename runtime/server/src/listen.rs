//! The HTTP listener: hyper with the connection limits axum's `serve` does
//! not expose. Connections are bounded in number (past it a connection gets
//! a 503 and is closed); slow clients are cut off (a connection must start
//! its first request within the header read timeout, HTTP/1.1 heads too,
//! request bodies have an idle timeout, HTTP/2 peers are pinged and dropped
//! when silent); header count and size are bounded; every connection gets
//! `TCP_NODELAY`; and a stop signal drains connections gracefully.
//! Closing is lingering: after an early answer (a 413 before the upload was
//! read) the rest of the request is read and dropped for a short while, so
//! the client reads the answer instead of a reset.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Limits on each connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time a client has to send a request's complete head.
    pub header_read_timeout: Duration,
    /// Time a request body may go without sending anything.
    pub body_idle_timeout: Duration,
    /// Headers per request (HTTP/1.1; more is a 431).
    pub max_headers: usize,
    /// Bytes of headers per request (HTTP/2 header list size).
    pub max_header_bytes: u32,
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
}

/// How often an HTTP/2 connection is pinged, and how long its peer has to
/// answer before the connection is dropped.
const HTTP2_KEEP_ALIVE: Duration = Duration::from_secs(30);
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one HTTP/2 connection may have open at once.
const HTTP2_MAX_STREAMS: u32 = 256;

/// The problem a connection past the limit is told before it is closed.
const TOO_MANY_CONNECTIONS: &str = "{\"type\":\"urn:hearth:problem:unavailable\",\"title\":\"Service unavailable\",\
\"status\":503,\"detail\":\"the server is at its connection limit; retry shortly\"}";

/// Serves `app` on `listener` until `stop` turns true, then waits for open
/// connections to finish their requests (the caller bounds that wait).
pub async fn serve(listener: TcpListener, app: hearth_http::App, limits: ConnLimits, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // One copy into hyper's buffer and one `send` beat a `writev` of
        // head, chunk framing and body pieces for the small answers most
        // invocations give (measured: ~1.5 µs less CPU per warm request).
        .writev(false)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(HTTP2_KEEP_ALIVE))
        .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(HTTP2_MAX_STREAMS)
        .max_header_list_size(limits.max_header_bytes);
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut refused: u64 = 0;
    let service = tower::ServiceBuilder::new()
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.body_idle_timeout,
        ))
        .service(app);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: back off briefly
                // instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Responses often go out as a head and a later last frame (which
        // waits for the usage record): without TCP_NODELAY, Nagle's algorithm
        // and the client's delayed ACK would hold that frame back by ~40 ms.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // A flood of refusals must not become a flood of log lines
            // written from the accept loop: the 1st, 2nd, 4th, 8th… only.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    limit = limits.max_connections,
                    refused,
                    "connections refused: at the connection limit"
                );
            }
            tokio::spawn(async move {
                let mut stream = Lingering(Some(stream));
                let answer = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\n\
                     connection: close\r\ncontent-length: {}\r\n\r\n{TOO_MANY_CONNECTIONS}",
                    TOO_MANY_CONNECTIONS.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
            continue;
        };
        let (builder, service, watcher) = (builder.clone(), service.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
            // A connection that sends nothing holds a slot: it must start
            // its first request within the header read timeout (HTTP/1.1's
            // own timeout starts only once hyper knows the protocol).
            let mut first = [0u8; 1];
            if !matches!(
                tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first)).await,
                Ok(Ok(1..))
            ) {
                return;
            }
            let connection = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(Lingering(Some(stream))),
                    TowerToHyperService::new(service),
                )
                .into_owned();
            if let Err(err) = watcher.watch(connection).await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// How long, and how much, a closed connection's unread request is drained.
/// A client that has read the answer stops sending and closes, which ends
/// the drain at once; the bytes bound only one that keeps on sending. They
/// must cover what a fast client sends before it reads the answer: at 16
/// MiB, the CLI's upload of 40 MiB over loopback outran the drain and met a
/// reset about once in ten (like nginx, the time is what bounds it).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 256 << 20;

/// A connection that, once hyper is done with it, half-closes and drains
/// what the client is still sending before closing (as web servers' lingering
/// close does). Closing a socket with unread data sends a reset, which can
/// destroy the answer the client has not read yet, such as a 413 sent while
/// the client was still uploading.
struct Lingering(Option<TcpStream>);

impl Lingering {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.0.as_mut().expect("present until dropped"))
    }
}

impl AsyncRead for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut stream) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _ = stream.shutdown().await;
            let (mut unread, mut sink) = (stream.take(LINGER_BYTES), tokio::io::sink());
            let _ = tokio::time::timeout(LINGER_TIME, tokio::io::copy(&mut unread, &mut sink)).await;
        });
    }
}
