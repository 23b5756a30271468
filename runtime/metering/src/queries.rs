//! [`UsageQueries`]: what exports and summaries read, whichever keeps the
//! records: this node's [`UsageLog`](crate::UsageLog) on the embedded
//! default, the fleet's ledger in a cluster; and what they ask
//! ([`Filter`]) and answer ([`SummaryRow`]).

use async_trait::async_trait;

use crate::record::UsageRecord;
use crate::sink::LogError;

/// The query side of a record store. Records are numbered by a sequence
/// that becomes visible in order: a consumer that pages with the last
/// sequence it received gets every record exactly once.
#[async_trait]
pub trait UsageQueries: Send + Sync + std::fmt::Debug + 'static {
    /// Makes everything recorded so far queryable (as far as this store
    /// can) and returns the sequence it reaches: the `upto` of an export.
    async fn catch_up(&self) -> Result<u64, LogError>;
    /// Up to `limit` records matching `filter` with sequences after `after`
    /// and at most `upto`, in sequence order.
    async fn page(&self, filter: &Filter, after: u64, upto: u64, limit: usize) -> Result<Vec<UsageRecord>, LogError>;
    /// Totals per tenant, function and UTC day.
    async fn summary(&self, filter: &Filter) -> Result<Vec<SummaryRow>, LogError>;
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

impl Filter {
    /// Whether a record of `tenant`'s `function` that started at
    /// `started_at_us` matches.
    pub(crate) fn admits(&self, tenant: &str, function: &str, started_at_us: i64) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
            && self.function.as_deref().is_none_or(|f| f == function)
            && self.since_us.is_none_or(|since| started_at_us >= since)
            && self.until_us.is_none_or(|until| started_at_us < until)
    }
}

/// One row of [`UsageQueries::summary`]: one version of a tenant's function on
/// one day (UTC), its answered calls and its shadow copies apart, so the
/// versions behind an alias compare side by side.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SummaryRow {
    pub tenant: String,
    pub function: String,
    pub version: u32,
    /// Shadow copies (answers nobody saw).
    pub shadow: bool,
    /// Of the calls that ran, those that ended in a 5xx.
    pub errors: u64,
    /// Mean wall time, milliseconds.
    pub mean_wall_ms: f64,
    /// `YYYY-MM-DD`.
    pub day: String,
    pub invocations: u64,
    /// Of which ran (not rejected or refused as bad requests).
    pub ran: u64,
    pub rejected: u64,
    pub cold_starts: u64,
    pub billed_ms: u64,
    pub guest_cpu_us: u64,
    /// Model compute on every device, milliseconds.
    pub compute_ms: f64,
    /// Of which on GPUs.
    pub gpu_ms: f64,
    pub inference_calls: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Decimal, nine places.
    pub cost: String,
    pub currency: String,
}
