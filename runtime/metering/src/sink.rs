//! What the log's two sides share: where synced records go (a [`Sink`]),
//! how many go in one transaction, and the log's error.

use crate::frames::Frames;

/// Largest number of records ingested in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Why a record was not (yet) kept, or a query failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The log is recovering from a failed write; retry later.
    #[error("the usage log is unavailable: {0}")]
    Unavailable(String),
    /// The log has stopped (the server is shutting down).
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

/// Where the ingesters write synced records: the real database, or a
/// fault-injecting stand-in in unit tests.
pub trait Sink: Send + 'static {
    /// Writes `frames` (records in commit order) in one transaction;
    /// records at or below the highest sequence stored are skipped, so
    /// writing a batch again after a failure keeps each record once.
    fn write(&mut self, frames: Frames<'_>) -> Result<(), String>;
    /// Reopens the store after a failure and checks it.
    fn reopen(&mut self) -> Result<(), String>;
    /// The highest commit sequence stored (0 for none).
    fn last_seq(&mut self) -> Result<u64, String> {
        Ok(0)
    }
    /// Makes everything written durable on its own (before the journal that
    /// holds the same records is dropped).
    fn checkpoint(&mut self) -> Result<(), String> {
        Ok(())
    }
}
