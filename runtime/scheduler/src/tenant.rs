//! Per-tenant limits: how much one tenant may hold and use, so that no tenant
//! crowds out the others. Concurrency and request rate are checked when an
//! invocation is admitted ([`TenantGate::admit`]); function count and model
//! bytes when a version is deployed ([`TenantGate::check_deploy`]).
//!
//! **In a cluster** each node enforces its share of a tenant's concurrency
//! and rate: the limit divided by the number of live nodes
//! ([`TenantGate::set_nodes`]), rounded up for concurrency, with a burst of
//! at least one. No request waits on a fleet-wide counter. Across the fleet
//! a tenant never gets more than `max_concurrent + nodes - 1` in flight or
//! its rate plus one request per node per second; it can get less when its
//! traffic reaches some nodes only (a load balancer that spreads requests
//! evenly gives it the whole limit), and while the node count changes (up
//! to one lease) the shares follow the old count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

/// One tenant's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    /// Functions it may have deployed.
    pub max_functions: Option<u64>,
    /// Bytes of models its functions may name, summed over functions.
    pub max_model_bytes: Option<u64>,
    /// Invocations running or queued at once.
    pub max_concurrent: Option<u64>,
    /// Sustained invocations per second (token bucket).
    pub requests_per_second: Option<f64>,
    /// Bucket size: invocations it may make in a burst (defaults to one
    /// second's worth, at least 1).
    pub burst: Option<f64>,
    /// Largest `limits.memory_mb` its functions may ask for.
    pub max_memory_mb: Option<u64>,
    /// Largest `limits.timeout_ms` its functions may ask for.
    pub max_timeout_ms: Option<u64>,
    /// Largest `scaling.max_instances` its functions may ask for.
    pub max_instances: Option<u64>,
    /// Bytes of asynchronous request bodies it may have queued at once.
    pub max_async_queued_bytes: Option<u64>,
    /// Whether its functions may run at `qos = "realtime"`, ahead of every
    /// other tenant's.
    pub realtime: Option<bool>,
}

/// What every tenant gets unless the operator's limits file says more: a
/// deployer cannot take the host's memory, hold an invocation for minutes,
/// fan out without bound or jump every queue. The file's `[default]` or
/// `[tenants.NAME]` raise them.
pub const BUILT_IN_LIMITS: TenantLimits = TenantLimits {
    max_functions: None,
    max_model_bytes: None,
    max_concurrent: None,
    requests_per_second: None,
    burst: None,
    max_memory_mb: Some(256),
    max_timeout_ms: Some(30_000),
    max_instances: Some(64),
    max_async_queued_bytes: Some(256 << 20),
    realtime: Some(false),
};

impl TenantLimits {
    /// `self`, with every unset limit taken from `defaults`.
    fn or(self, defaults: TenantLimits) -> TenantLimits {
        TenantLimits {
            max_functions: self.max_functions.or(defaults.max_functions),
            max_model_bytes: self.max_model_bytes.or(defaults.max_model_bytes),
            max_concurrent: self.max_concurrent.or(defaults.max_concurrent),
            requests_per_second: self.requests_per_second.or(defaults.requests_per_second),
            burst: self.burst.or(defaults.burst),
            max_memory_mb: self.max_memory_mb.or(defaults.max_memory_mb),
            max_timeout_ms: self.max_timeout_ms.or(defaults.max_timeout_ms),
            max_instances: self.max_instances.or(defaults.max_instances),
            max_async_queued_bytes: self.max_async_queued_bytes.or(defaults.max_async_queued_bytes),
            realtime: self.realtime.or(defaults.realtime),
        }
    }
}

/// The server's tenant limits file (`--tenant-limits`, TOML). Keys left
/// out fall back to `[default]`, then to [`BUILT_IN_LIMITS`]:
///
/// ```toml
/// [default]                 # every tenant
/// max_functions = 100
/// max_model_bytes = 4294967296
/// max_concurrent = 64
/// requests_per_second = 500
/// [tenants.acme]            # overrides, key by key
/// max_concurrent = 8
/// requests_per_second = 20
/// burst = 40
/// max_memory_mb = 2048      # built in: 256
/// max_timeout_ms = 120000   # built in: 30000
/// realtime = true           # built in: false
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimitsConfig {
    /// Limits of every tenant.
    pub default: TenantLimits,
    /// Overrides by tenant name.
    pub tenants: HashMap<String, TenantLimits>,
}

