//! Hearth's WebAssembly engine: everything between a deployed component and a
//! running `wasi:http` handler.
//!
//! - [`Engine::new`] configures wasmtime once per process: component model,
//!   async, the pooling allocator, and epoch interruption driven by a ticker
//!   thread every [`EPOCH_TICK`].
//! - [`Engine::precompile`] runs at deploy time: it validates a component,
//!   compiles it to a `.cwasm` file on disk and checks that it is a
//!   `wasi:http/proxy` component Hearth can link. Nothing is kept when it fails.
//!   With a [`CodeCacheConfig`] each function body compiled is kept, and a
//!   later compile reuses every body it shares (see [`code_cache`]).
//! - [`Engine::load`] runs on the first invocation of a component: it maps the
//!   `.cwasm` file (`deserialize_file`, no recompilation) and caches the
//!   pre-linked `ProxyPre`, shared by every later instance; it recompiles
//!   only an artifact that is missing or stale. [`Engine::load_precompiled`]
//!   only maps, for callers that must never wait on a compilation.
//! - [`Engine::invoke`] runs one request on a warm [`Instance`] or a fresh
//!   one, with the function's memory limit and deadline, and hands the
//!   instance back for reuse when the guest ends cleanly (see [`invoke`]).
//! - [`Engine::unload`] drops a component's pre-linking when its function
//!   scales to zero and parks the deserialized [`Component`] (its code stays
//!   in the mapped file; the metadata costs a few hundred KiB of heap), so the
//!   next [`Engine::load`] only pre-links again instead of deserializing the
//!   `.cwasm`. [`Engine::retain_parked`] forgets parked components no version
//!   references any more.
//!
//! Guests get WASI p2 with no filesystem, no environment, no sockets, captured
//! stdout/stderr, `wasi:http` with outgoing requests only to the origins their
//! manifest lists and only to addresses the [`OutboundPolicy`] permits, and `wasi:nn`
//! over the shared model cache (only the models their function names).

mod budget;
mod code_cache;
mod invoke;
mod outbound;
mod pre_init;
mod state;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use hearth_bridge::NnHost;
use hearth_devices::{CacheConfig, DevicePool, ModelCache};
use wasmtime::component::{Component, Linker};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

pub use budget::machine_memory_bytes;
pub use invoke::{Finished, Grants, Instance, InvokeError, Limits, Report, ResponseBody, Start};
pub use outbound::{Denied, OutboundPolicy};
pub use pre_init::{INIT_EXPORT, StartUp};
use state::HostState;
/// The error type request bodies passed to [`Engine::invoke`] fail with.
pub use wasmtime_wasi_http::Error as BodyError;

/// How often the epoch advances. Deadlines are checked, and long-running
/// guests yield to other tasks, at this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Default number of instances that may exist at once, across all functions.
pub const DEFAULT_MAX_INSTANCES: u32 = 1000;
/// Default largest linear memory any function may be given, in MiB.
pub const DEFAULT_MAX_MEMORY_MB: u32 = 4096;

/// Default bytes of each pooled memory kept resident between instances.
pub const DEFAULT_MEMORY_KEEP_RESIDENT: usize = 4 << 20;
/// Default pooled slots decommitted per batch: one, each as its instance
/// goes, so the next fresh instance reuses the slot just left, still hot.
/// Batches of 64 (wasmtime serve's tuning) made a fresh instance per request
/// 1.23× slower here (`scripts/load-compare.sh`, configurations `fresh` and
/// `fresh-decommit-64`): deferred slots cannot be reused, so instances cycle
/// through colder ones.
pub const DEFAULT_DECOMMIT_BATCH: usize = 1;

/// Result of an engine operation.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Why preparing or loading a component failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The bytes are not a valid WebAssembly component (user error: 422).
    #[error("invalid component: {0}")]
    Invalid(String),
    /// A valid component that Hearth cannot run: missing `wasi:http`
    /// export, or imports Hearth does not provide (user error: 422).
    #[error("component cannot run on Hearth: {0}")]
    Unlinkable(String),
    /// The compiled artifact or the component file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Wasmtime itself failed (configuration, compilation of a valid module).
    #[error("wasmtime: {0}")]
    Wasmtime(String),
}

