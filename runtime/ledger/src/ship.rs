//! [`Shipper`]: copies a node's spooled usage records to the ledger.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hearth_metering::{Filter, LogError, MAX_BATCH, SummaryRow, UsageLog, UsageQueries, UsageRecord};
use opentelemetry::metrics::Meter;
use tokio::sync::{Notify, watch};

use crate::Ledger;

/// How often the shipper looks for new records when nobody asks sooner:
/// the shipping lag under a steady load is about this plus one batch.
const SHIP_EVERY: Duration = Duration::from_millis(200);
/// First wait after a failed batch; doubled on each failure in a row.
const RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between tries while PostgreSQL is away.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest a query waits for this node's own records to reach the ledger
/// before it answers from what the ledger has.
const QUERY_FLUSH: Duration = Duration::from_secs(5);
/// The file under the data directory that holds the last local sequence
/// the ledger has (losing it costs only a re-ship: appends are idempotent).
const CURSOR_FILE: &str = "usage-shipped";

/// What a shipper has done, for telemetry.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Records the ledger took from this node since it started (records
    /// it already had are not counted).
    pub records: AtomicU64,
    /// Batches that failed (PostgreSQL away, a statement refused).
    pub failures: AtomicU64,
    /// Unix µs at which the oldest record not yet shipped ended; 0 when
    /// everything the shipper has seen is shipped.
    pub oldest_unshipped_us: AtomicU64,
}

/// Ships one node's usage log to the ledger in the background, and answers
/// usage queries from the ledger (for the whole fleet).
#[derive(Debug)]
pub struct Shipper {
    log: UsageLog,
    ledger: Ledger,
    node: String,
    cursor: PathBuf,
    stats: ShipStats,
    wake: Notify,
    /// The local commit sequence the ledger has everything up to; flushes
    /// wait on it.
    shipped: watch::Sender<u64>,
}

