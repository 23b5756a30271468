//! The response cache (`[cache]` in the manifest): a repeated request is
//! answered without running anything, with a record of its own; never
//! across versions; within its byte bound.

use crate::server::{Server, deploy, http, instances, usage_export};

const CACHED: &str = "[cache]\nttl_s = 600\nmax_bytes = 4096\nvary = [\"content-type\"]\n";

/// `POST /fn/default/{target}/` with `body` and a content type: (cache
/// header, version header, body).
async fn post(server: &Server, target: &str, body: &str, content_type: &str) -> (String, String, String) {
    let response = http()
        .post(server.fn_url(target, "/items?x=1"))
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().expect("text").to_owned())
            .unwrap_or_default()
    };
    let (cache, version) = (header("x-hearth-cache"), header("x-hearth-version"));
    (cache, version, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_request_is_answered_from_the_cache_of_its_own_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "cached", hearth_fixtures::ECHO, CACHED).await;

    let (cache, version, first) = post(&server, "cached", "a", "text/plain").await;
    assert_eq!((cache.as_str(), version.as_str()), ("miss", "1"));
    let ran = instances(&server, "cached").await;
    let (cache, version, again) = post(&server, "cached", "a", "text/plain").await;
    assert_eq!((cache.as_str(), version.as_str()), ("hit", "1"));
    assert_eq!(again, first, "the stored answer, byte for byte");
    let after = instances(&server, "cached").await;
    assert_eq!(
        (after.cold_starts, after.warm_starts),
        (ran.cold_starts, ran.warm_starts),
        "a hit uses no instance"
    );
    // Another body, another vary header: misses.
    assert_eq!(post(&server, "cached", "b", "text/plain").await.0, "miss");
    assert_eq!(post(&server, "cached", "a", "application/json").await.0, "miss");
    assert_eq!(post(&server, "cached", "a", "application/json").await.0, "hit");

    // A new version never answers from the old one's entries.
    deploy(&server, &tmp.path().join("v2"), "cached", hearth_fixtures::ECHO, CACHED).await;
    let (cache, version, _) = post(&server, "cached", "a", "text/plain").await;
    assert_eq!((cache.as_str(), version.as_str()), ("miss", "2"));
    assert_eq!(post(&server, "cached", "a", "text/plain").await.0, "hit");
    let (_, version, _) = post(&server, "cached@1", "a", "text/plain").await;
    assert_eq!(version, "1");

    // Each hit left a record: nothing ran, priced as a hit.
    let records: Vec<serde_json::Value> = usage_export(&server, "function=cached")
        .await
        .lines()
        .map(|line| serde_json::from_str(line).expect("record"))
        .collect();
    let hits: Vec<&serde_json::Value> = records.iter().filter(|r| r["outcome"] == "cache_hit").collect();
    assert_eq!(hits.len(), 3, "{records:?}");
    for hit in hits {
        assert_eq!(
            (&hit["guest_cpu_us"], &hit["billed_ms"], &hit["status"]),
            (&0.into(), &0.into(), &200.into())
        );
        assert_eq!(hit["cost"], "0.000000020", "per_cache_hit of the built-in table: {hit}");
        assert!(hit["bytes_out"].as_u64().expect("bytes") > 0);
    }
}

/// Entries past `max_bytes` push out the least recently used.
#[tokio::test(flavor = "multi_thread")]
async fn the_cache_stays_within_its_byte_bound() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "cached", hearth_fixtures::ECHO, CACHED).await;
    assert_eq!(post(&server, "cached", "first", "text/plain").await.0, "miss");
    assert_eq!(post(&server, "cached", "first", "text/plain").await.0, "hit");
    // Each echo answer is a few hundred bytes: 40 of them cannot all fit
    // in 4 KiB, so the first (least recently used) goes.
    for i in 0..40 {
        assert_eq!(
            post(&server, "cached", &format!("filler {i}"), "text/plain").await.0,
            "miss"
        );
    }
    assert_eq!(
        post(&server, "cached", "first", "text/plain").await.0,
        "miss",
        "evicted"
    );
    assert_eq!(
        post(&server, "cached", "filler 39", "text/plain").await.0,
        "hit",
        "the newest stays"
    );
}
