//! One suite of [`Store`] behaviour, run against both backends: the
//! embedded SQLite file and a real PostgreSQL server (started by
//! `hearth-services` in a temporary directory). Each case gets a database of
//! its own and may open it several times ("another node", "a restart").

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::{
    Artifact, ArtifactKind, AsyncInvocation, AsyncState, Digest, NewVersion, NodeInfo, PostgresStore, SqliteStore,
    Store, StoredMessage, TokenRecord,
};

/// Opens the case's database (again: every call is a new handle on it).
type Open = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>> + Send + Sync>;
type Case = fn(Open) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// A lease no node in these cases outlives.
const LEASE: Duration = Duration::from_secs(3600);

const CASES: &[(&str, Case)] = &[
    ("dead nodes", |open| Box::pin(a_dead_nodes_runs_are_claimed_again(open))),
    ("versions", |open| {
        Box::pin(versions_count_up_survive_reopen_and_deletion_keeps_numbers(open))
    }),
    ("aliases", |open| {
        Box::pin(aliases_point_at_live_versions_and_keep_a_history(open))
    }),
    ("concurrent deploys", |open| {
        Box::pin(concurrent_deploys_get_distinct_versions(open))
    }),
    ("tokens", |open| Box::pin(tokens_are_found_listed_and_revoked(open))),
    ("async queue", |open| {
        Box::pin(async_invocations_queue_run_finish_and_survive_reopen(open))
    }),
    ("async claims", |open| {
        Box::pin(concurrent_claims_never_share_an_invocation(open))
    }),
    ("async fairness", |open| {
        Box::pin(tenants_take_turns_and_finished_runs_expire(open))
    }),
];

