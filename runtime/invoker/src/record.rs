//! One usage record per invocation, committed before the client sees the
//! invocation complete.
//!
//! A [`Meter`] starts when the function is resolved. An invocation refused
//! or failed before its response head commits its record with its
//! [`Failure`] ([`Meter::refuse`]) before the failure is answered. A response that
//! streams is wrapped in a [`MeteredBody`]: it holds back the last frame,
//! waits for the guest's report when the body ends, commits the record, and
//! only then sends that frame and ends the body. A client that goes away
//! early still gets its invocation recorded (from the body's drop).
//!
//! Under load (other invocations running), a small response that ends soon
//! after its head is sent whole instead ([`Meter::respond`]): head and body
//! in one write after the commit, which saves a write, a wake-up and the
//! client's second read per request. A lone request still gets its head at
//! once, and a response that is big or slow to end streams as above.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use hearth_engine::{InvokeError, Report};
use hearth_metering::{Durability, LogError, Outcome, PriceTable, Usage, UsageLog};
use hearth_registry::Deployed;
use http::Response;
use http_body::Frame;
use http_body_util::{BodyExt as _, Full};
use tokio::sync::oneshot;

use crate::body::BodyMeter;
use crate::{BoxError, Failure, Invoker, ResponseBody};

/// How a guest's call ended and what it used, from the engine's `done`.
pub(crate) type GuestReport = (Result<(), InvokeError>, Report);

/// Microseconds since the Unix epoch: the clock of records.
pub use hearth_metering::now_us;

/// A new invocation's id and its arrival time ([`now_us`]'s clock), from
/// one clock read, for [`Invoker::begin`]. The id is a UUIDv7: the
/// arrival's millisecond, then 74 random bits from a per-thread generator.
/// `Uuid::now_v7` would read the clock again and take a process-wide lock
/// on every call, to order ids made within one millisecond, which nothing
/// here needs: records are ordered by their commit sequence, and ids only
/// have to be unique.
pub fn arrival() -> (uuid::Uuid, i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = uuid::Timestamp::from_unix(uuid::NoContext, now.as_secs(), now.subsec_nanos());
    let arrived_at_us = i64::try_from(now.as_micros()).unwrap_or(i64::MAX);
    (uuid::Uuid::new_v7(at), arrived_at_us)
}

/// What every meter uses, shared behind one reference: a meter costs one
/// reference count, not one per part (each is an atomic operation on a
/// line every core shares, twice per invocation).
#[derive(Debug)]
pub(crate) struct Metering {
    /// Where records go; `None` runs without metering.
    pub(crate) usage: Option<UsageLog>,
    pub(crate) prices: PriceTable,
    pub(crate) telemetry: Arc<hearth_telemetry::Telemetry>,
}

/// The usage record of one invocation, being filled in: opened by
/// [`Invoker::begin`] once the function is resolved, from when every ending
/// of the invocation is recorded exactly once.
#[derive(Debug)]
pub struct Meter {
    metering: Arc<Metering>,
    /// The function's metric series (kept on its deployed version).
    series: Arc<hearth_telemetry::FunctionSeries>,
    /// Whether the invocation is still to be accounted for (metrics, log
    /// line and usage record).
    open: bool,
    /// Whether the record is still to be written to the usage log (never
    /// without one). Until it is, the log counts the invocation as
    /// announced ([`UsageLog::announce`]): it groups strict commits, and a
    /// shutdown waits for it.
    unwritten: bool,
    usage: Usage,
    body: Option<Arc<BodyMeter>>,
    report: Option<oneshot::Receiver<GuestReport>>,
    /// The request was a `HEAD`: its answer has no body to wait for.
    head_only: bool,
}

