//! The price table: what an invocation costs, versioned so that history
//! stays priced as it was when it ran.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::record::{Outcome, Priced, Usage, UsageRecord};

/// Prices, from the server's `--price-table` file (TOML):
///
/// ```toml
/// version = "2026-11"            # recorded on every record it prices
/// currency = "USD"
/// per_invocation = 0.0000002
/// per_cache_hit = 0.00000002     # an answer from the response cache
/// per_gb_second = 0.0000166667   # of peak linear memory, per billed second
/// per_cpu_second = 0.00001       # of guest CPU time
/// [per_compute_second]           # of model compute, by device kind
/// cpu = 0.00001
/// cuda = 0.0004
/// bill_shadow = true             # shadow copies of an alias's requests
/// ```
///
/// `[per_gpu_second]`, the older name of the table's GPU prices, is still
/// read: its kinds count where `[per_compute_second]` does not name them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    /// Identifies this table in records.
    pub version: String,
    /// Currency code of every price.
    #[serde(default = "usd")]
    pub currency: String,
    /// Per invocation that ran.
    #[serde(default)]
    pub per_invocation: f64,
    /// Per answer from a function's response cache (nothing else is billed
    /// for it).
    #[serde(default)]
    pub per_cache_hit: f64,
    /// Per GiB of peak memory per billed second.
    #[serde(default)]
    pub per_gb_second: f64,
    /// Per second of guest CPU.
    #[serde(default)]
    pub per_cpu_second: f64,
    /// Per second of model compute, by device kind (`cpu`, `cuda`).
    #[serde(default)]
    pub per_compute_second: BTreeMap<String, f64>,
    /// The older name for GPU kinds of `per_compute_second`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_gpu_second: BTreeMap<String, f64>,
    /// Whether shadow copies of an alias's requests are billed like any
    /// other run (they are recorded either way).
    #[serde(default = "yes")]
    pub bill_shadow: bool,
}

fn usd() -> String {
    "USD".into()
}

fn yes() -> bool {
    true
}

/// Why a price table was refused.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    /// Not valid TOML or unknown keys.
    #[error("price table: {0}")]
    Syntax(String),
    /// A price that is negative or not a number.
    #[error("price table: `{key}` must be a finite, non-negative number")]
    Invalid {
        /// The key.
        key: String,
    },
}

impl Default for PriceTable {
    /// The built-in table (version `builtin-1`), in the range of public
    /// serverless prices.
    fn default() -> Self {
        PriceTable {
            version: "builtin-1".into(),
            currency: usd(),
            per_invocation: 0.000_000_2,
            per_cache_hit: 0.000_000_02,
            per_gb_second: 0.000_016_666_7,
            per_cpu_second: 0.000_01,
            per_compute_second: BTreeMap::from([("cpu".to_owned(), 0.000_01), ("cuda".to_owned(), 0.000_4)]),
            per_gpu_second: BTreeMap::new(),
            bill_shadow: true,
        }
    }
}

impl PriceTable {
    /// Parses and checks a table.
    pub fn from_toml(text: &str) -> Result<PriceTable, PriceError> {
        let mut table: PriceTable = toml::from_str(text).map_err(|e| PriceError::Syntax(e.to_string()))?;
        for (kind, price) in std::mem::take(&mut table.per_gpu_second) {
            table.per_compute_second.entry(kind).or_insert(price);
        }
        let mut prices = vec![
            ("per_invocation".to_owned(), table.per_invocation),
            ("per_cache_hit".to_owned(), table.per_cache_hit),
            ("per_gb_second".to_owned(), table.per_gb_second),
            ("per_cpu_second".to_owned(), table.per_cpu_second),
        ];
        prices.extend(
            table
                .per_compute_second
                .iter()
                .map(|(kind, price)| (format!("per_compute_second.{kind}"), *price)),
        );
        if let Some((key, _)) = prices.into_iter().find(|(_, p)| !p.is_finite() || *p < 0.0) {
            return Err(PriceError::Invalid { key });
        }
        if table.version.trim().is_empty() {
            return Err(PriceError::Syntax("`version` must not be empty".into()));
        }
        Ok(table)
    }

    /// Prices `usage`: invocations that never ran cost nothing, nor shadow
    /// copies when the table says `bill_shadow = false`.
    pub fn price(&self, usage: Usage) -> UsageRecord {
        UsageRecord {
            cost_nanos: self.priced(&usage).cost_nanos,
            usage,
            currency: self.currency.clone(),
            price_version: self.version.clone(),
            seq: 0,
        }
    }