#[tokio::test]
async fn sqlite_backend_conforms() {
    for (name, case) in CASES {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let open: Open = Arc::new(move || {
            let dir = dir.clone();
            Box::pin(async move { Arc::new(SqliteStore::open(dir.path()).expect("open")) as Arc<dyn Store> })
        });
        eprintln!("sqlite: {name}");
        case(open).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backend_conforms() {
    let server = hearth_services::Postgres::start();
    for (i, (name, case)) in CASES.iter().enumerate() {
        let url = server.create_database(&format!("case{i}"));
        let open: Open = Arc::new(move || {
            let url = url.clone();
            Box::pin(async move { Arc::new(PostgresStore::connect(&url).await.expect("connect")) as Arc<dyn Store> })
        });
        eprintln!("postgres: {name}");
        case(open).await;
    }
}

fn new_version(name: &str, content: &[u8]) -> NewVersion {
    NewVersion {
        tenant: "default".into(),
        name: name.into(),
        manifest: format!("name = \"{name}\""),
        component: Digest::of(content),
        component_size: content.len() as u64,
        artifacts: Vec::new(),
    }
}

async fn versions_count_up_survive_reopen_and_deletion_keeps_numbers(open: Open) {
    let store = open().await;
    store.ensure_tenant("default").await.expect("tenant");
    store.ensure_tenant("default").await.expect("tenant again");
    assert!(store.tenant_exists("default").await.expect("exists"));
    assert_eq!(store.list_tenants().await.expect("tenants"), ["default"]);
    assert!(!store.tenant_exists("acme").await.expect("exists"));

    let model = Artifact {
        kind: ArtifactKind::Model,
        name: "mnist-mlp".into(),
        digest: Digest::of(b"onnx"),
        size: 4,
    };
    let labels = Artifact {
        kind: ArtifactKind::File,
        name: "/labels.txt".into(),
        digest: Digest::of(b"labels"),
        size: 6,
    };
    let v1 = store
        .create_version(NewVersion {
            artifacts: vec![labels.clone(), model.clone()],
            ..new_version("echo", b"one")
        })
        .await
        .expect("v1");
    assert_eq!(v1.artifacts, [model, labels], "models first, then files");
    let v2 = store.create_version(new_version("echo", b"two")).await.expect("v2");
    assert_eq!((v1.version, v2.version), (1, 2));
    drop(store);

    let store = open().await;
    let latest = store
        .latest_version("default", "echo")
        .await
        .expect("latest")
        .expect("exists");
    assert_eq!(latest, v2);
    let versions = store.list_versions("default", "echo").await.expect("versions");
    assert_eq!(versions, [v1.clone(), v2.clone()], "artifacts survive a reopen");
    assert_eq!(store.list_functions("default").await.expect("list"), vec![v2]);
    assert!(store.list_functions("acme").await.expect("list").is_empty());

    assert!(store.delete_function("default", "echo").await.expect("delete"));
    assert!(!store.delete_function("default", "echo").await.expect("delete again"));
    assert_eq!(store.latest_version("default", "echo").await.expect("latest"), None);
    assert!(store.list_functions("default").await.expect("list").is_empty());
    assert!(
        store
            .list_versions("default", "echo")
            .await
            .expect("versions")
            .is_empty()
    );

    let v3 = store.create_version(new_version("echo", b"three")).await.expect("v3");
    assert_eq!(v3.version, 3, "a redeploy after delete never reuses a version number");
    assert_eq!(
        store.list_versions("default", "echo").await.expect("versions"),
        [v3],
        "the deleted function's versions stay deleted"
    );
    assert_eq!(store.version("default", "echo", 1).await.expect("v1"), None);
}

/// Versions called by number, aliases pointing at them with a history,
/// and the deletions aliases forbid.
async fn aliases_point_at_live_versions_and_keep_a_history(open: Open) {
    use crate::{AliasTarget, LATEST, Refusal, Route, Shadow, StoreError};
    let store = open().await;
    store.ensure_tenant("default").await.expect("tenant");
    let refused = |result: crate::Result<()>| match result {
        Err(StoreError::Refused(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused(
            store
                .set_alias("default", "echo", "prod", Some(AliasTarget::single(1)))
                .await
                .map(drop)
        ),
        Refusal::NoFunction
    );
    for content in [b"one", b"two", b"thr"] {
        store
            .create_version(new_version("echo", content))
            .await
            .expect("deploy");
    }
    let v2 = store.version("default", "echo", 2).await.expect("v2").expect("live");
    assert_eq!(v2.component, Digest::of(b"two"));
    assert_eq!(store.version("default", "echo", 9).await.expect("v9"), None);

    let split = AliasTarget {
        routes: vec![Route { version: 1, weight: 90 }, Route { version: 2, weight: 10 }],
        shadow: Some(Shadow { version: 3, percent: 5 }),
    };
    let set = store
        .set_alias("default", "echo", "prod", Some(split.clone()))
        .await
        .expect("set");
    assert_eq!(set.target.as_ref(), Some(&split));
    assert_eq!(
        refused(
            store
                .set_alias("default", "echo", "prod", Some(AliasTarget::single(7)))
                .await
                .map(drop)
        ),
        Refusal::NoVersion(7)
    );
    drop(store);

    let store = open().await;
    let aliases = store.aliases("default", "echo").await.expect("aliases");
    assert_eq!(aliases.len(), 1);
    assert_eq!((aliases[0].name.as_str(), &aliases[0].target), ("prod", &split));
    // Each version an alias names, and the newest (followed by `latest`),
    // stays until the alias moves.
    for version in [1, 2, 3] {
        assert!(matches!(
            refused(store.delete_version("default", "echo", version).await),
            Refusal::VersionInUse { .. }
        ));
    }
    let latest = store
        .set_alias("default", "echo", LATEST, Some(AliasTarget::single(2)))
        .await
        .expect("pin latest");
    assert!(!latest.follows_newest);
    store
        .set_alias("default", "echo", "prod", Some(AliasTarget::single(2)))
        .await
        .expect("move prod");
    store
        .delete_version("default", "echo", 3)
        .await
        .expect("v3 is unused now");
    store
        .delete_version("default", "echo", 1)
        .await
        .expect("v1 is unused now");
    assert_eq!(
        refused(store.delete_version("default", "echo", 1).await),
        Refusal::NoVersion(1)
    );
    assert_eq!(
        refused(store.delete_version("default", "echo", 2).await),
        Refusal::LastVersion(2)
    );
    let newest = store
        .latest_version("default", "echo")
        .await
        .expect("latest")
        .expect("live");
    assert_eq!(newest.version, 2, "the newest live version, after 3 was deleted");

    // `latest` unpinned follows the newest again; a deploy is in its history.
    let unset = store.set_alias("default", "echo", LATEST, None).await.expect("unset");
    assert_eq!(
        (unset.target, unset.follows_newest),
        (Some(AliasTarget::single(2)), true)
    );
    store.create_version(new_version("echo", b"four")).await.expect("v4");
    let history = store.alias_history("default", "echo", LATEST).await.expect("history");
    let followed: Vec<(Option<u32>, bool)> = history
        .iter()
        .map(|change| {
            (
                change.target.as_ref().map(|t| t.routes[0].version),
                change.follows_newest,
            )
        })
        .collect();
    assert_eq!(
        followed,
        [
            (Some(1), true),
            (Some(2), true),
            (Some(3), true),
            (Some(2), false),
            (Some(2), true),
            (Some(4), true)
        ]
    );
    assert_eq!(
        refused(store.set_alias("default", "echo", "never", None).await.map(drop)),
        Refusal::NoAlias("never".into())
    );
    let prod = store.alias_history("default", "echo", "prod").await.expect("history");
    assert_eq!(prod.len(), 2);
    assert_eq!(prod[0].target.as_ref(), Some(&split));

    // Deleting the function takes its aliases and history along.
    assert!(store.delete_function("default", "echo").await.expect("delete"));
    store.create_version(new_version("echo", b"five")).await.expect("v5");
    assert!(store.aliases("default", "echo").await.expect("aliases").is_empty());
    assert!(
        store
            .alias_history("default", "echo", "prod")
            .await
            .expect("history")
            .is_empty()
    );
}

/// Two nodes deploying the same function at once: every deploy gets a
/// number of its own.
async fn concurrent_deploys_get_distinct_versions(open: Open) {
    let (a, b) = (open().await, open().await);
    a.ensure_tenant("default").await.expect("tenant");
    let deploys = (0..8u8).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { store.create_version(new_version("race", &[i])).await.expect("deploy") })
    });
    let mut numbers = Vec::new();
    for deploy in deploys {
        numbers.push(deploy.await.expect("join").version);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=8).collect::<Vec<_>>());
    let latest = b
        .latest_version("default", "race")
        .await
        .expect("latest")
        .expect("exists");
    assert_eq!(latest.version, 8);
}

