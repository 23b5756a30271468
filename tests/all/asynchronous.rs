//! Asynchronous invocations: accepted at once, run when capacity allows,
//! results stored, and both survive a restart.

use crate::server::*;

/// Polls an asynchronous invocation until it has finished (a hang guard,
/// not a timing assertion).
pub(crate) async fn wait_finished(server: &Server, function: &str, id: &str) -> hearth_client::AsyncInvocation {
    wait_state(server, function, id, |i| i.is_finished()).await
}

async fn wait_state(
    server: &Server,
    function: &str,
    id: &str,
    done: impl Fn(&hearth_client::AsyncInvocation) -> bool,
) -> hearth_client::AsyncInvocation {
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let invocation = server.client().async_invocation(function, id).await.expect("get");
        if done(&invocation) {
            return invocation;
        }
        assert!(std::time::Instant::now() < guard, "{invocation:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn async_invocations_run_and_their_results_survive_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data, &["--async-concurrency", "1"]);
    deploy(&server, tmp.path(), "echo", hearth_fixtures::ECHO, "").await;
    deploy(
        &server,
        tmp.path(),
        "slow",
        hearth_fixtures::FAULTS,
        "[limits]\ntimeout_ms = 30000\n",
    )
    .await;

    // Submit over plain HTTP: 202, an id, and where to look.
    let response = http()
        .post(format!("{}/v1/functions/echo/invocations?path=/a%3Fb%3D1", server.url))
        .header("x-custom", "yes")
        .body("hello async")
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().expect("ascii").to_owned();
    let accepted: serde_json::Value = response.json().await.expect("json");
    let id = accepted["id"].as_str().expect("id").to_owned();
    assert_eq!(location, format!("/v1/functions/echo/invocations/{id}"));
    assert_eq!(accepted["state"], "queued");

    let done = wait_finished(&server, "echo", &id).await;
    assert_eq!((done.state.as_str(), done.attempts), ("succeeded", 1), "{done:?}");
    let stored = done.response.expect("response");
    assert_eq!(stored.status, 200);
    let echo: serde_json::Value = serde_json::from_str(stored.body.as_deref().expect("text")).expect("echo json");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/a");
    assert_eq!(echo["query"], "b=1");
    assert_eq!(echo["body"], "hello async");
    assert_eq!(echo["headers"]["x-custom"][0], "yes");
    assert_eq!(echo["headers"]["x-hearth-base-path"][0], "/fn/default/echo");
    assert!(
        echo["headers"].get("authorization").is_none(),
        "credentials stay with Hearth"
    );

    // The raw stored response.
    let raw = http()
        .get(format!("{}{location}/response", server.url))
        .send()
        .await
        .expect("raw");
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "application/json");

    // Another function's or tenant's view of the id: 404.
    let other = http()
        .get(format!("{}/v1/functions/slow/invocations/{id}", server.url))
        .send()
        .await
        .expect("other function");
    problem(other, 404).await;

    // A long run is cut short by a kill; a queued one waits behind it.
    let long = server
        .client()
        .submit("slow", invocation("/sleep?ms=2000"))
        .await
        .expect("submit long");
    wait_state(&server, "slow", &long.id, |i| i.state == "running").await;
    let queued = server
        .client()
        .submit("slow", invocation("/ok"))
        .await
        .expect("submit queued");
    let unfinished = http()
        .get(format!(
            "{}/v1/functions/slow/invocations/{}/response",
            server.url, queued.id
        ))
        .send()
        .await
        .expect("unfinished");
    problem(unfinished, 409).await;
    drop(server); // SIGKILL

    let server = Server::start(&data, &[]);
    let again = server
        .client()
        .async_invocation("echo", &id)
        .await
        .expect("after restart");
    assert_eq!(again.state, "succeeded");
    assert_eq!(again.response.expect("stored").body, stored.body, "the result survived");
    let long = wait_finished(&server, "slow", &long.id).await;
    assert_eq!(
        (long.state.as_str(), long.attempts),
        ("succeeded", 2),
        "ran again: {long:?}"
    );
    assert_eq!(long.response.expect("response").body.as_deref(), Some("slept\n"));
    let queued = wait_finished(&server, "slow", &queued.id).await;
    assert_eq!(queued.response.expect("response").body.as_deref(), Some("ok\n"));
    // The second attempt is billed under an id of its own that names the
    // invocation and the attempt (the first died with the server before
    // its answer, unbilled).
    let records: Vec<serde_json::Value> = usage_export(&server, "function=slow")
        .await
        .lines()
        .map(|line| serde_json::from_str(line).expect("record"))
        .filter(|r: &serde_json::Value| r["invocation_id"] == long.id.as_str())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["attempt"], 2);
    assert_ne!(records[0]["id"], long.id.as_str());
    let direct: Vec<serde_json::Value> = usage_export(&server, "function=echo")
        .await
        .lines()
        .map(|line| serde_json::from_str(line).expect("record"))
        .collect();
    assert!(
        direct
            .iter()
            .all(|r| r["attempt"] == 1 && r["invocation_id"] != r["id"]),
        "asynchronous attempts: {direct:?}"
    );

    // The CLI: --async prints the id, --result --wait prints the body.
    let output = server
        .cli()
        .args(["invoke", "echo", "--async", "--data", "from the cli"])
        .output()
        .expect("cli");
    assert!(output.status.success(), "{output:?}");
    let id = String::from_utf8(output.stdout).expect("utf-8").trim().to_owned();
    let output = server
        .cli()
        .args(["invoke", "echo", "--result", &id, "--wait"])
        .output()
        .expect("cli");
    assert!(output.status.success(), "{output:?}");
    let echo: serde_json::Value = serde_json::from_slice(&output.stdout).expect("echo json");
    assert_eq!(echo["body"], "from the cli");
}

