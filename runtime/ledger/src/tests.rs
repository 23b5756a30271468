//! The ledger against a real PostgreSQL, fed by real usage logs.

use std::collections::HashSet;
use std::time::Duration;

use hearth_metering::{Filter, LogConfig, Outcome, PriceTable, Usage, UsageLog, UsageQueries as _, UsageRecord};
use hearth_store::PostgresStore;

use crate::{Ledger, Shipper};

fn record(tenant: &str, n: u64) -> UsageRecord {
    PriceTable::default().price(Usage {
        id: uuid::Uuid::now_v7().to_string(),
        attempt: 1,
        tenant: tenant.into(),
        function: "echo".into(),
        version: 1,
        // Both kinds of record, so that both columns round-trip.
        alias: if n.is_multiple_of(2) {
            String::new()
        } else {
            "prod".into()
        },
        shadow: n % 5 == 1,
        inference_cache_hits: n % 3,
        started_at_us: 1_764_000_000_000_000,
        ended_at_us: 1_764_000_000_002_500,
        status: 200,
        outcome: if n.is_multiple_of(7) {
            Outcome::Rejected
        } else {
            Outcome::Ok
        },
        device: "cpu".into(),
        guest_cpu_us: 300 + n,
        bytes_in: n,
        ..Usage::default()
    })
}

async fn ledger(server: &hearth_services::Postgres, name: &str) -> Ledger {
    let url = server.create_database(name);
    let store = PostgresStore::connect(&url).await.expect("connect");
    Ledger::new(store.pool())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_shipped_twice_is_kept_once() {
    let server = hearth_services::Postgres::start();
    let ledger = ledger(&server, "twice").await;
    let mut batch: Vec<UsageRecord> = (1..=10).map(|n| record("acme", n)).collect();
    for (seq, r) in (1..).zip(&mut batch) {
        r.seq = seq;
    }
    assert_eq!(ledger.append("a", &batch).await.expect("append"), 10);
    // A node that crashed before saving its cursor ships the batch again.
    assert_eq!(ledger.append("a", &batch).await.expect("append again"), 0);
    let head = ledger.head().await.expect("head");
    let kept = ledger.page(&Filter::default(), 0, head, 100).await.expect("page");
    let ids: Vec<_> = kept.iter().map(|r| r.usage.id.clone()).collect();
    assert_eq!(ids, batch.iter().map(|r| r.usage.id.clone()).collect::<Vec<_>>());
    // Read back as written, but for the ledger's own sequence.
    let mut first = kept[0].clone();
    first.seq = batch[0].seq;
    assert_eq!(first, batch[0]);
}

/// Three nodes ship at once while a consumer follows the ledger's cursor:
/// it sees every record of the fleet, each once, in increasing sequence;
/// the fleet's summary is the sum of the nodes' own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_following_three_shipping_nodes_sees_each_record_once() {
    const PER_NODE: u64 = 400;
    let server = hearth_services::Postgres::start();
    let ledger = ledger(&server, "fleet").await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut logs = Vec::new();
    let mut shippers = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let log = UsageLog::open(dir.path(), LogConfig::default()).expect("open");
        let shipper = Shipper::start(log.clone(), ledger.clone(), format!("node-{i}"), dir.path()).expect("ship");
        logs.push(log);
        shippers.push(shipper);
    }
    let writers: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            let log = log.clone();
            tokio::spawn(async move {
                for n in 0..PER_NODE {
                    log.record(record(&format!("tenant-{}", n % 2), n + i as u64))
                        .await
                        .expect("recorded");
                    if n.is_multiple_of(50) {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    let follower = {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let (mut after, mut seen) = (0, Vec::new());
            while seen.len() < (3 * PER_NODE) as usize {
                let head = ledger.head().await.expect("head");
                let page = ledger.page(&Filter::default(), after, head, 97).await.expect("page");
                if page.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                for record in page {
                    assert!(record.seq > after, "sequences go up: {} after {after}", record.seq);
                    after = record.seq;
                    seen.push(record.usage.id);
                }
            }
            seen
        })
    };
    for writer in writers {
        writer.await.expect("writer");
    }
    for shipper in &shippers {
        assert!(shipper.flush(Duration::from_secs(30)).await, "shipped");
        assert_eq!(shipper.unshipped(), 0);
    }
    let seen = follower.await.expect("follower");
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no record seen twice");
    let mut written = HashSet::new();
    for log in &logs {
        for record in log.page(&Filter::default(), 0, None, 10_000).await.expect("page") {
            written.insert(record.usage.id);
        }
    }
    assert_eq!(unique, written.iter().collect(), "every record seen");

    // Any node answers for the fleet: the ledger's totals are the nodes'.
    let fleet = shippers[0].summary(&Filter::default()).await.expect("summary");
    let mut local = Vec::new();
    for log in &logs {
        local.extend(log.summary(&Filter::default()).await.expect("summary"));
    }
    for row in &fleet {
        let mine = local
            .iter()
            .filter(|r| (&r.tenant, &r.day, r.version, r.shadow) == (&row.tenant, &row.day, row.version, row.shadow));
        let (invocations, rejected, cpu) = mine.fold((0, 0, 0), |(i, r, c), row| {
            (i + row.invocations, r + row.rejected, c + row.guest_cpu_us)
        });
        assert_eq!(
            (row.invocations, row.rejected, row.guest_cpu_us),
            (invocations, rejected, cpu)
        );
    }
    assert_eq!(fleet.iter().map(|r| r.invocations).sum::<u64>(), 3 * PER_NODE);
}

/// With PostgreSQL away, records wait in the node's log (nothing is
/// refused); when it returns they reach the ledger, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_wait_in_the_spool_while_postgres_is_away() {
    let server = hearth_services::Postgres::start();
    let ledger = ledger(&server, "away").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("open");
    let shipper = Shipper::start(log.clone(), ledger.clone(), "a".into(), dir.path()).expect("ship");
    for n in 0..20 {
        log.record(record("acme", n)).await.expect("recorded");
    }
    assert!(shipper.flush(Duration::from_secs(30)).await);
    server.stop();
    for n in 20..120 {
        log.record(record("acme", n))
            .await
            .expect("recorded while PostgreSQL is away");
    }
    assert!(
        !shipper.flush(Duration::from_millis(300)).await,
        "nothing ships while away"
    );
    assert_eq!(shipper.unshipped(), 100);
    server.start_server();
    assert!(
        shipper.flush(Duration::from_secs(60)).await,
        "the backlog ships on return"
    );
    drop(shipper);

    // A restarted node resumes from its saved cursor; re-shipping from the
    // start (a lost cursor) adds nothing.
    let again = Shipper::start(log.clone(), ledger.clone(), "a".into(), dir.path()).expect("ship");
    assert_eq!(again.unshipped(), 0);
    std::fs::remove_file(dir.path().join("usage-shipped")).expect("cursor");
    let from_scratch = Shipper::start(log, ledger.clone(), "a".into(), dir.path()).expect("ship");
    assert!(from_scratch.flush(Duration::from_secs(30)).await);
    let head = ledger.head().await.expect("head");
    let all = ledger.page(&Filter::default(), 0, head, 1000).await.expect("page");
    assert_eq!(all.len(), 120);
}
