//! Any tensor a guest can hand to `wasi:nn` `compute` (type, dimensions,
//! bytes, input name), checked by the real bridge against a real model: the
//! answer is outputs or a `wasi:nn` error, never a host error (which would
//! trap the guest), a panic, or an allocation the dimensions ask for but the
//! bytes do not back.
#![no_main]

use std::sync::OnceLock;

use hearth_bridge::wasi::nn::graph::Host as _;
use hearth_bridge::wasi::nn::graph::HostGraph as _;
use hearth_bridge::wasi::nn::inference::HostGraphExecutionContext as _;
use hearth_bridge::wasi::nn::tensor::{HostTensor as _, TensorType};
use hearth_bridge::{InstanceMemory, ModelRef, NnHost};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    input_name: bool,
    ty: u8,
    dims: Vec<u32>,
    data: Vec<u8>,
}

struct Model {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    host: NnHost,
    grant: hearth_bridge::NnGrant,
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mlp.onnx");
        std::fs::write(&path, hearth_fixtures::models::mlp(1)).expect("model file");
        let model = ModelRef {
            key: "mlp-1".into(),
            path,
            placement: hearth_devices::Placement::Auto,
            // Repeated inputs go through the inference cache too.
            cache_entries: 4,
            batch: hearth_devices::CallTerms::default(),
        };
        let host = NnHost::new(hearth_devices::ModelCache::new(
            hearth_devices::DevicePool::cpu_only(),
            Default::default(),
        ));
        let grant = host.grant("fuzz", [("mnist-mlp".to_owned(), model)]);
        Model {
            _dir: dir,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            host,
            grant,
        }
    })
}

fuzz_target!(|input: Input| {
    let model = model();
    let ty = match input.ty % 7 {
        0 => TensorType::Fp16,
        1 => TensorType::Fp32,
        2 => TensorType::Fp64,
        3 => TensorType::Bf16,
        4 => TensorType::U8,
        5 => TensorType::I32,
        _ => TensorType::I64,
    };
    let name = if input.input_name { "input" } else { "other" };
    model.runtime.block_on(async {
        let mut ctx = model.host.instance(&model.grant, InstanceMemory::new(usize::MAX));
        let mut host = &mut ctx;
        let graph = host
            .load_by_name("mnist-mlp".into())
            .await
            .expect("host")
            .expect("graph");
        let context = host
            .init_execution_context(graph)
            .await
            .expect("host")
            .expect("context");
        let tensor = host.new(input.dims, ty, input.data).await.expect("tensor");
        let _outputs_or_wasi_error = host
            .compute(context, vec![(name.into(), tensor)])
            .await
            .expect("bad tensors are wasi-nn errors, not host errors");
    });
});
