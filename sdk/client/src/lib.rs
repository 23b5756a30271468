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

pub use hearth_api::{
    AliasHistory, AliasInfo, AliasList, AliasRoute, AliasShadow, ArtifactInfo, AsyncInvocation, CreateToken,
    DeviceStatus, FunctionDetail, FunctionList, FunctionStatus, FunctionVersion, InstanceStatus, NEXT_CURSOR_HEADER,
    NamedModel, NodeStatus, Problem, SetAlias, StartUp, Status, StoredResponse, SubmitQuery, TokenInfo, TokenList,
    UsageQuery, UsageSummary, UsageSummaryPage, VersionList, WarmModel,
};
pub use project::Project;

/// Bytes read from a file per uploaded chunk: each read of a `tokio::fs::File`
/// is a trip to the blocking pool, so the reader's 4 KiB default made a
/// 17 MiB component ~4,000 of them; 256 KiB keeps the progress bar smooth.
const UPLOAD_CHUNK: usize = 256 << 10;

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

/// What [`Client::usage_export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageExport {
    /// Bytes written.
    pub bytes: u64,
    /// The cursor to pass as [`UsageQuery::cursor`] to get only what was
    /// committed after this export.
    pub next_cursor: Option<String>,
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
            let stream = tokio_util::io::ReaderStream::with_capacity(file, UPLOAD_CHUNK).inspect_ok(move |chunk| {
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
            .query(&SubmitQuery {
                path: invocation.path.clone(),
                method: invocation.method.to_string(),
                tenant: None,
            })
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
    /// into `out`, in commit order after `query.cursor`; returns the bytes
    /// written and the cursor to continue from. `progress(bytes)` is called
    /// as they arrive.
    pub async fn usage_export(
        &self,
        query: &UsageQuery,
        format: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
        progress: impl Fn(u64),
    ) -> Result<UsageExport> {
        use futures::StreamExt as _;
        use tokio::io::AsyncWriteExt as _;
        let url = self.control_url("/usage");
        let query = UsageQuery {
            format: Some(format.to_owned()),
            ..query.clone()
        };
        let response = self
            .send(self.request(reqwest::Method::GET, &url).query(&query), &url)
            .await?;
        let next_cursor = response
            .headers()
            .get(NEXT_CURSOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
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
        Ok(UsageExport {
            bytes: written,
            next_cursor,
        })
    }

    /// Creates a token for `tenant` (the client's by default) with `role`,
    /// expiring after `expires` (`30d`, `12h`; never when `None`).
    pub async fn create_token(&self, tenant: Option<&str>, role: &str, expires: Option<&str>) -> Result<TokenInfo> {
        let url = format!("{}/v1/tokens", self.server);
        let body = CreateToken {
            tenant: Some(tenant.unwrap_or(&self.tenant).to_owned()),
            role: role.to_owned(),
            expires: expires.map(str::to_owned),
        };
        let response = self
            .send(self.request(reqwest::Method::POST, &url).json(&body), &url)
            .await?;
        json(response, &url).await
    }

    /// The tokens of the client's tenant (secrets never included).
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        let url = self.control_url("/tokens");
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        Ok(json::<TokenList>(response, &url).await?.tokens)
    }

    /// Revokes a token by its id (`tok_…`) or by the token itself (sent
    /// in the body, never in the URL).
    pub async fn revoke_token(&self, id_or_token: &str) -> Result<TokenInfo> {
        if id_or_token.starts_with(hearth_api::TOKEN_VALUE_PREFIX) {
            let url = format!("{}/v1/tokens/revoke", self.server);
            let body = hearth_api::RevokeToken {
                token: id_or_token.to_owned(),
            };
            let response = self
                .send(self.request(reqwest::Method::POST, &url).json(&body), &url)
                .await?;
            return json(response, &url).await;
        }
        let url = format!("{}/v1/tokens/{id_or_token}", self.server);
        let response = self.send(self.request(reqwest::Method::DELETE, &url), &url).await?;
        json(response, &url).await
    }

    /// Usage totals per function and UTC day.
    pub async fn usage_summary(&self, query: &UsageQuery) -> Result<Vec<UsageSummary>> {
        let url = self.control_url("/usage/summary");
        let response = self
            .send(self.request(reqwest::Method::GET, &url).query(query), &url)
            .await?;
        Ok(json::<UsageSummaryPage>(response, &url).await?.rows)
    }

    /// The newest version of each function.
    pub async fn list(&self) -> Result<Vec<FunctionVersion>> {
        let url = self.control_url("/functions");
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        Ok(json::<FunctionList>(response, &url).await?.functions)
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

    /// Every live version of a function, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<FunctionVersion>> {
        let url = self.control_url(&format!("/functions/{name}/versions"));
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        Ok(json::<VersionList>(response, &url).await?.versions)
    }

    /// Deletes one version (refused while an alias points at it).
    pub async fn delete_version(&self, name: &str, version: u32) -> Result<()> {
        let url = self.control_url(&format!("/functions/{name}/versions/{version}"));
        self.send(self.request(reqwest::Method::DELETE, &url), &url).await?;
        Ok(())
    }

    /// The aliases of a function, `latest` first.
    pub async fn aliases(&self, name: &str) -> Result<Vec<AliasInfo>> {
        let url = self.control_url(&format!("/functions/{name}/aliases"));
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        Ok(json::<AliasList>(response, &url).await?.aliases)
    }

    /// Points an alias at versions by weight (and optionally a shadow).
    pub async fn set_alias(&self, name: &str, alias: &str, target: &SetAlias) -> Result<AliasInfo> {
        let url = self.control_url(&format!("/functions/{name}/aliases/{alias}"));
        let response = self
            .send(self.request(reqwest::Method::PUT, &url).json(target), &url)
            .await?;
        json(response, &url).await
    }

    /// Unsets an alias (`latest` then follows the newest version again).
    pub async fn unset_alias(&self, name: &str, alias: &str) -> Result<()> {
        let url = self.control_url(&format!("/functions/{name}/aliases/{alias}"));
        self.send(self.request(reqwest::Method::DELETE, &url), &url).await?;
        Ok(())
    }

    /// An alias's changes, oldest first.
    pub async fn alias_history(&self, name: &str, alias: &str) -> Result<Vec<AliasInfo>> {
        let url = self.control_url(&format!("/functions/{name}/aliases/{alias}/history"));
        let response = self.send(self.request(reqwest::Method::GET, &url), &url).await?;
        Ok(json::<AliasHistory>(response, &url).await?.changes)
    }

    /// Points an alias back at its previous target.
    pub async fn rollback(&self, name: &str, alias: &str) -> Result<AliasInfo> {
        let url = self.control_url(&format!("/functions/{name}/aliases/{alias}/rollback"));
        let response = self.send(self.request(reqwest::Method::POST, &url), &url).await?;
        json(response, &url).await
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
        .is_some_and(|v| v.starts_with(hearth_api::PROBLEM_CONTENT_TYPE));
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
        error: None,
    }
}

async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response, url: &str) -> Result<T> {
    response.json().await.map_err(|source| ClientError::Transport {
        url: url.to_owned(),
        error: source,
    })
}
