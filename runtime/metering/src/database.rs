//! `usage.db`: the queryable side of the usage log (SQLite, WAL), which the
//! ingesters write synced records into ([`SqliteSink`]) and exports and
//! summaries read ([`page`], [`summary`]).
//!
//! Records are kept in **pages**, not one row each: an ingestion writes its
//! records as one row of frames (the journal's own encoding, compressed:
//! see [`Codec`]), keyed by
//! the first commit sequence it holds, and adds them to **hourly totals**
//! per tenant, function, version, shadow flag and currency. An ingestion of
//! a thousand records is one row and a few upserts instead of a thousand
//! rows and a thousand index entries. An
//! export reads pages from its cursor on (a page is a range of the commit
//! sequence, and each knows the range of its records' start times, so a
//! time filter skips the pages outside it); a summary adds up the hours its
//! time range covers whole and reads the records of the hours at its edges.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use crate::frames::{Frames, decode, encode};
use crate::queries::{Filter, SummaryRow};
use crate::record::{Outcome, Usage, UsageRecord};
use crate::sink::{MAX_BATCH, Sink};

/// The pages and the hourly totals. `hour` is the start time's Unix hour;
/// a page's `min_started_us` and `max_started_us` bound its records' start
/// times (records commit in the order they end, so pages overlap a little).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS usage_pages (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    min_started_us INTEGER NOT NULL,
    max_started_us INTEGER NOT NULL,
    records BLOB NOT NULL,
    codec INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS usage_hours (
    tenant TEXT NOT NULL,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    shadow INTEGER NOT NULL,
    hour INTEGER NOT NULL,
    currency TEXT NOT NULL,
    invocations INTEGER NOT NULL,
    ran INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    cold_starts INTEGER NOT NULL,
    wall_us INTEGER NOT NULL,
    billed_ms INTEGER NOT NULL,
    guest_cpu_us INTEGER NOT NULL,
    compute_ns INTEGER NOT NULL,
    gpu_ns INTEGER NOT NULL,
    inference_calls INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL,
    PRIMARY KEY (tenant, function, version, shadow, hour, currency)
) WITHOUT ROWID;";

/// One hour, in microseconds.
const HOUR_US: i64 = 3_600_000_000;

/// How a page's `records` are stored (its `codec` column).
///
/// Pages are compressed to write less: every byte ingested is written
/// twice (the WAL, then the checkpoint into `usage.db`), beside the
/// journal's own. Records compress about 6× (their tenant, function,
/// alias, device and currency repeat from record to record, their ids and
/// times share prefixes), at level 1 for a fraction of a microsecond each,
/// on the idle-time ingester: a busy node writes half the bytes to its
/// disk it did, and keeps a sixth of them (docs/benchmarks.md, session 29;
/// its throughput did not change beyond the 2-core VM's noise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    /// The frames as they are (pages written before Hearth compressed them).
    Frames = 0,
    /// The frames, compressed as one zstd frame.
    Zstd = 1,
}

/// The zstd level pages are written at: the fastest of the standard
/// levels; higher ones gain a few per cent of size for twice the CPU.
const ZSTD_LEVEL: i32 = 1;

impl Codec {
    fn from_column(value: i64) -> rusqlite::Result<Codec> {
        match value {
            0 => Ok(Codec::Frames),
            1 => Ok(Codec::Zstd),
            other => Err(damaged(format!("unknown page codec {other}"))),
        }
    }
}

/// Compresses pages; one per writer, so its buffers are reused.
pub(crate) struct PageCompressor(zstd::bulk::Compressor<'static>);

impl PageCompressor {
    pub(crate) fn new() -> rusqlite::Result<PageCompressor> {
        zstd::bulk::Compressor::new(ZSTD_LEVEL)
            .map(PageCompressor)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
    }

    fn compress(&mut self, bytes: &[u8]) -> rusqlite::Result<Vec<u8>> {
        self.0
            .compress(bytes)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
    }
}

impl std::fmt::Debug for PageCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageCompressor")
    }
}

