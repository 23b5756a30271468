//! The durable usage log: a group-commit writer into its own SQLite file
//! (`usage.db`, WAL, `synchronous=FULL`), and the queries exports run.
//!
//! Every [`UsageLog::record`] call waits until its record is committed: the
//! writer thread takes whatever records are waiting (up to
//! [`MAX_BATCH`]), writes them in one transaction and fsyncs once, then
//! answers them all. Records are keyed by their id and inserted with
//! `INSERT OR IGNORE`, so writing one twice never doubles it.
//!
//! An fsync costs far more than a record (here, a virtual machine: about
//! 50–75 µs of CPU for the flush against a few µs per row), so the writer
//! makes groups large under load: invocations announce themselves when they
//! start ([`UsageLog::pending`]), and while any of them has not handed its
//! record over, the writer holds the group open for it, at most
//! [`GROUP_WINDOW`] after the group's first record. A lone request never
//! waits.
//!
//! A failed write or commit is never ignored: the writer marks the log
//! unhealthy (callers refuse new invocations with 503), counts and logs the
//! failure, reopens the database and runs `PRAGMA quick_check`, looks up
//! which records of the failed batch did commit, writes the rest, and only
//! then answers the waiting callers and turns healthy again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension as _, Row, params};
use tokio::sync::{mpsc, oneshot};

use crate::record::{Outcome, Usage, UsageRecord};

/// Largest number of records committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Longest the writer holds a group open for invocations still running.
pub const GROUP_WINDOW: Duration = Duration::from_millis(1);
/// Records waiting for the writer before callers wait to hand theirs over.
const CHANNEL_DEPTH: usize = 16 * 1024;
/// How long a caller waits for its record to commit before giving up (the
/// writer keeps the record and commits it once it can).
const COMMIT_WAIT: Duration = Duration::from_secs(30);

/// Why a record was not (yet) committed, or a query failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The writer is recovering from a failed write; retry later.
    #[error("the usage log is unavailable: {0}")]
    Unavailable(String),
    /// The writer has stopped (the server is shutting down).
    #[error("the usage log is closed")]
    Closed,
    /// The database refused a query.
    #[error("usage database: {0}")]
    Database(String),
}

impl From<rusqlite::Error> for LogError {
    fn from(err: rusqlite::Error) -> Self {
        LogError::Database(err.to_string())
    }
}

/// Where records are written: the real database, or a fault-injecting
/// stand-in in unit tests.
pub trait Sink: Send + 'static {
    /// Writes `batch` in one transaction, durably (idempotent by id).
    fn write(&mut self, batch: &[UsageRecord]) -> Result<(), String>;
    /// Reopens the store after a failure and checks it.
    fn reopen(&mut self) -> Result<(), String>;
    /// How many of `ids` are committed.
    fn committed(&mut self, ids: &[&str]) -> Result<usize, String>;
}

/// Counters of the writer, for telemetry.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Records committed.
    pub records: AtomicU64,
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Failed writes or commits.
    pub failures: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    healthy: AtomicBool,
    stats: LogStats,
    /// Invocations that will hand over a record and have not yet.
    pending: AtomicUsize,
    /// Whether the writer is waiting for `pending` to reach zero.
    writer_waiting: AtomicBool,
    writer: OnceLock<std::thread::Thread>,
}

impl Shared {
    /// One pending invocation handed its record over (or will not).
    fn settle(&self) {
        // SeqCst pairs with the writer's store of `writer_waiting` then load
        // of `pending`: one of the two sides sees the other's write.
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1
            && self.writer_waiting.load(Ordering::SeqCst)
            && let Some(writer) = self.writer.get()
        {
            writer.unpark();
        }
    }
}

/// An invocation that will hand the log a record: while any are alive, the
/// writer keeps its group open for them (up to [`GROUP_WINDOW`]). Dropped
/// once the record is submitted, or when the invocation will leave none.
#[derive(Debug)]
pub struct Pending(Arc<Shared>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.settle();
    }
}