async fn tokens_are_found_listed_and_revoked(open: Open) {
    let store = open().await;
    store.ensure_tenant("default").await.expect("tenant");
    store.ensure_tenant("acme").await.expect("tenant");
    assert!(!store.has_operator_token().await.expect("any"));
    let operator = TokenRecord {
        id: "tok_1".into(),
        tenant: "default".into(),
        role: "admin".into(),
        operator: true,
        hash: "ab".repeat(32),
        created_at_ms: 1,
        expires_at_ms: None,
        revoked_at_ms: None,
    };
    let invoker = TokenRecord {
        id: "tok_2".into(),
        tenant: "acme".into(),
        role: "invoker".into(),
        operator: false,
        hash: "cd".repeat(32),
        created_at_ms: 2,
        expires_at_ms: Some(10_000),
        revoked_at_ms: None,
    };
    store.insert_token(operator.clone()).await.expect("insert");
    store.insert_token(invoker.clone()).await.expect("insert");
    assert!(
        store.insert_token(operator.clone()).await.is_err(),
        "a token id is unique"
    );
    assert!(store.has_operator_token().await.expect("any"));
    assert_eq!(
        store.token_by_hash(&operator.hash).await.expect("find"),
        Some(operator.clone())
    );
    assert_eq!(store.token_by_hash("00").await.expect("find"), None);
    assert_eq!(store.token_by_id("tok_2").await.expect("find"), Some(invoker.clone()));
    assert_eq!(
        store.list_tokens(None).await.expect("list"),
        [operator.clone(), invoker.clone()]
    );
    assert_eq!(store.list_tokens(Some("acme")).await.expect("list"), [invoker]);

    let revoked = store.revoke_token("tok_1").await.expect("revoke").expect("exists");
    let at = revoked.revoked_at_ms.expect("revoked");
    let again = store.revoke_token("tok_1").await.expect("revoke").expect("exists");
    assert_eq!(again.revoked_at_ms, Some(at), "the first revocation time is kept");
    assert_eq!(store.revoke_token("tok_9").await.expect("revoke"), None);
    assert!(
        !store.has_operator_token().await.expect("any"),
        "a revoked operator token does not count"
    );
}