/// Columns added to the one-row-per-record table of earlier Hearths, with
/// how to fill them in for the records already there: model compute (until
/// then only GPU time was recorded, in microseconds, as `gpu_us`) and
/// asynchronous attempts. [`into_pages`] then moves the records into pages.
const ADDED_COLUMNS: [(&str, &str); 7] = [
    (
        "compute_ns INTEGER NOT NULL DEFAULT 0",
        "UPDATE usage SET compute_ns = gpu_us * 1000",
    ),
    (
        "gpu_ns INTEGER NOT NULL DEFAULT 0",
        "UPDATE usage SET gpu_ns = gpu_us * 1000",
    ),
    ("invocation_id TEXT", ""),
    ("attempt INTEGER NOT NULL DEFAULT 1", ""),
    ("alias TEXT NOT NULL DEFAULT ''", ""),
    ("shadow INTEGER NOT NULL DEFAULT 0", ""),
    ("inference_cache_hits INTEGER NOT NULL DEFAULT 0", ""),
];

/// The columns of the earlier table, as [`record_from_row`] reads them.
const OLD_COLUMNS: &str = "id, tenant, function, version, started_at_us, ended_at_us, status, outcome, cold_start, \
     queue_us, memory_peak_bytes, guest_cpu_us, device, gpu_us, inference_calls, batched_calls, bytes_in, bytes_out, \
     billed_ms, cost_nanos, currency, price_version, seq, compute_ns, gpu_ns, invocation_id, attempt, alias, shadow, inference_cache_hits";

pub(crate) fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // The journal is what makes a record durable; the database is synced
    // (checkpointed) before a journal is dropped.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    add_codec_column(&conn)?;
    let earlier = conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'")?
        .exists([])?;
    if earlier {
        migrate_seq(&conn)?;
        add_columns(&conn)?;
        into_pages(&conn)?;
    }
    Ok(conn)
}

/// Moves the records of the one-row-per-record table of an earlier Hearth
/// into pages and hourly totals, in commit order; once, in one transaction,
/// so a crash leaves either form whole.
fn into_pages(conn: &Connection) -> rusqlite::Result<()> {
    let records: i64 = conn.query_row("SELECT count(*) FROM usage", [], |row| row.get(0))?;
    tracing::info!(records, "usage.db: moving records into pages (once, after an upgrade)");
    let tx = conn.unchecked_transaction()?;
    {
        let mut select = tx.prepare(&format!("SELECT {OLD_COLUMNS} FROM usage ORDER BY seq"))?;
        let mut rows = select.query([])?;
        let (mut frames, mut n) = (Vec::new(), 0);
        let mut compressor = PageCompressor::new()?;
        while let Some(row) = rows.next()? {
            encode(record_from_row(row)?.as_priced(), &mut frames)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            n += 1;
            if n == MAX_BATCH {
                write_page(&tx, Frames(&frames), &mut compressor)?;
                n = 0;
                frames.clear();
            }
        }
        write_page(&tx, Frames(&frames), &mut compressor)?;
    }
    tx.execute_batch("DROP TABLE usage")?;
    tx.commit()
}

