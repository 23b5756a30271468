//! Hearth's Rust SDK: deploy, invoke, list, show and delete functions.
//!
//! The `hearth` CLI is built on this crate; anything the CLI does, a program
//! can do with a [`Client`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), hearth_client::ClientError> {
//! let client = hearth_client::Client::new("http://127.0.0.1:8080", Some("hth_...".into()), "default")?;
//! let project = hearth_client::Project::load("functions/echo".as_ref())?;
//! let deployed = client.deploy(&project, |_sent, _total| {}).await?;
//! let response = client.invoke(&deployed.name, hearth_client::Invocation::post("/", "hi")).await?;
//! # Ok(()) }
//! ```

mod project;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::TryStreamExt as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

pub use project::Project;

/// Result of an SDK call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a problem.
    #[error("{0}")]
    Api(Box<Problem>),
    /// The server could not be reached, or the connection broke.
    #[error("request to {url} failed: {}", transport_cause(error))]
    Transport {
        /// The URL called.
        url: String,
        /// What went wrong (not exposed as `source`: its chain repeats the URL).
        error: reqwest::Error,
    },
    /// A local file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] hearth_manifest::ManifestError),
    /// The project cannot be deployed as it is (no component, build failed…).
    #[error("{0}")]
    Project(String),
    /// A setting is wrong (bad server URL, bad header).
    #[error("{0}")]
    Config(String),
}

/// An `application/problem+json` answer from the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// Problem type URI.
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
    /// The manifest key at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
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

/// A deployed function version.
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

/// A function with its manifest and history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionDetail {
    /// The version that answers now.
    pub function: FunctionVersion,
    /// Its manifest.
    pub manifest: serde_json::Value,
    /// Every version, oldest first.
    pub versions: Vec<FunctionVersion>,
}

/// What `GET /v1/status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

/// A device in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

/// A model warm on a device.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

/// A function in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionStatus {
    /// Function name.
    pub name: String,
    /// Version answering now.
    pub version: u32,
    /// The models it names.
    pub models: Vec<NamedModel>,
    /// Its instance pool.
    #[serde(default)]
    pub instances: InstanceStatus,
}

/// A function's instance pool in [`FunctionStatus`]: what scale to zero and
/// admission are doing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Warm instances waiting for a request.
    pub idle: usize,
    /// Instances serving a request.
    pub busy: usize,
    /// Requests waiting, by QoS class (`realtime`, `standard`, `batch`).
    pub queued: std::collections::BTreeMap<String, usize>,
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedModel {
    /// Name the guest loads it by.
    pub name: String,
    /// `sha256:<hex>` of its content.
    pub digest: String,
    /// Whether it is loaded now.
    pub warm: bool,
}

/// An asynchronous invocation as the server reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// The stored response, once finished.
    pub response: Option<StoredResponse>,
}

impl AsyncInvocation {
    /// Whether it has finished (succeeded or failed).
    pub fn is_finished(&self) -> bool {
        self.state == "succeeded" || self.state == "failed"
    }
}

/// The response an asynchronous invocation stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// A bearer token as the server shows it. `token` (the secret) is present
/// only in the answer to [`Client::create_token`].
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Which usage records to export or sum up.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// RFC 3339 time or `YYYY-MM-DD`, inclusive.
    pub since: Option<String>,
    /// RFC 3339 time or `YYYY-MM-DD`, exclusive.
    pub until: Option<String>,
    /// Only this function.
    pub function: Option<String>,
}

impl UsageQuery {
    fn pairs(&self) -> Vec<(&'static str, &str)> {
        let mut pairs = Vec::new();
        for (name, value) in [
            ("since", &self.since),
            ("until", &self.until),
            ("function", &self.function),
        ] {
            if let Some(value) = value {
                pairs.push((name, value.as_str()));
            }
        }
        pairs
    }
}

/// Usage totals of one function on one UTC day.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UsageSummary {
    /// Tenant.
    pub tenant: String,
    /// Function.
    pub function: String,
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
    /// GPU milliseconds.
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

/// A request to send to a function.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// HTTP method.
    pub method: reqwest::Method,
    /// Path below the function's mount, with query (`/v1/read?x=1`).
    pub path: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: bytes::Bytes,
}

impl Invocation {
    /// A GET of `path`.
    pub fn get(path: &str) -> Invocation {
        Invocation {
            method: reqwest::Method::GET,
            path: path.to_owned(),
            headers: Vec::new(),
            body: bytes::Bytes::new(),
        }
    }

    /// A POST of `body` to `path`.
    pub fn post(path: &str, body: impl Into<bytes::Bytes>) -> Invocation {
        Invocation {
            method: reqwest::Method::POST,
            body: body.into(),
            ..Invocation::get(path)
        }
    }
}

