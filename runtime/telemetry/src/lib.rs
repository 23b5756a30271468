//! Hearth's telemetry: what operators see of the runtime.
//!
//! - **Metrics** are OpenTelemetry instruments ([`Telemetry::meter`]) read by
//!   a Prometheus exporter into its own registry; `GET /metrics` renders it
//!   ([`Telemetry::render`]). Per-invocation instruments are recorded through
//!   [`Telemetry::invocation`]; gauges of pools, queues and models are
//!   observed from the runtime's state by callbacks the server registers.
//! - **Traces**: every invocation is a `tracing` span with children (queue,
//!   guest, inference); [`init_tracing`] exports them by OTLP/HTTP when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and does nothing extra otherwise.
//! - **Logs** are `tracing` events on stderr, as text or one JSON object per
//!   line.
//!
//! Label sets are bounded: the first [`MAX_FUNCTION_SERIES`] functions (by
//! tenant and name) seen since start get series of their own; the rest are
//! folded into `tenant="other", function="other"`
//! ([`Telemetry::function_labels`]), so a tenant deploying thousands of
//! functions cannot blow up the scrape.

mod lines;
mod request;

pub use lines::{GUEST_BUFFER_BYTES, GUEST_TARGET, REQUEST_TARGET, guest_lines_dropped};
pub use request::{RequestLine, log_request};

use std::time::Duration;

use opentelemetry::KeyValue;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Why telemetry could not start or render.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus exporter refused its configuration.
    #[error("metrics exporter: {0}")]
    Exporter(String),
    /// Encoding the Prometheus text failed.
    #[error("encoding metrics: {0}")]
    Encode(String),
    /// The OTLP exporter could not be built.
    #[error("OTLP trace exporter: {0}")]
    Otlp(String),
    /// The log writer's thread could not start.
    #[error("log writer: {0}")]
    LogWriter(String),
}

/// One finished invocation, as metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct InvocationMetrics<'a> {
    /// Tenant.
    pub tenant: &'a str,
    /// Function.
    pub function: &'a str,
    /// Usage outcome (`ok`, `guest_trap`, `rejected`, ...).
    pub outcome: &'static str,
    /// HTTP status.
    pub status: u16,
    /// Wall time.
    pub wall: Duration,
    /// Time in the queue.
    pub queue: Duration,
    /// Whether it started a fresh instance.
    pub cold_start: bool,
    /// Mean batch size of its inference calls (0 without inference).
    pub batch_size: f64,
    /// Its model compute (shares of batched runs), on every device.
    pub compute: Duration,
    /// The part of `compute` that ran on GPUs.
    pub gpu: Duration,
    /// The version that ran.
    pub version: u32,
    /// The alias called (`latest` for a bare name, empty for `@N`).
    pub alias: &'a str,
    /// A shadow copy of an alias's request.
    pub shadow: bool,
}

/// One function's calls of one model, as Triton's `nv_inference_*`
/// metrics count them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelCallMetrics {
    /// Calls answered.
    pub success: u64,
    /// Calls that failed.
    pub failure: u64,
    /// Inferences (rows on the batch axis) answered.
    pub inferences: u64,
    /// Model runs (a joined run counted once).
    pub executions: u64,
    /// Time from arrival to outputs, summed.
    pub request: Duration,
    /// Time waiting for runs, summed.
    pub queued: Duration,
    /// Compute (shares of runs), summed.
    pub compute: Duration,
}

/// Triton's per-model counters (the names its dashboards read), labelled
/// `model` (`{function}.{model}`), `version` (the function's) and `tenant`.
/// Plain Prometheus counters in the same registry, so they keep Triton's
/// exact names (no `_total` suffix).
#[derive(Debug)]
struct TritonCounters {
    success: prometheus::IntCounterVec,
    failure: prometheus::IntCounterVec,
    count: prometheus::IntCounterVec,
    exec_count: prometheus::IntCounterVec,
    request_us: prometheus::IntCounterVec,
    queue_us: prometheus::IntCounterVec,
    compute_us: prometheus::IntCounterVec,
}

const TRITON_LABELS: [&str; 3] = ["model", "version", "tenant"];

