//! Rows of the fault matrix that involve the control plane while invocations
//! run: delete during a long invocation, redeploy under load, and another
//! tenant reaching for what is not theirs.

use crate::server::*;

/// Deleting a function lets a running invocation finish (and be recorded);
/// later calls are 404.
#[tokio::test]
async fn delete_during_a_long_invocation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(
        &server,
        tmp.path(),
        "slow",
        hearth_fixtures::FAULTS,
        "public = true\n[limits]\ntimeout_ms = 30000\n",
    )
    .await;
    let running = tokio::spawn(reqwest::get(server.fn_url("slow", "/slow-body?ms=800")));
    wait_for_instances(&server, "slow", "busy", |p| p.busy == 1).await;
    server.client().delete("slow").await.expect("delete");
    let running = running.await.expect("task").expect("response");
    assert_eq!(running.status(), 200);
    let id = running.headers()["x-hearth-invocation-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(
        running.text().await.expect("body"),
        "done\n",
        "the running call completes"
    );
    // (Anonymous callers get 401 for any non-public path, existing or not.)
    let after = http().get(server.fn_url("slow", "/ok")).send().await.expect("after");
    problem(after, 404).await;
    let usage = usage_export(&server, "function=slow").await;
    assert!(
        usage.contains(&id),
        "the deleted function's last call is recorded: {usage}"
    );
}

/// Redeploying while a stream of calls runs: every answer is 200 from exactly
/// one version (old or new), never a 5xx.
#[tokio::test]
async fn redeploy_under_load_answers_from_one_version() {
    use std::sync::atomic::Ordering;
    const HELLO: &str = "hello from hearth\n";
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "svc", hearth_fixtures::HELLO, "public = true\n").await;
    let url = server.fn_url("svc", "/path");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Answers seen: all, from echo, and from hello after echo.
    let (seen_tx, mut seen) = tokio::sync::watch::channel((0usize, 0usize, 0usize));
    let seen_tx = std::sync::Arc::new(seen_tx);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (url, stop, seen_tx) = (url.clone(), stop.clone(), seen_tx.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut versions: Vec<&str> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let response = http.get(&url).send().await.expect("no dropped connection");
                    let status = response.status().as_u16();
                    let body = response.text().await.expect("body");
                    assert_eq!(status, 200, "{body}");
                    let version = if body == HELLO {
                        "hello"
                    } else {
                        let echo: serde_json::Value = serde_json::from_str(&body).expect("either hello or an echo");
                        assert_eq!(echo["path"], "/path");
                        "echo"
                    };
                    if versions.last() != Some(&version) {
                        versions.push(version);
                    }
                    seen_tx.send_modify(|(answered, echo, hello_again)| {
                        *answered += 1;
                        match versions.as_slice() {
                            [.., "echo"] => *echo += 1,
                            [.., "echo", "hello"] => *hello_again += 1,
                            _ => {}
                        }
                    });
                }
                versions
            })
        })
        .collect();
    let guard = std::time::Duration::from_secs(60);
    let answered = |seen: &tokio::sync::watch::Receiver<(usize, usize, usize)>| seen.borrow().0;
    let traffic_during = async |component: &str, seen: &tokio::sync::watch::Receiver<(usize, usize, usize)>| {
        let before = answered(seen);
        deploy(&server, tmp.path(), "svc", component, "public = true\n").await;
        assert!(
            answered(seen) > before,
            "no request was answered while the redeploy ran"
        );
    };
    // Traffic first, then two redeploys (hello → echo → hello) while it
    // flows; each new version is seen by the clients before the next.
    tokio::time::timeout(guard, seen.wait_for(|(answered, ..)| *answered >= 20))
        .await
        .expect("clients running")
        .expect("clients");
    traffic_during(hearth_fixtures::ECHO, &seen).await;
    tokio::time::timeout(guard, seen.wait_for(|(_, echo, _)| *echo > 0))
        .await
        .expect("the clients reach echo")
        .expect("clients");
    traffic_during(hearth_fixtures::HELLO, &seen).await;
    tokio::time::timeout(guard, seen.wait_for(|(.., hello_again)| *hello_again > 0))
        .await
        .expect("the clients reach hello again")
        .expect("clients");
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let versions = client.await.expect("client");
        // One version at a time, in deploy order: never back to an older
        // one once a newer one answered.
        assert!(
            matches!(
                versions.as_slice(),
                ["hello"] | ["hello", "echo"] | ["hello", "echo", "hello"] | ["echo"] | ["echo", "hello"]
            ),
            "{versions:?}"
        );
    }
}

