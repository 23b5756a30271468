//! Instance pools, scale to zero and admission, against the real binary.

use crate::server::*;

/// A function scales to zero (instances, then its compiled code), answers
/// again afterwards from the precompiled file (no recompilation), and warm
/// instances are reused in between.
#[tokio::test]
async fn a_function_scales_to_zero_and_answers_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &tmp.path().join("data"),
        &["--reap-interval-ms", "50", "--function-idle-timeout-s", "0"],
    );
    deploy(
        &server,
        tmp.path(),
        "echo",
        hearth_fixtures::ECHO,
        "[scaling]\nidle_timeout_s = 1\n",
    )
    .await;
    let compiled = compiled_artifacts(&server.data_dir);
    assert_eq!(compiled.len(), 1, "{compiled:?}");

    let call = || async {
        let response = http()
            .post(server.fn_url("echo", "/x"))
            .body("hi")
            .send()
            .await
            .expect("echo");
        assert_eq!(response.status(), 200);
        let echo: serde_json::Value = response.json().await.expect("json");
        assert_eq!(echo["body"], "hi");
    };
    call().await;
    call().await;
    let pool = instances(&server, "echo").await;
    assert_eq!((pool.cold_starts, pool.warm_starts), (1, 1), "{pool:?}");
    assert!(pool.loaded);
    // The code may already have been unloaded once, between the deploy and
    // the first call (the function idle timeout is 0 here).
    let unloads = pool.unloads;

    let pool = wait_for_instances(&server, "echo", "scaled to zero", |p| {
        p.idle == 0 && p.busy == 0 && !p.loaded && p.unloads == unloads + 1
    })
    .await;
    assert_eq!(pool.scale_downs, 1, "{pool:?}");

    call().await;
    let pool = instances(&server, "echo").await;
    assert_eq!((pool.cold_starts, pool.warm_starts), (2, 1), "{pool:?}");
    assert!(pool.loaded);
    assert_eq!(
        compiled_artifacts(&server.data_dir),
        compiled,
        "the cold start mapped the old artifact, it did not recompile"
    );
    assert!(!server.log().contains("recompiling"), "{}", server.log());
}

/// `scaling.reuse = false` gives every request a fresh instance; a trapped
/// instance is never reused.
#[tokio::test]
async fn reuse_can_be_turned_off_and_trapped_instances_are_discarded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(
        &server,
        tmp.path(),
        "fresh",
        hearth_fixtures::HELLO,
        "[scaling]\nreuse = false\n",
    )
    .await;
    deploy(&server, tmp.path(), "faults", hearth_fixtures::FAULTS, "").await;
    for _ in 0..3 {
        let response = http().get(server.fn_url("fresh", "/")).send().await.expect("fresh");
        assert_eq!(response.status(), 200);
        response.text().await.expect("body");
    }
    let pool = instances(&server, "fresh").await;
    assert_eq!((pool.cold_starts, pool.warm_starts, pool.idle), (3, 0, 0), "{pool:?}");

    let ok = || async {
        let response = http().get(server.fn_url("faults", "/ok")).send().await.expect("ok");
        assert_eq!(response.status(), 200);
        response.text().await.expect("body");
    };
    ok().await;
    let response = http().get(server.fn_url("faults", "/trap")).send().await.expect("trap");
    problem(response, 500).await;
    ok().await;
    let pool = instances(&server, "faults").await;
    // ok (cold), trap (warm: reused, then discarded), ok (cold again).
    assert_eq!((pool.cold_starts, pool.warm_starts, pool.idle), (2, 1, 1), "{pool:?}");
}

