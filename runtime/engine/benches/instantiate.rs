//! Fresh-instance cost, pooled vs on-demand allocation, side by side:
//! - `minimal`: a component with one exported function (store + instantiate
//!   + call + drop), the floor set by wasmtime itself;
//! - `hello` / `echo`: a full `wasi:http` invocation through
//!   [`Engine::invoke`] (store, WASI context, instantiate, guest start-up,
//!   handler, response body collected, drop);
//! - `hello` / `echo` `reused`: the same invocation on a warm instance handed
//!   back by the previous one (what the scheduler's pools do);
//! - `pooled-plain`: pooled, without pre-initialisation (fresh instances run
//!   the guest's start-up instead of starting from its deploy-time snapshot);
//! - one knob of the pooling allocator off at a time, to see what each
//!   saves: `pooled-no-keep-resident` (dropped memories are decommitted, not
//!   zeroed in place), `pooled-decommit-batch-64` (dropped slots decommitted
//!   64 at a time, as `wasmtime serve` tunes it), `pooled-no-cow` (initial memory copied from the data
//!   segments instead of mapped copy-on-write).
//!
//! Run: `cargo bench -p hearth-engine --bench instantiate`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hearth_engine::{Engine, EngineConfig, Instance, Limits, Start};
use http_body_util::{BodyExt as _, Empty};

const MINIMAL: &str = r#"(component
  (core module $m (func (export "run") (result i32) i32.const 42))
  (core instance $i (instantiate $m))
  (func (export "run") (result u32) (canon lift (core func $i "run"))))"#;

/// What an engine compared differs in from the defaults.
type Tweak = fn(&mut EngineConfig);

/// The engines compared, by label.
const CONFIGS: [(&str, Tweak); 6] = [
    ("pooled", |_| {}),
    ("pooled-plain", |c| c.pre_initialise = false),
    ("pooled-no-keep-resident", |c| c.memory_keep_resident = 0),
    ("pooled-decommit-batch-64", |c| c.decommit_batch = 64),
    ("pooled-no-cow", |c| c.memory_init_cow = false),
    ("on-demand", |c| c.pooling = false),
];

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("instantiate");
    group.measurement_time(Duration::from_secs(5));

    for (label, configure) in CONFIGS {
        let mut config = EngineConfig::new(dir.path().join(label));
        configure(&mut config);
        let pre_initialise = config.pre_initialise;
        let engine = Engine::new(config).expect("engine");

        // The floor: wasmtime alone, same engine configuration.
        let wasm = engine.wasmtime();
        let component = wasmtime::component::Component::new(wasm, MINIMAL).expect("minimal");
        let linker = wasmtime::component::Linker::<()>::new(wasm);
        let pre = linker.instantiate_pre(&component).expect("pre");
        group.bench_function(BenchmarkId::new("minimal", label), |b| {
            b.to_async(&runtime).iter(|| async {
                let mut store = wasmtime::Store::new(wasm, ());
                store.set_epoch_deadline(u64::MAX / 2);
                let instance = pre.instantiate_async(&mut store).await.expect("instantiate");
                let run = instance.get_typed_func::<(), (u32,)>(&mut store, "run").expect("run");
                let (answer,) = run.call_async(&mut store, ()).await.expect("call");
                assert_eq!(answer, 42);
            });
        });

        for (name, path) in [("hello", hearth_fixtures::HELLO), ("echo", hearth_fixtures::ECHO)] {
            let key = format!("{name}-{label}");
            let prepared = engine.precompile(&key, path.as_ref()).expect("precompile");
            let snapshot = prepared.start_up() == Some(&hearth_engine::StartUp::Snapshot);
            assert_eq!(snapshot, pre_initialise, "{name}: {:?}", prepared.start_up());
            let limits = Limits {
                memory_bytes: 128 << 20,
                timeout: Duration::from_secs(10),
                urgency: 1,
            };
            let request = || {
                hyper::Request::get("http://localhost/bench?x=1")
                    .header("x-bench", "1")
                    .body(Empty::<bytes::Bytes>::new().map_err(|never| -> hearth_engine::BodyError { match never {} }))
                    .expect("request")
            };
            group.bench_function(BenchmarkId::new(name, label), |b| {
                b.to_async(&runtime).iter(|| async {
                    let response = engine
                        .invoke(
                            Start::Cold(&prepared),
                            limits,
                            &Default::default(),
                            std::sync::Arc::from(name),
                            request(),
                            drop,
                        )
                        .await
                        .expect("invoke");
                    let body = response.into_body().collect().await.expect("body");
                    assert!(!body.to_bytes().is_empty());
                });
            });
            if label != "pooled" {
                continue;
            }
            let (back_tx, back_rx) = std::sync::mpsc::channel::<Option<Instance>>();
            back_tx.send(None).expect("channel");
            group.bench_function(BenchmarkId::new(name, "reused"), |b| {
                b.to_async(&runtime).iter(|| async {
                    // The previous call's task hands its instance back once
                    // the guest returns; wait for it (the body is complete
                    // before that, so this is at most a task switch).
                    let start = match back_rx.recv().expect("instance back") {
                        Some(instance) => Start::Warm(instance),
                        None => Start::Cold(&prepared),
                    };
                    let back = back_tx.clone();
                    let response = engine
                        .invoke(
                            start,
                            limits,
                            &Default::default(),
                            std::sync::Arc::from(name),
                            request(),
                            move |done| {
                                let _ = back.send(done.instance);
                            },
                        )
                        .await
                        .expect("invoke");
                    let body = response.into_body().collect().await.expect("body");
                    assert!(!body.to_bytes().is_empty());
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
