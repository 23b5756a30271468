//! The model tier of a cold start: what it costs to bring an evicted model
//! back, split into its phases, against the floor of reading and parsing
//! the file. For each example model (classify's MLP, generated; ocr's
//! PaddleOCR and embed's MiniLM, when fetched):
//!
//! - read: the ONNX file from disk (page cache warm, as on a node that
//!   evicted it from the model cache, not from memory);
//! - parse: ONNX protobuf to tract's graph;
//! - optimise: type and optimise the graph (PaddleOCR only types with
//!   concrete shapes, so its plan is made at the first run instead);
//! - plan: tract's runnable plan;
//! - first run: one inference of a typical input;
//! - and the whole as the server does it (`Device::prepare`, then a run);
//! - from the cold tier: the first run on the model kept prepared (its
//!   plans with it), which is all a model revived from Hearth's cold tier
//!   costs besides a new batcher;
//! - from NNEF: the decluttered model written once as an NNEF archive
//!   (tract's own format) and brought back from it instead of from ONNX
//!   (read + parse of the archive, optimise, plan, first run): what a
//!   second tier on disk would cost, for the models that type without
//!   concrete shapes.
//!
//! `model-reload [ROUNDS=5]`; medians in milliseconds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hearth_devices::{CpuDevice, Device as _, Tensor};
use tract_onnx::prelude::*;

struct Case {
    name: &'static str,
    path: PathBuf,
    inputs: fn() -> Vec<Tensor>,
}

fn mlp_inputs() -> Vec<Tensor> {
    let row = hearth_fixtures::models::mlp_input(1);
    vec![Tensor::from_shape(&[1, row.len()], &row).expect("shape")]
}

fn ocr_inputs() -> Vec<Tensor> {
    vec![Tensor::from_shape(&[1, 3, 48, 320], &vec![0.1f32; 3 * 48 * 320]).expect("shape")]
}

fn minilm_inputs() -> Vec<Tensor> {
    let ids: Vec<i64> = (0..16).map(|i| 1000 + i * 37).collect();
    vec![
        Tensor::from_shape(&[1, 16], &ids).expect("shape"),
        Tensor::from_shape(&[1, 16], &[1i64; 16]).expect("shape"),
    ]
}

fn median(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(5), |a| a.parse())?;
    let dir = tempfile_dir()?;
    let mlp = dir.join("mnist-mlp.onnx");
    std::fs::write(&mlp, hearth_fixtures::models::mlp(hearth_fixtures::models::MLP_SEED))?;
    let cache = std::env::var_os("HEARTH_MODEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/hearth/models")))
        .unwrap_or_default();
    let mut cases = vec![Case {
        name: "classify (MLP)",
        path: mlp,
        inputs: mlp_inputs,
    }];
    for (name, file, inputs) in [
        (
            "ocr (PP-OCRv4 rec)",
            "ch_PP-OCRv4_rec_infer.onnx",
            ocr_inputs as fn() -> Vec<Tensor>,
        ),
        ("embed (MiniLM-L6)", "minilm/all-MiniLM-L6-v2.onnx", minilm_inputs),
    ] {
        let path = cache.join(file);
        if path.is_file() {
            cases.push(Case { name, path, inputs });
        } else {
            eprintln!("{}: not fetched, skipped", path.display());
        }
    }
    println!(
        "| model | size | read | parse | optimise | plan | first run | floor (read+parse) | whole reload + first run | ÷ floor | from the cold tier | ÷ floor | from NNEF: read+parse / whole | ÷ floor |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for case in cases {
        let mut phases: [Vec<Duration>; 5] = Default::default();
        let (mut whole, mut revived) = (Vec::new(), Vec::new());
        let (mut nnef_load, mut nnef_whole) = (Vec::new(), Vec::new());
        let nnef_path = dir.join("model.nnef.tar");
        let nnef = tract_nnef::nnef().with_onnx();
        let wrote = onnx()
            .model_for_path(&case.path)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .and_then(|typed| nnef.write_to_tar(&typed, std::fs::File::create(&nnef_path)?).map(drop));
        if let Err(err) = &wrote {
            eprintln!("{}: no NNEF archive: {err:#}", case.name);
        }
        let mut size = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            let bytes = std::fs::read(&case.path)?;
            phases[0].push(t.elapsed());
            size = bytes.len();
            let t = Instant::now();
            let model = onnx().model_for_read(&mut &bytes[..])?;
            phases[1].push(t.elapsed());
            let t = Instant::now();
            let optimised = model.clone().into_optimized();
            phases[2].push(t.elapsed());
            let t = Instant::now();
            let plan = optimised.ok().map(|typed| typed.into_runnable());
            phases[3].push(t.elapsed());
            let t = Instant::now();
            match plan {
                Some(Ok(plan)) => {
                    plan.run((case.inputs)().into_iter().map(TValue::from).collect())?;
                }
                // Typed per shape at the first run, as the server does.
                _ => {
                    let prepared = CpuDevice::new().prepare(&bytes)?;
                    prepared.run((case.inputs)())?;
                }
            }
            phases[4].push(t.elapsed());
            // The whole, as the model cache does it after an eviction.
            let t = Instant::now();
            let bytes = std::fs::read(&case.path)?;
            let prepared = CpuDevice::new().prepare(&bytes)?;
            prepared.run((case.inputs)())?;
            whole.push(t.elapsed());
            let t = Instant::now();
            prepared.run((case.inputs)())?;
            revived.push(t.elapsed());
            if wrote.is_ok() {
                let t = Instant::now();
                let bytes = std::fs::read(&nnef_path)?;
                let typed = nnef.model_for_read(&mut &bytes[..])?;
                nnef_load.push(t.elapsed());
                let plan = typed.into_optimized()?.into_runnable()?;
                plan.run((case.inputs)().into_iter().map(TValue::from).collect())?;
                nnef_whole.push(t.elapsed());
            }
        }
        let [read, parse, optimise, plan, run] = phases.map(median);
        let (whole, revived) = (median(whole), median(revived));
        let from_nnef = if nnef_whole.is_empty() {
            "– | –".to_owned()
        } else {
            let (load, all) = (median(nnef_load), median(nnef_whole));
            format!("{load:.2} / {all:.2} | {:.1}x", all / (read + parse))
        };
        println!(
            "| {} | {:.1} MB | {read:.2} | {parse:.2} | {optimise:.2} | {plan:.2} | {run:.2} | {:.2} | {whole:.2} | {:.1}x | {revived:.2} | {:.2}x | {from_nnef} |",
            case.name,
            size as f64 / 1e6,
            read + parse,
            whole / (read + parse),
            revived / (read + parse)
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("hearth-model-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