impl TenantLimitsConfig {
    /// Parses and checks the file's text.
    pub fn from_toml(text: &str) -> Result<TenantLimitsConfig, String> {
        let config: TenantLimitsConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, limits) in
            std::iter::once(("default", &config.default)).chain(config.tenants.iter().map(|(k, v)| (k.as_str(), v)))
        {
            for (key, value) in [
                ("requests_per_second", limits.requests_per_second),
                ("burst", limits.burst),
            ] {
                if value.is_some_and(|v| !v.is_finite() || v <= 0.0) {
                    return Err(format!("[{name}] {key} must be a positive number"));
                }
            }
        }
        Ok(config)
    }

    /// The limits that apply to `tenant`.
    pub fn limits(&self, tenant: &str) -> TenantLimits {
        self.tenants
            .get(tenant)
            .copied()
            .unwrap_or_default()
            .or(self.default)
            .or(BUILT_IN_LIMITS)
    }
}

/// Which limit refused a request; answered 429 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TenantRejection {
    /// Too many invocations in flight.
    #[error("tenant `{tenant}` is at its limit max_concurrent = {limit} invocations in flight{}", share(*nodes))]
    Concurrency {
        /// Tenant.
        tenant: String,
        /// The limit.
        limit: u64,
        /// Live nodes sharing it.
        nodes: u64,
    },
    /// Over the request rate.
    #[error("tenant `{tenant}` is over its limit requests_per_second = {limit}{}", share(*nodes))]
    Rate {
        /// Tenant.
        tenant: String,
        /// The limit.
        limit: f64,
        /// Live nodes sharing it.
        nodes: u64,
        /// When a request would be admitted again.
        retry_after: Duration,
    },
    /// Deploying would pass a holding limit.
    #[error("tenant `{tenant}` is at its limit {limit} = {value}")]
    Holding {
        /// Tenant.
        tenant: String,
        /// `max_functions` or `max_model_bytes`.
        limit: &'static str,
        /// The limit's value.
        value: u64,
    },
}

/// A manifest asks for more than its tenant may have; answered 422 naming
/// the manifest key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "hearth.toml: `{key}` = {asked} is over tenant `{tenant}`'s limit {limit} = {allowed}; the operator's limits file (--tenant-limits) can raise it"
)]
pub struct ManifestOverLimit {
    /// Tenant.
    pub tenant: String,
    /// The manifest key (`limits.memory_mb`…).
    pub key: &'static str,
    /// What the manifest asks.
    pub asked: String,
    /// The limit's name in the limits file.
    pub limit: &'static str,
    /// The limit's value.
    pub allowed: String,
}

/// How a cluster's share reads in a rejection.
fn share(nodes: u64) -> String {
    if nodes > 1 {
        format!(" (each of the {nodes} nodes enforces its share)")
    } else {
        String::new()
    }
}

impl TenantRejection {
    /// The limit's name as in the limits file.
    pub fn limit_name(&self) -> &'static str {
        match self {
            TenantRejection::Concurrency { .. } => "max_concurrent",
            TenantRejection::Rate { .. } => "requests_per_second",
            TenantRejection::Holding { limit, .. } => limit,
        }
    }

    /// How long the client should wait (whole seconds, at least 1).
    pub fn retry_after(&self) -> Duration {
        match self {
            TenantRejection::Rate { retry_after, .. } => *retry_after,
            _ => crate::RETRY_AFTER,
        }
    }
}

#[derive(Debug)]
struct TenantState {
    /// The tenant's name, shared with its permits (a permit copies no
    /// string).
    name: Arc<str>,
    in_flight: u64,
    tokens: f64,
    refilled: Option<Instant>,
}

