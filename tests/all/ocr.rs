//! `ocr` end to end: lines rendered here with DejaVu Sans, read back exactly
//! by PaddleOCR's recognition model running behind `wasi:nn`.
//!
//! The model is not in git: `scripts/fetch-ocr-model.sh` puts it in
//! `$HEARTH_MODEL_CACHE` (default `~/.cache/hearth/models`). Without it this
//! test skips with a message, except under `CI=true`, where it fails.

use std::path::PathBuf;

use ab_glyph::{Font as _, FontRef, PxScale, ScaleFont as _};

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

/// Black text on white, 32 px DejaVu Sans with a margin, as PNG.
fn render(text: &str) -> Vec<u8> {
    let font = FontRef::try_from_slice(dejavu::sans::regular()).expect("font");
    let scaled = font.as_scaled(PxScale::from(32.0));
    let margin = 12.0;
    let width: f32 = text.chars().map(|c| scaled.h_advance(font.glyph_id(c))).sum();
    let (w, h) = (
        (width + 2.0 * margin).ceil() as u32,
        (scaled.height() + 2.0 * margin).ceil() as u32,
    );
    let mut image = image::GrayImage::from_pixel(w, h, image::Luma([255]));
    let mut x = margin;
    for c in text.chars() {
        let id = font.glyph_id(c);
        let glyph = id.with_scale_and_position(PxScale::from(32.0), ab_glyph::point(x, margin + scaled.ascent()));
        x += scaled.h_advance(id);
        if let Some(outline) = font.outline_glyph(glyph) {
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let (px, py) = (bounds.min.x as i64 + i64::from(gx), bounds.min.y as i64 + i64::from(gy));
                if (0..i64::from(w)).contains(&px) && (0..i64::from(h)).contains(&py) {
                    let pixel = image.get_pixel_mut(px as u32, py as u32);
                    pixel[0] = pixel[0].min((255.0 * (1.0 - coverage)) as u8);
                }
            });
        }
    }
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    png
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
            .body(render(line))
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