fn queued(id: &str, request: &StoredMessage) -> AsyncInvocation {
    AsyncInvocation {
        id: id.into(),
        tenant: "default".into(),
        function: "echo".into(),
        state: AsyncState::Queued,
        attempts: 0,
        submitted_at_ms: 1,
        started_at_ms: None,
        finished_at_ms: None,
        request: request.clone(),
        response: None,
    }
}

async fn async_invocations_queue_run_finish_and_survive_reopen(open: Open) {
    let store = open().await;
    store.ensure_tenant("default").await.expect("tenant");
    let request = StoredMessage {
        method: "POST".into(),
        uri: "/x?y=1".into(),
        status: 0,
        headers: vec![("content-type".into(), "text/plain".into())],
        body: vec![0, 159, 146, 150],
    };
    for id in ["a", "b", "c"] {
        store.insert_async(queued(id, &request)).await.expect("insert");
    }
    let claimed = store.claim_async("node-1", 2, LEASE).await.expect("claim");
    assert_eq!(claimed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(claimed[0].request, request, "the body survives byte for byte");
    assert_eq!((claimed[0].state, claimed[0].attempts), (AsyncState::Running, 1));
    let response = StoredMessage {
        status: 201,
        headers: vec![("x-result".into(), "yes".into())],
        body: b"done".to_vec(),
        ..StoredMessage::default()
    };
    store
        .finish_async("a", AsyncState::Succeeded, Some(response.clone()), true)
        .await
        .expect("finish");
    drop(store);

    // "b" was running when node-1 stopped: it runs again once node-1 is
    // back, not when another node starts.
    let store = open().await;
    assert_eq!(store.requeue_running_async("node-2").await.expect("requeue"), 0);
    assert_eq!(store.requeue_running_async("node-1").await.expect("requeue"), 1);
    let a = store.async_invocation("default", "a").await.expect("get").expect("a");
    assert_eq!((a.state, a.response), (AsyncState::Succeeded, Some(response)));
    assert!(a.finished_at_ms.is_some());
    assert!(
        store.async_invocation("other", "a").await.expect("get").is_none(),
        "tenant-scoped"
    );
    let claimed = store.claim_async("node-2", 10, LEASE).await.expect("claim");
    assert_eq!(claimed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);
    assert_eq!(claimed[0].attempts, 2);
    assert!(store.claim_async("node-2", 10, LEASE).await.expect("claim").is_empty());
    assert_eq!(store.requeue_running_async("node-1").await.expect("requeue"), 0);
}

/// One tenant's backlog does not hold up another's: claims take each
/// tenant's oldest in turn. Queued bytes are summed per tenant; finished
/// runs are deleted once past the retention cut-off, queued ones never.
async fn tenants_take_turns_and_finished_runs_expire(open: Open) {
    let store = open().await;
    for tenant in ["big", "small"] {
        store.ensure_tenant(tenant).await.expect("tenant");
    }
    let request = StoredMessage {
        body: vec![7; 100],
        ..StoredMessage::default()
    };
    for i in 0..10 {
        let mut run = queued(&format!("big-{i}"), &request);
        (run.tenant, run.submitted_at_ms) = ("big".into(), i);
        store.insert_async(run).await.expect("insert");
    }
    let mut late = queued("small-0", &request);
    (late.tenant, late.submitted_at_ms) = ("small".into(), 100);
    store.insert_async(late).await.expect("insert");
    assert_eq!(store.async_queued_bytes("big").await.expect("bytes"), 1_000);
    assert_eq!(store.async_queued_bytes("small").await.expect("bytes"), 100);
    assert_eq!(store.async_queued_bytes("nobody").await.expect("bytes"), 0);

    let claim_one = async || -> String {
        let claimed = store.claim_async("node-1", 1, LEASE).await.expect("claim");
        assert_eq!(claimed.len(), 1);
        claimed[0].id.clone()
    };
    assert_eq!(claim_one().await, "big-0", "neither has run: the oldest first");
    store
        .finish_async("big-0", AsyncState::Succeeded, Some(StoredMessage::default()), true)
        .await
        .expect("finish");
    assert_eq!(claim_one().await, "small-0", "the tenant served longest ago goes next");
    assert_eq!(claim_one().await, "big-1");

    store
        .finish_async("small-0", AsyncState::Succeeded, Some(StoredMessage::default()), true)
        .await
        .expect("finish");
    assert_eq!(
        store.async_queued_bytes("small").await.expect("bytes"),
        0,
        "finished runs are not queued"
    );
    assert_eq!(
        store.delete_finished_async(0).await.expect("keep"),
        0,
        "not finished before the cut-off"
    );
    assert_eq!(
        store.delete_finished_async(i64::MAX).await.expect("delete"),
        2,
        "only the finished ones"
    );
    assert!(store.async_invocation("small", "small-0").await.expect("get").is_none());
    assert!(
        store.async_invocation("big", "big-9").await.expect("get").is_some(),
        "queued runs stay"
    );
}

fn node(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        url: format!("http://{id}"),
        started_at_ms: 1,
        heartbeat_at_ms: 0,
        details: "{}".into(),
    }
}

