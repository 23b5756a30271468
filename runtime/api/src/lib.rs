//! The `/v1` wire contract: every request and response body of Hearth's
//! control API, and the `application/problem+json` body of every error.
//!
//! The server's handlers return these types and the Rust SDK
//! (`hearth-client`) re-exports them, so the two cannot drift apart: a field
//! added here is sent by one and read by the other from the same definition.
//! Optional fields default when absent, so an older server's answers still
//! parse. Times are RFC 3339 strings; digests are `sha256:<hex>`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The content type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";
/// Response header of `GET /v1/usage`: the commit sequence to pass as
/// `cursor` to continue after this answer (the next page, or the next poll).
pub const NEXT_CURSOR_HEADER: &str = "x-hearth-next-cursor";

/// An `application/problem+json` body (RFC 9457), as every error is sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// Problem type URI (`urn:hearth:problem:<slug>`).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Short title.
    #[serde(default)]
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What happened.
    #[serde(default)]
    pub detail: String,
    /// The invocation, if the problem came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
    /// The invocation's outcome (`timeout`, `memory_limit`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The manifest key (or limit) at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The detail again, on the Open Inference Protocol's routes (`/v2`),
    /// whose clients (`tritonclient`, KServe's) read the reason there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.title, self.detail)?;
        if let Some(id) = &self.invocation_id {
            write!(f, " (invocation {id})")?;
        }
        Ok(())
    }
}

/// `GET /healthz` and `GET /readyz` when the answer is yes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// `ok` (alive) or `ready` (accepting work).
    pub status: String,
}

/// `?tenant=NAME`: the tenant a control call acts in (the token's own when
/// absent; only the operator's token may name another).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantQuery {
    /// The tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A deployed function version: the answer to `POST /v1/functions`, and an
/// entry of [`FunctionList`] and [`FunctionDetail`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionVersion {
    /// Owning tenant.
    pub tenant: String,
    /// Function name.
    pub name: String,
    /// Version number.
    pub version: u32,
    /// `sha256:<hex>` of the component.
    pub component: String,
    /// Component size in bytes.
    pub component_size: u64,
    /// Deploy time (RFC 3339).
    pub created_at: String,
    /// Path to invoke it at, relative to the server.
    pub invoke_path: String,
    /// Models deployed with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ArtifactInfo>,
    /// Read-only assets deployed with it (named by guest path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ArtifactInfo>,
    /// How its fresh instances start, as found when it was compiled (in
    /// the deploy answer; absent where the server did not compile it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_up: Option<StartUp>,
}

/// How a function's fresh instances start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum StartUp {
    /// From a snapshot taken after the guest's start-up ran once at deploy
    /// (its `hearth-pre-init` export).
    Snapshot,
    /// Running the guest's start-up each time, as built.
    Plain {
        /// Why there is no snapshot.
        reason: String,
    },
}

/// A model or asset file deployed with a function version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArtifactInfo {
    /// Model name, or the asset's guest path.
    pub name: String,
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// `GET /v1/functions`: the newest version of each function.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionList {
    /// One entry per function.
    pub functions: Vec<FunctionVersion>,
}

/// `GET /v1/functions/{name}`: a function with its manifest and history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionDetail {
    /// The version that answers now.
    pub function: FunctionVersion,
    /// Its manifest, as parsed (every default filled in).
    pub manifest: serde_json::Value,
    /// Every version, oldest first.
    pub versions: Vec<FunctionVersion>,
}

/// `GET /v1/functions/{name}/versions`: every live version, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionList {
    /// The versions.
    pub versions: Vec<FunctionVersion>,
}

/// One version an alias sends requests to, and its weight.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliasRoute {
    /// The version.
    pub version: u32,
    /// Its weight relative to the alias's other versions (`--split 3=90,4=10`).
    pub weight: u32,
}

/// A version that gets a copy of a share of an alias's requests; its
/// answers are recorded (`shadow = true`) but never sent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliasShadow {
    /// The version.
    pub version: u32,
    /// Percentage of the alias's requests copied (1 to 100).
    pub percent: u32,
}

/// `PUT /v1/functions/{name}/aliases/{alias}`: where the alias sends
/// requests from now on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SetAlias {
    /// The versions that answer, by weight (at least one).
    pub routes: Vec<AliasRoute>,
    /// Mirrored traffic, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<AliasShadow>,
}

/// An alias as it stands, or one entry of its history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliasInfo {
    /// The alias (`latest` is the bare name).
    pub alias: String,
    /// The versions it sends requests to, by weight; empty once unset.
    pub routes: Vec<AliasRoute>,
    /// Mirrored traffic, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<AliasShadow>,
    /// `latest` following the newest version (not pinned by a deployer).
    #[serde(default)]
    pub follows_newest: bool,
    /// When it took effect (RFC 3339); empty for `latest` never changed.
    pub set_at: String,
}