fn invocation(path: &str) -> hearth_client::Invocation {
    hearth_client::Invocation {
        method: reqwest::Method::GET,
        path: path.into(),
        headers: Vec::new(),
        body: Default::default(),
    }
}

/// Submits `body` to `function` in `tenant` at `path` (raw HTTP, as the
/// operator); the answer.
async fn submit_raw(server: &Server, tenant: &str, function: &str, path: &str, body: Vec<u8>) -> reqwest::Response {
    http()
        .post(format!("{}/v1/functions/{function}/invocations", server.url))
        .query(&[("tenant", tenant), ("path", path)])
        .body(body)
        .send()
        .await
        .expect("submit")
}

async fn accepted_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202);
    let accepted: serde_json::Value = response.json().await.expect("json");
    accepted["id"].as_str().expect("id").to_owned()
}

async fn invocation_in(server: &Server, tenant: &str, function: &str, id: &str) -> reqwest::Response {
    http()
        .get(format!("{}/v1/functions/{function}/invocations/{id}", server.url))
        .query(&[("tenant", tenant)])
        .send()
        .await
        .expect("get")
}

/// Polls until `tenant`'s invocation has finished; its JSON.
async fn finished_in(server: &Server, tenant: &str, function: &str, id: &str) -> serde_json::Value {
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let invocation: serde_json::Value = invocation_in(server, tenant, function, id)
            .await
            .json()
            .await
            .expect("json");
        if matches!(invocation["state"].as_str(), Some("succeeded" | "failed")) {
            return invocation;
        }
        assert!(std::time::Instant::now() < guard, "{invocation}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Tenants take turns in the asynchronous queue: tenant A's backlog of 100,
/// submitted first, does not hold up tenant B's one run, which starts
/// before half of A's have (order of starts, not timing).
#[tokio::test]
async fn one_tenants_backlog_does_not_hold_up_anothers_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &["--async-concurrency", "1"]);
    server
        .client()
        .create_token(Some("beta"), "admin", None)
        .await
        .expect("beta");
    deploy(&server, tmp.path(), "slow", hearth_fixtures::FAULTS, "").await;
    let beta = project(&tmp.path().join("beta-slow"), "slow", hearth_fixtures::FAULTS, "");
    hearth_client::Client::new(&server.url, Some(TOKEN.into()), "beta")
        .expect("client")
        .deploy(&hearth_client::Project::load(&beta).expect("project"), |_, _| {})
        .await
        .expect("deploy in beta");

    let mut backlog = Vec::new();
    for _ in 0..100 {
        backlog.push(accepted_id(submit_raw(&server, "default", "slow", "/sleep?ms=500", Vec::new()).await).await);
    }
    let late = accepted_id(submit_raw(&server, "beta", "slow", "/ok", Vec::new()).await).await;
    let late = finished_in(&server, "beta", "slow", &late).await;
    assert_eq!(late["state"], "succeeded", "{late}");
    let late_start = late["started_at"].as_str().expect("started").to_owned();
    let mut started_before = 0;
    for id in &backlog {
        let invocation: serde_json::Value = invocation_in(&server, "default", "slow", id)
            .await
            .json()
            .await
            .expect("json");
        if invocation["started_at"].as_str().is_some_and(|at| *at < *late_start) {
            started_before += 1;
        }
    }
    assert!(
        started_before < 50,
        "{started_before} of tenant A's 100 runs started before tenant B's one"
    );
}

