//! Shared test helpers and the usage log's tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::log::{BACKLOG, Pace};
use crate::*;

/// A plausible usage of an `echo` call.
pub(crate) fn usage(id: &str, outcome: Outcome) -> Usage {
    Usage {
        id: id.into(),
        invocation_id: None,
        attempt: 1,
        tenant: "acme".into(),
        function: "echo".into(),
        version: 3,
        alias: "prod".into(),
        shadow: false,
        started_at_us: 1_764_000_000_000_000,
        ended_at_us: 1_764_000_000_002_500,
        status: 200,
        outcome,
        cold_start: true,
        queue_us: 10,
        memory_peak_bytes: 1 << 20,
        guest_cpu_us: 300,
        device: "cpu".into(),
        compute_ns: 0,
        gpu_ns: 0,
        inference_calls: 2,
        batched_calls: 6,
        inference_cache_hits: 1,
        bytes_in: 5,
        bytes_out: 120,
    }
}

fn strict() -> LogConfig {
    LogConfig {
        durability: Durability::Strict,
        ..LogConfig::default()
    }
}

fn record(id: &str) -> UsageRecord {
    PriceTable::default().price(usage(id, Outcome::Ok))
}

#[tokio::test]
async fn records_commit_once_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("open");
    let ids: Vec<String> = (0..50).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let writes = ids.iter().map(|id| log.record(record(id)));
    for result in futures::future::join_all(writes).await {
        result.expect("committed");
    }
    let all = log.page(&Filter::default(), 0, None, 1000).await.expect("page");
    assert_eq!(all.len(), 50);
    assert_eq!(all.iter().map(|r| r.usage.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(
        all[0],
        UsageRecord {
            seq: 1,
            ..record(&ids[0])
        },
        "read back exactly as written, with its commit sequence"
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "in commit order");
    assert!(log.stats().commits.load(Ordering::Relaxed) < 51, "commits were grouped");

    // Paging by cursor covers everything once.
    let first = log.page(&Filter::default(), 0, None, 20).await.expect("page");
    let rest = log
        .page(&Filter::default(), first[19].seq, None, 1000)
        .await
        .expect("page");
    assert_eq!(first.len() + rest.len(), 50);

    let other = Filter {
        tenant: Some("other".into()),
        ..Filter::default()
    };
    assert!(log.page(&other, 0, None, 10).await.expect("page").is_empty());
    let summary = log.summary(&Filter::default()).await.expect("summary");
    assert_eq!(summary.len(), 1);
    assert_eq!(
        (summary[0].invocations, summary[0].ran, summary[0].day.as_str()),
        (50, 50, "2025-11-24")
    );
    assert_eq!(summary[0].billed_ms, 150);

    // Durable: a new log over the same file sees them.
    drop(log);
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("reopen");
    assert_eq!(
        log.page(&Filter::default(), 0, None, 1000).await.expect("page").len(),
        50
    );
}

/// Fails the first `failures` writes (as a full disk or a failed fsync
/// would), remembering what reached "disk".
struct FlakySink {
    failures: AtomicUsize,
    written: Arc<Mutex<Vec<String>>>,
    reopened: Arc<AtomicUsize>,
}

impl Sink for FlakySink {
    fn write(&mut self, frames: Frames<'_>) -> Result<(), String> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err("disk I/O error".into());
        }
        let mut written = self.written.lock().expect("lock");
        for r in frames.records() {
            let id = r?.usage.id;
            if !written.iter().any(|w| w == id) {
                written.push(id.to_owned());
            }
        }
        Ok(())
    }

    fn reopen(&mut self) -> Result<(), String> {
        self.reopened.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_write_stops_the_log_until_it_has_reopened_and_committed() {
    let written = Arc::new(Mutex::new(Vec::new()));
    let reopened = Arc::new(AtomicUsize::new(0));
    let dir = tempfile::tempdir().expect("tempdir");
    let log = UsageLog::with_sink(
        FlakySink {
            failures: AtomicUsize::new(2),
            written: written.clone(),
            reopened: reopened.clone(),
        },
        dir.path(),
        strict(),
    )
    .expect("log");
    assert!(log.healthy());
    // Strict: the caller hears back once its record is synced; the failed
    // ingestions are the log's to retry, and a reader waits for them.
    log.record(record("a")).await.expect("synced");
    log.catch_up().await.expect("ingested after recovery");
    assert!(log.healthy());
    assert_eq!(*written.lock().expect("lock"), vec!["a".to_owned()]);
    assert_eq!(reopened.load(Ordering::SeqCst), 2, "reopened before each retry");
    assert_eq!(log.stats().failures.load(Ordering::Relaxed), 2, "each failure counted");
    log.record(record("b")).await.expect("committed");
    log.catch_up().await.expect("ingested");
    assert_eq!(written.lock().expect("lock").len(), 2);
}

#[tokio::test]
async fn the_writer_waits_for_running_invocations_but_not_for_a_lone_one() {
    // A window far longer than the test, so only settling ends a group.
    let dir = tempfile::tempdir().expect("tempdir");
    let pace = Pace {
        window: std::time::Duration::from_secs(600),
        ..Pace::default()
    };
    let log = UsageLog::start(Count(Arc::default()), dir.path(), strict(), pace).expect("log");
    let syncs = || log.stats().syncs.load(Ordering::Relaxed);
    // Nothing else running: synced alone, at once.
    log.record(record("alone")).await.expect("committed");
    assert_eq!(syncs(), 1);

    // Three invocations running: the first record waits for the other two.
    for _ in 0..3 {
        log.announce();
    }
    let mut commits = Vec::new();
    for i in 0..3 {
        let seq = log.append(record(&format!("r{i}")).as_priced()).expect("written");
        log.settle();
        commits.push(seq);
        tokio::task::yield_now().await;
    }
    for seq in commits {
        log.durable(seq).await.expect("committed");
    }
    assert_eq!(syncs(), 2, "the three records were synced as one group");
}

#[tokio::test]
async fn time_ranges_select_by_arrival() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("open");
    let t0_ms: u64 = 1_764_000_000_000;
    for second in 0..3u64 {
        let ms = t0_ms + second * 1000;
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, ((ms % 1000) * 1_000_000) as u32);
        let mut usage = usage(&uuid::Uuid::new_v7(ts).to_string(), Outcome::Ok);
        usage.started_at_us = (ms * 1000) as i64 + 300;
        usage.ended_at_us = usage.started_at_us + 1000;
        log.record(PriceTable::default().price(usage)).await.expect("commit");
    }
    let window = Filter {
        since_us: Some(((t0_ms + 1000) * 1000) as i64),
        until_us: Some(((t0_ms + 2000) * 1000) as i64),
        ..Filter::default()
    };
    let page = log.page(&window, 0, None, 10).await.expect("page");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].usage.started_at_us, ((t0_ms + 1000) * 1000) as i64 + 300);
    let summary = log.summary(&window).await.expect("summary");
    assert_eq!(summary[0].invocations, 1);
}

