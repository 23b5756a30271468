//! Hearth's invoker: one invocation, from a resolved function to its
//! committed usage record. It knows nothing of routes or problem bodies; the
//! HTTP layer resolves and authenticates, shapes the guest's request, and
//! renders a [`Failure`] as a problem answer.
//!
//! One synchronous invocation, top down:
//!
//! 1. [`Invoker::begin`] opens its usage record (a [`Meter`]): from here on
//!    every ending is recorded exactly once. A request that cannot run as it
//!    is goes back through [`Meter::refuse`], which records the refusal.
//! 2. [`Invoker::invoke`] limits and counts the request body (a version
//!    with `[cache]` answers a repeated request from its `cache` at once),
//!    then (in
//!    `run`): the usage log must be writable; the tenant gate admits it; the
//!    scheduler leases an instance slot of the function version, waiting in
//!    its QoS queue; the engine runs the guest on a warm instance or a fresh
//!    one from the compiled code (mapped again after scale to zero).
//! 3. The response comes back at the guest's head; its body is metered
//!    (`record`): the record commits before the last frame is sent, and a
//!    client that goes away still leaves its one record. When the guest is
//!    done its instance returns to the pool.
//!
//! Around that: [`Invoker::deployed`] and [`Invoker::deleted`] keep the
//! pools in step with the registry, [`Invoker::keep_warm`] holds
//! `min_instances`, [`Invoker::spawn_reaper`] scales to zero,
//! [`Invoker::submit`] and [`Invoker::spawn_async_runner`] run asynchronous
//! invocations, and [`Invoker::observe`] exports the runtime's gauges.

mod asynchronous;
mod body;
mod cache;
mod collect;
mod direct;
mod failure;
mod observe;
mod record;
mod run;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::Either;
use hearth_bridge::NnHost;
use hearth_engine::{Engine, Instance};
use hearth_manifest::Qos;
use hearth_metering::{PriceTable, UsageLog};
use hearth_registry::{Deployed, Registry};
use hearth_scheduler::{FunctionKey, Scheduler, TenantGate};
use hearth_store::Store;
use hearth_telemetry::Telemetry;
use uuid::Uuid;

pub use asynchronous::{
    DEFAULT_ASYNC_CONCURRENCY, DEFAULT_ASYNC_LEASE, DEFAULT_ASYNC_MAX_ATTEMPTS, DEFAULT_ASYNC_RETENTION, RenderFailure,
};
pub use cache::CACHE_HEADER;
pub use collect::{DEFAULT_GC_INTERVAL, GC_GRACE};
pub use failure::Failure;
use record::Metering;
pub use record::{Meter, arrival, now_us};

/// Default largest invocation request body: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 << 20;
/// Default longest wait in a function's queue before 429/503.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most shadow copies running at once.
pub const DEFAULT_MAX_SHADOW_RUNS: usize = 2;
/// Header with the path a function is mounted at, passed to the guest.
pub const BASE_PATH_HEADER: http::HeaderName = http::HeaderName::from_static("x-hearth-base-path");

/// An error a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A function's response body, metered: its end commits the usage record.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
/// The instance pools of every function version.
pub type Pools = Scheduler<Instance>;

/// Limits on each invocation.
#[derive(Debug, Clone, Copy)]
pub struct InvokerConfig {
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Longest a request waits for an instance before it is refused.
    pub queue_timeout: Duration,
    /// How long after its last heartbeat a node counts as gone.
    pub async_lease: Duration,
    /// Attempts after which an asynchronous invocation whose node keeps
    /// stopping mid-run fails.
    pub async_max_attempts: u32,
    /// How long an asynchronous invocation is kept: one still queued after
    /// it fails as expired, a finished one's result is deleted after it.
    pub async_retention: Duration,
    /// Shadow copies running at once at most; a copy that finds them all
    /// busy is skipped (counted), so mirroring never takes more than this
    /// much of the server from the requests whose answers are sent.
    pub max_shadow_runs: usize,
}

impl Default for InvokerConfig {
    fn default() -> Self {
        InvokerConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            async_lease: DEFAULT_ASYNC_LEASE,
            async_max_attempts: DEFAULT_ASYNC_MAX_ATTEMPTS,
            async_retention: DEFAULT_ASYNC_RETENTION,
            max_shadow_runs: DEFAULT_MAX_SHADOW_RUNS,
        }
    }
}

