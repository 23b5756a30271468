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
    /// Deletes a function; its version numbers are not reused by a later
    /// deploy of the same name. Returns whether it existed.
    async fn delete_function(&self, tenant: &str, name: &str) -> Result<bool>;

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
