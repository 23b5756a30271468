//! Safe rollouts: versions called by number, aliases that pin or split
//! traffic (sticky when asked), rollback and history, version deletion
//! guarded by aliases, and the alias and version in every usage record.

use std::collections::HashMap;
use std::process::Output;

use futures::StreamExt as _;

use crate::server::{Server, deploy, http, problem, usage_export};

/// `GET` on `greet{selector}` with optional headers: (status, version
/// header, body).
async fn call(server: &Server, target: &str, sticky: Option<&str>) -> (u16, u32, String) {
    let mut request = http().get(server.fn_url(target, "/"));
    if let Some(key) = sticky {
        request = request.header("x-hearth-sticky", key);
    }
    let response = request.send().await.expect("call");
    let status = response.status().as_u16();
    let version = response
        .headers()
        .get("x-hearth-version")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    (status, version, response.text().await.expect("body"))
}

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_and_aliases_route_requests_and_roll_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    // Version 1 says hello; version 2 echoes the request as JSON.
    assert_eq!(
        deploy(&server, tmp.path(), "greet", hearth_fixtures::HELLO, "").await,
        1
    );
    let hello = call(&server, "greet", None).await.2;
    assert_eq!(
        deploy(&server, &tmp.path().join("v2"), "greet", hearth_fixtures::ECHO, "").await,
        2
    );

    let (status, version, body) = call(&server, "greet@1", None).await;
    assert_eq!((status, version, body.as_str()), (200, 1, hello.as_str()));
    let (status, version, body) = call(&server, "greet@2", None).await;
    assert_eq!((status, version), (200, 2));
    assert_ne!(body, hello, "version 2 runs its own code");
    assert_eq!(call(&server, "greet", None).await.1, 2, "the bare name is the newest");
    problem(http().get(server.fn_url("greet@9", "/")).send().await.expect("@9"), 404).await;
    problem(
        http()
            .get(server.fn_url("greet@prod", "/"))
            .send()
            .await
            .expect("@prod"),
        404,
    )
    .await;
    problem(http().get(server.fn_url("greet@0", "/")).send().await.expect("@0"), 404).await;

    // A 90/10 split over 2,000 requests: 200 expected on version 2, with a
    // standard deviation of 13.4; 140..=260 is over four of them.
    let set = server
        .cli()
        .args(["alias", "set", "greet", "prod", "--split", "1=90,2=10"])
        .output()
        .expect("alias set");
    assert!(succeeded(&set).contains("greet@prod -> 1=90,2=10"));
    let versions: Vec<u32> = futures::stream::iter(0..2000)
        .map(|_| async { call(&server, "greet@prod", None).await.1 })
        .buffer_unordered(16)
        .collect()
        .await;
    let on_two = versions.iter().filter(|v| **v == 2).count();
    assert_eq!(versions.iter().filter(|v| **v == 1).count() + on_two, 2000);
    assert!((140..=260).contains(&on_two), "{on_two} of 2,000 on the 10 % side");

    // A sticky key reaches one version, every time.
    let mut seen = HashMap::new();
    for i in 0..20 {
        let key = format!("user-{i}");
        for _ in 0..5 {
            let version = call(&server, "greet@prod", Some(&key)).await.1;
            assert_eq!(*seen.entry(key.clone()).or_insert(version), version, "{key} moved");
        }
    }

    // Pinning `latest` moves the bare name; rollback restores the newest.
    succeeded(
        &server
            .cli()
            .args(["alias", "set", "greet", "latest", "1"])
            .output()
            .expect("pin"),
    );
    assert_eq!(call(&server, "greet", None).await.1, 1);
    let rollback = succeeded(&server.cli().args(["rollback", "greet"]).output().expect("rollback"));
    assert!(rollback.contains("greet@latest -> 2"), "{rollback}");
    assert_eq!(call(&server, "greet", None).await.1, 2);
    let history = succeeded(
        &server
            .cli()
            .args(["alias", "history", "greet", "latest", "-o", "json"])
            .output()
            .expect("history"),
    );
    let history: Vec<hearth_client::AliasInfo> = serde_json::from_str(&history).expect("json");
    let steps: Vec<(u32, bool)> = history
        .iter()
        .map(|change| (change.routes[0].version, change.follows_newest))
        .collect();
    assert_eq!(
        steps,
        [(1, true), (2, true), (1, false), (2, false)],
        "two deploys followed, the pin, the rollback: {history:?}"
    );
    let client = server.client();
    problem(
        http()
            .post(format!("{}/v1/functions/greet/aliases/prod/rollback", server.url))
            .send()
            .await
            .expect("rollback"),
        409,
    )
    .await;

    // A version an alias points at is kept; moved away, it can go.
    let refused = server
        .cli()
        .args(["functions", "delete", "greet", "--version", "1"])
        .output()
        .expect("delete");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("alias `prod` points at version 1"),
        "{refused:?}"
    );
    client
        .set_alias(
            "greet",
            "prod",
            &hearth_client::SetAlias {
                routes: vec![hearth_client::AliasRoute { version: 2, weight: 1 }],
                shadow: None,
            },
        )
        .await
        .expect("move prod");
    client.delete_version("greet", 1).await.expect("delete v1");
    problem(http().get(server.fn_url("greet@1", "/")).send().await.expect("@1"), 404).await;
    let versions: Vec<u32> = client
        .versions("greet")
        .await
        .expect("versions")
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, [2]);
    let aliases = client.aliases("greet").await.expect("aliases");
    let names: Vec<&str> = aliases.iter().map(|a| a.alias.as_str()).collect();
    assert_eq!(names, ["latest", "prod"]);

    // Every record says which version answered and through which alias.
    let mut counts: HashMap<(u64, String), usize> = HashMap::new();
    for line in usage_export(&server, "function=greet").await.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("record");
        let key = (
            record["version"].as_u64().expect("version"),
            record["alias"].as_str().expect("alias").to_owned(),
        );
        *counts.entry(key).or_default() += 1;
    }
    assert_eq!(counts.get(&(1, String::new())), Some(&1), "greet@1: {counts:?}");
    assert_eq!(counts.get(&(2, String::new())), Some(&1), "greet@2: {counts:?}");
    let through_prod: usize = counts
        .iter()
        .filter(|((_, alias), _)| alias == "prod")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(through_prod, 2000 + 100, "{counts:?}");
    assert!(counts.get(&(2, "latest".into())).is_some_and(|n| *n >= 2), "{counts:?}");
}

