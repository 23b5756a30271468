//! [`Ledger`]: the `hearth_usage` table (made by the store's migrations)
//! and the statements that write and read it.

use deadpool_postgres::Pool;
use hearth_metering::{Filter, Outcome, SummaryRow, Usage, UsageRecord, format_nanos};
use tokio_postgres::Row;

use crate::LedgerError;

/// The ledger's columns, as [`record_from_row`] reads them.
const COLUMNS: &str = "seq, id, tenant, function, version, started_at_us, ended_at_us, status, outcome, cold_start, \
     queue_us, memory_peak_bytes, guest_cpu_us, device, compute_ns, gpu_ns, inference_calls, batched_calls, \
     bytes_in, bytes_out, cost_nanos, currency, price_version, invocation_id, attempt, alias, shadow, inference_cache_hits";

/// One batch in one statement: a column per array, each record numbered
/// after the ledger's head by its place in the batch. A record the ledger
/// already has (shipped before a crash lost the shipper's cursor) is
/// skipped, leaving a gap in the sequence, which consumers never notice.
const INSERT: &str = "INSERT INTO hearth_usage (seq, node, id, tenant, function, version, started_at_us, ended_at_us,
        status, outcome, cold_start, queue_us, memory_peak_bytes, guest_cpu_us, device, compute_ns, gpu_ns,
        inference_calls, batched_calls, bytes_in, bytes_out, billed_ms, cost_nanos, currency, price_version,
        invocation_id, attempt, alias, shadow, inference_cache_hits)
    SELECT $1 + r.n, $2, r.id, r.tenant, r.function, r.version, r.started_at_us, r.ended_at_us, r.status, r.outcome,
        r.cold_start, r.queue_us, r.memory_peak_bytes, r.guest_cpu_us, r.device, r.compute_ns, r.gpu_ns,
        r.inference_calls, r.batched_calls, r.bytes_in, r.bytes_out, r.billed_ms, r.cost_nanos, r.currency,
        r.price_version, r.invocation_id, r.attempt, r.alias, r.shadow, r.inference_cache_hits
    FROM unnest($3::text[], $4::text[], $5::text[], $6::int[], $7::bigint[], $8::bigint[], $9::int[], $10::text[],
        $11::bool[], $12::bigint[], $13::bigint[], $14::bigint[], $15::text[], $16::bigint[], $17::bigint[],
        $18::bigint[], $19::bigint[], $20::bigint[], $21::bigint[], $22::bigint[], $23::bigint[], $24::text[],
        $25::text[], $26::text[], $27::int[], $28::text[], $29::bool[], $30::bigint[])
        WITH ORDINALITY AS r(id, tenant, function, version, started_at_us, ended_at_us, status, outcome, cold_start,
            queue_us, memory_peak_bytes, guest_cpu_us, device, compute_ns, gpu_ns, inference_calls, batched_calls,
            bytes_in, bytes_out, billed_ms, cost_nanos, currency, price_version, invocation_id, attempt, alias, shadow, inference_cache_hits, n)
    ON CONFLICT (id) DO NOTHING";

/// The fleet's usage ledger in the cluster's PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: Pool,
}

impl Ledger {
    /// The ledger in the database `pool` connects to (the store's, whose
    /// migrations made the tables).
    pub fn new(pool: Pool) -> Ledger {
        Ledger { pool }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        Ok(self.pool.get().await?)
    }

    /// Appends `batch` (shipped by `node`) in one transaction, numbering
    /// its records after the ledger's head while holding the head's row
    /// lock: a batch's sequences are visible only once every smaller one
    /// is. Returns how many records were new.
    pub async fn append(&self, node: &str, batch: &[UsageRecord]) -> Result<u64, LedgerError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let columns = Columns::of(batch);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let head: i64 = tx
            .query_one("SELECT seq FROM hearth_usage_head FOR UPDATE", &[])
            .await?
            .try_get(0)?;
        let c = &columns;
        let inserted = tx
            .execute(
                INSERT,
                &[
                    &head,
                    &node,
                    &c.id,
                    &c.tenant,
                    &c.function,
                    &c.version,
                    &c.started_at_us,
                    &c.ended_at_us,
                    &c.status,
                    &c.outcome,
                    &c.cold_start,
                    &c.queue_us,
                    &c.memory_peak_bytes,
                    &c.guest_cpu_us,
                    &c.device,
                    &c.compute_ns,
                    &c.gpu_ns,
                    &c.inference_calls,
                    &c.batched_calls,
                    &c.bytes_in,
                    &c.bytes_out,
                    &c.billed_ms,
                    &c.cost_nanos,
                    &c.currency,
                    &c.price_version,
                    &c.invocation_id,
                    &c.attempt,
                    &c.alias,
                    &c.shadow,
                    &c.inference_cache_hits,
                ],
            )
            .await?;
        let next = head + i64::try_from(batch.len()).unwrap_or(i64::MAX);
        tx.execute("UPDATE hearth_usage_head SET seq = $1", &[&next]).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// The last sequence given: every record up to it is visible.
    pub async fn head(&self) -> Result<u64, LedgerError> {
        let head: i64 = self
            .client()
            .await?
            .query_one("SELECT seq FROM hearth_usage_head", &[])
            .await?
            .try_get(0)?;
        Ok(unsigned(head))
    }