/// Gives the pages of a Hearth that did not compress them their `codec`
/// column (0: [`Codec::Frames`] for every page already there).
fn add_codec_column(conn: &Connection) -> rusqlite::Result<()> {
    let present = conn
        .prepare("SELECT 1 FROM pragma_table_info('usage_pages') WHERE name = 'codec'")?
        .exists([])?;
    if !present {
        conn.execute_batch("ALTER TABLE usage_pages ADD COLUMN codec INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

/// Gives a table made by an earlier Hearth the [`ADDED_COLUMNS`] it lacks.
fn add_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (column, fill) in ADDED_COLUMNS {
        let name = column.split(' ').next().unwrap_or_default();
        let present = conn
            .prepare("SELECT 1 FROM pragma_table_info('usage') WHERE name = ?1")?
            .exists([name])?;
        if !present {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(&format!("ALTER TABLE usage ADD COLUMN {column}; {fill};"))?;
            tx.commit()?;
        }
    }
    Ok(())
}

/// Gives a table made before commit sequences its `seq` column, numbering
/// existing records in id (arrival) order.
fn migrate_seq(conn: &Connection) -> rusqlite::Result<()> {
    let has_seq: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('usage') WHERE name = 'seq'")?
        .exists([])?;
    if !has_seq {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch("ALTER TABLE usage ADD COLUMN seq INTEGER")?;
        let ids: Vec<String> = tx
            .prepare("SELECT id FROM usage ORDER BY id")?
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut number = tx.prepare("UPDATE usage SET seq = ?1 WHERE id = ?2")?;
        for (seq, id) in (1i64..).zip(&ids) {
            number.execute(params![seq, id])?;
        }
        drop(number);
        tx.commit()?;
    }
    Ok(())
}

fn sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn row_u64(row: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(u64::try_from(row.get::<_, i64>(i)?).unwrap_or(0))
}

/// A record of the earlier table, read in [`OLD_COLUMNS`] order.
fn record_from_row(row: &Row<'_>) -> rusqlite::Result<UsageRecord> {
    let outcome: String = row.get(7)?;
    Ok(UsageRecord {
        usage: Usage {
            id: row.get(0)?,
            invocation_id: row.get(25)?,
            attempt: row.get(26)?,
            tenant: row.get(1)?,
            function: row.get(2)?,
            version: row.get(3)?,
            alias: row.get(27)?,
            shadow: row.get(28)?,
            started_at_us: row.get(4)?,
            ended_at_us: row.get(5)?,
            status: row.get(6)?,
            outcome: Outcome::parse(&outcome).unwrap_or(Outcome::InternalError),
            cold_start: row.get(8)?,
            queue_us: row_u64(row, 9)?,
            memory_peak_bytes: row_u64(row, 10)?,
            guest_cpu_us: row_u64(row, 11)?,
            device: row.get(12)?,
            compute_ns: row_u64(row, 23)?,
            gpu_ns: row_u64(row, 24)?,
            inference_calls: row_u64(row, 14)?,
            batched_calls: row_u64(row, 15)?,
            inference_cache_hits: row_u64(row, 29)?,
            bytes_in: row_u64(row, 16)?,
            bytes_out: row_u64(row, 17)?,
        },
        cost_nanos: row.get(19)?,
        currency: row.get(20)?,
        price_version: row.get(21)?,
        seq: row
            .get::<_, Option<i64>>(22)?
            .map_or(0, |seq| u64::try_from(seq).unwrap_or(0)),
    })
}

/// What a summary adds up, per record: the columns of `usage_hours` after
/// its key, in [`TOTALS`] order.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Totals([i64; TOTALS.len()]);

/// The summed columns of `usage_hours`.
const TOTALS: [&str; 14] = [
    "invocations",
    "ran",
    "rejected",
    "errors",
    "cold_starts",
    "wall_us",
    "billed_ms",
    "guest_cpu_us",
    "compute_ns",
    "gpu_ns",
    "inference_calls",
    "bytes_in",
    "bytes_out",
    "cost_nanos",
];

impl Totals {
    /// One record's contribution. A record "ran" unless it was refused
    /// (rejected, or a bad request); an error is a 5xx of one that ran.
    fn of<S>(r: &UsageRecord<S>) -> Totals {
        let u = &r.usage;
        let ran = !matches!(u.outcome, Outcome::Rejected | Outcome::BadRequest);
        Totals([
            1,
            i64::from(ran),
            i64::from(u.outcome == Outcome::Rejected),
            i64::from(ran && u.status >= 500),
            i64::from(u.cold_start),
            sql_u64(u.wall_us()),
            sql_u64(u.billed_ms()),
            sql_u64(u.guest_cpu_us),
            sql_u64(u.compute_ns),
            sql_u64(u.gpu_ns),
            sql_u64(u.inference_calls),
            sql_u64(u.bytes_in),
            sql_u64(u.bytes_out),
            r.cost_nanos,
        ])
    }

    fn add(&mut self, other: &Totals) {
        for (sum, v) in self.0.iter_mut().zip(other.0) {
            *sum = sum.saturating_add(v);
        }
    }

    /// The sum of `column` (one of [`TOTALS`]).
    fn sum(&self, column: &str) -> i64 {
        TOTALS.iter().position(|c| *c == column).map_or(0, |i| self.0[i])
    }

    /// The sum of `column`, a count or an amount that is never negative.
    fn get(&self, column: &str) -> u64 {
        u64::try_from(self.sum(column)).unwrap_or(0)
    }
}

/// The key of an hourly total: tenant, function, version, shadow, hour,
/// currency.
type HourKey<'a> = (&'a str, &'a str, u32, bool, i64, &'a str);

/// Adds a batch's totals for one key to `usage_hours` (the key, then the
/// [`TOTALS`]); made once, as every ingestion uses it.
static ADD_TO_HOURS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO usage_hours (tenant, function, version, shadow, hour, currency, {})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, {})
         ON CONFLICT DO UPDATE SET {}",
        TOTALS.join(", "),
        (7..7 + TOTALS.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", "),
        TOTALS.map(|c| format!("{c} = {c} + excluded.{c}")).join(", "),
    )
});

