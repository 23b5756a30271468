//! Model conformance: each case runs on every device this machine has and is
//! checked against an independent reference with a stated tolerance.
//!
//! - The `classify` MLP is checked against a plain-Rust evaluation of the same
//!   weights ([`hearth_fixtures::models::mlp_reference`]), at batch 1 and 32,
//!   and through the batcher (16 concurrent calls joined into one run).
//! - PaddleOCR's recognition model (when fetched) is checked for its output
//!   shape and softmax rows on the CPU, and on a GPU against the CPU's output.
//!
//! `cargo test -p hearth-conformance` runs it on this machine's devices; the
//! `hearth-conformance` binary prints the table (what `scripts/gpu-check.sh`
//! runs on a GPU machine).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_devices::{BatchConfig, Batcher, Device, DevicePool, PreparedModel, Tensor};
use hearth_fixtures::models::{MLP_INPUTS, MLP_SEED, mlp, mlp_input, mlp_reference};

/// Largest absolute difference allowed from the f64 reference for the MLP.
pub const MLP_TOLERANCE: f32 = 1e-5;
/// Largest absolute difference allowed between a GPU and the CPU for the OCR
/// model's probabilities, and of a softmax row's sum from 1.
pub const OCR_TOLERANCE: f32 = 1e-3;

/// One case on one device.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Case name.
    pub case: String,
    /// Device it ran on.
    pub device: String,
    /// Largest error measured.
    pub max_error: f32,
    /// Largest error allowed.
    pub tolerance: f32,
    /// Run time (after preparing), wall clock.
    pub run: Duration,
    /// The busy time the run is billed for: the device's own measure
    /// (GPUs, with events), or the run's time on its thread (CPU).
    pub device_time: Option<Duration>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

impl Outcome {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.max_error <= self.tolerance
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_plain_array_view::<f32>()
        .map(|view| view.iter().copied().collect())
        .unwrap_or_default()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn outcome(case: &str, device: &dyn Device, max_error: f32, tolerance: f32, run: Duration) -> Outcome {
    Outcome {
        case: case.into(),
        device: device.id().to_string(),
        max_error,
        tolerance,
        run,
        device_time: None,
        failure: None,
    }
}

fn failed(case: &str, device: &dyn Device, why: String) -> Outcome {
    Outcome {
        case: case.into(),
        device: device.id().to_string(),
        max_error: f32::INFINITY,
        tolerance: 0.0,
        run: Duration::ZERO,
        device_time: None,
        failure: Some(why),
    }
}

fn mlp_rows(model: &PreparedModel, device: &dyn Device, rows: usize) -> Outcome {
    let case = format!("mlp/batch{rows}");
    let input: Vec<f32> = (0..rows as u64).flat_map(mlp_input).collect();
    let tensor = match Tensor::from_shape(&[rows, MLP_INPUTS], &input) {
        Ok(tensor) => tensor,
        Err(err) => return failed(&case, device, err.to_string()),
    };
    let started = Instant::now();
    match model.run_timed(vec![tensor]) {
        Ok((out, device_time)) => {
            let run = started.elapsed();
            let error = max_abs_diff(&values(&out[0]), &mlp_reference(MLP_SEED, &input));
            Outcome {
                device_time: Some(device_time),
                ..outcome(&case, device, error, MLP_TOLERANCE, run)
            }
        }
        Err(err) => failed(&case, device, err.to_string()),
    }
}

async fn mlp_batched(model: Arc<PreparedModel>, device: &dyn Device) -> Outcome {
    const CALLS: u64 = 16;
    let case = "mlp/batcher-16-calls";
    let batcher = Batcher::new(
        model,
        BatchConfig {
            window: Duration::from_secs(60),
            max_rows: CALLS as usize,
        },
        1,
    );
    let started = Instant::now();
    let calls: Vec<_> = (0..CALLS)
        .map(|n| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                let tensor = Tensor::from_shape(&[1, MLP_INPUTS], &mlp_input(n))?;
                let batched = batcher.run(vec![tensor], hearth_devices::CallTerms::default()).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((n, batched))
            })
        })
        .collect();
    let mut error = 0f32;
    for call in calls {
        let (n, batched) = match call.await {
            Ok(Ok(done)) => done,
            Ok(Err(err)) => return failed(case, device, err.to_string()),
            Err(err) => return failed(case, device, err.to_string()),
        };
        if batched.calls != CALLS as usize {
            return failed(
                case,
                device,
                format!("ran in a batch of {} calls, not {CALLS}", batched.calls),
            );
        }
        let reference = mlp_reference(MLP_SEED, &mlp_input(n));
        error = error.max(max_abs_diff(&values(&batched.outputs[0]), &reference));
    }
    outcome(case, device, error, MLP_TOLERANCE, started.elapsed())
}