/// Aliases and version numbers are checked: an all-digit alias, a split
/// naming a missing version, a zero weight.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_aliases_are_refused_with_a_problem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "greet", hearth_fixtures::HELLO, "").await;
    let put = |alias: &str, body: serde_json::Value| {
        http()
            .put(format!("{}/v1/functions/greet/aliases/{alias}", server.url))
            .json(&body)
            .send()
    };
    let one = serde_json::json!({ "routes": [{ "version": 1, "weight": 1 }] });
    let detail = problem(put("42", one.clone()).await.expect("put"), 422).await;
    assert!(
        detail["detail"].as_str().expect("detail").contains("all digits"),
        "{detail}"
    );
    let missing = serde_json::json!({ "routes": [{ "version": 1, "weight": 1 }, { "version": 7, "weight": 1 }] });
    let detail = problem(put("prod", missing).await.expect("put"), 404).await;
    assert!(
        detail["detail"].as_str().expect("detail").contains("version 7"),
        "{detail}"
    );
    let zero = serde_json::json!({ "routes": [{ "version": 1, "weight": 0 }] });
    problem(put("prod", zero).await.expect("put"), 422).await;
    let shadowing_itself = serde_json::json!({
        "routes": [{ "version": 1, "weight": 1 }],
        "shadow": { "version": 1, "percent": 10 }
    });
    problem(put("prod", shadowing_itself).await.expect("put"), 422).await;
    problem(
        put("prod", serde_json::json!({ "routes": "1" })).await.expect("put"),
        422,
    )
    .await;
    let unset = http()
        .delete(format!("{}/v1/functions/greet/aliases/never", server.url))
        .send()
        .await
        .expect("unset");
    problem(unset, 404).await;
    let other = http()
        .put(format!("{}/v1/functions/nobody/aliases/prod", server.url))
        .json(&one)
        .send()
        .await
        .expect("put");
    problem(other, 404).await;
    // The last version is the function: deleting it is refused.
    let last = http()
        .delete(format!("{}/v1/functions/greet/versions/1", server.url))
        .send()
        .await
        .expect("delete");
    problem(last, 409).await;
}

