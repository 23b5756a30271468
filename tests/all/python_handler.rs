//! A handler written in Python (`functions/py-classify`, built from source
//! with componentize-py by its `build.sh`) runs on Hearth as it is: the
//! same requests get the same answers as the Rust `classify`, through the
//! same wasi-nn host.

use std::path::Path;

use hearth_fixtures::models::{MLP_INPUTS, MLP_SEED, mlp, mlp_input};
use serde_json::{Value, json};

use crate::inference::{MLP_MODEL, classify, deploy_classify, write_model};
use crate::server::{Server, deploy, http};

fn assert_same_top(rust: &Value, python: &Value) {
    let (rust, python) = (
        rust["top"].as_array().expect("top"),
        python["top"].as_array().expect("top"),
    );
    assert_eq!(rust.len(), 5);
    assert_eq!(python.len(), 5, "{python:?}");
    for (r, p) in rust.iter().zip(python) {
        assert_eq!(r["class"], p["class"], "{rust:?} vs {python:?}");
        let (r, p) = (r["score"].as_f64().expect("score"), p["score"].as_f64().expect("score"));
        assert!((r - p).abs() <= 1e-5, "{r} vs {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_handler_answers_as_the_rust_one() {
    let function = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../functions/py-classify");
    let built = std::process::Command::new(function.join("build.sh"))
        .status()
        .expect("running functions/py-classify/build.sh");
    assert!(built.success(), "functions/py-classify/build.sh failed");
    let wasm = function
        .join("build/py-classify.wasm")
        .canonicalize()
        .expect("the built component");

    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    deploy_classify(&server, dir.path(), "classify").await;
    write_model(&dir.path().join("py-classify"), &mlp(MLP_SEED));
    deploy(
        &server,
        dir.path(),
        "py-classify",
        wasm.to_str().expect("utf-8 path"),
        &format!("public = true\n{MLP_MODEL}"),
    )
    .await;

    for n in 0..4 {
        let rust = classify(&server, "classify", n).await;
        let python = classify(&server, "py-classify", n).await;
        assert_same_top(&rust, &python);
    }
    // 784 little-endian f32 as the body.
    let bytes: Vec<u8> = mlp_input(7).iter().flat_map(|v| v.to_le_bytes()).collect();
    let binary = http()
        .post(server.fn_url("py-classify", "/"))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .expect("binary");
    assert_eq!(binary.status(), 200);
    assert_same_top(
        &classify(&server, "classify", 7).await,
        &binary.json().await.expect("json"),
    );
    // Its refusals are its own answers, as the Rust one's are.
    let short = http()
        .post(server.fn_url("py-classify", "/"))
        .json(&json!({ "input": [1.0, 2.0] }))
        .send()
        .await
        .expect("short");
    assert_eq!(short.status(), 400);
    let answer: Value = short.json().await.expect("json");
    assert_eq!(answer["error"], format!("expected {MLP_INPUTS} values, got 2"));
    let get = http().get(server.fn_url("py-classify", "/")).send().await.expect("get");
    assert_eq!(get.status(), 405);
}
