//! The fleet's usage ledger: one table in the cluster's PostgreSQL that
//! every node ships its usage records to, and that exports and summaries
//! read in a cluster, so any node answers for the whole fleet.
//!
//! - A node never waits for the network to bill: its [`UsageLog`] stays
//!   the durable spool (journal + `usage.db` on its own volume), and a
//!   [`Shipper`] copies what it holds to the [`Ledger`] in batches, in the
//!   background, idempotently by record id. While PostgreSQL is away the
//!   spool grows and the shipper retries; when it returns, the backlog goes.
//! - The ledger gives each record a sequence of its own, under a lock held
//!   until the batch commits, so sequences become visible in order even
//!   with several nodes shipping at once: a consumer following the cursor
//!   sees every record of the fleet exactly once.
//!
//! [`UsageLog`]: hearth_metering::UsageLog

mod ledger;
mod ship;

pub use ledger::Ledger;
pub use ship::{ShipStats, Shipper};

/// Why the ledger refused.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// PostgreSQL is unreachable, or refused a statement.
    #[error("usage ledger: {0}")]
    Postgres(String),
}

impl From<tokio_postgres::Error> for LedgerError {
    fn from(err: tokio_postgres::Error) -> Self {
        LedgerError::Postgres(err.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for LedgerError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        LedgerError::Postgres(err.to_string())
    }
}

/// A query the ledger cannot answer now is one to retry (503), not a bug.
impl From<LedgerError> for hearth_metering::LogError {
    fn from(err: LedgerError) -> Self {
        hearth_metering::LogError::Unavailable(err.to_string())
    }
}

#[cfg(test)]
mod tests;