/// The parts an invoker drives, built by `hearth serve` from its flags.
#[derive(Debug)]
pub struct Parts {
    /// Functions and versions.
    pub registry: Registry,
    /// The wasmtime engine.
    pub engine: Engine,
    /// The `wasi:nn` host and its warm models.
    pub nn: NnHost,
    /// Admission, queues and the instance pools.
    pub pools: Pools,
    /// Per-tenant limits.
    pub tenants: TenantGate,
    /// The metadata store (asynchronous invocations).
    pub store: Arc<dyn Store>,
    /// Where usage records go; `None` runs without metering (benchmarks).
    pub usage: Option<UsageLog>,
    /// Prices records.
    pub prices: PriceTable,
    /// Metrics.
    pub telemetry: Arc<Telemetry>,
}

/// Runs invocations. Shared behind an `Arc` by the HTTP layer and the
/// background tasks it spawns.
#[derive(Debug)]
pub struct Invoker {
    registry: Registry,
    engine: Engine,
    nn: NnHost,
    pools: Pools,
    tenants: TenantGate,
    store: Arc<dyn Store>,
    metering: Arc<Metering>,
    config: InvokerConfig,
    /// Wakes the asynchronous invocation runner (a submission, a slot freed).
    async_queue: tokio::sync::Notify,
    /// Response caches of the versions with `[cache]` that were called,
    /// dropped with their version's pool.
    caches: dashmap::DashMap<FunctionKey, Arc<cache::ResponseCache>, foldhash::fast::RandomState>,
    /// Slots of shadow copies running now ([`InvokerConfig::max_shadow_runs`]).
    shadow_slots: Arc<tokio::sync::Semaphore>,
    /// Shadow copies skipped because every slot was busy, since start.
    shadows_skipped: std::sync::atomic::AtomicU64,
}

impl Invoker {
    /// An invoker over `parts`.
    pub fn new(parts: Parts, config: InvokerConfig) -> Arc<Invoker> {
        let Parts {
            registry,
            engine,
            nn,
            pools,
            tenants,
            store,
            usage,
            prices,
            telemetry,
        } = parts;
        Arc::new(Invoker {
            registry,
            engine,
            nn,
            pools,
            tenants,
            store,
            metering: Arc::new(Metering {
                usage,
                prices,
                telemetry,
            }),
            config,
            async_queue: tokio::sync::Notify::new(),
            caches: dashmap::DashMap::default(),
            shadow_slots: Arc::new(tokio::sync::Semaphore::new(config.max_shadow_runs)),
            shadows_skipped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Opens the usage record of invocation `id` of `deployed`, which
    /// arrived at `started_at_us` ([`arrival`] makes both). From here on
    /// the invocation is the tenant's: run it with [`Invoker::invoke`], or
    /// end it with [`Meter::refuse`]; either way it leaves one record.
    pub fn begin(&self, id: Uuid, started_at_us: i64, deployed: &Deployed) -> Meter {
        // Encoded without `fmt` (`to_string` cost a quarter of a microsecond).
        let id = id.hyphenated().encode_lower(&mut Uuid::encode_buffer()).to_owned();
        Meter::new(self, id, started_at_us, deployed)
    }

    /// Runs `request` on `deployed` at `class`: returns the function's
    /// response once its head is sent (the body's end commits the record),
    /// or the failure, already recorded. The body is limited to
    /// [`InvokerConfig::max_body_bytes`] as it streams.
    ///
    /// Not an `async fn`: the request is taken apart here and the run's own
    /// future returned, so the caller's future does not hold a second copy
    /// of the meter and the request (a kilobyte every request moves).
    pub fn invoke<'a, B>(
        &'a self,
        mut meter: Meter,
        deployed: &'a Deployed,
        class: Qos,
        request: hyper::Request<B>,
    ) -> impl Future<Output = Result<http::Response<ResponseBody>, Failure>> + Send + 'a
    where
        B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let (parts, body) = request.into_parts();
        if parts.method == http::Method::HEAD {
            meter.head_only();
        }
        if let Some(spec) = &deployed.manifest.cache
            && cache::cacheable(&parts.method)
        {
            // Boxed: its own run, cache look-up and body read would
            // otherwise enlarge every invocation's future.
            return Either::Left(Box::pin(self.invoke_cached(meter, deployed, spec, class, parts, body)));
        }
        let (body, counted) = body::LimitedBody::new(body, self.config.max_body_bytes);
        meter.count_body(counted);
        let request = hyper::Request::from_parts(parts, body);
        let deadline = tokio::time::Instant::now() + self.config.queue_timeout;
        Either::Right(self.run(deployed, class, deadline, meter, request))
    }

    /// [`Invoker::invoke`] for a version with a response cache: the body is
    /// read whole (it is part of the key); a hit answers at once, with a
    /// record of its own (`cache_hit`); a miss runs, and its answer is kept
    /// as it streams when it may be.
    async fn invoke_cached<B>(
        &self,
        mut meter: Meter,
        deployed: &Deployed,
        spec: &hearth_manifest::CacheSpec,
        class: Qos,
        parts: http::request::Parts,
        body: B,
    ) -> Result<http::Response<ResponseBody>, Failure>
    where
        B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let limit = self.config.max_body_bytes;
        let (body, counted) = body::LimitedBody::new(body, limit);
        meter.count_body(counted);
        let body = match http_body_util::BodyExt::collect(body).await {
            Ok(collected) => collected.to_bytes(),
            Err(_) if meter.body_exceeded() => return Err(meter.refuse(Failure::PayloadTooLarge { limit }).await),
            Err(err) => {
                let failure = Failure::BadRequest(format!("reading the request body: {err}"));
                return Err(meter.refuse(failure).await);
            }
        };
        let key = run::key(deployed);
        let cache = self
            .caches
            .entry(key.clone())
            .or_insert_with(|| Arc::new(cache::ResponseCache::new(spec)))
            .clone();
        let entry_key = cache.key(&parts.method, &parts.uri, &parts.headers, &body);
        if let Some(entry) = cache.get(&entry_key) {
            return meter.cache_hit(&entry).await;
        }
        let request = hyper::Request::from_parts(parts, http_body_util::Full::new(body));
        let deadline = tokio::time::Instant::now() + self.config.queue_timeout;
        let response = self.run(deployed, class, deadline, meter, request).await?;
        let (mut head, inner) = response.into_parts();
        let ttl = (head.status == http::StatusCode::OK)
            .then(|| cache.ttl_for(&head.headers))
            .flatten();
        let guest_headers = head.headers.clone();
        head.headers
            .insert(CACHE_HEADER, http::HeaderValue::from_static("miss"));
        let body = match ttl {
            Some(ttl) => http_body_util::BodyExt::boxed_unsync(cache.recording(entry_key, guest_headers, ttl, inner)),
            None => inner,
        };
        Ok(http::Response::from_parts(head, body))
    }

