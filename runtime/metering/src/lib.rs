//! Hearth's metering: one durable, priced usage record per invocation.
//!
//! - [`Usage`] is what the runtime measured about an invocation; the
//!   [`PriceTable`] turns it into a [`UsageRecord`] with its cost and the
//!   table's version, so history stays priced as it ran.
//! - [`UsageLog`] keeps records: each is appended to a journal by the
//!   invocation that made it, with its commit sequence, then synced by a
//!   syncer thread and ingested into `usage.db` (SQLite) by an ingester,
//!   off the invocations' path; how durable a
//!   record is when its answer completes is the [`Durability`] mode. It also
//!   answers the queries behind exports, in commit order.
//! - [`UsageQueries`] is what exports read: the log on one node, the
//!   fleet's ledger (`hearth-ledger`) in a cluster.
//! - [`Encoder`] writes records as CSV, JSON lines or CloudEvents.

mod database;
mod export;
mod frames;
mod journal;
mod log;
mod price;
mod queries;
mod record;
mod sink;

pub use export::{CSV_COLUMNS, EVENT_TYPE, Encoder, Format};
pub use frames::Frames;
pub use log::{DEFAULT_SYNC_INTERVAL, Durability, GROUP_WINDOW, LogConfig, LogStats, UsageLog};
pub use price::{PriceError, PriceTable};
pub use queries::{Filter, SummaryRow, UsageQueries};
pub use record::{Outcome, Priced, RecordView, Usage, UsageRecord, format_nanos, format_us, now_us};
pub use sink::{LogError, MAX_BATCH, Sink};

#[cfg(test)]
mod tests;
