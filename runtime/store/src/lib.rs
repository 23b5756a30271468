//! Hearth's durable state.
//!
//! - [`Store`]: the metadata that must survive a restart (tenants, tokens,
//!   functions and their versions, asynchronous invocations) behind one async
//!   trait, with two backends chosen by URL ([`open`]): the embedded SQLite
//!   file ([`SqliteStore`], the default) and a PostgreSQL database shared by a
//!   cluster ([`PostgresStore`]). One conformance suite runs against both.
//! - [`BlobStore`]: content-addressed files (components, later models) under the
//!   data directory, named by their SHA-256 and written by staging + rename, so
//!   a crash never leaves a half-written blob under a valid name.
//!
//! Timestamps are Unix milliseconds; callers format them at the edge.

mod blob;
#[cfg(test)]
mod conformance;
mod postgres;
mod remote;
mod sqlite;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

pub use blob::{BlobStore, Collected, Digest, StagedBlob};
pub use postgres::{CHANGES_CHANNEL, PostgresStore};
pub use remote::RemoteBlobs;
pub use sqlite::SqliteStore;

/// The alias a bare function name means: the newest version, unless a
/// deployer pins it.
pub const LATEST: &str = "latest";

/// A store opened by [`open`].
#[derive(Debug)]
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The pool of the PostgreSQL database it lives in, when it does: the
    /// fleet's usage ledger shares it (one pool per node).
    pub postgres: Option<deadpool_postgres::Pool>,
}

/// Opens the store named by `url`: `None` (or `sqlite:`) for the embedded
/// SQLite file under `data_dir`, `postgres://…` (or `postgresql://…`) for a
/// PostgreSQL database shared by a cluster.
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Opened> {
    match url.map(str::trim).filter(|url| !url.is_empty()) {
        None | Some("sqlite:") => Ok(Opened {
            store: Arc::new(SqliteStore::open(data_dir)?),
            postgres: None,
        }),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PostgresStore::connect(url).await?;
            Ok(Opened {
                postgres: Some(store.pool()),
                store: Arc::new(store),
            })
        }
        Some(url) => Err(StoreError::Config(format!(
            "unknown store URL {:?}: use postgres://user@host:port/database, or leave it unset for the \
             embedded SQLite store",
            redact(url)
        ))),
    }
}

/// A URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{host}{path}")
        }
        _ => url.to_owned(),
    }
}

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed. None of these are the user's fault: callers
/// map them to 500/503 and log them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused or failed.
    #[error("postgresql: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The database cannot be reached now (no connection within the pool's
    /// timeout); callers answer 503.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The shared object store refused or failed.
    #[error("object store: {0}")]
    Remote(String),
    /// The store's URL or settings are wrong (at start).
    #[error("{0}")]
    Config(String),
    /// A file under the data directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The blocking worker running the query was lost.
    #[error("store worker failed: {0}")]
    Worker(String),
    /// A row that does not decode (hand-edited database, or a bug).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The change contradicts what is stored (the caller's to fix).
    #[error("{0}")]
    Refused(Refusal),
}

/// Why the store refused a change to versions or aliases: the request
/// contradicts what is stored, so callers answer 404 or 409.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No live function of that name.
    #[error("no such function")]
    NoFunction,
    /// The function has no live version of that number.
    #[error("version {0} does not exist")]
    NoVersion(u32),
    /// An alias sends requests to the version (`latest`, when it follows
    /// the newest version, counts).
    #[error("alias `{alias}` points at version {version}")]
    VersionInUse {
        /// The version.
        version: u32,
        /// The alias pointing at it.
        alias: String,
    },
    /// The only version left: delete the function instead.
    #[error("version {0} is the function's only version")]
    LastVersion(u32),
    /// No alias of that name is set.
    #[error("alias `{0}` is not set")]
    NoAlias(String),
    /// The alias has no earlier target to go back to.
    #[error("alias `{0}` has no earlier target to roll back to")]
    NothingToRollBack(String),
}

