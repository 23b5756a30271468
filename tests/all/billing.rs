//! The billing contract: a consumer that follows the export cursor gets every
//! record exactly once, whatever the invocations' lengths; an answer with no
//! body has its record before the client sees it complete; a stop under load
//! loses no record.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::server::*;

/// One `GET /v1/usage?cursor=…` page: the record ids and the next cursor.
async fn poll(server: &Server, cursor: &str, extra: &str) -> (Vec<String>, String) {
    let response = http()
        .get(format!("{}/v1/usage?format=jsonl&cursor={cursor}{extra}", server.url))
        .send()
        .await
        .expect("usage");
    assert_eq!(response.status(), 200);
    let next = response.headers()["x-hearth-next-cursor"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let text = response.text().await.expect("body");
    let ids = text
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).expect("record");
            record["id"].as_str().expect("id").to_owned()
        })
        .collect();
    (ids, next)
}

/// A server in `dir/data_name` with `faults` deployed (public).
async fn faults_server(dir: &std::path::Path, data_name: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
    let server = Server::start_with_env(&dir.join(data_name), args, env);
    deploy(&server, dir, "faults", hearth_fixtures::FAULTS, "public = true\n").await;
    server
}

#[tokio::test]
async fn a_consumer_following_the_cursor_sees_every_record_exactly_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = faults_server(tmp.path(), "data", &[], &[]).await;
    // The long call starts first (its id sorts first), ends last.
    let long = tokio::spawn(http().get(server.fn_url("faults", "/sleep?ms=2000")).send());
    wait_for_instances(&server, "faults", "running the long call", |p| p.busy == 1).await;
    let shorts = tokio::spawn({
        let url = server.fn_url("faults", "/ok");
        async move {
            let mut ids = Vec::new();
            for _ in 0..200 {
                let response = http().get(&url).send().await.expect("short");
                ids.push(
                    response.headers()["x-hearth-invocation-id"]
                        .to_str()
                        .expect("id")
                        .to_owned(),
                );
                response.bytes().await.expect("body");
            }
            ids
        }
    });
    // The consumer polls every 50 ms, in pages of at most 64, until the
    // calls are done and a poll brings nothing new.
    let mut calls = Some((long, shorts));
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut cursor = "0".to_owned();
    let mut expected: Option<Vec<String>> = None;
    let guard = Instant::now() + Duration::from_secs(120);
    loop {
        let (ids, next) = poll(&server, &cursor, "&limit=64").await;
        let empty = ids.is_empty();
        for id in ids {
            *seen.entry(id).or_default() += 1;
        }
        cursor = next;
        if let Some((long, shorts)) = calls.take_if(|(long, shorts)| long.is_finished() && shorts.is_finished()) {
            let long = long.await.expect("task").expect("long");
            let mut all = shorts.await.expect("task");
            all.push(
                long.headers()["x-hearth-invocation-id"]
                    .to_str()
                    .expect("id")
                    .to_owned(),
            );
            long.bytes().await.expect("body");
            expected = Some(all);
            continue;
        }
        if let Some(expected) = &expected
            && empty
        {
            let missing: Vec<&String> = expected.iter().filter(|id| !seen.contains_key(*id)).collect();
            assert!(missing.is_empty(), "never seen: {missing:?}");
            let doubled: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
            assert!(doubled.is_empty(), "seen twice: {doubled:?}");
            assert_eq!(seen.len(), 201);
            break;
        }
        assert!(Instant::now() < guard, "the calls never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_answer_without_a_body_has_its_record_when_the_client_sees_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = faults_server(tmp.path(), "data", &[], &[]).await;
    // 204 at once, but the guest runs 300 ms more: the answer waits for it.
    let response = http()
        .get(server.fn_url("faults", "/no-content?ms=300"))
        .send()
        .await
        .expect("204");
    assert_eq!(response.status(), 204);
    let no_content = response.headers()["x-hearth-invocation-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let (ids, _) = poll(&server, "0", "").await;
    assert!(ids.contains(&no_content), "204: {ids:?}");
    // A HEAD answer is its head: the body the guest sends later is not read.
    let response = http()
        .head(server.fn_url("faults", "/slow-body?ms=300"))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(response.status(), 200);
    let head = response.headers()["x-hearth-invocation-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let (ids, _) = poll(&server, "0", "").await;
    assert!(ids.contains(&head), "HEAD: {ids:?}");
    // A declared length reached while the guest keeps its body open: the
    // client has the whole answer, and so has the log.
    let response = http()
        .get(server.fn_url("faults", "/sized?ms=2000"))
        .send()
        .await
        .expect("sized");
    assert_eq!(response.status(), 200);
    let sized = response.headers()["x-hearth-invocation-id"]
        .to_str()
        .expect("id")
        .to_owned();
    assert_eq!(response.bytes().await.expect("body").as_ref(), b"done\n");
    let (ids, _) = poll(&server, "0", "").await;
    assert!(ids.contains(&sized), "declared length: {ids:?}");
}

#[tokio::test]
async fn sigterm_under_load_loses_no_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    // A name no other test deploys: once this server is gone, another
    // test's server may take its port, and a client still sending must get
    // a 404 there, not an answer it would count.
    let name = "echo-under-sigterm";
    deploy(&server, tmp.path(), name, hearth_fixtures::ECHO, "public = true\n").await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for client in 0..8 {
        let url = server.fn_url(name, &format!("/client{client}"));
        let (stop_rx, done_tx) = (stop_rx.clone(), done_tx.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut completed = Vec::new();
            while !*stop_rx.borrow() {
                let Ok(response) = http.post(&url).body("payload").send().await else {
                    break;
                };
                let Some(id) = response.headers().get("x-hearth-invocation-id").cloned() else {
                    continue;
                };
                if response.status() == 200 && response.bytes().await.is_ok() {
                    completed.push(id.to_str().expect("ascii").to_owned());
                    let _ = done_tx.send(());
                }
            }
            completed
        }));
    }
    // Stop once the load has run a while (counted, not timed).
    for _ in 0..200 {
        done_rx.recv().await.expect("clients running");
    }
    assert!(server.terminate(), "exited cleanly");
    let _ = stop_tx.send(true);
    let mut completed = Vec::new();
    for client in clients {
        completed.extend(client.await.expect("client"));
    }
    let server = Server::start(&data, &[]);
    let export = usage_export(&server, "format=jsonl").await;
    let recorded: HashMap<String, serde_json::Value> = export
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).expect("record");
            (record["id"].as_str().expect("id").to_owned(), record)
        })
        .collect();
    let missing: Vec<&String> = completed.iter().filter(|id| !recorded.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} lost: {missing:?}",
        missing.len(),
        completed.len()
    );
    assert_eq!(recorded.len(), export.lines().count(), "no record doubled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billed_compute_adds_up_to_the_devices_busy_time() {
    use hearth_fixtures::models::mlp_input;
    const ROUNDS: usize = 4;
    const AT_ONCE: usize = 16;
    const ROWS: usize = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    // A window far longer than the test: every batch closes when it has
    // its 8 rows, so each round is exactly two runs of 8 calls.
    let server = Server::start(
        &dir.path().join("data"),
        &["--batch-window-ms", "600000", "--batch-max-rows", "8"],
    );
    let scaling = format!("[scaling]\nmax_instances = {AT_ONCE}\n");
    crate::inference::deploy_classify_with(&server, dir.path(), "classify", &scaling).await;
    for round in 0..ROUNDS {
        let calls: Vec<_> = (0..AT_ONCE)
            .map(|n| {
                let url = server.fn_url("classify", "/");
                let input = mlp_input((round * AT_ONCE + n) as u64);
                tokio::spawn(async move {
                    let response = http()
                        .post(url)
                        .json(&serde_json::json!({ "input": input }))
                        .send()
                        .await
                        .expect("classify");
                    assert_eq!(response.status(), 200);
                })
            })
            .collect();
        for call in calls {
            call.await.expect("call");
        }
    }
    let status = server.client().status().await.expect("status");
    let model = &status.models[0];
    assert_eq!(
        (model.runs, model.calls),
        ((ROUNDS * AT_ONCE / ROWS) as u64, (ROUNDS * AT_ONCE) as u64),
        "{status:?}"
    );
    let records: Vec<serde_json::Value> = usage_export(&server, "function=classify")
        .await
        .lines()
        .map(|line| serde_json::from_str(line).expect("record"))
        .collect();
    assert_eq!(records.len(), ROUNDS * AT_ONCE);
    assert!(records.iter().all(|r| r["batched_with"] == ROWS as f64), "{records:?}");
    let billed: f64 = records.iter().map(|r| r["compute_ms"].as_f64().expect("compute")).sum();
    assert!(model.busy_ms > 0.0, "{status:?}");
    assert!(
        (billed - model.busy_ms).abs() <= model.busy_ms * 0.01,
        "billed {billed} ms of compute, the device was busy {} ms",
        model.busy_ms
    );
}

