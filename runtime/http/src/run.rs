//! From a resolved function to a running guest, for the synchronous route and
//! for async invocations alike: admission through the scheduler, a warm
//! instance or a fresh one from the compiled component, and the instance back
//! to its pool when the guest is done. Also the background work that scales
//! functions down to zero and keeps `min_instances` warm.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use hearth_engine::{Instance, Limits, Start};
use hearth_manifest::Qos;
use hearth_registry::{Deployed, LoadOn};
use hearth_scheduler::{FunctionSpec, Scheduler};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::meter::Meter;
use crate::{ApiError, AppState};

/// The instance pools of every function.
pub type Pools = Scheduler<Instance>;

/// The scheduler's key for a function.
pub(crate) fn pool_key(tenant: &str, function: &str) -> String {
    format!("{tenant}/{function}")
}

/// What the scheduler needs from a function's manifest.
pub(crate) fn spec(deployed: &Deployed) -> FunctionSpec {
    let scaling = &deployed.manifest.scaling;
    FunctionSpec {
        generation: deployed.version.version.into(),
        max_instances: scaling.max_instances,
        min_instances: scaling.min_instances,
        idle_timeout: Duration::from_secs(scaling.idle_timeout_s.into()),
        reuse: scaling.reuse,
    }
}

fn limits(deployed: &Deployed) -> Limits {
    Limits {
        memory_bytes: deployed.manifest.limits.memory_mb as usize * 1024 * 1024,
        timeout: Duration::from_millis(deployed.manifest.limits.timeout_ms.into()),
    }
}

fn label(deployed: &Deployed) -> String {
    let v = &deployed.version;
    format!("{}/{}@{}", v.tenant, v.name, v.version)
}

/// Runs `request` on `deployed` at `class`, waiting in the function's queue
/// until `deadline` at the latest. Returns once the guest sends the head of
/// its response; the body's end commits the usage record `meter` holds.
/// Every other ending commits the record before returning the error, except
/// a refusal when `record_refusals` is false (an asynchronous run that will
/// be retried under the same id).
pub(crate) async fn run_function<B>(
    state: &AppState,
    deployed: &Deployed,
    class: Qos,
    deadline: Instant,
    mut meter: Meter,
    record_refusals: bool,
    request: hyper::Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<hearth_engine::BodyError>,
{
    if let Some(log) = &state.usage
        && !log.healthy()
    {
        meter.discard();
        return Err(ApiError::Unavailable(
            "the usage log is recovering from a failed write; invocations resume once it has".into(),
        ));
    }
    let permit = match state.tenants.admit(&deployed.version.tenant) {
        Ok(permit) => permit,
        Err(rejection) if !record_refusals => {
            meter.discard();
            return Err(rejection.into());
        }
        Err(rejection) => return Err(meter.finish_error(rejection.into()).await),
    };
    let key = pool_key(&deployed.version.tenant, &deployed.version.name);
    let spec = spec(deployed);
    let queued = state
        .pools
        .acquire(&key, &spec, class, deadline)
        .instrument(tracing::info_span!("queue", class = class.as_str()));
    let mut lease = match queued.await {
        Ok(lease) => lease,
        Err(rejection) if !record_refusals => {
            meter.discard();
            return Err(rejection.into());
        }
        Err(rejection) => return Err(meter.finish_error(rejection.into()).await),
    };
    meter.admitted(lease.queued(), lease.is_cold());
    let prepared;
    let start = match lease.take_instance() {
        Some(instance) => Start::Warm(instance),
        // Scaled to zero: map the compiled code again. With nothing else
        // running, this worker has no one else to serve, so the mapping runs
        // here, saving two thread hand-offs on the cold start's first byte.
        None => match state.registry.prepared(deployed, load_on(state)).await {
            Ok(loaded) => {
                prepared = loaded;
                Start::Cold(&prepared)
            }
            Err(err) => return Err(meter.finish_error(err.into()).await),
        },
    };
    let (report_tx, report_rx) = oneshot::channel();
    meter.expect_report(report_rx);
    let invoked = state
        .engine
        .invoke(
            start,
            limits(deployed),
            &deployed.grants,
            &label(deployed),
            request,
            move |finished| {
                // The tenant's concurrency is held until the guest is done.
                drop(permit);
                lease.finish(finished.instance);
                let _ = report_tx.send((finished.outcome, finished.report));
            },
        )
        .await;
    match invoked {
        Ok(response) => {
            let (head, body) = response.into_parts();
            meter.respond(head, body).await
        }
        Err(_) if meter.body_exceeded() => {
            let limit = state.limits.max_body_bytes;
            Err(meter.finish_error(ApiError::PayloadTooLarge { limit }).await)
        }
        Err(_) if meter.body_broken() => Err(meter.finish_error(ApiError::RequestTimeout).await),
        Err(err) => Err(meter.finish_error(err.into()).await),
    }
}

/// Where a cold start maps its function's code: on the caller's worker when
/// the caller's is the only invocation running (its own lease is counted),
/// else on the blocking pool so other requests are not held up behind it.
fn load_on(state: &AppState) -> LoadOn {
    if state.pools.busy() <= 1 {
        LoadOn::Caller
    } else {
        LoadOn::BlockingPool
    }
}

/// Brings `deployed` up to its `min_instances` warm instances (and its models
/// into the cache, which the instances will ask for).
pub async fn keep_warm(state: &AppState, deployed: &Deployed) {
    let min = deployed.manifest.scaling.min_instances;
    if min == 0 {
        return;
    }
    state.registry.preload_models(deployed).await;
    let key = pool_key(&deployed.version.tenant, &deployed.version.name);
    let spec = spec(deployed);
    while let Some(lease) = state.pools.reserve_warm(&key, &spec) {
        let prepared = match state.registry.prepared(deployed, LoadOn::BlockingPool).await {
            Ok(prepared) => prepared,
            Err(err) => {
                tracing::warn!(function = %key, error = %err, "cannot keep instances warm");
                return;
            }
        };
        match state
            .engine
            .instantiate(&prepared, limits(deployed), &deployed.grants)
            .await
        {
            Ok(instance) => lease.park(instance),
            Err(err) => {
                tracing::warn!(function = %key, error = %err, "cannot keep instances warm");
                return;
            }
        }
    }
}

/// Every `every`: drops instances idle past their function's timeout,
/// unloads the compiled code of functions scaled fully to zero, and tops up
/// `min_instances` (after a trap or a restart). Runs until the state is gone.
pub fn spawn_reaper(state: &Arc<AppState>, every: Duration) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(state) = weak.upgrade() else { return };
            let reaped = state.pools.reap(Instant::now());
            if !reaped.instances.is_empty() {
                tracing::debug!(instances = reaped.instances.len(), "scaled down idle instances");
            }
            drop(reaped.instances);
            for key in reaped.unloaded {
                let Some((tenant, function)) = key.split_once('/') else {
                    continue;
                };
                if let Ok(deployed) = state.registry.resolve(tenant, function).await
                    && state.engine.unload(deployed.version.component.as_str())
                {
                    tracing::debug!(function = %key, "scaled to zero: compiled code unloaded");
                }
            }
            for key in state.pools.below_min() {
                let Some((tenant, function)) = key.split_once('/') else {
                    continue;
                };
                if let Ok(deployed) = state.registry.resolve(tenant, function).await {
                    keep_warm(&state, &deployed).await;
                }
            }
        }
    })
}