impl StoreError {
    /// Whether the store could not be reached (a connection refused,
    /// dropped or shut down): worth retrying later, so callers answer 503
    /// rather than 500, and an asynchronous run stays queued.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Postgres(err) => {
                // Class 08: connection exception; 57: operator intervention
                // (the server shutting down or restarting).
                err.is_closed()
                    || err
                        .code()
                        .is_some_and(|code| code.code().starts_with("08") || code.code().starts_with("57"))
            }
            _ => false,
        }
    }
}

/// A function version as stored: immutable once created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionVersion {
    /// Owning tenant.
    pub tenant: String,
    /// Function name.
    pub name: String,
    /// 1 for the first deploy, N+1 for each later one; never reused.
    pub version: u32,
    /// The manifest as deployed (TOML).
    pub manifest: String,
    /// SHA-256 of the component blob.
    pub component: Digest,
    /// Size of the component in bytes.
    pub component_size: u64,
    /// When this version was deployed (Unix ms).
    pub created_at_ms: i64,
    /// Models and assets deployed with it, by kind then name.
    pub artifacts: Vec<Artifact>,
}

/// What an artifact is to the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ArtifactKind {
    /// An ONNX model from `[[models]]`, named by its model name.
    Model,
    /// A read-only asset from `[[files]]`, named by its guest path.
    File,
}

impl ArtifactKind {
    /// The kind as stored and shown (`model`, `file`).
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Model => "model",
            ArtifactKind::File => "file",
        }
    }

    /// Parses [`ArtifactKind::as_str`].
    pub fn parse(text: &str) -> Option<ArtifactKind> {
        match text {
            "model" => Some(ArtifactKind::Model),
            "file" => Some(ArtifactKind::File),
            _ => None,
        }
    }
}

/// A blob deployed with a function version besides its component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Artifact {
    /// Model or asset.
    pub kind: ArtifactKind,
    /// The model's name, or the asset's guest path.
    pub name: String,
    /// SHA-256 of the blob.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
}

/// What a deploy adds; the store assigns the version.
#[derive(Debug, Clone)]
pub struct NewVersion {
    /// Owning tenant.
    pub tenant: String,
    /// Function name.
    pub name: String,
    /// The manifest as deployed (TOML).
    pub manifest: String,
    /// SHA-256 of the component blob, already in the [`BlobStore`].
    pub component: Digest,
    /// Size of the component in bytes.
    pub component_size: u64,
    /// Models and assets, already in the [`BlobStore`].
    pub artifacts: Vec<Artifact>,
}

/// Where an alias sends requests: versions by weight, and optionally a
/// share of them mirrored to another version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AliasTarget {
    /// The versions that answer, with their weights (at least one; weights
    /// are positive and relative).
    pub routes: Vec<Route>,
    /// Mirrored traffic, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

impl AliasTarget {
    /// Every request to one version.
    pub fn single(version: u32) -> AliasTarget {
        AliasTarget {
            routes: vec![Route { version, weight: 1 }],
            shadow: None,
        }
    }

    /// Every version it names (routes, then the shadow's).
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.routes
            .iter()
            .map(|route| route.version)
            .chain(self.shadow.iter().map(|shadow| shadow.version))
    }
}

/// One version of an alias and its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// The version.
    pub version: u32,
    /// Its weight relative to the alias's other routes.
    pub weight: u32,
}

/// Requests mirrored to a version whose answers nobody sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shadow {
    /// The version that gets the copies.
    pub version: u32,
    /// Percentage of the alias's requests copied (1 to 100).
    pub percent: u32,
}

/// An alias as set now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    /// Its name (never all digits: those are versions).
    pub name: String,
    /// Where it sends requests.
    pub target: AliasTarget,
    /// When it was set (Unix ms).
    pub set_at_ms: i64,
}

/// One entry of an alias's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasChange {
    /// When (Unix ms).
    pub at_ms: i64,
    /// Where the alias sent requests from then on; `None`: it was unset.
    pub target: Option<AliasTarget>,
    /// `latest` following the newest version (set by a deploy, or unset
    /// back to it); `target` is then the version it followed.
    pub follows_newest: bool,
}