    /// Prices `usage` where it lies, for [`UsageLog::append`].
    ///
    /// [`UsageLog::append`]: crate::UsageLog::append
    pub fn priced<'a>(&'a self, usage: &'a Usage) -> Priced<'a> {
        let billed = self.bill_shadow || !usage.shadow;
        let cost = if !billed {
            0.0
        } else if usage.outcome == Outcome::CacheHit {
            self.per_cache_hit
        } else if usage.outcome.ran() {
            let billed_s = usage.billed_ms() as f64 / 1e3;
            let gib = usage.memory_peak_bytes as f64 / (1u64 << 30) as f64;
            let compute = |kind: &str| self.per_compute_second.get(kind).copied().unwrap_or(0.0);
            self.per_invocation
                + self.per_gb_second * gib * billed_s
                + self.per_cpu_second * usage.guest_cpu_us as f64 / 1e6
                + compute("cpu") * usage.cpu_compute_ns() as f64 / 1e9
                + compute("cuda") * usage.gpu_ns as f64 / 1e9
        } else {
            0.0
        };
        Priced {
            usage,
            cost_nanos: (cost * 1e9).round() as i64,
            currency: &self.currency,
            price_version: &self.version,
            seq: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_follow_the_table() {
        let table = PriceTable::from_toml(
            r#"
            version = "test-1"
            currency = "EUR"
            per_invocation = 0.001
            per_gb_second = 1.0
            per_cpu_second = 0.5
            [per_compute_second]
            cpu = 4.0
            [per_gpu_second]
            cuda = 2.0
            "#,
        )
        .expect("table");
        let mut usage = crate::tests::usage("a", Outcome::Ok);
        usage.ended_at_us = usage.started_at_us + 500_000; // 500 ms
        usage.memory_peak_bytes = 1 << 29; // 0.5 GiB
        usage.guest_cpu_us = 200_000; // 0.2 s
        usage.device = "cpu+cuda:0".into();
        usage.compute_ns = 150_000_000; // 0.15 s, of which
        usage.gpu_ns = 100_000_000; // 0.1 s on the GPU (priced by the older table name)
        let record = table.price(usage.clone());
        // 0.001 + 1.0 * 0.5 * 0.5 + 0.5 * 0.2 + 4.0 * 0.05 + 2.0 * 0.1
        assert_eq!(record.cost_nanos, 751_000_000);
        assert_eq!(
            (record.currency.as_str(), record.price_version.as_str()),
            ("EUR", "test-1")
        );
        usage.outcome = Outcome::Rejected;
        assert_eq!(table.price(usage).cost_nanos, 0);
    }

    #[test]
    fn a_cache_hit_costs_its_own_price_and_nothing_else() {
        let table =
            PriceTable::from_toml("version = \"x\"\nper_invocation = 1.0\nper_cache_hit = 0.25").expect("table");
        let mut hit = crate::tests::usage("a", Outcome::CacheHit);
        hit.ended_at_us = hit.started_at_us + 2_000_000;
        assert_eq!(hit.billed_ms(), 0, "no time is billed");
        assert_eq!(table.price(hit).cost_nanos, 250_000_000);
    }

    #[test]
    fn shadow_copies_are_billed_unless_the_table_says_not() {
        let mut shadow = crate::tests::usage("a", Outcome::Ok);
        shadow.shadow = true;
        assert!(PriceTable::default().price(shadow.clone()).cost_nanos > 0);
        let table = PriceTable::from_toml("version = \"x\"\nper_invocation = 1.0\nbill_shadow = false").expect("table");
        assert_eq!(table.price(shadow.clone()).cost_nanos, 0);
        shadow.shadow = false;
        assert_eq!(table.price(shadow).cost_nanos, 1_000_000_000);
    }

    #[test]
    fn bad_tables_are_refused_with_the_key() {
        let err = PriceTable::from_toml("version = \"x\"\nper_invocation = -1.0").expect_err("negative");
        assert!(err.to_string().contains("per_invocation"), "{err}");
        let err = PriceTable::from_toml("version = \"x\"\nper_invocations = 1.0").expect_err("unknown");
        assert!(err.to_string().contains("per_invocations"), "{err}");
    }
}