/// Writes `frames` (records in commit order) as one page, compressed, and
/// adds them to the hourly totals, inside the caller's transaction.
fn write_page(conn: &Connection, frames: Frames<'_>, compressor: &mut PageCompressor) -> rusqlite::Result<()> {
    let mut hours: HashMap<HourKey<'_>, Totals> = HashMap::new();
    // Most records of a batch share their key: the last one's totals are
    // summed aside, and hashed into `hours` only when the key changes.
    let mut current: Option<(HourKey<'_>, Totals)> = None;
    let (mut first, mut last) = (None, 0);
    let (mut min_started, mut max_started) = (i64::MAX, i64::MIN);
    for r in frames.records() {
        let r = r.map_err(damaged)?;
        let u = &r.usage;
        first.get_or_insert(r.seq);
        last = r.seq;
        min_started = min_started.min(u.started_at_us);
        max_started = max_started.max(u.started_at_us);
        let key = (
            u.tenant,
            u.function,
            u.version,
            u.shadow,
            u.started_at_us.div_euclid(HOUR_US),
            r.currency,
        );
        match &mut current {
            Some((current_key, totals)) if *current_key == key => totals.add(&Totals::of(&r)),
            _ => {
                if let Some((key, totals)) = current.replace((key, Totals::of(&r))) {
                    hours.entry(key).or_default().add(&totals);
                }
            }
        }
    }
    let Some(first) = first else {
        return Ok(());
    };
    if let Some((key, totals)) = current {
        hours.entry(key).or_default().add(&totals);
    }
    conn.prepare_cached(
        "INSERT INTO usage_pages (first_seq, last_seq, min_started_us, max_started_us, records, codec)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        sql_u64(first),
        sql_u64(last),
        min_started,
        max_started,
        compressor.compress(frames.bytes())?,
        Codec::Zstd as i64
    ])?;
    let mut upsert = conn.prepare_cached(&ADD_TO_HOURS)?;
    for ((tenant, function, version, shadow, hour, currency), totals) in hours {
        let key: [&dyn rusqlite::ToSql; 6] = [&tenant, &function, &version, &shadow, &hour, &currency];
        for (i, value) in key.into_iter().enumerate() {
            upsert.raw_bind_parameter(i + 1, value)?;
        }
        for (i, value) in totals.0.iter().enumerate() {
            upsert.raw_bind_parameter(7 + i, value)?;
        }
        upsert.raw_execute()?;
    }
    Ok(())
}

/// The highest commit sequence stored (0 for none): the last page's.
fn last_seq(conn: &Connection) -> rusqlite::Result<u64> {
    let last: Option<i64> = conn
        .query_row(
            "SELECT last_seq FROM usage_pages ORDER BY first_seq DESC LIMIT 1",
            [],
            |row| row.get(0),
        )
        .optional()?;
    Ok(last.map_or(0, |seq| u64::try_from(seq).unwrap_or(0)))
}

fn damaged(error: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, error.into())
}

