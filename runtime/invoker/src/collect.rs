//! Garbage collection: a background task that deletes blobs and compiled
//! artifacts no version references ([`hearth_registry::Registry::collect_garbage`])
//! and counts what it removed (`hearth_gc_removed_files_total` and
//! `hearth_gc_removed_bytes_total`, by `kind`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;

use crate::Invoker;

/// Default time between collections.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(3600);
/// How old an unreferenced file must be before it goes: a deploy in
/// progress has written its blobs before its version.
pub const GC_GRACE: Duration = Duration::from_secs(3600);

/// Files and bytes removed of one kind since start.
#[derive(Debug, Default)]
struct Removed {
    files: AtomicU64,
    bytes: AtomicU64,
}

impl Removed {
    fn add(&self, collected: hearth_store::Collected) {
        self.files.fetch_add(collected.files, Ordering::Relaxed);
        self.bytes.fetch_add(collected.bytes, Ordering::Relaxed);
    }
}

/// What every collection since start removed, by `kind` label.
type Totals = [(&'static str, Removed); 3];

impl Invoker {
    /// Collects garbage every `interval` (files unreferenced for at least
    /// `grace`), from one `interval` after start.
    pub fn spawn_collector(self: &Arc<Self>, interval: Duration, grace: Duration) -> tokio::task::JoinHandle<()> {
        let totals: Arc<Totals> = Arc::new([
            ("blob", Removed::default()),
            ("compiled", Removed::default()),
            ("bucket", Removed::default()),
        ]);
        let meter = self.telemetry().meter();
        // (name, unit, description, which count); no unit for a count.
        for (name, unit, description, read) in [
            (
                "hearth.gc.removed_files",
                "",
                "Files garbage collection deleted: blobs no version references, stale compiled artifacts",
                (|r: &Removed| &r.files) as fn(&Removed) -> &AtomicU64,
            ),
            (
                "hearth.gc.removed",
                "By",
                "Bytes garbage collection freed",
                |r: &Removed| &r.bytes,
            ),
        ] {
            let totals = totals.clone();
            let _counter = meter
                .u64_observable_counter(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |counter| {
                    for (kind, removed) in totals.iter() {
                        counter.observe(read(removed).load(Ordering::Relaxed), &[KeyValue::new("kind", *kind)]);
                    }
                })
                .build();
        }
        let registry = self.registry.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                match registry.collect_garbage(grace).await {
                    Ok(gc) => {
                        totals[0].1.add(gc.blobs);
                        totals[1].1.add(gc.compiled);
                        totals[2].1.add(gc.bucket);
                        if gc.blobs.files + gc.compiled.files + gc.bucket.files > 0 {
                            tracing::info!(
                                blobs = gc.blobs.files,
                                compiled = gc.compiled.files,
                                bucket = gc.bucket.files,
                                bytes = gc.blobs.bytes + gc.compiled.bytes + gc.bucket.bytes,
                                "garbage collected"
                            );
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "garbage collection failed"),
                }
            }
        })
    }
}
