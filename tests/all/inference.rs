//! The inference bridge end to end: models deployed with functions, run
//! through `wasi:nn` from real guests over real HTTP, checked against tract
//! run directly in the test.

use std::path::Path;

use hearth_fixtures::models::{MLP_INPUTS, MLP_SEED, mlp, mlp_input};
use serde_json::{Value, json};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{DefaultRuntime, Runnable};

use crate::server::{REQUEST_GUARD, Server, deploy, http, problem, project, still_serves};

/// The manifest lines of a function naming the MLP at `models/mnist-mlp.onnx`.
pub(crate) const MLP_MODEL: &str = "[[models]]\nname = \"mnist-mlp\"\npath = \"models/mnist-mlp.onnx\"\n";

/// Writes the `classify` model (fixed seed) into a project directory.
pub(crate) fn write_model(project_dir: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(project_dir.join("models")).expect("models dir");
    std::fs::write(project_dir.join("models/mnist-mlp.onnx"), bytes).expect("model");
}

pub(crate) async fn deploy_classify(server: &Server, root: &Path, name: &str) {
    deploy_classify_with(server, root, name, "").await;
}

/// [`deploy_classify`] with more manifest lines (`extra`, before the model).
pub(crate) async fn deploy_classify_with(server: &Server, root: &Path, name: &str, extra: &str) {
    write_model(&root.join(name), &mlp(MLP_SEED));
    deploy(
        server,
        root,
        name,
        hearth_fixtures::CLASSIFY,
        &format!("public = true\n{extra}{MLP_MODEL}"),
    )
    .await;
}

