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

#[derive(Debug, Default)]
struct Removed {
    blob_files: AtomicU64,
    blob_bytes: AtomicU64,
    compiled_files: AtomicU64,
    compiled_bytes: AtomicU64,
}

impl Invoker {
    /// Collects garbage every `interval` (files unreferenced for at least
    /// `grace`), from one `interval` after start.
    pub fn spawn_collector(self: &Arc<Self>, interval: Duration, grace: Duration) -> tokio::task::JoinHandle<()> {
        let removed = Arc::new(Removed::default());
        let observed = removed.clone();
        let meter = self.telemetry.meter();
        let files = observed.clone();
        let _files = meter
            .u64_observable_counter("hearth.gc.removed_files")
            .with_description("Files garbage collection deleted: blobs no version references, stale compiled artifacts")
            .with_callback(move |counter| {
                counter.observe(
                    files.blob_files.load(Ordering::Relaxed),
                    &[KeyValue::new("kind", "blob")],
                );
                counter.observe(
                    files.compiled_files.load(Ordering::Relaxed),
                    &[KeyValue::new("kind", "compiled")],
                );
            })
            .build();
        let _bytes = meter
            .u64_observable_counter("hearth.gc.removed_bytes")
            .with_unit("By")
            .with_description("Bytes garbage collection freed")
            .with_callback(move |counter| {
                counter.observe(
                    observed.blob_bytes.load(Ordering::Relaxed),
                    &[KeyValue::new("kind", "blob")],
                );
                counter.observe(
                    observed.compiled_bytes.load(Ordering::Relaxed),
                    &[KeyValue::new("kind", "compiled")],
                );
            })
            .build();
        let registry = self.registry.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                match registry.collect_garbage(grace).await {
                    Ok(gc) => {
                        removed.blob_files.fetch_add(gc.blobs.files, Ordering::Relaxed);
                        removed.blob_bytes.fetch_add(gc.blobs.bytes, Ordering::Relaxed);
                        removed.compiled_files.fetch_add(gc.compiled.files, Ordering::Relaxed);
                        removed.compiled_bytes.fetch_add(gc.compiled.bytes, Ordering::Relaxed);
                        if gc.blobs.files + gc.compiled.files > 0 {
                            tracing::info!(
                                blobs = gc.blobs.files,
                                compiled = gc.compiled.files,
                                bytes = gc.blobs.bytes + gc.compiled.bytes,
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