    /// Up to `limit` records matching `filter` with sequences in
    /// `(after, upto]`, in ledger order.
    pub async fn page(
        &self,
        filter: &Filter,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<UsageRecord>, LedgerError> {
        let (after, upto, limit) = (signed(after), signed(upto), signed(limit as u64));
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM hearth_usage
                     WHERE seq > $1 AND seq <= $2
                       AND ($3::text IS NULL OR tenant = $3) AND ($4::text IS NULL OR function = $4)
                       AND ($5::bigint IS NULL OR started_at_us >= $5) AND ($6::bigint IS NULL OR started_at_us < $6)
                     ORDER BY seq LIMIT $7"
                ),
                &[
                    &after,
                    &upto,
                    &filter.tenant,
                    &filter.function,
                    &filter.since_us,
                    &filter.until_us,
                    &limit,
                ],
            )
            .await?;
        rows.iter().map(record_from_row).collect()
    }

    /// Totals per tenant, function and UTC day, as
    /// [`hearth_metering::UsageLog::summary`] gives them on one node.
    pub async fn summary(&self, filter: &Filter) -> Result<Vec<SummaryRow>, LedgerError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT tenant, function,
                        to_char(to_timestamp(started_at_us / 1000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day,
                        count(*), count(*) FILTER (WHERE outcome NOT IN ('rejected', 'bad_request')),
                        count(*) FILTER (WHERE outcome = 'rejected'), count(*) FILTER (WHERE cold_start),
                        sum(billed_ms)::bigint, sum(guest_cpu_us)::bigint, sum(gpu_ns)::bigint,
                        sum(inference_calls)::bigint, sum(bytes_in)::bigint, sum(bytes_out)::bigint,
                        sum(cost_nanos)::bigint, max(currency), sum(compute_ns)::bigint,
                        version, shadow,
                        count(*) FILTER (WHERE status >= 500 AND outcome NOT IN ('rejected', 'bad_request')),
                        avg(ended_at_us - started_at_us)::float8
                 FROM hearth_usage
                 WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR function = $2)
                   AND ($3::bigint IS NULL OR started_at_us >= $3) AND ($4::bigint IS NULL OR started_at_us < $4)
                 GROUP BY tenant, function, version, shadow, day ORDER BY day, tenant, function, version, shadow",
                &[&filter.tenant, &filter.function, &filter.since_us, &filter.until_us],
            )
            .await?;
        let count = |row: &Row, i| row.try_get::<_, i64>(i).map(unsigned);
        rows.iter()
            .map(|row| {
                Ok(SummaryRow {
                    tenant: row.try_get(0)?,
                    function: row.try_get(1)?,
                    version: u32::try_from(row.try_get::<_, i32>(16)?).unwrap_or(0),
                    shadow: row.try_get(17)?,
                    errors: count(row, 18)?,
                    mean_wall_ms: row.try_get::<_, f64>(19)? / 1e3,
                    day: row.try_get(2)?,
                    invocations: count(row, 3)?,
                    ran: count(row, 4)?,
                    rejected: count(row, 5)?,
                    cold_starts: count(row, 6)?,
                    billed_ms: count(row, 7)?,
                    guest_cpu_us: count(row, 8)?,
                    compute_ms: count(row, 15)? as f64 / 1e6,
                    gpu_ms: count(row, 9)? as f64 / 1e6,
                    inference_calls: count(row, 10)?,
                    bytes_in: count(row, 11)?,
                    bytes_out: count(row, 12)?,
                    cost: format_nanos(row.try_get(13)?),
                    currency: row.try_get(14)?,
                })
            })
            .collect()
    }
}

