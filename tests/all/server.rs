//! Starting and stopping a real `hearth serve` for a test.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The admin token every test server accepts.
pub const TOKEN: &str = "hth_test-admin-token";

/// How long a server may take to print its address before the test gives up
/// (a hang guard, not a timing assertion).
const START_GUARD: Duration = Duration::from_secs(120);

pub fn hearth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hearth")
}

/// A running `hearth serve`, killed when dropped.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts a server on a free port with a data directory in `data_dir`.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::start_with_env(data_dir, extra_args, &[])
    }

    /// [`Server::start`] with more environment variables (`FAILPOINTS`…).
    pub fn start_with_env(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .expect("log file");
        let mut child = Command::new(hearth_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            .env("HEARTH_ADMIN_TOKEN", TOKEN)
            .env("HEARTH_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawning hearth serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("hearth listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = match rx.recv_timeout(START_GUARD) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
                panic!("hearth serve did not start; its log:\n{log}");
            }
        };
        Server {
            child: Some(child),
            url,
            data_dir: data_dir.to_owned(),
        }
    }

    /// An SDK client acting as the operator in tenant `default`.
    pub fn client(&self) -> hearth_client::Client {
        hearth_client::Client::new(&self.url, Some(TOKEN.into()), "default").expect("client")
    }

    /// A `hearth` CLI command pointed at this server with the admin token.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(hearth_bin());
        command
            .env("HEARTH_URL", &self.url)
            .env("HEARTH_TOKEN", TOKEN)
            .env_remove("HEARTH_TENANT");
        command
    }

    /// The invocation URL of a function in tenant `default`.
    pub fn fn_url(&self, function: &str, rest: &str) -> String {
        format!("{}/fn/default/{function}{rest}", self.url)
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it
    /// exited successfully.
    pub fn terminate(mut self) -> bool {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        child.wait().expect("wait").success()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The server's resident memory, in KiB (Linux `VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a project directory whose `hearth.toml` deploys `component` as
/// `name`, with extra manifest lines.
pub fn project(dir: &Path, name: &str, component: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("project dir");
    std::fs::write(
        dir.join("hearth.toml"),
        format!("name = \"{name}\"\ncomponent = {component:?}\n{extra}"),
    )
    .expect("manifest");
    dir.to_owned()
}

/// Deploys `component` as `name` through the SDK and returns the version.
pub async fn deploy(server: &Server, dir: &Path, name: &str, component: &str, extra: &str) -> u32 {
    let dir = project(&dir.join(name), name, component, extra);
    let project = hearth_client::Project::load(&dir).expect("project");
    server
        .client()
        .deploy(&project, |_, _| {})
        .await
        .expect("deploy")
        .version
}

/// How long any test request may take before it fails: a deadline that
/// never fires fails its test instead of hanging CI (a hang guard, not a
/// timing assertion).
pub const REQUEST_GUARD: Duration = Duration::from_secs(120);

/// A reqwest client with the admin token preset and [`REQUEST_GUARD`].
pub fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(REQUEST_GUARD)
        .build()
        .expect("client")
}

/// Asserts that `response` is a problem with `status`, and returns its body.
pub async fn problem(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .expect("content-type")
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: serde_json::Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status);
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:hearth:problem:")),
        "{body}"
    );
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    body
}

/// Asserts the server still serves: `hello` (deployed by the caller) answers.
pub async fn still_serves(server: &Server) {
    let response = http().get(server.fn_url("hello", "/")).send().await.expect("hello");
    assert_eq!(response.status(), 200, "server stopped serving; log:\n{}", server.log());
    assert_eq!(response.text().await.expect("body"), "hello from hearth\n");
}

/// The instance pool of `function` in tenant `default`, from `/v1/status`.
pub async fn instances(server: &Server, function: &str) -> hearth_client::InstanceStatus {
    let status = server.client().status().await.expect("status");
    status
        .functions
        .into_iter()
        .find(|f| f.name == function)
        .map(|f| f.instances)
        .unwrap_or_else(|| panic!("`{function}` not in /v1/status"))
}

/// Polls `/v1/status` until `done` holds for `function`'s pool, and returns
/// it; panics after a generous guard (a hang guard, not a timing assertion).
pub async fn wait_for_instances(
    server: &Server,
    function: &str,
    what: &str,
    done: impl Fn(&hearth_client::InstanceStatus) -> bool,
) -> hearth_client::InstanceStatus {
    let guard = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pool = instances(server, function).await;
        if done(&pool) {
            return pool;
        }
        assert!(std::time::Instant::now() < guard, "{function} never {what}: {pool:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /v1/usage?{query}` as the operator in tenant `default`: the export's
/// text, after checking it answered 200.
pub async fn usage_export(server: &Server, query: &str) -> String {
    let response = http()
        .get(format!("{}/v1/usage?{query}", server.url))
        .send()
        .await
        .expect("usage export");
    assert_eq!(response.status(), 200, "{query}");
    response.text().await.expect("export body")
}

/// Posts a raw deploy upload (`form`) as the operator; the answer.
pub async fn post_deploy(server: &Server, form: reqwest::multipart::Form) -> reqwest::Response {
    http()
        .post(format!("{}/v1/functions", server.url))
        .multipart(form)
        .send()
        .await
        .expect("deploy")
}

/// The server's `/metrics` text.
pub async fn metrics_text(server: &Server) -> String {
    http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of the first `/metrics` sample whose line starts with `prefix`
/// (the series name and, to pick one, the start of its labels).
pub async fn metric(server: &Server, prefix: &str) -> f64 {
    let metrics = metrics_text(server).await;
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{prefix} in\n{metrics}"))
}

/// Names of the functions deployed in tenant `default`, sorted.
pub async fn function_names(server: &Server) -> Vec<String> {
    server
        .client()
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|f| f.name)
        .collect()
}

/// Every precompiled artifact in `data`, with its modification time: a
/// recompilation rewrites the file.
pub fn compiled_artifacts(data: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut artifacts: Vec<_> = std::fs::read_dir(data.join("compiled"))
        .expect("compiled dir")
        .map(|entry| {
            let path = entry.expect("entry").path();
            let modified = std::fs::metadata(&path).expect("metadata").modified().expect("mtime");
            (path, modified)
        })
        .collect();
    artifacts.sort();
    artifacts
}