#[tokio::test]
async fn records_only_in_the_journal_are_recovered_once_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("open");
    let ids: Vec<String> = (0..4).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    for id in &ids[..2] {
        log.record(record(id)).await.expect("written");
    }
    log.catch_up().await.expect("ingested");
    log.close(std::time::Duration::ZERO);
    // A crash after the journal write, before ingestion: the last two exist
    // only in journals, one an earlier Hearth's JSON lines (its last line
    // cut short by the crash), one of frames (its last frame torn).
    let earlier = format!(
        "{}\n{{\"usage\":{{\"id\":",
        serde_json::to_string(&UsageRecord {
            seq: 3,
            ..record(&ids[2])
        })
        .expect("json")
    );
    let journals = dir.path().join("usage-journal");
    std::fs::write(journals.join("journal-00000008.jsonl"), earlier).expect("journal");
    let mut frames = Vec::new();
    frames::encode(
        UsageRecord {
            seq: 4,
            ..record(&ids[3])
        }
        .as_priced(),
        &mut frames,
    )
    .expect("frame");
    let whole = frames.len();
    frames::encode(
        UsageRecord {
            seq: 5,
            ..record("torn")
        }
        .as_priced(),
        &mut frames,
    )
    .expect("frame");
    frames.truncate(whole + 20);
    std::fs::write(journals.join("journal-00000009.log"), frames).expect("journal");

    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("reopen");
    let all = log.page(&Filter::default(), 0, None, 100).await.expect("page");
    let seen: Vec<(u64, String)> = all.iter().map(|r| (r.seq, r.usage.id.clone())).collect();
    let expected: Vec<(u64, String)> = (1..).zip(ids.iter().cloned()).collect();
    assert_eq!(seen, expected, "every record once, in commit order");
    // New records continue the sequence, and a second restart finds
    // nothing more to recover.
    let next = log
        .record(record(&uuid::Uuid::now_v7().to_string()))
        .await
        .expect("written");
    assert_eq!(next, 5);
    log.close(std::time::Duration::ZERO);
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("reopen");
    let all = log.page(&Filter::default(), 0, None, 100).await.expect("page");
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_database_from_an_earlier_hearth_is_numbered_and_gains_the_new_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        // The first schema: no commit sequence, GPU time in microseconds
        // and nothing else of model compute, no attempts.
        let conn = rusqlite::Connection::open(dir.path().join("usage.db")).expect("db");
        conn.execute_batch(
            "CREATE TABLE usage (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, function TEXT NOT NULL,
                version INTEGER NOT NULL, started_at_us INTEGER NOT NULL, ended_at_us INTEGER NOT NULL,
                status INTEGER NOT NULL, outcome TEXT NOT NULL, cold_start INTEGER NOT NULL,
                queue_us INTEGER NOT NULL, memory_peak_bytes INTEGER NOT NULL, guest_cpu_us INTEGER NOT NULL,
                device TEXT NOT NULL, gpu_us INTEGER NOT NULL, inference_calls INTEGER NOT NULL,
                batched_calls INTEGER NOT NULL, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
                billed_ms INTEGER NOT NULL, cost_nanos INTEGER NOT NULL, currency TEXT NOT NULL,
                price_version TEXT NOT NULL) WITHOUT ROWID;
             INSERT INTO usage VALUES ('0193a0e8-0000-7000-8000-000000000002', 'acme', 'ocr', 1, 10, 20, 200,
                'ok', 0, 0, 0, 0, 'cuda:0', 1500, 1, 1, 0, 0, 1, 5, 'USD', 'builtin-1');
             INSERT INTO usage VALUES ('0193a0e8-0000-7000-8000-000000000001', 'acme', 'echo', 1, 10, 20, 200,
                'ok', 0, 0, 0, 0, 'cpu', 0, 0, 0, 0, 0, 1, 5, 'USD', 'builtin-1');",
        )
        .expect("old table");
    }
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("open");
    let all = log.page(&Filter::default(), 0, None, 10).await.expect("page");
    let seen: Vec<(u64, &str, u64, u64)> = all
        .iter()
        .map(|r| (r.seq, r.usage.function.as_str(), r.usage.compute_ns, r.usage.gpu_ns))
        .collect();
    assert_eq!(
        seen,
        [(1, "echo", 0, 0), (2, "ocr", 1_500_000, 1_500_000)],
        "numbered in id order; GPU time carried over as compute"
    );
    assert!(
        all.iter()
            .all(|r| r.usage.attempt == 1 && r.usage.invocation_id.is_none()),
        "{all:?}"
    );
    let next = log
        .record(record(&uuid::Uuid::now_v7().to_string()))
        .await
        .expect("written");
    assert_eq!(next, 3);
    // Moved into pages and hourly totals, once: the old table is gone.
    let conn = rusqlite::Connection::open(dir.path().join("usage.db")).expect("db");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .expect("query")
        .query_map([], |row| row.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("tables");
    assert_eq!(tables, ["usage_hours", "usage_pages"]);
    let summary = log.summary(&Filter::default()).await.expect("summary");
    let calls: Vec<(&str, u64, f64)> = summary
        .iter()
        .map(|row| (row.function.as_str(), row.invocations, row.compute_ms))
        .collect();
    assert_eq!(
        calls,
        [("echo", 1, 0.0), ("ocr", 1, 1.5), ("echo", 1, 0.0)],
        "the old records (on 1970-01-01) are in the totals, beside the new one"
    );
    log.close(std::time::Duration::ZERO);
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("reopened");
    let all = log.page(&Filter::default(), 0, None, 10).await.expect("page");
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
}

