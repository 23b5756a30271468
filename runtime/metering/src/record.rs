//! One usage record per invocation: what ran, for whom, how long, on what,
//! and what it cost.

use serde::{Deserialize, Serialize};

/// How an invocation ended, for billing and for operators. Journals and
/// `usage.db` store an outcome by its place in this list (see
/// `frames::FRAME_TAG` before changing it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The guest answered (any status it chose); what a record says until
    /// told otherwise.
    #[default]
    Ok,
    /// The guest failed without trapping (no response, a `wasi:http` error,
    /// a body cut short).
    GuestError,
    /// The guest trapped.
    GuestTrap,
    /// The deadline passed.
    Timeout,
    /// The guest hit its memory limit.
    MemoryLimit,
    /// Refused before running: queue full, queue deadline, no capacity.
    Rejected,
    /// The caller's request was at fault after the function was found (body
    /// too large, bad QoS header).
    BadRequest,
    /// Hearth failed.
    InternalError,
    /// Answered from the function's response cache: nothing ran.
    CacheHit,
}

impl Outcome {
    /// The name stored and exported.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::GuestError => "guest_error",
            Outcome::GuestTrap => "guest_trap",
            Outcome::Timeout => "timeout",
            Outcome::MemoryLimit => "memory_limit",
            Outcome::Rejected => "rejected",
            Outcome::BadRequest => "bad_request",
            Outcome::InternalError => "internal_error",
            Outcome::CacheHit => "cache_hit",
        }
    }

    /// Every outcome.
    pub const ALL: [Outcome; 9] = [
        Outcome::Ok,
        Outcome::GuestError,
        Outcome::GuestTrap,
        Outcome::Timeout,
        Outcome::MemoryLimit,
        Outcome::Rejected,
        Outcome::BadRequest,
        Outcome::InternalError,
        Outcome::CacheHit,
    ];

    /// The outcome named `s`, as [`Outcome::as_str`] writes it.
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether the guest ran (and the invocation is billed by time).
    pub fn ran(self) -> bool {
        !matches!(self, Outcome::Rejected | Outcome::BadRequest | Outcome::CacheHit)
    }
}

/// What was measured about one invocation, before pricing.
///
/// Its strings are `S`: `String` everywhere but the usage log's ingester,
/// which reads records borrowed from the journal's frames (`Usage<&str>`,
/// see [`UsageRecord`]) rather than copying their strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage<S = String> {
    /// The record id (UUIDv7): the invocation id of a synchronous call, a
    /// fresh one for each attempt of an asynchronous invocation.
    pub id: S,
    /// The asynchronous invocation this attempt ran for (`None` for a
    /// synchronous call, whose record id is its invocation id).
    #[serde(default)]
    pub invocation_id: Option<S>,
    /// Which attempt of its invocation this is, from 1 (always 1 for a
    /// synchronous call).
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// Tenant.
    pub tenant: S,
    /// Function.
    pub function: S,
    /// Version that ran.
    pub version: u32,
    /// The alias the request came through (`latest` for a bare name); empty
    /// when it named the version (`@3`).
    #[serde(default)]
    pub alias: S,
    /// A copy of an alias's request sent to its shadow version, whose
    /// answer nobody saw.
    #[serde(default)]
    pub shadow: bool,
    /// Unix microseconds when the request arrived.
    pub started_at_us: i64,
    /// Unix microseconds when the response (or refusal) was complete.
    pub ended_at_us: i64,
    /// HTTP status sent.
    pub status: u16,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether it needed a fresh instance.
    pub cold_start: bool,
    /// Time waiting in the queue, microseconds.
    pub queue_us: u64,
    /// Largest linear memory of the instance, bytes.
    pub memory_peak_bytes: u64,
    /// CPU time of the guest's task (guest code and the host calls it made),
    /// microseconds.
    pub guest_cpu_us: u64,
    /// `cpu` or `cuda:N`: where its inference ran (`cpu` without
    /// inference); several devices joined with `+` (`cpu+cuda:0`).
    pub device: S,
    /// Model compute, nanoseconds: its share (by rows) of the busy time of
    /// every model run it took part in, on every device. Not in
    /// `guest_cpu_us`.
    #[serde(default)]
    pub compute_ns: u64,
    /// The part of `compute_ns` that ran on GPUs (the rest ran on the CPU).
    #[serde(default)]
    pub gpu_ns: u64,
    /// `wasi:nn` compute calls.
    pub inference_calls: u64,
    /// Sum over compute calls of the calls in their batch.
    pub batched_calls: u64,
    /// `wasi:nn` compute calls answered from an inference cache (not in
    /// `inference_calls`: no model ran).
    #[serde(default)]
    pub inference_cache_hits: u64,
    /// Request body bytes read.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
}

fn first_attempt() -> u32 {
    1
}

impl<S> Usage<S> {
    /// Model compute that ran on the CPU, nanoseconds.
    pub fn cpu_compute_ns(&self) -> u64 {
        self.compute_ns.saturating_sub(self.gpu_ns)
    }

    /// Wall time, microseconds.
    pub fn wall_us(&self) -> u64 {
        u64::try_from(self.ended_at_us.saturating_sub(self.started_at_us)).unwrap_or(0)
    }

    /// Billed milliseconds: wall time rounded up to 1 ms, 0 if the guest
    /// never ran.
    pub fn billed_ms(&self) -> u64 {
        if self.outcome.ran() {
            self.wall_us().div_ceil(1000).max(1)
        } else {
            0
        }
    }
}

