//! `ocr` end to end: lines rendered here with DejaVu Sans, read back exactly
//! by PaddleOCR's recognition model running behind `wasi:nn`.
//!
//! The model is not in git: `scripts/fetch-ocr-model.sh` puts it in
//! `$HEARTH_MODEL_CACHE` (default `~/.cache/hearth/models`); `make test`
//! runs it first. Without the model this test fails, saying so.

use crate::server::{Server, deploy, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocr_reads_printed_lines_exactly() {
    let ocr = hearth_fixtures::models::fetched_ocr_for_test("ocr_reads_printed_lines_exactly");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let manifest = format!(
        "public = true\n[[models]]\nname = \"ppocr-rec\"\npath = {:?}\n[[files]]\nsource = {:?}\ntarget = \"/ppocr_keys.txt\"\n[limits]\nmemory_mb = 256\n",
        ocr.model.display().to_string(),
        ocr.keys.display().to_string(),
    );
    deploy(&server, dir.path(), "ocr", hearth_fixtures::OCR, &manifest).await;

    for line in ["HEARTH 2026", "Invoice 4711: 3.50 EUR"] {
        let response = http()
            .post(server.fn_url("ocr", "/"))
            .header("content-type", "image/png")
            .body(hearth_fixtures::text::png(line))
            .send()
            .await
            .expect("ocr");
        assert_eq!(response.status(), 200, "log:\n{}", server.log());
        let answer: serde_json::Value = response.json().await.expect("json");
        assert_eq!(answer["text"], line, "{answer}");
        let score = answer["score"].as_f64().expect("score");
        assert!(score > 0.5 && score <= 1.0, "{answer}");
    }
    let response = http()
        .post(server.fn_url("ocr", "/"))
        .body("not an image")
        .send()
        .await
        .expect("bad image");
    assert_eq!(response.status(), 400);
}

/// A model is parsed first in a child process bounded in memory: one that
/// needs more than `--model-check-memory-mb` to parse (PaddleOCR's 11 MB
/// model needs more than 128 MiB of address space) is refused at deploy,
/// naming the model, and the server is unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_needs_more_memory_to_parse_than_allowed_is_refused() {
    let ocr = hearth_fixtures::models::fetched_ocr_for_test("a_model_that_needs_more_memory_to_parse");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &["--model-check-memory-mb", "128"]);
    let manifest =
        "name = \"ocr\"\n[[models]]\nname = \"ppocr-rec\"\npath = \"model.onnx\"\n[limits]\nmemory_mb = 256\n";
    let form = reqwest::multipart::Form::new()
        .part("manifest", reqwest::multipart::Part::text(manifest))
        .part(
            "component",
            reqwest::multipart::Part::bytes(std::fs::read(hearth_fixtures::OCR).expect("ocr")),
        )
        .part(
            "model:ppocr-rec",
            reqwest::multipart::Part::bytes(std::fs::read(&ocr.model).expect("model")),
        );
    let response = crate::server::post_deploy(&server, form).await;
    let refused = crate::server::problem(response, 422).await;
    assert_eq!(refused["key"], "models[0].path", "{refused}");
    assert!(
        refused["detail"].as_str().is_some_and(|d| d.contains("128 MiB")),
        "{refused}"
    );
    let health = http()
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
}
