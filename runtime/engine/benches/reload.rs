//! The second tier of scale to zero, alone: what the first request after a
//! full scale-down pays on top of a fresh instance. Side by side in one run:
//! pre-linking a parked component again (what [`Engine::unload`] leaves)
//! against mapping and deserializing its `.cwasm` (what it left before
//! components were parked), then the resident cost of a parked component.
//!
//! Run: `cargo bench -p hearth-engine --bench reload`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hearth_engine::{Engine, EngineConfig};

const SAMPLES: usize = 200;
/// Components parked at once for the resident-cost figure.
const PARKED: usize = 500;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::new(EngineConfig::new(dir.path())).expect("engine");
    let path = std::path::Path::new(hearth_fixtures::ECHO);
    engine.precompile("echo", path).expect("precompile");

    let (mut parked, mut mapped) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        engine.unload("echo");
        parked.push(timed(|| engine.load_precompiled("echo")));
        engine.unload("echo");
        engine.retain_parked(&HashSet::new());
        mapped.push(timed(|| engine.load_precompiled("echo")));
    }
    report("echo: reload of a parked component (pre-link)", &mut parked);
    report(
        "echo: reload from its .cwasm (map + deserialize + pre-link)",
        &mut mapped,
    );

    // Distinct keys, each its own copy of the artifact: each deserializes
    // its own metadata, as distinct functions' components do.
    let before = rss();
    for i in 0..PARKED {
        let key = format!("echo-{i}");
        std::fs::copy(engine.compiled_path("echo"), engine.compiled_path(&key)).expect("copy");
        engine.load_precompiled(&key).expect("load");
        engine.unload(&key);
    }
    let after = rss();
    let per = |field: fn(&Rss) -> u64| (field(&after).saturating_sub(field(&before))) as f64 / PARKED as f64;
    println!(
        "echo: {PARKED} parked components: {:.0} KiB resident each ({:.0} KiB anonymous, {:.0} KiB file-backed) \
         = {:.0} parked functions per GiB",
        per(|r| r.total),
        per(|r| r.anon),
        per(|r| r.file),
        1024.0 * 1024.0 / per(|r| r.total).max(1.0)
    );
}

fn timed(f: impl FnOnce() -> hearth_engine::Result<hearth_engine::Prepared>) -> Duration {
    let start = Instant::now();
    f().expect("load");
    start.elapsed()
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    println!(
        "{what}, {} samples: p50 {:?} p99 {:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() * 99 / 100]
    );
}

/// Resident set of this process, KiB.
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

fn rss() -> Rss {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Rss {
        total: field("VmRSS:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    }
}
