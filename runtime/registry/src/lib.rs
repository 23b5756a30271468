//! Functions and their versions: what is deployed, and which version answers.
//!
//! The registry owns the deploy transaction (validate the manifest against the
//! server's limits, compile the component, then record the blob and the
//! version, in that order, so a failure leaves nothing behind) and the lookup
//! on every invocation ([`routes`]: which version a request names, through
//! a version number or an alias). Each function's routing and the versions
//! it served are cached in memory; a change through this process updates
//! the cache, one made by another node is announced by the store.

mod assets;
mod model_check;
mod name_key;
pub mod routes;

pub use model_check::{INVALID_MODEL_EXIT, ModelCheck};
pub use routes::Selector;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use hearth_bridge::{ModelRef, NnHost};
use hearth_devices::{DeviceError, Placement};
use hearth_engine::{Engine, EngineError, Grants, Prepared};
use hearth_manifest::{DeviceWish, Manifest, ManifestError};
use hearth_store::{
    Alias, AliasChange, AliasTarget, Artifact, ArtifactKind, BlobStore, FunctionVersion, LATEST, NewVersion, Refusal,
    StagedBlob, Store, StoreError,
};

use crate::assets::AssetDirs;
use crate::name_key::{FunctionName, NamePair};
use crate::routes::Routes;

/// Result of a registry operation.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such function (or not visible to the caller).
    #[error("function `{name}` not found in tenant `{tenant}`")]
    NotFound {
        /// Tenant asked.
        tenant: String,
        /// Function asked.
        name: String,
    },
    /// The manifest is malformed or out of bounds.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The manifest asks for something this server does not offer.
    #[error("hearth.toml: `{key}`: {reason}")]
    Unsupported {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The component is invalid or cannot be served.
    #[error("{0}")]
    Component(String),
    /// The upload carried no component bytes.
    #[error("the component is empty")]
    EmptyComponent,
    /// The upload's parts do not match the manifest's `[[models]]` and
    /// `[[files]]`.
    #[error("{0}")]
    Upload(String),
    /// A model cannot be served (not ONNX, unsupported, or no device for it).
    #[error("hearth.toml: `{key}`: {reason}")]
    Model {
        /// The manifest key at fault (`models[0].path`, `models[0].device`).
        key: String,
        /// Why.
        reason: String,
    },
    /// No such version of the function, or no such alias.
    #[error("function `{name}` has no {what}")]
    NoTarget {
        /// Function asked.
        name: String,
        /// `version 3`, `alias `prod``.
        what: String,
    },
    /// The change to versions or aliases contradicts what is stored.
    #[error("function `{name}`: {refusal}")]
    Conflict {
        /// Function asked.
        name: String,
        /// Why.
        refusal: Refusal,
    },
    /// An alias or its target is malformed.
    #[error("{0}")]
    InvalidAlias(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine failed for a reason that is not the component's fault.
    #[error("engine: {0}")]
    Engine(String),
}

impl RegistryError {
    /// Whether the store could not be reached (retry later: 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, RegistryError::Store(err) if err.is_unavailable())
    }
}

impl From<EngineError> for RegistryError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::Invalid(_) | EngineError::Unlinkable(_) => RegistryError::Component(err.to_string()),
            other => RegistryError::Engine(other.to_string()),
        }
    }
}

/// A deployed version of a function, with its parsed manifest and what its
/// instances are given.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The stored version.
    pub version: FunctionVersion,
    /// Its manifest, parsed.
    pub manifest: Manifest,
    /// Its models and asset directory.
    pub grants: Grants,
    /// Its names as shared strings, for what every invocation hands on.
    pub names: SharedNames,
    /// Its function's metric series, looked up by the first invocation
    /// that records metrics ([`hearth_telemetry::Telemetry::series`]), so
    /// that the others look nothing up.
    pub series: std::sync::OnceLock<Arc<hearth_telemetry::FunctionSeries>>,
}

impl Deployed {
    /// `version` with its parsed `manifest` and `grants`.
    pub fn new(version: FunctionVersion, manifest: Manifest, grants: Grants) -> Deployed {
        let names = SharedNames {
            tenant: Arc::from(version.tenant.as_str()),
            function: Arc::from(version.name.as_str()),
            label: Arc::from(format!("{}/{}@{}", version.tenant, version.name, version.version)),
            component: Arc::from(version.component.as_str()),
        };
        Deployed {
            version,
            manifest,
            grants,
            names,
            series: std::sync::OnceLock::new(),
        }
    }
}

