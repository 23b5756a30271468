//! `ocr`: reads one line of printed text with PaddleOCR's PP-OCRv4
//! recognition model, run by the host through `wasi:nn`.
//!
//! Request: a PNG or JPEG body. Response: `{"text": "...", "score": P}`.
//!
//! The steps are PaddleOCR's (as RapidOCR runs them): scale the image to
//! height 48 keeping its aspect ratio, normalise each channel to [-1, 1], pad
//! with zeros to at least 320 wide (and to a multiple of 160), run the model, and decode CTC greedily (best class
//! per column, repeats merged, blanks dropped); the score is the mean
//! probability of the characters kept.

use hearth_guest::nn::{Model, Tensor};
use hearth_guest::prelude::*;
use image::imageops::FilterType;

hearth_guest::handler!(ocr);

/// Model input height.
const HEIGHT: u32 = 48;
/// Narrowest model input; narrower lines are padded.
const MIN_WIDTH: u32 = 320;
/// Input widths are padded up to a multiple of this, so the host meets few
/// distinct shapes (it optimises the model once per input shape).
const WIDTH_STEP: u32 = 160;
/// Widest line accepted (a 48-high line this wide is ~100 characters).
const MAX_WIDTH: u32 = 4096;
/// The character list (the model's `character` metadata), deployed as an asset.
const KEYS: &str = "/ppocr_keys.txt";
/// The model's name in `hearth.toml`.
const MODEL: &str = "ppocr-rec";

async fn ocr(mut request: Request<Body>) -> Result<Response<Body>> {
    if request.method() != Method::POST {
        return Ok(error(StatusCode::METHOD_NOT_ALLOWED, "POST a PNG or JPEG image"));
    }
    let body = read_body(&mut request).await?;
    let image = match image::load_from_memory(&body) {
        Ok(image) => image.to_rgb8(),
        Err(err) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                &format!("expected a PNG or JPEG image: {err}"),
            ));
        }
    };
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Ok(error(StatusCode::BAD_REQUEST, "the image is empty"));
    }
    let resized_w = (f64::from(HEIGHT) * f64::from(w) / f64::from(h)).ceil() as u32;
    if resized_w > MAX_WIDTH {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            &format!("the line is too long: {w}x{h} scales to {resized_w}x{HEIGHT}, at most {MAX_WIDTH} wide"),
        ));
    }
    let resized_w = resized_w.max(1);
    let width = resized_w.max(MIN_WIDTH).div_ceil(WIDTH_STEP) * WIDTH_STEP;
    let resized = image::imageops::resize(&image, resized_w, HEIGHT, FilterType::Triangle);

    // CHW, normalised to [-1, 1], zero-padded on the right.
    let plane = (HEIGHT * width) as usize;
    let mut input = vec![0f32; 3 * plane];
    for (x, y, pixel) in resized.enumerate_pixels() {
        for c in 0..3 {
            // PaddleOCR reads images with OpenCV, so channel 0 is blue.
            let value = f32::from(pixel[2 - c]) / 255.0;
            input[c * plane + (y * width + x) as usize] = (value - 0.5) / 0.5;
        }
    }

    let keys = match std::fs::read_to_string(KEYS) {
        Ok(keys) => keys,
        Err(err) => return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{KEYS}: {err}"))),
    };
    // Class 0 is the CTC blank; then the characters; then a space.
    let mut charset: Vec<&str> = vec![""];
    charset.extend(keys.lines());
    charset.push(" ");

    let model = match Model::load(MODEL) {
        Ok(model) => model,
        Err(err) => return Ok(err.response()),
    };
    let outputs = match model.infer(&[("x", Tensor::f32(&[1, 3, HEIGHT, width], &input))]) {
        Ok(outputs) => outputs,
        Err(err) => return Ok(err.response()),
    };
    let Some(output) = outputs.first() else {
        return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, "the model returned nothing"));
    };
    let (Some(probs), [1, steps, classes]) = (output.to_f32(), output.dims()) else {
        return Ok(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("unexpected model output {:?}", output.dims()),
        ));
    };
    let (text, score) = ctc_greedy(&probs, *steps as usize, *classes as usize, &charset);
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "text": text, "score": score }),
    ))
}

/// Greedy CTC decoding of `steps` × `classes` probabilities.
fn ctc_greedy(probs: &[f32], steps: usize, classes: usize, charset: &[&str]) -> (String, f32) {
    let mut text = String::new();
    let mut kept = Vec::new();
    let mut previous = None;
    for row in probs.chunks_exact(classes).take(steps) {
        let (best, p) = row
            .iter()
            .copied()
            .enumerate()
            .fold((0, f32::MIN), |acc, (i, p)| if p > acc.1 { (i, p) } else { acc });
        if best != 0 && previous != Some(best) {
            text.push_str(charset.get(best).copied().unwrap_or(""));
            kept.push(p);
        }
        previous = Some(best);
    }
    let score = if kept.is_empty() {
        0.0
    } else {
        kept.iter().sum::<f32>() / kept.len() as f32
    };
    (text, score)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}
