//! The text log format: `tracing-subscriber`'s own, written faster for the
//! line every invocation logs.
//!
//! A request log line is on every invocation's path, and formatting it
//! through the generic formatter cost about 4 µs of a warm `hello`'s
//! 70 µs (`perf`, 32 connections): the timestamp's calendar arithmetic
//! and a `write!` per field. [`TextFormat`] writes the same line (same
//! timestamp, level, target and `key=value` fields) with the timestamp's
//! date and time kept per second, and integers, plain strings and
//! milliseconds written without the formatting machinery. Every other line (warnings, start-up) is rare and
//! goes through the generic formatter, spans and all.

use std::cell::RefCell;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::lines::REQUEST_TARGET;

/// The text format (see the module's documentation).
pub(crate) struct TextFormat {
    generic: Format<Full>,
}

impl TextFormat {
    /// `ansi`: colour the generic lines (a person at a terminal).
    pub(crate) fn new(ansi: bool) -> TextFormat {
        TextFormat {
            generic: Format::default().with_ansi(ansi),
        }
    }
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let metadata = event.metadata();
        // Colour, or a span around the line: the generic formatter's job.
        if metadata.target() != REQUEST_TARGET || writer.has_ansi_escapes() || ctx.lookup_current().is_some() {
            return self.generic.format_event(ctx, writer, event);
        }
        write_timestamp(&mut writer, std::time::SystemTime::now())?;
        write!(writer, " {:>5} {}: ", metadata.level(), metadata.target())?;
        let mut fields = Fields {
            writer: &mut writer,
            result: Ok(()),
            first: true,
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

thread_local! {
    /// The second last written and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Writes `now` as `tracing-subscriber` does: RFC 3339 in UTC with
/// microseconds (`2026-12-01T23:48:23.123456Z`).
fn write_timestamp(writer: &mut Writer<'_>, now: std::time::SystemTime) -> fmt::Result {
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            let at = i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            text.clear();
            write!(
                text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            )?;
            *second = secs;
        }
        writer.write_str(text)
    })?;
    let micros = since.subsec_micros();
    let mut digits = *b".000000Z";
    let mut n = micros;
    for digit in digits[1..7].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
    writer.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
}

/// Writes an event's fields as the generic formatter does: the message
/// first as it is, then ` key=value`, strings quoted.
struct Fields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl Fields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::replace(&mut self.first, false) {
            self.writer.write_char(' ')?;
        }
        self.writer.write_str(field.name())?;
        self.writer.write_char('=')
    }

    fn integer(&mut self, field: &Field, value: impl itoa::Integer) {
        if self.result.is_ok() {
            self.result = self
                .key(field)
                .and_then(|()| self.writer.write_str(itoa::Buffer::new().format(value)));
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.integer(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.integer(field, value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        // What `{:?}` writes for a string with nothing to escape (names,
        // outcomes), without its per-character escaping.
        let plain = value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
        if !plain || field.name() == "message" {
            return self.record_debug(field, &value);
        }
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| {
                self.writer.write_char('"')?;
                self.writer.write_str(value)?;
                self.writer.write_char('"')
            });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // In this range `{:?}` writes the shortest digits that read back,
        // in decimal, as ryu does, at a fraction of the cost (times in
        // milliseconds on every request line).
        if value != 0.0 && !(1e-3..1e15).contains(&value.abs()) {
            return self.record_debug(field, &value);
        }
        if self.result.is_ok() {
            self.result = self
                .key(field)
                .and_then(|()| self.writer.write_str(ryu::Buffer::new().format_finite(value)));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            self.result = self
                .key(field)
                .and_then(|()| self.writer.write_str(if value { "true" } else { "false" }));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            let space = if std::mem::replace(&mut self.first, false) {
                ""
            } else {
                " "
            };
            write!(self.writer, "{space}{value:?}")
        } else {
            self.key(field).and_then(|()| write!(self.writer, "{value:?}"))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    /// The lines written by `log` through `format`.
    fn lines(
        format: impl FormatEvent<tracing_subscriber::Registry, tracing_subscriber::fmt::format::DefaultFields>
        + Send
        + Sync
        + 'static,
        log: impl FnOnce(),
    ) -> String {
        let out = Collected::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(format)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8")
    }

    fn request_line() {
        tracing::info!(
            target: REQUEST_TARGET,
            invocation_id = %"0193a0e8-0000-7000-8000-000000000001",
            tenant = %"acme",
            version = 3u32,
            status = 200u16,
            outcome = "ok",
            quoted = "say \"hi\"\n",
            wall_ms = 0.25,
            queue_ms = 0.0,
            whole_ms = 1.0,
            small_ms = 0.001,
            large_ms = 12_345.678,
            tiny = 1e-5,
            big = 1e15,
            delta = -4i64,
            cold_start = false,
            "invocation"
        );
    }

    #[test]
    fn a_request_line_reads_as_the_generic_formatter_writes_it() {
        let fast = lines(TextFormat::new(false), request_line);
        let generic = lines(Format::default().with_ansi(false), request_line);
        // The timestamps differ (written at different times): compare
        // their shape, then the rest.
        let (fast_at, fast_rest) = fast.split_once(' ').expect("timestamp");
        let (generic_at, generic_rest) = generic.split_once(' ').expect("timestamp");
        assert_eq!(fast_rest, generic_rest);
        assert_eq!(fast_at.len(), generic_at.len(), "{fast_at} vs {generic_at}");
        assert!(fast_at.ends_with('Z') && fast_at.as_bytes()[10] == b'T', "{fast_at}");
        assert!(
            fast_rest.starts_with(" INFO hearth::request: invocation invocation_id=0193a0e8"),
            "{fast_rest}"
        );
    }

    #[test]
    fn timestamps_are_rfc_3339_with_microseconds() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_764_632_903_000_042);
        let mut text = String::new();
        write_timestamp(&mut Writer::new(&mut text), at).expect("written");
        assert_eq!(text, "2025-12-01T23:48:23.000042Z");
    }
}