/// A version's names, made once when it is loaded: each invocation hands
/// them on (pool keys, log labels) by reference count instead of copying.
#[derive(Debug, Clone)]
pub struct SharedNames {
    /// The tenant.
    pub tenant: Arc<str>,
    /// The function's name.
    pub function: Arc<str>,
    /// `tenant/function@version`, naming the version in logs.
    pub label: Arc<str>,
    /// The component's digest.
    pub component: Arc<str>,
}

/// One deploy's upload, fully received but not yet committed: the manifest
/// and a staged blob for the component and for each model and file it names.
#[derive(Debug)]
pub struct Upload {
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The component.
    pub component: StagedBlob,
    /// Models, by their `[[models]]` name.
    pub models: HashMap<String, StagedBlob>,
    /// Assets, by their `[[files]]` target.
    pub files: HashMap<String, StagedBlob>,
}

impl Upload {
    /// Checks that every model and file the manifest names arrived.
    fn check_complete(&self) -> Result<()> {
        let missing: Vec<String> = self
            .manifest
            .models
            .iter()
            .filter(|m| !self.models.contains_key(&m.name))
            .map(|m| format!("`{}{}`", MODEL_PART_PREFIX, m.name))
            .chain(
                self.manifest
                    .files
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| !self.files.contains_key(&f.target))
                    .map(|(i, f)| format!("`{FILE_PART_PREFIX}{i}` ({})", f.target)),
            )
            .collect();
        if !missing.is_empty() {
            return Err(RegistryError::Upload(format!(
                "the upload lacks part{} {} named by the manifest",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", ")
            )));
        }
        Ok(())
    }
}

/// Multipart name prefix of a model part: `model:<name>`.
pub const MODEL_PART_PREFIX: &str = "model:";
/// Multipart name prefix of an asset part: `file:<index>`, its 0-based place
/// in `[[files]]`.
pub const FILE_PART_PREFIX: &str = "file:";

/// How long a deploy waits to resolve a listed outbound host name.
const DEPLOY_RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The placement a manifest's `device` asks for.
pub fn placement(wish: DeviceWish) -> Placement {
    match wish {
        DeviceWish::Auto => Placement::Auto,
        DeviceWish::Cpu => Placement::Cpu,
        DeviceWish::Gpu => Placement::Gpu,
    }
}

/// How long stale routings are served without trying the store again after
/// it could not be reached.
const STORE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    engine: Engine,
    nn: NnHost,
    assets: AssetDirs,
    /// Each function's routing, and the versions it served. Hashed with
    /// foldhash (seeded per process, hashbrown's own default), which costs
    /// less than std's SipHash on a look-up every request makes. It does
    /// not promise resistance to chosen collisions, and needs none here:
    /// keys are inserted only for what was deployed or by authenticated
    /// callers (an anonymous request for an unknown name only looks up),
    /// and a tenant's functions are bounded. The warm path's other
    /// maps (versions, pools, tenants, metric series, response caches,
    /// verified tokens) are keyed the same way for the same reason.
    functions: Arc<DashMap<FunctionName, Arc<Routes>, foldhash::fast::RandomState>>,
    /// Counts invalidations (a change announced from elsewhere, or made
    /// here), so a routing read from the store while one happened is
    /// cached as stale.
    changes: Arc<AtomicU64>,
    /// When a stale routing may next try the store, in milliseconds since
    /// `epoch`: after the store could not be reached, stale routings are
    /// served without trying it for [`STORE_RETRY`] (a store that does not
    /// answer at all would otherwise hold every such call for the pool's
    /// connection timeout).
    store_retry_at_ms: Arc<AtomicU64>,
    epoch: std::time::Instant,
    /// Model blobs whose content was checked against their digest.
    verified: Arc<dashmap::DashSet<String>>,
    /// How a deployed model is parsed first, out of process.
    model_check: Option<ModelCheck>,
}

/// Where [`Registry::prepared`] maps a component that is not loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOn {
    /// On the calling task's thread, blocking its worker for the mapping
    /// (~0.4 ms): the first byte of a cold start comes ~0.1 ms sooner than
    /// through the blocking pool (two thread hand-offs, colder caches).
    /// For a caller with nothing else running on the server.
    Caller,
    /// On tokio's blocking pool: the worker keeps serving other requests.
    BlockingPool,
}