/// Another tenant's functions, versions and usage do not exist for a
/// tenant's tokens: 404, and nothing is recorded under the owner.
#[tokio::test]
async fn other_tenants_see_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "private", hearth_fixtures::HELLO, "").await;
    let admin = server
        .client()
        .create_token(Some("mallory"), "admin", None)
        .await
        .expect("token")
        .token
        .expect("secret");
    let http = reqwest::Client::new();
    let as_mallory = |request: reqwest::RequestBuilder| request.bearer_auth(&admin).send();
    for (what, request) in [
        ("invoke", http.get(server.fn_url("private", "/"))),
        (
            "show",
            http.get(format!("{}/v1/functions/private?tenant=default", server.url)),
        ),
        (
            "delete",
            http.delete(format!("{}/v1/functions/private?tenant=default", server.url)),
        ),
        ("usage", http.get(format!("{}/v1/usage?tenant=default", server.url))),
        ("tokens", http.get(format!("{}/v1/tokens?tenant=default", server.url))),
    ] {
        let response = as_mallory(request).await.expect(what);
        let body = problem(response, 404).await;
        assert!(!body.to_string().contains("hello"), "{what}: {body}");
    }
    // Still there, and nothing was recorded under `default`.
    still_serves_private(&server).await;
    let usage = usage_export(&server, "").await;
    assert_eq!(usage.lines().count(), 1, "only the owner's own call: {usage}");
}

async fn still_serves_private(server: &Server) {
    let response = http().get(server.fn_url("private", "/")).send().await.expect("owner");
    assert_eq!(response.status(), 200);
    // Complete: the whole body (its usage record is committed before it ends).
    assert_eq!(response.text().await.expect("body"), "hello from hearth\n");
}

/// A model file lost on disk fails only the function that names it, with a
/// precise 422; the rest of the server is unaffected.
#[tokio::test]
async fn a_missing_or_damaged_model_blob_fails_only_its_function() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;
    crate::inference::deploy_classify(&server, tmp.path(), "classify").await;
    drop(server);
    let blob = {
        let model = hearth_fixtures::models::mlp(hearth_fixtures::models::MLP_SEED);
        let digest = {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(&model))
        };
        walk(&data.join("blobs"))
            .into_iter()
            .find(|p| p.ends_with(&digest))
            .expect("the model's blob")
    };
    let refused = |server: &Server| {
        let request = http()
            .post(server.fn_url("classify", "/"))
            .json(&serde_json::json!({ "input": hearth_fixtures::models::mlp_input(1) }));
        async move {
            let body = problem(request.send().await.expect("classify"), 422).await;
            assert_eq!(body["key"], "models[0].path", "{body}");
            assert!(
                body["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("missing or damaged")),
                "{body}"
            );
        }
    };

    // Damaged in place: same size, one weight byte flipped.
    let mut bytes = std::fs::read(&blob).expect("read blob");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&blob, &bytes).expect("damage the blob");
    let server = Server::start(&data, &[]);
    refused(&server).await;
    still_serves(&server).await;
    drop(server);

    // Gone.
    std::fs::remove_file(&blob).expect("lose the blob");
    let server = Server::start(&data, &[]);
    refused(&server).await;
    still_serves(&server).await;
    assert!(!blob.exists());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir").map(|e| e.expect("entry")) {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
