//! What the `wasi:nn` bridge costs, and what batching buys.
//!
//! - `overhead/*`: one compute call, batch 1, through the bridge (guest
//!   tensor → checks → batcher → device → output handle → bytes back) against
//!   the same model run directly with tract in this process. The bridge runs
//!   with batching off (`max_rows = 1`) and with the batcher in adaptive mode
//!   (window 0: joins only calls already waiting), so a lone call never waits.
//!   Models: the `classify` MLP, and PaddleOCR's recognition model when
//!   `scripts/fetch-ocr-model.sh` has fetched it.
//! - `batching/*`: 64 concurrent callers (one per simulated instance), each
//!   making one compute call on the MLP, batching on (2 ms window, 64 rows)
//!   vs off. Throughput is 64 calls per iteration time.
//!
//! Run: `cargo bench -p hearth-bridge --bench bridge`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hearth_bridge::wasi::nn::graph::{Host as _, HostGraph as _};
use hearth_bridge::wasi::nn::inference::HostGraphExecutionContext as _;
use hearth_bridge::wasi::nn::tensor::{HostTensor as _, TensorType};
use hearth_bridge::{ModelRef, NnCtx, NnHost};
use hearth_devices::{BatchConfig, CacheConfig, CallTerms, DevicePool, ModelCache, Placement};
use hearth_fixtures::models::{MLP_INPUTS, MLP_SEED, mlp, mlp_input};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{DefaultRuntime, Runnable};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio")
}

fn cache(batch: BatchConfig) -> Arc<ModelCache> {
    ModelCache::new(
        DevicePool::cpu_only(),
        CacheConfig {
            batch,
            ..CacheConfig::default()
        },
    )
}

/// A fresh instance's `wasi:nn` state (each call below is a new instance).
fn ctx(cache: &Arc<ModelCache>, path: &Path) -> NnCtx {
    let host = NnHost::new(cache.clone());
    let models = [(
        "m".to_owned(),
        ModelRef {
            key: path.display().to_string(),
            path: path.to_owned(),
            placement: Placement::Cpu,
            cache_entries: 0,
            batch: CallTerms::default(),
        },
    )];
    host.instance(
        &host.grant("bench", models),
        hearth_bridge::InstanceMemory::new(usize::MAX),
    )
}

/// One guest-shaped compute call: load by name, context, tensor, compute,
/// read the first output's bytes, drop everything.
async fn compute(ctx: &mut NnCtx, input: &str, dims: &[u32], bytes: &[u8]) -> usize {
    let mut host = &mut *ctx;
    let graph = host.load_by_name("m".into()).await.expect("host").expect("graph");
    let context = host
        .init_execution_context(graph)
        .await
        .expect("host")
        .expect("context");
    let tensor = host
        .new(dims.to_vec(), TensorType::Fp32, bytes.to_vec())
        .await
        .expect("tensor");
    let outputs = host
        .compute(
            wasmtime::component::Resource::new_borrow(context.rep()),
            vec![(input.into(), tensor)],
        )
        .await
        .expect("host")
        .expect("compute");
    let out = &outputs[0].1;
    let data = host
        .data(wasmtime::component::Resource::new_borrow(out.rep()))
        .await
        .expect("data");
    for (_, output) in outputs {
        hearth_bridge::wasi::nn::tensor::HostTensor::drop(&mut host, output)
            .await
            .expect("drop");
    }
    hearth_bridge::wasi::nn::inference::HostGraphExecutionContext::drop(&mut host, context)
        .await
        .expect("drop");
    data.len()
}

fn direct(bytes: &[u8], shape: &[usize]) -> (Box<dyn Runnable>, Tensor) {
    let mut model = onnx().model_for_read(&mut &bytes[..]).expect("parse");
    // Pin the input shape, as the bridge's per-shape plans do.
    model
        .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
        .expect("fact");
    let plan = DefaultRuntime
        .prepare(model.into_optimized().expect("optimize"))
        .expect("plan");
    let n: usize = shape.iter().product();
    let input = Tensor::from_shape(shape, &vec![0.25f32; n]).expect("tensor");
    (plan, input)
}

