//! `usage.db`: the queryable side of the usage log, one SQLite table
//! (WAL) that the ingesters write synced records into ([`SqliteSink`]) and
//! exports and summaries read.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use crate::record::{Outcome, Usage, UsageRecord};
use crate::sink::Sink;

/// One table in commit order: the commit sequence is the rowid, so an
/// ingestion appends at the table's end and an export's page is a range of
/// it. The record id (UUIDv7, minted when the request arrived, so sorting
/// by time) has a unique index: time ranges are id ranges, and a record
/// ingested twice is kept once.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS usage (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
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
    price_version TEXT NOT NULL,
    compute_ns INTEGER NOT NULL DEFAULT 0,
    gpu_ns INTEGER NOT NULL DEFAULT 0,
    invocation_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 1,
    alias TEXT NOT NULL DEFAULT '',
    shadow INTEGER NOT NULL DEFAULT 0,
    inference_cache_hits INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS usage_id ON usage (id);";

/// Columns added to the table of earlier Hearths (clustered on the id),
/// with how to fill them in for the records already there: model compute
/// (until then only GPU time was recorded, in microseconds, as `gpu_us`,
/// which is still written) and asynchronous attempts. [`recluster`] then
/// moves their records into today's table.
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

pub(crate) const COLUMNS: &str = "id, tenant, function, version, started_at_us, ended_at_us, status, outcome, cold_start, \
     queue_us, memory_peak_bytes, guest_cpu_us, device, gpu_us, inference_calls, batched_calls, bytes_in, bytes_out, \
     billed_ms, cost_nanos, currency, price_version, seq, compute_ns, gpu_ns, invocation_id, attempt, alias, shadow, inference_cache_hits";

pub(crate) fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // The journal is what makes a record durable; the database is synced
    // (checkpointed) before a journal is dropped.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let earlier = conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage' AND sql LIKE '%WITHOUT ROWID%'")?
        .exists([])?;
    if earlier {
        migrate_seq(&conn)?;
        add_columns(&conn)?;
        recluster(&conn)?;
    }
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Moves the records of a table clustered on the id (made by an earlier
/// Hearth) into today's table, clustered on the commit sequence; once, in one
/// transaction, so a crash leaves either table whole.
fn recluster(conn: &Connection) -> rusqlite::Result<()> {
    let records: i64 = conn.query_row("SELECT count(*) FROM usage", [], |row| row.get(0))?;
    tracing::info!(
        records,
        "usage.db: moving records into commit order (once, after an upgrade)"
    );
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(&format!(
        "DROP INDEX IF EXISTS usage_seq;
         ALTER TABLE usage RENAME TO usage_by_id;
         {SCHEMA}
         INSERT INTO usage ({COLUMNS}) SELECT {COLUMNS} FROM usage_by_id ORDER BY seq;
         DROP TABLE usage_by_id;"
    ))?;
    tx.commit()
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

pub(crate) fn sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn row_u64(row: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(u64::try_from(row.get::<_, i64>(i)?).unwrap_or(0))
}

pub(crate) fn record_from_row(row: &Row<'_>) -> rusqlite::Result<UsageRecord> {
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

/// The real sink: `usage.db`.
#[derive(Debug)]
pub(crate) struct SqliteSink {
    pub(crate) path: PathBuf,
    pub(crate) conn: Option<Connection>,
}

/// Records per `INSERT` statement: one statement's fixed cost (a step, a
/// reset, a transaction check) is shared by these many rows.
const ROWS_PER_INSERT: usize = 32;

/// The number of [`COLUMNS`]: the values [`bind`] gives each row.
const COLUMN_COUNT: usize = {
    let (bytes, mut i, mut commas) = (COLUMNS.as_bytes(), 0, 0);
    while i < bytes.len() {
        if bytes[i] == b',' {
            commas += 1;
        }
        i += 1;
    }
    commas + 1
};

/// The `INSERT` of `rows` records.
fn insert_sql(rows: usize) -> String {
    let row = format!("({})", vec!["?"; COLUMN_COUNT].join(", "));
    format!(
        "INSERT OR IGNORE INTO usage ({COLUMNS}) VALUES {}",
        vec![row; rows].join(", ")
    )
}

/// The statements [`insert_batch`] uses, made once: of
/// [`ROWS_PER_INSERT`] rows, and of one.
static INSERT_MANY: LazyLock<String> = LazyLock::new(|| insert_sql(ROWS_PER_INSERT));
static INSERT_ONE: LazyLock<String> = LazyLock::new(|| insert_sql(1));

/// Binds `r` to the parameters of `insert` from `first` (1-based), in
/// [`COLUMNS`] order.
fn bind(insert: &mut rusqlite::Statement<'_>, first: usize, r: &UsageRecord) -> rusqlite::Result<()> {
    let u = &r.usage;
    let values: [&dyn rusqlite::ToSql; COLUMN_COUNT] = [
        &u.id,
        &u.tenant,
        &u.function,
        &u.version,
        &u.started_at_us,
        &u.ended_at_us,
        &u.status,
        &u.outcome.as_str(),
        &u.cold_start,
        &sql_u64(u.queue_us),
        &sql_u64(u.memory_peak_bytes),
        &sql_u64(u.guest_cpu_us),
        &u.device,
        &sql_u64(u.gpu_ns / 1000),
        &sql_u64(u.inference_calls),
        &sql_u64(u.batched_calls),
        &sql_u64(u.bytes_in),
        &sql_u64(u.bytes_out),
        &sql_u64(u.billed_ms()),
        &r.cost_nanos,
        &r.currency,
        &r.price_version,
        &sql_u64(r.seq),
        &sql_u64(u.compute_ns),
        &sql_u64(u.gpu_ns),
        &u.invocation_id,
        &u.attempt,
        &u.alias,
        &u.shadow,
        &sql_u64(u.inference_cache_hits),
    ];
    for (i, value) in values.into_iter().enumerate() {
        insert.raw_bind_parameter(first + i, value)?;
    }
    Ok(())
}

/// Writes `batch` in one transaction, [`ROWS_PER_INSERT`] rows per
/// statement.
fn insert_batch(conn: &mut Connection, batch: &[UsageRecord]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut chunks = batch.chunks_exact(ROWS_PER_INSERT);
        let mut insert = tx.prepare_cached(&INSERT_MANY)?;
        for chunk in &mut chunks {
            for (row, r) in chunk.iter().enumerate() {
                bind(&mut insert, 1 + row * COLUMN_COUNT, r)?;
            }
            insert.raw_execute()?;
        }
        let mut insert = tx.prepare_cached(&INSERT_ONE)?;
        for r in chunks.remainder() {
            bind(&mut insert, 1, r)?;
            insert.raw_execute()?;
        }
    }
    tx.commit()
}

impl Sink for SqliteSink {
    fn write(&mut self, batch: &[UsageRecord]) -> Result<(), String> {
        let conn = self.conn.as_mut().ok_or("the database is not open")?;
        insert_batch(conn, batch).map_err(|e| e.to_string())
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

    fn last_seq(&mut self) -> Result<u64, String> {
        let conn = self.conn.as_ref().ok_or("the database is not open")?;
        let last: Option<i64> = conn
            .query_row("SELECT max(seq) FROM usage", [], |row| row.get(0))
            .map_err(|e| e.to_string())?;
        Ok(last.map_or(0, |seq| u64::try_from(seq).unwrap_or(0)))
    }

    fn checkpoint(&mut self) -> Result<(), String> {
        let conn = self.conn.as_ref().ok_or("the database is not open")?;
        // Copies the WAL into the database and fsyncs it.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| e.to_string())
    }
}