impl AliasChange {
    /// `latest` following the newest version, `version`, from `at_ms` on.
    pub(crate) fn follows(version: u32, at_ms: i64) -> AliasChange {
        AliasChange {
            at_ms,
            target: Some(AliasTarget::single(version)),
            follows_newest: true,
        }
    }
}

/// A bearer token as stored: the secret itself is never kept, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public identifier, printed at creation, used to revoke.
    pub id: String,
    /// Tenant the token acts for.
    pub tenant: String,
    /// Role name (`admin`, `deployer`, `invoker`, `billing`).
    pub role: String,
    /// Whether this is an operator token, allowed in every tenant.
    pub operator: bool,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// Creation time (Unix ms).
    pub created_at_ms: i64,
    /// Expiry (Unix ms), if any.
    pub expires_at_ms: Option<i64>,
    /// Revocation time (Unix ms), if revoked.
    pub revoked_at_ms: Option<i64>,
}

/// Where an asynchronous invocation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncState {
    /// Accepted, waiting for capacity.
    Queued,
    /// Claimed by a runner (re-queued if the server stops before it ends).
    Running,
    /// The function answered; the response is stored (any HTTP status the
    /// guest chose).
    Succeeded,
    /// Hearth could not get an answer from the function (trap, timeout,
    /// deleted function); the stored response is the problem.
    Failed,
}

impl AsyncState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AsyncState::Queued => "queued",
            AsyncState::Running => "running",
            AsyncState::Succeeded => "succeeded",
            AsyncState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<AsyncState> {
        [
            AsyncState::Queued,
            AsyncState::Running,
            AsyncState::Succeeded,
            AsyncState::Failed,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

/// An HTTP message as stored for an asynchronous invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredMessage {
    /// Method (requests) or empty (responses).
    pub method: String,
    /// Path and query below the function's mount (requests) or empty.
    pub uri: String,
    /// Status (responses) or 0 (requests).
    pub status: u16,
    /// Headers in order; values that are not text are dropped.
    pub headers: Vec<(String, String)>,
    /// The body.
    #[serde(skip)]
    pub body: Vec<u8>,
}

/// An asynchronous invocation: a request accepted now and run when capacity
/// allows, with its response kept for the caller to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncInvocation {
    /// UUIDv7, also the invocation id of the run.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Function name.
    pub function: String,
    /// Where it is.
    pub state: AsyncState,
    /// Runs started (more than one if the server stopped mid-run).
    pub attempts: u32,
    /// Accepted at (Unix ms).
    pub submitted_at_ms: i64,
    /// Last run started at (Unix ms).
    pub started_at_ms: Option<i64>,
    /// Finished at (Unix ms).
    pub finished_at_ms: Option<i64>,
    /// The request to run.
    pub request: StoredMessage,
    /// The response, once finished.
    pub response: Option<StoredMessage>,
}