fn overhead_case(c: &mut Criterion, name: &str, path: &Path, input: &str, shape: &[usize]) {
    let rt = runtime();
    let onnx = std::fs::read(path).expect("model");
    let (plan, tensor) = direct(&onnx, shape);
    let dims: Vec<u32> = shape.iter().map(|&d| d as u32).collect();
    let bytes = tensor.as_bytes().to_vec();
    let mut group = c.benchmark_group(format!("overhead/{name}"));
    group.bench_function("tract-direct", |b| {
        b.iter(|| plan.run(tvec!(tensor.clone().into())).expect("run"))
    });
    for (label, batch) in [
        (
            "bridge-unbatched",
            BatchConfig {
                window: Duration::ZERO,
                max_rows: 1,
            },
        ),
        (
            "bridge-batcher-window0",
            BatchConfig {
                window: Duration::ZERO,
                max_rows: 64,
            },
        ),
    ] {
        let cache = cache(batch);
        rt.block_on(compute(&mut ctx(&cache, path), input, &dims, &bytes)); // warm: load + plan
        group.bench_function(label, |b| {
            b.to_async(&rt).iter(|| {
                let mut ctx = ctx(&cache, path);
                let (dims, bytes) = (dims.clone(), bytes.clone());
                async move { compute(&mut ctx, input, &dims, &bytes).await }
            })
        });
    }
    group.finish();
}

fn overhead(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mlp_path = dir.path().join("mlp.onnx");
    std::fs::write(&mlp_path, mlp(MLP_SEED)).expect("write");
    overhead_case(c, "mlp", &mlp_path, "input", &[1, MLP_INPUTS]);
    match hearth_fixtures::models::fetched_ocr() {
        Some(ocr) => overhead_case(c, "ocr-rec", &ocr.model, "x", &[1, 3, 48, 320]),
        None => eprintln!("skipping overhead/ocr-rec: run scripts/fetch-ocr-model.sh"),
    }
}

fn batching(c: &mut Criterion) {
    const CALLERS: u64 = 64;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mlp.onnx");
    std::fs::write(&path, mlp(MLP_SEED)).expect("write");
    let inputs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..CALLERS)
            .map(|n| mlp_input(n).iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect(),
    );
    // The ceiling batching can reach: the model alone, 64 rows one at a time
    // vs once as a batch.
    let (plan, _) = direct(&mlp(MLP_SEED), &[1, MLP_INPUTS]);
    let (batch_plan, _) = direct(&mlp(MLP_SEED), &[CALLERS as usize, MLP_INPUTS]);
    let rows: Vec<Tensor> = (0..CALLERS)
        .map(|n| Tensor::from_shape(&[1, MLP_INPUTS], &mlp_input(n)).expect("row"))
        .collect();
    let stacked = Tensor::stack_tensors(0, &rows).expect("stack");
    let mut group = c.benchmark_group("batching/mlp-64-rows-model-only");
    group.throughput(Throughput::Elements(CALLERS));
    group.bench_function("64-runs-of-1", |b| {
        b.iter(|| {
            for row in &rows {
                plan.run(tvec!(row.clone().into())).expect("run");
            }
        })
    });
    group.bench_function("1-run-of-64", |b| {
        b.iter(|| batch_plan.run(tvec!(stacked.clone().into())).expect("run"))
    });
    group.finish();

    let mut group = c.benchmark_group("batching/mlp-64-callers");
    group.throughput(Throughput::Elements(CALLERS));
    for (label, batch) in [
        (
            "off",
            BatchConfig {
                window: Duration::ZERO,
                max_rows: 1,
            },
        ),
        (
            "on-2ms-64rows",
            BatchConfig {
                window: Duration::from_millis(2),
                max_rows: 64,
            },
        ),
        (
            "on-window0-64rows",
            BatchConfig {
                window: Duration::ZERO,
                max_rows: 64,
            },
        ),
    ] {
        let cache = cache(batch);
        rt.block_on(compute(
            &mut ctx(&cache, &path),
            "input",
            &[1, MLP_INPUTS as u32],
            &inputs[0],
        ));
        group.bench_function(label, |b| {
            b.to_async(&rt).iter(|| {
                let (cache, path, inputs) = (cache.clone(), path.clone(), inputs.clone());
                async move {
                    let calls: Vec<_> = (0..CALLERS as usize)
                        .map(|n| {
                            let (cache, path, inputs) = (cache.clone(), path.clone(), inputs.clone());
                            tokio::spawn(async move {
                                let mut ctx = ctx(&cache, &path);
                                compute(&mut ctx, "input", &[1, MLP_INPUTS as u32], &inputs[n]).await
                            })
                        })
                        .collect();
                    for call in calls {
                        call.await.expect("join");
                    }
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(4));
    targets = overhead, batching
}
criterion_main!(benches);