#[tokio::test]
async fn a_large_journal_rotates_under_steady_appends_and_keeps_every_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("open");
    // Unit tests rotate at 64 KiB: some hundreds of records, appended
    // while the ingesters ingest and rotate (appends never wait for them).
    let mut ids = Vec::new();
    for n in 0..1500 {
        let id = uuid::Uuid::now_v7().to_string();
        log.append(record(&id).as_priced()).expect("append");
        ids.push(id);
        if n % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    log.catch_up().await.expect("ingested");
    // Closing joins the log's threads: the journal directory is settled.
    log.close(std::time::Duration::ZERO);
    let journals: Vec<String> = std::fs::read_dir(dir.path().join("usage-journal"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(journals.len(), 1, "the old journals are gone: {journals:?}");
    assert_ne!(journals[0], "journal-00000000.log", "it rotated");
    // After a restart nothing is lost or doubled.
    let log = UsageLog::open(dir.path(), LogConfig::default()).expect("reopen");
    let all = log.page(&Filter::default(), 0, None, 10_000).await.expect("page");
    let seen: Vec<&str> = all.iter().map(|r| r.usage.id.as_str()).collect();
    assert_eq!(seen, ids, "every record once, in order");
}

/// Counts what it is given.
struct Count(Arc<AtomicUsize>);

impl Sink for Count {
    fn write(&mut self, frames: Frames<'_>) -> Result<(), String> {
        self.0.fetch_add(frames.len(), Ordering::SeqCst);
        Ok(())
    }

    fn reopen(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// A log whose idle-time ingester never runs: what is ingested, the
/// normal-priority ingester did.
fn without_idle_ingester(dir: &std::path::Path) -> (UsageLog, Arc<AtomicUsize>) {
    let ingested = Arc::new(AtomicUsize::new(0));
    let pace = Pace {
        ingest_every: std::time::Duration::from_secs(3600),
        ..Pace::default()
    };
    let log = UsageLog::start(Count(ingested.clone()), dir, LogConfig::default(), pace).expect("log");
    (log, ingested)
}

#[tokio::test]
async fn a_reader_gets_everything_written_before_it_without_the_idle_ingester() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, ingested) = without_idle_ingester(dir.path());
    for n in 0..10 {
        log.append(record(&format!("r{n}")).as_priced()).expect("append");
    }
    assert_eq!(log.catch_up().await.expect("caught up"), 10);
    assert_eq!(ingested.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn a_backlog_past_its_bound_is_ingested_with_nobody_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, ingested) = without_idle_ingester(dir.path());
    // Under the bound: nothing is ingested (nobody reads, the idle-time
    // ingester is away).
    for n in 0..BACKLOG - 1 {
        log.append(record(&format!("r{n}")).as_priced()).expect("append");
    }
    log.durable(log.stats().written.load(Ordering::Acquire))
        .await
        .expect("synced");
    assert_eq!(ingested.load(Ordering::SeqCst), 0);
    // At the bound, the normal-priority ingester takes it all.
    log.append(record("last").as_priced()).expect("append");
    eventually("the backlog was not ingested", || {
        log.stats().records.load(Ordering::Acquire) >= BACKLOG as u64
    })
    .await;
    assert_eq!(ingested.load(Ordering::SeqCst), BACKLOG);
}

/// Polls `done` until it holds, with nobody asking the log for anything;
/// panics with `failure` after a generous guard (a hang guard, not a
/// timing assertion).
async fn eventually(failure: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{failure}");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Waits until everything written is synced, with nobody asking for
/// durability.
async fn synced_on_its_own(log: &UsageLog) {
    let written = log.stats().written.load(Ordering::Acquire);
    eventually(
        &format!("record {written} was never synced: the syncer was not woken"),
        || log.stats().synced.load(Ordering::Acquire) >= written,
    )
    .await;
}

#[tokio::test]
async fn process_mode_syncs_on_its_own_after_a_quiet_spell_and_under_steady_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        sync_interval: std::time::Duration::from_millis(1),
        ..LogConfig::default()
    };
    let log = UsageLog::open(dir.path(), config).expect("open");
    // One record at a time, each after the last is synced: the syncer
    // sleeps until an append wakes it, and only the append can.
    for n in 0..20 {
        log.append(record(&format!("quiet-{n}")).as_priced()).expect("append");
        synced_on_its_own(&log).await;
    }
    // Steady appends: groups of many.
    for n in 0..2000 {
        log.append(record(&format!("steady-{n}")).as_priced()).expect("append");
        if n % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    synced_on_its_own(&log).await;
    assert_eq!(log.catch_up().await.expect("caught up"), 2020);
}