/// `GET /v1/functions/{name}/aliases`: every alias, `latest` first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AliasList {
    /// The aliases.
    pub aliases: Vec<AliasInfo>,
}

/// `GET /v1/functions/{name}/aliases/{alias}/history`: its changes, oldest
/// first (for `latest`, the deploys it followed too).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AliasHistory {
    /// The changes.
    pub changes: Vec<AliasInfo>,
}

/// `GET /v1/status`: devices, warm models, and the tenant's functions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// The tenant the functions are from.
    pub tenant: String,
    /// Devices models can run on.
    pub devices: Vec<DeviceStatus>,
    /// Models warm now (for a tenant token, those its functions name).
    pub models: Vec<WarmModel>,
    /// Model loads since the server started (a model loaded once and shared
    /// counts once).
    pub model_loads: u64,
    /// Models brought back from the cold tier since the server started
    /// (read, parsed and optimised nothing).
    #[serde(default)]
    pub model_revivals: u64,
    /// Bytes (by model file size) of the CPU models kept prepared in the
    /// cold tier now.
    #[serde(default)]
    pub cold_model_bytes: u64,
    /// Instances alive now across all tenants (idle ones included).
    #[serde(default)]
    pub instances: usize,
    /// The most instances the server runs at once.
    #[serde(default)]
    pub max_instances: usize,
    /// Requests waiting for an instance across all tenants.
    #[serde(default)]
    pub queued: usize,
    /// The tenant's functions and the models they name.
    pub functions: Vec<FunctionStatus>,
    /// The nodes serving this store that heartbeat within the lease (the
    /// one node of an embedded store); shown to operator tokens only.
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
}

/// A node in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    /// Its lasting id (kept in its data directory).
    pub id: String,
    /// The address it serves on, as it sees it.
    pub url: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Its last heartbeat (RFC 3339).
    pub heartbeat_at: String,
    /// What it reports of itself at each heartbeat: `version`, `devices`
    /// (`[{"id": "cpu"}, {"id": "cuda:0", "name": …}]`) and `warm_models`
    /// (`[{"digest": "sha256:…", "device": "cpu"}]`).
    pub details: serde_json::Value,
}

/// A device in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceStatus {
    /// `cpu` or `cuda:N`.
    pub id: String,
    /// `cpu` or `cuda`.
    pub kind: String,
    /// GPU name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPU memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// GPU memory free when the server started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes_at_start: Option<u64>,
}

/// A model warm on a device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WarmModel {
    /// `sha256:<hex>` of the ONNX file.
    pub digest: String,
    /// What the manifest asked for (`auto`, `cpu`, `gpu`).
    pub placement: String,
    /// Where it runs (`cpu`, `cuda:N`).
    pub device: String,
    /// Model file size.
    pub size: u64,
    /// Live guest handles on it.
    pub users: u64,
    /// Model runs (one per batch).
    pub runs: u64,
    /// Compute calls served by those runs.
    pub calls: u64,
    /// Time the device was busy with those runs, milliseconds (to the
    /// nanosecond): the sum of the model compute billed for them.
    #[serde(default)]
    pub busy_ms: f64,
}

/// A function in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionStatus {
    /// Function name.
    pub name: String,
    /// Version answering now.
    pub version: u32,
    /// The models it names.
    pub models: Vec<NamedModel>,
    /// The instance pool of the version answering now.
    #[serde(default)]
    pub instances: InstanceStatus,
}

/// A function's instance pool in [`FunctionStatus`]: what scale to zero and
/// admission are doing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    /// Warm instances waiting for a request.
    pub idle: usize,
    /// Instances serving a request.
    pub busy: usize,
    /// Requests waiting, by QoS class (`realtime`, `standard`, `batch`).
    pub queued: BTreeMap<String, usize>,
    /// Requests that needed a fresh instance.
    pub cold_starts: u64,
    /// Requests served by a reused warm instance.
    pub warm_starts: u64,
    /// Idle instances dropped (timeout, eviction, redeploy).
    pub scale_downs: u64,
    /// Times the compiled code was unloaded after the last instance went.
    pub unloads: u64,
    /// Requests refused with 429 or 503.
    pub rejected: u64,
    /// Whether the compiled code is in memory.
    pub loaded: bool,
}

/// A model named by a function.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NamedModel {
    /// Name the guest loads it by.
    pub name: String,
    /// `sha256:<hex>` of its content.
    pub digest: String,
    /// Whether it is loaded now.
    pub warm: bool,
}

