//! The gauges observed from the runtime's state at each scrape: instances
//! and queues per function version, models and devices, the usage log.

use std::sync::{Arc, Weak};

use hearth_manifest::Qos;
use hearth_scheduler::FunctionKey;
use opentelemetry::KeyValue;

use crate::Invoker;

/// A function version's labels: tenant, function and version (a replaced
/// version's pool lives on while its last requests finish), folded into
/// `other` (version 0) past the telemetry's series bound.
fn function_labels(state: &Invoker, key: &FunctionKey) -> [KeyValue; 3] {
    let [tenant, function] = state.telemetry().function_labels(&key.tenant, &key.function);
    let version = if function.value.as_str() == hearth_telemetry::OTHER {
        0
    } else {
        key.version
    };
    [tenant, function, KeyValue::new("version", i64::from(version))]
}

impl Invoker {
    /// Registers the observed instruments; they read the invoker's state at
    /// each scrape (through a weak reference, so they never keep it alive).
    pub fn observe(self: &Arc<Self>) {
        register(self);
    }
}

fn register(state: &Arc<Invoker>) {
    let meter = state.telemetry().meter();
    let weak = Arc::downgrade(state);

    let s = weak.clone();
    let _instances = meter
        .u64_observable_gauge("hearth.instances")
        .with_description("Instances per function, idle (warm) or busy")
        .with_callback(move |gauge| {
            let Some(state) = Weak::upgrade(&s) else { return };
            for (key, pool) in state.pools.stats() {
                let [tenant, function, version] = function_labels(&state, &key);
                for (which, n) in [("idle", pool.idle), ("busy", pool.busy)] {
                    let labels = [
                        tenant.clone(),
                        function.clone(),
                        version.clone(),
                        KeyValue::new("state", which),
                    ];
                    gauge.observe(n as u64, &labels);
                }
            }
        })
        .build();

    let s = weak.clone();
    let _queued = meter
        .u64_observable_gauge("hearth.queue.depth")
        .with_description("Requests waiting for an instance, per function and QoS class")
        .with_callback(move |gauge| {
            let Some(state) = Weak::upgrade(&s) else { return };
            for (key, pool) in state.pools.stats() {
                let [tenant, function, version] = function_labels(&state, &key);
                for class in Qos::ALL {
                    let labels = [
                        tenant.clone(),
                        function.clone(),
                        version.clone(),
                        KeyValue::new("class", class.as_str()),
                    ];
                    gauge.observe(pool.queued[class as usize] as u64, &labels);
                }
            }
        })
        .build();

    let s = weak.clone();
    let _pool_events = meter
        .u64_observable_counter("hearth.instances.events")
        .with_description("Pool events per function: warm starts (reuse), scale-downs, unloads, rejections")
        .with_callback(move |counter| {
            let Some(state) = Weak::upgrade(&s) else { return };
            for (key, pool) in state.pools.stats() {
                let [tenant, function, version] = function_labels(&state, &key);
                for (event, n) in [
                    ("warm_start", pool.warm_starts),
                    ("scale_down", pool.scale_downs),
                    ("unload", pool.unloads),
                    ("rejected", pool.rejected),
                ] {
                    let labels = [
                        tenant.clone(),
                        function.clone(),
                        version.clone(),
                        KeyValue::new("event", event),
                    ];
                    counter.observe(n, &labels);
                }
            }
        })
        .build();

    let s = weak.clone();
    let _model_memory = meter
        .u64_observable_gauge("hearth.model.memory")
        .with_unit("By")
        .with_description("Size of the models loaded on each device")
        .with_callback(move |gauge| {
            let Some(state) = Weak::upgrade(&s) else { return };
            let mut by_device = std::collections::BTreeMap::<String, u64>::new();
            for model in state.nn.cache().cached() {
                *by_device.entry(model.device.to_string()).or_default() += model.size_bytes;
            }
            by_device.insert("cpu".into(), by_device.get("cpu").copied().unwrap_or(0));
            for (device, bytes) in by_device {
                gauge.observe(bytes, &[KeyValue::new("device", device)]);
            }
        })
        .build();

    let s = weak.clone();
    let _cold_models = meter
        .u64_observable_gauge("hearth.model.cold.memory")
        .with_unit("By")
        .with_description(
            "Size of the models kept prepared in the cold tier (evicted for idleness, revived without a reload)",
        )
        .with_callback(move |gauge| {
            let Some(state) = Weak::upgrade(&s) else { return };
            gauge.observe(state.nn.cache().cold_bytes(), &[]);
        })
        .build();

    let s = weak.clone();
    let _device_busy = meter
        .f64_observable_counter("hearth.device.busy_time")
        .with_unit("s")
        .with_description("Time each device spent running models (utilisation: its rate)")
        .with_callback(move |counter| {
            let Some(state) = Weak::upgrade(&s) else { return };
            let mut by_device = std::collections::BTreeMap::<String, u64>::new();
            for model in state.nn.cache().cached() {
                *by_device.entry(model.device.to_string()).or_default() += model.busy_ns;
            }
            for (device, ns) in by_device {
                counter.observe(ns as f64 / 1e9, &[KeyValue::new("device", device)]);
            }
        })
        .build();

    let s = weak.clone();
    let _model_cache = meter
        .u64_observable_counter("hearth.model.cache.requests")
        .with_description(
            "Model look-ups by guests and warm-ups: hits, misses served from the cold tier, and misses that loaded the model",
        )
        .with_callback(move |counter| {
            let Some(state) = Weak::upgrade(&s) else { return };
            let cache = state.nn.cache();
            let (gets, loads, revivals) = (cache.gets(), cache.loads(), cache.revivals());
            let hits = gets.saturating_sub(loads).saturating_sub(revivals);
            counter.observe(hits, &[KeyValue::new("result", "hit")]);
            counter.observe(revivals, &[KeyValue::new("result", "cold")]);
            counter.observe(loads, &[KeyValue::new("result", "miss")]);
        })
        .build();

    let s = weak.clone();
    let _shadows_skipped = meter
        .u64_observable_counter("hearth.shadow.skipped")
        .with_description("Shadow copies not run because --max-shadow-runs copies were already running")
        .with_callback(move |counter| {
            let Some(state) = Weak::upgrade(&s) else { return };
            counter.observe(state.shadows_skipped.load(std::sync::atomic::Ordering::Relaxed), &[]);
        })
        .build();

    let s = weak.clone();
    let _inference_cache = meter
        .u64_observable_counter("hearth.inference.cache.requests")
        .with_description("Compute calls to models with an inference cache: answered from it (hit) or run (miss)")
        .with_callback(move |counter| {
            let Some(state) = Weak::upgrade(&s) else { return };
            let (hits, misses) = state.nn.inference_cache_counts();
            counter.observe(hits, &[KeyValue::new("result", "hit")]);
            counter.observe(misses, &[KeyValue::new("result", "miss")]);
        })
        .build();

    let s = weak.clone();
    let _unsynced = meter
        .u64_observable_gauge("hearth.usage.unsynced")
        .with_description("Usage records written to the journal and not yet fsynced")
        .with_callback(move |gauge| {
            let Some(state) = Weak::upgrade(&s) else { return };
            let Some(log) = state.usage() else { return };
            gauge.observe(log.stats().unsynced(), &[]);
        })
        .build();

    let s = weak.clone();
    let _since_sync = meter
        .f64_observable_gauge("hearth.usage.since_sync")
        .with_unit("s")
        .with_description("Time since the usage journal was last fsynced (0 with nothing waiting)")
        .with_callback(move |gauge| {
            let Some(state) = Weak::upgrade(&s) else { return };
            let Some(log) = state.usage() else { return };
            let stats = log.stats();
            let last = stats.last_sync_us.load(std::sync::atomic::Ordering::Acquire);
            let seconds = if stats.unsynced() == 0 || last == 0 {
                0.0
            } else {
                let now = u64::try_from(crate::now_us()).unwrap_or(0);
                now.saturating_sub(last) as f64 / 1e6
            };
            gauge.observe(seconds, &[]);
        })
        .build();

    let s = weak;
    let _usage = meter
        .u64_observable_counter("hearth.usage.log")
        .with_description("Usage log: records and transactions ingested, journal fsyncs, failed writes")
        .with_callback(move |counter| {
            let Some(state) = Weak::upgrade(&s) else { return };
            let Some(log) = state.usage() else { return };
            let stats = log.stats();
            use std::sync::atomic::Ordering::Relaxed;
            for (what, n) in [
                ("records", stats.records.load(Relaxed)),
                ("commits", stats.commits.load(Relaxed)),
                ("syncs", stats.syncs.load(Relaxed)),
                ("failures", stats.failures.load(Relaxed)),
            ] {
                counter.observe(n, &[KeyValue::new("kind", what)]);
            }
        })
        .build();
}