    /// Runs a shadow copy of an alias's request on `deployed`, in a task
    /// of its own at the `batch` class: its answer is read to the end (so
    /// its record commits) and dropped, and whatever happens to it never
    /// reaches the caller of the primary. Its record says `shadow = true`.
    /// With [`InvokerConfig::max_shadow_runs`] copies already running, the
    /// copy is skipped (no record: it never reached the function) and
    /// counted in `hearth_shadow_skipped_total`. Copies run on their own
    /// thread at the lowest CPU priority ([`shadow_runtime`]).
    pub fn mirror(self: &Arc<Self>, deployed: Arc<Deployed>, alias: Option<Arc<str>>, request: hyper::Request<Bytes>) {
        let Ok(slot) = self.shadow_slots.clone().try_acquire_owned() else {
            self.shadows_skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        let invoker = self.clone();
        let runtime = shadow_runtime()
            .cloned()
            .unwrap_or_else(tokio::runtime::Handle::current);
        runtime.spawn(async move {
            let _slot = slot;
            let (id, arrived_at_us) = arrival();
            let mut meter = invoker.begin(id, arrived_at_us, &deployed);
            meter.through(alias.as_deref());
            meter.shadow();
            let request = request.map(http_body_util::Full::new);
            if let Ok(response) = invoker.invoke(meter, &deployed, Qos::Batch, request).await {
                let mut body = response.into_body();
                while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
            }
        });
    }

    /// After a deploy: the versions `deployed` replaces are retired (their
    /// idle instances go now, not at their idle timeout) unless an alias
    /// still sends requests to them (a version called by number later
    /// gets its pool back), its code, just
    /// compiled, scales to zero like any other's, and its `min_instances`
    /// warm up in the background.
    pub fn deployed(self: &Arc<Self>, deployed: Arc<Deployed>) {
        let key = run::key(&deployed);
        self.retire_replaced(&key);
        self.pools.track_loaded(&key, &run::spec(&deployed));
        self.warm_up(deployed);
    }

    /// Retires the versions of `current`'s function other than it that no
    /// alias routes to any more.
    fn retire_replaced(&self, current: &FunctionKey) {
        let routed = self.registry.routed_versions(&current.tenant, &current.function);
        let replaced = |other: &FunctionKey| {
            other.is_version_of(&current.tenant, &current.function)
                && other.version != current.version
                && !routed.contains(&other.version)
        };
        self.pools.retire(replaced);
        self.caches.retain(|other, _| !replaced(other));
    }

    /// Brings `deployed`'s `min_instances` up in the background.
    fn warm_up(self: &Arc<Self>, deployed: Arc<Deployed>) {
        if deployed.manifest.scaling.min_instances > 0 {
            let invoker = self.clone();
            tokio::spawn(async move { invoker.keep_warm(&deployed).await });
        }
    }

    /// After a delete: every version of the function is retired.
    pub fn deleted(&self, tenant: &str, function: &str) {
        self.pools.retire(|key| key.is_version_of(tenant, function));
        self.caches.retain(|key, _| !key.is_version_of(tenant, function));
    }

    /// After changes made elsewhere went unsaid (the change feed was lost
    /// and found again), once every cached routing was marked stale
    /// ([`Registry::forget_all`]): every function with instances here
    /// follows what the store now holds, as [`Invoker::changed_elsewhere`]
    /// does for one.
    pub async fn changed_elsewhere_all(self: &Arc<Self>) {
        let mut functions: Vec<(Arc<str>, Arc<str>)> = self
            .pools
            .stats()
            .into_iter()
            .map(|(key, _)| (key.tenant, key.function))
            .collect();
        functions.dedup();
        for (tenant, function) in functions {
            self.follow(&tenant, &function).await;
        }
    }

    /// After another node of a cluster changed a function (deployed,
    /// deleted or re-aliased it; the store's change feed says which), once
    /// its cached routing was marked stale ([`Registry::forget`], which the
    /// change feed's follower calls at once): this node's instances follow
    /// as they do on the node that made the change. Deleted: every version
    /// is retired. Otherwise, where the function runs here or keeps
    /// instances warm (as every node does from its start), the versions
    /// nothing routes to any more are retired and the current one's
    /// `min_instances` warm up. Before, a function deleted or replaced
    /// elsewhere kept its `min_instances` warm here until the node
    /// restarted. Functions that neither run here nor keep warm are left to
    /// their first call.
    pub async fn changed_elsewhere(self: &Arc<Self>, tenant: &str, function: &str) {
        let runs_here = self
            .pools
            .stats()
            .iter()
            .any(|(key, _)| key.is_version_of(tenant, function));
        if runs_here || self.registry.keeps_warm(tenant, function).await {
            self.follow(tenant, function).await;
        }
    }

    /// Retires or warms this node's instances of a function that runs here
    /// or keeps warm, after what the store now holds.
    async fn follow(self: &Arc<Self>, tenant: &str, function: &str) {
        match self.registry.resolve(tenant, function).await {
            Ok(current) => {
                self.retire_replaced(&run::key(&current));
                self.warm_up(current);
            }
            Err(hearth_registry::RegistryError::NotFound { .. }) => self.deleted(tenant, function),
            // The store is away (the routing cached before is served
            // meanwhile), or the version cannot run here: the next call or
            // change tries again.
            Err(err) => tracing::debug!(tenant, function, error = %err, "cannot follow a change made elsewhere"),
        }
    }

    /// The scheduler's key of a function version (for its pool's figures).
    pub fn key(version: &hearth_store::FunctionVersion) -> FunctionKey {
        FunctionKey::new(&version.tenant, &version.name, version.version)
    }

    /// Functions and versions.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The instance pools.
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// The wasmtime engine (which code is loaded).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The `wasi:nn` host: devices and warm models.
    pub fn nn(&self) -> &NnHost {
        &self.nn
    }

    /// Per-tenant limits.
    pub fn tenants(&self) -> &TenantGate {
        &self.tenants
    }

    /// The metadata store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Metrics (and the Prometheus text of `/metrics`).
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.metering.telemetry
    }

    /// The usage log, unless metering is off.
    pub fn usage(&self) -> Option<&UsageLog> {
        self.metering.usage.as_ref()
    }

    /// The limits it runs invocations under.
    pub fn config(&self) -> &InvokerConfig {
        &self.config
    }
}

/// The runtime shadow copies run on: one worker thread (and its blocking
/// pool) at nice 19, so the kernel gives copies only the CPU the answered
/// requests leave, however many copies an alias asks for. `None` if it
/// could not be built (copies then run beside everything else).
fn shadow_runtime() -> Option<&'static tokio::runtime::Handle> {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        let built = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("hearth-shadow")
            .enable_all()
            .on_thread_start(|| {
                // On Linux a thread's nice value is its own. Failing to
                // lower it leaves copies at the normal priority, bounded by
                // `max_shadow_runs` still.
                let _ = rustix::process::nice(19);
            })
            .build();
        match built {
            Ok(runtime) => Some(runtime),
            Err(err) => {
                tracing::warn!(error = %err, "no low-priority runtime for shadow copies; they run with the rest");
                None
            }
        }
    });
    runtime.as_ref().map(tokio::runtime::Runtime::handle)
}

#[cfg(test)]
mod tests;
