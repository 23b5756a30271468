//! The Grafana dashboard and the alert rules in `deploy/observability` name
//! only metrics Hearth exports: a real server, after a few invocations
//! (an inference call among them), exposes every one of them.

use std::collections::BTreeSet;
use std::path::Path;

use crate::inference::{classify, deploy_classify};
use crate::server::{Server, deploy, http, metrics_text};

/// Exported only by a node of a cluster (`--store-url postgres://…`).
const CLUSTER_ONLY: [&str; 3] = [
    "hearth_usage_unshipped",
    "hearth_usage_shipping_lag_seconds",
    "hearth_usage_shipping_total",
];

/// Every `hearth_…` metric name in `text`.
fn named(text: &str) -> BTreeSet<String> {
    text.match_indices("hearth_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn the_dashboard_and_alerts_name_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/observability");
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json")).expect("dashboard");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let alerts = std::fs::read_to_string(root.join("alerts.yaml")).expect("alerts");
    let wanted: BTreeSet<String> = named(&dashboard).union(&named(&alerts)).cloned().collect();
    assert!(wanted.len() > 10, "the scan found the metrics: {wanted:?}");

    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "public = true\n").await;
    for _ in 0..3 {
        let response = http().get(server.fn_url("hello", "/")).send().await.expect("hello");
        assert_eq!(response.status(), 200);
        response.text().await.expect("body");
    }
    deploy_classify(&server, tmp.path(), "classify").await;
    classify(&server, "classify", 1).await;
    let text = metrics_text(&server).await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| !exported.contains(*name) && !CLUSTER_ONLY.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "named by the dashboard or alerts but not exported: {missing:?}\nexported: {exported:?}"
    );
}
