//! `hearth serve`: open the data directory, wire the runtime, serve HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hearth_auth::Auth;
use hearth_engine::{Engine, EngineConfig};
use hearth_http::AppState;
use hearth_invoker::{Invoker, InvokerConfig};
use hearth_registry::Registry;
use hearth_store::{BlobStore, Store};
use tokio::io::AsyncWriteExt as _;

/// Default time in-flight requests get to finish after SIGTERM/SIGINT.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "HEARTH_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the database, blobs and compiled code.
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "./.hearth")]
    data_dir: PathBuf,
    /// Where metadata lives (functions, versions, tokens, asynchronous
    /// invocations): unset for the embedded SQLite file under --data-dir;
    /// `postgres://user:password@host:port/database` for a cluster of nodes
    /// sharing one PostgreSQL 15+ (migrations run at start).
    #[arg(long, env = "HEARTH_STORE_URL", value_name = "URL", hide_env_values = true)]
    store_url: Option<String>,
    /// Where deployed blobs (components, models, files) live: unset for the
    /// directory under --data-dir; `s3://bucket/prefix` for a cluster, with
    /// the data directory as this node's cache. The bucket is reached with
    /// AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    /// (and AWS_ALLOW_HTTP=true for a plain-HTTP endpoint).
    #[arg(long, env = "HEARTH_BLOB_URL", value_name = "URL")]
    blob_url: Option<String>,
    /// Operator admin token to accept; without it one is generated on the
    /// first start and written to `admin-token` in the data directory (mode
    /// 0600; its path is printed, never the secret: stdout often ends up in
    /// container logs).
    #[arg(long = "admin-token", env = "HEARTH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Largest invocation request body, in bytes.
    #[arg(long, env = "HEARTH_MAX_BODY_BYTES", default_value_t = hearth_invoker::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: u64,
    /// A token that may read `/metrics` (for Prometheus), besides operator
    /// tokens.
    #[arg(long, env = "HEARTH_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// Let anyone read `/metrics` (it names every tenant's functions and
    /// their traffic: only on a private network).
    #[arg(long, env = "HEARTH_PUBLIC_METRICS")]
    public_metrics: bool,
    /// Largest deploy upload, in bytes.
    #[arg(long, env = "HEARTH_MAX_UPLOAD_BYTES", default_value_t = hearth_http::DEFAULT_MAX_UPLOAD_BYTES)]
    max_upload_bytes: u64,
    /// Instances that may exist at once across all functions (pool size).
    #[arg(long, env = "HEARTH_MAX_INSTANCES", default_value_t = hearth_engine::DEFAULT_MAX_INSTANCES)]
    max_instances: u32,
    /// Largest memory limit a function may ask for, in MiB.
    #[arg(long, env = "HEARTH_MAX_MEMORY_MB", default_value_t = hearth_engine::DEFAULT_MAX_MEMORY_MB)]
    max_memory_mb: u32,
    /// Memory, in MiB, that instances (each counted at its function's
    /// memory limit) and models loaded on the CPU may take together; a new
    /// instance past it is refused (503). 0: 80% of the machine's memory
    /// (its container's memory limit, when lower).
    #[arg(long, env = "HEARTH_MEMORY_BUDGET_MB", default_value_t = 0)]
    memory_budget_mb: u64,
    /// Address space, in MiB, a deployed model may take to parse: each new
    /// model is parsed first in a child process under this bound (an ONNX
    /// file crafted to exhaust memory costs the child, not the server); 0
    /// parses in process only.
    #[arg(long, env = "HEARTH_MODEL_CHECK_MEMORY_MB", default_value_t = 4096)]
    model_check_memory_mb: u64,
    /// Seconds a deployed model may take to parse in its check.
    #[arg(long, env = "HEARTH_MODEL_CHECK_TIMEOUT_S", default_value_t = 120)]
    model_check_timeout_s: u64,
    /// An address range guests may reach although it is internal
    /// (loopback, private, CGNAT, link-local, unique-local and reserved
    /// ranges are denied by default, the cloud metadata endpoint with
    /// them); repeat, or separate with commas. Example: 10.20.0.0/16.
    #[arg(
        long = "allow-outbound-cidr",
        env = "HEARTH_ALLOW_OUTBOUND_CIDR",
        value_delimiter = ','
    )]
    allow_outbound_cidrs: Vec<ipnet::IpNet>,
    /// How long a compute call waits for others to batch with, in
    /// milliseconds, when its model's manifest does not say (`max_delay_ms`).
    /// 0: a call runs at once while its device has a free lane; calls that
    /// queue while every lane is busy still run as one batch.
    #[arg(long, env = "HEARTH_BATCH_WINDOW_MS", default_value_t = 0)]
    batch_window_ms: u64,
    /// Largest batch, in rows; 1 turns batching off.
    #[arg(long, env = "HEARTH_BATCH_MAX_ROWS", default_value_t = hearth_devices::DEFAULT_MAX_BATCH_ROWS)]
    batch_max_rows: usize,
    /// Seconds an unused model stays loaded.
    #[arg(long, env = "HEARTH_MODEL_IDLE_TIMEOUT_S", default_value_t = 300)]
    model_idle_timeout_s: u64,
    /// Memory budget of loaded models (by model file size), in MiB; least
    /// recently used idle models are unloaded above it.
    #[arg(long, env = "HEARTH_MODEL_MEMORY_MB", default_value_t = 8192)]
    model_memory_mb: u64,
    /// Room, in MiB (by model file size), for CPU models unloaded for
    /// idleness to stay prepared in a cold tier: they come back without
    /// being read, parsed or optimised again. Emptied whenever instances
    /// need the memory (it counts in --memory-budget-mb); 0 turns it off.
    #[arg(long, env = "HEARTH_MODEL_COLD_MEMORY_MB", default_value_t = hearth_devices::DEFAULT_MODEL_COLD_BUDGET >> 20)]
    model_cold_memory_mb: u64,
    /// Requests one instance serves before it is replaced (functions with
    /// `scaling.reuse = false` get a fresh instance every time).
    #[arg(long, env = "HEARTH_INSTANCE_REUSE_LIMIT", default_value_t = hearth_scheduler::DEFAULT_REUSE_LIMIT)]
    instance_reuse_limit: u32,
    /// Requests that may wait for an instance, across all functions; more are
    /// refused with 503.
    #[arg(long, env = "HEARTH_MAX_QUEUED", default_value_t = hearth_scheduler::DEFAULT_MAX_QUEUED)]
    max_queued: usize,
    /// Requests that may wait for one function's instances; more are refused
    /// with 429.
    #[arg(long, env = "HEARTH_MAX_QUEUED_PER_FUNCTION", default_value_t = hearth_scheduler::DEFAULT_MAX_QUEUED_PER_FUNCTION)]
    max_queued_per_function: usize,
    /// Longest a request waits in a queue before it is refused, in
    /// milliseconds.
    #[arg(long, env = "HEARTH_QUEUE_TIMEOUT_MS", default_value_t = hearth_invoker::DEFAULT_QUEUE_TIMEOUT.as_millis() as u64)]
    queue_timeout_ms: u64,
    /// Milliseconds of waiting that raise a queued request by one QoS class,
    /// so `batch` is never starved by a steady stream of `realtime`.
    #[arg(long, env = "HEARTH_QUEUE_AGING_MS", default_value_t = hearth_scheduler::DEFAULT_AGING.as_millis() as u64)]
    queue_aging_ms: u64,
    /// Seconds a function keeps its compiled code loaded after its last
    /// instance is gone (the second tier of scale to zero; the code is mapped
    /// again from disk, never recompiled).
    #[arg(long, env = "HEARTH_FUNCTION_IDLE_TIMEOUT_S", default_value_t = hearth_scheduler::DEFAULT_FUNCTION_IDLE.as_secs())]
    function_idle_timeout_s: u64,
    /// How often idle instances and functions are checked for scale-down, in
    /// milliseconds.
    #[arg(long, env = "HEARTH_REAP_INTERVAL_MS", default_value_t = 1000)]
    reap_interval_ms: u64,
    /// Asynchronous invocations run at once (each also takes an instance of
    /// its function at the `batch` class).
    #[arg(long, env = "HEARTH_ASYNC_CONCURRENCY", default_value_t = hearth_invoker::DEFAULT_ASYNC_CONCURRENCY)]
    async_concurrency: usize,
    /// Seconds after its last heartbeat when a node counts as gone: its
    /// running asynchronous invocations are run again by another node, and it
    /// leaves `/v1/status`. Nodes heartbeat every quarter of this.
    #[arg(long, env = "HEARTH_ASYNC_LEASE_S", default_value_t = hearth_invoker::DEFAULT_ASYNC_LEASE.as_secs())]
    async_lease_s: u64,
    /// Attempts after which an asynchronous invocation whose node stopped
    /// mid-run each time ends `failed` (a run refused for capacity is not an
    /// attempt).
    #[arg(long, env = "HEARTH_ASYNC_MAX_ATTEMPTS", default_value_t = hearth_invoker::DEFAULT_ASYNC_MAX_ATTEMPTS)]
    async_max_attempts: u32,
    /// Seconds an asynchronous invocation is kept: one still queued after
    /// that fails as expired, a finished one's result is deleted.
    #[arg(long, env = "HEARTH_ASYNC_RETENTION_S", default_value_t = hearth_invoker::DEFAULT_ASYNC_RETENTION.as_secs())]
    async_retention_s: u64,
    /// Shadow copies (an alias's `--shadow`) running at once at most; more
    /// are skipped and counted (`hearth_shadow_skipped_total`), so mirrored
    /// traffic never takes more than this from the answered requests.
    #[arg(long, env = "HEARTH_MAX_SHADOW_RUNS", default_value_t = hearth_invoker::DEFAULT_MAX_SHADOW_RUNS)]
    max_shadow_runs: usize,
    /// Seconds between garbage collections (blobs no version references,
    /// stale compiled artifacts, interrupted uploads).
    #[arg(long, env = "HEARTH_GC_INTERVAL_S", default_value_t = hearth_invoker::DEFAULT_GC_INTERVAL.as_secs())]
    gc_interval_s: u64,
    /// Seconds an unreferenced file is kept before garbage collection
    /// deletes it (a deploy in progress writes blobs before its version).
    #[arg(long, env = "HEARTH_GC_GRACE_S", default_value_t = hearth_invoker::GC_GRACE.as_secs())]
    gc_grace_s: u64,
    /// Price table (TOML: version, currency, per_invocation, per_gb_second,
    /// per_cpu_second, [per_gpu_second]); without it the built-in table
    /// `builtin-1` prices records.
    #[arg(long, env = "HEARTH_PRICE_TABLE", value_name = "FILE")]
    price_table: Option<PathBuf>,
    /// Per-tenant limits (TOML: [default] and [tenants.NAME] with
    /// max_functions, max_model_bytes, max_concurrent, requests_per_second,
    /// burst); without it tenants are limited only by the server's capacity.
    #[arg(long, env = "HEARTH_TENANT_LIMITS", value_name = "FILE")]
    tenant_limits: Option<PathBuf>,
    /// Write no usage records (for measuring metering's cost only: nothing
    /// is billed).
    #[arg(long, env = "HEARTH_NO_METERING")]
    no_metering: bool,
    /// Compile components as built, without pre-initialising those that
    /// export `hearth-pre-init` (for measuring what the snapshot saves).
    /// Applies to components compiled from now on, not to artifacts already
    /// on disk.
    #[arg(long, env = "HEARTH_NO_PRE_INIT")]
    no_pre_init: bool,
    /// Disk for compiled function bodies kept for later deploys, in MiB
    /// (`data/code-cache`; the least recently used go first): a deploy
    /// compiles only the functions no earlier deploy on this node compiled
    /// (every Python handler bundles the same interpreter). 0 turns it off.
    #[arg(long, env = "HEARTH_CODE_CACHE_MB", default_value_t = 1024)]
    code_cache_mb: u64,
    /// Pooled instance slots whose memory is decommitted together, in one
    /// batch of `madvise` calls; 1 decommits each as its instance goes.
    #[arg(long, env = "HEARTH_POOL_DECOMMIT_BATCH", default_value_t = hearth_engine::DEFAULT_DECOMMIT_BATCH)]
    pool_decommit_batch: usize,
    /// When an answer may complete: `process` once its usage record is
    /// written (survives a crash of the process; a machine crash loses at
    /// most the sync interval), `strict` once it is fsynced.
    #[arg(long, env = "HEARTH_USAGE_DURABILITY", default_value = "process")]
    usage_durability: hearth_metering::Durability,
    /// Longest a written usage record waits for its fsync, in milliseconds
    /// (process durability).
    #[arg(long, env = "HEARTH_USAGE_SYNC_INTERVAL_MS", default_value_t = hearth_metering::DEFAULT_SYNC_INTERVAL.as_millis() as u64)]
    usage_sync_interval_ms: u64,
    /// Milliseconds a client has to send a request's complete head (slow
    /// clients are cut off).
    #[arg(long, env = "HEARTH_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// Milliseconds a request body may go without sending anything.
    #[arg(long, env = "HEARTH_BODY_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    body_idle_timeout_ms: u64,
    /// Headers per request; more is a 431.
    #[arg(long, env = "HEARTH_MAX_HEADERS", default_value_t = 100)]
    max_headers: usize,
    /// Client connections open at once; more are answered 503 and closed
    /// (keep it under the process's file descriptor limit).
    #[arg(long, env = "HEARTH_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Seconds in-flight requests get to finish on shutdown.
    #[arg(long, env = "HEARTH_SHUTDOWN_GRACE_S", default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs())]
    shutdown_grace_s: u64,
    /// Log format on stderr.
    #[arg(long, env = "HEARTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Reads and parses an optional configuration file, naming it in any error.