impl Registry {
    /// A registry over `store` and `blobs`, compiling with `engine` and
    /// checking models on `nn`'s devices; asset directories are laid out
    /// under `assets_root`.
    pub fn new(store: Arc<dyn Store>, blobs: BlobStore, engine: Engine, nn: NnHost, assets_root: PathBuf) -> Registry {
        Registry {
            store,
            blobs,
            engine,
            nn,
            assets: AssetDirs::new(assets_root),
            functions: Arc::new(DashMap::default()),
            changes: Arc::new(AtomicU64::new(0)),
            store_retry_at_ms: Arc::new(AtomicU64::new(0)),
            epoch: std::time::Instant::now(),
            verified: Arc::new(dashmap::DashSet::new()),
            model_check: None,
        }
    }

    /// Parses each deployed model first in a bounded child process.
    pub fn with_model_check(mut self, check: ModelCheck) -> Registry {
        self.model_check = Some(check);
        self
    }

    /// The blob store (uploads stage into it).
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Deploys an upload (fully received, not yet committed) as the next
    /// version of its function in `tenant`. Everything is checked first (the
    /// manifest against this server, the component compiled, every model
    /// loaded on its device), then the blobs are committed and the version
    /// recorded, so a refused deploy leaves nothing behind.
    pub async fn deploy(&self, tenant: &str, upload: Upload) -> Result<FunctionVersion> {
        upload.check_complete()?;
        let Upload {
            manifest,
            mut component,
            mut models,
            mut files,
        } = upload;
        let max_mb = self.engine.config().max_memory_mb;
        if manifest.limits.memory_mb > max_mb {
            return Err(RegistryError::Unsupported {
                key: "limits.memory_mb".into(),
                reason: format!("this server allows at most {max_mb} MiB per instance"),
            });
        }
        self.check_outbound(&manifest).await?;
        let cache = self.nn.cache();
        for (i, model) in manifest.models.iter().enumerate() {
            if let Err(err) = cache.devices().check(placement(model.device)) {
                return Err(RegistryError::Model {
                    key: format!("models[{i}].device"),
                    reason: err.to_string(),
                });
            }
        }
        if component.is_empty() {
            return Err(RegistryError::EmptyComponent);
        }
        let digest = component.finish().await?;
        let size = component.len();
        if !self.engine.is_compiled(digest.as_str()) {
            let engine = self.engine.clone();
            let key = digest.to_string();
            let path = component.staged_path().to_owned();
            tokio::task::spawn_blocking(move || {
                engine.precompile(&key, &path)?;
                // Parked until its first call: a function deployed and
                // never called holds no pre-linking.
                engine.unload(&key);
                Ok::<_, EngineError>(())
            })
            .await
            .map_err(|e| RegistryError::Engine(e.to_string()))??;
        }

        let mut staged = Vec::new();
        for (i, spec) in manifest.models.iter().enumerate() {
            let mut blob = models
                .remove(&spec.name)
                .ok_or_else(|| RegistryError::Upload(spec.name.clone()))?;
            let key = format!("models[{i}].path");
            if blob.is_empty() {
                return Err(RegistryError::Model {
                    key,
                    reason: format!("model `{}` is empty", spec.name),
                });
            }
            let digest = blob.finish().await?;
            if let Some(check) = &self.model_check
                && !cache.cached().iter().any(|m| m.key == digest.as_str())
                && let Err(reason) = check.run(blob.staged_path()).await
            {
                return Err(RegistryError::Model {
                    key,
                    reason: format!("model `{}` ({}): {reason}", spec.name, spec.path),
                });
            }
            // Loading is the one complete check that a model will run here;
            // the loaded model then stays warm for the first invocations.
            if let Err(err) = cache
                .get(digest.as_str(), blob.staged_path(), placement(spec.device))
                .await
            {
                let key = match err {
                    DeviceError::NoDevice(_) => format!("models[{i}].device"),
                    _ => key,
                };
                return Err(RegistryError::Model {
                    key,
                    reason: format!("model `{}` ({}): {err}", spec.name, spec.path),
                });
            }
            staged.push((ArtifactKind::Model, spec.name.clone(), blob));
        }
        for spec in &manifest.files {
            let mut blob = files
                .remove(&spec.target)
                .ok_or_else(|| RegistryError::Upload(spec.target.clone()))?;
            blob.finish().await?;
            staged.push((ArtifactKind::File, spec.target.clone(), blob));
        }

        let committed = component.commit().await?;
        debug_assert_eq!(committed, digest);
        let mut artifacts = Vec::with_capacity(staged.len());
        for (kind, name, blob) in staged {
            let size = blob.len();
            let digest = blob.commit().await?;
            artifacts.push(Artifact {
                kind,
                name,
                digest,
                size,
            });
        }
        let grants = self.grants(tenant, &manifest, &artifacts).await?;
        self.store.ensure_tenant(tenant).await?;
        let version = self
            .store
            .create_version(NewVersion {
                tenant: tenant.to_owned(),
                name: manifest.name.clone(),
                manifest: manifest.to_toml(),
                component: digest,
                component_size: size,
                artifacts,
            })
            .await?;
        tracing::info!(tenant, function = %version.name, version = version.version, component = %version.component, artifacts = version.artifacts.len(), "deployed");
        let deployed = Arc::new(Deployed::new(version.clone(), manifest, grants));
        self.drop_cached(tenant, &version.name);
        // Failing here leaves the routing to the next call: the deploy
        // itself is done.
        let _ = self.load_routes(tenant, &version.name, Some(deployed)).await;
        Ok(version)
    }

