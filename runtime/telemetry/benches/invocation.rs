//! What the metrics of one invocation cost: `Telemetry::invocation` for a
//! warm call of a function already seen (its series looked up once), as
//! the invoker records every answer. Run: `cargo bench -p hearth-telemetry --bench invocation`.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use hearth_telemetry::{InvocationMetrics, Telemetry};

fn invocation(c: &mut Criterion) {
    let telemetry = Telemetry::new().expect("telemetry");
    let m = InvocationMetrics {
        tenant: "default",
        function: "hello",
        outcome: "ok",
        status: 200,
        wall: Duration::from_micros(35),
        queue: Duration::ZERO,
        cold_start: false,
        batch_size: 0.0,
        compute: Duration::ZERO,
        gpu: Duration::ZERO,
        version: 1,
        alias: "latest",
        shadow: false,
    };
    // Kept with the function, as the invoker keeps it on the deployed version.
    let series = telemetry.series("default", "hello");
    telemetry.invocation(&series, &m);
    c.bench_function("telemetry/invocation", |b| b.iter(|| telemetry.invocation(&series, &m)));
}

criterion_group!(benches, invocation);
criterion_main!(benches);
