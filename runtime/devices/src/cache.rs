//! The warm model cache: each model content loaded once, shared by all.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::OnceCell;

use crate::{BatchConfig, Batcher, DeviceError, DeviceId, DevicePool, Placement, PreparedModel, Result};

/// Default idle time after which an unused model is unloaded.
pub const DEFAULT_MODEL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default memory budget for loaded models (by model file size).
pub const DEFAULT_MODEL_MEMORY_BUDGET: u64 = 8 << 30;
/// Default room for the cold tier: CPU models evicted for idleness, kept
/// prepared (by model file size).
pub const DEFAULT_MODEL_COLD_BUDGET: u64 = 1 << 30;

/// Cache policy.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Unused models are unloaded after this long.
    pub idle_timeout: Duration,
    /// Least recently used unused models are unloaded above this many bytes
    /// on one device.
    pub memory_budget: u64,
    /// Batching of every model's compute calls.
    pub batch: BatchConfig,
    /// The cold tier's room, in bytes (by model file size): a CPU model
    /// evicted for idleness keeps its parsed, optimised plans there, so it
    /// comes back without reading or optimising anything; the least
    /// recently evicted go first, and all of them whenever instances need
    /// the memory ([`ModelCache::drop_cold`]). 0 turns the tier off.
    pub cold_budget: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            idle_timeout: DEFAULT_MODEL_IDLE_TIMEOUT,
            memory_budget: DEFAULT_MODEL_MEMORY_BUDGET,
            batch: BatchConfig::default(),
            cold_budget: DEFAULT_MODEL_COLD_BUDGET,
        }
    }
}

/// A CPU model evicted for idleness, still prepared.
#[derive(Debug)]
struct ColdModel {
    key: SlotKey,
    model: Arc<PreparedModel>,
    /// Its runs' mean time when it was evicted: a revived model's first
    /// run of a known-short model runs inline, as before the eviction,
    /// instead of paying a blocking-pool hop to learn it again.
    mean_run_ns: u64,
}

/// A model warm on its device. Holders of an `Arc<LoadedModel>` (guest
/// graph handles) keep it from being evicted.
#[derive(Debug)]
pub struct LoadedModel {
    /// The prepared model.
    pub model: Arc<PreparedModel>,
    /// Where it runs.
    pub device: DeviceId,
    /// Its batcher.
    pub batcher: Batcher,
    /// Content key (SHA-256 of the ONNX file).
    pub key: String,
    /// The placement it was asked for.
    pub placement: Placement,
    /// GPU room it holds, given back when it is evicted.
    _reservation: Option<crate::GpuReservation>,
    /// Brought back from the cold tier rather than loaded.
    revived: bool,
}

/// A model content and the placement asked for: the same file wished on
/// different devices is two loaded models.
type SlotKey = (String, Placement);

#[derive(Debug)]
struct Slot {
    cell: OnceCell<Arc<LoadedModel>>,
    last_used_ms: AtomicU64,
}

/// What `/v1/status` shows for one cached model.
#[derive(Debug, Clone)]
pub struct CachedModel {
    /// Content key.
    pub key: String,
    /// Placement asked for.
    pub placement: Placement,
    /// Device.
    pub device: DeviceId,
    /// Model file size.
    pub size_bytes: u64,
    /// Handles held by guests right now.
    pub users: usize,
    /// Runs and calls served.
    pub runs: u64,
    /// Calls served.
    pub calls: u64,
    /// Time its device spent running it, in nanoseconds (measured on GPUs,
    /// estimated from run times on the CPU).
    pub busy_ns: u64,
}

/// Loads models once and keeps them warm.
#[derive(Debug)]
pub struct ModelCache {
    devices: DevicePool,
    config: CacheConfig,
    slots: DashMap<SlotKey, Arc<Slot>>,
    /// The cold tier, least recently evicted first.
    cold: std::sync::Mutex<Vec<ColdModel>>,
    epoch: Instant,
    loads: AtomicU64,
    revivals: AtomicU64,
    gets: AtomicU64,
}

