//! The usage log: every record is appended to a journal file by the
//! invocation that made it; a syncer thread makes the journal durable, and an
//! ingester thread, at a lower priority, moves synced records into a
//! queryable SQLite file (`usage.db`, WAL) for exports.
//!
//! **Durability.** [`UsageLog::append`] copies the record into the journal,
//! a file mapped into memory, under a short lock, in the caller's own task:
//! no system call, no thread hand-off, no wake-up. From then on it survives
//! a crash (or `kill -9`) of the process at any moment. What it does not yet survive is a crash of the
//! whole machine: the syncer `fdatasync`s the journal at least every
//! [`LogConfig::sync_interval`] while records wait, so at most that window
//! is lost to a power cut or a kernel crash. That is
//! [`Durability::Process`], the default, and the contract of SQLite's WAL
//! with `synchronous=NORMAL`, Kafka's default flush policy and PostgreSQL's
//! `synchronous_commit=off`. [`Durability::Strict`] makes the caller wait
//! ([`UsageLog::durable`]) until the record's group is synced: nothing
//! acknowledged is ever lost, at the cost of an fsync's latency per answer.
//! In strict mode the syncer groups: while invocations that will append are
//! still running ([`UsageLog::announce`]) it holds the group open for them, at
//! most [`GROUP_WINDOW`].
//!
//! **Cost.** A record is encoded once, by the invocation, straight into
//! the queue of frames that the syncer hands on and the ingester stores as
//! it is (reading each record borrowed from its frame, with no copy of its
//! strings). It costs the node about 9 % of a warm `hello`'s CPU in a
//! loaded server on a 2-core VM (`scripts/load-compare.sh`, against
//! `--no-metering`): the encoding and the copy into the journal on the
//! answer's path (about an eighth), the fsyncs (about a third: syncing once
//! a second instead of every 10 ms recovers 3–5 points; each is a data
//! write and a cache flush, two requests whose doorbells and interrupts
//! are VM exits) and the ingestion (about a sixth; a page per batch, see
//! `database.rs`) off it; the rest is spread thin (`perf` finds no part
//! above 0.5 %). Writing back a page still mapped write-protects it with a
//! TLB shootdown of its own, so the syncer first unmaps the full pages
//! (`Segment::unmap_full_pages`), and the queues reuse the ingested groups'
//! buffers.
//! An idle-time ingester runs at [`INGEST_NICE`], so on a
//! busy node it takes the CPU the invocations leave rather than preempting
//! them. A second ingester, at normal priority, steps in when that is not
//! enough: when a reader waits (queries see everything written before
//! them) or when more than [`BACKLOG`] synced records wait (under sustained
//! saturation, which bounds the memory they hold). The two take turns on
//! the database, so ingestion stays in commit order. The fsyncs stay at
//! normal priority: their interval is the durability contract.
//!
//! **Order.** Each record gets a commit sequence when it is appended, under
//! the same lock as the write, so the journal is in sequence order; the
//! ingester ingests synced records in that order, so what is queryable is
//! always a prefix of the sequence, and only ever what is durable. Queries first wait until
//! everything appended before them is ingested ([`UsageLog::catch_up`]): a
//! consumer paging by sequence sees every record exactly once.
//!
//! **Failures.** A failed journal write or fsync, or a failed ingestion, is
//! never ignored: the log turns unhealthy (callers refuse new invocations
//! with 503), the failure is counted and logged, and the log recovers: a
//! failed fsync leaves the page cache's state unknown, so the journal is
//! reopened as a new file and every record not yet ingested is written to it
//! again, in full, and synced; a failed ingestion reopens and checks the
//! database and writes the group again (ingestion is idempotent by id). Only
//! then does the log turn healthy. On start, journal records the database
//! lacks (after a crash) are ingested before anything else.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::watch;

use crate::database::{PageCompressor, SqliteSink, open_connection};
use crate::frames::encode;
#[cfg(feature = "failpoints")]
use crate::journal::arm_fault_points;
use crate::journal::{Group, Journal, Segment, recover_journal};
use crate::queries::{Filter, SummaryRow, UsageQueries};
use crate::record::{Priced, UsageRecord};
use crate::sink::{LogError, Sink};

mod threads;
use threads::{ingest_idle, ingest_now, syncer};