impl TritonCounters {
    fn new(registry: &prometheus::Registry) -> Result<TritonCounters, TelemetryError> {
        let counter = |name: &str, help: &str| {
            let counter = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), &TRITON_LABELS)
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            registry
                .register(Box::new(counter.clone()))
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            Ok::<_, TelemetryError>(counter)
        };
        Ok(TritonCounters {
            success: counter(
                "nv_inference_request_success",
                "Number of successful inference requests, all batch sizes",
            )?,
            failure: counter(
                "nv_inference_request_failure",
                "Number of failed inference requests, all batch sizes",
            )?,
            count: counter(
                "nv_inference_count",
                "Number of inferences performed (a batch of n counts n)",
            )?,
            exec_count: counter(
                "nv_inference_exec_count",
                "Number of model executions performed (a batch counts once)",
            )?,
            request_us: counter(
                "nv_inference_request_duration_us",
                "Cumulative inference request duration in microseconds (includes cached requests)",
            )?,
            queue_us: counter(
                "nv_inference_queue_duration_us",
                "Cumulative inference queuing duration in microseconds",
            )?,
            compute_us: counter(
                "nv_inference_compute_infer_duration_us",
                "Cumulative compute inference duration in microseconds (each request's share of its batch)",
            )?,
        })
    }
}

/// Functions (tenant and name) with series of their own at most; later
/// ones share the `other` series.
pub const MAX_FUNCTION_SERIES: usize = 1000;
/// The label value folded functions share.
pub const OTHER: &str = "other";

/// One function's series, each bound to its labels the first time it is
/// recorded: an invocation's measurements then skip the sorting, hashing
/// and lookup of attribute sets the SDK does on every unbound call. Look
/// it up once ([`Telemetry::series`]) and keep it with the function (the
/// invoker keeps it on the deployed version): every invocation of it is
/// then recorded with no look-up and no lock of Hearth's.
pub struct FunctionSeries {
    /// `tenant` and `function` (values shared, so cloning allocates nothing).
    labels: [KeyValue; 2],
    queue: OnceLock<BoundHistogram<f64>>,
    cold_starts: OnceLock<BoundCounter<u64>>,
    batch_size: OnceLock<BoundHistogram<f64>>,
    /// The invocation counter and duration histogram of the first outcome
    /// and status recorded (a function's usual answer), read without a lock.
    first: OnceLock<OutcomeSeries>,
    /// Those of the other outcomes and statuses (a handful per function).
    outcomes: RwLock<Vec<OutcomeSeries>>,
}

struct OutcomeSeries {
    outcome: &'static str,
    status: u16,
    invocations: BoundCounter<u64>,
    duration: BoundHistogram<f64>,
}

impl std::fmt::Debug for FunctionSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionSeries")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl FunctionSeries {
    fn new(tenant: &str, function: &str) -> FunctionSeries {
        let shared = |value: &str| opentelemetry::Value::String(Arc::<str>::from(value).into());
        FunctionSeries {
            labels: [
                KeyValue::new("tenant", shared(tenant)),
                KeyValue::new("function", shared(function)),
            ],
            queue: OnceLock::new(),
            cold_starts: OnceLock::new(),
            batch_size: OnceLock::new(),
            first: OnceLock::new(),
            outcomes: RwLock::new(Vec::new()),
        }
    }

    fn bind(&self, t: &Telemetry, outcome: &'static str, status: u16) -> OutcomeSeries {
        let labels = [
            self.labels[0].clone(),
            self.labels[1].clone(),
            KeyValue::new("outcome", outcome),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ];
        OutcomeSeries {
            outcome,
            status,
            invocations: t.invocations.bind(&labels),
            duration: t.duration.bind(&labels),
        }
    }

    /// The counter and histogram bound to `outcome` and `status`.
    fn by_outcome(&self, t: &Telemetry, outcome: &'static str, status: u16, record: impl FnOnce(&OutcomeSeries)) {
        let first = self.first.get_or_init(|| self.bind(t, outcome, status));
        if first.outcome == outcome && first.status == status {
            return record(first);
        }
        let find = |all: &[OutcomeSeries]| all.iter().position(|o| o.outcome == outcome && o.status == status);
        {
            let all = self.outcomes.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = find(&all) {
                return record(&all[i]);
            }
        }
        let mut all = self.outcomes.write().unwrap_or_else(PoisonError::into_inner);
        let i = find(&all).unwrap_or_else(|| {
            all.push(self.bind(t, outcome, status));
            all.len() - 1
        });
        record(&all[i]);
    }
}