/// Process-wide engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where compiled `.cwasm` artifacts are kept.
    pub compiled_dir: PathBuf,
    /// Use the pooling allocator (fast instantiation); off only for comparison.
    pub pooling: bool,
    /// Instances that may exist at once (pool size).
    pub max_instances: u32,
    /// Largest memory limit a function may have, in MiB.
    pub max_memory_mb: u32,
    /// Bytes of each pooled linear memory (and, up to 64 KiB, of each
    /// table) kept resident, zeroed in place, when an instance is dropped,
    /// instead of being decommitted.
    pub memory_keep_resident: usize,
    /// Pooled slots decommitted together in one batch of `madvise` calls
    /// (1: each as its instance goes).
    pub decommit_batch: usize,
    /// Map a component's initial memory copy-on-write from its compiled
    /// image instead of copying its data segments into each instance.
    pub memory_init_cow: bool,
    /// The `wasi:nn` host (and its warm models) every instance shares.
    pub nn: NnHost,
    /// Which addresses guests may reach at all (on top of each manifest's
    /// listed origins).
    pub outbound: OutboundPolicy,
    /// Bytes instances (each counted at its memory limit) and CPU models
    /// may take together; `None` is unbounded (see [`budget`]).
    pub memory_budget: Option<u64>,
    /// Pre-initialise components that export [`INIT_EXPORT`] when they are
    /// compiled (see [`StartUp`]); off only for comparison.
    pub pre_initialise: bool,
    /// Cranelift's per-function cache on disk; `None` compiles every
    /// function of every component afresh.
    pub code_cache: Option<CodeCacheConfig>,
}

/// Where compiled function bodies are kept for later compiles, and how
/// much of them: deploys share most of their code (every Python handler
/// bundles the same interpreter), so a body is compiled once per node.
#[derive(Debug, Clone)]
pub struct CodeCacheConfig {
    /// The cache's folder (one subfolder per engine build).
    pub dir: PathBuf,
    /// Bytes it may hold; the least recently used bodies go first.
    pub max_bytes: u64,
}

impl EngineConfig {
    /// Defaults with compiled artifacts under `compiled_dir`.
    pub fn new(compiled_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            compiled_dir: compiled_dir.into(),
            pooling: true,
            max_instances: DEFAULT_MAX_INSTANCES,
            max_memory_mb: DEFAULT_MAX_MEMORY_MB,
            memory_keep_resident: DEFAULT_MEMORY_KEEP_RESIDENT,
            decommit_batch: DEFAULT_DECOMMIT_BATCH,
            memory_init_cow: true,
            nn: NnHost::new(ModelCache::new(DevicePool::cpu_only(), CacheConfig::default())),
            outbound: OutboundPolicy::default(),
            memory_budget: None,
            pre_initialise: true,
            code_cache: None,
        }
    }
}

/// A compiled, pre-linked function, ready to instantiate. Shared by every
/// instance of every function version whose component has the same content.
#[derive(Clone)]
pub struct Prepared {
    pre: ProxyPre<HostState>,
    /// How its instances start, when this process compiled it (a component
    /// mapped from an earlier process's artifact does not say).
    start_up: Option<Arc<StartUp>>,
}

impl Prepared {
    /// How fresh instances of this component start, if known (see
    /// [`Engine::precompile`]).
    pub fn start_up(&self) -> Option<&StartUp> {
        self.start_up.as_deref()
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

/// The engine. Cheap to clone; clones share compiled code and the ticker.
#[derive(Clone, Debug)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    config: EngineConfig,
    /// Pre-linked components by content key (the component's digest).
    loaded: DashMap<String, Prepared>,
    /// Deserialized components of functions scaled to zero, by content key:
    /// not pre-linked, no instance, but no `.cwasm` to read again either.
    parked: DashMap<String, Parked>,
    compat: String,
    budget: Option<Arc<budget::MemoryBudget>>,
    code_cache: Option<Arc<code_cache::CodeCache>>,
}

/// A deserialized component whose pre-linking was dropped.
struct Parked {
    component: Component,
    start_up: Option<Arc<StartUp>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("loaded", &self.loaded.len())
            .field("parked", &self.parked.len())
            .finish_non_exhaustive()
    }
}