impl Meter {
    /// Starts the record of invocation `id` of `deployed`, which arrived at
    /// `started_at_us`.
    pub(crate) fn new(invoker: &Invoker, id: String, started_at_us: i64, deployed: &Deployed) -> Meter {
        let metering = invoker.metering.clone();
        let unwritten = metering.usage.as_ref().inspect(|log| log.announce()).is_some();
        let series = deployed
            .series
            .get_or_init(|| {
                metering
                    .telemetry
                    .series(&deployed.version.tenant, &deployed.version.name)
            })
            .clone();
        Meter {
            metering,
            series,
            open: true,
            unwritten,
            usage: Usage {
                id,
                invocation_id: None,
                attempt: 1,
                tenant: deployed.version.tenant.clone(),
                function: deployed.version.name.clone(),
                version: deployed.version.version,
                alias: String::new(),
                shadow: false,
                started_at_us,
                ended_at_us: started_at_us,
                status: 0,
                outcome: Outcome::Ok,
                cold_start: false,
                queue_us: 0,
                memory_peak_bytes: 0,
                guest_cpu_us: 0,
                device: "cpu".into(),
                compute_ns: 0,
                gpu_ns: 0,
                inference_calls: 0,
                inference_cache_hits: 0,
                batched_calls: 0,
                bytes_in: 0,
                bytes_out: 0,
            },
            body: None,
            report: None,
            head_only: false,
        }
    }

    /// The alias the request came through (`None`: it named the version).
    pub fn through(&mut self, alias: Option<&str>) {
        alias.unwrap_or_default().clone_into(&mut self.usage.alias);
    }

    /// The invocation is a shadow copy: its answer goes nowhere.
    pub fn shadow(&mut self) {
        self.usage.shadow = true;
    }

    /// The request is a `HEAD`: the answer's head is all the client gets, so
    /// the record commits before it.
    pub(crate) fn head_only(&mut self) {
        self.head_only = true;
    }

    /// The guest runs: its report arrives on `report` when it is done.
    pub(crate) fn expect_report(&mut self, report: oneshot::Receiver<GuestReport>) {
        self.report = Some(report);
    }

    /// Makes the record that of attempt `attempt` (from 1) of asynchronous
    /// invocation `invocation_id`.
    pub(crate) fn attempt_of(&mut self, invocation_id: &str, attempt: u32) {
        self.usage.invocation_id = Some(invocation_id.to_owned());
        self.usage.attempt = attempt.max(1);
    }

    /// Drops the record unwritten: the usage log is down, so the request is
    /// refused and nothing ran.
    pub(crate) fn discard(mut self) {
        self.open = false;
        self.settle();
    }

    /// The record will not be written (again): the log stops counting it.
    fn settle(&mut self) {
        if std::mem::replace(&mut self.unwritten, false)
            && let Some(log) = &self.metering.usage
        {
            log.settle();
        }
    }

    /// Counts the request body through `meter` (bytes read, over the limit).
    pub(crate) fn count_body(&mut self, meter: Arc<BodyMeter>) {
        self.body = Some(meter);
    }

    /// Sets the request body size when it was read whole before the call.
    pub fn set_bytes_in(&mut self, bytes: u64) {
        self.usage.bytes_in = bytes;
    }

    /// Whether the request body went over its limit.
    pub(crate) fn body_exceeded(&self) -> bool {
        self.body.as_ref().is_some_and(|b| b.exceeded.load(Ordering::Relaxed))
    }

    /// Whether the request body broke off (stalled or cut).
    pub(crate) fn body_broken(&self) -> bool {
        self.body.as_ref().is_some_and(|b| b.broken.load(Ordering::Relaxed))
    }

    /// Records the admission: queue time and whether it was a cold start.
    pub(crate) fn admitted(&mut self, queued: std::time::Duration, cold: bool) {
        self.usage.queue_us = u64::try_from(queued.as_micros()).unwrap_or(u64::MAX);
        self.usage.cold_start = cold;
    }

    fn apply(&mut self, report: &Report) {
        let u = &mut self.usage;
        u.guest_cpu_us = u64::try_from(report.cpu_time.as_micros()).unwrap_or(u64::MAX);
        u.memory_peak_bytes = report.memory_peak_bytes;
        u.inference_calls = report.inference.calls;
        u.batched_calls = report.inference.batched_with;
        u.inference_cache_hits = report.inference.cache_hits;
        u.compute_ns = u64::try_from(report.inference.compute.as_nanos()).unwrap_or(u64::MAX);
        u.gpu_ns = u64::try_from(report.inference.gpu.as_nanos()).unwrap_or(u64::MAX);
        // Without inference the record keeps its `cpu` (no string built on
        // every answer).
        if !report.inference.devices.is_empty() {
            u.device = report.inference.device_label();
        }
        for calls in &report.inference.models {
            self.metering.telemetry.model_calls(
                &u.tenant,
                &u.function,
                u.version,
                &calls.model,
                &hearth_telemetry::ModelCallMetrics {
                    success: calls.success,
                    failure: calls.failure,
                    inferences: calls.inferences,
                    executions: calls.executions,
                    request: calls.request,
                    queued: calls.queued,
                    compute: calls.compute,
                },
            );
        }
    }