/// A deterministic image-like input in [-1, 1].
fn ocr_input(width: usize) -> Vec<f32> {
    (0..3 * 48 * width)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

fn ocr_case(model: &PreparedModel, device: &dyn Device, width: usize, cpu: Option<&[f32]>) -> (Outcome, Vec<f32>) {
    let case = format!("ocr-rec/1x3x48x{width}");
    let tensor = match Tensor::from_shape(&[1, 3, 48, width], &ocr_input(width)) {
        Ok(tensor) => tensor,
        Err(err) => return (failed(&case, device, err.to_string()), Vec::new()),
    };
    // The first run of a shape optimises a plan for it; time the second.
    if let Err(err) = model.run(vec![tensor.clone()]) {
        return (failed(&case, device, err.to_string()), Vec::new());
    }
    let started = Instant::now();
    let (out, device_time) = match model.run_timed(vec![tensor]) {
        Ok(done) => done,
        Err(err) => return (failed(&case, device, err.to_string()), Vec::new()),
    };
    let run = started.elapsed();
    let shape = out[0].shape().to_vec();
    let expected = [1, width / 8, 6625];
    if shape != expected {
        return (
            failed(&case, device, format!("output shape {shape:?}, expected {expected:?}")),
            Vec::new(),
        );
    }
    let probs = values(&out[0]);
    let mut error = probs
        .chunks_exact(6625)
        .map(|row| (row.iter().sum::<f32>() - 1.0).abs())
        .fold(0.0, f32::max);
    if let Some(cpu) = cpu {
        error = error.max(max_abs_diff(&probs, cpu));
    }
    let outcome = Outcome {
        device_time: Some(device_time),
        ..outcome(&case, device, error, OCR_TOLERANCE, run)
    };
    (outcome, probs)
}

/// Runs every case on every device of `devices`; the OCR cases only when
/// `ocr_model` is given.
pub async fn run(devices: &DevicePool, ocr_model: Option<&Path>) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut cpu_ocr: Vec<Vec<f32>> = Vec::new();
    let ocr_bytes = ocr_model.and_then(|p| std::fs::read(p).ok());
    // The CPU first: GPUs are compared with its OCR outputs.
    for device in devices.all() {
        let is_cpu = device.id() == hearth_devices::DeviceId::Cpu;
        match device.prepare(&mlp(MLP_SEED)) {
            Ok(model) => {
                let model = Arc::new(model);
                for rows in [1, 32] {
                    outcomes.push(mlp_rows(&model, &*device, rows));
                }
                outcomes.push(mlp_batched(model, &*device).await);
            }
            Err(err) => outcomes.push(failed("mlp/prepare", &*device, err.to_string())),
        }
        let Some(bytes) = &ocr_bytes else { continue };
        match device.prepare(bytes) {
            Ok(model) => {
                for (i, width) in [320, 640].into_iter().enumerate() {
                    let reference = if is_cpu {
                        None
                    } else {
                        cpu_ocr.get(i).map(Vec::as_slice)
                    };
                    let (outcome, probs) = ocr_case(&model, &*device, width, reference);
                    if is_cpu {
                        cpu_ocr.push(probs);
                    }
                    outcomes.push(outcome);
                }
            }
            Err(err) => outcomes.push(failed("ocr-rec/prepare", &*device, err.to_string())),
        }
    }
    outcomes
}

