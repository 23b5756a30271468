//! From a resolved function to a running guest, for the synchronous route and
//! for asynchronous invocations alike: admission through the scheduler, a
//! warm instance or a fresh one from the compiled component, and the instance
//! back to its pool when the guest is done. Also the background work that
//! scales functions down to zero and keeps `min_instances` warm.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hearth_engine::{Limits, Start};
use hearth_manifest::Qos;
use hearth_registry::{Deployed, LoadOn};
use hearth_scheduler::{FunctionKey, FunctionSpec, TenantPermit};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::record::Meter;
use crate::{Failure, Invoker, ResponseBody};

/// The scheduler's key for the version `deployed` is.
pub(crate) fn key(deployed: &Deployed) -> FunctionKey {
    FunctionKey {
        tenant: deployed.names.tenant.clone(),
        function: deployed.names.function.clone(),
        version: deployed.version.version,
    }
}

/// What the scheduler needs from a function's manifest.
pub(crate) fn spec(deployed: &Deployed) -> FunctionSpec {
    let scaling = &deployed.manifest.scaling;
    FunctionSpec {
        code: deployed.names.component.clone(),
        max_instances: scaling.max_instances,
        min_instances: scaling.min_instances,
        idle_timeout: Duration::from_secs(scaling.idle_timeout_s.into()),
        reuse: scaling.reuse,
    }
}

fn limits(deployed: &Deployed, class: Qos) -> Limits {
    Limits {
        memory_bytes: deployed.manifest.limits.memory_mb as usize * 1024 * 1024,
        timeout: Duration::from_millis(deployed.manifest.limits.timeout_ms.into()),
        urgency: class.urgency(),
    }
}