/// Hearth's metadata store. Every method is one transaction.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Creates the tenant if it does not exist.
    async fn ensure_tenant(&self, tenant: &str) -> Result<()>;
    /// Whether the tenant exists.
    async fn tenant_exists(&self, tenant: &str) -> Result<bool>;
    /// Every tenant, by name.
    async fn list_tenants(&self) -> Result<Vec<String>>;

    /// Adds a token.
    async fn insert_token(&self, token: TokenRecord) -> Result<()>;
    /// Finds a token by the hash of its secret.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;
    /// Whether any operator token exists (so a first start can create one).
    async fn has_operator_token(&self) -> Result<bool>;
    /// A token by its public id.
    async fn token_by_id(&self, id: &str) -> Result<Option<TokenRecord>>;
    /// Tokens of `tenant` (every tenant's with `None`), oldest first.
    async fn list_tokens(&self, tenant: Option<&str>) -> Result<Vec<TokenRecord>>;
    /// Marks a token revoked (keeping the first revocation time); returns it
    /// as stored afterwards.
    async fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>>;

    /// Records a new version of a function (creating the function if needed)
    /// and returns it with its assigned number.
    async fn create_version(&self, new: NewVersion) -> Result<FunctionVersion>;
    /// The newest version of a live function.
    async fn latest_version(&self, tenant: &str, name: &str) -> Result<Option<FunctionVersion>>;
    /// The newest version of each live function of a tenant, by name.
    async fn list_functions(&self, tenant: &str) -> Result<Vec<FunctionVersion>>;
    /// Every version of a live function, oldest first.
    async fn list_versions(&self, tenant: &str, name: &str) -> Result<Vec<FunctionVersion>>;
    /// Deletes a function with its versions and aliases; its version
    /// numbers are not reused by a later deploy of the same name. Returns
    /// whether it existed.
    async fn delete_function(&self, tenant: &str, name: &str) -> Result<bool>;
    /// One live version of a live function.
    async fn version(&self, tenant: &str, name: &str, version: u32) -> Result<Option<FunctionVersion>>;
    /// Deletes one version; refused ([`Refusal`]) while an alias points at
    /// it (`latest` following the newest counts), or if it is the last one.
    async fn delete_version(&self, tenant: &str, name: &str, version: u32) -> Result<()>;
    /// Points `alias` at `target` (every version in it must be live), or
    /// unsets it with `None` (`latest` then follows the newest version
    /// again); the change is added to the alias's history.
    async fn set_alias(
        &self,
        tenant: &str,
        name: &str,
        alias: &str,
        target: Option<AliasTarget>,
    ) -> Result<AliasChange>;
    /// The aliases set on a function, by name (`latest` only when pinned).
    async fn aliases(&self, tenant: &str, name: &str) -> Result<Vec<Alias>>;
    /// An alias's changes, oldest first (for `latest`, deploys it followed
    /// too).
    async fn alias_history(&self, tenant: &str, name: &str, alias: &str) -> Result<Vec<AliasChange>>;

    /// Records an accepted asynchronous invocation (durably, before the 202).
    async fn insert_async(&self, invocation: AsyncInvocation) -> Result<()>;
    /// An asynchronous invocation of `tenant`, with its request and response.
    async fn async_invocation(&self, tenant: &str, id: &str) -> Result<Option<AsyncInvocation>>;
    /// Marks up to `limit` invocations running on `node` and returns them:
    /// queued ones, and ones left running by a node that has not heartbeaten
    /// for `lease` (it died mid-run; this is another attempt). Tenants take
    /// turns, so one tenant's backlog does not hold up another's run: each
    /// tenant's oldest first, then each one's second oldest…, and among
    /// equals the tenant whose last run started longest ago (or never).
    async fn claim_async(&self, node: &str, limit: usize, lease: std::time::Duration) -> Result<Vec<AsyncInvocation>>;
    /// Ends a run: stores the response and the final state, or puts the
    /// invocation back in the queue (`AsyncState::Queued`, no response).
    /// `attempted: false` takes back the attempt its claim counted (the run
    /// was refused, or given up without running).
    async fn finish_async(
        &self,
        id: &str,
        state: AsyncState,
        response: Option<StoredMessage>,
        attempted: bool,
    ) -> Result<()>;
    /// Puts the invocations `node` left running when it stopped back in the
    /// queue (a node's id survives its restarts; other nodes' runs are left
    /// alone); returns how many.
    async fn requeue_running_async(&self, node: &str) -> Result<usize>;
    /// Bytes of request bodies `tenant` has waiting or running.
    async fn async_queued_bytes(&self, tenant: &str) -> Result<u64>;
    /// Deletes finished invocations (and their responses) that finished
    /// before `before_ms`; returns how many.
    async fn delete_finished_async(&self, before_ms: i64) -> Result<u64>;

    /// Records that `node` is alive (inserting it on its first beat).
    async fn heartbeat(&self, node: &NodeInfo) -> Result<()>;
    /// The nodes that have heartbeaten within `lease`, by id.
    async fn live_nodes(&self, lease: std::time::Duration) -> Result<Vec<NodeInfo>>;

    /// Changes made by other nodes sharing this store, for their caches to
    /// follow (started on the current tokio runtime; stops when the receiver
    /// is dropped). `None` for a store no other node shares.
    fn changes(&self) -> Option<tokio::sync::mpsc::Receiver<Change>> {
        None
    }
}

