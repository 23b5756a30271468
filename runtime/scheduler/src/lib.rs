//! Hearth's scheduler: which request runs when, and on which instance.
//!
//! Every invocation asks the [`Scheduler`] for a [`Lease`] before it runs. The
//! lease is the right to use one instance slot of one function:
//!
//! - **Pools.** Each function has a pool of idle, warm instances. A lease
//!   hands out the most recently used one ([`Lease::take_instance`]); when
//!   there is none, the lease is *cold* and the caller instantiates. After the
//!   request, [`Lease::finish`] gives a healthy instance back for reuse (up to
//!   the reuse limit, and only if the function allows reuse); an instance
//!   that trapped or hit a limit is finished with `None` and is gone.
//! - **Admission.** A function runs at most `max_instances` requests at once,
//!   and the server at most [`SchedulerConfig::max_instances`] instances in
//!   all (the wasmtime pool's slots; idle instances of other functions are
//!   evicted to make room). A request that cannot run waits in a bounded
//!   queue until its deadline. Queues are per function and per QoS class; the
//!   most urgent class goes first, and a waiting request gains one class of
//!   urgency per [`SchedulerConfig::aging`] so `batch` is never starved.
//! - **Rejection.** A full queue or a passed deadline is a [`Rejection`]:
//!   *too many requests* when the function's own limit is what blocks, *no
//!   capacity* when the server's is.
//! - **Scale to zero.** [`Scheduler::reap`] drops instances idle longer than
//!   their function's `idle_timeout` (keeping `min_instances`), and reports
//!   functions with no instance left for [`SchedulerConfig::function_idle`] so
//!   the caller can unload their compiled code. Models follow through the
//!   model cache's own idle eviction once no instance holds them.
//!
//! - **Tenants.** [`TenantGate`] holds each tenant to its limits (concurrency,
//!   request rate, functions, model bytes) before any of the above.
//!
//! The scheduler is generic over the instance type, so its logic is tested
//! with paused time and plain values; the engine's instances are one `I`.

mod tenant;

pub use tenant::{
    BUILT_IN_LIMITS, ManifestOverLimit, TenantGate, TenantLimits, TenantLimitsConfig, TenantPermit, TenantRejection,
};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hearth_manifest::Qos;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Default number of requests one instance serves before it is replaced.
pub const DEFAULT_REUSE_LIMIT: u32 = 1000;
/// Default number of requests waiting across all functions.
pub const DEFAULT_MAX_QUEUED: usize = 1024;
/// Default number of requests waiting for one function.
pub const DEFAULT_MAX_QUEUED_PER_FUNCTION: usize = 64;
/// Default time after which a waiting request gains one class of urgency.
pub const DEFAULT_AGING: Duration = Duration::from_secs(1);
/// Default time a function keeps its compiled code after its last instance.
pub const DEFAULT_FUNCTION_IDLE: Duration = Duration::from_secs(120);
/// What a rejection asks the client to wait before retrying.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Server-wide scheduling settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Instances that may exist at once across all functions, idle ones
    /// included (the wasmtime pool's size).
    pub max_instances: usize,
    /// Requests that may wait at once across all functions.
    pub max_queued: usize,
    /// Requests that may wait at once for one function.
    pub max_queued_per_function: usize,
    /// Requests one instance serves before it is replaced.
    pub reuse_limit: u32,
    /// Waiting this long raises a request by one class (zero: no aging).
    pub aging: Duration,
    /// How long a function with no instances keeps its compiled code loaded.
    pub function_idle: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_instances: 1000,
            max_queued: DEFAULT_MAX_QUEUED,
            max_queued_per_function: DEFAULT_MAX_QUEUED_PER_FUNCTION,
            reuse_limit: DEFAULT_REUSE_LIMIT,
            aging: DEFAULT_AGING,
            function_idle: DEFAULT_FUNCTION_IDLE,
        }
    }
}

/// Which pool a request runs in: one deployed version of one tenant's
/// function. Versions have pools of their own, so two versions of a function
/// can be warm at once; a replaced version is [`Scheduler::retire`]d.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionKey {
    /// The tenant.
    pub tenant: Arc<str>,
    /// The function's name.
    pub function: Arc<str>,
    /// The deployed version.
    pub version: u32,
}

