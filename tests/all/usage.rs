//! Usage records: one per invocation with the right contents and cost, and
//! three export formats that agree.

use std::collections::HashMap;

use serde_json::Value;

use crate::inference::deploy_classify;
use crate::server::*;

const PRICES: &str = r#"
version = "test-2"
currency = "EUR"
per_invocation = 0.001
per_gb_second = 0.5
per_cpu_second = 2.0
[per_compute_second]
cpu = 5.0
[per_gpu_second]
cuda = 3.0
"#;

/// The cost the price table above gives a record, in billionths.
fn expected_cost_nanos(record: &Value) -> i64 {
    let outcome = record["outcome"].as_str().expect("outcome");
    if outcome == "rejected" || outcome == "bad_request" {
        return 0;
    }
    let billed_s = record["billed_ms"].as_f64().expect("billed") / 1e3;
    let gib = record["memory_peak_bytes"].as_f64().expect("memory") / (1u64 << 30) as f64;
    let cpu_s = record["guest_cpu_us"].as_f64().expect("cpu") / 1e6;
    let compute_s = record["compute_ms"].as_f64().expect("compute") / 1e3;
    let gpu_s = record["gpu_ms"].as_f64().expect("gpu") / 1e3;
    ((0.001 + 0.5 * gib * billed_s + 2.0 * cpu_s + 5.0 * (compute_s - gpu_s) + 3.0 * gpu_s) * 1e9).round() as i64
}

fn cost_nanos(cost: &str) -> i64 {
    let (whole, frac) = cost.split_once('.').expect("decimal");
    whole.parse::<i64>().expect("whole") * 1_000_000_000 + frac.parse::<i64>().expect("fraction")
}