impl ModelCache {
    /// An empty cache over `devices`.
    pub fn new(devices: DevicePool, config: CacheConfig) -> Arc<ModelCache> {
        Arc::new(ModelCache {
            devices,
            config,
            slots: DashMap::new(),
            cold: std::sync::Mutex::new(Vec::new()),
            epoch: Instant::now(),
            loads: AtomicU64::new(0),
            revivals: AtomicU64::new(0),
            gets: AtomicU64::new(0),
        })
    }

    /// The devices models are placed on.
    pub fn devices(&self) -> &DevicePool {
        &self.devices
    }

    /// The model with content `key`, stored at `path`: warm if loaded, else
    /// loaded now (once, however many callers ask at the same time).
    pub async fn get(&self, key: &str, path: &Path, placement: Placement) -> Result<Arc<LoadedModel>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let slot_key = (key.to_owned(), placement);
        let slot = self
            .slots
            .entry(slot_key.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    cell: OnceCell::new(),
                    last_used_ms: AtomicU64::new(0),
                })
            })
            .clone();
        let mut loaded_here = false;
        let loaded = slot
            .cell
            .get_or_try_init(|| {
                loaded_here = true;
                self.load(key, path.to_owned(), placement)
            })
            .await;
        let loaded = match loaded {
            Ok(loaded) => loaded.clone(),
            Err(err) => {
                // Do not cache failures: a fixed blob may load next time.
                self.slots.remove_if(&slot_key, |_, s| Arc::ptr_eq(s, &slot));
                return Err(err);
            }
        };
        // Counted once the model is in its slot, so whoever sees the count
        // also sees the model (`loaded` lists it).
        if loaded_here {
            let counter = if loaded.revived { &self.revivals } else { &self.loads };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        slot.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        Ok(loaded)
    }

    async fn load(&self, key: &str, path: PathBuf, placement: Placement) -> Result<Arc<LoadedModel>> {
        if let Some(ColdModel { model, mean_run_ns, .. }) = self.take_cold(&(key.to_owned(), placement)) {
            let (device, reservation) = self.devices.place(placement, model.size_bytes())?;
            // Placed on the CPU again (a GPU that appeared since would get
            // a fresh load): no read, no parse, no optimisation.
            if device.id() == DeviceId::Cpu {
                tracing::debug!(model = key, "model revived from the cold tier");
                let batcher = Batcher::new(model.clone(), self.config.batch, lanes(DeviceId::Cpu));
                batcher.stats().mean_run_ns.store(mean_run_ns, Ordering::Relaxed);
                return Ok(Arc::new(LoadedModel {
                    batcher,
                    model,
                    device: DeviceId::Cpu,
                    key: key.to_owned(),
                    placement,
                    _reservation: reservation,
                    revived: true,
                }));
            }
        }
        let devices = self.devices.clone();
        let started = Instant::now();
        let (model, id, reservation) = tokio::task::spawn_blocking(move || {
            let bytes =
                std::fs::read(&path).map_err(|e| DeviceError::InvalidModel(format!("{}: {e}", path.display())))?;
            let (device, reservation) = devices.place(placement, bytes.len() as u64)?;
            Ok::<_, DeviceError>((device.prepare(&bytes)?, device.id(), reservation))
        })
        .await
        .map_err(|_| DeviceError::Unavailable)??;
        // Only a load can push the cache over its budget, so the budget is
        // enforced here, not on every warm `get`.
        self.enforce_budget(id, model.size_bytes());
        tracing::info!(model = key, device = %id, size_bytes = model.size_bytes(), load_ms = started.elapsed().as_millis() as u64, "model loaded");
        let model = Arc::new(model);
        Ok(Arc::new(LoadedModel {
            batcher: Batcher::new(model.clone(), self.config.batch, lanes(id)),
            model,
            device: id,
            key: key.to_owned(),
            placement,
            _reservation: reservation,
            revived: false,
        }))
    }

    /// Models loaded since start (a model loaded, evicted and loaded again
    /// counts twice).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Models brought back from the cold tier since start (not counted in
    /// [`ModelCache::loads`]: nothing was read or prepared).
    pub fn revivals(&self) -> u64 {
        self.revivals.load(Ordering::Relaxed)
    }

    /// Model look-ups since start (cache hits are `gets() - loads() -
    /// revivals()`).
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::Relaxed)
    }

    /// Bytes of the models loaded on `device` (by model file size), the
    /// cold tier's with the CPU's, without listing them: cheap enough for
    /// every cold start.
    pub fn loaded_bytes(&self, device: DeviceId) -> u64 {
        let warm = self.warm_bytes(device);
        match device {
            DeviceId::Cpu => warm + self.cold_bytes(),
            DeviceId::Cuda(_) => warm,
        }
    }

    /// Bytes of the warm models on `device`: what `--model-memory-mb`
    /// bounds (the cold tier has its own room).
    fn warm_bytes(&self, device: DeviceId) -> u64 {
        self.slots.iter().filter_map(|e| on_device(e.value(), device)).sum()
    }

    /// Bytes of the models in the cold tier (by model file size).
    pub fn cold_bytes(&self) -> u64 {
        self.cold_tier().iter().map(|c| c.model.size_bytes()).sum()
    }

    /// Empties the cold tier (something else needs the memory); returns
    /// the bytes it held.
    pub fn drop_cold(&self) -> u64 {
        let gone = std::mem::take(&mut *self.cold_tier());
        let bytes = gone.iter().map(|c| c.model.size_bytes()).sum();
        if bytes > 0 {
            tracing::info!(models = gone.len(), bytes, "cold models dropped: memory needed");
        }
        bytes
    }

    fn cold_tier(&self) -> std::sync::MutexGuard<'_, Vec<ColdModel>> {
        self.cold.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_cold(&self, key: &SlotKey) -> Option<ColdModel> {
        let mut cold = self.cold_tier();
        let at = cold.iter().position(|c| &c.key == key)?;
        Some(cold.remove(at))
    }

    /// Keeps an idle-evicted CPU model prepared in the cold tier, making
    /// room by dropping the least recently evicted.
    fn park_cold(&self, key: SlotKey, loaded: &LoadedModel) {
        let size = loaded.model.size_bytes();
        if loaded.device != DeviceId::Cpu || size > self.config.cold_budget {
            return;
        }
        let mut cold = self.cold_tier();
        cold.retain(|c| c.key != key);
        let mut total: u64 = cold.iter().map(|c| c.model.size_bytes()).sum::<u64>() + size;
        while total > self.config.cold_budget && !cold.is_empty() {
            total -= cold.remove(0).model.size_bytes();
        }
        cold.push(ColdModel {
            key,
            model: loaded.model.clone(),
            mean_run_ns: loaded.batcher.stats().mean_run_ns.load(Ordering::Relaxed),
        });
    }

    /// The models now warm.
    pub fn cached(&self) -> Vec<CachedModel> {
        let mut models: Vec<CachedModel> = self
            .slots
            .iter()
            .filter_map(|entry| {
                let loaded = entry.value().cell.get()?;
                Some(CachedModel {
                    key: loaded.key.clone(),
                    placement: loaded.placement,
                    device: loaded.device,
                    size_bytes: loaded.model.size_bytes(),
                    users: Arc::strong_count(loaded) - 1,
                    runs: loaded.batcher.stats().runs.load(Ordering::Relaxed),
                    calls: loaded.batcher.stats().calls.load(Ordering::Relaxed),
                    busy_ns: loaded.batcher.busy_ns(),
                })
            })
            .collect();
        models.sort_by(|a, b| (&a.key, a.device.to_string()).cmp(&(&b.key, b.device.to_string())));
        models
    }

    /// Unloads models nobody holds that were idle longer than the timeout;
    /// returns how many.
    pub fn evict_idle(&self) -> usize {
        self.evict_idle_older_than(self.config.idle_timeout)
    }

    /// Unloads models nobody holds that were idle at least `timeout`
    /// (CPU ones to the cold tier); returns how many.
    pub fn evict_idle_older_than(&self, timeout: Duration) -> usize {
        let now = self.now_ms();
        let timeout = timeout.as_millis() as u64;
        let mut evicted = Vec::new();
        self.slots.retain(|key, slot| {
            let idle = now.saturating_sub(slot.last_used_ms.load(Ordering::Relaxed)) >= timeout;
            let evict = idle && unused(slot);
            if evict {
                evicted.push((key.clone(), slot.clone()));
            }
            !evict
        });
        for (key, slot) in &evicted {
            if let Some(loaded) = slot.cell.get() {
                self.park_cold(key.clone(), loaded);
            }
        }
        evicted.len()
    }

    /// Evicts least recently used unheld models of `device` while its loaded
    /// ones plus `incoming` bytes (a model about to join) exceed the budget
    /// (which applies to each device on its own).
    fn enforce_budget(&self, device: DeviceId, incoming: u64) {
        let on_device = |slot: &Slot| on_device(slot, device);
        let total = self.warm_bytes(device) + incoming;
        if total <= self.config.memory_budget {
            return;
        }
        let mut candidates: Vec<(u64, SlotKey, u64)> = self
            .slots
            .iter()
            .filter(|e| unused(e.value()))
            .filter_map(|e| {
                let size = on_device(e.value())?;
                Some((e.last_used_ms.load(Ordering::Relaxed), e.key().clone(), size))
            })
            .collect();
        candidates.sort();
        let mut excess = total - self.config.memory_budget;
        for (_, key, size) in candidates {
            if excess == 0 {
                break;
            }
            if self.slots.remove_if(&key, |_, slot| unused(slot)).is_some() {
                tracing::info!(model = %key.0, "model evicted: over the memory budget");
                excess = excess.saturating_sub(size);
            }
        }
    }

    /// Runs [`ModelCache::evict_idle`] periodically until the cache is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = (self.config.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { break };
                let evicted = cache.evict_idle();
                if evicted > 0 {
                    tracing::info!(evicted, "idle models unloaded");
                }
            }
        });
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Loaded, and held by nobody but the cache (or still loading: never evicted).
fn unused(slot: &Slot) -> bool {
    slot.cell.get().is_some_and(|m| Arc::strong_count(m) == 1)
}

