//! The invocation lifecycle under paused time, with real guests (built from
//! `functions/` by `hearth-fixtures`) on a real engine, and a usage log whose
//! sink reports every record it commits.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hearth_bridge::NnHost;
use hearth_devices::{CacheConfig, DevicePool, ModelCache};
use hearth_engine::{Engine, EngineConfig};
use hearth_manifest::Manifest;
use hearth_metering::{Frames, LogConfig, Outcome, PriceTable, Sink, UsageLog, UsageRecord};
use hearth_registry::{Deployed, Registry, Upload};
use hearth_scheduler::{SchedulerConfig, TenantGate, TenantLimitsConfig};
use hearth_store::{AsyncInvocation, AsyncState, BlobStore, SqliteStore, Store, StoredMessage, now_ms};
use http_body_util::{BodyExt as _, Empty};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::*;

/// A usage sink that keeps what it commits and reports each record.
struct Reporting {
    committed: Arc<Mutex<Vec<UsageRecord>>>,
    tx: mpsc::UnboundedSender<UsageRecord>,
}

impl Sink for Reporting {
    fn write(&mut self, frames: Frames<'_>) -> Result<(), String> {
        let mut committed = self.committed.lock().map_err(|e| e.to_string())?;
        for record in frames.to_records()? {
            if !committed.iter().any(|r| r.usage.id == record.usage.id) {
                committed.push(record.clone());
                let _ = self.tx.send(record);
            }
        }
        Ok(())
    }

