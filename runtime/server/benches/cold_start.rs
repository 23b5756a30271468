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
//! `classify` at each tier beside them, every third sample: a warm instance
//! and model; scaled to zero with its model kept warm (another function's
//! instance holds the same MLP); and the model tier, scaled to zero *and*
//! its model unloaded from the warm cache (`--model-idle-timeout-s 0`: idle
//! models go within 100 ms) → first byte, the model read, parsed,
//! optimised and run again on the way (this server runs with
//! `--model-cold-memory-mb 0`). The model tier's own cost is the difference
//! between the last two. Beside them, on a second server with the default
//! cold tier, the same `model` whose MLP was evicted to the cold tier
//! (kept prepared: nothing read, parsed or optimised to bring it back).
//!
//! Run: `cargo bench -p hearth-server --bench cold_start` (samples:
//! `HEARTH_BENCH_SAMPLES`, default 300).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use hearth_fixtures::models::MLP_SEED;

fn main() {
    let samples: usize = std::env::var("HEARTH_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let tmp = tempfile::tempdir().expect("tempdir");
    let flags = [
        "--reap-interval-ms",
        "5",
        "--function-idle-timeout-s",
        "0",
        "--model-idle-timeout-s",
        "0",
    ];
    // Models evicted are unloaded on this one, kept prepared in the cold
    // tier on the second (the default), which runs the `classify` functions
    // again, after the first is gone.
    let (server, url) = common::start_server(
        &tmp.path().join("data"),
        &[&flags[..], &["--model-cold-memory-mb", "0"]].concat(),
    );
    let (cold_tier_server, cold_tier_url) = common::start_server(&tmp.path().join("data-cold-tier"), &flags);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let client = hearth_client::Client::new(&url, Some(common::TOKEN.into()), "default").expect("client");
        let cold_tier =
            hearth_client::Client::new(&cold_tier_url, Some(common::TOKEN.into()), "default").expect("client");
        // The warm baseline is `hello`: compiled code is shared by
        // component, so a warm `echo` would keep `cold`'s code loaded.
        for (name, idle, component) in [
            ("cold", 0, hearth_fixtures::ECHO),
            ("warm", 3600, hearth_fixtures::HELLO),
        ] {
            let scaling = format!("[scaling]\nidle_timeout_s = {idle}\n");
            common::deploy(&client, tmp.path(), name, component, &scaling).await;
        }
        // `classify` at every tier, each function its own component (a
        // custom section appended: same code, another digest), so one
        // function's warm code never keeps another's loaded:
        // - `classify-warm`: instance and model warm (its MLP, seed A);
        // - `classify-cold`: scaled to zero, model warm (the same MLP, held
        //   by `classify-warm`'s instance);
        // - `model`: scaled to zero, its own MLP (seed B) unloaded too.
        let model_dir = tmp.path().join("models");
        std::fs::create_dir_all(&model_dir).expect("models dir");
        for (name, idle, seed) in [
            ("classify-warm", 3600, MLP_SEED),
            ("classify-cold", 0, MLP_SEED),
            ("model", 0, MLP_SEED + 1),
        ] {
            let mlp = model_dir.join(format!("mlp-{seed}.onnx"));
            std::fs::write(&mlp, hearth_fixtures::models::mlp(seed)).expect("model");
            let component = distinct_component(hearth_fixtures::CLASSIFY, name, tmp.path());
            let manifest = format!(
                "[scaling]\nidle_timeout_s = {idle}\n[[models]]\nname = \"mnist-mlp\"\npath = {:?}\n",
                mlp.display().to_string()
            );
            common::deploy(&client, tmp.path(), name, &component, &manifest).await;
            common::deploy(&cold_tier, &tmp.path().join("cold-tier"), name, &component, &manifest).await;
        }
        let model_b = client.show("model").await.expect("show").function.models[0]
            .digest
            .clone();
        let http = reqwest::Client::new();
        let image = format!("{{\"input\": {:?}}}", hearth_fixtures::models::mlp_input(1));
        let call_on = |url: &str, name: &str| {
            let body = if name.starts_with("classify") || name == "model" {
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
        let call = |name: &str| call_on(&url, name);
        // Servers by index: 0 unloads evicted models, 1 keeps them cold.
        let servers = [&client, &cold_tier];
        let scaled_to_zero_on = |on: usize, name: &'static str| {
            let (client, model_b) = (servers[on], &model_b);
            async move {
                let status = client.status().await.expect("status");
                let function = status
                    .functions
                    .iter()
                    .find(|f| f.name == name)
                    .is_some_and(|f| f.instances.idle == 0 && f.instances.busy == 0 && !f.instances.loaded);
                let model_b_loaded = status.models.iter().any(|m| &m.digest == model_b);
                function && (name != "model" || !model_b_loaded)
            }
        };
        let wait_for_zero_on = |on: usize, name: &'static str| async move {
            let guard = Instant::now() + Duration::from_secs(10);
            while !scaled_to_zero_on(on, name).await {
                assert!(Instant::now() < guard, "`{name}` never scaled to zero");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };

        let wait_for_zero = |name: &'static str| wait_for_zero_on(0, name);
        for name in ["warm", "cold", "classify-warm", "classify-cold", "model"] {
            call(name).await;
        }
        let mut tiers: [Vec<Duration>; 5] = Default::default();
        for sample in 0..samples {
            // Interleaved, so every tier sees the same machine.
            wait_for_zero("cold").await;
            tiers[1].push(call("cold").await);
            tiers[0].push(call("warm").await);
            if sample % 3 == 0 {
                tiers[2].push(call("classify-warm").await);
                wait_for_zero("classify-cold").await;
                tiers[3].push(call("classify-cold").await);
                wait_for_zero("model").await;
                tiers[4].push(call("model").await);
            }
        }
        let stats = client.status().await.expect("status");
        let pool = |name: &str| {
            stats
                .functions
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("{name}"))
                .instances
                .clone()
        };
        for (name, n) in [
            ("cold", samples),
            ("classify-cold", tiers[3].len()),
            ("model", tiers[4].len()),
        ] {
            let pool = pool(name);
            assert!(
                pool.cold_starts as usize > n,
                "`{name}`: every sample was a cold start: {pool:?}"
            );
            assert!(
                pool.unloads as usize >= n,
                "`{name}`: and its code was unloaded each time: {pool:?}"
            );
        }
        assert!(
            stats.model_loads as usize > tiers[4].len(),
            "the model was loaded again for every model-tier sample: {}",
            stats.model_loads
        );
        let [warm, cold, classify_warm, classify_cold, model] = &mut tiers;
        report("instance tier: hello, warm instance                -> first byte", warm);
        report("function tier: echo, scaled to zero                -> first byte", cold);
        report(
            "instance tier: classify, warm instance and model   -> first byte",
            classify_warm,
        );
        report(
            "function tier: classify, scaled to zero, model warm -> first byte",
            classify_cold,
        );
        report(
            "model tier:    classify, scaled to zero, model unloaded -> first byte",
            model,
        );
        drop(server);

        // The cold tier, on the second server alone: `classify` scaled to
        // zero with its model warm, against `model` whose MLP went to the
        // cold tier, interleaved.
        for name in ["classify-warm", "classify-cold", "model"] {
            call_on(&cold_tier_url, name).await;
        }
        let (mut function_tier, mut revived) = (Vec::new(), Vec::new());
        for _ in 0..samples.div_ceil(3) {
            wait_for_zero_on(1, "classify-cold").await;
            function_tier.push(call_on(&cold_tier_url, "classify-cold").await);
            wait_for_zero_on(1, "model").await;
            revived.push(call_on(&cold_tier_url, "model").await);
        }
        let loads = cold_tier.status().await.expect("status").model_loads;
        assert_eq!(loads, 2, "with the cold tier only the deploys read the two MLPs");
        report(
            "function tier: classify, scaled to zero, model warm (second server) -> first byte",
            &mut function_tier,
        );
        report(
            "model tier:    classify, scaled to zero, model in the cold tier -> first byte",
            &mut revived,
        );
    });
    drop(cold_tier_server);
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

/// A copy of `component` under `dir` with a custom section naming `tag`
/// appended: the same code under another digest.
fn distinct_component(component: &str, tag: &str, dir: &Path) -> String {
    let mut bytes = std::fs::read(component).expect("component");
    let name = b"hearth-bench-tag";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(tag.as_bytes());
    assert!(body.len() < 128, "one-byte LEB128 size");
    bytes.push(0);
    bytes.push(body.len() as u8);
    bytes.extend_from_slice(&body);
    let path = dir.join(format!("{tag}.wasm"));
    std::fs::write(&path, bytes).expect("write component");
    path.display().to_string()
}