impl Shipper {
    /// Starts shipping `log`'s records, as `node`, from where the cursor
    /// under `data_dir` says the last run stopped.
    pub fn start(log: UsageLog, ledger: Ledger, node: String, data_dir: &Path) -> std::io::Result<Arc<Shipper>> {
        let cursor = data_dir.join(CURSOR_FILE);
        let after = match std::fs::read_to_string(&cursor) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => 0,
            Err(err) => return Err(err),
        };
        let shipper = Arc::new(Shipper {
            log,
            ledger,
            node,
            cursor,
            stats: ShipStats::default(),
            wake: Notify::new(),
            shipped: watch::Sender::new(after),
        });
        tokio::spawn(shipper.clone().run(after));
        Ok(shipper)
    }

    /// What the shipper has done.
    pub fn stats(&self) -> &ShipStats {
        &self.stats
    }

    /// Records this node holds that the ledger does not have yet.
    pub fn unshipped(&self) -> u64 {
        let written = self.log.stats().written.load(Ordering::Acquire);
        written.saturating_sub(*self.shipped.borrow())
    }

    /// How long the oldest record not yet shipped has waited (zero when
    /// none waits).
    pub fn lag(&self) -> Duration {
        let oldest = self.stats.oldest_unshipped_us.load(Ordering::Acquire);
        if oldest == 0 || self.unshipped() == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(
            u64::try_from(hearth_metering::now_us())
                .unwrap_or(0)
                .saturating_sub(oldest),
        )
    }

    /// Ships everything recorded so far, waiting at most `within`; whether
    /// it all reached the ledger.
    pub async fn flush(&self, within: Duration) -> bool {
        let target = self.log.stats().written.load(Ordering::Acquire);
        let mut shipped = self.shipped.subscribe();
        self.wake.notify_one();
        tokio::time::timeout(within, shipped.wait_for(|at| *at >= target))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    /// Registers the shipping gauges: records waiting, how long the oldest
    /// has waited, records shipped and failed batches.
    pub fn observe(self: &Arc<Self>, meter: &Meter) {
        let weak = Arc::downgrade(self);
        let s = weak.clone();
        let _unshipped = meter
            .u64_observable_gauge("hearth.usage.unshipped")
            .with_description("Usage records this node holds that the fleet's ledger does not have yet")
            .with_callback(move |gauge| {
                if let Some(shipper) = s.upgrade() {
                    gauge.observe(shipper.unshipped(), &[]);
                }
            })
            .build();
        let s = weak.clone();
        let _lag = meter
            .f64_observable_gauge("hearth.usage.shipping_lag")
            .with_unit("s")
            .with_description("How long the oldest usage record not yet in the fleet's ledger has waited")
            .with_callback(move |gauge| {
                if let Some(shipper) = s.upgrade() {
                    gauge.observe(shipper.lag().as_secs_f64(), &[]);
                }
            })
            .build();
        let _shipped = meter
            .u64_observable_counter("hearth.usage.shipping")
            .with_description("Usage shipping: records the ledger took from this node, failed batches")
            .with_callback(move |counter| {
                if let Some(shipper) = weak.upgrade() {
                    let stats = &shipper.stats;
                    counter.observe(
                        stats.records.load(Ordering::Relaxed),
                        &[opentelemetry::KeyValue::new("kind", "records")],
                    );
                    counter.observe(
                        stats.failures.load(Ordering::Relaxed),
                        &[opentelemetry::KeyValue::new("kind", "failures")],
                    );
                }
            })
            .build();
    }

    async fn run(self: Arc<Self>, mut after: u64) {
        let mut retry = RETRY_FIRST;
        let mut failing = false;
        loop {
            match self.ship(&mut after).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("usage records reach the ledger again");
                    }
                    (failing, retry) = (false, RETRY_FIRST);
                    let _ = tokio::time::timeout(SHIP_EVERY, self.wake.notified()).await;
                }
                Err(LogError::Closed) => return,
                Err(err) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(
                            error = %err,
                            unshipped = self.unshipped(),
                            "cannot ship usage records to the ledger; they wait in this node's usage log"
                        );
                    }
                    failing = true;
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Ships every record the log holds after `after`, batch by batch.
    async fn ship(&self, after: &mut u64) -> Result<(), LogError> {
        let upto = self.log.catch_up().await?;
        while *after < upto {
            let batch = self.log.page(&Filter::default(), *after, Some(upto), MAX_BATCH).await?;
            let Some(last) = batch.last().map(|r| r.seq) else {
                break;
            };
            let oldest = batch.first().map_or(0, |r| r.usage.ended_at_us);
            self.stats
                .oldest_unshipped_us
                .store(u64::try_from(oldest).unwrap_or(0), Ordering::Release);
            let new = self.ledger.append(&self.node, &batch).await?;
            self.stats.records.fetch_add(new, Ordering::Relaxed);
            self.advance(last);
            *after = last;
        }
        *after = (*after).max(upto);
        self.advance(*after);
        self.stats.oldest_unshipped_us.store(0, Ordering::Release);
        Ok(())
    }

    /// Notes that the ledger has everything up to `seq`.
    fn advance(&self, seq: u64) {
        if *self.shipped.borrow() == seq {
            return;
        }
        // Written aside and renamed: a crash leaves the old cursor or the
        // new one, and either is safe.
        let aside = self.cursor.with_extension("next");
        let saved = std::fs::write(&aside, seq.to_string()).and_then(|()| std::fs::rename(&aside, &self.cursor));
        if let Err(err) = saved {
            tracing::warn!(error = %err, "cannot save the usage shipping cursor (a restart re-ships, harmlessly)");
        }
        self.shipped.send_replace(seq);
    }
}

/// In a cluster, usage queries read the fleet's ledger, after this node's
/// own records have been shipped (so a caller sees what it just did).
#[async_trait]
impl UsageQueries for Shipper {
    async fn catch_up(&self) -> Result<u64, LogError> {
        if !self.flush(QUERY_FLUSH).await {
            tracing::warn!(
                unshipped = self.unshipped(),
                "answering a usage query without this node's newest records: the ledger has not taken them yet"
            );
        }
        Ok(self.ledger.head().await?)
    }

    async fn page(&self, filter: &Filter, after: u64, upto: u64, limit: usize) -> Result<Vec<UsageRecord>, LogError> {
        Ok(self.ledger.page(filter, after, upto, limit).await?)
    }

    async fn summary(&self, filter: &Filter) -> Result<Vec<SummaryRow>, LogError> {
        UsageQueries::catch_up(self).await?;
        Ok(self.ledger.summary(filter).await?)
    }
}