/// The metrics pipeline and the instruments recorded per invocation.
#[derive(Debug)]
pub struct Telemetry {
    /// Functions that have series of their own, by tenant (looked up by
    /// `&str` on every invocation).
    series: dashmap::DashMap<
        String,
        std::collections::HashMap<String, Arc<FunctionSeries>, foldhash::fast::RandomState>,
        foldhash::fast::RandomState,
    >,
    /// The series functions past the bound share.
    other: Arc<FunctionSeries>,
    /// How many functions `series` holds.
    series_count: std::sync::atomic::AtomicUsize,
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
    invocations: Counter<u64>,
    duration: Histogram<f64>,
    queue: Histogram<f64>,
    cold_starts: Counter<u64>,
    batch_size: Histogram<f64>,
    compute_time: Counter<f64>,
    rollout_invocations: Counter<u64>,
    rollout_duration: Histogram<f64>,
    triton: TritonCounters,
}

/// Latency buckets, in seconds: 100 µs to 30 s.
const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];
/// Batch size buckets.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

impl Telemetry {
    /// Starts the metrics pipeline.
    pub fn new() -> Result<Telemetry, TelemetryError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("hearth");
        let invocations = meter
            .u64_counter("hearth.invocations")
            .with_description("Invocations that reached a function, by outcome")
            .build();
        let duration = meter
            .f64_histogram("hearth.invocation.duration")
            .with_unit("s")
            .with_description("Wall time of invocations, from arrival to the end of the response")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let queue = meter
            .f64_histogram("hearth.queue.duration")
            .with_unit("s")
            .with_description("Time invocations waited for an instance")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let cold_starts = meter
            .u64_counter("hearth.cold_starts")
            .with_description("Invocations that needed a fresh instance")
            .build();
        let batch_size = meter
            .f64_histogram("hearth.inference.batch_size")
            .with_description("Mean batch size of each invocation's inference calls")
            .with_boundaries(BATCH_BUCKETS.to_vec())
            .build();
        let compute_time = meter
            .f64_counter("hearth.inference.compute_time")
            .with_unit("s")
            .with_description("Model compute billed to invocations (shares of batched runs), by device kind")
            .build();
        let rollout_invocations = meter
            .u64_counter("hearth.rollout.invocations")
            .with_description(
                "Invocations through an alias other than `latest` (canaries, shadows), by version and outcome",
            )
            .build();
        let rollout_duration = meter
            .f64_histogram("hearth.rollout.duration")
            .with_unit("s")
            .with_description("Wall time of invocations through an alias other than `latest`, by version")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let _guest_dropped = meter
            .u64_observable_counter("hearth.guest.output.dropped")
            .with_description("Guest output lines dropped because the guest log buffer was full")
            .with_callback(|counter| counter.observe(guest_lines_dropped(), &[]))
            .build();
        let triton = TritonCounters::new(&registry)?;
        Ok(Telemetry {
            triton,
            series: dashmap::DashMap::default(),
            other: Arc::new(FunctionSeries::new(OTHER, OTHER)),
            series_count: std::sync::atomic::AtomicUsize::new(0),
            registry,
            provider,
            meter,
            invocations,
            duration,
            queue,
            cold_starts,
            batch_size,
            compute_time,
            rollout_invocations,
            rollout_duration,
        })
    }

    /// The meter, for observable instruments the server registers.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// The `tenant` and `function` labels of a function's series: its own
    /// names while fewer than [`MAX_FUNCTION_SERIES`] functions have series,
    /// [`OTHER`] for both after.
    pub fn function_labels(&self, tenant: &str, function: &str) -> [KeyValue; 2] {
        self.series(tenant, function).labels.clone()
    }

    /// The series of `tenant`'s `function`, made the first time it is seen
    /// (the shared `other` series past [`MAX_FUNCTION_SERIES`]).
    pub fn series(&self, tenant: &str, function: &str) -> Arc<FunctionSeries> {
        use std::sync::atomic::Ordering;
        if let Some(series) = self.series.get(tenant).and_then(|names| names.get(function).cloned()) {
            return series;
        }
        // Racing inserts may pass the bound by the number of racers.
        if self.series_count.load(Ordering::Relaxed) >= MAX_FUNCTION_SERIES {
            return self.other.clone();
        }
        let mut names = self.series.entry(tenant.to_owned()).or_default();
        let series = names.entry(function.to_owned()).or_insert_with(|| {
            self.series_count.fetch_add(1, Ordering::Relaxed);
            Arc::new(FunctionSeries::new(tenant, function))
        });
        series.clone()
    }

    /// Records one finished invocation of the function whose `series`
    /// ([`Telemetry::series`]) it is.
    pub fn invocation(&self, series: &FunctionSeries, m: &InvocationMetrics<'_>) {
        let function = &series.labels;
        let wall = m.wall.as_secs_f64();
        series.by_outcome(self, m.outcome, m.status, |o| {
            o.invocations.add(1);
            o.duration.record(wall);
        });
        let bind = |histogram: &Histogram<f64>| histogram.bind(function);
        series
            .queue
            .get_or_init(|| bind(&self.queue))
            .record(m.queue.as_secs_f64());
        if m.cold_start {
            series
                .cold_starts
                .get_or_init(|| self.cold_starts.bind(function))
                .add(1);
        }
        if m.batch_size > 0.0 {
            series
                .batch_size
                .get_or_init(|| bind(&self.batch_size))
                .record(m.batch_size);
        }
        // Versions behind one alias, side by side: bounded by the versions
        // deployers route to, so only for aliases they set.
        if !m.alias.is_empty() && m.alias != "latest" && function[0].value.as_str() != OTHER {
            let labels = [
                function[0].clone(),
                function[1].clone(),
                KeyValue::new("alias", m.alias.to_owned()),
                KeyValue::new("version", i64::from(m.version)),
                KeyValue::new("shadow", m.shadow),
                KeyValue::new("outcome", m.outcome),
            ];
            self.rollout_invocations.add(1, &labels);
            self.rollout_duration.record(m.wall.as_secs_f64(), &labels[..5]);
        }
        let cpu = m.compute.saturating_sub(m.gpu);
        if !cpu.is_zero() {
            self.compute_time
                .add(cpu.as_secs_f64(), &[KeyValue::new("kind", "cpu")]);
        }
        if !m.gpu.is_zero() {
            self.compute_time
                .add(m.gpu.as_secs_f64(), &[KeyValue::new("kind", "cuda")]);
        }
    }

    /// Records calls of `model` by version `version` of `tenant`'s
    /// `function` in the Triton-compatible counters (folded into
    /// [`OTHER`] past the series bound, like every per-function series).
    pub fn model_calls(&self, tenant: &str, function: &str, version: u32, model: &str, m: &ModelCallMetrics) {
        let [tenant, function] = self.function_labels(tenant, function);
        let (model, version) = if function.value.as_str() == OTHER {
            (OTHER.to_owned(), "0".to_owned())
        } else {
            (format!("{}.{model}", function.value.as_str()), version.to_string())
        };
        let tenant = tenant.value.as_str();
        let labels = [model.as_str(), version.as_str(), &*tenant];
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let t = &self.triton;
        for (counter, value) in [
            (&t.success, m.success),
            (&t.failure, m.failure),
            (&t.count, m.inferences),
            (&t.exec_count, m.executions),
            (&t.request_us, micros(m.request)),
            (&t.queue_us, micros(m.queued)),
            (&t.compute_us, micros(m.compute)),
        ] {
            counter.with_label_values(&labels).inc_by(value);
        }
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> Result<String, TelemetryError> {
        use prometheus::Encoder as _;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(|e| TelemetryError::Encode(e.to_string()))?;
        String::from_utf8(out).map_err(|e| TelemetryError::Encode(e.to_string()))
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// The content type of [`Telemetry::render`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the log writer and the trace pipeline alive; flushes both when
/// dropped.
#[derive(Debug)]
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    _log: lines::FlushGuard,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global `tracing` subscriber: logs on stderr in `format`,
/// filtered by `HEARTH_LOG` (default `info`), and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported by OTLP/HTTP.
///
/// A request log line per invocation is the default, so its cost is kept
/// off the warm path: request lines are batched (see [`lines`]), and, when
/// no trace exporter is configured, spans are not even created (a global
/// filter lets only events through). The log lines carry their own fields,
/// not the enclosing spans' (spans go to OTLP), so the log layer never
/// formats span fields either.
pub fn init_tracing(format: LogFormat, service: &str) -> Result<TracingGuard, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, log_guard) = lines::Lines::start().map_err(|e| TelemetryError::LogWriter(e.to_string()))?;
    // Colour only for a person at a terminal: escape codes cost formatting
    // on every line and mean nothing to a log collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer.clone())
        .with_ansi(ansi);
    let events_only = tracing_subscriber::filter::filter_fn(|metadata| metadata.is_event());
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(events_only).boxed(),
        LogFormat::Json => fmt.json().with_filter(events_only).boxed(),
    };
    let otlp = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    let provider = if otlp {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_owned())
            .build();
        Some(
            opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    let layer = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(provider.tracer("hearth"))
    });
    // Without an exporter nothing reads spans: never create them.
    let spans = tracing_subscriber::filter::filter_fn(move |metadata| otlp || metadata.is_event());
    tracing_subscriber::registry()
        .with(filter)
        .with(spans)
        .with(fmt)
        .with(layer)
        .init();
    // Request lines skip `tracing` when plain text is all that reads them
    // (colour and spans are the generic formatter's, JSON its own); the
    // filter is asked once, as it cannot change.
    if format == LogFormat::Text && !ansi && !otlp {
        let enabled = tracing::enabled!(
            kind: tracing::metadata::Kind::EVENT,
            target: REQUEST_TARGET,
            tracing::Level::INFO
        );
        request::install(writer, enabled);
    }
    if otlp {
        tracing::info!("exporting traces by OTLP to OTEL_EXPORTER_OTLP_ENDPOINT");
    }
    Ok(TracingGuard {
        provider,
        _log: log_guard,
    })
}