    /// Waits for the guest's report (if it ran) and applies it; `failed`
    /// marks a body the guest cut short.
    async fn take_report(&mut self, failed: bool) {
        let report = match self.report.take() {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        match report {
            Some((outcome, report)) => {
                self.apply(&report);
                if let Err(err) = outcome {
                    self.usage.outcome = Failure::Guest(err).outcome();
                } else if failed {
                    self.usage.outcome = Outcome::GuestError;
                }
            }
            None if failed => self.usage.outcome = Outcome::GuestError,
            None => {}
        }
    }

    /// Commits the record; the caller sends its response only after this.
    /// A caller that goes away mid-way does not lose the record.
    async fn commit(mut self) -> Result<(), LogError> {
        self.usage.ended_at_us = now_us().max(self.usage.started_at_us);
        if let Some(body) = &self.body {
            self.usage.bytes_in = body.read.load(Ordering::Relaxed);
        }
        if std::mem::replace(&mut self.open, false) {
            self.account();
        }
        let Some(log) = self.metering.usage.as_ref().filter(|_| self.unwritten) else {
            return Ok(());
        };
        // Priced where it lies and written here, by this task: from now on
        // the record survives a crash of the process, even if this caller
        // goes away.
        let appended = log.append(self.metering.prices.priced(&self.usage));
        self.unwritten = false;
        log.settle();
        let result = match appended {
            // Boxed: only strict answers wait, and the wait's timer would
            // otherwise enlarge every commit's future.
            Ok(seq) if log.config().durability == Durability::Strict => Box::pin(log.durable(seq)).await,
            Ok(_) => Ok(()),
            Err(err) => Err(err),
        };
        if let Err(err) = &result {
            tracing::error!(invocation_id = %self.usage.id, error = %err, "usage record not committed");
        }
        result
    }

    /// Ends an invocation that produced no response with `failure`
    /// (refused, failed, timed out, or a request that cannot run), with the
    /// guest's report if it ran. Returns the failure to answer with:
    /// `failure`, or [`Failure::Unrecorded`] if its record could not be
    /// committed (the client must not see an unrecorded invocation complete).
    ///
    /// The future is boxed: a refusal is rare, and its commit inline would
    /// make the future of every invocation that might refuse (all of them)
    /// as large as its own, which every request then allocates and moves.
    pub fn refuse(self, failure: Failure) -> Pin<Box<dyn Future<Output = Failure> + Send>> {
        Box::pin(self.refused(failure))
    }

    async fn refused(mut self, failure: Failure) -> Failure {
        self.usage.status = failure.status();
        self.usage.outcome = failure.outcome();
        self.take_report(false).await;
        // The guest's own account of a failure is the more precise one, but a
        // refusal or a bad request stays what it was.
        if matches!(failure.outcome(), Outcome::Rejected | Outcome::BadRequest) {
            self.usage.outcome = failure.outcome();
        }
        match self.commit().await {
            Ok(()) => failure,
            Err(log) => Failure::Unrecorded(log),
        }
    }

    /// Answers from the response cache: the record (`cache_hit`, nothing
    /// ran) commits, then the stored answer goes out whole.
    pub(crate) async fn cache_hit(mut self, entry: &crate::cache::Entry) -> Result<Response<ResponseBody>, Failure> {
        self.usage.outcome = Outcome::CacheHit;
        self.usage.status = 200;
        self.usage.bytes_out = entry.body.len() as u64;
        let (mut head, ()) = Response::new(()).into_parts();
        head.headers = entry.headers.clone();
        head.headers
            .insert(crate::cache::CACHE_HEADER, http::HeaderValue::from_static("hit"));
        let body = Full::new(entry.body.clone())
            .map_err(|never| match never {})
            .boxed_unsync();
        self.answer_after_commit(head, body).await
    }

    /// The response to send for the guest's `head` and `body`: after the
    /// commit when it has no body the client would read; whole after the
    /// commit when the log is strict and busy and the body is small and ends
    /// within [`COALESCE_WAIT`]; otherwise streamed (see [`Meter::streamed`]).
    /// A guest whose body fails before anything was sent gets a problem
    /// answer instead of a cut response.
    pub(crate) async fn respond<B>(
        self,
        head: http::response::Parts,
        body: B,
    ) -> Result<Response<ResponseBody>, Failure>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        // The waiting answers are boxed, so the common one (streamed, which
        // does not wait) keeps every invocation's future small.
        if self.unwritten && self.bodyless(&head) {
            return Box::pin(self.respond_bodyless(head, body)).await;
        }
        // Gathering a small body to send it whole after the commit saves a
        // write when the commit waits for an fsync shared with others
        // (strict, busy); in process mode the commit costs nothing to wait
        // for, and streaming is cheaper.
        if !(self.strict() && self.metering.usage.as_ref().is_some_and(UsageLog::busy)) {
            return Ok(self.streamed(head, body));
        }
        Box::pin(self.respond_whole(head, body)).await
    }

