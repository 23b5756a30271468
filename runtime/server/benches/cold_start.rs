//! Cold start, end to end through the real binary: `echo` scaled fully to
//! zero (no instance left, compiled code unloaded) → first response byte,
//! next to a warm request to `hello` (as small; another component, so its
//! warm code never keeps `echo`'s loaded) on the same server.
//!
//! The server reaps every 5 ms with `idle_timeout_s = 0` and
//! `--function-idle-timeout-s 0`, so after each request the function drops
//! back to zero; the bench waits (polling `/v1/status`) until it has, then
//! times one request on a kept-alive connection until its response head.
//!
//! The model tier: `classify` scaled to zero *and* its model unloaded from
//! the warm cache (`--model-idle-timeout-s 0`: idle models go within
//! 100 ms) → first byte, the model read, parsed, optimised and run again on
//! the way; every third sample. The batch window is 0 (`--batch-window-ms`):
//! by default a lone model call waits up to 2 ms for others to batch with,
//! a cost of every call, not of the cold start.
//!
//! Run: `cargo bench -p hearth-server --bench cold_start` (samples:
//! `HEARTH_BENCH_SAMPLES`, default 300).

mod common;

use std::time::{Duration, Instant};

fn main() {
    let samples: usize = std::env::var("HEARTH_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server, url) = common::start_server(
        &tmp.path().join("data"),
        &[
            "--reap-interval-ms",
            "5",
            "--function-idle-timeout-s",
            "0",
            "--model-idle-timeout-s",
            "0",
            "--batch-window-ms",
            "0",
        ],
    );

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = hearth_client::Client::new(&url, Some(common::TOKEN.into()), "default").expect("client");
        // The warm baseline is `hello`: compiled code is shared by
        // component, so a warm `echo` would keep `cold`'s code loaded.
        for (name, idle, component) in [
            ("cold", 0, hearth_fixtures::ECHO),
            ("warm", 3600, hearth_fixtures::HELLO),
        ] {
            let scaling = format!("[scaling]\nidle_timeout_s = {idle}\n");
            common::deploy(&client, tmp.path(), name, component, &scaling).await;
        }
        // The model tier: `classify` with its MLP, unloaded when idle.
        let mlp = tmp.path().join("mnist-mlp.onnx");
        std::fs::write(&mlp, hearth_fixtures::models::mlp(hearth_fixtures::models::MLP_SEED)).expect("model");
        let with_model = format!(
            "[scaling]\nidle_timeout_s = 0\n[[models]]\nname = \"mnist-mlp\"\npath = {:?}\n",
            mlp.display().to_string()
        );
        common::deploy(&client, tmp.path(), "model", hearth_fixtures::CLASSIFY, &with_model).await;
        let http = reqwest::Client::new();
        let image = format!("{{\"input\": {:?}}}", hearth_fixtures::models::mlp_input(1));
        let call = |name: &str| {
            let body = if name == "model" {
                image.clone()
            } else {
                "cold?".to_owned()
            };
            let request = http.post(format!("{url}/fn/default/{name}/x")).body(body);
            async move {
                let started = Instant::now();
                let response = request.send().await.expect("invoke");
                let first_byte = started.elapsed();
                assert_eq!(response.status(), 200);
                response.bytes().await.expect("body");
                first_byte
            }
        };
        let scaled_to_zero = |name: &'static str| {
            let client = &client;
            async move {
                let status = client.status().await.expect("status");
                let function = status
                    .functions
                    .iter()
                    .find(|f| f.name == name)
                    .is_some_and(|f| f.instances.idle == 0 && f.instances.busy == 0 && !f.instances.loaded);
                // The only model on the server is `model`'s.
                function && (name != "model" || status.models.is_empty())
            }
        };
        let wait_for_zero = |name: &'static str| async move {
            let guard = Instant::now() + Duration::from_secs(10);
            while !scaled_to_zero(name).await {
                assert!(Instant::now() < guard, "`{name}` never scaled to zero");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };

        call("warm").await;
        call("cold").await;
        let mut cold = Vec::with_capacity(samples);
        let mut warm = Vec::with_capacity(samples);
        let mut model = Vec::with_capacity(samples / 3 + 1);
        for sample in 0..samples {
            wait_for_zero("cold").await;
            // Interleaved, so every tier sees the same machine.
            cold.push(call("cold").await);
            warm.push(call("warm").await);
            if sample % 3 == 0 {
                wait_for_zero("model").await;
                model.push(call("model").await);
            }
        }
        let stats = client.status().await.expect("status");
        let pool = &stats
            .functions
            .iter()
            .find(|f| f.name == "cold")
            .expect("cold")
            .instances;
        assert!(
            pool.cold_starts as usize > samples,
            "every sample was a cold start: {pool:?}"
        );
        assert!(
            pool.unloads as usize >= samples,
            "and the compiled code was unloaded each time: {pool:?}"
        );
        let loads = client.status().await.expect("status").model_loads;
        assert!(
            loads as usize > model.len(),
            "the model was loaded again for every model-tier sample: {loads}"
        );
        report("instance tier: warm instance             -> first byte", &mut warm);
        report("function tier: scaled to zero            -> first byte", &mut cold);
        report("model tier:    classify, model unloaded  -> first byte", &mut model);
    });
    drop(server);
}

fn report(label: &str, times: &mut [Duration]) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "{label}: n={} p50={:.3} ms p99={:.3} ms mean={:.3} ms max={:.3} ms",
        times.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    );
}