fn wasmtime_err(err: wasmtime::Error) -> EngineError {
    EngineError::Wasmtime(error_chain(&err))
}

/// Renders an error and its causes on one line, outermost first.
pub(crate) fn error_chain(err: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

impl Engine {
    /// Configures wasmtime and starts the epoch ticker.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        std::fs::create_dir_all(&config.compiled_dir).map_err(|source| EngineError::Io {
            path: config.compiled_dir.clone(),
            source,
        })?;
        let mut wasm = wasmtime::Config::new();
        wasm.wasm_component_model(true);
        wasm.epoch_interruption(true);
        wasm.cranelift_opt_level(wasmtime::OptLevel::Speed);
        wasm.memory_init_cow(config.memory_init_cow);
        if config.pooling {
            let n = config.max_instances.max(1);
            let mut pool = wasmtime::PoolingAllocationConfig::new();
            pool.total_component_instances(n)
                // A component made by a Rust toolchain has a few core
                // instances, memories and tables; leave headroom for larger ones.
                .total_core_instances(n.saturating_mul(8))
                .total_memories(n.saturating_mul(2))
                .total_tables(n.saturating_mul(4))
                .total_stacks(n)
                .max_memory_size(config.max_memory_mb as usize * 1024 * 1024)
                // Keep the first pages of each slot resident (zeroed in place):
                // fresh instances then cost far fewer page faults and madvise
                // calls (measured in FACTS.md); decommit the rest at once
                // (see DEFAULT_DECOMMIT_BATCH).
                .linear_memory_keep_resident(config.memory_keep_resident)
                .table_keep_resident(config.memory_keep_resident.min(64 << 10))
                .decommit_batch_size(config.decommit_batch.max(1));
            wasm.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let code_cache = config
            .code_cache
            .as_ref()
            .map(|c| Arc::new(code_cache::CodeCache::new(c.dir.clone(), c.max_bytes)));
        if let Some(cache) = &code_cache {
            wasm.enable_incremental_compilation(cache.clone())
                .map_err(wasmtime_err)?;
        }
        let engine = wasmtime::Engine::new(&wasm).map_err(wasmtime_err)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wasmtime_err)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(wasmtime_err)?;
        NnHost::add_to_linker(&mut linker, |state: &mut HostState| &mut state.nn).map_err(wasmtime_err)?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());
        if let Some(cache) = &code_cache {
            cache.open(&compat);
        }

        spawn_ticker(engine.weak())?;
        let budget = config.memory_budget.map(budget::MemoryBudget::new);

        Ok(Engine {
            inner: Arc::new(Inner {
                engine,
                linker,
                config,
                budget,
                loaded: DashMap::new(),
                parked: DashMap::new(),
                compat,
                code_cache,
            }),
        })
    }

    /// The underlying wasmtime engine, configured as Hearth runs guests (for
    /// benches and embedders that need raw wasmtime next to Hearth's).
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner.engine
    }

    /// The settings this engine was made with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Where the compiled artifact for a component with this key lives. The
    /// name includes the engine's compatibility hash, so an upgrade that
    /// changes code generation recompiles instead of loading stale code.
    pub fn compiled_path(&self, key: &str) -> PathBuf {
        self.inner
            .config
            .compiled_dir
            .join(format!("{key}-{}.cwasm", self.inner.compat))
    }

    /// The compiled artifacts on disk that no longer serve: compiled by
    /// another engine version (their compatibility hash differs), or of a
    /// component not in `keep` (staging files of a crashed compile too).
    /// Returns their paths (the caller removes those old enough).
    pub fn stale_artifacts(&self, keep: &std::collections::HashSet<String>) -> Vec<PathBuf> {
        let suffix = format!("-{}.cwasm", self.inner.compat);
        let Ok(entries) = std::fs::read_dir(&self.inner.config.compiled_dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                !name.strip_suffix(&suffix).is_some_and(|key| keep.contains(key))
            })
            .map(|entry| entry.path())
            .collect()
    }

    /// Validates and compiles the component at `component` (pre-initialised
    /// when it can be: see [`StartUp`]), writes the artifact for `key`, and
    /// checks that Hearth can link and serve it. Blocking (compilation takes
    /// milliseconds to seconds): call it from a blocking thread. On error
    /// nothing is left on disk. The result is cached for `key`.
    pub fn precompile(&self, key: &str, component: &Path) -> Result<Prepared> {
        let bytes = std::fs::read(component).map_err(|source| EngineError::Io {
            path: component.to_owned(),
            source,
        })?;
        if !is_component_binary(&bytes) {
            return Err(EngineError::Invalid(describe_non_component(&bytes)));
        }
        let plain = |start_up| {
            let compiled = self
                .compile(key, &bytes)
                .map_err(|e| EngineError::Invalid(error_chain(&e)))?;
            self.install(key, &compiled, start_up)
        };
        if !self.inner.config.pre_initialise {
            return plain(StartUp::Plain {
                reason: "pre-initialisation is off on this server".to_owned(),
            });
        }
        let (snapshot, start_up) = pre_init::pre_initialise(&self.inner.engine, &bytes);
        let Some(snapshot) = snapshot else {
            return plain(start_up);
        };
        let compiled = self.compile(key, &snapshot).map_err(wasmtime_err);
        match compiled.and_then(|compiled| self.install(key, &compiled, StartUp::Snapshot)) {
            Ok(prepared) => Ok(prepared),
            Err(err) => {
                let reason = format!("its snapshot does not run: {err}");
                tracing::warn!(key, %reason, "pre-initialisation dropped");
                plain(StartUp::Plain { reason })
            }
        }
    }

    /// Compiles `wasm` to a `.cwasm` image, through the code cache when
    /// there is one (its new bodies written as one pack afterwards, on a
    /// thread of their own: the deploy does not wait for the disk).
    fn compile(&self, key: &str, wasm: &[u8]) -> wasmtime::Result<Vec<u8>> {
        let Some(cache) = &self.inner.code_cache else {
            return self.inner.engine.precompile_component(wasm);
        };
        let (hits, misses) = cache.counts();
        let compiled = self.inner.engine.precompile_component(wasm);
        let (now_hits, now_misses) = cache.counts();
        tracing::debug!(
            key,
            reused = now_hits - hits,
            compiled = now_misses - misses,
            "function bodies from the code cache"
        );
        let flush = cache.clone();
        let spawned = std::thread::Builder::new()
            .name("hearth-code-cache".into())
            .spawn(move || flush.flush());
        if spawned.is_err() {
            cache.flush();
        }
        compiled
    }

    /// Function bodies compiled by this engine that later compiles found in
    /// its code cache, and those they did not (zeros without one).
    pub fn code_cache_counts(&self) -> (u64, u64) {
        self.inner.code_cache.as_ref().map_or((0, 0), |cache| cache.counts())
    }

    /// Writes `compiled` as the artifact for `key` and loads it.
    fn install(&self, key: &str, compiled: &[u8], start_up: StartUp) -> Result<Prepared> {
        let target = self.compiled_path(key);
        // Unique per call: two deploys of the same content may compile at once.
        static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = STAGING_SEQ.fetch_add(1, Ordering::Relaxed);
        let staging = target.with_extension(format!("tmp-{}-{seq}", std::process::id()));
        let io = |source| EngineError::Io {
            path: target.clone(),
            source,
        };
        // On disk before it is used and mapped: synced, renamed, and the
        // rename synced with its directory (a crash leaves the old file or
        // the whole new one, never a torn one under the final name).
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&staging).map_err(io)?;
            file.write_all(compiled).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&staging, &target).map_err(io)?;
        if let Some(dir) = target.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        match self.load_compiled(&target) {
            Ok(mut prepared) => {
                prepared.start_up = Some(Arc::new(start_up));
                self.inner.parked.remove(key);
                self.inner.loaded.insert(key.to_owned(), prepared.clone());
                Ok(prepared)
            }
            Err(err) => {
                let _ = std::fs::remove_file(&target);
                Err(err)
            }
        }
    }

    /// The pre-linked component for `key`: cached, or mapped from its
    /// `.cwasm` (recompiled from `component` if the artifact is missing or was
    /// made by another wasmtime). Blocking on a cache miss.
    pub fn load(&self, key: &str, component: &Path) -> Result<Prepared> {
        self.load_precompiled(key).or_else(|err| {
            tracing::info!(key, error = %err, "compiled artifact unusable, recompiling");
            self.precompile(key, component)
        })
    }

    /// The pre-linked component for `key`: cached, pre-linked again from
    /// its parked component, or mapped from its `.cwasm`; never compiles (an
    /// error if the artifact is missing or was made by another wasmtime).
    /// Blocks on a cache miss: about 0.01 ms to pre-link a parked `echo`,
    /// 0.13 ms to map, deserialize and pre-link it (`benches/reload.rs`).
    pub fn load_precompiled(&self, key: &str) -> Result<Prepared> {
        if let Some(prepared) = self.inner.loaded.get(key) {
            return Ok(prepared.clone());
        }
        let prepared = match self.inner.parked.remove(key) {
            Some((_, parked)) => Prepared {
                start_up: parked.start_up,
                ..self.prelink(&parked.component)?
            },
            None => self.load_compiled(&self.compiled_path(key))?,
        };
        self.inner.loaded.insert(key.to_owned(), prepared.clone());
        Ok(prepared)
    }

    /// Drops the pre-linked component for `key` (its function scaled to
    /// zero) and parks its deserialized [`Component`], so the next
    /// [`Engine::load`] only pre-links it again. Instances still alive keep
    /// their own reference. Returns whether it was loaded.
    pub fn unload(&self, key: &str) -> bool {
        match self.inner.loaded.remove(key) {
            Some((key, prepared)) => {
                let parked = Parked {
                    component: prepared.pre.instance_pre().component().clone(),
                    start_up: prepared.start_up,
                };
                self.inner.parked.insert(key, parked);
                true
            }
            None => false,
        }
    }

    /// Forgets the parked components whose key is not in `keep` (no
    /// deployed version references them any more).
    pub fn retain_parked(&self, keep: &std::collections::HashSet<String>) {
        self.inner.parked.retain(|key, _| keep.contains(key));
    }

    /// Components parked by [`Engine::unload`] (functions scaled to zero
    /// that reload without reading their `.cwasm`).
    pub fn parked(&self) -> usize {
        self.inner.parked.len()
    }

    /// Whether the component for `key` is compiled and in memory, loaded or
    /// parked (a deploy of the same content compiles nothing).
    pub fn is_compiled(&self, key: &str) -> bool {
        self.inner.loaded.contains_key(key) || self.inner.parked.contains_key(key)
    }

    /// How fresh instances of the component for `key` start, if this
    /// process compiled it.
    pub fn start_up(&self, key: &str) -> Option<StartUp> {
        match self.inner.loaded.get(key) {
            Some(prepared) => prepared.start_up().cloned(),
            None => self.inner.parked.get(key)?.start_up.as_deref().cloned(),
        }
    }

    /// Whether the component for `key` is loaded.
    pub fn is_loaded(&self, key: &str) -> bool {
        self.inner.loaded.contains_key(key)
    }

    /// The cached pre-linked component for `key`, if loaded.
    pub fn cached(&self, key: &str) -> Option<Prepared> {
        self.inner.loaded.get(key).map(|p| p.clone())
    }

    fn load_compiled(&self, path: &Path) -> Result<Prepared> {
        #[expect(unsafe_code, reason = "mapping precompiled code is wasmtime's fast path")]
        // SAFETY: `deserialize_file` trusts the file to be wasmtime output for
        // a compatible engine. Hearth writes these files itself, from
        // `precompile_component` of this engine configuration, into its own
        // data directory, under a name that includes the engine's
        // compatibility hash; wasmtime additionally checks the header and
        // refuses artifacts from another version or configuration.
        let component = unsafe { Component::deserialize_file(&self.inner.engine, path) }.map_err(wasmtime_err)?;
        self.prelink(&component)
    }

    /// Resolves `component`'s imports against Hearth's linker and checks it
    /// serves `wasi:http`.
    fn prelink(&self, component: &Component) -> Result<Prepared> {
        let instance_pre = self
            .inner
            .linker
            .instantiate_pre(component)
            .map_err(|e| EngineError::Unlinkable(error_chain(&e)))?;
        let pre = ProxyPre::new(instance_pre).map_err(|e| {
            EngineError::Unlinkable(format!(
                "it must export `wasi:http/incoming-handler` (a wasi:http/proxy component): {}",
                error_chain(&e)
            ))
        })?;
        Ok(Prepared { pre, start_up: None })
    }
}