/// Longest the syncer holds a strict group open for invocations still running.
pub const GROUP_WINDOW: Duration = Duration::from_millis(1);
/// How the log's threads pace themselves: the defaults, or a unit test's
/// own, to run one path alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Longest a strict group is held open ([`GROUP_WINDOW`]).
    pub(crate) window: Duration,
    /// How often the idle-time ingester runs ([`INGEST_EVERY`]).
    pub(crate) ingest_every: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            window: GROUP_WINDOW,
            ingest_every: INGEST_EVERY,
        }
    }
}

/// Default longest time a record written in process mode waits for its fsync.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// How often synced records are ingested into the database when nobody
/// waits to read them: fewer, larger transactions than the syncs' groups.
const INGEST_EVERY: Duration = Duration::from_millis(100);
/// The idle-time ingester's nice value (the other threads keep the
/// process's): a lower weight, so that on a busy node its wake-ups do not
/// preempt answers in flight; the normal-priority ingester covers what it
/// cannot keep up with.
const INGEST_NICE: i32 = 10;
/// Synced records waiting for ingestion past which the normal-priority
/// ingester takes over (about two seconds of a saturated node's records,
/// some tens of MiB).
pub(crate) const BACKLOG: usize = if cfg!(test) { 256 } else { 1 << 16 };
/// How long a caller waits for its record to become durable before giving
/// up (the log keeps the record and makes it durable once it can).
const COMMIT_WAIT: Duration = Duration::from_secs(30);
/// Journal size past which it is started afresh, carrying over what is not
/// yet ingested (`rotate_if_large` in `log/threads.rs`).
const JOURNAL_ROTATE_BYTES: u64 = if cfg!(test) { 64 << 10 } else { 64 << 20 };

/// When an answer may complete relative to its record's durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Once the record is written to the journal: survives a crash of the
    /// process; a crash of the machine loses at most the sync interval.
    #[default]
    Process,
    /// Once the record's group is fsynced: survives anything the disk does.
    Strict,
}

impl Durability {
    /// The name used by `--usage-durability`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Process => "process",
            Durability::Strict => "strict",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(Durability::Process),
            "strict" => Ok(Durability::Strict),
            other => Err(format!("`{other}`: expected `process` or `strict`")),
        }
    }
}

/// How the log keeps records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// When answers may complete.
    pub durability: Durability,
    /// Longest a written record waits for its fsync (process mode).
    pub sync_interval: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            durability: Durability::Process,
            sync_interval: DEFAULT_SYNC_INTERVAL,
        }
    }
}

/// Counters of the log, for telemetry.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Records ingested (durable and queryable).
    pub records: AtomicU64,
    /// Ingestion transactions.
    pub commits: AtomicU64,
    /// Groups of records fsynced.
    pub syncs: AtomicU64,
    /// Failed writes, fsyncs or ingestions.
    pub failures: AtomicU64,
    /// Highest commit sequence written to the journal.
    pub written: AtomicU64,
    /// Highest commit sequence fsynced.
    pub synced: AtomicU64,
    /// Unix microseconds of the last successful fsync (0 before any).
    pub last_sync_us: AtomicU64,
}

impl LogStats {
    /// Records written to the journal and not yet fsynced.
    pub fn unsynced(&self) -> u64 {
        self.written
            .load(Ordering::Acquire)
            .saturating_sub(self.synced.load(Ordering::Acquire))
    }
}