/// A node as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its lasting id.
    pub id: String,
    /// The address it serves on.
    pub url: String,
    /// When it started (Unix ms).
    pub started_at_ms: i64,
    /// Its last heartbeat (Unix ms; set by the store).
    pub heartbeat_at_ms: i64,
    /// What it reports of itself (devices, warm models), as JSON.
    pub details: String,
}

/// A change announced by the node that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A function was deployed again or deleted.
    Function {
        /// Its tenant.
        tenant: String,
        /// Its name.
        name: String,
    },
    /// A token was revoked.
    Token {
        /// Its public id.
        id: String,
    },
    /// Something may have changed that was not announced (a lost
    /// notification, a reconnect): drop every cached entry.
    Unknown,
}

/// An alias target as stored (JSON, the same in both backends).
pub(crate) fn target_json(target: &AliasTarget) -> Result<String> {
    serde_json::to_string(target).map_err(|e| StoreError::Corrupt(format!("encoding an alias target: {e}")))
}

/// Parses [`target_json`].
pub(crate) fn target_from_json(json: &str) -> Result<AliasTarget> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("a stored alias target: {e}")))
}

/// Whether `version` may be deleted, given the function's live versions
/// (newest last) and its aliases: not while an alias points at it
/// (`latest` unpinned follows the newest), not the last one.
pub(crate) fn check_version_deletion(version: u32, live: &[u32], aliases: &[Alias]) -> Result<(), Refusal> {
    if !live.contains(&version) {
        return Err(Refusal::NoVersion(version));
    }
    if live.len() == 1 {
        return Err(Refusal::LastVersion(version));
    }
    if let Some(alias) = aliases
        .iter()
        .find(|alias| alias.target.versions().any(|v| v == version))
    {
        return Err(Refusal::VersionInUse {
            version,
            alias: alias.name.clone(),
        });
    }
    let latest_pinned = aliases.iter().any(|alias| alias.name == LATEST);
    if !latest_pinned && live.last() == Some(&version) {
        return Err(Refusal::VersionInUse {
            version,
            alias: LATEST.to_owned(),
        });
    }
    Ok(())
}

/// What unsetting `alias` did, given whether it was set (`removed`): the
/// history entry (`latest` follows the newest live version again; any
/// other alias is gone) and whether anything changed (`latest` already
/// following the newest did not); refused for another alias not set.
pub(crate) fn unset_change(alias: &str, live: &[u32], now: i64, removed: bool) -> Result<(AliasChange, bool)> {
    match (alias == LATEST, live.last()) {
        (true, Some(&newest)) => Ok((AliasChange::follows(newest, now), removed)),
        _ if !removed => Err(StoreError::Refused(Refusal::NoAlias(alias.to_owned()))),
        _ => Ok((
            AliasChange {
                at_ms: now,
                target: None,
                follows_newest: false,
            },
            true,
        )),
    }
}

/// Checks that every version `target` names is live.
pub(crate) fn check_target(target: &AliasTarget, live: &[u32]) -> Result<(), Refusal> {
    match target.versions().find(|version| !live.contains(version)) {
        Some(missing) => Err(Refusal::NoVersion(missing)),
        None => Ok(()),
    }
}

/// A message head as stored (JSON; the body is stored beside it).
pub(crate) fn head_json(message: &StoredMessage) -> Result<String> {
    serde_json::to_string(message).map_err(|e| StoreError::Corrupt(format!("encoding a message head: {e}")))
}

/// A stored message from its head and body columns; `None` when there is
/// no head (no response yet).
pub(crate) fn message_from_parts(head: Option<String>, body: Option<Vec<u8>>) -> Result<Option<StoredMessage>> {
    let Some(head) = head else { return Ok(None) };
    let mut message: StoredMessage =
        serde_json::from_str(&head).map_err(|e| StoreError::Corrupt(format!("a stored message head: {e}")))?;
    message.body = body.unwrap_or_default();
    Ok(Some(message))
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Formats Unix milliseconds as RFC 3339 (`2026-11-28T23:48:50.123Z`).
pub fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}
