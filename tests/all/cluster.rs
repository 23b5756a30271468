//! A cluster: three real `hearth serve` nodes on loopback sharing one real
//! PostgreSQL (`--store-url`) and one real S3 API server (moto,
//! `--blob-url`). Each node has a data directory of its own, which starts
//! empty: what it runs comes from the bucket.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hearth_services::{Postgres, S3};

use crate::asynchronous::wait_finished;
use crate::inference::{classify, deploy_classify};
use crate::server::{Server, TOKEN, deploy, http, problem, usage_export, wait_for_instances};

/// How long a change may take to reach the other nodes before the test
/// fails (a hang guard: the convergence time itself is a bench figure).
const CONVERGE_GUARD: Duration = Duration::from_secs(10);

/// The nodes' lease: a node silent this long counts as gone.
const LEASE_S: u64 = 2;

struct Cluster {
    nodes: Vec<Server>,
    s3: S3,
    store_url: String,
    /// Arguments every node gets besides the cluster's own.
    extra: Vec<String>,
    // Dropped last: the nodes stop before their database does.
    postgres: Postgres,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start(nodes: usize) -> Cluster {
        Cluster::start_with(nodes, &[])
    }

    fn start_with(nodes: usize, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let postgres = Postgres::start();
        let store_url = postgres.create_database("hearth");
        let s3 = S3::start();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            s3,
            store_url,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            postgres,
            dir,
        };
        cluster.nodes = (0..nodes).map(|i| cluster.start_node(i)).collect();
        cluster
    }

    /// Starts node `i` on its data directory (again, after a kill).
    fn start_node(&self, i: usize) -> Server {
        let blob_url = format!("s3://{}/blobs", S3::BUCKET);
        let env = self.s3.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let lease = LEASE_S.to_string();
        let mut args = vec![
            "--store-url",
            &self.store_url,
            "--blob-url",
            &blob_url,
            "--async-lease-s",
            &lease,
        ];
        args.extend(self.extra.iter().map(String::as_str));
        Server::start_with_env(&self.dir.path().join(format!("node{i}")), &args, &env)
    }
}

