//! What a usage record costs the node that keeps it.
//!
//! - `log/append`: the invocation's side: encoding a record and copying it
//!   into the mapped journal (the log's threads sync and ingest meanwhile).
//! - `log/ingest`: everything a record costs the process, on every thread:
//!   4,096 records appended, synced and ingested into `usage.db` until
//!   they are queryable. Timed in CPU time of the whole process, not wall
//!   time (which would be mostly the fsync's wait): what a busy node pays.
//!
//! Throughput is records per second (of CPU, for `log/ingest`). Run:
//! `cargo bench -p hearth-metering --bench log`.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hearth_metering::{LogConfig, Outcome, PriceTable, Usage, UsageLog, UsageRecord};

/// A warm `hello`'s record, as the invoker makes it.
fn record(n: u64) -> UsageRecord {
    PriceTable::default().price(Usage {
        id: uuid::Uuid::now_v7().to_string(),
        attempt: 1,
        tenant: "default".into(),
        function: "hello".into(),
        version: 1,
        alias: "latest".into(),
        started_at_us: 1_764_000_000_000_000 + i64::try_from(n).unwrap_or(0) * 40,
        ended_at_us: 1_764_000_000_000_035 + i64::try_from(n).unwrap_or(0) * 40,
        status: 200,
        outcome: Outcome::Ok,
        device: "cpu".into(),
        guest_cpu_us: 12,
        memory_peak_bytes: 1 << 20,
        bytes_out: 13,
        ..Usage::default()
    })
}

fn log(c: &mut Criterion) {
    const RECORDS: u64 = 4096;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("open");
    let mut group = c.benchmark_group("log");
    group.measurement_time(Duration::from_secs(8));
    let mut n = 0;
    group.throughput(Throughput::Elements(1));
    group.bench_function("append", |b| {
        b.iter_batched(
            || {
                n += 1;
                record(n)
            },
            |record| log.append(record.as_priced()).expect("append"),
            criterion::BatchSize::SmallInput,
        );
    });
    rt.block_on(log.catch_up()).expect("caught up");
    group.throughput(Throughput::Elements(RECORDS));
    group.bench_function("ingest", |b| {
        b.iter_custom(|iters| {
            let mut cpu = Duration::ZERO;
            for _ in 0..iters {
                let records: Vec<UsageRecord> = (0..RECORDS)
                    .map(|_| {
                        n += 1;
                        record(n)
                    })
                    .collect();
                let start = process_cpu();
                for record in records {
                    log.append(record.as_priced()).expect("append");
                }
                rt.block_on(log.catch_up()).expect("caught up");
                cpu += process_cpu().saturating_sub(start);
            }
            cpu
        });
    });
    group.finish();
}

/// CPU time of the whole process so far (every thread).
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec.unsigned_abs(), u32::try_from(t.tv_nsec).unwrap_or(0))
}

criterion_group!(benches, log);
criterion_main!(benches);