    /// What a version's instances are given: its models by name, and its
    /// asset directory (built from the blobs if missing).
    async fn grants(&self, tenant: &str, manifest: &Manifest, artifacts: &[Artifact]) -> Result<Grants> {
        // In a cluster, a node that has not seen these blobs yet fetches them
        // from the shared bucket; what cannot be fetched is reported below as
        // missing, naming the model or file.
        for artifact in artifacts {
            if let Err(err) = self.blobs.ensure_local(&artifact.digest, artifact.size).await {
                tracing::warn!(artifact = %artifact.name, error = %err, "cannot fetch a deployed blob");
            }
        }
        let models = artifacts
            .iter()
            .filter(|a| a.kind == ArtifactKind::Model)
            .filter_map(|a| {
                let spec = manifest.models.iter().find(|m| m.name == a.name)?;
                let model = ModelRef {
                    key: a.digest.to_string(),
                    path: self.blobs.path(&a.digest),
                    placement: placement(spec.device),
                    cache_entries: spec.cache_entries as usize,
                    batch: hearth_devices::CallTerms {
                        max_rows: spec.max_batch.map(|rows| rows as usize),
                        max_delay: spec.max_delay_ms.map(|ms| std::time::Duration::from_millis(ms.into())),
                        ..Default::default()
                    },
                };
                Some((a.name.clone(), model))
            });
        let models = self.nn.grant(tenant, models);
        // A model file lost, truncated or damaged on disk fails this function
        // alone, plainly, instead of surfacing as an inference error in the
        // guest (or, worse, as wrong answers from flipped weights). The size
        // is checked every time, the content hashed once per process.
        for artifact in artifacts.iter().filter(|a| a.kind == ArtifactKind::Model) {
            let path = self.blobs.path(&artifact.digest);
            let mut intact = tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() == artifact.size);
            if intact && !self.verified.contains(artifact.digest.as_str()) {
                let (blobs, digest, size) = (self.blobs.clone(), artifact.digest.clone(), artifact.size);
                intact = tokio::task::spawn_blocking(move || blobs.is_intact(&digest, size))
                    .await
                    .unwrap_or(false);
                if intact {
                    self.verified.insert(artifact.digest.to_string());
                }
            }
            if !intact {
                let index = manifest
                    .models
                    .iter()
                    .position(|m| m.name == artifact.name)
                    .unwrap_or(0);
                return Err(RegistryError::Model {
                    key: format!("models[{index}].path"),
                    reason: format!(
                        "the stored file of model `{}` (sha256:{}) is missing or damaged; deploy the function again",
                        artifact.name, artifact.digest
                    ),
                });
            }
        }
        let (assets, blobs, artifacts) = (self.assets.clone(), self.blobs.clone(), artifacts.to_vec());
        let root = self.assets.root().to_owned();
        let assets = tokio::task::spawn_blocking(move || assets.ensure(&artifacts, &blobs))
            .await
            .map_err(|e| RegistryError::Engine(e.to_string()))?
            .map_err(|source| StoreError::Io { path: root, source })?;
        let outbound: Vec<hearth_manifest::Origin> = manifest
            .allowed_outbound_hosts
            .iter()
            .filter_map(|origin| hearth_manifest::Origin::parse(origin).ok())
            .collect();
        Ok(Grants {
            models,
            assets: assets.map(Arc::from),
            outbound: outbound.into(),
        })
    }

    /// Refuses a manifest listing an origin on an address the operator's
    /// outbound policy denies (a literal, or a name resolving to one). A
    /// name that does not resolve here passes: every request is checked
    /// again once resolved.
    async fn check_outbound(&self, manifest: &Manifest) -> Result<()> {
        let policy = &self.engine.config().outbound;
        for (i, listed) in manifest.allowed_outbound_hosts.iter().enumerate() {
            let Ok(origin) = hearth_manifest::Origin::parse(listed) else {
                continue;
            };
            let resolved =
                tokio::time::timeout(DEPLOY_RESOLVE_TIMEOUT, policy.resolve(&origin.host, origin.port)).await;
            if let Ok(Err(denied @ hearth_engine::Denied::Internal { .. })) = resolved {
                return Err(RegistryError::Unsupported {
                    key: format!("allowed_outbound_hosts[{i}]"),
                    reason: format!("`{listed}`: {denied}"),
                });
            }
        }
        Ok(())
    }

    /// The version a bare call of `name` runs now (through `latest`).
    pub async fn resolve(&self, tenant: &str, name: &str) -> Result<Arc<Deployed>> {
        Ok(self.route(tenant, name, Selector::LATEST, None).await?.deployed)
    }

    /// Where a request for `name@selector` goes: the version that answers,
    /// the alias it came through and a version to mirror it to; `sticky`
    /// (a caller's key) keeps a caller on one version of a split.
    pub async fn route(
        &self,
        tenant: &str,
        name: &str,
        selector: Selector<'_>,
        sticky: Option<&[u8]>,
    ) -> Result<Routed> {
        let routes = self.routes(tenant, name).await?;
        let choice = routes.choose(selector, sticky).ok_or_else(|| RegistryError::NoTarget {
            name: name.to_owned(),
            what: match selector {
                Selector::Alias(alias) => format!("alias `{alias}`"),
                Selector::Version(version) => format!("version {version}"),
            },
        })?;
        let deployed = self.version(&routes, tenant, name, choice.version).await?;
        let shadow = match choice.shadow {
            Some(version) => self.version(&routes, tenant, name, version).await.ok(),
            None => None,
        };
        Ok(Routed {
            deployed,
            alias: choice.alias,
            shadow,
        })
    }

    /// A function's routing, from the cache or the store. A routing marked
    /// stale (changed elsewhere) is read again, but still served while
    /// the store cannot be reached: a node goes on answering the functions
    /// it knows through an outage, even one that began just as it was told
    /// to read them again.
    async fn routes(&self, tenant: &str, name: &str) -> Result<Arc<Routes>> {
        let known = match self.functions.get(&(tenant, name) as &dyn NamePair) {
            Some(found) if !found.stale.load(Ordering::Acquire) => return Ok(found.clone()),
            found => found.map(|found| found.clone()),
        };
        if let Some(known) = &known
            && self.since_epoch_ms() < self.store_retry_at_ms.load(Ordering::Relaxed)
        {
            return Ok(known.clone());
        }
        // Boxed: reading the store is rare (a miss, or a change), and
        // inline it would enlarge every invocation's future.
        match (Box::pin(self.load_routes(tenant, name, None)).await, known) {
            (Err(err), Some(known)) if err.is_unavailable() => {
                let retry_at = self.since_epoch_ms() + STORE_RETRY.as_millis() as u64;
                self.store_retry_at_ms.fetch_max(retry_at, Ordering::Relaxed);
                tracing::debug!(tenant, function = name, error = %err, "store unavailable: serving the routing cached before");
                Ok(known)
            }
            (Err(err @ RegistryError::NotFound { .. }), Some(known)) => {
                self.functions.remove_if(&(tenant, name) as &dyn NamePair, |_, cached| {
                    Arc::ptr_eq(cached, &known)
                });
                Err(err)
            }
            (loaded, _) => loaded,
        }
    }

    /// Milliseconds since `epoch`, the clock of `store_retry_at_ms`.
    fn since_epoch_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reads a function's routing from the store and caches it; `known`,
    /// when it is the newest version (a deploy just made it), is used as
    /// it is instead of being prepared again.
    async fn load_routes(&self, tenant: &str, name: &str, known: Option<Arc<Deployed>>) -> Result<Arc<Routes>> {
        let changes = self.changes.load(Ordering::SeqCst);
        let newest = self
            .store
            .latest_version(tenant, name)
            .await?
            .ok_or_else(|| not_found(tenant, name))?;
        let aliases = self.store.aliases(tenant, name).await?;
        let routes = Arc::new(Routes {
            newest: newest.version,
            aliases: aliases
                .into_iter()
                .map(|alias| (Arc::from(alias.name), alias.target))
                .collect(),
            latest: Arc::from(LATEST),
            versions: DashMap::default(),
            stale: AtomicBool::new(false),
        });
        let deployed = match known {
            Some(known) if known.version.version == newest.version => known,
            _ => self.deployed(newest).await?,
        };
        routes.versions.insert(deployed.version.version, deployed);
        self.functions.insert(FunctionName::new(tenant, name), routes.clone());
        // A change announced while the store was read may not be in what
        // was read: this answer is served, and the next call reads again.
        if self.changes.load(Ordering::SeqCst) != changes {
            routes.stale.store(true, Ordering::Release);
        }
        Ok(routes)
    }

    /// One version of a function, from its routing's cache or the store.
    async fn version(&self, routes: &Routes, tenant: &str, name: &str, version: u32) -> Result<Arc<Deployed>> {
        if let Some(found) = routes.versions.get(&version) {
            return Ok(found.clone());
        }
        Box::pin(self.load_version(routes, tenant, name, version)).await
    }

    /// [`Registry::version`] for a version not cached: read from the store
    /// and prepared (boxed by the caller, which every invocation awaits).
    async fn load_version(&self, routes: &Routes, tenant: &str, name: &str, version: u32) -> Result<Arc<Deployed>> {
        let stored = self
            .store
            .version(tenant, name, version)
            .await?
            .ok_or_else(|| RegistryError::NoTarget {
                name: name.to_owned(),
                what: format!("version {version}"),
            })?;
        let deployed = self.deployed(stored).await?;
        routes.versions.insert(version, deployed.clone());
        Ok(deployed)
    }

    /// A stored version, ready to run.
    async fn deployed(&self, version: FunctionVersion) -> Result<Arc<Deployed>> {
        let manifest = Manifest::from_toml(&version.manifest).map_err(|e| {
            StoreError::Corrupt(format!("{}/{} v{}: {e}", version.tenant, version.name, version.version))
        })?;
        let grants = self.grants(&version.tenant, &manifest, &version.artifacts).await?;
        Ok(Arc::new(Deployed::new(version, manifest, grants)))
    }

    /// The versions some alias of the function sends requests to now
    /// (`latest` included), as this node has them cached.
    pub fn routed_versions(&self, tenant: &str, name: &str) -> Vec<u32> {
        let Some(routes) = self.functions.get(&(tenant, name) as &dyn NamePair) else {
            return Vec::new();
        };
        let mut versions: Vec<u32> = routes
            .aliases
            .values()
            .flat_map(|target| target.versions().collect::<Vec<_>>())
            .collect();
        if !routes.aliases.contains_key(LATEST) {
            versions.push(routes.newest);
        }
        versions.sort_unstable();
        versions.dedup();
        versions
    }

    /// Points `alias` of a function at `target`, or unsets it (`None`;
    /// `latest` then follows the newest version again).
    pub async fn set_alias(
        &self,
        tenant: &str,
        name: &str,
        alias: &str,
        target: Option<AliasTarget>,
    ) -> Result<AliasChange> {
        routes::validate_alias(alias).map_err(RegistryError::InvalidAlias)?;
        if let Some(target) = &target {
            routes::validate_target(target).map_err(RegistryError::InvalidAlias)?;
        }
        let change = self
            .store
            .set_alias(tenant, name, alias, target.clone())
            .await
            .map_err(|err| refused(err, tenant, name))?;
        self.drop_cached(tenant, name);
        tracing::info!(tenant, function = name, alias, target = ?change.target, "alias changed");
        Ok(change)
    }

    /// Points `alias` back at what it pointed at before its last change.
    pub async fn rollback(&self, tenant: &str, name: &str, alias: &str) -> Result<AliasChange> {
        routes::validate_alias(alias).map_err(RegistryError::InvalidAlias)?;
        let history = self.alias_history(tenant, name, alias).await?;
        let previous = history
            .len()
            .checked_sub(2)
            .and_then(|i| history[i].target.clone())
            .ok_or_else(|| RegistryError::Conflict {
                name: name.to_owned(),
                refusal: Refusal::NothingToRollBack(alias.to_owned()),
            })?;
        self.set_alias(tenant, name, alias, Some(previous)).await
    }

    /// The aliases set on a function.
    pub async fn aliases(&self, tenant: &str, name: &str) -> Result<Vec<Alias>> {
        self.routes(tenant, name).await?;
        Ok(self.store.aliases(tenant, name).await?)
    }

    /// An alias's history, oldest first.
    pub async fn alias_history(&self, tenant: &str, name: &str, alias: &str) -> Result<Vec<AliasChange>> {
        self.routes(tenant, name).await?;
        Ok(self.store.alias_history(tenant, name, alias).await?)
    }

    /// Deletes one version of a function (refused while an alias points at
    /// it, or if it is the last one).
    pub async fn delete_version(&self, tenant: &str, name: &str, version: u32) -> Result<()> {
        self.store
            .delete_version(tenant, name, version)
            .await
            .map_err(|err| refused(err, tenant, name))?;
        self.drop_cached(tenant, name);
        tracing::info!(tenant, function = name, version, "deleted a version");
        Ok(())
    }

    /// Whether the newest version of a function keeps instances warm
    /// (`min_instances > 0`), as [`Registry::keep_warm_functions`] decides at
    /// start, read from the store without preparing it; false for a
    /// function that is gone or cannot be read.
    pub async fn keeps_warm(&self, tenant: &str, name: &str) -> bool {
        matches!(self.store.latest_version(tenant, name).await, Ok(Some(version)) if keeps_warm(&version))
    }

    /// Every function that keeps instances warm (`min_instances > 0`),
    /// resolved, so the server can bring them back after a restart. Only
    /// these are resolved here (resolving lays out asset directories); the
    /// rest wait for their first call.
    pub async fn keep_warm_functions(&self) -> Result<Vec<Arc<Deployed>>> {
        let mut warm = Vec::new();
        for tenant in self.store.list_tenants().await? {
            for version in self.store.list_functions(&tenant).await? {
                if keeps_warm(&version) {
                    warm.push(self.resolve(&tenant, &version.name).await?);
                }
            }
        }
        Ok(warm)
    }

    /// Loads every model `deployed` names into the warm cache; returns how
    /// many loaded (failures are logged: the first call reports them).
    pub async fn preload_models(&self, deployed: &Deployed) -> usize {
        let (loaded, failed) = self.nn.preload(&deployed.grants.models).await;
        for (model, err) in failed {
            tracing::warn!(
                tenant = %deployed.version.tenant,
                function = %deployed.version.name,
                %model,
                error = %err,
                "could not preload a model"
            );
        }
        loaded
    }

    /// The compiled component of a deployed version, loading it on first use
    /// (maps the precompiled artifact, on the thread `on` says; recompiles,
    /// always on the blocking pool, only if the artifact is missing).
    pub async fn prepared(&self, deployed: &Deployed, on: LoadOn) -> Result<Prepared> {
        let digest = &deployed.version.component;
        if let Some(prepared) = self.engine.cached(digest.as_str()) {
            return Ok(prepared);
        }
        if on == LoadOn::Caller
            && let Ok(prepared) = self.engine.load_precompiled(digest.as_str())
        {
            return Ok(prepared);
        }
        let engine = self.engine.clone();
        let key = digest.to_string();
        let path = self.blobs.ensure_local(digest, deployed.version.component_size).await?;
        let prepared = tokio::task::spawn_blocking(move || engine.load(&key, &path))
            .await
            .map_err(|e| RegistryError::Engine(e.to_string()))??;
        Ok(prepared)
    }

    /// The newest version of each function of `tenant`.
    pub async fn list(&self, tenant: &str) -> Result<Vec<FunctionVersion>> {
        Ok(self.store.list_functions(tenant).await?)
    }

    /// Every version of a function, oldest first.
    pub async fn versions(&self, tenant: &str, name: &str) -> Result<Vec<FunctionVersion>> {
        let versions = self.store.list_versions(tenant, name).await?;
        if versions.is_empty() {
            return Err(not_found(tenant, name));
        }
        Ok(versions)
    }

    /// Marks the cached routing of a function changed elsewhere (another
    /// node of a cluster deployed, deleted or re-aliased it) stale: the
    /// next call reads it from the store again (and falls back on it only
    /// while the store cannot be reached).
    pub fn forget(&self, tenant: &str, name: &str) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        if let Some(routes) = self.functions.get(&(tenant, name) as &dyn NamePair) {
            routes.stale.store(true, Ordering::Release);
        }
    }

    /// Marks every cached routing stale (something changed elsewhere,
    /// unsaid: the change feed was lost and found again).
    pub fn forget_all(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        for routes in self.functions.iter() {
            routes.stale.store(true, Ordering::Release);
        }
    }

    /// Drops the cached routing of a function this node just changed in
    /// the store: the next call reads it, and nothing older is served.
    fn drop_cached(&self, tenant: &str, name: &str) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.functions.remove(&(tenant, name) as &dyn NamePair);
    }

    /// Deletes what no version references any more: local blobs and
    /// compiled artifacts (and leftovers of interrupted uploads), and in a
    /// cluster the shared bucket's blobs, once older than `grace`. Versions themselves stay until their function
    /// is deleted. Returns what went.
    pub async fn collect_garbage(&self, grace: std::time::Duration) -> Result<GarbageCollected> {
        let mut keep = std::collections::HashSet::new();
        for tenant in self.store.list_tenants().await? {
            for function in self.store.list_functions(&tenant).await? {
                for version in self.store.list_versions(&tenant, &function.name).await? {
                    keep.insert(version.component.as_str().to_owned());
                    keep.extend(version.artifacts.iter().map(|a| a.digest.as_str().to_owned()));
                }
            }
        }
        // The bucket is the whole fleet's; `keep` is too (read from the
        // shared store), and the grace covers deploys in flight elsewhere.
        let bucket = self.blobs.collect_remote(&keep, grace).await?;
        self.engine.retain_parked(&keep);
        let (blobs, engine) = (self.blobs.clone(), self.engine.clone());
        tokio::task::spawn_blocking(move || {
            let mut compiled = hearth_store::Collected::default();
            for path in engine.stale_artifacts(&keep) {
                compiled.remove_if_older(&path, grace);
            }
            GarbageCollected {
                blobs: blobs.collect(&keep, grace),
                compiled,
                bucket,
            }
        })
        .await
        .map_err(|e| RegistryError::Engine(e.to_string()))
    }

    /// Deletes a function and all its versions (their blobs go at the next
    /// garbage collection): later invocations answer 404. Invocations
    /// already running finish on the instance they have.
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<()> {
        if !self.store.delete_function(tenant, name).await? {
            return Err(not_found(tenant, name));
        }
        self.drop_cached(tenant, name);
        tracing::info!(tenant, function = name, "deleted");
        Ok(())
    }
}