use tracing_subscriber::Layer as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_past_the_series_bound_fold_into_other() {
        let telemetry = Telemetry::new().expect("telemetry");
        for i in 0..MAX_FUNCTION_SERIES {
            let [_, function] = telemetry.function_labels("acme", &format!("f{i}"));
            assert_eq!(function.value.as_str(), format!("f{i}"));
        }
        let [tenant, function] = telemetry.function_labels("acme", "one-too-many");
        assert_eq!(
            (tenant.value.as_str(), function.value.as_str()),
            (OTHER.into(), OTHER.into())
        );
        let [_, known] = telemetry.function_labels("acme", "f0");
        assert_eq!(known.value.as_str(), "f0", "a function with series keeps them");
    }

    #[test]
    fn invocations_render_as_prometheus_text() {
        let telemetry = Telemetry::new().expect("telemetry");
        let m = InvocationMetrics {
            tenant: "acme",
            function: "echo",
            outcome: "ok",
            status: 200,
            wall: Duration::from_millis(3),
            queue: Duration::ZERO,
            cold_start: true,
            batch_size: 0.0,
            compute: Duration::ZERO,
            gpu: Duration::ZERO,
            version: 3,
            alias: "latest",
            shadow: false,
        };
        let echo = telemetry.series("acme", "echo");
        telemetry.invocation(&echo, &m);
        telemetry.invocation(&echo, &m);
        assert!(
            !telemetry.render().expect("render").contains("hearth_rollout"),
            "`latest` has no per-version series"
        );
        telemetry.invocation(
            &echo,
            &InvocationMetrics {
                alias: "prod",
                shadow: true,
                ..m
            },
        );
        let text = telemetry.render().expect("render");
        assert!(
            text.lines().any(|l| l.starts_with("hearth_invocations_total{")
                && l.contains("function=\"echo\"")
                && l.ends_with(" 3")),
            "{text}"
        );
        assert!(text.contains("hearth_invocation_duration_seconds_bucket"), "{text}");
        assert!(
            text.lines().any(|l| l.starts_with("hearth_rollout_invocations_total{")
                && l.contains("alias=\"prod\"")
                && l.contains("shadow=\"true\"")
                && l.contains("version=\"3\"")
                && l.ends_with(" 1")),
            "{text}"
        );
        assert!(text.contains("hearth_rollout_duration_seconds_bucket"), "{text}");
        assert!(text.contains("hearth_cold_starts_total"), "{text}");

        // Outcomes after the first have series of their own too.
        for status in [500, 500, 504] {
            let failed = InvocationMetrics {
                outcome: "guest_error",
                status,
                ..m
            };
            telemetry.invocation(&echo, &failed);
        }
        let text = telemetry.render().expect("render");
        let count = |outcome: &str, status: u16| {
            text.lines()
                .find(|l| {
                    l.starts_with("hearth_invocations_total{")
                        && l.contains("function=\"echo\"")
                        && l.contains(&format!("outcome=\"{outcome}\""))
                        && l.contains(&format!("status_code=\"{status}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(count("ok", 200).as_deref(), Some("3"), "{text}");
        assert_eq!(count("guest_error", 500).as_deref(), Some("2"), "{text}");
        assert_eq!(count("guest_error", 504).as_deref(), Some("1"), "{text}");
    }
}
