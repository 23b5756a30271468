//! Functions and their versions: what is deployed, and which version answers.
//!
//! The registry owns the deploy transaction (validate the manifest against the
//! server's limits, compile the component, then record the blob and the
//! version, in that order, so a failure leaves nothing behind) and the lookup
//! on every invocation. The newest version of each function is cached in
//! memory; a deploy or delete through this process updates the cache.

use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;
use hearth_engine::{Engine, EngineError, Prepared};
use hearth_manifest::{Manifest, ManifestError};
use hearth_store::{BlobStore, Digest, FunctionVersion, NewVersion, StagedBlob, Store, StoreError};

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
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine failed for a reason that is not the component's fault.
    #[error("engine: {0}")]
    Engine(String),
}

impl From<EngineError> for RegistryError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::Invalid(_) | EngineError::Unlinkable(_) => RegistryError::Component(err.to_string()),
            other => RegistryError::Engine(other.to_string()),
        }
    }
}

/// The version of a function that currently answers, with its parsed manifest.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The stored version.
    pub version: FunctionVersion,
    /// Its manifest, parsed.
    pub manifest: Manifest,
}

/// The registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    engine: Engine,
    latest: Arc<DashMap<(String, String), Arc<Deployed>>>,
}

impl Registry {
    /// A registry over `store` and `blobs`, compiling with `engine`.
    pub fn new(store: Arc<dyn Store>, blobs: BlobStore, engine: Engine) -> Registry {
        Registry {
            store,
            blobs,
            engine,
            latest: Arc::new(DashMap::new()),
        }
    }

    /// The blob store (uploads stage into it).
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Deploys `component` (fully uploaded, not yet committed) under
    /// `manifest` as the next version of the function in `tenant`.
    pub async fn deploy(&self, tenant: &str, manifest: Manifest, mut component: StagedBlob) -> Result<FunctionVersion> {
        if let Some(model) = manifest.models.first() {
            return Err(RegistryError::Unsupported {
                key: "models".into(),
                reason: format!(
                    "model `{}`: this server does not serve models yet (wasi-nn arrives with the inference bridge)",
                    model.name
                ),
            });
        }
        let max_mb = self.engine.config().max_memory_mb;
        if manifest.limits.memory_mb > max_mb {
            return Err(RegistryError::Unsupported {
                key: "limits.memory_mb".into(),
                reason: format!("this server allows at most {max_mb} MiB per instance"),
            });
        }
        if component.is_empty() {
            return Err(RegistryError::EmptyComponent);
        }
        let digest = component.finish().await?;
        let size = component.len();
        if self.engine.cached(digest.as_str()).is_none() {
            let engine = self.engine.clone();
            let key = digest.to_string();
            let path = component.staged_path().to_owned();
            tokio::task::spawn_blocking(move || engine.precompile(&key, &path))
                .await
                .map_err(|e| RegistryError::Engine(e.to_string()))??;
        }
        let committed = component.commit().await?;
        debug_assert_eq!(committed, digest);
        self.store.ensure_tenant(tenant).await?;
        let version = self
            .store
            .create_version(NewVersion {
                tenant: tenant.to_owned(),
                name: manifest.name.clone(),
                manifest: manifest.to_toml(),
                component: digest,
                component_size: size,
            })
            .await?;
        tracing::info!(tenant, function = %version.name, version = version.version, component = %version.component, "deployed");
        self.latest.insert(
            (tenant.to_owned(), manifest.name.clone()),
            Arc::new(Deployed {
                version: version.clone(),
                manifest,
            }),
        );
        Ok(version)
    }

    /// The version of `name` that answers invocations now.
    pub async fn resolve(&self, tenant: &str, name: &str) -> Result<Arc<Deployed>> {
        let key = (tenant.to_owned(), name.to_owned());
        if let Some(found) = self.latest.get(&key) {
            return Ok(found.clone());
        }
        let version = self
            .store
            .latest_version(tenant, name)
            .await?
            .ok_or_else(|| not_found(tenant, name))?;
        let manifest = Manifest::from_toml(&version.manifest)
            .map_err(|e| StoreError::Corrupt(format!("{tenant}/{name} v{}: {e}", version.version)))?;
        let deployed = Arc::new(Deployed { version, manifest });
        self.latest.insert(key, deployed.clone());
        Ok(deployed)
    }

    /// The compiled component of a deployed version, loading it on first use
    /// (maps the precompiled artifact; recompiles only if it is missing).
    pub async fn prepared(&self, deployed: &Deployed) -> Result<Prepared> {
        let digest = &deployed.version.component;
        if let Some(prepared) = self.engine.cached(digest.as_str()) {
            return Ok(prepared);
        }
        let engine = self.engine.clone();
        let key = digest.to_string();
        let path = self.component_path(digest);
        let prepared = tokio::task::spawn_blocking(move || engine.load(&key, &path))
            .await
            .map_err(|e| RegistryError::Engine(e.to_string()))??;
        Ok(prepared)
    }

    /// Where a component blob lives.
    pub fn component_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.path(digest)
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

    /// Deletes a function: later invocations answer 404. Invocations already
    /// running finish on the instance they have.
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<()> {
        if !self.store.delete_function(tenant, name).await? {
            return Err(not_found(tenant, name));
        }
        self.latest.remove(&(tenant.to_owned(), name.to_owned()));
        tracing::info!(tenant, function = name, "deleted");
        Ok(())
    }
}

fn not_found(tenant: &str, name: &str) -> RegistryError {
    RegistryError::NotFound {
        tenant: tenant.to_owned(),
        name: name.to_owned(),
    }
}