/// A run whose node stopped heartbeating is claimed again by another node
/// (another attempt); a live node's runs, and a node's own, are not.
async fn a_dead_nodes_runs_are_claimed_again(open: Open) {
    let store = open().await;
    store.ensure_tenant("default").await.expect("tenant");
    store.heartbeat(&node("node-1")).await.expect("beat");
    store.heartbeat(&node("node-2")).await.expect("beat");
    let live: Vec<String> = store
        .live_nodes(LEASE)
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(live, ["node-1", "node-2"]);
    store
        .insert_async(queued("x", &StoredMessage::default()))
        .await
        .expect("insert");
    assert_eq!(store.claim_async("node-1", 5, LEASE).await.expect("claim").len(), 1);
    assert!(
        store.claim_async("node-2", 5, LEASE).await.expect("claim").is_empty(),
        "node-1 is alive: its run is its own"
    );
    // With no lease at all every other node counts as dead.
    assert!(
        store
            .claim_async("node-1", 5, Duration::ZERO)
            .await
            .expect("claim")
            .is_empty(),
        "never its own"
    );
    assert!(store.live_nodes(Duration::ZERO).await.expect("nodes").is_empty());
    let again = store.claim_async("node-2", 5, Duration::ZERO).await.expect("claim");
    assert_eq!(
        again.iter().map(|i| (i.id.as_str(), i.attempts)).collect::<Vec<_>>(),
        [("x", 2)]
    );
    // Refused for now: back in the queue, and the claim was not an attempt.
    store
        .finish_async("x", AsyncState::Queued, None, false)
        .await
        .expect("release");
    let x = store.async_invocation("default", "x").await.expect("get").expect("x");
    assert_eq!((x.state, x.attempts, x.response), (AsyncState::Queued, 1, None));
}