/// A batch turned inside out: one array per column, for `unnest`.
#[derive(Default)]
struct Columns {
    id: Vec<String>,
    tenant: Vec<String>,
    function: Vec<String>,
    version: Vec<i32>,
    started_at_us: Vec<i64>,
    ended_at_us: Vec<i64>,
    status: Vec<i32>,
    outcome: Vec<&'static str>,
    cold_start: Vec<bool>,
    queue_us: Vec<i64>,
    memory_peak_bytes: Vec<i64>,
    guest_cpu_us: Vec<i64>,
    device: Vec<String>,
    compute_ns: Vec<i64>,
    gpu_ns: Vec<i64>,
    inference_calls: Vec<i64>,
    batched_calls: Vec<i64>,
    bytes_in: Vec<i64>,
    bytes_out: Vec<i64>,
    billed_ms: Vec<i64>,
    cost_nanos: Vec<i64>,
    currency: Vec<String>,
    price_version: Vec<String>,
    invocation_id: Vec<Option<String>>,
    attempt: Vec<i32>,
    alias: Vec<String>,
    shadow: Vec<bool>,
    inference_cache_hits: Vec<i64>,
}

impl Columns {
    fn of(batch: &[UsageRecord]) -> Columns {
        let mut c = Columns::default();
        for r in batch {
            let u = &r.usage;
            c.id.push(u.id.clone());
            c.tenant.push(u.tenant.clone());
            c.function.push(u.function.clone());
            c.version.push(i32::try_from(u.version).unwrap_or(i32::MAX));
            c.started_at_us.push(u.started_at_us);
            c.ended_at_us.push(u.ended_at_us);
            c.status.push(i32::from(u.status));
            c.outcome.push(u.outcome.as_str());
            c.cold_start.push(u.cold_start);
            c.queue_us.push(signed(u.queue_us));
            c.memory_peak_bytes.push(signed(u.memory_peak_bytes));
            c.guest_cpu_us.push(signed(u.guest_cpu_us));
            c.device.push(u.device.clone());
            c.compute_ns.push(signed(u.compute_ns));
            c.gpu_ns.push(signed(u.gpu_ns));
            c.inference_calls.push(signed(u.inference_calls));
            c.batched_calls.push(signed(u.batched_calls));
            c.bytes_in.push(signed(u.bytes_in));
            c.bytes_out.push(signed(u.bytes_out));
            c.billed_ms.push(signed(u.billed_ms()));
            c.cost_nanos.push(r.cost_nanos);
            c.currency.push(r.currency.clone());
            c.price_version.push(r.price_version.clone());
            c.invocation_id.push(u.invocation_id.clone());
            c.attempt.push(i32::try_from(u.attempt).unwrap_or(i32::MAX));
            c.alias.push(u.alias.clone());
            c.shadow.push(u.shadow);
            c.inference_cache_hits.push(signed(u.inference_cache_hits));
        }
        c
    }
}

fn record_from_row(row: &Row) -> Result<UsageRecord, LedgerError> {
    let outcome: String = row.try_get(8)?;
    let count = |i| row.try_get::<_, i64>(i).map(unsigned);
    Ok(UsageRecord {
        usage: Usage {
            id: row.try_get(1)?,
            invocation_id: row.try_get(23)?,
            attempt: u32::try_from(row.try_get::<_, i32>(24)?).unwrap_or(1),
            tenant: row.try_get(2)?,
            function: row.try_get(3)?,
            version: u32::try_from(row.try_get::<_, i32>(4)?).unwrap_or(0),
            alias: row.try_get(25)?,
            shadow: row.try_get(26)?,
            inference_cache_hits: count(27)?,
            started_at_us: row.try_get(5)?,
            ended_at_us: row.try_get(6)?,
            status: u16::try_from(row.try_get::<_, i32>(7)?).unwrap_or(0),
            outcome: Outcome::parse(&outcome).unwrap_or(Outcome::InternalError),
            cold_start: row.try_get(9)?,
            queue_us: count(10)?,
            memory_peak_bytes: count(11)?,
            guest_cpu_us: count(12)?,
            device: row.try_get(13)?,
            compute_ns: count(14)?,
            gpu_ns: count(15)?,
            inference_calls: count(16)?,
            batched_calls: count(17)?,
            bytes_in: count(18)?,
            bytes_out: count(19)?,
        },
        cost_nanos: row.try_get(20)?,
        currency: row.try_get(21)?,
        price_version: row.try_get(22)?,
        seq: unsigned(row.try_get(0)?),
    })
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
