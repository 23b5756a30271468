//! How a change fans out to the nodes of a cluster: the time from a deploy
//! committed on one node until every other node's change feed (one
//! `LISTEN` connection per node) has reported it.
//!
//! `fan_out/N` for N listening nodes, all in this process against one
//! throwaway PostgreSQL started here.
//!
//! Run: `cargo bench -p hearth-store --bench notify`.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hearth_store::{Change, Digest, NewVersion, PostgresStore, Store as _};
use tokio::sync::mpsc::Receiver;

fn version(n: u64) -> NewVersion {
    let content = n.to_le_bytes();
    NewVersion {
        tenant: "default".into(),
        name: "echo".into(),
        manifest: "name = \"echo\"".into(),
        component: Digest::of(&content),
        component_size: content.len() as u64,
        artifacts: Vec::new(),
    }
}

/// Waits until every feed has reported a change to `echo`.
async fn everyone_heard(feeds: &mut [Receiver<Change>]) {
    for feed in feeds {
        loop {
            match feed.recv().await.expect("the feed is open") {
                Change::Function { name, .. } if name == "echo" => break,
                _ => {}
            }
        }
    }
}

fn fan_out(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let server = hearth_services::Postgres::start();
    let mut group = c.benchmark_group("fan_out");
    group.sample_size(20);
    for nodes in [10usize, 50, 100] {
        let url = server.create_database(&format!("fanout{nodes}"));
        let (writer, mut feeds) = rt.block_on(async {
            let writer = PostgresStore::connect(&url).await.expect("connect");
            writer.ensure_tenant("default").await.expect("tenant");
            let mut feeds = Vec::new();
            for _ in 0..nodes {
                let node = PostgresStore::connect(&url).await.expect("connect");
                feeds.push(node.changes().expect("a change feed"));
            }
            // Every feed connects in the background: announce until all
            // have heard one, then drain what is left.
            let mut n = 0;
            loop {
                n += 1;
                writer.create_version(version(n)).await.expect("deploy");
                let heard = tokio::time::timeout(Duration::from_millis(500), everyone_heard(&mut feeds)).await;
                if heard.is_ok() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            for feed in &mut feeds {
                while feed.try_recv().is_ok() {}
            }
            (writer, feeds)
        });
        let mut n = 1_000_000 * nodes as u64;
        group.bench_function(BenchmarkId::from_parameter(nodes), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        n += 1;
                        let start = Instant::now();
                        writer.create_version(version(n)).await.expect("deploy");
                        everyone_heard(&mut feeds).await;
                        total += start.elapsed();
                    }
                    total
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