#[derive(Debug)]
struct Shared {
    config: LogConfig,
    pace: Pace,
    journal: Mutex<Journal>,
    /// False from a failed journal write or fsync until the syncer has
    /// written the records again to a new journal.
    journal_ok: AtomicBool,
    /// False from a failed ingestion until the ingester has recovered.
    database_ok: AtomicBool,
    closed: AtomicBool,
    /// Set by the syncer once it has synced everything after the log
    /// closed: the ingester then ingests the rest and stops.
    all_synced: AtomicBool,
    stats: LogStats,
    /// Highest sequence fsynced (strict answers wait for it).
    synced: watch::Sender<u64>,
    /// Highest sequence ingested, so visible to queries (they wait for it).
    visible: watch::Sender<u64>,
    /// Highest sequence someone waits to see synced: the syncer syncs at
    /// once instead of at the end of its interval.
    wanted: AtomicU64,
    /// Highest sequence someone waits to see visible: the ingester ingests
    /// as soon as it is synced.
    wanted_visible: AtomicU64,
    /// Invocations that will append a record and have not yet.
    pending: AtomicUsize,
    /// Whether the syncer is waiting for `pending` to reach zero.
    syncer_waiting: AtomicBool,
    syncer: OnceLock<std::thread::Thread>,
    /// The idle-time ingester.
    ingester: OnceLock<std::thread::Thread>,
    /// The normal-priority ingester, for readers and backlogs.
    ingest_now: OnceLock<std::thread::Thread>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Shared {
    fn journal(&self) -> MutexGuard<'_, Journal> {
        // The journal stays consistent across panics (no user code runs
        // under the lock), so a poisoned lock is still usable.
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_syncer(&self) {
        if let Some(syncer) = self.syncer.get() {
            syncer.unpark();
        }
    }

    fn wake_ingester(&self) {
        if let Some(ingester) = self.ingester.get() {
            ingester.unpark();
        }
    }

    fn wake_ingest_now(&self) {
        if let Some(ingester) = self.ingest_now.get() {
            ingester.unpark();
        }
    }

    /// Whether a reader waits for records that are synced, not yet ingested.
    fn reader_waits(&self) -> bool {
        let visible = *self.visible.borrow();
        self.wanted_visible.load(Ordering::Acquire) > visible && *self.synced.borrow() > visible
    }

    fn healthy(&self) -> bool {
        self.journal_ok.load(Ordering::Acquire) && self.database_ok.load(Ordering::Acquire)
    }

    /// One pending invocation handed its record over (or will not).
    fn settle(&self) {
        // SeqCst pairs with the syncer's store of `syncer_waiting` then load
        // of `pending`: one of the two sides sees the other's write.
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 && self.syncer_waiting.load(Ordering::SeqCst) {
            self.wake_syncer();
        }
    }
}

/// The usage log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UsageLog {
    shared: Arc<Shared>,
    reader: Option<Arc<Mutex<Connection>>>,
}

impl UsageLog {
    /// Opens (creating if needed) `usage.db` and the journal directory in
    /// `data_dir`, ingests what a crash left in the journal only, and starts
    /// the syncer.
    pub fn open(data_dir: &Path, config: LogConfig) -> Result<UsageLog, LogError> {
        #[cfg(feature = "failpoints")]
        arm_fault_points();
        let path = data_dir.join("usage.db");
        let conn = open_connection(&path)?;
        let reader = open_connection(&path)?;
        let sink = SqliteSink {
            path,
            conn: Some(conn),
            compressor: PageCompressor::new()?,
        };
        let mut log = UsageLog::start(sink, &data_dir.join("usage-journal"), config, Pace::default())?;
        log.reader = Some(Arc::new(Mutex::new(reader)));
        Ok(log)
    }

    /// A log over any sink, journaling in `journal_dir` (unit tests inject
    /// failures this way); it has no query side.
    pub fn with_sink(sink: impl Sink, journal_dir: &Path, config: LogConfig) -> Result<UsageLog, LogError> {
        UsageLog::start(sink, journal_dir, config, Pace::default())
    }