/// Several runners claiming at once never get the same invocation.
async fn concurrent_claims_never_share_an_invocation(open: Open) {
    let mut stores = Vec::new();
    for _ in 0..6 {
        stores.push(open().await);
    }
    stores[0].ensure_tenant("default").await.expect("tenant");
    for i in 0..stores.len() {
        stores[0].heartbeat(&node(&format!("node-{i}"))).await.expect("beat");
    }
    let ids: Vec<String> = (0..300).map(|i| format!("inv{i:03}")).collect();
    for id in &ids {
        stores[0]
            .insert_async(queued(id, &StoredMessage::default()))
            .await
            .expect("insert");
    }
    let runners = stores.iter().cloned().enumerate().map(|(node, store)| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store
                    .claim_async(&format!("node-{node}"), 2, LEASE)
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.into_iter().map(|i| i.id));
            }
        })
    });
    let mut all = Vec::new();
    for runner in runners {
        all.extend(runner.await.expect("join"));
    }
    all.sort();
    assert_eq!(all, ids, "each invocation claimed exactly once");
}

/// A node follows what other nodes change: deploys, deletes and
/// revocations are announced, and a change that was not (a lost
/// notification) is noticed by the counter check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_announces_changes_to_other_nodes() {
    let server = hearth_services::Postgres::start();
    let url = server.create_database("changes");
    let here = PostgresStore::connect(&url).await.expect("connect");
    let there = PostgresStore::connect(&url).await.expect("connect");
    let mut changes = there.changes().expect("a shared store announces changes");
    here.ensure_tenant("default").await.expect("tenant");
    let guard = std::time::Instant::now() + Duration::from_secs(30);
    // The follower connects in the background: deploy until it reports one.
    loop {
        here.create_version(new_version("echo", b"one")).await.expect("deploy");
        let waited = tokio::time::timeout(Duration::from_millis(200), changes.recv()).await;
        if waited.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < guard,
            "the follower never reported a deploy"
        );
    }
    // From here on it listens: each change arrives (after any left over from
    // the deploys above).
    let next = async |changes: &mut tokio::sync::mpsc::Receiver<crate::Change>, wanted: crate::Change| loop {
        let change = tokio::time::timeout_at(guard.into(), changes.recv())
            .await
            .unwrap_or_else(|_| panic!("no {wanted:?} within the guard"))
            .expect("the feed is open");
        if change == wanted {
            return;
        }
    };
    let other = crate::Change::Function {
        tenant: "default".into(),
        name: "other".into(),
    };
    here.create_version(new_version("other", b"one")).await.expect("deploy");
    next(&mut changes, other.clone()).await;
    here.delete_function("default", "other").await.expect("delete");
    next(&mut changes, other).await;
    here.insert_token(TokenRecord {
        id: "tok_9".into(),
        tenant: "default".into(),
        role: "invoker".into(),
        operator: false,
        hash: "ef".repeat(32),
        created_at_ms: 1,
        expires_at_ms: None,
        revoked_at_ms: None,
    })
    .await
    .expect("token");
    here.revoke_token("tok_9").await.expect("revoke");
    next(&mut changes, crate::Change::Token { id: "tok_9".into() }).await;

    // A change whose notification was lost: the counter moved, nothing said so.
    here.client()
        .await
        .expect("client")
        .execute("UPDATE hearth_changes SET seq = seq + 1", &[])
        .await
        .expect("bump");
    next(&mut changes, crate::Change::Unknown).await;
}
