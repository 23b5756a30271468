//! The second tier of scale to zero, alone: mapping a component's
//! precompiled `.cwasm` again and pre-linking it after [`Engine::unload`]
//! (what the first request after a full scale-down pays on top of a fresh
//! instance). No recompilation: the artifact is only mapped.
//!
//! Run: `cargo bench -p hearth-engine --bench reload`.

use hearth_engine::{Engine, EngineConfig};

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::new(EngineConfig::new(dir.path())).expect("engine");
    let path = std::path::Path::new(hearth_fixtures::ECHO);
    engine.precompile("echo", path).expect("precompile");
    let mut times = Vec::new();
    for _ in 0..200 {
        engine.unload("echo");
        let t = std::time::Instant::now();
        engine.load("echo", path).expect("load");
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "echo: load after unload (map .cwasm + pre-link), {} samples: p50 {:?} p99 {:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() * 99 / 100]
    );
}
