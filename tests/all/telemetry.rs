//! Telemetry: `/metrics` in the Prometheus format, scraped by a real
//! Prometheus server (the Debian package, installed by `.ci/run`), whose
//! HTTP API then answers for the invocation counter.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::server::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Kills the Prometheus child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_invocation_counter() {
    let prometheus = which("prometheus")
        .unwrap_or_else(|_| panic!("prometheus is not installed: apt-get install -y prometheus (make test does)"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "public = true\n").await;
    for _ in 0..7 {
        let response = http().get(server.fn_url("hello", "/")).send().await.expect("hello");
        assert_eq!(response.status(), 200);
        // The invocation is complete (and counted) when its body has ended.
        response.text().await.expect("body");
    }

    // Our own exposition first.
    let metrics = http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = metrics.text().await.expect("text");
    let counter = text
        .lines()
        .find(|l| l.starts_with("hearth_invocations_total{") && l.contains("function=\"hello\""))
        .unwrap_or_else(|| panic!("no invocation counter:\n{text}"));
    assert!(counter.ends_with(" 7"), "{counter}");
    for name in [
        "hearth_invocation_duration_seconds_bucket",
        "hearth_instances",
        "hearth_queue_depth",
        "hearth_cold_starts_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }

    // Then a real Prometheus scrapes it.
    let port = free_port();
    let target = server.url.trim_start_matches("http://").to_owned();
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hearth\n    authorization:\n      credentials: '{TOKEN}'\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("config");
    let _prometheus = Child(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("prometheus.log")).expect("log"))
            .spawn()
            .expect("starting prometheus"),
    );
    let query =
        format!("http://127.0.0.1:{port}/api/v1/query?query=sum(hearth_invocations_total%7Bfunction%3D%22hello%22%7D)");
    let guard = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(response) = reqwest::get(&query).await
            && let Ok(answer) = response.json::<serde_json::Value>().await
            && let Some(value) = answer["data"]["result"][0]["value"][1].as_str()
        {
            assert_eq!(value, "7", "{answer}");
            break;
        }
        assert!(
            Instant::now() < guard,
            "Prometheus never reported the counter; its log:\n{}",
            std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn which(binary: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(binary))
        .find(|path| path.is_file())
        .ok_or(())
}

/// How long a test waits for a log line before giving up (a hang guard, not
/// a timing assertion: lines are written by a thread of their own).
const LOG_GUARD: Duration = Duration::from_secs(30);

#[tokio::test]
async fn every_invocation_leaves_a_json_request_log_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &["--log-format", "json"]);
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "public = true\n").await;
    let response = http().get(server.fn_url("hello", "/")).send().await.expect("hello");
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-hearth-invocation-id"]
        .to_str()
        .expect("ascii")
        .to_owned();

    let guard = Instant::now() + LOG_GUARD;
    let line = loop {
        let log = server.log();
        // Whole lines only: the last one may still be being written.
        let lines: Vec<serde_json::Value> = log
            .split_inclusive('\n')
            .filter(|line| line.ends_with('\n'))
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
            .collect();
        if let Some(line) = lines
            .into_iter()
            .find(|l| l["target"] == "hearth::request" && l["fields"]["invocation_id"] == id.as_str())
        {
            break line;
        }
        assert!(Instant::now() < guard, "no request log line for {id}:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fields = &line["fields"];
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(line["timestamp"].is_string(), "{line}");
    assert_eq!(fields["tenant"], "default", "{line}");
    assert_eq!(fields["function"], "hello", "{line}");
    assert_eq!(fields["status"], 200, "{line}");
    assert_eq!(fields["outcome"], "ok", "{line}");
    assert!(fields["wall_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{line}");
}

/// `/metrics` names every tenant's functions: without a token it is 401, a
/// tenant's own token is 403, and an operator token or the metrics token
/// (`--metrics-token`) may read it; `--public-metrics` opens it.
#[tokio::test]
async fn metrics_need_an_operator_or_the_metrics_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &["--metrics-token", "hth_scraper"]);
    let url = format!("{}/metrics", server.url);
    let anonymous = reqwest::get(&url).await.expect("anonymous");
    problem(anonymous, 401).await;
    let reader = server
        .client()
        .create_token(Some("default"), "billing", None)
        .await
        .expect("token")
        .token
        .expect("secret");
    let tenant = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&reader)
        .send()
        .await
        .expect("tenant");
    problem(tenant, 403).await;
    let scraper = reqwest::Client::new()
        .get(&url)
        .bearer_auth("hth_scraper")
        .send()
        .await
        .expect("scraper");
    assert_eq!(scraper.status(), 200);
    assert_eq!(http().get(&url).send().await.expect("operator").status(), 200);
    drop(server);

    let open = Server::start(&tmp.path().join("open"), &["--public-metrics"]);
    let anyone = reqwest::get(format!("{}/metrics", open.url)).await.expect("anyone");
    assert_eq!(anyone.status(), 200);
}
