//! Overload: an open-loop load of ten times a function's capacity for a
//! minute, against a release `hearth serve`. Every answer must be 2xx, 429
//! or 503 (never a 500 or a dropped connection), and the server's resident
//! memory must stay under a bound. Prints the counts, the answer latencies
//! and the peak RSS.
//!
//!     cargo bench -p hearth-server --bench overload
//!
//! The function sleeps 50 ms per call with at most 4 instances, so it serves
//! 80 requests per second; requests are sent at 800 per second whatever the
//! server answers (open loop: a slow answer does not slow the sender).
//! `HEARTH_OVERLOAD_SECONDS` and `HEARTH_OVERLOAD_RSS_MIB` change the length
//! and the bound.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
const CAPACITY_PER_SECOND: u64 = 80;
const SLEEP_MS: u64 = 50;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn main() {
    let seconds = env_or("HEARTH_OVERLOAD_SECONDS", 60);
    let bound_mib = env_or("HEARTH_OVERLOAD_RSS_MIB", 256);
    let rate = CAPACITY_PER_SECOND * 10;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server, url) = common::start_server(
        &tmp.path().join("data"),
        &["--max-queued-per-function", "16", "--queue-timeout-ms", "250"],
    );
    let pid = server.0.id();

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (counts, latencies, peak) = runtime.block_on(async {
        let client = hearth_client::Client::new(&url, Some(common::TOKEN.into()), "default").expect("client");
        let scaling = "[scaling]\nmax_instances = 4\n";
        common::deploy(&client, tmp.path(), "sleepy", hearth_fixtures::FAULTS, scaling).await;

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build()
            .expect("client");
        let target = format!("{url}/fn/default/sleepy/sleep?ms={SLEEP_MS}");
        let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(250));
                loop {
                    every.tick().await;
                    peak.fetch_max(rss_mib(pid), std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        let started = Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut calls = Vec::new();
        while started.elapsed() < Duration::from_secs(seconds) {
            ticks.tick().await;
            let (http, target, counts, latencies) = (http.clone(), target.clone(), counts.clone(), latencies.clone());
            calls.push(tokio::spawn(async move {
                let sent = Instant::now();
                let outcome = match http.get(&target).send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let retry_after = response.headers().contains_key("retry-after");
                        let ok = response.bytes().await.is_ok();
                        match (status, retry_after, ok) {
                            (_, _, false) => "body cut off".to_owned(),
                            (429 | 503, false, _) => format!("{status} without Retry-After"),
                            _ => status.to_string(),
                        }
                    }
                    Err(err) => format!("transport error: {err}"),
                };
                latencies.lock().expect("lock").push(sent.elapsed());
                *counts.lock().expect("lock").entry(outcome).or_default() += 1;
            }));
        }
        for call in calls {
            call.await.expect("call");
        }
        sampler.abort();
        let counts = counts.lock().expect("lock").clone();
        let latencies = std::mem::take(&mut *latencies.lock().expect("lock"));
        (counts, latencies, peak.load(std::sync::atomic::Ordering::Relaxed))
    });
    drop(server);

    let total: u64 = counts.values().sum();
    println!(
        "offered {rate} req/s for {seconds} s against a capacity of {CAPACITY_PER_SECOND} req/s: {total} requests"
    );
    for (outcome, n) in &counts {
        println!("  {outcome}: {n} ({:.1} %)", *n as f64 * 100.0 / total as f64);
    }
    let mut latencies = latencies;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "  answer latency p50={:.1} ms p99={:.1} ms max={:.1} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    println!("  peak RSS {peak} MiB (bound {bound_mib} MiB)");
    let bad: Vec<_> = counts
        .keys()
        .filter(|k| !matches!(k.as_str(), "200" | "429" | "503"))
        .collect();
    assert!(bad.is_empty(), "answers other than 200, 429 or 503: {bad:?}");
    assert!(peak < bound_mib, "RSS {peak} MiB over the bound of {bound_mib} MiB");
}
