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
    let (mut server, url) = common::start_server(
        &tmp.path().join("data"),
        &["--reap-interval-ms", "5", "--function-idle-timeout-s", "0"],
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
        let http = reqwest::Client::new();
        let call = |name: &str| {
            let request = http.post(format!("{url}/fn/default/{name}/x")).body("cold?");
            async move {
                let started = Instant::now();
                let response = request.send().await.expect("invoke");
                let first_byte = started.elapsed();
                assert_eq!(response.status(), 200);
                response.bytes().await.expect("body");
                first_byte
            }
        };
        let scaled_to_zero = || async {
            let status = client.status().await.expect("status");
            status
                .functions
                .iter()
                .find(|f| f.name == "cold")
                .is_some_and(|f| f.instances.idle == 0 && f.instances.busy == 0 && !f.instances.loaded)
        };

        call("warm").await;
        call("cold").await;
        let mut cold = Vec::with_capacity(samples);
        let mut warm = Vec::with_capacity(samples);
        for _ in 0..samples {
            let guard = Instant::now() + Duration::from_secs(10);
            while !scaled_to_zero().await {
                assert!(Instant::now() < guard, "`cold` never scaled to zero");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Interleaved, so both see the same machine.
            cold.push(call("cold").await);
            warm.push(call("warm").await);
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
        report("scaled to zero -> first byte", &mut cold);
        report("warm instance  -> first byte", &mut warm);
    });
    let _ = server.kill();
    let _ = server.wait();
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