/// Enforces [`TenantLimitsConfig`]. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TenantGate {
    config: Arc<TenantLimitsConfig>,
    state: Arc<TenantStates>,
    /// Live nodes sharing the limits (1 on a single node).
    nodes: Arc<AtomicU64>,
}

/// The tenants' admission state, behind the one lock admissions of limited
/// tenants take.
type TenantStates = Mutex<HashMap<Arc<str>, TenantState, foldhash::fast::RandomState>>;

/// An admitted invocation's share of its tenant's concurrency; returned on
/// drop. A tenant without a concurrency or rate limit (the built-in
/// default) is not counted: its permit holds nothing.
#[derive(Debug)]
pub struct TenantPermit {
    counted: Option<(Arc<TenantStates>, Arc<str>)>,
}

impl Drop for TenantPermit {
    fn drop(&mut self) {
        let Some((states, tenant)) = &self.counted else {
            return;
        };
        let mut state = states.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tenant) = state.get_mut(&**tenant) {
            tenant.in_flight = tenant.in_flight.saturating_sub(1);
        }
    }
}

impl TenantGate {
    /// A gate enforcing `config`.
    pub fn new(config: TenantLimitsConfig) -> TenantGate {
        TenantGate {
            config: Arc::new(config),
            state: Arc::default(),
            nodes: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Sets how many live nodes share each tenant's concurrency and rate
    /// (at least 1); this node enforces its share from the next admission.
    pub fn set_nodes(&self, nodes: u64) {
        self.nodes.store(nodes.max(1), Ordering::Relaxed);
    }

    /// The limits of `tenant`.
    pub fn limits(&self, tenant: &str) -> TenantLimits {
        self.config.limits(tenant)
    }

    /// Admits one invocation of `tenant`, or says which limit refuses it.
    pub fn admit(&self, tenant: &str) -> Result<TenantPermit, TenantRejection> {
        let limits = self.config.limits(tenant);
        // Nothing to enforce, so nothing to count: no lock (one that every
        // worker's every request would take, twice), no clock read, no
        // reference counts. Limits are fixed for the server's lifetime, so
        // an uncounted tenant never needs its count later.
        if limits.max_concurrent.is_none() && limits.requests_per_second.is_none() {
            return Ok(TenantPermit { counted: None });
        }
        let nodes = self.nodes.load(Ordering::Relaxed).max(1);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Looked up by `&str` first: an entry is made once per tenant.
        if !state.contains_key(tenant) {
            let name: Arc<str> = Arc::from(tenant);
            let entry = TenantState {
                name: name.clone(),
                in_flight: 0,
                tokens: 0.0,
                refilled: None,
            };
            state.insert(name, entry);
        }
        let Some(entry) = state.get_mut(tenant) else {
            unreachable!("inserted above, under the same lock")
        };
        if let Some(limit) = limits.max_concurrent
            && entry.in_flight >= limit.div_ceil(nodes)
        {
            return Err(TenantRejection::Concurrency {
                tenant: tenant.to_owned(),
                limit,
                nodes,
            });
        }
        if let Some(limit) = limits.requests_per_second {
            let rate = limit / nodes as f64;
            let burst = (limits.burst.unwrap_or(limit) / nodes as f64).max(1.0);
            let now = Instant::now();
            let elapsed = entry
                .refilled
                .map_or(Duration::MAX, |at| now.saturating_duration_since(at));
            entry.tokens = (entry.tokens + elapsed.as_secs_f64() * rate).min(burst);
            entry.refilled = Some(now);
            if entry.tokens < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - entry.tokens) / rate);
                return Err(TenantRejection::Rate {
                    tenant: tenant.to_owned(),
                    limit,
                    nodes,
                    retry_after: Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64),
                });
            }
            entry.tokens -= 1.0;
        }
        entry.in_flight += 1;
        Ok(TenantPermit {
            counted: Some((self.state.clone(), entry.name.clone())),
        })
    }

    /// Checks a deploy: `functions` the tenant would have and `model_bytes`
    /// its functions would name, afterwards.
    pub fn check_deploy(&self, tenant: &str, functions: u64, model_bytes: u64) -> Result<(), TenantRejection> {
        let limits = self.config.limits(tenant);
        for (limit, value, used) in [
            ("max_functions", limits.max_functions, functions),
            ("max_model_bytes", limits.max_model_bytes, model_bytes),
        ] {
            if let Some(value) = value
                && used > value
            {
                return Err(TenantRejection::Holding {
                    tenant: tenant.to_owned(),
                    limit,
                    value,
                });
            }
        }
        Ok(())
    }
}