impl FunctionKey {
    /// The key of `version` of `tenant`'s `function`.
    pub fn new(tenant: &str, function: &str, version: u32) -> FunctionKey {
        FunctionKey {
            tenant: Arc::from(tenant),
            function: Arc::from(function),
            version,
        }
    }

    /// Whether this key is a version of `tenant`'s `function`.
    pub fn is_version_of(&self, tenant: &str, function: &str) -> bool {
        &*self.tenant == tenant && &*self.function == function
    }
}

impl std::fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.tenant, self.function, self.version)
    }
}

/// What the scheduler needs to know about a function (from its manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    /// The key of its compiled code (the component's digest), handed back by
    /// [`Scheduler::reap`] when the function scales fully to zero so the
    /// caller can unload it without looking anything up.
    pub code: Arc<str>,
    /// Requests that may run at once.
    pub max_instances: u32,
    /// Instances kept warm while idle.
    pub min_instances: u32,
    /// How long an idle instance is kept.
    pub idle_timeout: Duration,
    /// Whether an instance may serve more than one request.
    pub reuse: bool,
}

/// Why a request was not admitted. Every variant is an answer the client
/// can act on by retrying after [`Rejection::retry_after`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The function runs `max_instances` requests and its queue is full.
    #[error("function `{function}` is busy: {max_instances} requests running and {queued} waiting")]
    FunctionBusy {
        /// The function's instance limit.
        max_instances: u32,
        /// Requests already waiting for it.
        queued: usize,
        /// The function.
        function: String,
    },
    /// Every instance slot of the server is busy and its queue is full.
    #[error("the server is at capacity: {max_instances} instances busy and {queued} requests waiting")]
    Capacity {
        /// The server's instance limit.
        max_instances: usize,
        /// Requests already waiting.
        queued: usize,
    },
    /// The request waited until its deadline.
    #[error("no instance became free within {} ms", .waited.as_millis())]
    Deadline {
        /// How long it waited.
        waited: Duration,
        /// Whether the function's own limit (rather than the server's) held it back.
        function_busy: bool,
    },
}

impl Rejection {
    /// Whether the function's own limit refused the request (HTTP 429) rather
    /// than the server's capacity (HTTP 503).
    pub fn is_function_limit(&self) -> bool {
        match self {
            Rejection::FunctionBusy { .. } => true,
            Rejection::Capacity { .. } => false,
            Rejection::Deadline { function_busy, .. } => *function_busy,
        }
    }

    /// How long the client should wait before retrying.
    pub fn retry_after(&self) -> Duration {
        RETRY_AFTER
    }
}

/// Counters and gauges of one function's pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionStats {
    /// Warm instances waiting for a request.
    pub idle: usize,
    /// Instances serving a request (or being created for one).
    pub busy: usize,
    /// Requests waiting, by class: `[batch, standard, realtime]`.
    pub queued: [usize; 3],
    /// Requests that got a fresh instance.
    pub cold_starts: u64,
    /// Requests served by a reused warm instance.
    pub warm_starts: u64,
    /// Idle instances dropped (timeout, eviction, redeploy).
    pub scale_downs: u64,
    /// Times the compiled code was unloaded after the last instance went.
    pub unloads: u64,
    /// Requests refused (full queue or deadline).
    pub rejected: u64,
    /// Whether the compiled code is loaded (false once scaled fully to zero).
    pub loaded: bool,
}

/// What [`Scheduler::reap`] took away, for the caller to drop and act on.
#[derive(Debug)]
pub struct Reaped<I> {
    /// Instances idle past their timeout (drop them outside any lock).
    pub instances: Vec<I>,
    /// Functions with no instance for [`SchedulerConfig::function_idle`], and
    /// retired versions with nothing left running: unload their compiled
    /// code (no other loaded function shares it).
    pub unloaded: Vec<Unloaded>,
}

/// A function whose compiled code is no longer needed, from [`Reaped`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unloaded {
    /// The function version.
    pub key: FunctionKey,
    /// Its code's key ([`FunctionSpec::code`]).
    pub code: Arc<str>,
}

/// The scheduler. Cheap to clone; clones share state.
#[derive(Debug)]
pub struct Scheduler<I: Send + 'static> {
    shared: Arc<Shared<I>>,
}

