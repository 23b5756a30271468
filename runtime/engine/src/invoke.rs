//! Running one request on a warm instance or a fresh one.
//!
//! The guest runs in its own tokio task so that its response head can be sent
//! while it is still streaming the body. Two guards bound it:
//! - the epoch deadline: every [`EPOCH_TICK`](crate::EPOCH_TICK) a running
//!   guest yields to the scheduler (so a spinning guest cannot hog a worker
//!   thread), and past the deadline it traps;
//! - a tokio timeout around the whole call, for guests parked in a host call
//!   (reading a body that never comes) where no epoch check runs.

use hearth_devices::DeviceId;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use tracing::Instrument as _;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};

use crate::state::HostState;
use crate::{Engine, Prepared, error_chain};

/// The body of a guest's response, streamed as the guest writes it.
pub type ResponseBody = wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// What a function's instances are given besides WASI's basics: the models
/// it may load and the directory of its read-only assets.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Models by the name the guest loads them with.
    pub models: hearth_bridge::NnGrant,
    /// Host directory mounted read-only at the guest's `/`, if the function
    /// has `[[files]]`.
    pub assets: Option<std::sync::Arc<std::path::Path>>,
    /// Origins the guest may send HTTP requests to (none by default).
    pub outbound: std::sync::Arc<[hearth_manifest::Origin]>,
}

/// What one invocation may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Linear memory cap, in bytes.
    pub memory_bytes: usize,
    /// Wall-clock deadline from the start of instantiation.
    pub timeout: Duration,
    /// How urgent the call is ([`hearth_manifest::Qos::urgency`] of its
    /// class): when its model calls join batches, more urgent rows go first.
    pub urgency: u8,
}

/// Why an invocation produced no response. Each maps to one HTTP status and
/// one usage outcome in the HTTP layer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InvokeError {
    /// The guest trapped (unreachable, out-of-bounds access, stack overflow…).
    #[error("guest trapped: {reason}")]
    Trap {
        /// Wasmtime's description of the trap.
        reason: String,
    },
    /// The deadline passed before the guest answered.
    #[error("deadline of {} ms exceeded", .0.as_millis())]
    Timeout(Duration),
    /// The guest tried to grow its memory past the function's limit.
    #[error("memory limit of {limit_mb} MiB exceeded")]
    MemoryLimit {
        /// The function's limit.
        limit_mb: usize,
    },
    /// The guest returned without sending a response.
    #[error("guest returned without sending a response")]
    NoResponse,
    /// The guest answered with a `wasi:http` error instead of a response.
    #[error("guest failed the request: {0}")]
    GuestError(String),
    /// Every instance slot is in use.
    #[error("no free instance slot")]
    Capacity,
    /// A new instance would take the server past its memory budget.
    #[error("the server's memory budget ({budget_mb} MiB for instances and models) is taken; retry shortly")]
    MemoryBudget {
        /// The budget, in MiB.
        budget_mb: u64,
    },
    /// A host-side failure unrelated to the guest.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A live instance of a function: its store and its `wasi:http` export,
/// ready to serve another request (see [`Engine::invoke`]).
pub struct Instance {
    store: Store<HostState>,
    proxy: Proxy,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").finish_non_exhaustive()
    }
}

/// What an invocation runs on.
#[derive(Debug)]
pub enum Start<'a> {
    /// A warm instance that served earlier requests.
    Warm(Instance),
    /// A fresh instance of this component (a cold start).
    Cold(&'a Prepared),
}

/// What became of an invocation once its guest has finished: the instance,
/// if it may serve another request, how the call ended, and what it used.
#[derive(Debug)]
pub struct Finished {
    /// The instance, unless it trapped, hit a limit or was interrupted.
    pub instance: Option<Instance>,
    /// How the guest's call ended.
    pub outcome: Result<(), InvokeError>,
    /// What it used, for its usage record.
    pub report: Report,
}

/// What one invocation used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// CPU time of the guest's task: guest code and the host calls it made
    /// on its thread. Model compute is not in it (it is billed as
    /// `inference.compute`, wherever it ran).
    pub cpu_time: Duration,
    /// Largest linear memory the instance has had, in bytes.
    pub memory_peak_bytes: u64,
    /// Its `wasi:nn` calls: how many, batched with how many, model compute.
    pub inference: hearth_bridge::InferenceUsage,
}