/// The top 5 (class, probability) of `input`, by tract directly.
fn expected_top(model: &dyn Runnable, input: &[f32]) -> Vec<(u64, f32)> {
    let tensor = Tensor::from_shape(&[1, MLP_INPUTS], input).expect("tensor");
    let out = model.run(tvec!(tensor.into())).expect("run");
    let scores: Vec<f32> = out[0]
        .to_plain_array_view::<f32>()
        .expect("f32")
        .iter()
        .copied()
        .collect();
    let mut ranked: Vec<(u64, f32)> = scores.iter().enumerate().map(|(c, &s)| (c as u64, s)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(5);
    ranked
}

fn tract_mlp() -> Box<dyn Runnable> {
    let model = onnx()
        .model_for_read(&mut &mlp(MLP_SEED)[..])
        .expect("parse")
        .into_optimized()
        .expect("optimize");
    DefaultRuntime.prepare(model).expect("runnable")
}

fn assert_top(answer: &Value, expected: &[(u64, f32)], what: &str) {
    let top = answer["top"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no top in {answer}"));
    assert_eq!(top.len(), 5, "{what}: {answer}");
    for (got, (class, score)) in top.iter().zip(expected) {
        assert_eq!(got["class"].as_u64(), Some(*class), "{what}: {answer}");
        let got_score = got["score"].as_f64().expect("score") as f32;
        assert!((got_score - score).abs() <= 1e-5, "{what}: {got_score} vs {score}");
    }
}

pub(crate) async fn classify(server: &Server, name: &str, n: u64) -> Value {
    let response = http()
        .post(server.fn_url(name, "/"))
        .json(&json!({ "input": mlp_input(n) }))
        .send()
        .await
        .expect("classify");
    assert_eq!(response.status(), 200, "log:\n{}", server.log());
    response.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_evicted_for_idleness_comes_back_from_the_cold_tier_unread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--model-idle-timeout-s", "0", "--reap-interval-ms", "20"],
    );
    deploy_classify_with(&server, dir.path(), "classify", "[scaling]\nidle_timeout_s = 0\n").await;
    let first = classify(&server, "classify", 3).await;
    // Its instance goes, then its model, into the cold tier.
    let client = server.client();
    let guard = std::time::Instant::now() + REQUEST_GUARD;
    let cold = loop {
        let status = client.status().await.expect("status");
        if status.models.is_empty() && status.cold_model_bytes > 0 {
            break status;
        }
        assert!(
            std::time::Instant::now() < guard,
            "the model never went cold: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(crate::server::metric(&server, "hearth_model_cold_memory_bytes").await > 0.0);
    // (The model the deploy warmed may already have gone cold and come back
    // for the first call: count from here.)
    assert_eq!(classify(&server, "classify", 3).await, first, "the same answer");
    let status = client.status().await.expect("status");
    assert_eq!(
        (status.model_loads, status.model_revivals),
        (cold.model_loads, cold.model_revivals + 1),
        "revived, not read again"
    );
    let revived = "hearth_model_cache_requests_total{result=\"cold\"";
    assert_eq!(
        crate::server::metric(&server, revived).await,
        status.model_revivals as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_matches_tract_and_concurrent_calls_get_their_own_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    deploy_classify(&server, dir.path(), "classify").await;
    let reference = tract_mlp();

    for n in 0..3 {
        let answer = classify(&server, "classify", n).await;
        assert_top(
            &answer,
            &expected_top(&*reference, &mlp_input(n)),
            &format!("json input {n}"),
        );
    }
    let raw: Vec<u8> = mlp_input(7).iter().flat_map(|v| v.to_le_bytes()).collect();
    let response = reqwest::Client::new()
        .post(server.fn_url("classify", "/"))
        .header("content-type", "application/octet-stream")
        .body(raw)
        .send()
        .await
        .expect("binary");
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    assert_top(&answer, &expected_top(&*reference, &mlp_input(7)), "binary input");

    // 32 at once: batched together on the host, each answer its own.
    let calls = (100..132u64).map(|n| {
        let url = server.fn_url("classify", "/");
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&json!({ "input": mlp_input(n) }))
                .send()
                .await
                .expect("classify");
            assert_eq!(response.status(), 200);
            (n, response.json::<Value>().await.expect("json"))
        })
    });
    let calls: Vec<_> = calls.collect();
    for call in calls {
        let (n, answer) = call.await.expect("join");
        assert_top(
            &answer,
            &expected_top(&*reference, &mlp_input(n)),
            &format!("concurrent {n}"),
        );
    }

    // Bad requests are the function's 400s, and it keeps answering.
    for body in [json!({ "input": [1.0, 2.0] }), json!({ "nope": 1 })] {
        let response = http()
            .post(server.fn_url("classify", "/"))
            .json(&body)
            .send()
            .await
            .expect("bad");
        assert_eq!(response.status(), 400, "{body}");
    }
    classify(&server, "classify", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_naming_the_same_model_share_one_loaded_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    deploy_classify(&server, dir.path(), "classify").await;
    deploy_classify(&server, dir.path(), "classify-b").await;
    let a = classify(&server, "classify", 3).await;
    let b = classify(&server, "classify-b", 3).await;
    assert_eq!(a, b);

    let status = server.client().status().await.expect("status");
    assert_eq!(status.model_loads, 1, "{status:?}");
    assert_eq!(status.models.len(), 1, "{status:?}");
    let digest = &status.models[0].digest;
    assert_eq!(status.models[0].device, "cpu");
    assert!(status.models[0].calls >= 2, "{status:?}");
    assert_eq!(status.devices[0].id, "cpu");
    for name in ["classify", "classify-b"] {
        let f = status.functions.iter().find(|f| f.name == name).expect("function");
        assert_eq!(f.models.len(), 1);
        assert_eq!(&f.models[0].digest, digest);
        assert!(f.models[0].warm);
    }
    // The CLI shows the same.
    let out = server.cli().args(["status"]).output().expect("hearth status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 loads, 0 revivals from the cold tier") && text.contains("classify-b v1: mnist-mlp"),
        "{text}"
    );
    let show = server.client().show("classify").await.expect("show");
    assert_eq!(show.function.models[0].name, "mnist-mlp");
    assert_eq!(&show.function.models[0].digest, digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tensors_are_guest_visible_errors_and_the_server_stays_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    deploy(&server, dir.path(), "hello", hearth_fixtures::HELLO, "public = true").await;
    write_model(&dir.path().join("nnprobe"), &mlp(MLP_SEED));
    deploy(&server, dir.path(), "nnprobe", hearth_fixtures::NNPROBE, MLP_MODEL).await;

    let n = MLP_INPUTS as u64;
    let cases = [
        (
            "fits",
            json!({ "model": "mnist-mlp", "input": "input", "dims": [2, n], "type": "fp32", "bytes": 2 * n * 4 }),
            200,
            "",
        ),
        (
            "wrong shape",
            json!({ "model": "mnist-mlp", "input": "input", "dims": [1, n - 1], "type": "fp32", "bytes": (n - 1) * 4 }),
            400,
            "invalid-argument",
        ),
        (
            "wrong byte length",
            json!({ "model": "mnist-mlp", "input": "input", "dims": [1, n], "type": "fp32", "bytes": n * 4 - 1 }),
            400,
            "invalid-argument",
        ),
        (
            "giant dims",
            json!({ "model": "mnist-mlp", "input": "input", "dims": [u32::MAX, u32::MAX, u32::MAX], "type": "fp32", "bytes": 16 }),
            400,
            "invalid-argument",
        ),
        (
            "wrong type",
            json!({ "model": "mnist-mlp", "input": "input", "dims": [1, n], "type": "i64", "bytes": n * 8 }),
            400,
            "invalid-argument",
        ),
        (
            "unsupported type",
            json!({ "model": "mnist-mlp", "input": "input", "dims": [1, n], "type": "fp16", "bytes": n * 2 }),
            400,
            "invalid-argument",
        ),
        (
            "unknown input",
            json!({ "model": "mnist-mlp", "input": "pixels", "dims": [1, n], "type": "fp32", "bytes": n * 4 }),
            400,
            "invalid-argument",
        ),
        (
            "unknown model",
            json!({ "model": "resnet", "input": "input", "dims": [1, n], "type": "fp32", "bytes": n * 4 }),
            404,
            "not-found",
        ),
    ];
    for (what, body, status, code) in cases {
        let response = http()
            .post(server.fn_url("nnprobe", "/compute"))
            .json(&body)
            .send()
            .await
            .expect(what);
        assert_eq!(response.status(), status, "{what}; log:\n{}", server.log());
        let answer: Value = response.json().await.expect("json");
        if status == 200 {
            assert_eq!(answer["outputs"][0]["dims"], json!([2, 10]), "{what}");
        } else {
            assert_eq!(answer["code"], code, "{what}: {answer}");
            assert!(
                answer["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{what}: {answer}"
            );
        }
    }
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_assets_are_checked_at_deploy_and_refusals_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let blobs = server.data_dir.join("blobs/sha256");
    let client = server.client();

    let cases = [
        ("gpu", "models[0].device", "device = \"gpu\"\n", mlp(MLP_SEED)),
        ("notonnx", "models[0].path", "", b"definitely not onnx".to_vec()),
        ("empty", "models[0].path", "", Vec::new()),
    ];
    for (name, key, extra, bytes) in cases {
        let project_dir = project(
            &dir.path().join(name),
            name,
            hearth_fixtures::CLASSIFY,
            &format!("{MLP_MODEL}{extra}"),
        );
        write_model(&project_dir, &bytes);
        let project = hearth_client::Project::load(&project_dir).expect("project");
        let err = client.deploy(&project, |_, _| {}).await.expect_err(name);
        let hearth_client::ClientError::Api(problem) = err else {
            panic!("{name}: {err}");
        };
        assert_eq!(problem.status, 422, "{name}: {problem}");
        assert_eq!(problem.key.as_deref(), Some(key), "{name}: {problem}");
    }
    assert_eq!(
        std::fs::read_dir(&blobs).expect("blobs").count(),
        0,
        "refused deploys left blobs"
    );

    // Parts that do not match the manifest are a 400, before anything is kept.
    let manifest = format!("name = \"parts\"\n{MLP_MODEL}");
    let wasm = std::fs::read(hearth_fixtures::CLASSIFY).expect("wasm");
    let forms = [
        ("missing model", vec![("component", wasm.clone())]),
        (
            "undeclared model",
            vec![
                ("component", wasm.clone()),
                ("model:mnist-mlp", mlp(1)),
                ("model:other", mlp(1)),
            ],
        ),
        (
            "undeclared file",
            vec![("component", wasm.clone()), ("file:0", b"x".to_vec())],
        ),
        (
            "twice",
            vec![
                ("component", wasm.clone()),
                ("model:mnist-mlp", mlp(1)),
                ("model:mnist-mlp", mlp(1)),
            ],
        ),
    ];
    for (what, parts) in forms {
        let mut form = reqwest::multipart::Form::new().text("manifest", manifest.clone());
        for (name, bytes) in parts {
            form = form.part(name, reqwest::multipart::Part::bytes(bytes));
        }
        let response = http()
            .post(format!("{}/v1/functions", server.url))
            .multipart(form)
            .send()
            .await
            .expect(what);
        let body = problem(response, 400).await;
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("model") || d.contains("file")),
            "{what}: {body}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&blobs).expect("blobs").count(),
        0,
        "refused uploads left blobs"
    );
    assert_eq!(client.list().await.expect("list").len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_are_mounted_read_only_and_nothing_else_is_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let project_dir = dir.path().join("nnprobe");
    std::fs::create_dir_all(project_dir.join("assets")).expect("dir");
    std::fs::write(project_dir.join("assets/labels.txt"), "cat\ndog\n").expect("labels");
    std::fs::write(project_dir.join("vocab.json"), "{\"a\": 1}").expect("vocab");
    let files = "[[files]]\nsource = \"assets/labels.txt\"\ntarget = \"/labels.txt\"\n\
                 [[files]]\nsource = \"vocab.json\"\ntarget = \"/data/vocab.json\"\n";
    deploy(&server, dir.path(), "nnprobe", hearth_fixtures::NNPROBE, files).await;

    let read = |server: &Server, path: &str| {
        let url = server.fn_url("nnprobe", &format!("/file?path={path}"));
        async move {
            let response = http().get(url).send().await.expect("file");
            (response.status().as_u16(), response.text().await.expect("body"))
        }
    };
    assert_eq!(read(&server, "/labels.txt").await, (200, "cat\ndog\n".into()));
    assert_eq!(read(&server, "/data/vocab.json").await, (200, "{\"a\": 1}".into()));
    for outside in [
        "/etc/passwd",
        "/../hearth.db",
        "/data/../../blobs",
        "/proc/self/environ",
    ] {
        assert_eq!(read(&server, outside).await.0, 404, "{outside} must not be readable");
    }
    let response = http()
        .post(server.fn_url("nnprobe", "/write?path=/new.txt"))
        .send()
        .await
        .expect("write");
    assert_eq!(response.status(), 403, "the mount is read-only");
    assert_eq!(read(&server, "/new.txt").await.0, 404);

    // After a restart the assets are still there (rebuilt from blobs if needed).
    assert!(server.terminate());
    std::fs::remove_dir_all(data.join("assets")).expect("remove assets");
    let server = Server::start(&data, &[]);
    assert_eq!(read(&server, "/labels.txt").await, (200, "cat\ndog\n".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_models_of_warm_functions_are_preloaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    write_model(&dir.path().join("warm"), &mlp(MLP_SEED));
    let warm = format!("{MLP_MODEL}[scaling]\nmin_instances = 1\n");
    deploy(&server, dir.path(), "warm", hearth_fixtures::CLASSIFY, &warm).await;
    write_model(&dir.path().join("cold"), &mlp(2));
    deploy(&server, dir.path(), "cold", hearth_fixtures::CLASSIFY, MLP_MODEL).await;
    assert!(server.terminate());

    let server = Server::start(&data, &[]);
    let client = server.client();
    // Preloading runs in the background after start: poll until it is done
    // (the guard only stops a hang).
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        let status = client.status().await.expect("status");
        if status.model_loads >= 1 || std::time::Instant::now() > guard {
            break status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let warm_of = |name: &str| {
        let f = status.functions.iter().find(|f| f.name == name).expect("function");
        f.models[0].warm
    };
    assert!(warm_of("warm"), "{status:?}");
    assert!(
        !warm_of("cold"),
        "models of functions without min_instances load on first use: {status:?}"
    );
    assert_eq!(status.model_loads, 1, "{status:?}");
}

/// A guest that hands the host 4,094 tensors of 64 KiB each (256 MiB, from
/// an instance limited to 16 MiB) gets a wasi-nn `too-large` error: the
/// host keeps only what fits under the instance's memory limit, so the
/// server's resident memory grows by at most a bounded amount (the
/// instance's own limit plus what the allocator keeps of freed blocks;
/// 96 MiB is stated), and the server goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_a_guest_hoards_count_against_its_memory_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    write_model(&dir.path().join("nnprobe"), &mlp(MLP_SEED));
    let manifest = format!("{MLP_MODEL}[limits]\nmemory_mb = 16\ntimeout_ms = 30000\n");
    deploy(&server, dir.path(), "nnprobe", hearth_fixtures::NNPROBE, &manifest).await;
    // Warm: the model loaded, an instance made and back in the pool.
    let warm = http()
        .get(server.fn_url("nnprobe", "/hoard?model=mnist-mlp&kb=1024&count=1"))
        .send()
        .await
        .expect("warm");
    assert_eq!(warm.status(), 200);
    let before = server.rss_kib() << 10;

    let answer: Value = http()
        .get(server.fn_url("nnprobe", "/hoard?model=mnist-mlp&kb=64&count=4094"))
        .send()
        .await
        .expect("hoard")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["created"], 4094, "{answer}");
    assert!(
        answer["code"].as_str().is_some_and(|c| c.ends_with("TooLarge")),
        "{answer}"
    );
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("memory limit of 16 MiB")),
        "{answer}"
    );
    let grown = (server.rss_kib() << 10).saturating_sub(before);
    assert!(grown < 96 << 20, "the server grew by {} MiB", grown >> 20);
    let again = http()
        .get(server.fn_url("nnprobe", "/hoard?model=mnist-mlp&kb=1024&count=1"))
        .send()
        .await
        .expect("again");
    assert_eq!(again.status(), 200, "the server and the function still answer");
}

/// `cache_entries` on a model: an identical call from any of the tenant's
/// functions naming the model is answered from the cache, bit for bit,
/// with no model run; records and `/metrics` count the hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_inference_inputs_are_answered_from_the_tenants_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    for name in ["first", "second"] {
        write_model(&dir.path().join(name), &mlp(MLP_SEED));
        let manifest = format!("public = true\n{MLP_MODEL}cache_entries = 16\n");
        deploy(&server, dir.path(), name, hearth_fixtures::CLASSIFY, &manifest).await;
    }
    let ran = classify(&server, "first", 3).await;
    let cached = classify(&server, "second", 3).await;
    assert_eq!(cached, ran, "the same answer, from another function of the tenant");
    let other = classify(&server, "second", 4).await;
    assert_ne!(other, ran);

    let records: Vec<Value> = crate::server::usage_export(&server, "function=second")
        .await
        .lines()
        .map(|line| serde_json::from_str(line).expect("record"))
        .collect();
    let counts: Vec<(u64, u64)> = records
        .iter()
        .map(|r| {
            (
                r["inference_calls"].as_u64().expect("calls"),
                r["inference_cache_hits"].as_u64().expect("hits"),
            )
        })
        .collect();
    assert_eq!(counts, [(0, 1), (1, 0)], "{records:?}");
    let metrics = crate::server::metrics_text(&server).await;
    for (result, n) in [("hit", 1), ("miss", 2)] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("hearth_inference_cache_requests_total{")
                    && l.contains(&format!("result=\"{result}\""))
                    && l.ends_with(&format!(" {n}"))),
            "{result}: {metrics}"
        );
    }
}