/// `GET` of a server path: its status.
async fn status_of(server: &Server, path: &str) -> u16 {
    http()
        .get(format!("{}{path}", server.url))
        .send()
        .await
        .expect(path)
        .status()
        .as_u16()
}

/// Polls `path` until it answers `status` (the server changes state in the
/// background).
async fn wait_status(server: &Server, path: &str, status: u16) {
    for _ in 0..6000 {
        if status_of(server, path).await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{path} never answered {status}; log:\n{}", server.log());
}

/// Calls `faults` until an answer completes (200 and its whole body); its
/// invocation id. While the usage log is down a call is refused with 503
/// before it runs, or, if the log went down while it ran, its answer is cut
/// before it completes (it was not recorded, so the client must not see it
/// complete): both are tried again.
async fn call_ok(server: &Server) -> String {
    loop {
        match http().get(server.fn_url("faults", "/ok")).send().await {
            Ok(response) if response.status() == 200 => {
                let id = response.headers()["x-hearth-invocation-id"]
                    .to_str()
                    .expect("id")
                    .to_owned();
                if response.bytes().await.is_ok() {
                    return id;
                }
            }
            Ok(response) => {
                problem(response, 503).await;
            }
            Err(err) => assert!(err.is_request() || err.is_body(), "{err}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn readiness_follows_the_usage_log_and_a_failed_sync_is_written_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A disk whose fsync fails from now on.
    let server = faults_server(
        tmp.path(),
        "broken",
        &[],
        &[("FAILPOINTS", "usage-journal-sync=return")],
    )
    .await;
    assert_eq!(status_of(&server, "/readyz").await, 200);
    // Written before the sync failed: answered (the process-mode contract).
    let response = http().get(server.fn_url("faults", "/ok")).send().await.expect("call");
    assert_eq!(response.status(), 200);
    wait_status(&server, "/readyz", 503).await;
    let refused = http().get(server.fn_url("faults", "/ok")).send().await.expect("call");
    let body = problem(refused, 503).await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("usage")), "{body}");
    assert_eq!(status_of(&server, "/healthz").await, 200, "alive, not ready");
    drop(server);

    // A disk whose fsync fails once: the group is written again, in full, to
    // a new journal file, synced and ingested; nothing is lost or doubled.
    let server = faults_server(
        tmp.path(),
        "flaky",
        &[],
        &[("FAILPOINTS", "usage-journal-sync=1*return->off")],
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(call_ok(&server).await);
    }
    wait_status(&server, "/readyz", 200).await;
    let (seen, _) = poll(&server, "0", "").await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &seen {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(counts.get(id.as_str()), Some(&1), "{id} in {seen:?}");
    }
    let failures = metric(&server, "hearth_usage_log_total{kind=\"failures\"").await;
    assert!(failures >= 1.0, "failures counted: {failures}");
    // The newest journal file holds the group whose sync failed (the first
    // call's record), written again.
    let mut journals: Vec<std::path::PathBuf> = std::fs::read_dir(tmp.path().join("flaky/usage-journal"))
        .expect("journal dir")
        .map(|e| e.expect("entry").path())
        .collect();
    journals.sort();
    assert!(journals.len() >= 2, "a new journal file took the group: {journals:?}");
    // Frames hold a record's strings as they are.
    let newest = std::fs::read(journals.last().expect("journal")).expect("read");
    assert!(
        newest.windows(ids[0].len()).any(|w| w == ids[0].as_bytes()),
        "{} not in {}",
        ids[0],
        String::from_utf8_lossy(&newest)
    );
}

#[tokio::test]
async fn in_strict_mode_an_answer_completes_only_once_its_record_is_synced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The first fsync fails: the record is only durable once its group has
    // been written again to a new journal and synced.
    let server = faults_server(
        tmp.path(),
        "data",
        &["--usage-durability", "strict"],
        &[("FAILPOINTS", "usage-journal-sync=1*return->off")],
    )
    .await;
    let response = http().get(server.fn_url("faults", "/ok")).send().await.expect("call");
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.expect("body").as_ref(), b"ok\n");
    // Nothing else runs: what /metrics says now, it said when the answer
    // completed.
    let failures = metric(&server, "hearth_usage_log_total{kind=\"failures\"").await;
    assert_eq!(failures, 1.0, "the failed sync");
    let unsynced = metric(&server, "hearth_usage_unsynced").await;
    assert_eq!(unsynced, 0.0, "the record was synced again first");
}