impl<I: Send + 'static> Clone for Scheduler<I> {
    fn clone(&self) -> Self {
        Scheduler {
            shared: self.shared.clone(),
        }
    }
}

#[derive(Debug)]
struct Shared<I: Send + 'static> {
    config: SchedulerConfig,
    state: Mutex<State<I>>,
}

#[derive(Debug)]
struct State<I: Send + 'static> {
    /// Hashed with foldhash, as the registry's functions (see there).
    pools: HashMap<FunctionKey, Pool<I>, foldhash::fast::RandomState>,
    /// Instances existing or being created, across all functions.
    live: usize,
    /// Idle instances across all functions (candidates for eviction).
    idle: usize,
    /// Requests waiting, across all functions.
    queued: usize,
    next_waiter: u64,
}

#[derive(Debug)]
struct Pool<I: Send + 'static> {
    spec: FunctionSpec,
    /// Oldest first; the last is the most recently used.
    idle: Vec<Idle<I>>,
    busy: usize,
    /// Waiting requests by class rank (`Qos as usize`), oldest first.
    waiters: [VecDeque<Waiter<I>>; 3],
    /// Since when the pool has had no instance.
    empty_since: Option<Instant>,
    /// Replaced or deleted: no instance of it is kept for reuse, and the
    /// pool goes once nothing of it runs.
    retired: bool,
    stats: FunctionStats,
}

#[derive(Debug)]
struct Idle<I> {
    instance: I,
    uses: u32,
    since: Instant,
}

#[derive(Debug)]
struct Waiter<I: Send + 'static> {
    id: u64,
    enqueued: Instant,
    tx: oneshot::Sender<Lease<I>>,
}

/// Things to drop after the state lock is released: instances (their drop
/// may be slow) and leases nobody received (their drop takes the lock).
struct Trash<I: Send + 'static> {
    instances: Vec<I>,
    leases: Vec<Lease<I>>,
}

impl<I: Send + 'static> Trash<I> {
    fn new() -> Self {
        Trash {
            instances: Vec::new(),
            leases: Vec::new(),
        }
    }
}

fn rank(class: Qos) -> usize {
    class as usize
}

impl<I: Send + 'static> Pool<I> {
    fn new(spec: FunctionSpec, now: Instant) -> Self {
        Pool {
            spec,
            idle: Vec::new(),
            busy: 0,
            waiters: Default::default(),
            empty_since: Some(now),
            retired: false,
            stats: FunctionStats::default(),
        }
    }

    fn live(&self) -> usize {
        self.idle.len() + self.busy
    }

    fn queued(&self) -> usize {
        self.waiters.iter().map(VecDeque::len).sum()
    }

    fn at_limit(&self) -> bool {
        self.busy >= self.spec.max_instances as usize
    }

    fn note_if_empty(&mut self, now: Instant) {
        if self.live() == 0 && self.empty_since.is_none() {
            self.empty_since = Some(now);
        }
    }
}