impl TenantGate {
    /// Checks what a manifest asks of one instance and of scaling against
    /// `tenant`'s limits.
    pub fn check_manifest(&self, tenant: &str, manifest: &hearth_manifest::Manifest) -> Result<(), ManifestOverLimit> {
        let limits = self.config.limits(tenant);
        let over = |key, asked: String, limit, allowed: String| ManifestOverLimit {
            tenant: tenant.to_owned(),
            key,
            asked,
            limit,
            allowed,
        };
        for (key, asked, limit, allowed) in [
            (
                "limits.memory_mb",
                u64::from(manifest.limits.memory_mb),
                "max_memory_mb",
                limits.max_memory_mb,
            ),
            (
                "limits.timeout_ms",
                u64::from(manifest.limits.timeout_ms),
                "max_timeout_ms",
                limits.max_timeout_ms,
            ),
            (
                "scaling.max_instances",
                u64::from(manifest.scaling.max_instances),
                "max_instances",
                limits.max_instances,
            ),
        ] {
            if let Some(allowed) = allowed
                && asked > allowed
            {
                return Err(over(key, asked.to_string(), limit, allowed.to_string()));
            }
        }
        if manifest.scaling.qos == hearth_manifest::Qos::Realtime && limits.realtime != Some(true) {
            return Err(over("scaling.qos", "\"realtime\"".into(), "realtime", "false".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(text: &str) -> TenantGate {
        TenantGate::new(TenantLimitsConfig::from_toml(text).expect("config"))
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_refills_over_time_and_bursts_up_to_the_bucket() {
        let gate = gate("[tenants.acme]\nrequests_per_second = 2.0\nburst = 3.0\n");
        let admitted = (0..5).filter(|_| gate.admit("acme").is_ok()).count();
        assert_eq!(admitted, 3, "the burst");
        let err = gate.admit("acme").expect_err("empty bucket");
        assert_eq!(err.limit_name(), "requests_per_second");
        assert_eq!(err.retry_after(), Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(gate.admit("acme").is_ok(), "one token back after 0.5 s at 2/s");
        assert!(gate.admit("acme").is_err());
        assert!(gate.admit("other").is_ok(), "other tenants are not limited");
    }

    #[test]
    fn manifests_are_held_to_built_in_limits_the_file_can_raise() {
        let manifest =
            |extra: &str| hearth_manifest::Manifest::from_toml(&format!("name = \"f\"\n{extra}")).expect("manifest");
        let built_in = gate("");
        assert!(
            built_in.check_manifest("acme", &manifest("")).is_ok(),
            "the manifest defaults fit"
        );
        for (extra, key) in [
            ("[limits]\nmemory_mb = 4096\n", "limits.memory_mb"),
            ("[limits]\ntimeout_ms = 60000\n", "limits.timeout_ms"),
            ("[scaling]\nmax_instances = 65\n", "scaling.max_instances"),
            ("[scaling]\nqos = \"realtime\"\n", "scaling.qos"),
        ] {
            let over = built_in.check_manifest("acme", &manifest(extra)).expect_err(extra);
            assert_eq!(over.key, key);
        }
        assert!(
            built_in
                .check_manifest("acme", &manifest("[limits]\nmemory_mb = 256\ntimeout_ms = 30000\n"))
                .is_ok()
        );

        let raised = gate("[default]\nmax_memory_mb = 4096\n[tenants.acme]\nrealtime = true\nmax_timeout_ms = 60000\n");
        let big = manifest("[limits]\nmemory_mb = 4096\ntimeout_ms = 60000\n[scaling]\nqos = \"realtime\"\n");
        assert!(raised.check_manifest("acme", &big).is_ok());
        let other = raised.check_manifest("other", &big).expect_err("not granted");
        assert_eq!(other.key, "limits.timeout_ms", "the default was raised for memory only");
        assert!(
            raised
                .check_manifest("other", &manifest("[scaling]\nqos = \"realtime\"\n"))
                .is_err(),
            "realtime is granted per tenant"
        );
    }

    #[test]
    fn concurrency_is_returned_when_permits_drop() {
        let gate = gate("[default]\nmax_concurrent = 2\n");
        let a = gate.admit("acme").expect("first");
        let _b = gate.admit("acme").expect("second");
        let err = gate.admit("acme").expect_err("third");
        assert_eq!(err.limit_name(), "max_concurrent");
        assert!(err.to_string().contains("max_concurrent = 2"), "{err}");
        drop(a);
        assert!(gate.admit("acme").is_ok());
    }

    #[test]
    fn only_tenants_with_an_admission_limit_are_counted() {
        let gate = gate("[tenants.acme]\nmax_concurrent = 1\n");
        let unlimited: Vec<_> = (0..1000).map(|_| gate.admit("other").expect("no limit")).collect();
        let counted = |tenant: &str| {
            let state = gate.state.lock().expect("state");
            state.get(tenant).map(|entry| entry.in_flight)
        };
        assert_eq!(counted("other"), None, "an unlimited tenant takes no count");
        let held = gate.admit("acme").expect("first");
        assert_eq!(counted("acme"), Some(1));
        drop(unlimited);
        assert!(
            gate.admit("acme").is_err(),
            "other tenants' permits return nothing of acme's"
        );
        drop(held);
        assert_eq!(counted("acme"), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_cluster_each_node_enforces_its_share() {
        let gate = gate("[default]\nmax_concurrent = 5\n[tenants.acme]\nrequests_per_second = 9.0\n");
        gate.set_nodes(2);
        // ceil(5 / 2) in flight on this node.
        let held: Vec<_> = (0..3).map(|_| gate.admit("other").expect("within the share")).collect();
        let err = gate.admit("other").expect_err("past the share");
        assert!(err.to_string().contains("max_concurrent = 5"), "{err}");
        assert!(err.to_string().contains("2 nodes"), "{err}");
        drop(held);
        // 9/s across 3 nodes: a burst of 3 here, then 3 a second.
        gate.set_nodes(3);
        let admitted = (0..9).filter(|_| gate.admit("acme").is_ok()).count();
        assert_eq!(admitted, 3, "this node's share of the burst");
        tokio::time::advance(Duration::from_millis(340)).await;
        assert!(gate.admit("acme").is_ok(), "refilled at 3/s");
        assert!(gate.admit("acme").is_err());
        // Back to one node: the whole limit.
        gate.set_nodes(1);
        let held: Vec<_> = (0..5).map(|_| gate.admit("other").expect("the whole limit")).collect();
        assert!(gate.admit("other").is_err());
        drop(held);
    }

    #[test]
    fn deploys_are_checked_against_holdings_and_overrides_win() {
        let gate = gate("[default]\nmax_functions = 2\n[tenants.big]\nmax_functions = 10\nmax_model_bytes = 100\n");
        assert!(gate.check_deploy("acme", 2, 0).is_ok());
        let err = gate.check_deploy("acme", 3, 0).expect_err("over");
        assert_eq!(err.limit_name(), "max_functions");
        assert!(gate.check_deploy("big", 3, 100).is_ok());
        assert_eq!(
            gate.check_deploy("big", 3, 101).expect_err("bytes").limit_name(),
            "max_model_bytes"
        );
        assert!(TenantLimitsConfig::from_toml("[default]\nrequests_per_second = 0.0\n").is_err());
        assert!(TenantLimitsConfig::from_toml("[default]\nmax_function = 1\n").is_err());
    }
}
