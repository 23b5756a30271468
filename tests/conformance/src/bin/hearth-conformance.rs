//! Runs the model conformance cases on every device found and prints a
//! Markdown table; exits non-zero if any case fails. With `--bench`, also
//! measures batching throughput (64 concurrent single-row MLP calls, batched
//! vs not) on every device.
//!
//! `hearth-conformance [--bench] [OCR_MODEL.onnx]` (default: the fetched
//! model, if any).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Device discovery says on stderr what it found and why a GPU is unused.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut bench = false;
    let mut ocr = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--bench" => bench = true,
            "-h" | "--help" => {
                println!("usage: hearth-conformance [--bench] [OCR_MODEL.onnx]");
                return ExitCode::SUCCESS;
            }
            path => ocr = Some(std::path::PathBuf::from(path)),
        }
    }
    let ocr = ocr.or_else(|| hearth_fixtures::models::fetched_ocr().map(|o| o.model));
    if ocr.is_none() {
        eprintln!("no OCR model given or fetched: OCR cases not run");
    }
    let devices = hearth_devices::DevicePool::discover();
    let outcomes = hearth_conformance::run(&devices, ocr.as_deref()).await;
    print!("{}", hearth_conformance::table(&outcomes));
    if bench {
        println!(
            "\n| device | batching off (calls/s) | batching on (calls/s) | ratio | mean batch |\n|---|---|---|---|---|"
        );
        for f in hearth_conformance::batching(&devices, 64, 200).await {
            println!(
                "| {} | {:.0} | {:.0} | {:.2}x | {:.1} |",
                f.device,
                f.off_per_s,
                f.on_per_s,
                f.on_per_s / f.off_per_s,
                f.mean_batch
            );
        }
    }
    if outcomes.iter().all(hearth_conformance::Outcome::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