#[tokio::test]
async fn every_invocation_leaves_one_priced_record_and_exports_agree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let prices = tmp.path().join("prices.toml");
    std::fs::write(&prices, PRICES).expect("prices");
    let server = Server::start(
        &tmp.path().join("data"),
        &[
            "--price-table",
            prices.to_str().expect("utf-8"),
            "--max-queued-per-function",
            "0",
        ],
    );
    deploy(&server, tmp.path(), "echo", hearth_fixtures::ECHO, "").await;
    deploy_classify(&server, tmp.path(), "classify").await;
    deploy(
        &server,
        tmp.path(),
        "faults",
        hearth_fixtures::FAULTS,
        "[limits]\ntimeout_ms = 300\n[scaling]\nmax_instances = 1\n",
    )
    .await;

    let mut ids: HashMap<&str, String> = HashMap::new();
    let id_of = |response: &reqwest::Response| {
        response.headers()["x-hearth-invocation-id"]
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    let echo = http()
        .post(server.fn_url("echo", "/x"))
        .body("twelve bytes")
        .send()
        .await
        .expect("echo");
    assert_eq!(echo.status(), 200);
    ids.insert("echo", id_of(&echo));
    let echo_len = echo.bytes().await.expect("body").len() as u64;

    let classify = http()
        .post(server.fn_url("classify", "/"))
        .json(&serde_json::json!({ "input": hearth_fixtures::models::mlp_input(1) }))
        .send()
        .await
        .expect("classify");
    assert_eq!(classify.status(), 200);
    ids.insert("classify", id_of(&classify));
    classify.bytes().await.expect("body");

    let trap = http().get(server.fn_url("faults", "/trap")).send().await.expect("trap");
    ids.insert("trap", id_of(&trap));
    problem(trap, 500).await;
    let timeout = http().get(server.fn_url("faults", "/loop")).send().await.expect("loop");
    ids.insert("timeout", id_of(&timeout));
    problem(timeout, 504).await;

    // One slow call holds the only instance; with no queue the next is refused.
    let slow = tokio::spawn(http().get(server.fn_url("faults", "/slow-body?ms=250")).send());
    wait_for_instances(&server, "faults", "busy", |p| p.busy == 1).await;
    let rejected = http()
        .get(server.fn_url("faults", "/ok"))
        .send()
        .await
        .expect("rejected");
    ids.insert("rejected", id_of(&rejected));
    problem(rejected, 429).await;
    let slow = slow.await.expect("task").expect("slow");
    ids.insert("slow", id_of(&slow));
    assert_eq!(slow.text().await.expect("body"), "done\n");

    // Unknown functions and bad tokens are nobody's invocations: no record.
    let missing = http().get(server.fn_url("missing", "/")).send().await.expect("missing");
    assert_eq!(missing.status(), 404);

    let jsonl = usage_export(&server, "format=jsonl").await;
    let records: Vec<Value> = jsonl
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(records.len(), ids.len(), "one record per invocation: {jsonl}");
    let by_id: HashMap<&str, &Value> = records.iter().map(|r| (r["id"].as_str().expect("id"), r)).collect();
    let record = |name: &str| {
        *by_id
            .get(ids[name].as_str())
            .unwrap_or_else(|| panic!("no record for {name}"))
    };

    let r = record("echo");
    assert_eq!((r["status"].as_u64(), r["outcome"].as_str()), (Some(200), Some("ok")));
    assert_eq!(
        (r["tenant"].as_str(), r["function"].as_str(), r["version"].as_u64()),
        (Some("default"), Some("echo"), Some(1))
    );
    assert_eq!(r["cold_start"], true);
    assert_eq!(
        (&r["invocation_id"], r["attempt"].as_u64()),
        (&r["id"], Some(1)),
        "a synchronous call is its own invocation"
    );
    assert_eq!(r["bytes_in"], 12);
    assert_eq!(r["bytes_out"].as_u64(), Some(echo_len));
    assert!(r["billed_ms"].as_u64().is_some_and(|ms| ms >= 1));
    assert!(r["billed_ms"].as_f64() >= r["wall_ms"].as_f64());
    assert!(r["memory_peak_bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(r["guest_cpu_us"].as_u64().is_some_and(|us| us > 0));
    assert_eq!(
        (r["device"].as_str(), r["inference_calls"].as_u64()),
        (Some("cpu"), Some(0))
    );
    assert_eq!(
        (r["price_version"].as_str(), r["currency"].as_str()),
        (Some("test-2"), Some("EUR"))
    );

    let r = record("classify");
    assert_eq!(r["outcome"], "ok");
    assert_eq!(
        (r["device"].as_str(), r["inference_calls"].as_u64()),
        (Some("cpu"), Some(1))
    );
    assert!(r["batched_with"].as_f64().is_some_and(|b| b >= 1.0));
    assert_eq!(r["gpu_ms"], 0.0, "CPU inference has no GPU time");
    assert!(
        r["compute_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "CPU inference is billed its compute: {r}"
    );

    let r = record("trap");
    assert_eq!(
        (r["status"].as_u64(), r["outcome"].as_str()),
        (Some(500), Some("guest_trap"))
    );
    let r = record("timeout");
    assert_eq!(
        (r["status"].as_u64(), r["outcome"].as_str()),
        (Some(504), Some("timeout"))
    );
    assert!(r["wall_ms"].as_f64().is_some_and(|ms| ms >= 300.0));
    let r = record("rejected");
    assert_eq!(
        (r["status"].as_u64(), r["outcome"].as_str()),
        (Some(429), Some("rejected"))
    );
    assert_eq!(
        (r["billed_ms"].as_u64(), r["cost"].as_str()),
        (Some(0), Some("0.000000000"))
    );

    for r in &records {
        let cost = cost_nanos(r["cost"].as_str().expect("cost"));
        let expected = expected_cost_nanos(r);
        assert!((cost - expected).abs() <= 1, "{r}: cost {cost} vs {expected}");
    }

    // CSV and CloudEvents say the same as JSON lines.
    let csv_text = usage_export(&server, "format=csv").await;
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let headers = reader.headers().expect("header").clone();
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("csv row")).collect();
    assert_eq!(rows.len(), records.len());
    for (row, record) in rows.iter().zip(&records) {
        for (name, value) in headers.iter().zip(row.iter()) {
            let json = &record[name];
            let as_text = match json {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(value, as_text, "column {name}");
        }
    }
    let events = usage_export(&server, "format=cloudevents").await;
    let events: Vec<cloudevents::Event> = events
        .lines()
        .map(|line| serde_json::from_str(line).expect("CloudEvent"))
        .collect();
    assert_eq!(events.len(), records.len());
    for (event, record) in events.iter().zip(&records) {
        use cloudevents::AttributesReader as _;
        assert_eq!(event.id(), record["id"].as_str().expect("id"), "event id = record id");
        assert_eq!(event.subject(), Some("default"), "subject = tenant");
        assert_eq!(event.ty(), "dev.hearth.usage.v1");
        let Some(cloudevents::Data::Json(data)) = event.data() else {
            panic!("JSON data: {event}");
        };
        assert_eq!(data, record);
    }

    // A page at a time covers the same records.
    let page = http()
        .get(format!("{}/v1/usage?limit=4", server.url))
        .send()
        .await
        .expect("page");
    let cursor = page.headers()["x-hearth-next-cursor"]
        .to_str()
        .expect("cursor")
        .to_owned();
    assert_eq!(page.text().await.expect("body").lines().count(), 4);
    let rest = http()
        .get(format!("{}/v1/usage?cursor={cursor}", server.url))
        .send()
        .await
        .expect("rest");
    assert_eq!(rest.text().await.expect("body").lines().count(), records.len() - 4);

    // The daily summary adds up.
    let summary = server
        .client()
        .usage_summary(&hearth_client::UsageQuery::default())
        .await
        .expect("summary");
    let faults = summary.iter().find(|row| row.function == "faults").expect("faults row");
    assert_eq!((faults.invocations, faults.rejected, faults.ran), (4, 1, 3));

    // The CLI streams to a file.
    let out = tmp.path().join("usage.csv");
    let status = server
        .cli()
        .args(["usage", "export", "--format", "csv", "--output"])
        .arg(&out)
        .status()
        .expect("cli");
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&out).expect("export file"), csv_text);
}

/// A client that gives up while its guest is still running: the guest runs
/// to its end anyway (the call was started in the client's connection task),
/// its instance comes back warm, exactly one record says 499, and the server
/// keeps serving.
#[tokio::test]
async fn a_client_that_gives_up_mid_call_leaves_one_record_and_the_instance_returns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(
        &server,
        tmp.path(),
        "faults",
        hearth_fixtures::FAULTS,
        "public = true\n",
    )
    .await;

    // The guest sleeps 2 s; the client hangs up after 100 ms.
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(100))
        .build()
        .expect("client");
    let gave_up = impatient.get(server.fn_url("faults", "/sleep?ms=2000")).send().await;
    assert!(
        gave_up.is_err_and(|e| e.is_timeout()),
        "the client should have timed out"
    );

    let guard = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let record = loop {
        let jsonl = usage_export(&server, "format=jsonl&function=faults").await;
        let records: Vec<Value> = jsonl
            .lines()
            .map(|line| serde_json::from_str(line).expect("record"))
            .collect();
        if !records.is_empty() {
            assert_eq!(records.len(), 1, "{jsonl}");
            break records.into_iter().next().expect("one");
        }
        assert!(std::time::Instant::now() < guard, "no record for the abandoned call");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(record["status"], 499, "{record}");
    assert!(
        record["wall_ms"].as_f64().is_some_and(|ms| ms >= 2000.0),
        "the guest ran to its end: {record}"
    );

    let pool = wait_for_instances(&server, "faults", "got its instance back", |p| {
        p.busy == 0 && p.idle == 1
    })
    .await;
    assert_eq!(pool.cold_starts, 1, "{pool:?}");
    let response = http()
        .get(server.fn_url("faults", "/sleep?ms=1"))
        .send()
        .await
        .expect("again");
    assert_eq!(response.status(), 200);
    assert_eq!(
        instances(&server, "faults").await.warm_starts,
        1,
        "the instance was reused"
    );
}