    /// Gathers a small body that ends within [`COALESCE_WAIT`] and answers
    /// it whole after the commit; streams the rest.
    async fn respond_whole<B>(self, head: http::response::Parts, mut body: B) -> Result<Response<ResponseBody>, Failure>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let deadline = tokio::time::Instant::now() + COALESCE_WAIT;
        let mut frames = Vec::new();
        let mut size = 0;
        let complete = loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(None) => break true,
                Ok(Some(Ok(frame))) => {
                    let trailers = frame.is_trailers();
                    size += frame.data_ref().map_or(0, Bytes::len);
                    frames.push(frame);
                    if trailers || size > COALESCE_BYTES {
                        break false;
                    }
                }
                Ok(Some(Err(err))) => {
                    return Err(self.refuse(body_failed(err)).await);
                }
                Err(_) => break false,
            }
        };
        if !complete {
            let rest = Prefixed {
                frames: frames.into(),
                rest: body,
            };
            return Ok(self.streamed(head, rest));
        }
        let mut meter = self;
        meter.usage.status = head.status.as_u16();
        meter.usage.bytes_out = size as u64;
        let mut whole = bytes::BytesMut::with_capacity(size);
        for frame in frames {
            if let Ok(data) = frame.into_data() {
                whole.extend_from_slice(&data);
            }
        }
        let whole = Full::new(whole.freeze()).map_err(|never| match never {}).boxed_unsync();
        meter.answer_after_commit(head, whole).await
    }

    /// Counts a failed direct call of `model` in the model metrics.
    pub(crate) fn model_failed(&self, model: &str) {
        let failed = hearth_telemetry::ModelCallMetrics {
            failure: 1,
            ..Default::default()
        };
        let u = &self.usage;
        self.metering
            .telemetry
            .model_calls(&u.tenant, &u.function, u.version, model, &failed);
    }

    /// Answers a direct model call (the Open Inference Protocol): records
    /// its inference `usage` and the answer's size, commits, then answers
    /// `head` with `body`.
    pub(crate) async fn inferred(
        mut self,
        usage: &hearth_bridge::InferenceUsage,
        head: http::response::Parts,
        body: Bytes,
    ) -> Result<Response<ResponseBody>, Failure> {
        self.usage.status = head.status.as_u16();
        self.usage.bytes_out = body.len() as u64;
        self.apply(&Report {
            cpu_time: std::time::Duration::ZERO,
            memory_peak_bytes: 0,
            inference: usage.clone(),
        });
        let body = Full::new(body).map_err(|never| match never {}).boxed_unsync();
        self.answer_after_commit(head, body).await
    }

    /// Commits the record, then answers `head` with `body` (already whole).
    async fn answer_after_commit(
        self,
        head: http::response::Parts,
        body: ResponseBody,
    ) -> Result<Response<ResponseBody>, Failure> {
        match finish_body(self, false).await {
            Ok(()) => Ok(Response::from_parts(head, body)),
            Err(log) => Err(Failure::Unrecorded(log)),
        }
    }

    /// Whether the record's log makes answers wait for its fsync.
    fn strict(&self) -> bool {
        self.unwritten
            && self
                .metering
                .usage
                .as_ref()
                .is_some_and(|log| log.config().durability == Durability::Strict)
    }

    /// Whether the client sees the answer complete with its head alone: a
    /// `HEAD` request, a 204 or 304, or a declared length of zero. Its record
    /// must commit before the head, as the body is never read.
    fn bodyless(&self, head: &http::response::Parts) -> bool {
        self.head_only || matches!(head.status.as_u16(), 204 | 304) || declared_length(&head.headers) == Some(0)
    }

    /// Answers a body-less response: waits for the guest's (empty) body to
    /// end and its report, commits the record, then sends the head.
    async fn respond_bodyless<B>(
        mut self,
        head: http::response::Parts,
        mut body: B,
    ) -> Result<Response<ResponseBody>, Failure>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        // Anything the guest writes is dropped, as hyper would drop it.
        while let Some(frame) = body.frame().await {
            if let Err(err) = frame {
                return Err(self.refuse(body_failed(err)).await);
            }
        }
        self.usage.status = head.status.as_u16();
        let empty = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        self.answer_after_commit(head, empty).await
    }

    /// The response with its body streamed through a [`MeteredBody`]: the
    /// record commits when the body ends, or when it reaches its declared
    /// length (with the guest's report, once it is done), before its last
    /// frame is sent.
    fn streamed<B>(mut self, head: http::response::Parts, inner: B) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        self.usage.status = head.status.as_u16();
        let declared = declared_length(&head.headers);
        let body = MeteredBody {
            inner,
            declared,
            held: None,
            state: BodyState::Streaming,
            meter: Some(self),
        }
        .boxed_unsync();
        Response::from_parts(head, body)
    }
}

