//! What batching can buy a model at most, on this machine's CPU, with the
//! thread settings `hearth serve` uses: one model run per thread (tract),
//! as many runs at once as there are cores. For each sequence length, the
//! same rows run one per call (batching off) and `ROWS` per call (batching
//! on); the ratio of their throughputs is the ceiling an end-to-end
//! measurement of the batcher is held against.
//!
//! `model-ceiling MODEL.onnx [ROWS=16] [LENGTHS=16,32,64,128] [SECONDS=3]`
//! for a model with `input_ids` and `attention_mask` inputs of
//! `i64[batch, sequence]` (a BERT-style encoder, such as `embed`'s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_devices::{CpuDevice, Device as _, PreparedModel, Tensor};

fn inputs(rows: usize, length: usize) -> Vec<Tensor> {
    // Token ids spread over the vocabulary, every position kept.
    let ids: Vec<i64> = (0..rows * length).map(|i| 1000 + (i as i64 * 7919) % 28000).collect();
    let mask = vec![1i64; rows * length];
    let tensor = |data: &[i64]| Tensor::from_shape(&[rows, length], data).expect("shape");
    vec![tensor(&ids), tensor(&mask)]
}

/// Rows per second with `threads` threads each running `rows`-row calls for
/// `seconds`.
fn rate(model: &Arc<PreparedModel>, rows: usize, length: usize, threads: usize, seconds: f64) -> f64 {
    let call = inputs(rows, length);
    model.run(call.clone()).expect("warm-up run");
    let deadline = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let done: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (model, call) = (model.clone(), call.clone());
                scope.spawn(move || {
                    let mut done = 0;
                    while started.elapsed() < deadline {
                        model.run(call.clone()).expect("run");
                        done += rows;
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    done as f64 / started.elapsed().as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        return Err("usage: model-ceiling MODEL.onnx [ROWS=16] [LENGTHS=16,32,64,128] [SECONDS=3]".into());
    };
    let rows: usize = args.next().map_or(Ok(16), |a| a.parse())?;
    let lengths: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "16,32,64,128".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let seconds: f64 = args.next().map_or(Ok(3.0), |a| a.parse())?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let model = Arc::new(CpuDevice::new().prepare(&std::fs::read(&path)?)?);
    println!("| length | 1 row per run (rows/s) | {rows} rows per run (rows/s) | ceiling |");
    println!("|---|---|---|---|");
    for length in lengths {
        let single = rate(&model, 1, length, threads, seconds);
        let batched = rate(&model, rows, length, threads, seconds);
        println!("| {length} | {single:.1} | {batched:.1} | {:.2}x |", batched / single);
    }
    println!("({threads} threads, one run each at a time, as `hearth serve` runs a model on this machine)");
    Ok(())
}
