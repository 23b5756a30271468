//! Where log lines go: stderr, with the request log batched.
//!
//! A request log line is written on every invocation, so its cost is on the
//! warm path: it is appended to a buffer under a short lock (no system
//! call, no channel, no thread woken), and the buffer goes to stderr in one
//! `write` when it is large, every [`FLUSH_EVERY`] otherwise, and when the
//! process stops. Every other line (warnings, errors, start-up) is rare and
//! goes out at once, after the request lines before it, so stderr keeps
//! the order in which lines were logged.
//!
//! What guests print (target [`GUEST_TARGET`]) is the tenants' to control:
//! it goes to a buffer of its own, bounded by [`GUEST_BUFFER_BYTES`], that
//! only the flusher thread writes out. A guest line that finds the buffer
//! full is dropped and counted ([`guest_lines_dropped`]); no task ever
//! waits on stderr for a guest, and Hearth's own lines never wait behind
//! a guest's.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// The target of the per-invocation request log line.
pub const REQUEST_TARGET: &str = "hearth::request";
/// The target of lines a guest printed.
pub const GUEST_TARGET: &str = "hearth::guest";
/// Bytes of guest lines waiting for the flusher at most; past it they are
/// dropped.
pub const GUEST_BUFFER_BYTES: usize = 1 << 20;

/// Guest lines dropped because the guest buffer was full, since start.
static GUEST_LINES_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Guest lines dropped because the guest buffer was full, since start.
pub fn guest_lines_dropped() -> u64 {
    GUEST_LINES_DROPPED.load(Ordering::Relaxed)
}
/// Longest a request line waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffer size at which the logger writes it out itself.
const FLUSH_AT: usize = 64 << 10;

#[derive(Debug, Default)]
struct Shared {
    /// Request lines not yet written.
    pending: Mutex<Vec<u8>>,
    /// Guest lines not yet written (only the flusher writes them).
    guest: Mutex<Vec<u8>>,
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
                        shared.flush_guest();
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
        self.shared.flush_guest();
    }
}

impl Lines {
    /// Queues a request line (see [`crate::log_request`]).
    pub(crate) fn push_request(&self, line: &[u8]) {
        self.0.push_request(line);
    }
}

impl Shared {
    /// Queues request lines; writes them out once the buffer is full.
    fn push_request(&self, line: &[u8]) {
        let full = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.extend_from_slice(line);
            pending.len() >= FLUSH_AT
        };
        if full {
            self.flush(&[]);
        }
    }

    /// Writes the waiting guest lines (the flusher's job).
    fn flush_guest(&self) {
        let waiting = std::mem::take(&mut *self.guest.lock().unwrap_or_else(PoisonError::into_inner));
        if waiting.is_empty() {
            return;
        }
        // A line at a time under the output lock, so that a Hearth line
        // waits at most for one guest line, never for the whole buffer.
        for line in waiting.split_inclusive(|&b| b == b'\n') {
            let _out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = std::io::stderr().lock().write_all(line);
        }
    }

    /// Queues a guest line for the flusher, or drops it when the buffer is
    /// full.
    fn push_guest(&self, line: &[u8]) {
        let mut guest = self.guest.lock().unwrap_or_else(PoisonError::into_inner);
        if guest.len() + line.len() > GUEST_BUFFER_BYTES {
            GUEST_LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        guest.extend_from_slice(line);
    }
}

/// Which buffer a line goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Written at once, after the request lines before it.
    Direct,
    /// Batched request lines.
    Request,
    /// Guest output: bounded, written by the flusher only.
    Guest,
}

/// One line's writer.
#[derive(Debug)]
pub(crate) struct LineWriter<'a> {
    shared: &'a Shared,
    kind: Kind,
}

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        match self.kind {
            Kind::Direct => {
                self.shared.flush(line);
                return Ok(line.len());
            }
            Kind::Guest => {
                self.shared.push_guest(line);
                return Ok(line.len());
            }
            Kind::Request => self.shared.push_request(line),
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
            kind: Kind::Direct,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let kind = match meta.target() {
            REQUEST_TARGET => Kind::Request,
            GUEST_TARGET => Kind::Guest,
            _ => Kind::Direct,
        };
        LineWriter { shared: &self.0, kind }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn request_lines_wait_for_a_flush_and_other_lines_take_them_along() {
        let (lines, guard) = Lines::start().expect("start");
        let request = |shared| LineWriter {
            shared,
            kind: Kind::Request,
        };
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

    #[test]
    fn guest_lines_are_bounded_and_never_written_by_the_caller() {
        let shared = Shared::default();
        let mut guest = LineWriter {
            shared: &shared,
            kind: Kind::Guest,
        };
        let line = vec![b'x'; 1000];
        let dropped = guest_lines_dropped();
        for _ in 0..(GUEST_BUFFER_BYTES / 1000 + 10) {
            guest.write_all(&line).expect("write");
        }
        assert!(shared.guest.lock().expect("lock").len() <= GUEST_BUFFER_BYTES);
        assert!(
            guest_lines_dropped() - dropped >= 10,
            "lines past the bound are dropped and counted"
        );
        // A direct line writes the request lines, never the guest's.
        LineWriter {
            shared: &shared,
            kind: Kind::Direct,
        }
        .write_all(b"")
        .expect("write");
        assert!(!shared.guest.lock().expect("lock").is_empty(), "left for the flusher");
        shared.flush_guest();
        assert!(shared.guest.lock().expect("lock").is_empty());
    }
}