impl Meter {
    /// Metrics and the request log line of the finished invocation.
    fn account(&self) {
        let u = &self.usage;
        let wall = std::time::Duration::from_micros(u.wall_us());
        let batch_size = if u.inference_calls == 0 {
            0.0
        } else {
            u.batched_calls as f64 / u.inference_calls as f64
        };
        let metrics = hearth_telemetry::InvocationMetrics {
            tenant: &u.tenant,
            function: &u.function,
            outcome: u.outcome.as_str(),
            status: u.status,
            wall,
            queue: std::time::Duration::from_micros(u.queue_us),
            cold_start: u.cold_start,
            batch_size,
            compute: std::time::Duration::from_nanos(u.compute_ns),
            gpu: std::time::Duration::from_nanos(u.gpu_ns),
            version: u.version,
            alias: &u.alias,
            shadow: u.shadow,
        };
        self.metering.telemetry.invocation(&self.series, &metrics);
        hearth_telemetry::log_request(&hearth_telemetry::RequestLine {
            invocation_id: &u.id,
            metrics,
            bytes_in: u.bytes_in,
            bytes_out: u.bytes_out,
        });
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // Never committed: the caller went away (client disconnect) before
        // the invocation ended. The guest may still be running; record it
        // once it is done.
        if !self.open {
            self.settle();
            return;
        }
        let mut orphan = Meter {
            metering: self.metering.clone(),
            series: self.series.clone(),
            open: std::mem::replace(&mut self.open, false),
            unwritten: std::mem::replace(&mut self.unwritten, false),
            usage: self.usage.clone(),
            body: self.body.take(),
            report: self.report.take(),
            head_only: self.head_only,
        };
        if orphan.usage.status == 0 {
            orphan.usage.status = CLIENT_CLOSED_REQUEST;
        }
        // Wrapped before it is spawned: the task may be dropped unpolled.
        let mut orphan = Orphan(Some(orphan));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Some(meter) = orphan.0.as_mut() {
                    meter.take_report(false).await;
                }
                if let Some(meter) = orphan.0.take() {
                    let _ = meter.commit().await;
                }
            });
        }
    }
}

/// An orphaned record on its way to the log. Dropped before it got there
/// (the runtime is shutting down), it is lost, and says so, rather than
/// orphaning itself again: a task spawned on a runtime that is shutting down
/// is dropped at once, so that would recurse.
struct Orphan(Option<Meter>);

impl Drop for Orphan {
    fn drop(&mut self) {
        if let Some(mut meter) = self.0.take() {
            meter.open = false;
            tracing::error!(
                invocation_id = %meter.usage.id,
                "usage record lost: the runtime stopped before the invocation ended"
            );
        }
    }
}

/// The status recorded for a request whose client went away before the
/// answer (nginx's convention; never sent).
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Largest response sent whole under load (see [`Meter::respond`]).
const COALESCE_BYTES: usize = 64 * 1024;
/// Longest a response's head waits for its body to end, under load.
const COALESCE_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// Frames already taken from a body, then the rest of it.
struct Prefixed<B> {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    rest: B,
}