impl Invoker {
    /// Runs `request` on `deployed` at `class`, waiting in the function's
    /// queue until `deadline` at the latest. Returns once the guest sends the
    /// head of its response; the body's end commits the usage record `meter`
    /// holds. Every other ending, refusals included, commits the record
    /// before returning the failure.
    pub(crate) async fn run<B>(
        &self,
        deployed: &Deployed,
        class: Qos,
        deadline: Instant,
        meter: Meter,
        request: hyper::Request<B>,
    ) -> Result<http::Response<ResponseBody>, Failure>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<hearth_engine::BodyError>,
    {
        let (mut meter, permit) = self.admit_tenant(meter, deployed).await?;
        let (key, spec) = (key(deployed), spec(deployed));
        let queued = self
            .pools
            .acquire(&key, &spec, class, deadline)
            .instrument(tracing::info_span!("queue", class = class.as_str()));
        let mut lease = match queued.await {
            Ok(lease) => lease,
            Err(rejection) => return Err(meter.refuse(rejection.into()).await),
        };
        meter.admitted(lease.queued(), lease.is_cold());
        let prepared;
        let start = match lease.take_instance() {
            Some(instance) => Start::Warm(instance),
            // Scaled to zero: map the compiled code again. With nothing else
            // running, this worker has no one else to serve, so the mapping
            // runs here, saving two thread hand-offs on the cold start's
            // first byte.
            None => {
                self.preload_models(deployed);
                // Boxed: a cold start is rare, and its loading inline would
                // enlarge every warm invocation's future.
                match Box::pin(self.registry.prepared(deployed, self.load_on())).await {
                    Ok(loaded) => {
                        prepared = loaded;
                        Start::Cold(&prepared)
                    }
                    Err(err) => return Err(meter.refuse(err.into()).await),
                }
            }
        };
        let (report_tx, report_rx) = oneshot::channel();
        meter.expect_report(report_rx);
        let invoked = self
            .engine
            .invoke(
                start,
                limits(deployed, class),
                &deployed.grants,
                deployed.names.label.clone(),
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
                let limit = self.config.max_body_bytes;
                Err(meter.refuse(Failure::PayloadTooLarge { limit }).await)
            }
            Err(_) if meter.body_broken() => Err(meter.refuse(Failure::RequestTimeout).await),
            Err(err) => Err(meter.refuse(err.into()).await),
        }
    }

    /// What every call of `deployed` passes first, guest or not: the usage
    /// log must be writable (else the call is refused unrecorded: nothing
    /// can be written), and the tenant gate must admit it; a refusal is
    /// recorded. The permit holds the tenant's concurrency until dropped.
    pub(crate) async fn admit_tenant(
        &self,
        meter: Meter,
        deployed: &Deployed,
    ) -> Result<(Meter, TenantPermit), Failure> {
        if let Some(log) = &self.metering.usage
            && !log.healthy()
        {
            meter.discard();
            return Err(Failure::UsageLogDown);
        }
        match self.tenants.admit(&deployed.version.tenant) {
            Ok(permit) => Ok((meter, permit)),
            Err(rejection) => Err(meter.refuse(rejection.into()).await),
        }
    }

    /// Starts loading the models `deployed` names (those evicted since) on
    /// a task of their own, so a cold start loads them while its instance
    /// is made rather than after; the guest's `load` then finds its model
    /// loaded or in flight. Failures are left to that `load` to report.
    fn preload_models(&self, deployed: &Deployed) {
        if deployed.grants.models.is_empty() {
            return;
        }
        let (nn, grant) = (self.nn.clone(), deployed.grants.models.clone());
        tokio::spawn(async move {
            nn.preload(&grant).await;
        });
    }

    /// Where a cold start maps its function's code: on the caller's worker
    /// when the caller's is the only invocation running (its own lease is
    /// counted), else on the blocking pool so other requests are not held up
    /// behind it.
    fn load_on(&self) -> LoadOn {
        if self.pools.busy() <= 1 {
            LoadOn::Caller
        } else {
            LoadOn::BlockingPool
        }
    }

    /// Brings `deployed` up to its `min_instances` warm instances (and its
    /// models into the cache, which the instances will ask for).
    pub async fn keep_warm(&self, deployed: &Deployed) {
        if deployed.manifest.scaling.min_instances == 0 {
            return;
        }
        self.registry.preload_models(deployed).await;
        // Deleted or replaced meanwhile (a delete or deploy right after the
        // one that started this, here or on another node): its pool may be
        // retired and gone, and reserving would make it anew.
        let current = self
            .registry
            .resolve(&deployed.version.tenant, &deployed.version.name)
            .await;
        if !current.is_ok_and(|current| current.version.version == deployed.version.version) {
            return;
        }
        let (key, spec) = (key(deployed), spec(deployed));
        while let Some(lease) = self.pools.reserve_warm(&key, &spec) {
            let prepared = match self.registry.prepared(deployed, LoadOn::BlockingPool).await {
                Ok(prepared) => prepared,
                Err(err) => {
                    tracing::warn!(function = %key, error = %err, "cannot keep instances warm");
                    return;
                }
            };
            match self
                .engine
                .instantiate(&prepared, limits(deployed, Qos::Standard), &deployed.grants)
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
    /// unloads the compiled code of functions scaled fully to zero (and of
    /// replaced versions nothing runs any more), and tops up `min_instances`
    /// (after a trap or a restart). Runs until the invoker is gone.
    pub fn spawn_reaper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(invoker) = weak.upgrade() else { return };
                invoker.reap().await;
            }
        })
    }

    /// One round of the reaper.
    async fn reap(&self) {
        let reaped = self.pools.reap(Instant::now());
        if !reaped.instances.is_empty() {
            tracing::debug!(instances = reaped.instances.len(), "scaled down idle instances");
        }
        drop(reaped.instances);
        for gone in reaped.unloaded {
            if self.engine.unload(&gone.code) {
                tracing::debug!(function = %gone.key, "scaled to zero: compiled code unloaded");
            }
        }
        for key in self.pools.below_min() {
            if let Ok(deployed) = self.registry.resolve(&key.tenant, &key.function).await
                && deployed.version.version == key.version
            {
                self.keep_warm(&deployed).await;
            }
        }
    }
}
