//! Crash safety of usage records: under concurrent load the server is killed
//! with SIGKILL at a random moment, five times; every invocation a client
//! saw complete has exactly one record afterwards, and no record is doubled.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rand::Rng as _;

use crate::server::*;

const ROUNDS: usize = 5;
const CLIENTS: usize = 16;

#[tokio::test]
async fn every_completed_invocation_has_exactly_one_record_after_sigkill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut completed: HashSet<String> = HashSet::new();
    let mut rng = rand::rng();
    for round in 0..ROUNDS {
        let server = Server::start(&data, &[]);
        if round == 0 {
            deploy(&server, tmp.path(), "echo", hearth_fixtures::ECHO, "public = true\n").await;
        }
        // Kill after a random number of completed calls: a random moment,
        // chosen by events rather than by the clock.
        let kill_after = rng.random_range(20..300);
        let done = Arc::new(AtomicUsize::new(0));
        let (enough_tx, enough_rx) = tokio::sync::watch::channel(false);
        let enough_tx = Arc::new(enough_tx);
        // Set before the kill: an answer read after it may come from
        // another test's server given the freed port, so it is not counted.
        let killed = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let url = server.fn_url("echo", &format!("/round{round}/client{client}"));
            let (done, enough_tx, killed) = (done.clone(), enough_tx.clone(), killed.clone());
            clients.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut seen = Vec::new();
                loop {
                    let Ok(response) = http.post(&url).body("payload").send().await else {
                        break;
                    };
                    let id = response
                        .headers()
                        .get("x-hearth-invocation-id")
                        .map(|v| v.to_str().expect("ascii").to_owned());
                    // Complete means the whole body arrived.
                    if response.bytes().await.is_err() || killed.load(Ordering::SeqCst) {
                        break;
                    }
                    seen.push(id.expect("every answer names its invocation"));
                    if done.fetch_add(1, Ordering::SeqCst) + 1 >= kill_after {
                        let _ = enough_tx.send(true);
                    }
                }
                seen
            }));
        }
        let mut enough = enough_rx;
        enough.wait_for(|e| *e).await.expect("clients running");
        killed.store(true, Ordering::SeqCst);
        drop(server); // SIGKILL, mid-load
        for client in clients {
            for id in client.await.expect("client task") {
                assert!(completed.insert(id), "an invocation id was reused");
            }
        }
    }

    let server = Server::start(&data, &[]);
    let export = usage_export(&server, "format=jsonl").await;
    // A record's id is its invocation's (the table's key): the same record
    // cannot be listed twice. What can go wrong is a missing record, or a
    // record for an invocation that never ran.
    let recorded: HashSet<String> = export
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).expect("record");
            record["id"].as_str().expect("id").to_owned()
        })
        .collect();
    let missing: Vec<&String> = completed.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} of {} completed invocations have no record: {missing:?}",
        missing.len(),
        completed.len()
    );
    // The rest were in flight when a kill came, or answered just as it came
    // (and not counted): at most one per client per round (each client has
    // one request open at a time, and stops at the kill).
    let extra = recorded.len() - completed.len();
    assert!(
        extra <= ROUNDS * CLIENTS,
        "{extra} records belong to no completed invocation (at most {} were in flight at the kills)",
        ROUNDS * CLIENTS
    );
    assert!(completed.len() >= ROUNDS * 20, "the load ran: {}", completed.len());
}