/// The size of the model loaded in `slot`, if it is on `device`.
/// Batches of one model a device runs at once: one per CPU core (tract runs
/// a model run on one thread), one on a GPU (its runs queue on the device).
fn lanes(device: DeviceId) -> usize {
    match device {
        DeviceId::Cpu => std::thread::available_parallelism().map_or(1, usize::from),
        DeviceId::Cuda(_) => 1,
    }
}

fn on_device(slot: &Slot, device: DeviceId) -> Option<u64> {
    slot.cell
        .get()
        .filter(|m| m.device == device)
        .map(|m| m.model.size_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_file(dir: &Path, seed: u64) -> PathBuf {
        let path = dir.join(format!("mlp-{seed}.onnx"));
        std::fs::write(&path, hearth_fixtures::models::mlp(seed)).expect("write");
        path
    }

    fn cache(idle_timeout: Duration, memory_budget: u64) -> Arc<ModelCache> {
        ModelCache::new(
            DevicePool::cpu_only(),
            CacheConfig {
                idle_timeout,
                memory_budget,
                batch: BatchConfig::default(),
                cold_budget: 0,
            },
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_uses_load_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = model_file(dir.path(), 1);
        let cache = cache(DEFAULT_MODEL_IDLE_TIMEOUT, DEFAULT_MODEL_MEMORY_BUDGET);
        let gets = (0..8).map(|_| {
            let (cache, path) = (cache.clone(), path.clone());
            tokio::spawn(async move { cache.get("m1", &path, Placement::Cpu).await.expect("get") })
        });
        let gets: Vec<_> = gets.collect();
        let mut models = Vec::new();
        for get in gets {
            models.push(get.await.expect("join"));
        }
        assert_eq!(cache.loads(), 1);
        assert!(models.iter().all(|m| Arc::ptr_eq(m, &models[0])));
        assert_eq!(cache.cached()[0].users, 8);
    }

    #[tokio::test]
    async fn an_idle_cpu_model_comes_back_from_the_cold_tier_without_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = model_file(dir.path(), 1);
        let cache = ModelCache::new(
            DevicePool::cpu_only(),
            CacheConfig {
                idle_timeout: Duration::ZERO,
                ..CacheConfig::default()
            },
        );
        let first = cache.get("m", &path, Placement::Cpu).await.expect("load");
        let size = first.model.size_bytes();
        drop(first);
        assert_eq!(cache.evict_idle(), 1);
        assert!(cache.cached().is_empty(), "evicted from the warm tier");
        assert_eq!(cache.cold_bytes(), size);
        assert_eq!(cache.loaded_bytes(DeviceId::Cpu), size, "and still counted");

        std::fs::remove_file(&path).expect("remove the file");
        cache
            .get("m", &path, Placement::Cpu)
            .await
            .expect("revived without its file");
        assert_eq!((cache.loads(), cache.revivals()), (1, 1));
        assert_eq!(cache.cold_bytes(), 0, "warm again, not cold too");

        assert_eq!(cache.evict_idle(), 1);
        assert_eq!(cache.drop_cold(), size, "memory needed: the cold tier goes");
        assert!(
            cache.get("m", &path, Placement::Cpu).await.is_err(),
            "then only the file brings it back"
        );
    }

    #[tokio::test]
    async fn the_cold_tier_does_not_push_warm_models_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths: Vec<PathBuf> = (1..=3).map(|seed| model_file(dir.path(), seed)).collect();
        let size = std::fs::metadata(&paths[0]).expect("size").len();
        let cache = ModelCache::new(
            DevicePool::cpu_only(),
            CacheConfig {
                memory_budget: 2 * size,
                ..CacheConfig::default()
            },
        );
        drop(cache.get("a", &paths[0], Placement::Cpu).await.expect("a"));
        cache.evict_idle_older_than(Duration::ZERO);
        assert_eq!(cache.cold_bytes(), size);
        drop(cache.get("b", &paths[1], Placement::Cpu).await.expect("b"));
        drop(cache.get("c", &paths[2], Placement::Cpu).await.expect("c"));
        assert_eq!(
            cache.cached().len(),
            2,
            "two warm models fit the warm budget, whatever is cold"
        );
    }

    #[tokio::test]
    async fn idle_unheld_models_are_evicted_held_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = cache(Duration::ZERO, DEFAULT_MODEL_MEMORY_BUDGET);
        let held = cache
            .get("a", &model_file(dir.path(), 1), Placement::Cpu)
            .await
            .expect("a");
        drop(
            cache
                .get("b", &model_file(dir.path(), 2), Placement::Cpu)
                .await
                .expect("b"),
        );
        assert_eq!(cache.evict_idle(), 1);
        let keys: Vec<String> = cache.cached().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, ["a"]);
        drop(held);
        assert_eq!(cache.evict_idle(), 1);
        assert!(cache.cached().is_empty());
    }

    #[tokio::test]
    async fn over_budget_the_least_recently_used_unheld_model_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = hearth_fixtures::models::mlp(1).len() as u64;
        let cache = cache(DEFAULT_MODEL_IDLE_TIMEOUT, size * 2);
        drop(
            cache
                .get("a", &model_file(dir.path(), 1), Placement::Cpu)
                .await
                .expect("a"),
        );
        drop(
            cache
                .get("b", &model_file(dir.path(), 2), Placement::Cpu)
                .await
                .expect("b"),
        );
        drop(
            cache
                .get("c", &model_file(dir.path(), 3), Placement::Cpu)
                .await
                .expect("c"),
        );
        let keys: Vec<String> = cache.cached().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, ["b", "c"]);
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_gpu_models_need_a_gpu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = cache(DEFAULT_MODEL_IDLE_TIMEOUT, DEFAULT_MODEL_MEMORY_BUDGET);
        let missing = dir.path().join("missing.onnx");
        assert!(matches!(
            cache.get("m", &missing, Placement::Cpu).await,
            Err(DeviceError::InvalidModel(_))
        ));
        std::fs::write(&missing, hearth_fixtures::models::mlp(1)).expect("write");
        cache
            .get("m", &missing, Placement::Cpu)
            .await
            .expect("loads once the file is there");
        assert!(matches!(
            cache.get("g", &missing, Placement::Gpu).await,
            Err(DeviceError::NoDevice(_))
        ));
    }
}
