//! Asynchronous invocations: a submission is stored at once
//! ([`Invoker::submit`]); the runner ([`Invoker::spawn_async_runner`])
//! executes queued ones at the `batch` class when capacity allows and stores
//! each one's response. Requests and responses live in the store, so both
//! survive a restart; a run cut short by a stop runs again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hearth_manifest::Qos;
use hearth_scheduler::TenantRejection;
use hearth_store::{AsyncInvocation, AsyncState, NodeInfo, StoreError, StoredMessage};
use http_body_util::{BodyExt as _, Full};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::record::{Meter, arrival};
use crate::{BASE_PATH_HEADER, Failure, Invoker};

/// Default time after its last heartbeat when a node counts as gone and
/// its running asynchronous invocations are run again elsewhere.
pub const DEFAULT_ASYNC_LEASE: Duration = Duration::from_secs(10);
/// Default number of attempts after which an asynchronous invocation whose
/// node keeps stopping mid-run fails.
pub const DEFAULT_ASYNC_MAX_ATTEMPTS: u32 = 3;
/// Default time an asynchronous invocation is kept (see
/// [`crate::InvokerConfig::async_retention`]).
pub const DEFAULT_ASYNC_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Default number of asynchronous invocations running at once.
pub const DEFAULT_ASYNC_CONCURRENCY: usize = 16;
/// How long the runner waits after the scheduler refused a run before it
/// tries the queue again.
const REFUSED_BACKOFF: Duration = Duration::from_secs(1);
/// Largest response body stored for an asynchronous invocation; a larger
/// one fails the invocation (fetch big results synchronously).
const MAX_STORED_RESPONSE_BYTES: usize = 32 << 20;
/// How often the runner looks at the queue without being woken (a safety
/// net: submissions wake it at once).
const POLL_EVERY: Duration = Duration::from_secs(5);

/// Turns a failed run into the answer stored for it (the HTTP layer's
/// problem body for `failure`, tagged with the invocation id).
pub type RenderFailure = Arc<dyn Fn(Failure, Option<Uuid>) -> http::Response<Bytes> + Send + Sync>;

/// What the runner ends a run with: its final state and stored answer, or
/// `None` when the scheduler refused it for now.
type RunResult = Option<(AsyncState, Option<StoredMessage>)>;

impl Invoker {
    /// Admits a submission for `tenant` before its body is read: it passes
    /// the tenant's gate (rate and concurrency, as a call would), and the
    /// answer is how many body bytes the tenant may still queue under
    /// `max_async_queued_bytes` (`None`: no such limit). The caller reads at
    /// most that much, so a tenant at its limit is never buffered.
    pub async fn submission_room(&self, tenant: &str) -> Result<Option<u64>, Failure> {
        drop(self.tenants.admit(tenant)?);
        let Some(limit) = self.tenants.limits(tenant).max_async_queued_bytes else {
            return Ok(None);
        };
        let queued = self.store.async_queued_bytes(tenant).await.map_err(store_failure)?;
        match limit.checked_sub(queued) {
            Some(room) if room > 0 => Ok(Some(room)),
            _ => Err(queue_full(tenant, limit)),
        }
    }

    /// The refusal of a submission of `tenant` whose body would pass
    /// `max_async_queued_bytes`.
    pub fn async_queue_full(&self, tenant: &str) -> Failure {
        let limit = self.tenants.limits(tenant).max_async_queued_bytes.unwrap_or(0);
        queue_full(tenant, limit)
    }

    /// Stores a submitted invocation (admitted by
    /// [`Invoker::submission_room`]) and wakes the runner. The queued bytes
    /// are checked again, as other submissions may have landed meanwhile.
    pub async fn submit(&self, invocation: AsyncInvocation) -> Result<(), Failure> {
        let tenant = &invocation.tenant;
        if let Some(limit) = self.tenants.limits(tenant).max_async_queued_bytes {
            let queued = self.store.async_queued_bytes(tenant).await.map_err(store_failure)?;
            if queued.saturating_add(invocation.request.body.len() as u64) > limit {
                return Err(queue_full(tenant, limit));
            }
        }
        self.store.insert_async(invocation).await.map_err(store_failure)?;
        self.async_queue.notify_one();
        Ok(())
    }