impl<B> http_body::Body for Prefixed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

type Commit = Pin<Box<dyn Future<Output = Result<(), LogError>> + Send>>;

enum BodyState {
    Streaming,
    Committing(Commit),
    Done,
}

/// The failure of a guest whose response body broke before the answer was
/// sent.
fn body_failed(err: impl Into<BoxError>) -> Failure {
    Failure::Guest(InvokeError::GuestError(err.into().to_string()))
}

/// The `Content-Length` a response declares.
fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A response body whose last frame waits for the usage record.
struct MeteredBody<B> {
    inner: B,
    /// Its declared length: the frame that reaches it is the last the
    /// client needs, whether or not the guest's stream has ended yet.
    declared: Option<u64>,
    held: Option<Frame<Bytes>>,
    state: BodyState,
    meter: Option<Meter>,
}

/// Finishes the record once the guest's report is in.
async fn finish_body(mut meter: Meter, failed: bool) -> Result<(), LogError> {
    meter.take_report(failed).await;
    meter.commit().await
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                BodyState::Streaming => match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        let mut complete = false;
                        if let (Some(data), Some(meter)) = (frame.data_ref(), this.meter.as_mut()) {
                            meter.usage.bytes_out += data.len() as u64;
                            complete = this.declared.is_some_and(|n| meter.usage.bytes_out >= n);
                        }
                        let previous = this.held.replace(frame);
                        if complete && this.start_commit() {
                            // Flush what came before the last frame first.
                            if let Some(previous) = previous {
                                return Poll::Ready(Some(Ok(previous)));
                            }
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        if let Some(previous) = previous {
                            return Poll::Ready(Some(Ok(previous)));
                        }
                    }
                    Poll::Ready(None) => {
                        if this.start_commit() {
                            // The last frame waits for an fsync: let the
                            // connection flush what it has (the head) before
                            // the syncer thread is woken, whose wake-up can
                            // take this core.
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    }
                    Poll::Ready(Some(Err(err))) => {
                        // The guest failed mid-body: record it, then cut the
                        // response (the client never sees it complete).
                        if let Some(meter) = this.meter.take() {
                            tokio::spawn(finish_body(meter, true));
                        }
                        this.state = BodyState::Done;
                        this.held = None;
                        return Poll::Ready(Some(Err(err.into())));
                    }
                },
                BodyState::Committing(commit) => match commit.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {
                        this.state = BodyState::Done;
                        if let Some(last) = this.held.take() {
                            return Poll::Ready(Some(Ok(last)));
                        }
                    }
                    Poll::Ready(Err(err)) => {
                        this.state = BodyState::Done;
                        this.held = None;
                        return Poll::Ready(Some(Err(Box::new(err))));
                    }
                },
                BodyState::Done => return Poll::Ready(this.held.take().map(Ok)),
            }
        }
    }
}

impl<B> MeteredBody<B> {
    /// Starts committing the record (the body has ended, or reached its
    /// declared length); returns whether to yield first (strict durability,
    /// see the caller).
    fn start_commit(&mut self) -> bool {
        let Some(meter) = self.meter.take() else {
            self.state = BodyState::Done;
            return false;
        };
        let strict = meter.strict();
        self.state = BodyState::Committing(Box::pin(finish_body(meter, false)));
        strict
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        // The client went away while the record was committing: finish the
        // commit anyway. (Before that, the meter's own drop records it.)
        if let BodyState::Committing(commit) = std::mem::replace(&mut self.state, BodyState::Done)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(commit);
        }
    }
}

#[cfg(test)]
mod arrival_tests {
    use super::arrival;

    #[test]
    fn an_arrival_id_is_unique_and_carries_its_millisecond() {
        let made: Vec<(uuid::Uuid, i64)> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..10_000).map(|_| arrival()).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|thread| thread.join().expect("thread"))
                .collect()
        });
        let ids: std::collections::HashSet<_> = made.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), made.len(), "ids made at once on four threads collide");
        for (id, arrived_at_us) in made {
            assert_eq!(id.get_version_num(), 7);
            let (secs, nanos) = id.get_timestamp().expect("a v7 id has a time").to_unix();
            let id_ms = i64::try_from(secs).expect("secs") * 1000 + i64::from(nanos / 1_000_000);
            assert_eq!(id_ms, arrived_at_us / 1000, "the id's millisecond is the arrival's");
        }
    }
}