/// A priced, durable usage record: the [`Usage`] with its cost, and its
/// place in commit order once the log has it. Journals and `usage.db` store
/// it in postcard's encoding, which is by field order, without names: see
/// `frames::FRAME_TAG` before changing its fields or [`Usage`]'s (and
/// change [`Priced`]'s with them: the log writes records through it). The
/// ingester reads it as `UsageRecord<&str>`, borrowed from a frame: the same
/// fields, so the same layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "S: Deserialize<'de> + Default"))]
pub struct UsageRecord<S = String> {
    /// What was measured.
    pub usage: Usage<S>,
    /// Cost in billionths of the price table's currency unit.
    pub cost_nanos: i64,
    /// Currency of the cost.
    pub currency: S,
    /// Version of the price table that priced it.
    pub price_version: S,
    /// Commit sequence: given by the usage log when the record is written
    /// (0 before), increasing in the order records became visible; the
    /// export cursor follows it.
    #[serde(default)]
    pub seq: u64,
}

impl UsageRecord {
    /// The record as the log writes it.
    pub fn as_priced(&self) -> Priced<'_> {
        Priced {
            usage: &self.usage,
            cost_nanos: self.cost_nanos,
            currency: &self.currency,
            price_version: &self.price_version,
            seq: self.seq,
        }
    }
}

/// A [`UsageRecord`] borrowed from its parts: what [`UsageLog::append`]
/// writes, so that an invocation's meter appends its usage priced without
/// copying it or the price table's names. Its fields are the record's, in
/// the same order, so it encodes exactly as the record it stands for
/// (postcard writes a struct as its fields in order, without names).
///
/// [`UsageLog::append`]: crate::UsageLog::append
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Priced<'a> {
    /// What was measured.
    pub usage: &'a Usage,
    /// Cost in billionths of `currency`.
    pub cost_nanos: i64,
    /// Currency of the cost.
    pub currency: &'a str,
    /// Version of the price table that priced it.
    pub price_version: &'a str,
    /// Commit sequence (set by the log).
    pub seq: u64,
}

/// A record as exported (JSON lines, CloudEvents data, the API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordView {
    pub id: String,
    /// The invocation billed: `id` itself for a synchronous call.
    pub invocation_id: String,
    /// From 1; more than 1 only for retried asynchronous invocations.
    pub attempt: u32,
    pub tenant: String,
    pub function: String,
    pub version: u32,
    /// The alias called (`latest` for a bare name); empty for `@N`.
    pub alias: String,
    /// A shadow copy (nobody saw its answer).
    pub shadow: bool,
    pub started_at: String,
    pub ended_at: String,
    pub status: u16,
    pub outcome: String,
    pub cold_start: bool,
    pub wall_ms: f64,
    pub billed_ms: u64,
    pub queue_ms: f64,
    pub memory_peak_bytes: u64,
    pub guest_cpu_us: u64,
    pub device: String,
    /// Model compute on every device, milliseconds (to the nanosecond).
    pub compute_ms: f64,
    /// Of which on GPUs.
    pub gpu_ms: f64,
    pub inference_calls: u64,
    pub batched_with: f64,
    /// Compute calls answered from an inference cache.
    pub inference_cache_hits: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Decimal string, nine places: exact, unlike a float.
    pub cost: String,
    pub currency: String,
    pub price_version: String,
}

/// Formats billionths as a decimal with nine places (`0.000001234`).
pub fn format_nanos(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

/// Microseconds since the Unix epoch: the clock of a record's times (and
/// of the log's sync and shipping ages).
pub fn now_us() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

/// Formats Unix microseconds as RFC 3339 with microseconds.
pub fn format_us(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

impl From<&UsageRecord> for RecordView {
    fn from(record: &UsageRecord) -> Self {
        let u = &record.usage;
        RecordView {
            id: u.id.clone(),
            invocation_id: u.invocation_id.clone().unwrap_or_else(|| u.id.clone()),
            attempt: u.attempt,
            tenant: u.tenant.clone(),
            function: u.function.clone(),
            version: u.version,
            alias: u.alias.clone(),
            shadow: u.shadow,
            started_at: format_us(u.started_at_us),
            ended_at: format_us(u.ended_at_us),
            status: u.status,
            outcome: u.outcome.as_str().to_owned(),
            cold_start: u.cold_start,
            wall_ms: u.wall_us() as f64 / 1000.0,
            billed_ms: u.billed_ms(),
            queue_ms: u.queue_us as f64 / 1000.0,
            memory_peak_bytes: u.memory_peak_bytes,
            guest_cpu_us: u.guest_cpu_us,
            device: u.device.clone(),
            compute_ms: u.compute_ns as f64 / 1e6,
            gpu_ms: u.gpu_ns as f64 / 1e6,
            inference_calls: u.inference_calls,
            batched_with: if u.inference_calls == 0 {
                0.0
            } else {
                u.batched_calls as f64 / u.inference_calls as f64
            },
            inference_cache_hits: u.inference_cache_hits,
            bytes_in: u.bytes_in,
            bytes_out: u.bytes_out,
            cost: format_nanos(record.cost_nanos),
            currency: record.currency.clone(),
            price_version: record.price_version.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_format_exactly() {
        assert_eq!(format_nanos(0), "0.000000000");
        assert_eq!(format_nanos(1_234), "0.000001234");
        assert_eq!(format_nanos(12_000_000_001), "12.000000001");
        assert_eq!(format_nanos(-5), "-0.000000005");
    }

    #[test]
    fn billed_time_rounds_up_and_refusals_bill_nothing() {
        let mut usage = crate::tests::usage("a", Outcome::Ok);
        usage.ended_at_us = usage.started_at_us + 1_001;
        assert_eq!(usage.billed_ms(), 2);
        usage.ended_at_us = usage.started_at_us;
        assert_eq!(usage.billed_ms(), 1, "a run bills at least 1 ms");
        usage.outcome = Outcome::Rejected;
        assert_eq!(usage.billed_ms(), 0);
    }
}