    fn reopen(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// An invoker on a real engine and store in a temporary directory.
struct Rig {
    invoker: Arc<Invoker>,
    committed: Arc<Mutex<Vec<UsageRecord>>>,
    records: mpsc::UnboundedReceiver<UsageRecord>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new(scheduler: SchedulerConfig) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data).expect("store"));
        let blobs = BlobStore::open(data).expect("blobs");
        let nn = NnHost::new(ModelCache::new(DevicePool::cpu_only(), CacheConfig::default()));
        let mut config = EngineConfig::new(data.join("compiled"));
        config.max_instances = 8;
        config.nn = nn.clone();
        let engine = Engine::new(config).expect("engine");
        let registry = Registry::new(store.clone(), blobs, engine.clone(), nn.clone(), data.join("assets"));
        let (tx, records) = mpsc::unbounded_channel();
        let committed = Arc::new(Mutex::new(Vec::new()));
        let sink = Reporting {
            committed: committed.clone(),
            tx,
        };
        let invoker = Invoker::new(
            Parts {
                registry,
                engine,
                nn,
                pools: Pools::new(scheduler),
                tenants: TenantGate::new(TenantLimitsConfig::default()),
                store,
                usage: Some(UsageLog::with_sink(sink, &data.join("journal"), LogConfig::default()).expect("usage log")),
                prices: PriceTable::default(),
                telemetry: Arc::new(Telemetry::new().expect("telemetry")),
            },
            InvokerConfig::default(),
        );
        Rig {
            invoker,
            committed,
            records,
            _dir: dir,
        }
    }

    /// Deploys `component` as tenant `t`'s `name` with `extra` manifest lines.
    async fn deploy(&self, name: &str, component: &str, extra: &str) -> Arc<Deployed> {
        let deployed = self.store(name, component, extra).await;
        self.invoker.deployed(deployed.clone());
        deployed
    }

    /// Stores a version as [`Rig::deploy`] does, as another node of a
    /// cluster would: the invoker is not told.
    async fn store(&self, name: &str, component: &str, extra: &str) -> Arc<Deployed> {
        let manifest =
            Manifest::from_toml(&format!("name = \"{name}\"\ncomponent = \"c.wasm\"\n{extra}")).expect("manifest");
        let registry = self.invoker.registry();
        let mut staged = registry.blobs().stage().await.expect("stage");
        staged
            .write(&std::fs::read(component).expect("guest built by hearth-fixtures"))
            .await
            .expect("write");
        let upload = Upload {
            manifest,
            component: staged,
            models: Default::default(),
            files: Default::default(),
        };
        registry.deploy("t", upload).await.expect("deploy");
        registry.resolve("t", name).await.expect("resolve")
    }

    /// Starts a call of `path` on `deployed`.
    async fn call(&self, deployed: &Deployed, path: &str) -> (Uuid, Result<http::Response<ResponseBody>, Failure>) {
        let id = Uuid::now_v7();
        let meter = self.invoker.begin(id, now_us(), deployed);
        let request = hyper::Request::get(format!("http://localhost{path}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let result = self
            .invoker
            .invoke(meter, deployed, deployed.manifest.scaling.qos, request)
            .await;
        (id, result)
    }

    /// The records committed for `id`.
    fn records_of(&self, id: Uuid) -> Vec<UsageRecord> {
        let committed = self.committed.lock().expect("lock");
        committed
            .iter()
            .filter(|r| r.usage.id == id.to_string())
            .cloned()
            .collect()
    }

    /// Starts the asynchronous runner as node `test-node`, 4 at once;
    /// failures are stored as their message.
    fn start_async_runner(&self) {
        let render: RenderFailure = Arc::new(|failure, _| http::Response::new(Bytes::from(failure.to_string())));
        let node = hearth_store::NodeInfo {
            id: "test-node".into(),
            url: String::new(),
            started_at_ms: now_ms(),
            heartbeat_at_ms: 0,
            details: String::new(),
        };
        self.invoker.spawn_async_runner(node, 4, render);
    }

    /// Waits for the next committed record.
    async fn next_record(&mut self) -> UsageRecord {
        self.records.recv().await.expect("the usage writer is running")
    }
}

#[tokio::test(start_paused = true)]
async fn the_record_commits_before_the_last_body_frame() {
    let mut rig = Rig::new(SchedulerConfig::default());
    let faults = rig.deploy("faults", hearth_fixtures::FAULTS, "").await;
    let written = || {
        rig.invoker
            .usage()
            .expect("metering")
            .stats()
            .written
            .load(Ordering::Acquire)
    };
    let before = written();
    // The head comes at once, the body a (virtual) 200 ms later.
    let (id, response) = rig.call(&faults, "/slow-body?ms=200").await;
    let mut body = response.expect("response").into_body();
    assert_eq!(written(), before, "the head is out, the invocation is not over");
    // Each data frame, and whether the record was written when it came.
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame.expect("frame").into_data() {
            frames.push((chunk, written() > before));
        }
    }
    let data: Vec<u8> = frames.iter().flat_map(|(chunk, _)| chunk.to_vec()).collect();
    assert_eq!(data, b"done\n");
    let (_, committed) = frames.last().expect("a body");
    assert!(committed, "the last frame waits for the record");
    let record = rig.next_record().await;
    assert_eq!(record.usage.id, id.to_string());
    assert_eq!((record.usage.status, record.usage.outcome), (200, Outcome::Ok));
    assert_eq!(record.usage.bytes_out, 5);
    assert_eq!(rig.records_of(id).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_leaves_one_record_and_its_instance_returns() {
    let mut rig = Rig::new(SchedulerConfig::default());
    let faults = rig.deploy("faults", hearth_fixtures::FAULTS, "").await;
    // The client gives up after 100 ms of a 2 s call: the call's future is
    // dropped mid-way, as hyper drops it when the connection closes.
    let call = rig.call(&faults, "/sleep?ms=2000");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), call).await.is_err(),
        "still running when the client went away"
    );
    let record = rig.next_record().await;
    assert_eq!((record.usage.status, record.usage.outcome), (499, Outcome::Ok));
    assert!(
        record.usage.memory_peak_bytes > 0,
        "recorded with the guest's report, once it was done: {record:?}"
    );
    let id = Uuid::parse_str(&record.usage.id).expect("uuid");
    assert_eq!(rig.records_of(id).len(), 1);
    let pool = rig
        .invoker
        .pools()
        .function_stats(&Invoker::key(&faults.version))
        .expect("pool");
    assert_eq!((pool.idle, pool.busy), (1, 0), "the instance came back: {pool:?}");
    let (_, again) = rig.call(&faults, "/ok").await;
    again.expect("ok").into_body().collect().await.expect("body");
    let pool = rig
        .invoker
        .pools()
        .function_stats(&Invoker::key(&faults.version))
        .expect("pool");
    assert_eq!(pool.warm_starts, 1, "and served the next call: {pool:?}");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_recorded_with_its_outcome() {
    let mut rig = Rig::new(SchedulerConfig::default());
    let faults = rig
        .deploy("faults", hearth_fixtures::FAULTS, "[scaling]\nmax_instances = 1\n")
        .await;
    let (_, busy) = rig.call(&faults, "/slow-body?ms=60000").await;
    let busy = busy.expect("the only instance");
    // The second call waits in the queue until its (virtual) deadline.
    let (id, refused) = rig.call(&faults, "/ok").await;
    let failure = refused.expect_err("no instance became free");
    assert!(matches!(failure, Failure::Rejected(_)), "{failure:?}");
    assert_eq!(failure.status(), 429);
    let record = rig.next_record().await;
    assert_eq!(record.usage.id, id.to_string());
    assert_eq!((record.usage.status, record.usage.outcome), (429, Outcome::Rejected));
    assert!(record.usage.queue_us == 0 && !record.usage.cold_start, "{record:?}");
    assert_eq!(record.cost_nanos, 0, "a refusal costs nothing");
    drop(busy);
}

