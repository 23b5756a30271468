//! [`UsageQueries`]: what exports and summaries read, whichever keeps the
//! records: this node's [`UsageLog`] on the embedded default, the fleet's
//! ledger in a cluster.

use async_trait::async_trait;

use crate::log::{Filter, SummaryRow, UsageLog};
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