/// Polls `url` with `token` until the answer's status is `status`; returns
/// its body.
async fn converge(url: &str, token: Option<&str>, status: u16, what: &str) -> String {
    let client = reqwest::Client::new();
    let guard = Instant::now() + CONVERGE_GUARD;
    loop {
        let mut request = client.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        if response.status().as_u16() == status {
            return response.text().await.expect("body");
        }
        assert!(Instant::now() < guard, "{what}: still {} at {url}", response.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_deploys_deletes_and_revocations() {
    let cluster = Cluster::start(3);
    let [a, b, c] = &cluster.nodes[..] else { unreachable!() };
    let work = tempfile::tempdir().expect("tempdir");

    // Deployed through A: B and C answer on their first request, their
    // blobs fetched from the bucket (their data directories started empty).
    deploy(a, work.path(), "greet", hearth_fixtures::HELLO, "public = true\n").await;
    for node in [b, c] {
        let response = http().get(node.fn_url("greet", "/")).send().await.expect("greet");
        assert_eq!(response.status(), 200, "log:\n{}", node.log());
        assert_eq!(response.text().await.expect("body"), "hello from hearth\n");
    }
    assert!(
        !cluster.s3.list("blobs/sha256/").is_empty(),
        "the component is in the bucket"
    );
    // A model too: classify's weights travel through the bucket.
    deploy_classify(a, work.path(), "classify").await;
    let on_a = classify(a, "classify", 1).await;
    assert_eq!(classify(c, "classify", 1).await, on_a, "same model, same answer");
    // C reports the model warm on it at its next heartbeat.
    let c_id = std::fs::read_to_string(c.data_dir.join("node-id")).expect("node id");
    let guard = Instant::now() + CONVERGE_GUARD;
    loop {
        let status = a.client().status().await.expect("status");
        let node = status.nodes.iter().find(|n| n.id == c_id.trim()).expect("C is listed");
        assert_eq!(node.details["devices"][0]["id"], "cpu", "{node:?}");
        if node.details["warm_models"].as_array().is_some_and(|m| !m.is_empty()) {
            break;
        }
        assert!(Instant::now() < guard, "C never reported its warm model: {node:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Redeployed through A (now the echo component): B and C converge.
    deploy(a, work.path(), "greet", hearth_fixtures::ECHO, "public = true\n").await;
    for node in [b, c] {
        let url = node.fn_url("greet", "/converged");
        let guard = Instant::now() + CONVERGE_GUARD;
        loop {
            let body = http()
                .get(&url)
                .send()
                .await
                .expect("greet")
                .text()
                .await
                .expect("body");
            if body != "hello from hearth\n" {
                break;
            }
            assert!(Instant::now() < guard, "{} still runs the old version", node.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // A rollback through A (greet's `latest` back to version 1): B and C
    // follow, as they follow a deploy.
    a.client().rollback("greet", "latest").await.expect("rollback");
    for node in [b, c] {
        let guard = Instant::now() + CONVERGE_GUARD;
        loop {
            let response = http().get(node.fn_url("greet", "/")).send().await.expect("greet");
            if response.headers()["x-hearth-version"] == "1" {
                break;
            }
            assert!(Instant::now() < guard, "{} never followed the rollback", node.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Asynchronous invocations submitted through A run exactly once,
    // wherever they run, and every node answers for them.
    deploy(a, work.path(), "echo", hearth_fixtures::ECHO, "").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let response = http()
            .post(format!("{}/v1/functions/echo/invocations?path=/{i}", a.url))
            .body(format!("job {i}"))
            .send()
            .await
            .expect("submit");
        assert_eq!(response.status(), 202);
        let accepted: serde_json::Value = response.json().await.expect("json");
        ids.push(accepted["id"].as_str().expect("id").to_owned());
    }
    for (i, id) in ids.iter().enumerate() {
        let done = wait_finished(&cluster.nodes[i % 3], "echo", id).await;
        assert_eq!((done.state.as_str(), done.attempts), ("succeeded", 1), "{done:?}");
    }

    // Deleted through C: A and B converge to 404.
    c.client().delete("greet").await.expect("delete");
    for node in [a, b] {
        converge(&node.fn_url("greet", "/"), Some(TOKEN), 404, "deleted through C").await;
    }

    // A token created and used on B and C, then revoked through A: refused
    // by B and C.
    let token = a
        .client()
        .create_token(Some("default"), "invoker", None)
        .await
        .expect("token")
        .token
        .expect("the secret, shown once");
    deploy(a, work.path(), "private", hearth_fixtures::HELLO, "").await;
    for node in [b, c] {
        let body = converge(&node.fn_url("private", "/"), Some(&token), 200, "the new token works").await;
        assert_eq!(body, "hello from hearth\n");
    }
    a.client().revoke_token(&token).await.expect("revoke");
    for node in [b, c] {
        converge(&node.fn_url("private", "/"), Some(&token), 401, "revoked through A").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_asynchronous_run_is_run_again_by_another_node() {
    let mut cluster = Cluster::start(3);
    let work = tempfile::tempdir().expect("tempdir");
    let a = &cluster.nodes[0];
    // Each node's first heartbeat is written by a task of its own, maybe
    // just after it answers `/readyz`.
    let guard = Instant::now() + CONVERGE_GUARD;
    loop {
        let status = a.client().status().await.expect("status");
        if status.nodes.len() == 3 {
            break;
        }
        assert!(Instant::now() < guard, "every node heartbeats: {:?}", status.nodes);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    deploy(
        a,
        work.path(),
        "slow",
        hearth_fixtures::FAULTS,
        "[limits]\ntimeout_ms = 30000\n",
    )
    .await;
    let response = http()
        .post(format!(
            "{}/v1/functions/slow/invocations?path=/sleep%3Fms%3D3000",
            a.url
        ))
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status(), 202);
    let accepted: serde_json::Value = response.json().await.expect("json");
    let id = accepted["id"].as_str().expect("id").to_owned();

    // Which node runs it: the owner the store recorded, by node id.
    let guard = Instant::now() + CONVERGE_GUARD;
    let owner = loop {
        let owner = cluster.postgres.query(
            "hearth",
            &format!("SELECT owner FROM async_invocations WHERE id = '{id}' AND state = 'running'"),
        );
        if !owner.is_empty() {
            break owner;
        }
        assert!(Instant::now() < guard, "the invocation never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let runner = cluster
        .nodes
        .iter()
        .position(|node| {
            std::fs::read_to_string(node.data_dir.join("node-id")).is_ok_and(|node_id| node_id.trim() == owner)
        })
        .expect("the owner is one of the nodes");
    drop(cluster.nodes.remove(runner)); // SIGKILL mid-run

    // Its lease runs out; another node runs it again, to the end.
    let done = wait_finished(&cluster.nodes[0], "slow", &id).await;
    assert_eq!((done.state.as_str(), done.attempts), ("succeeded", 2), "{done:?}");
    assert_eq!(done.response.expect("response").body.as_deref(), Some("slept\n"));
    let live = cluster.nodes[1].client().status().await.expect("status").nodes;
    assert_eq!(live.len(), 2, "the killed node left the list: {live:?}");
}

/// A tenant's `max_concurrent` is shared by the live nodes: with 3 nodes
/// and a limit of 3, a node holding one of the tenant's invocations refuses
/// a second (on one node the limit would admit three).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_are_shared_by_the_live_nodes() {
    let limits = tempfile::NamedTempFile::new().expect("limits file");
    std::fs::write(limits.path(), "[default]\nmax_concurrent = 3\n").expect("write limits");
    let limits = limits.path().display().to_string();
    let cluster = Cluster::start_with(3, &["--tenant-limits", &limits]);
    let work = tempfile::tempdir().expect("tempdir");
    let a = &cluster.nodes[0];
    deploy(a, work.path(), "slow", hearth_fixtures::FAULTS, "public = true\n").await;
    // Each node learns the count at its next heartbeat: poll until A holds
    // to its share.
    let guard = Instant::now() + CONVERGE_GUARD;
    loop {
        let held = tokio::spawn(http().get(a.fn_url("slow", "/sleep?ms=1000")).send());
        wait_for_instances(a, "slow", "is busy", |pool| pool.busy >= 1).await;
        let second = http()
            .get(a.fn_url("slow", "/sleep?ms=1"))
            .send()
            .await
            .expect("second");
        let shared = second.status() == 429;
        if shared {
            let problem = problem(second, 429).await;
            let detail = problem["detail"].as_str().unwrap_or_default();
            assert!(detail.contains("each of the 3 nodes"), "{problem}");
        }
        assert_eq!(held.await.expect("held").expect("held call").status(), 200);
        if shared {
            break;
        }
        assert!(Instant::now() < guard, "node A still admits past its share");
    }
}

/// Polls `node`'s `/v1/status` until `done` holds; panics after
/// [`CONVERGE_GUARD`] with the last status.
async fn wait_for_status(node: &Server, what: &str, done: impl Fn(&hearth_client::Status) -> bool) {
    let guard = Instant::now() + CONVERGE_GUARD;
    loop {
        let status = node.client().status().await.expect("status");
        if done(&status) {
            return;
        }
        assert!(Instant::now() < guard, "{} never {what}: {status:?}", node.url);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `min_instances` hold on every node, as each node warms them from its
/// start: a function deployed, replaced or deleted through one node is
/// warmed, replaced or dropped on the others as on the node that made the
/// change (before, the others kept a deleted function's instances until
/// they restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_kept_warm_follow_deploys_and_deletes_made_on_another_node() {
    let cluster = Cluster::start(2);
    let [a, b] = &cluster.nodes[..] else { unreachable!() };
    let work = tempfile::tempdir().expect("tempdir");
    let warm = "public = true\n[scaling]\nmin_instances = 2\n";
    let version_warm = |version: u32| {
        move |status: &hearth_client::Status| {
            status
                .functions
                .iter()
                .any(|f| f.name == "warm" && f.version == version && f.instances.idle == 2)
                && status.instances == 2
        }
    };
    deploy(a, work.path(), "warm", hearth_fixtures::HELLO, warm).await;
    wait_for_status(b, "warmed version 1", version_warm(1)).await;
    // Replaced through A: B warms version 2 and drops version 1's instances.
    deploy(a, work.path(), "warm", hearth_fixtures::ECHO, warm).await;
    wait_for_status(b, "replaced version 1 by 2", version_warm(2)).await;
    // Deleted through A: nothing of it stays on B.
    a.client().delete("warm").await.expect("delete");
    wait_for_status(b, "dropped the deleted function's instances", |status| {
        status.instances == 0 && status.functions.is_empty()
    })
    .await;
}

/// After PostgreSQL comes back, a node that lost its change feed reads
/// every function again (anything may have changed meanwhile); if the store
/// goes away again before it could, the node still answers the functions it
/// knows, and refuses only what it never knew (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_serving_what_it_knows_when_the_store_goes_again_after_a_restart() {
    const FOLLOWING_AGAIN: &str = "following cluster changes again";
    let cluster = Cluster::start(1);
    let node = &cluster.nodes[0];
    let work = tempfile::tempdir().expect("tempdir");
    deploy(node, work.path(), "greet", hearth_fixtures::HELLO, "public = true\n").await;
    // Anonymous callers: a token would need the store too (a token cache
    // forgotten with the change feed is not trusted through an outage).
    let anonymous = reqwest::Client::new();
    let greet = || async {
        let response = anonymous.get(node.fn_url("greet", "/")).send().await.expect("greet");
        let status = response.status();
        (status.as_u16(), response.text().await.expect("body"))
    };
    assert_eq!(greet().await.0, 200);

    cluster.postgres.stop();
    cluster.postgres.start_server();
    // The node found its change feed again, and so marked what it knows
    // as possibly changed.
    let guard = Instant::now() + CONVERGE_GUARD;
    while !node.log().contains(FOLLOWING_AGAIN) {
        assert!(
            Instant::now() < guard,
            "the change feed never came back:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.postgres.stop();
    let (status, body) = greet().await;
    assert_eq!(status, 200, "a known function is served through the outage: {body}");
    let missing = anonymous
        .get(node.fn_url("never-deployed", "/"))
        .send()
        .await
        .expect("never deployed");
    problem(missing, 503).await;

    // Back again: the node reads the function from the store once more.
    cluster.postgres.start_server();
    assert_eq!(greet().await, (200, "hello from hearth\n".to_owned()));
}

/// Clients spread over the nodes while one node is killed and restarted on
/// its data directory and PostgreSQL is restarted: afterwards the fleet's
/// export, through any node, lists every acknowledged invocation once, and
/// a consumer that followed the cursor throughout saw each record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_ledger_lists_every_acknowledged_invocation_once() {
    const CLIENTS: usize = 6;
    /// Acknowledged invocations between two events.
    const STEP: usize = 150;
    let mut cluster = Cluster::start(3);
    let work = tempfile::tempdir().expect("tempdir");
    deploy(
        &cluster.nodes[0],
        work.path(),
        "echo",
        hearth_fixtures::ECHO,
        "public = true\n",
    )
    .await;
    for node in &cluster.nodes[1..] {
        converge(&node.fn_url("echo", "/"), None, 200, "deployed through A").await;
    }
    // Where each client sends its calls: `None` while its node is down. A
    // killed node's port is never called again: another test's server may
    // be listening on it by then.
    let (urls_tx, urls) = tokio::sync::watch::channel(
        cluster
            .nodes
            .iter()
            .map(|n| Some(n.fn_url("echo", "/")))
            .collect::<Vec<_>>(),
    );
    let done = Arc::new(AtomicUsize::new(0));
    let (progress_tx, progress) = tokio::sync::watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (mut urls, done, progress_tx, stop) = (urls.clone(), done.clone(), progress_tx.clone(), stop.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut acknowledged = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    // Its node is down: wait for it to come back.
                    let url = urls.wait_for(|urls| urls[client % 3].is_some()).await.expect("urls")[client % 3]
                        .clone()
                        .expect("up");
                    let Ok(response) = http.post(&url).body("payload").send().await else {
                        // Killed under this call.
                        continue;
                    };
                    let id = response
                        .headers()
                        .get("x-hearth-invocation-id")
                        .map(|v| v.to_str().expect("ascii").to_owned());
                    let status = response.status();
                    let Ok(body) = response.bytes().await else {
                        continue;
                    };
                    if urls.borrow()[client % 3].as_deref() != Some(url.as_str()) {
                        // Its node was killed meanwhile: whoever answered on
                        // that port, the answer is not the cluster's.
                        continue;
                    }
                    assert_eq!(
                        status,
                        200,
                        "invocations go on whatever the cluster does (node {}): {}",
                        client % 3,
                        String::from_utf8_lossy(&body)
                    );
                    acknowledged.push(id.expect("every answer names its invocation"));
                    progress_tx.send_replace(done.fetch_add(1, Ordering::SeqCst) + 1);
                }
                acknowledged
            })
        })
        .collect();
    // A consumer follows the fleet's cursor through node A, which stays up,
    // until it has as many records as the final export.
    let (total_tx, total) = tokio::sync::watch::channel(None);
    let follower = {
        let url = cluster.nodes[0].url.clone();
        tokio::spawn(async move { follow(&url, total).await })
    };
    let mut progress = progress;
    let mut reach = async |n: usize| {
        progress.wait_for(|done| *done >= n).await.expect("clients running");
    };

    reach(STEP).await;
    urls_tx.send_modify(|urls| urls[1] = None);
    drop(cluster.nodes.remove(1)); // SIGKILL under load
    reach(2 * STEP).await;
    let again = cluster.start_node(1);
    urls_tx.send_modify(|urls| urls[1] = Some(again.fn_url("echo", "/")));
    cluster.nodes.insert(1, again);
    // The restarted node has echo cached before the store goes away (an
    // uncached function is 503 during the outage, which the clients would
    // not expect).
    converge(
        &cluster.nodes[1].fn_url("echo", "/"),
        None,
        200,
        "restarted B serves echo",
    )
    .await;
    reach(3 * STEP).await;
    cluster.postgres.stop();
    // While PostgreSQL is away: a node stays ready and serves what it has
    // cached; what needs the store is refused as unavailable (503), not
    // failed.
    let a = &cluster.nodes[0];
    let ready = http().get(format!("{}/readyz", a.url)).send().await.expect("readyz");
    assert_eq!(ready.status(), 200, "a brief outage leaves the node ready");
    let missing = http()
        .get(a.fn_url("never-deployed", "/"))
        .send()
        .await
        .expect("cache miss");
    let refused = problem(missing, 503).await;
    assert_eq!(refused["status"], 503, "{refused}");
    // Without a token too: the node cannot tell whether it would be public.
    let anonymous = reqwest::Client::new()
        .get(a.fn_url("never-deployed", "/"))
        .send()
        .await
        .expect("anonymous cache miss");
    problem(anonymous, 503).await;
    reach(4 * STEP).await;
    cluster.postgres.start_server();
    reach(5 * STEP).await;
    stop.store(true, Ordering::SeqCst);
    let mut acknowledged = HashSet::new();
    for client in clients {
        for id in client.await.expect("client") {
            assert!(acknowledged.insert(id), "an invocation id was reused");
        }
    }

    // Each node's export ships its own records first: after one export per
    // node, the ledger has every node's.
    for node in &cluster.nodes {
        usage_export(node, "format=jsonl&limit=1").await;
    }
    let mut exported = HashSet::new();
    let output = cluster.nodes[2]
        .cli()
        .args(["usage", "export", "--format", "jsonl"])
        .output()
        .expect("hearth usage export");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for line in String::from_utf8(output.stdout).expect("utf-8").lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("record");
        let id = record["id"].as_str().expect("id").to_owned();
        assert!(exported.insert(id.clone()), "record {id} is listed twice");
    }
    let missing: Vec<_> = acknowledged.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged invocations are not in the fleet's export",
        missing.len(),
        acknowledged.len()
    );
    total_tx.send_replace(Some(exported.len()));
    let followed = tokio::time::timeout(CONVERGE_GUARD, follower)
        .await
        .expect("the follower reaches the export's end")
        .expect("follower");
    let seen: HashSet<_> = followed.into_iter().collect();
    assert_eq!(seen, exported, "the follower saw what the export lists");
}

/// Follows `GET /v1/usage` by its cursor until it has seen as many records
/// as `total` says, once it says; the record ids in the order seen. It
/// fails at once on a record it already had. Refusals while the ledger is
/// away (503) are retried.
async fn follow(url: &str, total: tokio::sync::watch::Receiver<Option<usize>>) -> Vec<String> {
    let http = reqwest::Client::new();
    let (mut cursor, mut seen, mut once) = (0u64, Vec::new(), HashSet::new());
    loop {
        if total.borrow().is_some_and(|total| seen.len() >= total) {
            return seen;
        }
        let response = http
            .get(format!("{url}/v1/usage?format=jsonl&limit=500&cursor={cursor}"))
            .bearer_auth(TOKEN)
            .send()
            .await;
        let response = match response {
            Ok(response) if response.status() == 200 => response,
            _ => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let next: u64 = response
            .headers()
            .get(hearth_client::NEXT_CURSOR_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .expect("a next cursor");
        let body = response.text().await.expect("body");
        let before = seen.len();
        for line in body.lines() {
            let record: serde_json::Value = serde_json::from_str(line).expect("record");
            let id = record["id"].as_str().expect("id").to_owned();
            assert!(once.insert(id.clone()), "the follower got {id} twice");
            seen.push(id);
        }
        cursor = next;
        if seen.len() == before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Garbage collection in a cluster also empties the shared bucket of blobs
/// no version references (a deleted function's), and keeps a live one's.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_cleans_the_shared_bucket() {
    let mut cluster = Cluster::start(1);
    let work = tempfile::tempdir().expect("tempdir");
    deploy(&cluster.nodes[0], work.path(), "keep", hearth_fixtures::HELLO, "").await;
    deploy(&cluster.nodes[0], work.path(), "gone", hearth_fixtures::ECHO, "").await;
    assert_eq!(cluster.s3.list("blobs/sha256/").len(), 2);
    cluster.nodes[0].client().delete("gone").await.expect("delete");
    // Restarted with collections every second and no grace: nothing is
    // being deployed now (a grace of 0 during a deploy would take its
    // blobs before its version is recorded).
    drop(cluster.nodes.remove(0));
    cluster.extra = ["--gc-interval-s", "1", "--gc-grace-s", "0"].map(String::from).to_vec();
    cluster.nodes.push(cluster.start_node(0));
    let node = &cluster.nodes[0];
    let guard = Instant::now() + CONVERGE_GUARD;
    while cluster.s3.list("blobs/sha256/").len() > 1 {
        assert!(Instant::now() < guard, "{:?}", cluster.s3.list("blobs/sha256/"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = crate::server::metrics_text(node).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("hearth_gc_removed_files_total")
            && l.contains("kind=\"bucket\"")
            && l.ends_with(" 1")),
        "{metrics}"
    );
    let response = http().get(node.fn_url("keep", "/")).send().await.expect("keep");
    assert_eq!(response.status(), 200, "the live function still runs");
}