    /// Recovers the journal into `sink`, then starts the syncer and the
    /// ingesters over both.
    pub(crate) fn start(
        mut sink: impl Sink,
        journal_dir: &Path,
        config: LogConfig,
        pace: Pace,
    ) -> Result<UsageLog, LogError> {
        let io = |what: &str, e: std::io::Error| LogError::Database(format!("{what} {}: {e}", journal_dir.display()));
        std::fs::create_dir_all(journal_dir).map_err(|e| io("creating", e))?;
        let (last, number) = recover_journal(&mut sink, journal_dir)?;
        let file = Segment::create(journal_dir, number, &[]).map_err(|e| io("opening a journal in", e))?;
        let (synced, _) = watch::channel(last);
        let (visible, _) = watch::channel(last);
        let stats = LogStats::default();
        stats.written.store(last, Ordering::Relaxed);
        stats.synced.store(last, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            config,
            pace,
            journal: Mutex::new(Journal {
                dir: journal_dir.to_owned(),
                file: Some(file),
                number,
                next_seq: last + 1,
                queue: Group::default(),
                in_flight: VecDeque::new(),
                spare: Vec::new(),
            }),
            journal_ok: AtomicBool::new(true),
            database_ok: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            all_synced: AtomicBool::new(false),
            stats,
            synced,
            visible,
            wanted: AtomicU64::new(0),
            wanted_visible: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            syncer_waiting: AtomicBool::new(false),
            syncer: OnceLock::new(),
            ingester: OnceLock::new(),
            ingest_now: OnceLock::new(),
            threads: Mutex::new(Vec::new()),
        });
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| LogError::Database(format!("starting the {name} thread: {e}")))
        };
        let sink = Arc::new(Mutex::new(sink));
        let (idle_shared, idle_sink) = (shared.clone(), sink.clone());
        let idle = spawn("usage-ingest", Box::new(move || ingest_idle(&idle_sink, &idle_shared)))?;
        let _ = shared.ingester.set(idle.thread().clone());
        let now_shared = shared.clone();
        let now = spawn("usage-ingest-fg", Box::new(move || ingest_now(&sink, &now_shared)))?;
        let _ = shared.ingest_now.set(now.thread().clone());
        let syncer_shared = shared.clone();
        let syncer = spawn("usage-sync", Box::new(move || syncer(&syncer_shared)))?;
        let _ = shared.syncer.set(syncer.thread().clone());
        shared
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([syncer, idle, now]);
        Ok(UsageLog { shared, reader: None })
    }

    /// How the log keeps records.
    pub fn config(&self) -> LogConfig {
        self.shared.config
    }

    /// Whether records are being kept; invocations should be refused (503)
    /// while this is false.
    pub fn healthy(&self) -> bool {
        self.shared.healthy()
    }

    /// The log's counters.
    pub fn stats(&self) -> &LogStats {
        &self.shared.stats
    }

    /// Whether other invocations than the caller's own are running with a
    /// record to hand over: the server is busy, and a strict group will
    /// hold several.
    pub fn busy(&self) -> bool {
        self.shared.pending.load(Ordering::Relaxed) > 1
    }

    /// Announces an invocation that will append a record: until it
    /// [settles](UsageLog::settle), a strict group is held open for it (up
    /// to [`GROUP_WINDOW`]) and a shutdown waits for it. Pair each with one
    /// `settle`, once the record is appended or when the invocation will
    /// leave none.
    pub fn announce(&self) {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
    }

    /// An announced invocation appended its record, or will not.
    pub fn settle(&self) {
        self.shared.settle();
    }

    /// Writes `record` to the journal with its commit sequence, which it
    /// returns. Costs a copy into the mapped journal under a short lock; once
    /// it returns, the record survives a crash of the process. In strict mode, follow with
    /// [`UsageLog::durable`] before answering.
    pub fn append(&self, mut record: Priced<'_>) -> Result<u64, LogError> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        if !self.healthy() {
            return Err(LogError::Unavailable("recovering from a failed write".into()));
        }
        let mut journal = shared.journal();
        let Journal {
            file, queue, next_seq, ..
        } = &mut *journal;
        let Some(file) = file.as_mut() else {
            return Err(LogError::Unavailable("recovering from a failed write".into()));
        };
        let seq = *next_seq;
        record.seq = seq;
        // Encoded straight into the queue, which the ingester will store as
        // it is, then copied into the journal.
        let start = queue.frames.len();
        encode(record, &mut queue.frames).map_err(|e| LogError::Database(format!("encoding a usage record: {e}")))?;
        if let Err(err) = file.append(&queue.frames[start..]) {
            queue.frames.truncate(start);
            // Part of the frame may be in the file: the syncer starts a new
            // journal and writes every record not yet ingested again.
            journal.file = None;
            drop(journal);
            shared.journal_ok.store(false, Ordering::Release);
            shared.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %err, "usage journal write failed; refusing invocations until it recovers");
            shared.wake_syncer();
            return Err(LogError::Unavailable(format!("journal write failed: {err}")));
        }
        queue.records += 1;
        queue.last_seq = seq;
        *next_seq += 1;
        let first = queue.records == 1;
        shared.stats.written.store(seq, Ordering::Release);
        drop(journal);
        // The syncer sleeps until there is something to sync: one wake-up
        // per group, not per record.
        if first || shared.config.durability == Durability::Strict {
            shared.wake_syncer();
        }
        Ok(seq)
    }

    /// Waits until the record with sequence `seq` is fsynced (asking the
    /// syncer to sync now rather than at the end of its interval); at most
    /// a bounded time.
    pub async fn durable(&self, seq: u64) -> Result<(), LogError> {
        let shared = &self.shared;
        if *shared.synced.borrow() >= seq {
            return Ok(());
        }
        shared.wanted.fetch_max(seq, Ordering::AcqRel);
        shared.wake_syncer();
        wait_for(&shared.synced, seq).await
    }

    /// Waits until the record with sequence `seq` is ingested, so queries
    /// see it; at most a bounded time.
    async fn visible(&self, seq: u64) -> Result<(), LogError> {
        let shared = &self.shared;
        if *shared.visible.borrow() >= seq {
            return Ok(());
        }
        shared.wanted_visible.fetch_max(seq, Ordering::AcqRel);
        shared.wanted.fetch_max(seq, Ordering::AcqRel);
        shared.wake_syncer();
        // Already synced: the syncer will not pass by to wake the ingester.
        shared.wake_ingest_now();
        wait_for(&shared.visible, seq).await
    }

    /// Appends `record` and returns once it is kept as the log's durability
    /// mode promises: written (process) or fsynced (strict).
    pub async fn record(&self, record: UsageRecord) -> Result<u64, LogError> {
        let seq = self.append(record.as_priced())?;
        if self.shared.config.durability == Durability::Strict {
            self.durable(seq).await?;
        }
        Ok(seq)
    }

    /// Waits until every record appended so far is queryable.
    pub async fn catch_up(&self) -> Result<u64, LogError> {
        let written = self.shared.stats.written.load(Ordering::Acquire);
        self.visible(written).await?;
        Ok(written)
    }

    /// Stops the log: waits (at most `grace`) for announced invocations to
    /// append their records, then syncs and ingests everything and stops the
    /// log's threads. Blocks: call it from a blocking thread.
    pub fn close(&self, grace: Duration) {
        let shared = &self.shared;
        let deadline = Instant::now() + grace;
        while shared.pending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = shared.pending.load(Ordering::SeqCst);
        if left > 0 {
            tracing::error!(invocations = left, "shutting down with invocations that never recorded");
        }
        shared.closed.store(true, Ordering::Release);
        shared.wake_syncer();
        let threads = std::mem::take(&mut *shared.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for thread in threads {
            let _ = thread.join();
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

    /// Up to `limit` records matching `filter` with commit sequences after
    /// `after` and at most `upto`, in commit order: one page of an export.
    /// Without `upto`, everything appended before the call is made queryable
    /// first; with it, the caller did so ([`UsageLog::catch_up`] returns the
    /// `upto` to pass), once for all the pages of one export. A consumer that
    /// passes the last sequence it received as `after` gets every record
    /// exactly once.
    pub async fn page(
        &self,
        filter: &Filter,
        after: u64,
        upto: Option<u64>,
        limit: usize,
    ) -> Result<Vec<UsageRecord>, LogError> {
        if upto.is_none() {
            self.catch_up().await?;
        }
        let filter = filter.clone();
        self.read(move |conn| crate::database::page(conn, &filter, after, upto, limit))
            .await
    }

    /// Totals per tenant, function and UTC day.
    pub async fn summary(&self, filter: &Filter) -> Result<Vec<SummaryRow>, LogError> {
        self.catch_up().await?;
        let filter = filter.clone();
        self.read(move |conn| crate::database::summary(conn, &filter)).await
    }
}

#[async_trait]
impl UsageQueries for UsageLog {
    async fn catch_up(&self) -> Result<u64, LogError> {
        UsageLog::catch_up(self).await
    }

    async fn page(&self, filter: &Filter, after: u64, upto: u64, limit: usize) -> Result<Vec<UsageRecord>, LogError> {
        UsageLog::page(self, filter, after, Some(upto), limit).await
    }

    async fn summary(&self, filter: &Filter) -> Result<Vec<SummaryRow>, LogError> {
        UsageLog::summary(self, filter).await
    }
}

/// Waits (at most [`COMMIT_WAIT`]) until `watch` reaches `seq`.
async fn wait_for(watch: &watch::Sender<u64>, seq: u64) -> Result<(), LogError> {
    let mut reached = watch.subscribe();
    match tokio::time::timeout(COMMIT_WAIT, reached.wait_for(|top| *top >= seq)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(LogError::Closed),
        Err(_) => Err(LogError::Unavailable(format!(
            "the record was not kept within {} s",
            COMMIT_WAIT.as_secs()
        ))),
    }
}