/// Whether `bytes` start like a component (as opposed to a core module or
/// not WebAssembly at all); wasmtime's own error for a core module is cryptic.
fn is_component_binary(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [0x0d, 0x00, 0x01, 0x00]
}

fn describe_non_component(bytes: &[u8]) -> String {
    if bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [0x01, 0x00, 0x00, 0x00] {
        "this is a core WebAssembly module, not a component; build for `wasm32-wasip2` \
         (or wrap it with `wasm-tools component new`)"
            .to_owned()
    } else if bytes.is_empty() {
        "the file is empty".to_owned()
    } else {
        "not a WebAssembly file (no `\\0asm` header)".to_owned()
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is gone
/// (the thread holds only a weak reference, so it ends with the last clone).
fn spawn_ticker(engine: wasmtime::EngineWeak) -> Result<()> {
    std::thread::Builder::new()
        .name("hearth-epoch".into())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map(drop)
        .map_err(|source| EngineError::Io {
            path: PathBuf::from("<epoch ticker thread>"),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_artifact_is_recompiled_only_by_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::new(EngineConfig::new(dir.path())).expect("engine");
        let component = Path::new(hearth_fixtures::ECHO);
        engine.precompile("echo", component).expect("precompile");

        engine.unload("echo");
        engine.load_precompiled("echo").expect("the artifact is mapped again");
        assert!(engine.is_loaded("echo"));

        engine.unload("echo");
        engine.retain_parked(&Default::default());
        std::fs::remove_file(engine.compiled_path("echo")).expect("remove the artifact");
        assert!(
            engine.load_precompiled("echo").is_err(),
            "load_precompiled never compiles"
        );
        assert!(!engine.is_loaded("echo"));
        engine.load("echo", component).expect("load recompiles");
        assert!(engine.compiled_path("echo").exists(), "and writes the artifact again");
    }

    #[test]
    fn a_component_that_shares_code_with_an_earlier_one_compiles_only_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = EngineConfig::new(dir.path().join("compiled"));
        config.code_cache = Some(CodeCacheConfig {
            dir: dir.path().join("code-cache"),
            max_bytes: 1 << 30,
        });
        // One compile per deploy (a snapshot would be a second, with code
        // of its own).
        config.pre_initialise = false;
        let engine = Engine::new(config).expect("engine");
        let first = std::fs::read(hearth_fixtures::ECHO).expect("echo");
        engine
            .precompile("first", Path::new(hearth_fixtures::ECHO))
            .expect("first compile");
        // (Bodies that repeat within one component are reused already.)
        let (hits, compiled) = engine.code_cache_counts();
        assert!(compiled > 0);

        // The same code under another digest (a custom section appended).
        let mut second = first;
        second.extend_from_slice(&[0, 12, 3, b't', b'a', b'g', 1, 2, 3, 4, 5, 6, 7, 8]);
        let path = dir.path().join("second.wasm");
        std::fs::write(&path, &second).expect("write");
        engine.precompile("second", &path).expect("second compile");
        // A few bodies cranelift cannot serialize are compiled every time.
        let (hits_after, compiled_after) = engine.code_cache_counts();
        let again = compiled_after - compiled;
        assert!(again * 5 < compiled, "{again} of {compiled} bodies compiled again");
        assert!(hits_after - hits >= compiled - again);
        assert!(engine.is_loaded("second"), "and the artifact loads");
    }

    #[test]
    fn a_function_scaled_to_zero_reloads_from_its_parked_component() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::new(EngineConfig::new(dir.path())).expect("engine");
        engine
            .precompile("echo", Path::new(hearth_fixtures::ECHO))
            .expect("precompile");

        assert!(engine.unload("echo"));
        assert!(!engine.is_loaded("echo"));
        assert!(engine.is_compiled("echo"));
        assert_eq!(engine.parked(), 1);
        assert_eq!(
            engine.start_up("echo"),
            Some(StartUp::Snapshot),
            "parking keeps what deploy found"
        );
        // Without its artifact: only the parked component can bring it back.
        std::fs::remove_file(engine.compiled_path("echo")).expect("remove the artifact");
        engine
            .load_precompiled("echo")
            .expect("pre-linked from the parked component");
        assert!(engine.is_loaded("echo"));
        assert_eq!(engine.parked(), 0, "a loaded component is not parked too");

        engine.unload("echo");
        engine.retain_parked(&["echo".to_owned()].into());
        assert_eq!(engine.parked(), 1, "a key still referenced stays parked");
        engine.retain_parked(&Default::default());
        assert_eq!(engine.parked(), 0, "an unreferenced one goes");
    }

    #[test]
    fn an_sdk_guest_is_pre_initialised_and_a_plain_one_says_why_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::new(EngineConfig::new(dir.path())).expect("engine");
        let hello = engine
            .precompile("hello", Path::new(hearth_fixtures::HELLO))
            .expect("hello");
        assert_eq!(hello.start_up(), Some(&StartUp::Snapshot));

        let mut config = EngineConfig::new(dir.path().join("off"));
        config.pre_initialise = false;
        let engine = Engine::new(config).expect("engine");
        let plain = engine
            .precompile("hello", Path::new(hearth_fixtures::HELLO))
            .expect("hello");
        assert!(matches!(plain.start_up(), Some(StartUp::Plain { .. })));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn models_in_the_cold_tier_give_way_to_an_instance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("mlp.onnx");
        std::fs::write(&model, hearth_fixtures::models::mlp(1)).expect("model");
        let cache = ModelCache::new(DevicePool::cpu_only(), CacheConfig::default());
        let loaded = cache
            .get("mlp", &model, hearth_devices::Placement::Cpu)
            .await
            .expect("load");
        let model_bytes = loaded.model.size_bytes();
        drop(loaded);
        cache.evict_idle_older_than(Duration::ZERO);
        assert_eq!(cache.cold_bytes(), model_bytes, "the model went to the cold tier");

        // Room for the instance, not for the instance and the cold model.
        let instance_bytes: u64 = 16 << 20;
        let mut config = EngineConfig::new(dir.path().join("compiled"));
        config.nn = NnHost::new(cache.clone());
        config.memory_budget = Some(instance_bytes + model_bytes / 2);
        let engine = Engine::new(config).expect("engine");
        let prepared = engine
            .precompile("hello", Path::new(hearth_fixtures::HELLO))
            .expect("hello");
        let limits = Limits {
            memory_bytes: instance_bytes as usize,
            timeout: Duration::from_secs(10),
            urgency: 1,
        };
        engine
            .instantiate(&prepared, limits, &Grants::default())
            .await
            .expect("the cold tier made room");
        assert_eq!(cache.cold_bytes(), 0);
    }
}