// Real time: the usage log's syncer is a thread of its own, and a paused
// clock would race it (auto-advancing to the record's durability timeout
// while the syncer works), which hung this test under load.
#[tokio::test]
async fn the_async_runner_retries_a_refused_run_later() {
    let mut rig = Rig::new(SchedulerConfig {
        max_queued_per_function: 0,
        ..SchedulerConfig::default()
    });
    let faults = rig
        .deploy("faults", hearth_fixtures::FAULTS, "[scaling]\nmax_instances = 1\n")
        .await;
    // The only instance is busy for 1.5 s: the first attempt (at once, on
    // submit) is refused; a retry after the busy call ends runs.
    let (busy_id, busy) = rig.call(&faults, "/slow-body?ms=1500").await;
    let busy = busy.expect("the only instance");
    rig.start_async_runner();
    let id = Uuid::now_v7().to_string();
    let submitted = AsyncInvocation {
        id: id.clone(),
        tenant: "t".into(),
        function: "faults".into(),
        state: AsyncState::Queued,
        attempts: 0,
        submitted_at_ms: now_ms(),
        started_at_ms: None,
        finished_at_ms: None,
        request: StoredMessage {
            method: "GET".into(),
            uri: "/ok".into(),
            status: 0,
            headers: Vec::new(),
            body: Vec::new(),
        },
        response: None,
    };
    rig.invoker.submit(submitted).await.expect("submit");
    // Refused while the instance is busy (recorded, at no cost): it stays
    // queued, and the refusal is not an attempt (checked at the end).
    let store = rig.invoker.store().clone();
    let refusal = loop {
        let record = rig.next_record().await;
        if record.usage.invocation_id.as_deref() == Some(id.as_str()) {
            break record;
        }
    };
    assert_eq!(refusal.usage.outcome, Outcome::Rejected, "{refusal:?}");
    // The busy call ends; a later attempt runs.
    busy.into_body().collect().await.expect("body");
    let finished = loop {
        let now = store.async_invocation("t", &id).await.expect("store").expect("stored");
        if !matches!(now.state, AsyncState::Queued | AsyncState::Running) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(finished.state, AsyncState::Succeeded, "{finished:?}");
    let mut attempts = vec![refusal];
    loop {
        let record = rig.next_record().await;
        if record.usage.invocation_id.as_deref() != Some(id.as_str()) {
            assert_eq!(record.usage.id, busy_id.to_string());
            continue;
        }
        let ran = record.usage.outcome == Outcome::Ok;
        attempts.push(record);
        if ran {
            break;
        }
    }
    assert_eq!(finished.response.expect("stored").body, b"ok\n");
    // Every attempt has a record of its own: the refused ones at no cost,
    // numbered in order, none under the invocation's own id.
    let (ran, refused) = attempts.split_last().expect("records");
    assert!(!refused.is_empty(), "the first attempt was refused");
    for record in refused {
        assert_eq!(
            (record.usage.outcome, record.cost_nanos),
            (Outcome::Rejected, 0),
            "{record:?}"
        );
    }
    assert_eq!(ran.usage.status, 200);
    assert_eq!(finished.attempts, 1, "only the run that ran counts");
    assert!(attempts.iter().all(|r| r.usage.attempt == 1), "{attempts:?}");
    let ids: HashSet<&str> = attempts.iter().map(|r| r.usage.id.as_str()).collect();
    assert_eq!(ids.len(), attempts.len(), "one id per attempt");
    assert!(!ids.contains(id.as_str()), "the invocation's id is not a record's");
}

#[tokio::test]
async fn an_invocation_whose_node_keeps_dying_fails_after_its_last_attempt() {
    let rig = Rig::new(SchedulerConfig::default());
    rig.deploy("faults", hearth_fixtures::FAULTS, "").await;
    let store = rig.invoker.store().clone();
    let id = Uuid::now_v7().to_string();
    store
        .insert_async(AsyncInvocation {
            id: id.clone(),
            tenant: "t".into(),
            function: "faults".into(),
            state: AsyncState::Queued,
            attempts: DEFAULT_ASYNC_MAX_ATTEMPTS - 1,
            submitted_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            request: StoredMessage {
                method: "GET".into(),
                uri: "/ok".into(),
                ..StoredMessage::default()
            },
            response: None,
        })
        .await
        .expect("insert");
    // Its last attempt starts on a node that never heartbeats (it died).
    let claimed = store.claim_async("gone", 1, DEFAULT_ASYNC_LEASE).await.expect("claim");
    assert_eq!(claimed[0].attempts, DEFAULT_ASYNC_MAX_ATTEMPTS);
    rig.start_async_runner();
    let failed = loop {
        let now = store.async_invocation("t", &id).await.expect("store").expect("stored");
        if now.state != AsyncState::Running && now.state != AsyncState::Queued {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        (failed.state, failed.attempts),
        (AsyncState::Failed, DEFAULT_ASYNC_MAX_ATTEMPTS),
        "not run a fourth time: {failed:?}"
    );
    let answer = String::from_utf8(failed.response.expect("stored").body).expect("utf-8");
    assert!(answer.contains("started 3 times"), "{answer}");
}

/// After a lost change feed (`Change::Unknown`), the node follows what the
/// store now holds for every function with instances here: another node
/// replaced the function (its old version's warm instances go, the new
/// one's warm up), then deleted it (nothing stays).
#[tokio::test]
async fn instances_follow_changes_made_elsewhere_after_a_lost_change_feed() {
    let rig = Rig::new(SchedulerConfig::default());
    let warm = "[scaling]\nmin_instances = 2\n";
    let first = rig.deploy("warm", hearth_fixtures::HELLO, warm).await;
    let idle = |deployed: &Deployed| {
        let stats = rig.invoker.pools().function_stats(&Invoker::key(&deployed.version));
        stats.map_or(0, |stats| stats.idle)
    };
    until("warmed version 1", || idle(&first) == 2).await;

    // Version 2 is stored as another node would store it: this node's
    // invoker is not told.
    let second = rig.store("warm", hearth_fixtures::ECHO, warm).await;
    assert_eq!(second.version.version, 2);
    let registry = rig.invoker.registry();
    registry.forget_all();
    rig.invoker.changed_elsewhere_all().await;
    until("replaced version 1 by 2", || idle(&first) == 0 && idle(&second) == 2).await;

    registry.delete("t", "warm").await.expect("delete elsewhere");
    registry.forget_all();
    rig.invoker.changed_elsewhere_all().await;
    until("dropped the deleted function's instances", || {
        rig.invoker.pools().totals().0 == 0
    })
    .await;
}

/// Polls `done` until it holds (a minute at most, then fails naming `what`).
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