/// A connection to a Hearth server, acting in one tenant.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
    tenant: String,
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:8080`).
    pub fn new(server: &str, token: Option<String>, tenant: &str) -> Result<Client> {
        let server = server.trim_end_matches('/').to_owned();
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            return Err(ClientError::Config(format!(
                "server URL `{server}` must start with http:// or https://"
            )));
        }
        let http = reqwest::Client::builder()
            .build()
            .map_err(|source| ClientError::Transport {
                url: server.clone(),
                error: source,
            })?;
        Ok(Client {
            http,
            server,
            token,
            tenant: tenant.to_owned(),
        })
    }

    /// The server's base URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The full URL a function is invoked at.
    pub fn invoke_url(&self, function: &str) -> String {
        format!("{}/fn/{}/{}/", self.server, self.tenant, function)
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, url);
        match &self.token {
            Some(token) => builder.header(AUTHORIZATION, format!("Bearer {token}")),
            None => builder,
        }
    }

    fn control_url(&self, path: &str) -> String {
        format!("{}/v1{path}?tenant={}", self.server, self.tenant)
    }

    /// Uploads the project's manifest, built component, models and asset
    /// files as a new version. `progress(sent, total)` is called as the
    /// bytes stream, summed over every file.
    pub async fn deploy(
        &self,
        project: &Project,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<FunctionVersion> {
        let mut uploads = vec![("component".to_owned(), project.component_path()?, "application/wasm")];
        for model in &project.manifest().models {
            uploads.push((
                format!("model:{}", model.name),
                project.path_of(&model.path),
                "application/onnx",
            ));
        }
        for (i, file) in project.manifest().files.iter().enumerate() {
            uploads.push((
                format!("file:{i}"),
                project.path_of(&file.source),
                "application/octet-stream",
            ));
        }
        let mut opened = Vec::with_capacity(uploads.len());
        for (part, path, mime) in uploads {
            let io = |source| ClientError::Io {
                path: path.clone(),
                source,
            };
            let file = tokio::fs::File::open(&path).await.map_err(io)?;
            let len = file.metadata().await.map_err(io)?.len();
            opened.push((part, path, mime, file, len));
        }
        let total: u64 = opened.iter().map(|o| o.4).sum();
        let sent = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(progress);
        let manifest = reqwest::multipart::Part::text(project.manifest_text().to_owned())
            .mime_str("application/toml")
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let mut form = reqwest::multipart::Form::new().part("manifest", manifest);
        for (part, path, mime, file, len) in opened {
            let (sent, progress) = (sent.clone(), progress.clone());
            let stream = tokio_util::io::ReaderStream::new(file).inspect_ok(move |chunk| {
                let now = sent.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
                progress(now, total);
            });
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let body = reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
                .file_name(file_name)
                .mime_str(mime)
                .map_err(|e| ClientError::Config(e.to_string()))?;
            form = form.part(part, body);
        }
        let url = self.control_url("/functions");
        let response = self
            .send(self.request(reqwest::Method::POST, &url).multipart(form), &url)
            .await?;
        json(response, &url).await
    }

    /// Sends `invocation` to `function` and returns the raw response, whatever
    /// its status: a function's 4xx is an answer, not an SDK error.
    pub async fn invoke(&self, function: &str, invocation: Invocation) -> Result<reqwest::Response> {
        let path = invocation.path.trim_start_matches('/');
        let url = format!("{}{path}", self.invoke_url(function));
        let mut headers = HeaderMap::new();
        for (name, value) in &invocation.headers {
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| ClientError::Config(format!("header name `{name}`: {e}")))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|e| ClientError::Config(format!("header `{name}` value: {e}")))?;
            headers.append(name, value);
        }
        let builder = self
            .request(invocation.method.clone(), &url)
            .headers(headers)
            .body(invocation.body.clone());
        builder
            .send()
            .await
            .map_err(|error| ClientError::Transport { url, error })
    }

    /// Submits `invocation` to run asynchronously (at the `batch` class, when
    /// capacity allows); returns at once with its id.
    pub async fn submit(&self, function: &str, invocation: Invocation) -> Result<AsyncInvocation> {
        let url = self.control_url(&format!("/functions/{function}/invocations"));
        let mut builder = self
            .request(reqwest::Method::POST, &url)
            .query(&[
                ("path", invocation.path.as_str()),
                ("method", invocation.method.as_str()),
            ])
            .body(invocation.body.clone());
        for (name, value) in &invocation.headers {
            builder = builder.header(name.trim(), value.trim());
        }
        let response = self.send(builder, &url).await?;
        json(response, &url).await
    }

    /// An asynchronous invocation's state and, once finished, its response.
    pub async fn async_invocation(&self, function: &str, id: &str) -> Result<AsyncInvocation> {
        let url = self.control_url(&format!("/functions/{function}/invocations/{id}"));
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        json(response, &url).await
    }

    /// Streams usage records (`format`: `csv`, `jsonl` or `cloudevents`)
    /// into `out`; returns the bytes written. `progress(bytes)` is called as
    /// they arrive.
    pub async fn usage_export(
        &self,
        query: &UsageQuery,
        format: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
        progress: impl Fn(u64),
    ) -> Result<u64> {
        use futures::StreamExt as _;
        use tokio::io::AsyncWriteExt as _;
        let url = self.control_url("/usage");
        let mut pairs = query.pairs();
        pairs.push(("format", format));
        let response = self
            .send(self.request(reqwest::Method::GET, &url).query(&pairs), &url)
            .await?;
        let mut written = 0u64;
        let mut chunks = response.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|error| ClientError::Transport {
                url: url.clone(),
                error,
            })?;
            out.write_all(&chunk).await.map_err(|source| ClientError::Io {
                path: "<usage export output>".into(),
                source,
            })?;
            written += chunk.len() as u64;
            progress(written);
        }
        out.flush().await.map_err(|source| ClientError::Io {
            path: "<usage export output>".into(),
            source,
        })?;
        Ok(written)
    }

    /// Creates a token for `tenant` (the client's by default) with `role`,
    /// expiring after `expires` (`30d`, `12h`; never when `None`).
    pub async fn create_token(&self, tenant: Option<&str>, role: &str, expires: Option<&str>) -> Result<TokenInfo> {
        let url = format!("{}/v1/tokens", self.server);
        let body = serde_json::json!({
            "tenant": tenant.unwrap_or(&self.tenant),
            "role": role,
            "expires": expires,
        });
        let response = self
            .send(self.request(reqwest::Method::POST, &url).json(&body), &url)
            .await?;
        json(response, &url).await
    }

    /// The tokens of the client's tenant (secrets never included).
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        #[derive(Deserialize)]
        struct List {
            tokens: Vec<TokenInfo>,
        }
        let url = self.control_url("/tokens");
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        Ok(json::<List>(response, &url).await?.tokens)
    }

    /// Revokes a token by its id (`tok_…`) or by the token itself.
    pub async fn revoke_token(&self, id_or_token: &str) -> Result<TokenInfo> {
        let url = format!("{}/v1/tokens/{id_or_token}", self.server);
        let response = self.send(self.request(reqwest::Method::DELETE, &url), &url).await?;
        json(response, &url).await
    }

    /// Usage totals per function and UTC day.
    pub async fn usage_summary(&self, query: &UsageQuery) -> Result<Vec<UsageSummary>> {
        #[derive(Deserialize)]
        struct Rows {
            rows: Vec<UsageSummary>,
        }
        let url = self.control_url("/usage/summary");
        let response = self
            .send(self.request(reqwest::Method::GET, &url).query(&query.pairs()), &url)
            .await?;
        Ok(json::<Rows>(response, &url).await?.rows)
    }

    /// The newest version of each function.
    pub async fn list(&self) -> Result<Vec<FunctionVersion>> {
        #[derive(Deserialize)]
        struct List {
            functions: Vec<FunctionVersion>,
        }
        let url = self.control_url("/functions");
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        Ok(json::<List>(response, &url).await?.functions)
    }

    /// One function, its manifest and its versions.
    pub async fn show(&self, name: &str) -> Result<FunctionDetail> {
        let url = self.control_url(&format!("/functions/{name}"));
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        json(response, &url).await
    }

    /// Devices, warm models, and the tenant's functions with their models.
    pub async fn status(&self) -> Result<Status> {
        let url = self.control_url("/status");
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        json(response, &url).await
    }

    /// Deletes a function.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let url = self.control_url(&format!("/functions/{name}"));
        self.send(self.request(reqwest::Method::DELETE, &url), &url).await?;
        Ok(())
    }

    /// Sends a control request; a non-2xx answer becomes [`ClientError::Api`].
    async fn send(&self, builder: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response> {
        let response = builder.send().await.map_err(|source| ClientError::Transport {
            url: url.to_owned(),
            error: source,
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(ClientError::Api(Box::new(problem_of(response).await)))
    }
}

/// The innermost useful cause of a transport error (reqwest repeats the URL
/// at every level of its chain).
fn transport_cause(err: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Reads a problem body from a failed response (or describes a non-problem one).
pub async fn problem_of(response: reqwest::Response) -> Problem {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    let text = response.text().await.unwrap_or_default();
    if is_problem && let Ok(problem) = serde_json::from_str::<Problem>(&text) {
        return problem;
    }
    Problem {
        kind: "about:blank".into(),
        title: status.canonical_reason().unwrap_or("error").into(),
        status: status.as_u16(),
        detail: text,
        invocation_id: None,
        outcome: None,
        key: None,
    }
}

async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response, url: &str) -> Result<T> {
    response.json().await.map_err(|source| ClientError::Transport {
        url: url.to_owned(),
        error: source,
    })
}
