//! A cluster: three real `hearth serve` nodes on loopback sharing one real
//! PostgreSQL (`--store-url`) and one real S3 API server (moto,
//! `--blob-url`). Each node has a data directory of its own, which starts
//! empty: what it runs comes from the bucket.

use std::time::{Duration, Instant};

use hearth_services::{Postgres, S3};

use crate::asynchronous::wait_finished;
use crate::inference::{classify, deploy_classify};
use crate::server::{Server, TOKEN, deploy, http};

/// How long a change may take to reach the other nodes before the test
/// fails (a hang guard: the convergence time itself is a bench figure).
const CONVERGE_GUARD: Duration = Duration::from_secs(10);

/// The nodes' lease: a node silent this long counts as gone.
const LEASE_S: u64 = 2;

struct Cluster {
    nodes: Vec<Server>,
    s3: S3,
    // Dropped last: the nodes stop before their database does.
    postgres: Postgres,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(nodes: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let postgres = Postgres::start();
        let store_url = postgres.create_database("hearth");
        let s3 = S3::start();
        let blob_url = format!("s3://{}/blobs", S3::BUCKET);
        let env = s3.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let nodes = (0..nodes)
            .map(|i| {
                Server::start_with_env(
                    &dir.path().join(format!("node{i}")),
                    &[
                        "--store-url",
                        &store_url,
                        "--blob-url",
                        &blob_url,
                        "--async-lease-s",
                        &LEASE_S.to_string(),
                    ],
                    &env,
                )
            })
            .collect();
        Cluster {
            nodes,
            s3,
            postgres,
            _dir: dir,
        }
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
    let status = a.client().status().await.expect("status");
    assert_eq!(status.nodes.len(), 3, "every node heartbeats: {:?}", status.nodes);
    deploy(
        a,
        work.path(),
        "slow",
        hearth_fixtures::FAULTS,
        "[limits]\ntimeout_ms = 60000\n",
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
