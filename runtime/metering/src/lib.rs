//! Hearth's metering: one durable, priced usage record per invocation.
//!
//! - [`Usage`] is what the runtime measured about an invocation; the
//!   [`PriceTable`] turns it into a [`UsageRecord`] with its cost and the
//!   table's version, so history stays priced as it ran.
//! - [`UsageLog`] commits records through a group-commit writer into
//!   `usage.db` (SQLite, `synchronous=FULL`); a caller hears back only once
//!   its record is on disk. It also answers the queries behind exports.
//! - [`Encoder`] writes records as CSV, JSON lines or CloudEvents.

mod export;
mod log;
mod price;
mod record;

pub use export::{CSV_COLUMNS, EVENT_TYPE, Encoder, Format};
pub use log::{Committed, Filter, GROUP_WINDOW, LogError, LogStats, MAX_BATCH, Pending, Sink, SummaryRow, UsageLog};
pub use price::{PriceError, PriceTable};
pub use record::{Outcome, RecordView, Usage, UsageRecord, format_nanos, format_us};

#[cfg(test)]
mod tests;