/// A tenant's queued asynchronous bodies are bounded
/// (`max_async_queued_bytes`); a run still queued past the retention fails
/// as expired, and finished results are deleted after it.
#[tokio::test]
async fn queued_bytes_are_bounded_and_runs_expire() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let limits = tmp.path().join("limits.toml");
    std::fs::write(&limits, "[default]\nmax_async_queued_bytes = 1000\n").expect("limits");
    let server = Server::start(
        &tmp.path().join("data"),
        &[
            "--async-concurrency",
            "1",
            "--async-retention-s",
            "1",
            "--tenant-limits",
            limits.to_str().expect("utf-8"),
        ],
    );
    deploy(&server, tmp.path(), "slow", hearth_fixtures::FAULTS, "").await;

    // The first run holds the only slot for 2.5 s; the second waits past
    // the 1 s retention, so it expires when it is claimed.
    let first = accepted_id(submit_raw(&server, "default", "slow", "/sleep?ms=2500", vec![1; 600]).await).await;
    let refused = submit_raw(&server, "default", "slow", "/ok", vec![1; 600]).await;
    let refusal = problem(refused, 429).await;
    assert_eq!(refusal["key"], "max_async_queued_bytes", "{refusal}");
    // Without a declared length, the body is read only as far as the room
    // left (400 bytes), then refused the same way.
    let chunks = futures::stream::iter((0..6).map(|_| Ok::<_, std::io::Error>(vec![1u8; 100])));
    let streamed = http()
        .post(format!("{}/v1/functions/slow/invocations", server.url))
        .query(&[("tenant", "default"), ("path", "/ok")])
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("submit");
    let refusal = problem(streamed, 429).await;
    assert_eq!(refusal["key"], "max_async_queued_bytes", "{refusal}");
    let second = accepted_id(submit_raw(&server, "default", "slow", "/ok", vec![1; 100]).await).await;

    let first = finished_in(&server, "default", "slow", &first).await;
    assert_eq!(first["state"], "succeeded", "{first}");
    let second = finished_in(&server, "default", "slow", &second).await;
    assert_eq!(second["state"], "failed", "{second}");
    assert_eq!(second["response"]["status"], 504, "{second}");
    assert!(
        second["response"]["body"]
            .as_str()
            .is_some_and(|b| b.contains("expired")),
        "{second}"
    );
    // Finished, the bodies no longer count: a submission fits again.
    accepted_id(submit_raw(&server, "default", "slow", "/ok", vec![1; 900]).await).await;

    // A finished result is deleted once past the retention.
    let id = first["id"].as_str().expect("id").to_owned();
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while invocation_in(&server, "default", "slow", &id).await.status() != 404 {
        assert!(std::time::Instant::now() < guard, "the result outlived its retention");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