/// The outcomes as a Markdown table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::from(
        "| case | device | max error | tolerance | run (wall) | run (device) | result |\n|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let result = match &o.failure {
            Some(why) => format!("FAIL: {why}"),
            None if o.passed() => "pass".into(),
            None => "FAIL: over tolerance".into(),
        };
        let device_time = o
            .device_time
            .map_or_else(|| "-".to_owned(), |t| format!("{:.2} ms", t.as_secs_f64() * 1000.0));
        out.push_str(&format!(
            "| {} | {} | {:.2e} | {:.0e} | {:.2} ms | {device_time} | {result} |\n",
            o.case,
            o.device,
            o.max_error,
            o.tolerance,
            o.run.as_secs_f64() * 1000.0
        ));
    }
    out
}

/// Throughput of `callers` concurrent single-row MLP calls on one device,
/// batched (2 ms window, up to `callers` rows) and not.
#[derive(Debug, Clone)]
pub struct BatchingFigure {
    /// Device.
    pub device: String,
    /// Calls per second with batching off.
    pub off_per_s: f64,
    /// Calls per second with batching on.
    pub on_per_s: f64,
    /// Mean calls per model run with batching on.
    pub mean_batch: f64,
}

/// Measures [`BatchingFigure`] on every device: `rounds` rounds of `callers`
/// concurrent calls each way.
pub async fn batching(devices: &DevicePool, callers: usize, rounds: usize) -> Vec<BatchingFigure> {
    let mut figures = Vec::new();
    for device in devices.all() {
        let Ok(model) = device.prepare(&mlp(MLP_SEED)) else {
            continue;
        };
        let model = Arc::new(model);
        let mut rates = Vec::new();
        let mut mean_batch = 1.0;
        for max_rows in [1, callers] {
            let batcher = Batcher::new(
                model.clone(),
                BatchConfig {
                    window: Duration::from_millis(2),
                    max_rows,
                },
                1,
            );
            let started = Instant::now();
            for _ in 0..rounds {
                let calls: Vec<_> = (0..callers as u64)
                    .map(|n| {
                        let batcher = batcher.clone();
                        tokio::spawn(async move {
                            let tensor = Tensor::from_shape(&[1, MLP_INPUTS], &mlp_input(n)).ok()?;
                            batcher
                                .run(vec![tensor], hearth_devices::CallTerms::default())
                                .await
                                .ok()
                        })
                    })
                    .collect();
                for call in calls {
                    let _ = call.await;
                }
            }
            rates.push((callers * rounds) as f64 / started.elapsed().as_secs_f64());
            let stats = batcher.stats();
            let runs = stats.runs.load(std::sync::atomic::Ordering::Relaxed).max(1);
            mean_batch = stats.calls.load(std::sync::atomic::Ordering::Relaxed) as f64 / runs as f64;
        }
        figures.push(BatchingFigure {
            device: device.id().to_string(),
            off_per_s: rates[0],
            on_per_s: rates[1],
            mean_batch,
        });
    }
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_case_passes_on_this_machines_devices() {
        let ocr = hearth_fixtures::models::fetched_ocr_for_test("the OCR conformance cases").model;
        let outcomes = run(&DevicePool::discover(), Some(&ocr)).await;
        let table = table(&outcomes);
        assert!(outcomes.iter().all(Outcome::passed), "{table}");
        assert!(
            outcomes.iter().any(|o| o.device == "cpu" && o.case == "mlp/batch32"),
            "{table}"
        );
        assert!(outcomes.iter().any(|o| o.case == "ocr-rec/1x3x48x640"), "{table}");
    }
}