impl<I: Send + 'static> Scheduler<I> {
    /// A scheduler with no functions yet.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State {
                    pools: HashMap::default(),
                    live: 0,
                    idle: 0,
                    queued: 0,
                    next_waiter: 0,
                }),
            }),
        }
    }

    /// The settings this scheduler runs with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.config
    }

    /// Admits a request of `class` to `function`: at once when it has
    /// capacity and nobody of it waits, else after waiting in its queue until
    /// `deadline` at the latest.
    pub async fn acquire(
        &self,
        function: &FunctionKey,
        spec: &FunctionSpec,
        class: Qos,
        deadline: Instant,
    ) -> Result<Lease<I>, Rejection> {
        let shared = &self.shared;
        let (id, mut rx, enqueued) = {
            let mut trash = Trash::new();
            let now = Instant::now();
            let mut state = shared.lock();
            let key = state.pool_key(function, spec, now);
            let pool = &state.pools[&key];
            let outcome = if pool.queued() == 0
                && let Some(lease) = shared.grant(&mut state, &key, now, &mut trash)
            {
                Ok(lease)
            } else {
                shared.enqueue(&mut state, &key, class, now, deadline)
            };
            drop(state);
            drop(trash);
            match outcome {
                Ok(lease) => return Ok(lease),
                Err(Enqueue::Rejected(rejection)) => return Err(rejection),
                Err(Enqueue::Waiting(id, rx)) => (id, rx, now),
            }
        };
        let guard = QueueGuard {
            shared,
            function,
            class,
            id,
        };
        match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(Ok(lease)) => {
                std::mem::forget(guard);
                Ok(lease)
            }
            // The sender went without a lease (the pool was dropped).
            Ok(Err(_)) => Err(Rejection::Deadline {
                waited: enqueued.elapsed(),
                function_busy: false,
            }),
            Err(_elapsed) => {
                std::mem::forget(guard);
                let mut state = shared.lock();
                if let Some(function_busy) = state.remove_waiter(function, class, id) {
                    if let Some(pool) = state.pools.get_mut(function) {
                        pool.stats.rejected += 1;
                    }
                    Err(Rejection::Deadline {
                        waited: enqueued.elapsed(),
                        function_busy,
                    })
                } else {
                    drop(state);
                    // Granted at the last moment: the lease is in the channel.
                    rx.try_recv().map_err(|_| Rejection::Deadline {
                        waited: enqueued.elapsed(),
                        function_busy: false,
                    })
                }
            }
        }
    }

    /// A slot for a new instance that will be parked idle to keep the
    /// function at `min_instances`, or `None` when it has enough (or the
    /// server has no free slot). Finish it with [`Lease::park`].
    pub fn reserve_warm(&self, function: &FunctionKey, spec: &FunctionSpec) -> Option<Lease<I>> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let key = state.pool_key(function, spec, now);
        let has_room = state.live < self.shared.config.max_instances;
        let pool = state.pools.get_mut(&key)?;
        if pool.retired || pool.live() >= pool.spec.min_instances as usize || !has_room {
            return None;
        }
        pool.busy += 1;
        pool.empty_since = None;
        pool.stats.loaded = true;
        state.live += 1;
        Some(Lease {
            shared: self.shared.clone(),
            key,
            instance: None,
            uses: 0,
            cold: true,
            queued: Duration::ZERO,
            released: false,
        })
    }

    /// Records that `function`'s compiled code was just loaded (a deploy
    /// compiles it) without running anything, so it scales to zero like a
    /// function that served requests.
    pub fn track_loaded(&self, function: &FunctionKey, spec: &FunctionSpec) {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let key = state.pool_key(function, spec, now);
        if let Some(pool) = state.pools.get_mut(&key) {
            pool.stats.loaded = true;
            pool.note_if_empty(now);
        }
        drop(state);
    }

    /// Retires every function version `which` picks (it was deleted or
    /// replaced): drops its idle instances and stops reusing its busy ones;
    /// the next [`Scheduler::reap`] removes its pool once nothing of it runs.
    pub fn retire(&self, which: impl Fn(&FunctionKey) -> bool) {
        let mut trash = Trash::new();
        let now = Instant::now();
        let mut state = self.shared.lock();
        let State { pools, live, idle, .. } = &mut *state;
        for (_, pool) in pools.iter_mut().filter(|(key, _)| which(key)) {
            pool.retired = true;
            let dropped = pool.idle.len();
            trash.instances.extend(pool.idle.drain(..).map(|i| i.instance));
            pool.stats.scale_downs += dropped as u64;
            *live -= dropped;
            *idle -= dropped;
            pool.note_if_empty(now);
        }
        drop(state);
    }

    /// Drops instances idle past their function's timeout (keeping
    /// `min_instances`), reports functions empty for
    /// [`SchedulerConfig::function_idle`], and removes retired pools with
    /// nothing left in them.
    pub fn reap(&self, now: Instant) -> Reaped<I> {
        let function_idle = self.shared.config.function_idle;
        let mut reaped = Reaped {
            instances: Vec::new(),
            unloaded: Vec::new(),
        };
        let mut state = self.shared.lock();
        let State { pools, live, idle, .. } = &mut *state;
        let mut gone = Vec::new();
        for (key, pool) in pools.iter_mut() {
            if pool.retired && pool.live() == 0 && pool.queued() == 0 {
                gone.push((key.clone(), pool.stats.loaded.then(|| pool.spec.code.clone())));
                continue;
            }
            let keep = (pool.spec.min_instances as usize).saturating_sub(pool.busy);
            let expired = pool
                .idle
                .iter()
                .take_while(|i| now.saturating_duration_since(i.since) >= pool.spec.idle_timeout)
                .count()
                .min(pool.idle.len().saturating_sub(keep));
            if expired > 0 {
                reaped.instances.extend(pool.idle.drain(..expired).map(|i| i.instance));
                pool.stats.scale_downs += expired as u64;
                *live -= expired;
                *idle -= expired;
                pool.note_if_empty(now);
            }
            if pool.stats.loaded
                && pool.live() == 0
                && pool
                    .empty_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= function_idle)
            {
                pool.stats.loaded = false;
                pool.stats.unloads += 1;
                reaped.unloaded.push(Unloaded {
                    key: key.clone(),
                    code: pool.spec.code.clone(),
                });
            }
        }
        for (key, code) in gone {
            pools.remove(&key);
            if let Some(code) = code {
                reaped.unloaded.push(Unloaded { key, code });
            }
        }
        // Code that another loaded function version still runs stays.
        reaped.unloaded.retain(|gone| {
            !pools
                .values()
                .any(|pool| pool.stats.loaded && pool.spec.code == gone.code)
        });
        reaped
    }

    /// Functions with fewer instances than their `min_instances` (after a
    /// trap, or before their first warm-up), by key; retired ones excluded.
    pub fn below_min(&self) -> Vec<FunctionKey> {
        let state = self.shared.lock();
        state
            .pools
            .iter()
            .filter(|(_, pool)| !pool.retired && pool.live() < pool.spec.min_instances as usize)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// The pool figures of one function version, if it has been used.
    pub fn function_stats(&self, function: &FunctionKey) -> Option<FunctionStats> {
        let state = self.shared.lock();
        state.pools.get(function).map(Pool::snapshot)
    }

    /// Every function version's pool figures, by key.
    pub fn stats(&self) -> Vec<(FunctionKey, FunctionStats)> {
        let state = self.shared.lock();
        let mut all: Vec<_> = state
            .pools
            .iter()
            .map(|(key, pool)| (key.clone(), pool.snapshot()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Instances running an invocation or being created for one, across all
    /// functions.
    pub fn busy(&self) -> usize {
        let state = self.shared.lock();
        state.live.saturating_sub(state.idle)
    }

    /// Instances existing and requests waiting, across all functions.
    pub fn totals(&self) -> (usize, usize) {
        let state = self.shared.lock();
        (state.live, state.queued)
    }
}

impl<I: Send + 'static> Pool<I> {
    fn snapshot(&self) -> FunctionStats {
        let mut stats = self.stats.clone();
        stats.idle = self.idle.len();
        stats.busy = self.busy;
        for class in Qos::ALL {
            stats.queued[rank(class)] = self.waiters[rank(class)].len();
        }
        stats
    }
}

/// How urgent a waiting request is: its class raised by aging, then age.
type Urgency = (u128, std::cmp::Reverse<Instant>);

enum Enqueue<I: Send + 'static> {
    Waiting(u64, oneshot::Receiver<Lease<I>>),
    Rejected(Rejection),
}

impl<I: Send + 'static> Shared<I> {
    fn lock(&self) -> MutexGuard<'_, State<I>> {
        // The state stays consistent across panics (no user code runs under
        // the lock), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives a lease to `key` if it has room: an idle instance, a free slot,
    /// or a slot freed by evicting another function's idle instance.
    fn grant(
        self: &Arc<Self>,
        state: &mut State<I>,
        key: &FunctionKey,
        now: Instant,
        trash: &mut Trash<I>,
    ) -> Option<Lease<I>> {
        let max_instances = self.config.max_instances;
        let pool = state.pools.get_mut(key)?;
        if pool.at_limit() {
            return None;
        }
        if let Some(idle) = pool.idle.pop() {
            pool.busy += 1;
            pool.stats.warm_starts += 1;
            state.idle -= 1;
            return Some(self.lease(key, Some(idle.instance), idle.uses, false));
        }
        if state.live >= max_instances {
            let evicted = state.evict_oldest_idle(key, now)?;
            trash.instances.push(evicted);
        } else {
            state.live += 1;
        }
        let pool = state.pools.get_mut(key)?;
        pool.busy += 1;
        pool.empty_since = None;
        pool.stats.cold_starts += 1;
        pool.stats.loaded = true;
        Some(self.lease(key, None, 0, true))
    }

    fn lease(self: &Arc<Self>, key: &FunctionKey, instance: Option<I>, uses: u32, cold: bool) -> Lease<I> {
        Lease {
            shared: self.clone(),
            key: key.clone(),
            instance,
            uses,
            cold,
            queued: Duration::ZERO,
            released: false,
        }
    }

    fn enqueue(
        &self,
        state: &mut State<I>,
        key: &FunctionKey,
        class: Qos,
        now: Instant,
        deadline: Instant,
    ) -> Result<Lease<I>, Enqueue<I>> {
        let total_queued = state.queued;
        let id = state.next_waiter;
        let pool = state.pools.get_mut(key).ok_or(Enqueue::Rejected(Rejection::Capacity {
            max_instances: self.config.max_instances,
            queued: total_queued,
        }))?;
        let queued = pool.queued();
        let rejection = if queued >= self.config.max_queued_per_function {
            Some(Rejection::FunctionBusy {
                max_instances: pool.spec.max_instances,
                queued,
                function: key.to_string(),
            })
        } else if total_queued >= self.config.max_queued {
            Some(Rejection::Capacity {
                max_instances: self.config.max_instances,
                queued: total_queued,
            })
        } else if deadline <= now {
            Some(Rejection::Deadline {
                waited: Duration::ZERO,
                function_busy: pool.at_limit(),
            })
        } else {
            None
        };
        if let Some(rejection) = rejection {
            pool.stats.rejected += 1;
            return Err(Enqueue::Rejected(rejection));
        }
        let (tx, rx) = oneshot::channel();
        pool.waiters[rank(class)].push_back(Waiter { id, enqueued: now, tx });
        state.queued += 1;
        state.next_waiter += 1;
        Err(Enqueue::Waiting(id, rx))
    }

    /// Hands free capacity to waiting requests, most urgent (after aging)
    /// first, until no waiter can be served.
    fn dispatch(self: &Arc<Self>, state: &mut State<I>, trash: &mut Trash<I>) {
        let now = Instant::now();
        let aging = self.config.aging;
        loop {
            let room = state.live < self.config.max_instances || state.idle > 0;
            let mut best: Option<(FunctionKey, usize, Urgency)> = None;
            for (key, pool) in &state.pools {
                if pool.queued() == 0 || pool.at_limit() || (pool.idle.is_empty() && !room) {
                    continue;
                }
                for (class, queue) in pool.waiters.iter().enumerate() {
                    let Some(head) = queue.front() else { continue };
                    let waited = now.saturating_duration_since(head.enqueued);
                    let boost = if aging.is_zero() {
                        0
                    } else {
                        waited.as_nanos() / aging.as_nanos()
                    };
                    let urgency = (class as u128 + boost, std::cmp::Reverse(head.enqueued));
                    if best.as_ref().is_none_or(|(_, _, u)| urgency > *u) {
                        best = Some((key.clone(), class, urgency));
                    }
                }
            }
            let Some((key, class, _)) = best else { return };
            let Some(mut lease) = self.grant(state, &key, now, trash) else {
                return;
            };
            let Some(waiter) = state.pools.get_mut(&key).and_then(|p| p.waiters[class].pop_front()) else {
                trash.leases.push(lease);
                return;
            };
            state.queued -= 1;
            lease.queued = now.saturating_duration_since(waiter.enqueued);
            if let Err(lease) = waiter.tx.send(lease) {
                // The waiter gave up just now; its lease is released after
                // the lock is dropped.
                trash.leases.push(lease);
            }
        }
    }

    fn release(self: &Arc<Self>, key: &FunctionKey, instance: Option<I>, uses: u32) {
        let mut trash = Trash::new();
        let now = Instant::now();
        let reuse_limit = self.config.reuse_limit;
        let mut state = self.lock();
        let State { pools, live, idle, .. } = &mut *state;
        match pools.get_mut(key) {
            Some(pool) => {
                pool.busy -= 1;
                match instance {
                    Some(instance) if !pool.retired && pool.spec.reuse && uses < reuse_limit => {
                        pool.idle.push(Idle {
                            instance,
                            uses,
                            since: now,
                        });
                        *idle += 1;
                    }
                    other => {
                        trash.instances.extend(other);
                        *live -= 1;
                        pool.note_if_empty(now);
                    }
                }
            }
            None => {
                trash.instances.extend(instance);
                *live -= 1;
            }
        }
        self.dispatch(&mut state, &mut trash);
        drop(state);
        drop(trash);
    }
}