impl Engine {
    /// Creates an instance of `prepared` ahead of any request (to keep a
    /// function's `min_instances` warm).
    pub async fn instantiate(
        &self,
        prepared: &Prepared,
        limits: Limits,
        grants: &Grants,
    ) -> Result<Instance, InvokeError> {
        let mut store = self.new_store(limits, grants)?;
        store.data_mut().deadline = Instant::now() + limits.timeout;
        store.set_epoch_deadline(1);
        let proxy = tokio::time::timeout(limits.timeout, prepared.pre.instantiate_async(&mut store))
            .await
            .map_err(|_| InvokeError::Timeout(limits.timeout))?
            .map_err(|err| classify(&err, store.data(), limits.timeout))?;
        Ok(Instance { store, proxy })
    }

    fn new_store(&self, limits: Limits, grants: &Grants) -> Result<Store<HostState>, InvokeError> {
        let reservation = match &self.inner.budget {
            None => None,
            Some(budget) => {
                let cache = self.inner.config.nn.cache();
                let reserve = || budget.reserve(limits.memory_bytes as u64, cache.loaded_bytes(DeviceId::Cpu));
                // Models in the cold tier give way to instances.
                let reserved = reserve().or_else(|| (cache.drop_cold() > 0).then(reserve).flatten());
                Some(reserved.ok_or(InvokeError::MemoryBudget {
                    budget_mb: budget.limit() >> 20,
                })?)
            }
        };
        let memory = hearth_bridge::InstanceMemory::new(limits.memory_bytes);
        let nn = self.inner.config.nn.instance(&grants.models, memory.clone());
        let state = HostState::new(
            memory,
            reservation,
            nn,
            grants.assets.as_deref(),
            grants.outbound.clone(),
            self.inner.config.outbound.clone(),
        )
        .map_err(|e| InvokeError::Internal(format!("mounting the function's assets: {}", error_chain(&e))))?;
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(|store| {
            Ok(if Instant::now() >= store.data().deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        Ok(store)
    }

    /// Runs `request` on a warm instance or a fresh one (see [`Start`]) and
    /// returns its response as soon as the guest sends the head. Until then
    /// the guest runs in the caller's task; after, it keeps running in a task
    /// of its own while the body streams; when it is done, `done` receives
    /// the instance back (if it is fit for reuse) and the call's outcome.
    /// `label` names the function in logs (the guest's captured
    /// stdout/stderr go there).
    pub async fn invoke<B>(
        &self,
        start: Start<'_>,
        limits: Limits,
        grants: &Grants,
        label: std::sync::Arc<str>,
        request: hyper::Request<B>,
        done: impl FnOnce(Finished) + Send + 'static,
    ) -> Result<hyper::Response<ResponseBody>, InvokeError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        /// `Start` without the borrow, to move into the guest's task.
        enum Ready {
            Warm(Proxy),
            Cold(ProxyPre<HostState>),
        }
        let (mut store, ready) = match start {
            Start::Warm(Instance { store, proxy }) => (store, Ready::Warm(proxy)),
            Start::Cold(prepared) => (self.new_store(limits, grants)?, Ready::Cold(prepared.pre.clone())),
        };
        let state = store.data_mut();
        state.deadline = Instant::now() + limits.timeout;
        state.nn.set_urgency(limits.urgency);
        store.set_epoch_deadline(1);

        let (sender, mut receiver) = tokio::sync::oneshot::channel();
        let http = store.data_mut();
        let request = http
            .http()
            .new_incoming_request(Scheme::Http, request.map(|body| body.map_err(Into::into)))
            .map_err(|e| InvokeError::Internal(error_chain(&e)))?;
        let outparam = http
            .http()
            .new_response_outparam(sender)
            .map_err(|e| InvokeError::Internal(error_chain(&e)))?;

        let timeout = limits.timeout;
        let (outcome_tx, outcome_rx) = tokio::sync::oneshot::channel();
        let cold = matches!(ready, Ready::Cold(_));
        let span = tracing::info_span!("guest", function = %label, cold);
        let guest = async move {
            let run = async {
                let proxy = match ready {
                    Ready::Warm(proxy) => proxy,
                    Ready::Cold(pre) => {
                        pre.instantiate_async(&mut store)
                            .instrument(tracing::info_span!("instantiate"))
                            .await?
                    }
                };
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, outparam)
                    .await?;
                wasmtime::Result::Ok(proxy)
            };
            let (timed, cpu_time) = {
                let mut run = CpuTimed::new(run);
                let timed = tokio::time::timeout(timeout, &mut run).await;
                (timed, run.total)
            };
            let (outcome, proxy) = match timed {
                // Interrupted mid-call: the store's state is not to be trusted.
                Err(_elapsed) => (Err(InvokeError::Timeout(timeout)), None),
                Ok(Ok(proxy)) => (Ok(()), Some(proxy)),
                Ok(Err(err)) => (Err(classify(&err, store.data(), timeout)), None),
            };
            if let Err(err) = &outcome {
                tracing::debug!(function = %label, error = %err, "invocation failed");
            }
            log_guest_output(&label, store.data());
            let _ = outcome_tx.send(outcome.clone());
            let state = store.data_mut();
            let inference = state.nn.take_usage();
            let report = Report {
                cpu_time: cpu_time.saturating_sub(inference.on_caller),
                memory_peak_bytes: state.limiter.peak as u64,
                inference,
            };
            done(Finished {
                instance: proxy.map(|proxy| Instance { store, proxy }),
                outcome,
                report,
            });
        }
        .instrument(span);

        // The guest runs here, in the caller's task, until it has sent its
        // response head or finished: a small response then costs no task
        // spawn and no wake-up across tasks. What it still has to do (a body
        // still streaming) goes on in a task of its own.
        let mut guest = Detachable(Some(Box::pin(guest)));
        let head = std::future::poll_fn(|cx| {
            if let Poll::Ready(head) = Pin::new(&mut receiver).poll(cx) {
                return Poll::Ready(Some(head));
            }
            guest.poll_here(cx).map(|()| None)
        })
        .await;
        drop(guest);
        let head = match head {
            Some(head) => head,
            None => receiver.await,
        };
        match head {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => Err(InvokeError::GuestError(format!("{code:?}"))),
            // The guest dropped the response outparam: the task's outcome says why.
            Err(_) => match outcome_rx.await {
                Ok(Ok(())) => Err(InvokeError::NoResponse),
                Ok(Err(err)) => Err(err),
                Err(_) => Err(InvokeError::Internal("guest task ended without an outcome".into())),
            },
        }
    }
}

/// A guest's run, polled in place by [`Engine::invoke`] until its response
/// head is out; dropped unfinished (the head is out, or the caller itself
/// was dropped because its client went away), it goes on in a task of its
/// own, so a guest always runs to its end and hands its instance back.
struct Detachable<F: Future<Output = ()> + Send + 'static>(Option<Pin<Box<F>>>);

impl<F: Future<Output = ()> + Send + 'static> Detachable<F> {
    fn poll_here(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let Some(run) = self.0.as_mut() else {
            return Poll::Ready(());
        };
        let poll = run.as_mut().poll(cx);
        if poll.is_ready() {
            self.0 = None;
        }
        poll
    }
}