type Ack = oneshot::Sender<Result<(), LogError>>;

/// A record handed to the writer; [`Committed::wait`] returns once it is on
/// disk.
#[derive(Debug)]
pub struct Committed(oneshot::Receiver<Result<(), LogError>>);

impl Committed {
    /// Waits for the commit (at most a bounded time).
    pub async fn wait(self) -> Result<(), LogError> {
        match tokio::time::timeout(COMMIT_WAIT, self.0).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LogError::Closed),
            Err(_) => Err(LogError::Unavailable(format!(
                "the record did not commit within {} s",
                COMMIT_WAIT.as_secs()
            ))),
        }
    }
}

/// The usage log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UsageLog {
    tx: mpsc::Sender<(UsageRecord, Ack)>,
    shared: Arc<Shared>,
    reader: Option<Arc<Mutex<Connection>>>,
}

/// One table clustered on the record id. Ids are UUIDv7, minted when the
/// request arrives, so they sort by time: inserts append, and time ranges are
/// id ranges (no second index to maintain on the hot path).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS usage (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    started_at_us INTEGER NOT NULL,
    ended_at_us INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    cold_start INTEGER NOT NULL,
    queue_us INTEGER NOT NULL,
    memory_peak_bytes INTEGER NOT NULL,
    guest_cpu_us INTEGER NOT NULL,
    device TEXT NOT NULL,
    gpu_us INTEGER NOT NULL,
    inference_calls INTEGER NOT NULL,
    batched_calls INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    billed_ms INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL,
    currency TEXT NOT NULL,
    price_version TEXT NOT NULL
) WITHOUT ROWID;";

const COLUMNS: &str = "id, tenant, function, version, started_at_us, ended_at_us, status, outcome, cold_start, \
     queue_us, memory_peak_bytes, guest_cpu_us, device, gpu_us, inference_calls, batched_calls, bytes_in, bytes_out, \
     billed_ms, cost_nanos, currency, price_version";

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Every commit reaches the disk before the caller hears of it.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

