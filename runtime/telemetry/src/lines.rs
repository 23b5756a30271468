//! Where log lines go: stderr, with the request log batched.
//!
//! A request log line is written on every invocation, so its cost is on the
//! warm path: it is appended to a buffer under a short lock (no system
//! call, no channel, no thread woken), and the buffer goes to stderr in one
//! `write` when it is large, every [`FLUSH_EVERY`] otherwise, and when the
//! process stops. Every other line (warnings, errors, start-up) is rare and
//! goes out at once, after the request lines before it, so stderr keeps
//! the order in which lines were logged.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// The target of the per-invocation request log line.
pub const REQUEST_TARGET: &str = "hearth::request";
/// Longest a request line waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffer size at which the logger writes it out itself.
const FLUSH_AT: usize = 64 << 10;

#[derive(Debug, Default)]
struct Shared {
    /// Request lines not yet written.
    pending: Mutex<Vec<u8>>,
    /// Held while writing to stderr, so batches leave in order.
    out: Mutex<()>,
    stopped: AtomicBool,
}

impl Shared {
    /// Writes the pending lines, then `then`.
    fn flush(&self, then: &[u8]) {
        let _out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        let mut stderr = std::io::stderr().lock();
        // Nowhere to report a failing stderr: the lines are dropped.
        let _ = stderr.write_all(&pending);
        let _ = stderr.write_all(then);
    }
}

/// The log's writer (a [`MakeWriter`]); its flusher thread stops, after a
/// last flush, when the [`FlushGuard`] is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Lines(Arc<Shared>);

/// Flushes and stops the writer when dropped.
#[derive(Debug)]
pub(crate) struct FlushGuard {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Lines {
    /// A writer and the guard of its flusher thread.
    pub(crate) fn start() -> std::io::Result<(Lines, FlushGuard)> {
        let shared = Arc::new(Shared::default());
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("hearth-log-flush".into())
                .spawn(move || {
                    while !shared.stopped.load(Ordering::Acquire) {
                        std::thread::park_timeout(FLUSH_EVERY);
                        shared.flush(&[]);
                    }
                })?
        };
        Ok((
            Lines(shared.clone()),
            FlushGuard {
                shared,
                flusher: Some(flusher),
            },
        ))
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        if let Some(flusher) = self.flusher.take() {
            flusher.thread().unpark();
            let _ = flusher.join();
        }
        self.shared.flush(&[]);
    }
}

/// One line's writer: buffered (request lines) or direct.
#[derive(Debug)]
pub(crate) struct LineWriter<'a> {
    shared: &'a Shared,
    buffered: bool,
}

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if !self.buffered {
            self.shared.flush(line);
            return Ok(line.len());
        }
        let full = {
            let mut pending = self.shared.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.extend_from_slice(line);
            pending.len() >= FLUSH_AT
        };
        if full {
            self.shared.flush(&[]);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.0,
            buffered: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LineWriter {
            shared: &self.0,
            buffered: meta.target() == REQUEST_TARGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn request_lines_wait_for_a_flush_and_other_lines_take_them_along() {
        let (lines, guard) = Lines::start().expect("start");
        let request = |shared| LineWriter { shared, buffered: true };
        request(&lines.0).write_all(b"request\n").expect("write");
        let waiting = lines.0.pending.lock().expect("lock").clone();
        assert_eq!(waiting, b"request\n", "buffered, not written");
        lines.make_writer().write_all(b"warning\n").expect("write");
        assert!(
            lines.0.pending.lock().expect("lock").is_empty(),
            "a direct line writes the request lines before it"
        );
        request(&lines.0).write_all(b"request\n").expect("write");
        drop(guard);
        assert!(lines.0.pending.lock().expect("lock").is_empty(), "flushed at the end");
    }
}