fn config_file<T, E: std::fmt::Display>(
    path: Option<&std::path::Path>,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> anyhow::Result<Option<T>> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// This node's lasting id: made on the first start and kept in the data
/// directory (`node-id`), so a restarted node knows its own unfinished work.
fn node_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = format!("node-{}", uuid::Uuid::now_v7());
            std::fs::write(&path, format!("{id}\n")).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
    }
}

/// On a store shared by a cluster, follows other nodes' changes: this
/// node's cached functions and tokens are read again at once, and its
/// instances of a function changed elsewhere follow the change
/// ([`Invoker::changed_elsewhere`]) on a task of their own: that may read
/// the store and fetch blobs, and the changes after it (a token revoked)
/// are not held behind it. Function changes are followed one at a time, in
/// the feed's order, so a deploy followed at once by a delete ends deleted.
fn follow_cluster_changes(store: &dyn Store, invoker: &Arc<Invoker>, auth: &Auth) {
    let Some(mut changes) = store.changes() else { return };
    // A function by tenant and name, or `None`: every function (the feed
    // was lost and found again).
    let (functions, mut changed) = tokio::sync::mpsc::unbounded_channel::<Option<(String, String)>>();
    let follower = invoker.clone();
    tokio::spawn(async move {
        while let Some(change) = changed.recv().await {
            match change {
                Some((tenant, name)) => follower.changed_elsewhere(&tenant, &name).await,
                None => follower.changed_elsewhere_all().await,
            }
        }
    });
    let (invoker, auth) = (invoker.clone(), auth.clone());
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            tracing::debug!(?change, "cluster change");
            match change {
                hearth_store::Change::Function { tenant, name } => {
                    invoker.registry().forget(&tenant, &name);
                    let _ = functions.send(Some((tenant, name)));
                }
                hearth_store::Change::Token { id } => auth.forget_token(&id),
                hearth_store::Change::Unknown => {
                    invoker.registry().forget_all();
                    auth.forget_all();
                    let _ = functions.send(None);
                }
            }
        }
    });
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let format = match args.log_format {
        LogFormat::Text => hearth_telemetry::LogFormat::Text,
        LogFormat::Json => hearth_telemetry::LogFormat::Json,
    };
    // Flushes exported spans when the server stops.
    let _tracing = hearth_telemetry::init_tracing(format, "hearth").context("starting tracing")?;
    let telemetry = Arc::new(hearth_telemetry::Telemetry::new().context("starting metrics")?);
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating data directory {}", data_dir.display()))?;

    let node = node_id(&data_dir)?;
    let opened = hearth_store::open(args.store_url.as_deref(), &data_dir)
        .await
        .with_context(|| match &args.store_url {
            None => format!("opening the store in {}", data_dir.display()),
            Some(url) => format!("opening the store at {}", hearth_store::redact(url)),
        })?;
    let store: Arc<dyn Store> = opened.store;
    let mut blobs = BlobStore::open(&data_dir).context("opening the blob store")?;
    if let Some(url) = &args.blob_url {
        blobs = blobs.with_remote(hearth_store::RemoteBlobs::from_url(url)?);
    }
    let auth = Auth::new(store.clone());
    let generated = match auth.bootstrap(args.admin_token.as_deref()).await {
        Err(hearth_auth::AuthError::Revoked) => anyhow::bail!(
            "HEARTH_ADMIN_TOKEN is an operator token that was rotated away (revoked when a newer one was set); \
             start with the current one"
        ),
        other => other.context("creating the admin token")?,
    };

    let mut engine_config = EngineConfig::new(data_dir.join("compiled"));
    engine_config.max_instances = args.max_instances;
    engine_config.max_memory_mb = args.max_memory_mb;
    engine_config.pre_initialise = !args.no_pre_init;
    engine_config.decommit_batch = args.pool_decommit_batch;
    engine_config.code_cache = (args.code_cache_mb > 0).then(|| hearth_engine::CodeCacheConfig {
        dir: data_dir.join("code-cache"),
        max_bytes: args.code_cache_mb << 20,
    });
    engine_config.outbound = hearth_engine::OutboundPolicy::allowing(args.allow_outbound_cidrs.iter().copied());
    engine_config.memory_budget = match args.memory_budget_mb {
        0 => hearth_engine::machine_memory_bytes().map(|bytes| bytes / 5 * 4),
        mb => Some(mb << 20),
    };
    if let Some(budget) = engine_config.memory_budget {
        tracing::info!(budget_mb = budget >> 20, "memory budget for instances and models");
    }
    // Devices are found once; without a CUDA driver this logs "CPU only".
    let cache_config = hearth_devices::CacheConfig {
        idle_timeout: Duration::from_secs(args.model_idle_timeout_s),
        memory_budget: args.model_memory_mb << 20,
        batch: hearth_devices::BatchConfig {
            window: Duration::from_millis(args.batch_window_ms),
            max_rows: args.batch_max_rows.max(1),
        },
        cold_budget: args.model_cold_memory_mb << 20,
    };
    let models = hearth_devices::ModelCache::new(hearth_devices::DevicePool::discover(), cache_config);
    models.spawn_reaper();
    // One wasi-nn host: the engine links it, the registry checks models on
    // its devices, the invoker reports on it.
    let nn = hearth_bridge::NnHost::new(models);
    engine_config.nn = nn.clone();
    let engine = Engine::new(engine_config).context("configuring wasmtime")?;
    let mut registry = Registry::new(
        store.clone(),
        blobs,
        engine.clone(),
        nn.clone(),
        data_dir.join("assets"),
    );
    if args.model_check_memory_mb > 0 {
        let program = std::env::current_exe().context("finding the hearth binary for model checks")?;
        registry = registry.with_model_check(hearth_registry::ModelCheck {
            program,
            memory_mb: args.model_check_memory_mb,
            timeout: Duration::from_secs(args.model_check_timeout_s.max(1)),
        });
    }
    let pools = hearth_invoker::Pools::new(hearth_scheduler::SchedulerConfig {
        max_instances: args.max_instances as usize,
        max_queued: args.max_queued,
        max_queued_per_function: args.max_queued_per_function,
        reuse_limit: args.instance_reuse_limit.max(1),
        aging: Duration::from_millis(args.queue_aging_ms),
        function_idle: Duration::from_secs(args.function_idle_timeout_s),
    });
    let config = InvokerConfig {
        max_body_bytes: args.max_body_bytes,
        queue_timeout: Duration::from_millis(args.queue_timeout_ms),
        async_lease: Duration::from_secs(args.async_lease_s.max(1)),
        async_max_attempts: args.async_max_attempts.max(1),
        async_retention: Duration::from_secs(args.async_retention_s.max(1)),
        max_shadow_runs: args.max_shadow_runs,
    };
    let prices = config_file(args.price_table.as_deref(), hearth_metering::PriceTable::from_toml)?.unwrap_or_default();
    let usage = if args.no_metering {
        tracing::warn!("metering is off: invocations leave no usage records");
        None
    } else {
        let config = hearth_metering::LogConfig {
            durability: args.usage_durability,
            sync_interval: Duration::from_millis(args.usage_sync_interval_ms.max(1)),
        };
        tracing::info!(durability = config.durability.as_str(), "usage records");
        Some(hearth_metering::UsageLog::open(&data_dir, config).context("opening the usage log")?)
    };
    tracing::info!(version = %prices.version, currency = %prices.currency, "price table");
    let tenant_limits = config_file(
        args.tenant_limits.as_deref(),
        hearth_scheduler::TenantLimitsConfig::from_toml,
    )?;
    let tenants = hearth_scheduler::TenantGate::new(tenant_limits.unwrap_or_default());
    let invoker = Invoker::new(
        hearth_invoker::Parts {
            registry,
            engine,
            nn,
            pools,
            tenants,
            store,
            usage,
            prices,
            telemetry,
        },
        config,
    );
    follow_cluster_changes(invoker.store().as_ref(), &invoker, &auth);
    invoker.observe();
    auth.observe(invoker.telemetry().meter());
    invoker.spawn_collector(
        Duration::from_secs(args.gc_interval_s.max(1)),
        Duration::from_secs(args.gc_grace_s),
    );
    invoker.spawn_reaper(Duration::from_millis(args.reap_interval_ms.max(10)));
    // Functions that keep instances warm get them (and their models) back in
    // the background; requests are served meanwhile.
    let warming = invoker.clone();
    tokio::spawn(async move {
        match warming.registry().keep_warm_functions().await {
            Ok(functions) => {
                for deployed in &functions {
                    warming.keep_warm(deployed).await;
                }
                if !functions.is_empty() {
                    tracing::info!(functions = functions.len(), "warmed functions with min_instances > 0");
                }
            }
            Err(err) => tracing::warn!(error = %err, "warming functions with min_instances > 0 failed"),
        }
    });
    let usage_log = invoker.usage().cloned();
    // In a cluster, records also go to the fleet's ledger, and exports read it.
    let shipper = match (&usage_log, opened.postgres) {
        (Some(log), Some(pool)) => {
            let ledger = hearth_ledger::Ledger::new(pool);
            let shipper = hearth_ledger::Shipper::start(log.clone(), ledger, node.clone(), &data_dir)
                .context("starting the usage shipper")?;
            shipper.observe(invoker.telemetry().meter());
            Some(shipper)
        }
        _ => None,
    };
    let usage_queries: Option<Arc<dyn hearth_metering::UsageQueries>> = match (&shipper, &usage_log) {
        (Some(shipper), _) => Some(shipper.clone()),
        (None, Some(log)) => Some(Arc::new(log.clone())),
        (None, None) => None,
    };
    let metrics = hearth_http::MetricsAccess {
        token: args.metrics_token.clone().filter(|t| !t.is_empty()),
        public: args.public_metrics,
    };
    let state = AppState::new(invoker, auth, args.max_upload_bytes, usage_queries, metrics);
    let app = hearth_http::App::new(state.clone(), [hearth_control::routes(), hearth_oip::routes()]);

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let this_node = hearth_store::NodeInfo {
        id: node,
        url: format!("http://{addr}"),
        started_at_ms: hearth_store::now_ms(),
        heartbeat_at_ms: 0,
        // Filled in at each heartbeat: version, devices, warm models.
        details: String::new(),
    };
    state
        .invoker
        .spawn_async_runner(this_node, args.async_concurrency, hearth_http::render_failure());

    // stdout carries the two lines a user (or a test) needs; logs go to stderr.
    let mut banner = String::new();
    if let Some(token) = generated {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        write_secret(&path, &token).with_context(|| format!("writing the admin token to {}", path.display()))?;
        banner.push_str(&format!(
            "admin token written to {0} (mode 0600, created once)\n  export HEARTH_TOKEN=$(cat {0})\n",
            path.display()
        ));
    }
    banner.push_str(&format!("hearth listening on http://{addr}\n"));
    let mut stdout = tokio::io::stdout();
    stdout.write_all(banner.as_bytes()).await.context("writing to stdout")?;
    stdout.flush().await.context("writing to stdout")?;
    tracing::info!(%addr, data_dir = %data_dir.display(), "serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let conn_limits = crate::listen::ConnLimits {
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
        body_idle_timeout: Duration::from_millis(args.body_idle_timeout_ms.max(1)),
        max_headers: args.max_headers.max(1),
        max_header_bytes: 64 << 10,
        max_connections: args.max_connections.max(1),
    };
    let server = tokio::spawn(crate::listen::serve(listener, app, conn_limits, stop_rx));
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => {
            result.context("server task failed")?;
            return Ok(ExitCode::SUCCESS);
        }
        signal = shutdown_signal() => {
            tracing::info!(signal, "shutting down: no new connections, finishing in-flight requests");
        }
    }
    state.start_draining();
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(args.shutdown_grace_s);
    let deadline = tokio::time::Instant::now() + grace;
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(result) => {
            result.context("server task failed")?;
            tracing::info!("stopped accepting; finishing the usage records");
        }
        Err(_) => tracing::warn!(
            grace_s = grace.as_secs(),
            "grace period over; dropping remaining requests"
        ),
    }
    // In a cluster, what is left goes to the ledger if it can in the time
    // left; what cannot waits in the log for the next start.
    if let Some(shipper) = &shipper {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !shipper.flush(left.max(Duration::from_secs(1))).await {
            tracing::warn!(
                unshipped = shipper.unshipped(),
                "stopping with usage records not yet in the ledger; they ship when this node starts again"
            );
        }
    }
    // Every record of an invocation that ran, orphans (client gone) too, is
    // written and synced before the process exits.
    if let Some(log) = usage_log {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::task::spawn_blocking(move || log.close(left))
            .await
            .context("closing the usage log")?;
        tracing::info!("usage log synced and closed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM, naming the signal.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                ctrl_c.await;
                return "SIGINT";
            }
        };
        tokio::select! {
            _ = ctrl_c => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c.await;
        "ctrl-c"
    }
}

/// Where a generated admin token is written, in the data directory.
const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Writes `secret` to a new file readable by this user only.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("{secret}\n").as_bytes())?;
    file.sync_all()
}