fn sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn row_u64(row: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(u64::try_from(row.get::<_, i64>(i)?).unwrap_or(0))
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<UsageRecord> {
    let outcome: String = row.get(7)?;
    Ok(UsageRecord {
        usage: Usage {
            id: row.get(0)?,
            tenant: row.get(1)?,
            function: row.get(2)?,
            version: row.get(3)?,
            started_at_us: row.get(4)?,
            ended_at_us: row.get(5)?,
            status: row.get(6)?,
            outcome: Outcome::parse(&outcome).unwrap_or(Outcome::InternalError),
            cold_start: row.get(8)?,
            queue_us: row_u64(row, 9)?,
            memory_peak_bytes: row_u64(row, 10)?,
            guest_cpu_us: row_u64(row, 11)?,
            device: row.get(12)?,
            gpu_us: row_u64(row, 13)?,
            inference_calls: row_u64(row, 14)?,
            batched_calls: row_u64(row, 15)?,
            bytes_in: row_u64(row, 16)?,
            bytes_out: row_u64(row, 17)?,
        },
        cost_nanos: row.get(19)?,
        currency: row.get(20)?,
        price_version: row.get(21)?,
    })
}

/// The real sink: `usage.db`.
#[derive(Debug)]
struct SqliteSink {
    path: PathBuf,
    conn: Option<Connection>,
}

impl Sink for SqliteSink {
    fn write(&mut self, batch: &[UsageRecord]) -> Result<(), String> {
        let conn = self.conn.as_mut().ok_or("the database is not open")?;
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        {
            let mut insert = tx
                .prepare_cached(&format!(
                    "INSERT OR IGNORE INTO usage ({COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
                ))
                .map_err(|e| e.to_string())?;
            for r in batch {
                let u = &r.usage;
                insert
                    .execute(params![
                        u.id,
                        u.tenant,
                        u.function,
                        u.version,
                        u.started_at_us,
                        u.ended_at_us,
                        u.status,
                        u.outcome.as_str(),
                        u.cold_start,
                        sql_u64(u.queue_us),
                        sql_u64(u.memory_peak_bytes),
                        sql_u64(u.guest_cpu_us),
                        u.device,
                        sql_u64(u.gpu_us),
                        sql_u64(u.inference_calls),
                        sql_u64(u.batched_calls),
                        sql_u64(u.bytes_in),
                        sql_u64(u.bytes_out),
                        sql_u64(u.billed_ms()),
                        r.cost_nanos,
                        r.currency,
                        r.price_version,
                    ])
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }

    fn reopen(&mut self) -> Result<(), String> {
        self.conn = None;
        let conn = open_connection(&self.path).map_err(|e| e.to_string())?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(|e| e.to_string())?;
        if check != "ok" {
            return Err(format!("quick_check: {check}"));
        }
        self.conn = Some(conn);
        Ok(())
    }

    fn committed(&mut self, ids: &[&str]) -> Result<usize, String> {
        let conn = self.conn.as_ref().ok_or("the database is not open")?;
        let mut found = 0;
        for id in ids {
            let hit: Option<i64> = conn
                .query_row("SELECT 1 FROM usage WHERE id = ?1", params![id], |row| row.get(0))
                .optional()
                .map_err(|e| e.to_string())?;
            found += usize::from(hit.is_some());
        }
        Ok(found)
    }
}

/// A filter for queries and exports.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this function.
    pub function: Option<String>,
    /// Started at or after (Unix µs).
    pub since_us: Option<i64>,
    /// Started before (Unix µs).
    pub until_us: Option<i64>,
}

/// One row of [`UsageLog::summary`]: a tenant's function on one day (UTC).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SummaryRow {
    pub tenant: String,
    pub function: String,
    /// `YYYY-MM-DD`.
    pub day: String,
    pub invocations: u64,
    /// Of which ran (not rejected or refused as bad requests).
    pub ran: u64,
    pub rejected: u64,
    pub cold_starts: u64,
    pub billed_ms: u64,
    pub guest_cpu_us: u64,
    pub gpu_ms: f64,
    pub inference_calls: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Decimal, nine places.
    pub cost: String,
    pub currency: String,
}

impl UsageLog {
    /// Opens (creating if needed) `usage.db` in `data_dir` and starts the
    /// writer thread.
    pub fn open(data_dir: &Path) -> Result<UsageLog, LogError> {
        let path = data_dir.join("usage.db");
        let writer = open_connection(&path)?;
        let reader = open_connection(&path)?;
        let sink = SqliteSink {
            path,
            conn: Some(writer),
        };
        let mut log = UsageLog::with_sink(sink)?;
        log.reader = Some(Arc::new(Mutex::new(reader)));
        Ok(log)
    }

    /// A log over any sink (unit tests inject failures this way); it has no
    /// query side.
    pub fn with_sink(sink: impl Sink) -> Result<UsageLog, LogError> {
        UsageLog::start(sink, GROUP_WINDOW)
    }

    /// Starts the writer over `sink`, holding groups open up to `window`.
    pub(crate) fn start(sink: impl Sink, window: Duration) -> Result<UsageLog, LogError> {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            stats: LogStats::default(),
            pending: AtomicUsize::new(0),
            writer_waiting: AtomicBool::new(false),
            writer: OnceLock::new(),
        });
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hearth-usage-writer".into())
            .spawn(move || writer(sink, rx, &writer_shared, window))
            .map_err(|e| LogError::Database(format!("starting the writer thread: {e}")))?;
        let _ = shared.writer.set(thread.thread().clone());
        Ok(UsageLog {
            tx,
            shared,
            reader: None,
        })
    }

    /// Whether records are being committed; invocations should be refused
    /// (503) while this is false.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// The writer's counters.
    pub fn stats(&self) -> &LogStats {
        &self.shared.stats
    }

    /// Whether other invocations than the caller's own are running with a
    /// record to hand over: the server is busy, and the writer will group.
    pub fn busy(&self) -> bool {
        self.shared.pending.load(Ordering::Relaxed) > 1
    }

    /// Announces an invocation that will hand over a record (see
    /// [`Pending`]); drop the guard after submitting it.
    pub fn pending(&self) -> Pending {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        Pending(self.shared.clone())
    }

    /// Commits `record` durably; returns once it is on disk.
    pub async fn record(&self, record: UsageRecord) -> Result<(), LogError> {
        let (ack, committed) = oneshot::channel();
        self.tx.send((record, ack)).await.map_err(|_| LogError::Closed)?;
        Committed(committed).wait().await
    }

    /// Hands `record` to the writer without waiting, if there is room: from
    /// then on it is committed even if nobody waits for the [`Committed`].
    /// Gives the record back when the writer's queue is full.
    pub fn try_submit(&self, record: UsageRecord) -> Result<Committed, Option<Box<UsageRecord>>> {
        let (ack, committed) = oneshot::channel();
        match self.tx.try_send((record, ack)) {
            Ok(()) => Ok(Committed(committed)),
            Err(mpsc::error::TrySendError::Full((record, _))) => Err(Some(Box::new(record))),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(None),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LogError> {
        let reader = self
            .reader
            .clone()
            .ok_or_else(|| LogError::Database("this log has no query side".into()))?;
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn).map_err(LogError::from)
        })
        .await
        .map_err(|e| LogError::Database(e.to_string()))?
    }

    /// Up to `limit` records matching `filter` with ids after `after`, in id
    /// (time) order: one page of an export.
    pub async fn page(&self, filter: &Filter, after: Option<&str>, limit: usize) -> Result<Vec<UsageRecord>, LogError> {
        let filter = filter.clone();
        let after = after.unwrap_or("").to_owned();
        let limit = sql_u64(limit as u64);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM usage
                 WHERE id > ?1 AND id < ?7 AND (?2 IS NULL OR tenant = ?2) AND (?3 IS NULL OR function = ?3)
                   AND (?4 IS NULL OR started_at_us >= ?4) AND (?5 IS NULL OR started_at_us < ?5)
                 ORDER BY id LIMIT ?6"
            ))?;
            let (lower, upper) = id_bounds(&filter);
            let after = after.max(lower);
            let rows = stmt.query_map(
                params![
                    after,
                    filter.tenant,
                    filter.function,
                    filter.since_us,
                    filter.until_us,
                    limit,
                    upper
                ],
                record_from_row,
            )?;
            rows.collect()
        })
        .await
    }

    /// Totals per tenant, function and UTC day.
    pub async fn summary(&self, filter: &Filter) -> Result<Vec<SummaryRow>, LogError> {
        let filter = filter.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT tenant, function, strftime('%Y-%m-%d', started_at_us / 1000000, 'unixepoch') AS day,
                        count(*), sum(outcome NOT IN ('rejected', 'bad_request')), sum(outcome = 'rejected'),
                        sum(cold_start), sum(billed_ms), sum(guest_cpu_us), sum(gpu_us), sum(inference_calls),
                        sum(bytes_in), sum(bytes_out), sum(cost_nanos), max(currency)
                 FROM usage
                 WHERE id >= ?5 AND id < ?6 AND (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR function = ?2)
                   AND (?3 IS NULL OR started_at_us >= ?3) AND (?4 IS NULL OR started_at_us < ?4)
                 GROUP BY tenant, function, day ORDER BY day, tenant, function",
            )?;
            let (lower, upper) = id_bounds(&filter);
            let rows = stmt.query_map(
                params![
                    filter.tenant,
                    filter.function,
                    filter.since_us,
                    filter.until_us,
                    lower,
                    upper
                ],
                |row| {
                    Ok(SummaryRow {
                        tenant: row.get(0)?,
                        function: row.get(1)?,
                        day: row.get(2)?,
                        invocations: row_u64(row, 3)?,
                        ran: row_u64(row, 4)?,
                        rejected: row_u64(row, 5)?,
                        cold_starts: row_u64(row, 6)?,
                        billed_ms: row_u64(row, 7)?,
                        guest_cpu_us: row_u64(row, 8)?,
                        gpu_ms: row_u64(row, 9)? as f64 / 1000.0,
                        inference_calls: row_u64(row, 10)?,
                        bytes_in: row_u64(row, 11)?,
                        bytes_out: row_u64(row, 12)?,
                        cost: crate::record::format_nanos(row.get(13)?),
                        currency: row.get(14)?,
                    })
                },
            )?;
            rows.collect()
        })
        .await
    }
}