/// `POST /v1/functions/{name}/invocations` query: what the guest will see.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubmitQuery {
    /// Path below the function's mount, with an optional query (`/v1/x?y=1`).
    #[serde(default = "root")]
    pub path: String,
    /// HTTP method.
    #[serde(default = "post")]
    pub method: String,
    /// Tenant (the token's own by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

fn root() -> String {
    "/".into()
}

fn post() -> String {
    "POST".into()
}

impl Default for SubmitQuery {
    fn default() -> Self {
        SubmitQuery {
            path: root(),
            method: post(),
            tenant: None,
        }
    }
}

/// An asynchronous invocation: the answer to a submission (202) and to
/// `GET /v1/functions/{name}/invocations/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AsyncInvocation {
    /// Its id (UUIDv7), also the invocation id of the run.
    pub id: String,
    /// The function.
    pub function: String,
    /// `queued`, `running`, `succeeded` (the function answered, with any
    /// status) or `failed` (Hearth got no answer: trap, timeout, deleted).
    pub state: String,
    /// Runs started (more than one when a server stopped mid-run).
    pub attempts: u32,
    /// When it was accepted (RFC 3339).
    pub submitted_at: String,
    /// When its last run started.
    pub started_at: Option<String>,
    /// When it finished.
    pub finished_at: Option<String>,
    /// The stored response, once finished (absent from the 202).
    pub response: Option<StoredResponse>,
}

impl AsyncInvocation {
    /// Whether it has finished (succeeded or failed).
    pub fn is_finished(&self) -> bool {
        self.state == "succeeded" || self.state == "failed"
    }
}

/// The response an asynchronous invocation stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// The body as text, when it is UTF-8.
    pub body: Option<String>,
    /// The body, base64.
    pub body_base64: String,
}

/// `POST /v1/tokens` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Tenant (the caller's own by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// `admin`, `deployer`, `invoker` or `billing`.
    pub role: String,
    /// Lifetime like `30d`, `12h`, `90m` (forever when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// How every token's value starts (ids start `tok_`).
pub const TOKEN_VALUE_PREFIX: &str = "hth_";

/// `POST /v1/tokens/revoke` body: a token revoked by its value, which never
/// goes in a URL (URLs end up in access logs and proxies).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RevokeToken {
    /// The secret (`hth_…`).
    pub token: String,
}

/// A bearer token as the server shows it. `token` (the secret) is present
/// only in the answer to `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenInfo {
    /// Public id (`tok_…`), for revocation.
    pub id: String,
    /// Tenant it acts for.
    pub tenant: String,
    /// `admin`, `deployer`, `invoker` or `billing`.
    pub role: String,
    /// The operator's token (bootstrap), valid in every tenant.
    pub operator: bool,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Expiry, if any.
    pub expires_at: Option<String>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<String>,
    /// The secret, shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `GET /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenList {
    /// The tenant's tokens, secrets never included.
    pub tokens: Vec<TokenInfo>,
}

/// Which usage records `GET /v1/usage` and `GET /v1/usage/summary` cover.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UsageQuery {
    /// Tenant (the token's own by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only this function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// RFC 3339 time or `YYYY-MM-DD` (UTC midnight), inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Same forms, exclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// `csv`, `jsonl` (default) or `cloudevents` (exports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Answer at most this many records, then `x-hearth-next-cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Continue after this cursor (from `x-hearth-next-cursor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `GET /v1/usage/summary`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageSummaryPage {
    /// One row per tenant, function and UTC day.
    pub rows: Vec<UsageSummary>,
}

/// Usage totals of one function on one UTC day.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageSummary {
    /// Tenant.
    pub tenant: String,
    /// Function.
    pub function: String,
    /// Version (each version of a function has rows of its own).
    #[serde(default)]
    pub version: u32,
    /// Shadow copies (apart from the answered calls of the same version).
    #[serde(default)]
    pub shadow: bool,
    /// Of the calls that ran, those that ended in a 5xx.
    #[serde(default)]
    pub errors: u64,
    /// Mean wall time, milliseconds.
    #[serde(default)]
    pub mean_wall_ms: f64,
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Invocations recorded.
    pub invocations: u64,
    /// Of which ran.
    pub ran: u64,
    /// Of which were refused (429/503).
    pub rejected: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Billed milliseconds.
    pub billed_ms: u64,
    /// Guest CPU microseconds.
    pub guest_cpu_us: u64,
    /// Model compute milliseconds, on every device.
    #[serde(default)]
    pub compute_ms: f64,
    /// Of which on GPUs.
    pub gpu_ms: f64,
    /// Inference calls.
    pub inference_calls: u64,
    /// Request bytes.
    pub bytes_in: u64,
    /// Response bytes.
    pub bytes_out: u64,
    /// Cost, decimal with nine places.
    pub cost: String,
    /// Its currency.
    pub currency: String,
}

#[cfg(test)]
mod tests;
