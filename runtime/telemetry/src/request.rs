//! The request log line: one per invocation, so on the warm path.
//!
//! Through `tracing` the line cost about 3 µs of a warm `hello`'s ~125
//! (`perf`, 32 connections): the dispatch through the subscriber's layers
//! and filters, and writing each field through the formatter's
//! `dyn fmt::Write`. When the log is plain text on stderr with nothing else
//! reading events (no colour, no OTLP export: see [`install`]),
//! [`log_request`] writes the same line (timestamp, level, target, fields,
//! as `tracing-subscriber`'s own format writes them) straight into the
//! request-line buffer: a thread's own byte buffer, the timestamp's date
//! and time kept per second, numbers written by `itoa` and `ryu`. Otherwise
//! (JSON, colour, traces, or no subscriber of Hearth's) the line is a
//! `tracing` event as any other.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::SystemTime;

use crate::InvocationMetrics;
use crate::lines::{Lines, REQUEST_TARGET};

/// One finished invocation, as its request log line shows it: its
/// metrics, its id and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    /// The record id.
    pub invocation_id: &'a str,
    /// What the metrics saw (tenant, function, version, status, outcome,
    /// wall and queue time, cold start).
    pub metrics: InvocationMetrics<'a>,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
}

impl RequestLine<'_> {
    /// Milliseconds, from whole microseconds (so `0.552`, never
    /// `0.5519999999999999`).
    fn ms(time: std::time::Duration) -> f64 {
        // Through `u64`: a `u128` converts to `f64` in software.
        u64::try_from(time.as_micros()).unwrap_or(u64::MAX) as f64 / 1e3
    }
}

/// Where request lines go when they skip `tracing`.
#[derive(Debug)]
enum Direct {
    /// Into the log's request-line buffer.
    Write(Lines),
    /// Nowhere: the filter (`HEARTH_LOG`) leaves them out.
    Off,
}

/// Set once by [`install`]; unset, request lines are `tracing` events.
static DIRECT: OnceLock<Direct> = OnceLock::new();

/// Sends request lines straight to `lines`, or drops them when `enabled` is
/// false. Only for a plain-text log that nothing else reads events from:
/// the line is written as the generic text formatter would, without spans.
pub(crate) fn install(lines: Lines, enabled: bool) {
    let _ = DIRECT.set(if enabled { Direct::Write(lines) } else { Direct::Off });
}

/// Logs a finished invocation's request line (target [`REQUEST_TARGET`],
/// level `info`).
pub fn log_request(line: &RequestLine<'_>) {
    match DIRECT.get() {
        Some(Direct::Write(lines)) => {
            thread_local! {
                static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
            }
            BUFFER.with_borrow_mut(|buffer| {
                buffer.clear();
                write_line(buffer, SystemTime::now(), line);
                lines.push_request(buffer);
            });
        }
        Some(Direct::Off) => {}
        None => event(line),
    }
}

/// The line as a `tracing` event.
fn event(line: &RequestLine<'_>) {
    let m = &line.metrics;
    tracing::info!(
        target: REQUEST_TARGET,
        invocation_id = %line.invocation_id,
        tenant = %m.tenant,
        function = %m.function,
        version = m.version,
        status = m.status,
        outcome = m.outcome,
        wall_ms = RequestLine::ms(m.wall),
        queue_ms = RequestLine::ms(m.queue),
        cold_start = m.cold_start,
        bytes_in = line.bytes_in,
        bytes_out = line.bytes_out,
        "invocation"
    );
}

/// Writes the line, as [`event`] formatted by `tracing-subscriber`'s text
/// format (without colour or spans) would read, at `now`.
fn write_line(out: &mut Vec<u8>, now: SystemTime, line: &RequestLine<'_>) {
    let m = &line.metrics;
    write_timestamp(out, now);
    out.extend_from_slice(b"  INFO ");
    out.extend_from_slice(REQUEST_TARGET.as_bytes());
    out.extend_from_slice(b": invocation invocation_id=");
    out.extend_from_slice(line.invocation_id.as_bytes());
    out.extend_from_slice(b" tenant=");
    out.extend_from_slice(m.tenant.as_bytes());
    out.extend_from_slice(b" function=");
    out.extend_from_slice(m.function.as_bytes());
    out.extend_from_slice(b" version=");
    out.extend_from_slice(itoa::Buffer::new().format(m.version).as_bytes());
    out.extend_from_slice(b" status=");
    out.extend_from_slice(itoa::Buffer::new().format(m.status).as_bytes());
    out.extend_from_slice(b" outcome=");
    write_quoted(out, m.outcome);
    out.extend_from_slice(b" wall_ms=");
    write_f64(out, RequestLine::ms(m.wall));
    out.extend_from_slice(b" queue_ms=");
    write_f64(out, RequestLine::ms(m.queue));
    out.extend_from_slice(if m.cold_start {
        b" cold_start=true"
    } else {
        b" cold_start=false"
    });
    out.extend_from_slice(b" bytes_in=");
    out.extend_from_slice(itoa::Buffer::new().format(line.bytes_in).as_bytes());
    out.extend_from_slice(b" bytes_out=");
    out.extend_from_slice(itoa::Buffer::new().format(line.bytes_out).as_bytes());
    out.push(b'\n');
}

