//! Deploy with the CLI and the SDK, invoke over HTTP, survive a restart,
//! redeploy, list, show, delete.

use base64::Engine as _;
use rand::RngCore as _;

use crate::server::{Server, compiled_artifacts, deploy, function_names, http, problem, project};

#[tokio::test(flavor = "multi_thread")]
async fn cli_deploy_then_echo_round_trips_method_path_query_headers_and_a_mebibyte() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    let dir = project(&tmp.path().join("echo"), "echo", hearth_fixtures::ECHO, "");

    let output = server.cli().arg("deploy").arg(&dir).output().expect("hearth deploy");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "deploy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("deployed echo v1"), "{stdout}");
    assert!(stdout.contains("start-up: pre-initialised"), "{stdout}");
    let invoke_url = format!("{}/fn/default/echo/", server.url);
    assert!(stdout.contains(&format!("invoke: {invoke_url}")), "{stdout}");

    let mut body = vec![0u8; 1 << 20];
    rand::rng().fill_bytes(&mut body);
    let response = http()
        .put(format!("{invoke_url}v1/items/42?x=1&y=two"))
        .header("x-custom", "hello")
        .header("x-multi", "a")
        .body(body.clone())
        .send()
        .await
        .expect("invoke");
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-hearth-invocation-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let id = uuid::Uuid::parse_str(&id).expect("uuid");
    assert_eq!(id.get_version_num(), 7);
    let echo: serde_json::Value = response.json().await.expect("json");
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/v1/items/42");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(echo["headers"]["x-custom"][0], "hello");
    assert_eq!(echo["headers"]["x-multi"][0], "a");
    assert_eq!(echo["headers"]["x-hearth-base-path"][0], "/fn/default/echo");
    assert!(
        echo["headers"].get("authorization").is_none(),
        "credentials must not reach the guest"
    );
    assert_eq!(echo["body_len"], 1 << 20);
    let echoed = base64::engine::general_purpose::STANDARD
        .decode(echo["body_base64"].as_str().expect("base64"))
        .expect("decode");
    assert!(echoed == body, "body differs");

    // The CLI's invoke prints the body and exits 0.
    let output = server
        .cli()
        .args([
            "invoke",
            "echo",
            "--data",
            "from the cli",
            "-H",
            "x-from: cli",
            "--path",
            "/p?q=1",
        ])
        .output()
        .expect("hearth invoke");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let echo: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(echo["body"], "from the cli");
    assert_eq!(echo["headers"]["x-from"][0], "cli");
    assert_eq!(echo["path"], "/p");
    assert_eq!(echo["query"], "q=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_whose_start_up_calls_an_import_deploys_without_a_snapshot_and_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    let deploy = |name: &str, component: &str| {
        let dir = project(&tmp.path().join(name), name, component, "");
        let client = server.client();
        async move {
            let project = hearth_client::Project::load(&dir).expect("project");
            client.deploy(&project, |_, _| {}).await.expect("deploy")
        }
    };

    // The guests the echo and faults suites run are pre-initialised too, so
    // those suites check that a snapshot answers as the original does.
    for (name, component) in [
        ("hello", hearth_fixtures::HELLO),
        ("echo", hearth_fixtures::ECHO),
        ("faults", hearth_fixtures::FAULTS),
    ] {
        let deployed = deploy(name, component).await;
        assert_eq!(deployed.start_up, Some(hearth_client::StartUp::Snapshot), "{name}");
    }
    // nnprobe's start-up reads the clock: an import, which traps at deploy.
    let probe = deploy("nnprobe", hearth_fixtures::NNPROBE).await;
    let Some(hearth_client::StartUp::Plain { reason }) = &probe.start_up else {
        panic!("nnprobe cannot be pre-initialised: {:?}", probe.start_up);
    };
    assert!(reason.contains("pre-initialisation failed"), "{reason}");
    assert!(reason.contains("wall-clock"), "the reason names the import: {reason}");
    assert!(!reason.contains('\n'), "on one line: {reason}");

    let response = http()
        .get(server.fn_url("nnprobe", "/file?path=/missing"))
        .send()
        .await
        .expect("invoke");
    assert_eq!(response.status(), 404, "it runs, from scratch");
    let hello = http().get(server.fn_url("hello", "/")).send().await.expect("invoke");
    assert_eq!(hello.text().await.expect("body"), "hello from hearth\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_deploy_survives_restart_and_redeploy_serves_the_new_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    assert_eq!(deploy(&server, tmp.path(), "echo", hearth_fixtures::ECHO, "").await, 1);
    let response = http()
        .post(server.fn_url("echo", "/before"))
        .body("one")
        .send()
        .await
        .expect("invoke");
    assert_eq!(response.status(), 200);
    let compiled = compiled_artifacts(&data);
    assert_eq!(compiled.len(), 1, "{compiled:?}");
    assert!(server.terminate(), "SIGTERM should stop the server cleanly");

    // Same data directory, no redeploy: the function is still there.
    let server = Server::start(&data, &[]);
    let response = http()
        .post(server.fn_url("echo", "/after"))
        .body("two")
        .send()
        .await
        .expect("invoke");
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.expect("json");
    assert_eq!(echo["path"], "/after");
    assert_eq!(echo["body"], "two");
    assert_eq!(
        compiled_artifacts(&data),
        compiled,
        "a restart maps the precompiled artifact; it must not recompile"
    );

    // A redeploy under the same name (with another component) is version 2 and answers.
    assert_eq!(
        deploy(&server, &tmp.path().join("v2"), "echo", hearth_fixtures::HELLO, "").await,
        2
    );
    let response = http().get(server.fn_url("echo", "/")).send().await.expect("invoke");
    assert_eq!(response.text().await.expect("body"), "hello from hearth\n");

    let detail = server.client().show("echo").await.expect("show");
    assert_eq!(detail.function.version, 2);
    assert_eq!(detail.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
    assert_ne!(detail.versions[0].component, detail.versions[1].component);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_show_and_delete_through_cli_and_sdk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "echo", hearth_fixtures::ECHO, "").await;
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "public = true").await;

    assert_eq!(function_names(&server).await, ["echo", "hello"]);

    let output = server.cli().args(["functions", "list"]).output().expect("list");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(stdout.contains("echo") && stdout.contains("hello"), "{stdout}");

    let output = server
        .cli()
        .args(["functions", "show", "hello", "-o", "json"])
        .output()
        .expect("show");
    let detail: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(detail["manifest"]["public"], true);

    // Public functions need no token.
    let anonymous = reqwest::Client::new();
    let response = anonymous.get(server.fn_url("hello", "/")).send().await.expect("invoke");
    assert_eq!(response.status(), 200);

    let output = server
        .cli()
        .args(["functions", "delete", "hello"])
        .output()
        .expect("delete");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let response = http().get(server.fn_url("hello", "/")).send().await.expect("invoke");
    let body = problem(response, 404).await;
    assert!(body["invocation_id"].is_string());
    // Without a token, a missing function looks like any private one.
    let response = anonymous.get(server.fn_url("hello", "/")).send().await.expect("invoke");
    problem(response, 401).await;

    server.client().delete("echo").await.expect("sdk delete");
    assert!(server.client().list().await.expect("list").is_empty());
    let err = server.client().delete("echo").await.expect_err("already deleted");
    assert!(
        matches!(err, hearth_client::ClientError::Api(ref p) if p.status == 404),
        "{err}"
    );

    // The CLI says what went wrong and exits non-zero.
    let output = server.cli().args(["functions", "show", "echo"]).output().expect("show");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("404"));
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_runs_the_manifest_build_command() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    // The "build" copies the prebuilt component into place, as a real build would produce it.
    let build = format!("build = \"mkdir -p out && cp {} out/fn.wasm\"", hearth_fixtures::HELLO);
    let dir = project(&tmp.path().join("built"), "built", "out/fn.wasm", &build);
    let output = server
        .cli()
        .arg("deploy")
        .arg(dir.join("hearth.toml"))
        .output()
        .expect("deploy");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(dir.join("out/fn.wasm").is_file());
    let response = http().get(server.fn_url("built", "/")).send().await.expect("invoke");
    assert_eq!(response.status(), 200);
}