    /// Runs queued asynchronous invocations as `node` (this server's lasting
    /// id), at most `concurrency` at once, at the `batch` class; a failed
    /// run's stored answer is `render`'s. Invocations this node left running
    /// when it stopped go back to the queue first; ones left running by a
    /// node that has not heartbeaten for the lease
    /// ([`crate::InvokerConfig::async_lease`]) are run again here. The node
    /// heartbeats every quarter of the lease meanwhile, and counts the live
    /// nodes that share each tenant's limits.
    pub fn spawn_async_runner(
        self: &Arc<Self>,
        node: NodeInfo,
        concurrency: usize,
        render: RenderFailure,
    ) -> tokio::task::JoinHandle<()> {
        let lease = self.config.async_lease;
        let invoker = self.clone();
        let beating = self.clone();
        let max_attempts = self.config.async_max_attempts.max(1);
        let retention = self.config.async_retention;
        let sweeping = self.clone();
        let sweeps = async move {
            // Finished results are deleted once past the retention.
            let mut every =
                tokio::time::interval((retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(600)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let before = hearth_store::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
                match sweeping.store.delete_finished_async(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(invocations = n, "deleted asynchronous results past their retention"),
                    Err(err) => tracing::warn!(error = %err, "cannot delete expired asynchronous results"),
                }
            }
        };
        let mut beat = node.clone();
        let beats = async move {
            let mut every = tokio::time::interval((lease / 4).max(Duration::from_millis(100)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate, and the runner has just beaten.
            every.tick().await;
            loop {
                every.tick().await;
                beat.details = beating.node_details();
                if let Err(err) = beating.store.heartbeat(&beat).await {
                    tracing::warn!(error = %err, "cannot record this node's heartbeat");
                    continue;
                }
                // Tenant limits are shared by the live nodes; an unreadable
                // list keeps the last count.
                if let Ok(live) = beating.store.live_nodes(lease).await {
                    beating.tenants.set_nodes(live.len() as u64);
                }
            }
        };
        let mut first = node.clone();
        first.details = self.node_details();
        let node = node.id;
        tokio::spawn(async move {
            // Heard from before it claims anything: another node must never
            // take this node's fresh runs for a dead node's.
            if let Err(err) = invoker.store.heartbeat(&first).await {
                tracing::warn!(error = %err, "cannot record this node's heartbeat");
            }
            tokio::spawn(beats);
            tokio::spawn(sweeps);
            match invoker.store.requeue_running_async(&node).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    invocations = n,
                    "re-queued asynchronous invocations cut short by a stop"
                ),
                Err(err) => tracing::error!(error = %err, "cannot re-queue asynchronous invocations"),
            }
            let slots = Arc::new(Semaphore::new(concurrency.max(1)));
            let refused = Arc::new(AtomicBool::new(false));
            loop {
                let free = slots.available_permits();
                let claimed = if free == 0 {
                    Vec::new()
                } else {
                    invoker
                        .store
                        .claim_async(&node, free, lease)
                        .await
                        .unwrap_or_else(|err| {
                            tracing::error!(error = %err, "cannot read the asynchronous invocation queue");
                            Vec::new()
                        })
                };
                for invocation in claimed {
                    let Ok(permit) = slots.clone().acquire_owned().await else {
                        return;
                    };
                    let (invoker, refused, render) = (invoker.clone(), refused.clone(), render.clone());
                    tokio::spawn(async move {
                        // `attempted`: whether this claim counts as an attempt.
                        let waited = Duration::from_millis(
                            u64::try_from(hearth_store::now_ms() - invocation.submitted_at_ms).unwrap_or(0),
                        );
                        let (final_state, response, attempted) = if invocation.attempts == 1 && waited > retention {
                            // Never started within the retention: its caller
                            // has long stopped waiting.
                            let id = Uuid::parse_str(&invocation.id).ok();
                            let answer = stored(render(Failure::Expired { waited }, id));
                            (AsyncState::Failed, Some(answer), false)
                        } else if invocation.attempts > max_attempts {
                            // Its node stopped mid-run every time: give up.
                            let id = Uuid::parse_str(&invocation.id).ok();
                            let why = hearth_engine::InvokeError::GuestError(format!(
                                "the invocation was started {max_attempts} times and the node running it stopped \
                                 each time before it finished"
                            ));
                            let answer = stored(render(Failure::Guest(why), id));
                            (AsyncState::Failed, Some(answer), false)
                        } else {
                            match invoker.run_async(&invocation, &render).await {
                                Some((state, response)) => (state, response, true),
                                None => {
                                    refused.store(true, Ordering::Relaxed);
                                    (AsyncState::Queued, None, false)
                                }
                            }
                        };
                        let finished = invoker
                            .store
                            .finish_async(&invocation.id, final_state, response, attempted)
                            .await;
                        if let Err(err) = finished {
                            tracing::error!(id = %invocation.id, error = %err, "cannot store an asynchronous result");
                        }
                        drop(permit);
                        invoker.async_queue.notify_one();
                    });
                }
                let _ = tokio::time::timeout(POLL_EVERY, invoker.async_queue.notified()).await;
                // The scheduler refused a run: the function (or the server) is
                // full, so give it a moment before claiming again.
                if refused.swap(false, Ordering::Relaxed) {
                    tokio::time::sleep(REFUSED_BACKOFF).await;
                }
            }
        })
    }

    /// What this node reports of itself at each heartbeat (`details` in
    /// `/v1/status`'s node list): its version, its devices and the models
    /// warm on them.
    fn node_details(&self) -> String {
        let cache = self.nn().cache();
        let gpus = cache
            .devices()
            .gpus()
            .iter()
            .map(|gpu| serde_json::json!({ "id": format!("cuda:{}", gpu.ordinal), "name": gpu.name }));
        let devices: Vec<_> = std::iter::once(serde_json::json!({ "id": "cpu" }))
            .chain(gpus)
            .collect();
        let warm: Vec<_> = cache
            .cached()
            .iter()
            .map(|m| serde_json::json!({ "digest": format!("sha256:{}", m.key), "device": m.device.to_string() }))
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "devices": devices,
            "warm_models": warm,
        })
        .to_string()
    }

    /// Runs one attempt of an invocation; `None` when it was refused for
    /// now (the refusal is recorded, at no cost, and the invocation stays
    /// queued for its next attempt), else its final state and stored
    /// response.
    async fn run_async(&self, invocation: &AsyncInvocation, render: &RenderFailure) -> RunResult {
        let id = Uuid::parse_str(&invocation.id).ok();
        let failed = |failure: Failure| Some((AsyncState::Failed, Some(stored(render(failure, id)))));
        let deployed = match self.registry.resolve(&invocation.tenant, &invocation.function).await {
            Ok(deployed) => deployed,
            Err(err) => return failed(err.into()),
        };
        let base = format!("/fn/{}/{}", invocation.tenant, invocation.function);
        let request = match rebuild(&invocation.request, &base) {
            Ok(request) => request,
            Err(err) => return failed(err),
        };
        let deadline = tokio::time::Instant::now() + self.config.queue_timeout;
        // Each attempt is billed under an id of its own, naming the
        // invocation and the attempt: a retry never collides with the
        // record of an earlier one.
        let (id, arrived_at_us) = arrival();
        let mut meter = Meter::new(self, id.to_string(), arrived_at_us, &deployed);
        meter.through(Some(hearth_store::LATEST));
        meter.attempt_of(&invocation.id, invocation.attempts);
        meter.set_bytes_in(invocation.request.body.len() as u64);
        match self.run(&deployed, Qos::Batch, deadline, meter, request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                match collect(body).await {
                    Ok(body) => Some((
                        AsyncState::Succeeded,
                        Some(stored(http::Response::from_parts(parts, body))),
                    )),
                    Err(err) => failed(Failure::Guest(hearth_engine::InvokeError::GuestError(err))),
                }
            }
            Err(failure) if failure.is_refusal() => None,
            Err(failure) => failed(failure),
        }
    }
}