/// Calls `each` with every stored record matching `filter` with a sequence
/// after `after` and at most `upto`, in commit order, until it returns
/// false. Reads only the pages that can hold one.
fn scan(
    conn: &Connection,
    filter: &Filter,
    after: u64,
    upto: Option<u64>,
    mut each: impl FnMut(UsageRecord) -> bool,
) -> rusqlite::Result<()> {
    // From the page that holds `after + 1` (the last one starting at or
    // before it), along the primary key.
    let mut pages = conn.prepare_cached(
        "SELECT records, codec FROM usage_pages
         WHERE first_seq >= coalesce((SELECT max(first_seq) FROM usage_pages WHERE first_seq <= ?1 + 1), 0)
           AND last_seq > ?1 AND (?2 IS NULL OR first_seq <= ?2)
           AND (?3 IS NULL OR max_started_us >= ?3) AND (?4 IS NULL OR min_started_us < ?4)
         ORDER BY first_seq",
    )?;
    let upto = upto.unwrap_or(u64::MAX);
    let mut rows = pages.query(params![
        sql_u64(after),
        (upto != u64::MAX).then(|| sql_u64(upto)),
        filter.since_us,
        filter.until_us
    ])?;
    let mut decompressed = Vec::new();
    while let Some(row) = rows.next()? {
        let stored = row.get_ref(0)?.as_blob()?;
        let mut frames = match Codec::from_column(row.get(1)?)? {
            Codec::Frames => stored,
            Codec::Zstd => {
                decompressed.clear();
                zstd::stream::copy_decode(stored, &mut decompressed).map_err(|e| damaged(e.to_string()))?;
                &decompressed[..]
            }
        };
        while let Some(record) = decode(&mut frames) {
            let record = record.map_err(damaged)?;
            if record.seq > upto {
                return Ok(());
            }
            let u = &record.usage;
            if record.seq > after && filter.admits(&u.tenant, &u.function, u.started_at_us) && !each(record) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Up to `limit` records matching `filter` with commit sequences after
/// `after` and at most `upto`, in commit order: one page of an export.
pub(crate) fn page(
    conn: &Connection,
    filter: &Filter,
    after: u64,
    upto: Option<u64>,
    limit: usize,
) -> rusqlite::Result<Vec<UsageRecord>> {
    let mut records = Vec::new();
    if limit > 0 {
        scan(conn, filter, after, upto, |record| {
            records.push(record);
            records.len() < limit
        })?;
    }
    Ok(records)
}

/// The key of a summary row, in its order: day, tenant, function, version,
/// shadow.
type DayKey = (String, String, String, u32, bool);

/// Totals per tenant, function, version, shadow flag and UTC day of the
/// records matching `filter`: the hours its time range covers whole from
/// `usage_hours`, the hours at its edges from the records.
pub(crate) fn summary(conn: &Connection, filter: &Filter) -> rusqlite::Result<Vec<SummaryRow>> {
    // One snapshot for the hours and the edges (an ingestion may commit
    // between the two reads otherwise; they cover disjoint times, so that
    // would only make the summary a moment newer at its edges).
    let snapshot = conn.unchecked_transaction()?;
    let conn: &Connection = &snapshot;
    let mut days: BTreeMap<DayKey, (Totals, String)> = BTreeMap::new();
    let mut add = |key: DayKey, totals: &Totals, currency: &str| {
        let (sum, max_currency) = days.entry(key).or_default();
        sum.add(totals);
        if currency > max_currency.as_str() {
            currency.clone_into(max_currency);
        }
    };
    // Hours `first_whole..end_whole` lie inside the range.
    let first_whole = filter.since_us.map_or(i64::MIN, |since| {
        since.saturating_neg().div_euclid(HOUR_US).saturating_neg()
    });
    let end_whole = filter.until_us.map_or(i64::MAX, |until| until.div_euclid(HOUR_US));
    let mut edges = Vec::new();
    if first_whole < end_whole {
        let mut hours = conn.prepare_cached(&format!(
            "SELECT tenant, function, version, shadow, hour, currency, {} FROM usage_hours
             WHERE hour >= ?1 AND hour < ?2 AND (?3 IS NULL OR tenant = ?3) AND (?4 IS NULL OR function = ?4)",
            TOTALS.join(", ")
        ))?;
        let mut rows = hours.query(params![first_whole, end_whole, filter.tenant, filter.function])?;
        while let Some(row) = rows.next()? {
            let mut totals = Totals::default();
            for (i, sum) in totals.0.iter_mut().enumerate() {
                *sum = row.get(6 + i)?;
            }
            let currency: String = row.get(5)?;
            add(
                (day(row.get(4)?), row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?),
                &totals,
                &currency,
            );
        }
        if let Some(since) = filter.since_us {
            edges.push((since, first_whole.saturating_mul(HOUR_US)));
        }
        if let Some(until) = filter.until_us {
            edges.push((end_whole.saturating_mul(HOUR_US), until));
        }
    } else if let (Some(since), Some(until)) = (filter.since_us, filter.until_us) {
        edges.push((since, until));
    }
    for (since, until) in edges.into_iter().filter(|(since, until)| since < until) {
        let edge = Filter {
            since_us: Some(since),
            until_us: Some(until),
            ..filter.clone()
        };
        scan(conn, &edge, 0, None, |r| {
            add(day_key(&r), &Totals::of(&r), &r.currency);
            true
        })?;
    }
    Ok(days
        .into_iter()
        .map(|(key, (totals, currency))| summary_row(key, &totals, currency))
        .collect())
}

/// The summary row a record counts in.
fn day_key(r: &UsageRecord) -> DayKey {
    let u = &r.usage;
    (
        day(u.started_at_us.div_euclid(HOUR_US)),
        u.tenant.clone(),
        u.function.clone(),
        u.version,
        u.shadow,
    )
}

/// The summary row of `key` with `t`, its totals.
fn summary_row((day, tenant, function, version, shadow): DayKey, t: &Totals, currency: String) -> SummaryRow {
    SummaryRow {
        tenant,
        function,
        version,
        shadow,
        errors: t.get("errors"),
        mean_wall_ms: t.get("wall_us") as f64 / t.get("invocations").max(1) as f64 / 1e3,
        day,
        invocations: t.get("invocations"),
        ran: t.get("ran"),
        rejected: t.get("rejected"),
        cold_starts: t.get("cold_starts"),
        billed_ms: t.get("billed_ms"),
        guest_cpu_us: t.get("guest_cpu_us"),
        compute_ms: t.get("compute_ns") as f64 / 1e6,
        gpu_ms: t.get("gpu_ns") as f64 / 1e6,
        inference_calls: t.get("inference_calls"),
        bytes_in: t.get("bytes_in"),
        bytes_out: t.get("bytes_out"),
        cost: crate::record::format_nanos(t.sum("cost_nanos")),
        currency,
    }
}

/// The UTC day (`YYYY-MM-DD`) of Unix hour `hour`.
fn day(hour: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(hour.saturating_mul(3600))
        .map(|t| t.date().to_string())
        .unwrap_or_default()
}

/// Writes `frames` as a page in one transaction; records already stored
/// (a batch written again after a failure) are skipped.
fn write_batch(conn: &mut Connection, frames: Frames<'_>, compressor: &mut PageCompressor) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let stored = last_seq(&tx)?;
    write_page(&tx, frames.after(stored).map_err(damaged)?, compressor)?;
    tx.commit()
}

/// The real sink: `usage.db`.
#[derive(Debug)]
pub(crate) struct SqliteSink {
    pub(crate) path: PathBuf,
    pub(crate) conn: Option<Connection>,
    pub(crate) compressor: PageCompressor,
}

impl Sink for SqliteSink {
    fn write(&mut self, frames: Frames<'_>) -> Result<(), String> {
        let conn = self.conn.as_mut().ok_or("the database is not open")?;
        write_batch(conn, frames, &mut self.compressor).map_err(|e| e.to_string())
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

    fn last_seq(&mut self) -> Result<u64, String> {
        let conn = self.conn.as_ref().ok_or("the database is not open")?;
        last_seq(conn).map_err(|e| e.to_string())
    }

    fn checkpoint(&mut self) -> Result<(), String> {
        let conn = self.conn.as_ref().ok_or("the database is not open")?;
        // Copies the WAL into the database and fsyncs it.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` records over three days and two tenants, a few functions and
    /// versions, every outcome; sequences from `first`.
    fn records(first: u64, n: u64) -> Vec<UsageRecord> {
        let table = crate::PriceTable::default();
        (first..first + n)
            .map(|seq| {
                let mut usage = crate::tests::usage(&format!("id-{seq}"), Outcome::ALL[seq as usize % 9]);
                usage.tenant = ["acme", "umbrella"][seq as usize % 2].into();
                usage.function = ["echo", "ocr", "tts"][seq as usize % 3].into();
                usage.version = 1 + (seq % 2) as u32;
                usage.shadow = seq % 7 == 0;
                usage.status = [200, 503, 429, 500][seq as usize % 4];
                // Spread over three days, 17 minutes apart, out of order a
                // little (records commit as they end).
                let step = i64::try_from(seq).unwrap_or(0) * 17 * 60_000_000;
                usage.started_at_us = 1_764_000_000_000_000 + step - (seq % 3) as i64 * 400_000_000;
                usage.ended_at_us = usage.started_at_us + (seq % 5) as i64 * 1_000_000;
                usage.compute_ns = seq * 1000;
                UsageRecord {
                    seq,
                    ..table.price(usage)
                }
            })
            .collect()
    }

    /// `records` as the log hands them over.
    fn frames(records: &[UsageRecord]) -> Vec<u8> {
        crate::frames::encode_all(records).expect("encode")
    }

    fn database() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = open_connection(&dir.path().join("usage.db")).expect("open");
        (dir, conn)
    }

    #[test]
    fn a_batch_written_again_is_kept_once() {
        let (_dir, mut conn) = database();
        let all = records(1, 8);
        let mut compressor = PageCompressor::new().expect("compressor");
        write_batch(&mut conn, Frames(&frames(&all[..3])), &mut compressor).expect("first");
        // After a failure the ingester writes its group again, and recovery
        // may offer what the database already has.
        write_batch(&mut conn, Frames(&frames(&all[..3])), &mut compressor).expect("again");
        write_batch(&mut conn, Frames(&frames(&all)), &mut compressor).expect("overlapping");
        let read = page(&conn, &Filter::default(), 0, None, 100).expect("page");
        assert_eq!(read, all);
        let invocations: u64 = summary(&conn, &Filter::default())
            .expect("summary")
            .iter()
            .map(|row| row.invocations)
            .sum();
        assert_eq!(invocations, 8);
    }

    #[test]
    fn pages_are_stored_compressed_and_read_back_whole() {
        let (_dir, mut conn) = database();
        let all = records(1, 1000);
        let raw = frames(&all);
        let mut compressor = PageCompressor::new().expect("compressor");
        write_batch(&mut conn, Frames(&raw), &mut compressor).expect("write");
        let (stored, codec): (i64, i64) = conn
            .query_row("SELECT sum(length(records)), max(codec) FROM usage_pages", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .expect("stored");
        assert_eq!(codec, Codec::Zstd as i64);
        // These records vary more than a node's do (three functions, two
        // tenants, every outcome), so they compress less than the ~6× seen
        // under load.
        assert!(
            stored * 3 < i64::try_from(raw.len()).expect("size"),
            "{stored} bytes stored for {} of frames",
            raw.len()
        );
        assert_eq!(page(&conn, &Filter::default(), 0, None, 2000).expect("page"), all);
    }

    #[test]
    fn pages_written_before_compression_still_read_beside_compressed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.db");
        let all = records(1, 100);
        {
            // usage.db as the Hearth before compression left it: its schema,
            // one page of frames as they are.
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(&SCHEMA.replace(",\n    codec INTEGER NOT NULL DEFAULT 0", ""))
                .expect("old schema");
            conn.execute(
                "INSERT INTO usage_pages (first_seq, last_seq, min_started_us, max_started_us, records)
                 VALUES (1, 50, 0, 0, ?1)",
                [frames(&all[..50])],
            )
            .expect("old page");
        }
        let mut conn = open_connection(&path).expect("reopen");
        let mut compressor = PageCompressor::new().expect("compressor");
        write_batch(&mut conn, Frames(&frames(&all)), &mut compressor).expect("write");
        let codecs: Vec<i64> = conn
            .prepare("SELECT codec FROM usage_pages ORDER BY first_seq")
            .expect("prepare")
            .query_map([], |row| row.get(0))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("codecs");
        assert_eq!(codecs, [Codec::Frames as i64, Codec::Zstd as i64]);
        assert_eq!(page(&conn, &Filter::default(), 0, None, 200).expect("page"), all);
    }

    /// What [`summary`] must answer, added up from the records themselves.
    fn brute_force(all: &[UsageRecord], filter: &Filter) -> Vec<SummaryRow> {
        let mut days: BTreeMap<DayKey, (Totals, String)> = BTreeMap::new();
        for r in all {
            let u = &r.usage;
            if filter.admits(&u.tenant, &u.function, u.started_at_us) {
                let (sum, currency) = days.entry(day_key(r)).or_default();
                sum.add(&Totals::of(r));
                currency.clone_from(&r.currency);
            }
        }
        days.into_iter()
            .map(|(key, (totals, currency))| summary_row(key, &totals, currency))
            .collect()
    }

    #[test]
    fn summaries_and_pages_agree_with_the_records_for_any_range() {
        let (_dir, mut conn) = database();
        let all = records(1, 250);
        let mut compressor = PageCompressor::new().expect("compressor");
        for batch in all.chunks(37) {
            write_batch(&mut conn, Frames(&frames(batch)), &mut compressor).expect("write");
        }
        let t0 = all[0].usage.started_at_us;
        let mut filters = vec![Filter::default()];
        // Ranges on and off the hour, within one hour, across days, empty.
        for (since, until) in [
            (Some(t0), None),
            (None, Some(t0 + 20 * HOUR_US + 1)),
            (Some(t0 + 3 * HOUR_US + 7), Some(t0 + 40 * HOUR_US - 9)),
            (Some(t0 + 5 * HOUR_US + 1), Some(t0 + 5 * HOUR_US + 1_800_000_000)),
            (
                Some(t0.div_euclid(HOUR_US) * HOUR_US + 2 * HOUR_US),
                Some(t0.div_euclid(HOUR_US) * HOUR_US + 30 * HOUR_US),
            ),
            (Some(t0 + 10 * HOUR_US), Some(t0 + 10 * HOUR_US)),
        ] {
            filters.push(Filter {
                since_us: since,
                until_us: until,
                ..Filter::default()
            });
            filters.push(Filter {
                tenant: Some("umbrella".into()),
                function: Some("ocr".into()),
                since_us: since,
                until_us: until,
            });
        }
        for filter in &filters {
            let expected = brute_force(&all, filter);
            assert_eq!(summary(&conn, filter).expect("summary"), expected, "{filter:?}");
            let matching: Vec<&UsageRecord> = all
                .iter()
                .filter(|r| filter.admits(&r.usage.tenant, &r.usage.function, r.usage.started_at_us))
                .collect();
            let read = page(&conn, filter, 0, None, 1000).expect("page");
            assert_eq!(read.iter().collect::<Vec<_>>(), matching, "{filter:?}");
            // Paging from any cursor, up to any bound, in steps of 7.
            let (after, upto) = (40, 200);
            let mut cursor = after;
            let mut paged = Vec::new();
            loop {
                let step = page(&conn, filter, cursor, Some(upto), 7).expect("page");
                let Some(last) = step.last() else { break };
                cursor = last.seq;
                paged.extend(step);
            }
            let expected: Vec<&UsageRecord> = matching
                .into_iter()
                .filter(|r| r.seq > after && r.seq <= upto)
                .collect();
            assert_eq!(paged.iter().collect::<Vec<_>>(), expected, "{filter:?}");
        }
        assert!(
            filters.iter().any(|f| !summary(&conn, f).expect("summary").is_empty()),
            "the ranges hold records"
        );
    }
}