impl<F: Future<Output = ()> + Send + 'static> Drop for Detachable<F> {
    fn drop(&mut self) {
        if let Some(run) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(run);
        }
    }
}

/// A future that adds up the time spent inside its polls: the guest's CPU
/// time. A poll never blocks (the guest's waits return `Pending`), so the
/// time inside it is time on a CPU, read from the monotonic clock (vDSO, tens
/// of ns). The thread CPU clock said the same but is a system call whose
/// run-queue locking cost about 4 % of an `echo` request's CPU here; what the
/// monotonic clock adds is only time the OS preempted the worker mid-poll.
struct CpuTimed<F> {
    inner: Pin<Box<F>>,
    total: Duration,
}

impl<F: Future> CpuTimed<F> {
    fn new(inner: F) -> Self {
        CpuTimed {
            inner: Box::pin(inner),
            total: Duration::ZERO,
        }
    }
}

impl<F: Future> Future for CpuTimed<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let start = Instant::now();
        let poll = self.inner.as_mut().poll(cx);
        self.total += start.elapsed();
        poll
    }
}

fn classify(err: &wasmtime::Error, state: &HostState, timeout: Duration) -> InvokeError {
    if state.limiter.exceeded {
        return InvokeError::MemoryLimit {
            limit_mb: state.limiter.limit_bytes() >> 20,
        };
    }
    if err.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
        return InvokeError::Capacity;
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => InvokeError::Timeout(timeout),
        Some(trap) => InvokeError::Trap {
            reason: trap.to_string(),
        },
        None => InvokeError::Trap {
            reason: error_chain(err),
        },
    }
}

/// Logs what the guest printed, one event per line.
fn log_guest_output(label: &str, state: &HostState) {
    for (stream, pipe) in [("stdout", &state.stdout), ("stderr", &state.stderr)] {
        let contents = pipe.take();
        if contents.is_empty() {
            continue;
        }
        for line in String::from_utf8_lossy(&contents).lines() {
            // Bounded and written off the caller's thread (see
            // hearth_telemetry's `GUEST_TARGET`).
            tracing::info!(target: "hearth::guest", function = %label, stream, "{line}");
        }
    }
}