impl<I: Send + 'static> State<I> {
    /// The pool for `function`, created on first use or updated to `spec`.
    fn pool_key(&mut self, function: &FunctionKey, spec: &FunctionSpec, now: Instant) -> FunctionKey {
        match self.pools.get_mut(function) {
            Some(pool) => {
                if pool.spec != *spec {
                    pool.spec = spec.clone();
                }
                // Called again (by version, or an alias moved back to it):
                // its instances are worth keeping after all.
                pool.retired = false;
            }
            None => {
                self.pools.insert(function.clone(), Pool::new(spec.clone(), now));
            }
        }
        function.clone()
    }

    /// Drops the longest-idle instance of any function but `except`, handing
    /// its slot over.
    fn evict_oldest_idle(&mut self, except: &FunctionKey, now: Instant) -> Option<I> {
        let (_, pool) = self
            .pools
            .iter_mut()
            .filter(|(key, pool)| *key != except && !pool.idle.is_empty())
            .min_by_key(|(_, pool)| pool.idle[0].since)?;
        let evicted = pool.idle.remove(0);
        pool.stats.scale_downs += 1;
        pool.note_if_empty(now);
        self.idle -= 1;
        Some(evicted.instance)
    }

    /// Removes a waiter still in its queue; returns whether its function was
    /// at its own limit, or `None` if it was already granted.
    fn remove_waiter(&mut self, function: &FunctionKey, class: Qos, id: u64) -> Option<bool> {
        let pool = self.pools.get_mut(function)?;
        let queue = &mut pool.waiters[rank(class)];
        let at = queue.iter().position(|w| w.id == id)?;
        queue.remove(at);
        self.queued -= 1;
        Some(pool.at_limit())
    }
}