/// What [`Registry::collect_garbage`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GarbageCollected {
    /// Blobs and staged uploads.
    pub blobs: hearth_store::Collected,
    /// Compiled artifacts.
    pub compiled: hearth_store::Collected,
    /// Blobs in a cluster's shared bucket.
    pub bucket: hearth_store::Collected,
}

/// Where a request goes, from [`Registry::route`].
#[derive(Debug, Clone)]
pub struct Routed {
    /// The version that answers.
    pub deployed: Arc<Deployed>,
    /// The alias the request came through (`None`: called by version).
    pub alias: Option<Arc<str>>,
    /// A version that gets a copy of the request, whose answer nobody sees.
    pub shadow: Option<Arc<Deployed>>,
}

/// A store refusal as the registry reports it.
fn refused(err: StoreError, tenant: &str, name: &str) -> RegistryError {
    match err {
        StoreError::Refused(Refusal::NoFunction) => not_found(tenant, name),
        StoreError::Refused(Refusal::NoVersion(version)) => RegistryError::NoTarget {
            name: name.to_owned(),
            what: format!("version {version}"),
        },
        StoreError::Refused(Refusal::NoAlias(alias)) => RegistryError::NoTarget {
            name: name.to_owned(),
            what: format!("alias `{alias}`"),
        },
        StoreError::Refused(refusal) => RegistryError::Conflict {
            name: name.to_owned(),
            refusal,
        },
        other => RegistryError::Store(other),
    }
}

/// Whether a stored version's manifest keeps instances warm
/// (`min_instances > 0`; a manifest that does not parse keeps none).
fn keeps_warm(version: &FunctionVersion) -> bool {
    Manifest::from_toml(&version.manifest).is_ok_and(|manifest| manifest.scaling.min_instances > 0)
}

fn not_found(tenant: &str, name: &str) -> RegistryError {
    RegistryError::NotFound {
        tenant: tenant.to_owned(),
        name: name.to_owned(),
    }
}