/// Deploys `mirror` (version 1: hello; version 2: faults) and points
/// `mirror@prod` at version 1 with every request copied to version 2;
/// returns hello's answer.
async fn mirrored(server: &Server, dir: &std::path::Path) -> String {
    deploy(server, dir, "mirror", hearth_fixtures::HELLO, "").await;
    let hello = call(server, "mirror", None).await.2;
    deploy(server, &dir.join("v2"), "mirror", hearth_fixtures::FAULTS, "").await;
    let alias = serde_json::json!({
        "routes": [{ "version": 1, "weight": 1 }],
        "shadow": { "version": 2, "percent": 100 }
    });
    let set = http()
        .put(format!("{}/v1/functions/mirror/aliases/prod", server.url))
        .json(&alias)
        .send()
        .await
        .expect("set");
    assert_eq!(set.status(), 200);
    hello
}

/// A shadow version that traps never changes the primary's answers; each
/// copy leaves its own record (`shadow = true`) and per-version metrics.
#[tokio::test(flavor = "multi_thread")]
async fn a_trapping_shadow_never_changes_the_primarys_answers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Room for every copy: none is skipped here (see the next test).
    let server = Server::start(&tmp.path().join("data"), &["--max-shadow-runs", "64"]);
    let hello = mirrored(&server, tmp.path()).await;

    for _ in 0..20 {
        // `/trap` makes version 2 (faults) trap; version 1 (hello) answers.
        let response = http()
            .post(server.fn_url("mirror@prod", "/trap"))
            .body("payload")
            .send()
            .await
            .expect("call");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-hearth-version"], "1");
        assert_eq!(response.text().await.expect("body"), hello);
    }

    // The copies run on their own: wait for their 20 records.
    let guard = std::time::Instant::now() + crate::server::REQUEST_GUARD;
    let shadows = loop {
        let records: Vec<serde_json::Value> = usage_export(&server, "function=mirror")
            .await
            .lines()
            .map(|line| serde_json::from_str(line).expect("record"))
            .collect();
        let shadows: Vec<serde_json::Value> = records.into_iter().filter(|r| r["shadow"] == true).collect();
        if shadows.len() >= 20 {
            break shadows;
        }
        assert!(std::time::Instant::now() < guard, "{} shadow records", shadows.len());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(shadows.len(), 20);
    for record in &shadows {
        assert_eq!(
            (&record["version"], &record["alias"], &record["outcome"]),
            (
                &serde_json::json!(2),
                &serde_json::json!("prod"),
                &serde_json::json!("guest_trap")
            ),
            "{record}"
        );
    }
    let metrics = crate::server::metrics_text(&server).await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("hearth_rollout_invocations_total{")
                && l.contains("shadow=\"true\"")
                && l.contains("version=\"2\"")
        })
        .unwrap_or_else(|| panic!("no shadow series in {metrics}"));
    assert!(
        line.ends_with(" 20") && line.contains("outcome=\"guest_trap\""),
        "{line}"
    );
    // `hearth usage summary` puts the versions and the copies side by side.
    let summary = server
        .client()
        .usage_summary(&hearth_client::UsageQuery {
            function: Some("mirror".into()),
            ..hearth_client::UsageQuery::default()
        })
        .await
        .expect("summary");
    let rows: Vec<(u32, bool, u64, u64)> = summary
        .iter()
        .map(|r| (r.version, r.shadow, r.invocations, r.errors))
        .collect();
    assert_eq!(rows, [(1, false, 21, 0), (2, true, 20, 20)], "{summary:?}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hearth_rollout_invocations_total{")
                && l.contains("shadow=\"false\"")
                && l.contains("version=\"1\"")
                && l.ends_with(" 20")),
        "{metrics}"
    );
}

/// Copies beyond `--max-shadow-runs` are skipped and counted, never queued
/// behind the primaries.
#[tokio::test(flavor = "multi_thread")]
async fn shadow_copies_past_the_limit_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &["--max-shadow-runs", "1"]);
    mirrored(&server, tmp.path()).await;
    // The first copy sleeps 30 s in version 2 and holds the only slot while
    // the next three primaries are answered (hello answers at once).
    for _ in 0..4 {
        let response = http()
            .get(server.fn_url("mirror@prod", "/sleep?ms=30000"))
            .send()
            .await
            .expect("call");
        assert_eq!(response.status(), 200);
    }
    let metrics = crate::server::metrics_text(&server).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hearth_shadow_skipped_total") && l.ends_with(" 3")),
        "{metrics}"
    );
}
