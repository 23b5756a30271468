//! Runs the model conformance cases on every device found and prints a
//! Markdown table; exits non-zero if any case fails.
//!
//! `hearth-conformance [OCR_MODEL.onnx]` (default: the fetched model, if any).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let ocr = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .or_else(hearth_conformance::fetched_ocr_model);
    if ocr.is_none() {
        eprintln!("no OCR model given or fetched: OCR cases not run");
    }
    let devices = hearth_devices::DevicePool::discover();
    let outcomes = hearth_conformance::run(&devices, ocr.as_deref()).await;
    print!("{}", hearth_conformance::table(&outcomes));
    if outcomes.iter().all(hearth_conformance::Outcome::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