/// A string as `{:?}` writes it: quoted, escaped where it needs to be.
fn write_quoted(out: &mut Vec<u8>, value: &str) {
    let plain = value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
    if plain {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// A float as `{:?}` writes it. In this range that is the shortest digits
/// that read back, in decimal, as ryu writes them at a fraction of the cost.
fn write_f64(out: &mut Vec<u8>, value: f64) {
    if value == 0.0 || (1e-3..1e15).contains(&value.abs()) {
        out.extend_from_slice(ryu::Buffer::new().format_finite(value).as_bytes());
    } else {
        let _ = write!(out, "{value:?}");
    }
}

thread_local! {
    /// The second last written and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Writes `now` as `tracing-subscriber` does: RFC 3339 in UTC with
/// microseconds (`2026-12-01T23:48:23.123456Z`).
fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    use std::fmt::Write as _;
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            let at = i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            text.clear();
            let _ = write!(
                text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            );
            *second = secs;
        }
        out.extend_from_slice(text.as_bytes());
    });
    let mut digits = *b".000000Z";
    let mut n = since.subsec_micros();
    for digit in digits[1..7].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Collects what the log writes.
    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Collected {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `line` as the generic text formatter writes its event.
    fn formatted_event(line: &RequestLine<'_>) -> String {
        let out = Collected::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || event(line));
        String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8")
    }

    fn written(line: &RequestLine<'_>) -> String {
        let mut out = Vec::new();
        write_line(&mut out, SystemTime::now(), line);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_direct_line_reads_as_the_generic_formatter_writes_its_event() {
        let metrics = InvocationMetrics {
            tenant: "acme",
            function: "ocr@prod",
            outcome: "ok",
            status: 200,
            wall: Duration::from_micros(250),
            queue: Duration::ZERO,
            cold_start: false,
            batch_size: 0.0,
            compute: Duration::ZERO,
            gpu: Duration::ZERO,
            version: 3,
            alias: "prod",
            shadow: false,
        };
        let line = RequestLine {
            invocation_id: "0193a0e8-0000-7000-8000-000000000001",
            metrics,
            bytes_in: 0,
            bytes_out: 12_345,
        };
        let odd = RequestLine {
            metrics: InvocationMetrics {
                outcome: "say \"hi\"\n",
                wall: Duration::from_micros(12_345_678),
                queue: Duration::from_nanos(10),
                cold_start: true,
                status: 503,
                ..metrics
            },
            ..line
        };
        let huge = RequestLine {
            metrics: InvocationMetrics {
                wall: Duration::from_secs(1_000_000_000_000),
                queue: Duration::from_micros(1),
                version: u32::MAX,
                ..metrics
            },
            bytes_in: u64::MAX,
            ..line
        };
        for line in [line, odd, huge] {
            let (direct, generic) = (written(&line), formatted_event(&line));
            // The timestamps differ (written at different times): compare
            // their shape, then the rest.
            let (direct_at, direct_rest) = direct.split_once(' ').expect("timestamp");
            let (generic_at, generic_rest) = generic.split_once(' ').expect("timestamp");
            assert_eq!(direct_rest, generic_rest);
            assert_eq!(direct_at.len(), generic_at.len(), "{direct_at} vs {generic_at}");
            assert!(
                direct_at.ends_with('Z') && direct_at.as_bytes()[10] == b'T',
                "{direct_at}"
            );
        }
        assert!(
            written(&line).contains("  INFO hearth::request: invocation invocation_id=0193a0e8"),
            "{}",
            written(&line)
        );
    }

    #[test]
    fn timestamps_are_rfc_3339_with_microseconds() {
        let at = std::time::UNIX_EPOCH + Duration::from_micros(1_764_632_903_000_042);
        let mut text = Vec::new();
        write_timestamp(&mut text, at);
        assert_eq!(text, b"2025-12-01T23:48:23.000042Z");
    }
}
