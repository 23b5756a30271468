//! `ocr` end to end: lines rendered here with DejaVu Sans, read back exactly
//! by PaddleOCR's recognition model running behind `wasi:nn`.
//!
//! The model is not in git: `scripts/fetch-ocr-model.sh` puts it in
//! `$HEARTH_MODEL_CACHE` (default `~/.cache/hearth/models`). Without it this
//! test skips with a message, except under `CI=true`, where it fails.

use std::path::PathBuf;

use crate::server::{Server, deploy, http};

/// The model cache, or `None` (having said why) when the test should skip.
fn model_cache() -> Option<PathBuf> {
    let cache = std::env::var_os("HEARTH_MODEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/hearth/models")))?;
    if cache.join("ch_PP-OCRv4_rec_infer.onnx").is_file() && cache.join("ppocr_keys.txt").is_file() {
        return Some(cache);
    }
    let message = format!(
        "the OCR model is not in {}: run scripts/fetch-ocr-model.sh",
        cache.display()
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
    eprintln!("skipping: {message}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocr_reads_printed_lines_exactly() {
    let Some(cache) = model_cache() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let manifest = format!(
        "public = true\n[[models]]\nname = \"ppocr-rec\"\npath = {:?}\n[[files]]\nsource = {:?}\ntarget = \"/ppocr_keys.txt\"\n[limits]\nmemory_mb = 256\n",
        cache.join("ch_PP-OCRv4_rec_infer.onnx").display().to_string(),
        cache.join("ppocr_keys.txt").display().to_string(),
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