/// Takes a request out of its queue if it stops waiting (its caller went
/// away) before it was granted.
struct QueueGuard<'a, I: Send + 'static> {
    shared: &'a Shared<I>,
    function: &'a FunctionKey,
    class: Qos,
    id: u64,
}

impl<I: Send + 'static> Drop for QueueGuard<'_, I> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.remove_waiter(self.function, self.class, self.id);
    }
}

/// The right to run one request on one instance slot of one function. The
/// slot is freed when the lease is finished or dropped; a dropped lease
/// discards its instance.
#[derive(Debug)]
pub struct Lease<I: Send + 'static> {
    shared: Arc<Shared<I>>,
    key: FunctionKey,
    instance: Option<I>,
    uses: u32,
    cold: bool,
    queued: Duration,
    released: bool,
}

impl<I: Send + 'static> Lease<I> {
    /// The warm instance to run on; `None` means instantiate a new one.
    pub fn take_instance(&mut self) -> Option<I> {
        self.instance.take()
    }

    /// Whether this request needs a fresh instance (a cold start).
    pub fn is_cold(&self) -> bool {
        self.cold
    }

    /// How long the request waited in the queue.
    pub fn queued(&self) -> Duration {
        self.queued
    }

    /// Ends the request. A healthy instance goes back to the pool for reuse
    /// (if the function allows it and the instance is under the reuse
    /// limit); `None`, for an instance that trapped or hit a limit, frees the
    /// slot.
    pub fn finish(mut self, instance: Option<I>) {
        self.released = true;
        self.shared.release(&self.key, instance, self.uses.saturating_add(1));
    }

    /// Parks an instance created ahead of demand (`min_instances`), without
    /// counting a use.
    pub fn park(mut self, instance: I) {
        self.released = true;
        self.shared.release(&self.key, Some(instance), self.uses);
    }
}

impl<I: Send + 'static> Drop for Lease<I> {
    fn drop(&mut self) {
        if !self.released {
            self.released = true;
            let instance = self.instance.take();
            self.shared.release(&self.key, None, self.uses);
            drop(instance);
        }
    }
}

#[cfg(test)]
mod tests;