/// The whole of a response body, up to [`MAX_STORED_RESPONSE_BYTES`].
async fn collect(mut body: crate::ResponseBody) -> Result<Bytes, String> {
    let mut whole = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() else {
            continue;
        };
        if whole.len() + data.len() > MAX_STORED_RESPONSE_BYTES {
            return Err(format!(
                "the response exceeds the {MAX_STORED_RESPONSE_BYTES} bytes stored for an asynchronous invocation"
            ));
        }
        whole.extend_from_slice(&data);
    }
    Ok(whole.freeze())
}

/// A response as the store keeps it.
fn stored(response: http::Response<Bytes>) -> StoredMessage {
    StoredMessage {
        method: String::new(),
        uri: String::new(),
        status: response.status().as_u16(),
        headers: response
            .headers()
            .iter()
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect(),
        body: response.into_body().to_vec(),
    }
}

/// The stored request as the guest receives it.
fn rebuild(stored: &StoredMessage, base: &str) -> Result<hyper::Request<Full<Bytes>>, Failure> {
    let mut request = hyper::Request::builder()
        .method(stored.method.as_str())
        .uri(format!("http://localhost{}", stored.uri))
        .header(BASE_PATH_HEADER, base);
    for (name, value) in &stored.headers {
        request = request.header(name, value);
    }
    request.body(Full::new(Bytes::from(stored.body.clone()))).map_err(|e| {
        Failure::Guest(hearth_engine::InvokeError::Internal(format!(
            "rebuilding a stored request: {e}"
        )))
    })
}

/// A store error while taking a submission: unavailable (503) or internal.
fn store_failure(err: StoreError) -> Failure {
    Failure::Function(hearth_registry::RegistryError::Store(err))
}

/// The refusal of a submission that would pass `max_async_queued_bytes`.
fn queue_full(tenant: &str, limit: u64) -> Failure {
    Failure::TenantLimit(TenantRejection::Holding {
        tenant: tenant.to_owned(),
        limit: "max_async_queued_bytes",
        value: limit,
    })
}
