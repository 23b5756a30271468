//! The request body as the guest reads it: limited in size while it
//! streams, and counted for the usage record.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// What a [`LimitedBody`] saw: bytes read (for the usage record) and
/// whether the limit was passed (so the caller can answer 413 even though
/// the guest only saw a read error).
#[derive(Debug, Default)]
pub(crate) struct BodyMeter {
    pub(crate) read: AtomicU64,
    pub(crate) exceeded: AtomicBool,
    /// The body broke off: it stalled past the idle timeout, or the client
    /// went away.
    pub(crate) broken: AtomicBool,
}

/// Wraps a body and fails it with `HttpRequestBodySize` once more than
/// `limit` bytes have arrived.
#[derive(Debug)]
pub(crate) struct LimitedBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
    meter: Arc<BodyMeter>,
}

impl<B> LimitedBody<B> {
    pub(crate) fn new(inner: B, limit: u64) -> (LimitedBody<B>, Arc<BodyMeter>) {
        let meter = Arc::new(BodyMeter::default());
        let body = LimitedBody {
            inner,
            remaining: limit,
            limit,
            meter: meter.clone(),
        };
        (body, meter)
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = hearth_engine::BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.meter.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(hearth_engine::BodyError::HttpRequestBodySize(Some(
                            this.limit,
                        )))));
                    }
                    this.remaining -= len;
                    this.meter.read.fetch_add(len, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                tracing::debug!(error = %err, "request body failed");
                this.meter.broken.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(hearth_engine::BodyError::ConnectionTerminated)))
            }
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Full};

    #[tokio::test]
    async fn passes_bodies_up_to_the_limit_and_flags_larger_ones() {
        let (body, exceeded) = LimitedBody::new(Full::new(Bytes::from_static(b"12345")), 5);
        assert_eq!(body.collect().await.expect("within limit").to_bytes(), "12345");
        assert!(!exceeded.exceeded.load(Ordering::Relaxed));
        assert_eq!(exceeded.read.load(Ordering::Relaxed), 5);

        let (body, exceeded) = LimitedBody::new(Full::new(Bytes::from_static(b"123456")), 5);
        assert!(body.collect().await.is_err());
        assert!(exceeded.exceeded.load(Ordering::Relaxed));
    }
}
