//! How many usage records one PostgreSQL ledger takes, on this machine.
//!
//! - `append/one_node`: one shipper appending batches of 1024 records.
//! - `append/three_nodes`: three shippers appending at once (the head's row
//!   lock serializes their batches: this is the fleet's ceiling).
//!
//! Throughput is records per second. PostgreSQL is a throwaway cluster
//! started here (`fsync=off`, as in the tests: a production server's
//! commit latency adds to each batch, not to each record).
//!
//! Run: `cargo bench -p hearth-ledger --bench ingest`.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hearth_ledger::Ledger;
use hearth_metering::{Outcome, PriceTable, Usage, UsageRecord};

const BATCH: usize = 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio")
}

fn batch() -> Vec<UsageRecord> {
    (0..BATCH)
        .map(|n| {
            PriceTable::default().price(Usage {
                id: uuid::Uuid::now_v7().to_string(),
                attempt: 1,
                tenant: format!("tenant-{}", n % 8),
                function: "echo".into(),
                version: 1,
                started_at_us: 1_764_000_000_000_000,
                ended_at_us: 1_764_000_000_002_500,
                status: 200,
                outcome: Outcome::Ok,
                device: "cpu".into(),
                guest_cpu_us: 300,
                bytes_in: 7,
                bytes_out: 120,
                ..Usage::default()
            })
        })
        .collect()
}

fn ingest(c: &mut Criterion) {
    let rt = runtime();
    let server = hearth_services::Postgres::start();
    let url = server.create_database("bench");
    let ledger = rt.block_on(async {
        let store = hearth_store::PostgresStore::connect(&url).await.expect("connect");
        Ledger::new(store.pool())
    });
    let mut group = c.benchmark_group("append");
    group.measurement_time(Duration::from_secs(10));
    group.sample_size(20);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("one_node", |b| {
        b.to_async(&rt).iter_batched(
            batch,
            |records| {
                let ledger = ledger.clone();
                async move { ledger.append("a", &records).await.expect("append") }
            },
            criterion::BatchSize::PerIteration,
        );
    });
    group.throughput(Throughput::Elements(3 * BATCH as u64));
    group.bench_function("three_nodes", |b| {
        b.to_async(&rt).iter_batched(
            || [batch(), batch(), batch()],
            |batches| {
                let ledger = ledger.clone();
                async move {
                    let appends = batches.iter().enumerate().map(|(node, records)| {
                        let ledger = ledger.clone();
                        async move { ledger.append(&format!("node-{node}"), records).await.expect("append") }
                    });
                    futures::future::join_all(appends).await
                }
            },
            criterion::BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