/// The id range that holds every record of `filter`'s time range: ids are
/// UUIDv7, whose first 48 bits are the Unix milliseconds at which the
/// request arrived (taken a moment before `started_at_us`, hence the
/// millisecond of slack on each side; the exact filter is applied too).
fn id_bounds(filter: &Filter) -> (String, String) {
    let bound = |ms: i64| {
        let ms = u64::try_from(ms.max(0)).unwrap_or(0).min((1 << 48) - 1);
        format!("{:08x}-{:04x}", ms >> 16, ms & 0xffff)
    };
    let lower = filter
        .since_us
        .map_or_else(String::new, |us| bound(us.div_euclid(1000) - 1));
    // Past every id: 'g' sorts after any hex digit.
    let upper = filter
        .until_us
        .map_or_else(|| "g".to_owned(), |us| bound(us.div_euclid(1000) + 2));
    (lower, upper)
}

/// The writer thread: group commits until every sender is gone.
fn writer(mut sink: impl Sink, mut rx: mpsc::Receiver<(UsageRecord, Ack)>, shared: &Shared, window: Duration) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        let drain = |batch: &mut Vec<(UsageRecord, Ack)>, rx: &mut mpsc::Receiver<(UsageRecord, Ack)>| {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        };
        drain(&mut batch, &mut rx);
        // Hold the group open while invocations are still running (see the
        // module documentation); `Shared::settle` wakes us when the last
        // one has handed its record over.
        let deadline = Instant::now() + window;
        while batch.len() < MAX_BATCH && shared.pending.load(Ordering::SeqCst) > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            shared.writer_waiting.store(true, Ordering::SeqCst);
            if shared.pending.load(Ordering::SeqCst) > 0 {
                std::thread::park_timeout(deadline - now);
            }
            shared.writer_waiting.store(false, Ordering::SeqCst);
            drain(&mut batch, &mut rx);
        }
        let (records, acks): (Vec<UsageRecord>, Vec<Ack>) = batch.into_iter().unzip();
        if let Err(error) = sink.write(&records) {
            shared.healthy.store(false, Ordering::Release);
            shared.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                error,
                records = records.len(),
                "usage log write failed; refusing invocations until it recovers"
            );
            recover(&mut sink, &records, shared);
            shared.healthy.store(true, Ordering::Release);
            tracing::info!("usage log recovered");
        }
        shared.stats.commits.fetch_add(1, Ordering::Relaxed);
        shared.stats.records.fetch_add(records.len() as u64, Ordering::Relaxed);
        for ack in acks {
            let _ = ack.send(Ok(()));
        }
    }
}

/// Reopens and checks the store, then commits what of `batch` is missing,
/// retrying with backoff until it succeeds.
fn recover(sink: &mut impl Sink, batch: &[UsageRecord], shared: &Shared) {
    let ids: Vec<&str> = batch.iter().map(|r| r.usage.id.as_str()).collect();
    let mut backoff = Duration::from_millis(50);
    loop {
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
        let attempt = sink.reopen().and_then(|()| {
            let found = sink.committed(&ids)?;
            tracing::info!(
                committed = found,
                of = ids.len(),
                "usage log reopened; committing the rest of the failed batch"
            );
            sink.write(batch)
        });
        match attempt {
            Ok(()) => return,
            Err(error) => {
                shared.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error, "usage log still failing");
            }
        }
    }
}