/// 200 concurrent requests to a function with `max_instances = 4` and a
/// short queue: every answer is a 200, a 429 or a 503 with `Retry-After` and
/// a problem body; no 500, no dropped connection; memory stays bounded.
#[tokio::test]
async fn overload_is_refused_politely() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &tmp.path().join("data"),
        &["--max-queued-per-function", "8", "--queue-timeout-ms", "500"],
    );
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;
    deploy(
        &server,
        tmp.path(),
        "busy",
        hearth_fixtures::FAULTS,
        "public = true\n[limits]\ntimeout_ms = 30000\n[scaling]\nmax_instances = 4\n",
    )
    .await;
    let before_kib = server.rss_kib();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let calls = (0..200).map(|_| {
        let client = client.clone();
        let url = server.fn_url("busy", "/sleep?ms=300");
        tokio::spawn(async move {
            let response = client.get(url).send().await.expect("no dropped connection");
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().expect("ascii").to_owned());
            let body = response.bytes().await.expect("complete body");
            (status, retry_after, body)
        })
    });
    let mut counts = std::collections::BTreeMap::new();
    for call in futures::future::join_all(calls).await {
        let (status, retry_after, body) = call.expect("task");
        *counts.entry(status).or_insert(0) += 1;
        match status {
            200 => assert_eq!(&body[..], b"slept\n"),
            429 | 503 => {
                let seconds: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
                assert!(seconds >= 1);
                let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem body");
                assert_eq!(problem["status"], status);
                assert_eq!(problem["outcome"], "rejected");
                assert!(problem["invocation_id"].is_string());
            }
            other => panic!("unexpected status {other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert!(counts.get(&200).is_some_and(|n| *n >= 4), "{counts:?}");
    assert!(
        counts.get(&429).is_some_and(|n| *n >= 100),
        "the queue holds 8: {counts:?}"
    );
    let pool = instances(&server, "busy").await;
    assert!(pool.busy + pool.idle <= 4, "{pool:?}");
    assert_eq!(
        pool.rejected,
        counts.get(&429).copied().unwrap_or(0) + counts.get(&503).copied().unwrap_or(0)
    );
    let after_kib = server.rss_kib();
    assert!(
        after_kib < before_kib + 256 * 1024,
        "resident memory grew from {before_kib} KiB to {after_kib} KiB"
    );
    still_serves(&server).await;
}

/// The QoS header may lower a function's class, never raise it.
#[tokio::test]
async fn the_qos_header_only_lowers_the_class() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;
    let call = |class: &'static str| {
        http()
            .get(server.fn_url("hello", "/"))
            .header("x-hearth-qos", class)
            .send()
    };
    let response = call("batch").await.expect("batch");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-hearth-qos"], "batch");
    let body = problem(call("realtime").await.expect("realtime"), 400).await;
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("raise")), "{body}");
    problem(call("urgent").await.expect("urgent"), 400).await;
    let response = http().get(server.fn_url("hello", "/")).send().await.expect("plain");
    assert_eq!(response.headers()["x-hearth-qos"], "standard");
}

/// `min_instances` are warm before the first request, and come back after
/// a restart.
#[tokio::test]
async fn min_instances_are_kept_warm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    deploy(
        &server,
        tmp.path(),
        "warm",
        hearth_fixtures::HELLO,
        "[scaling]\nmin_instances = 2\n",
    )
    .await;
    wait_for_instances(&server, "warm", "warmed up", |p| p.idle == 2).await;
    drop(server);

    let server = Server::start(&data, &[]);
    let pool = wait_for_instances(&server, "warm", "warmed up after a restart", |p| p.idle == 2).await;
    assert_eq!(pool.cold_starts, 0);
    let response = http().get(server.fn_url("warm", "/")).send().await.expect("warm");
    assert_eq!(response.status(), 200);
    let pool = instances(&server, "warm").await;
    assert_eq!((pool.cold_starts, pool.warm_starts), (0, 1), "{pool:?}");
}

/// A new instance that would take the server past `--memory-budget-mb`
/// (instances counted at their memory limit) is refused with 503; the
/// instance already made goes on serving, warm, once free.
#[tokio::test]
async fn instances_past_the_memory_budget_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &["--memory-budget-mb", "100"]);
    deploy(
        &server,
        tmp.path(),
        "big",
        hearth_fixtures::FAULTS,
        "public = true\n[limits]\nmemory_mb = 64\ntimeout_ms = 30000\n",
    )
    .await;
    // The first call holds its instance (64 MiB of the 100) until its body
    // ends; its head is out, so it is in flight.
    let held = http()
        .get(server.fn_url("big", "/slow-body?ms=2000"))
        .send()
        .await
        .expect("held");
    assert_eq!(held.status(), 200);
    let second = http().get(server.fn_url("big", "/")).send().await.expect("second");
    let refused = problem(second, 503).await;
    assert!(
        refused["detail"].as_str().is_some_and(|d| d.contains("memory budget")),
        "{refused}"
    );
    held.text().await.expect("held body");
    // Once the first instance is back in its pool, it serves (warm, no new
    // reservation); until then a call may still be refused.
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let again = http().get(server.fn_url("big", "/")).send().await.expect("again");
        match again.status().as_u16() {
            200 => break,
            503 => assert!(std::time::Instant::now() < guard, "the warm instance never served"),
            other => panic!("{other}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
