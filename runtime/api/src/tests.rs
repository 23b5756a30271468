//! Every type survives a trip through JSON unchanged, and the names on the
//! wire are the ones the README documents.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::*;

/// Serializes `value`, checks the JSON against `expected` (when given), and
/// reads it back.
fn round_trip<T>(value: &T, expected: Option<serde_json::Value>)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let wire = serde_json::to_value(value).expect("serialize");
    if let Some(expected) = expected {
        assert_eq!(wire, expected);
    }
    let back: T = serde_json::from_value(wire).expect("deserialize");
    assert_eq!(&back, value);
}

fn version() -> FunctionVersion {
    FunctionVersion {
        tenant: "acme".into(),
        name: "ocr".into(),
        version: 3,
        component: "sha256:ab".into(),
        component_size: 10,
        created_at: "2026-11-30T10:00:00Z".into(),
        invoke_path: "/fn/acme/ocr/".into(),
        models: vec![ArtifactInfo {
            name: "rec".into(),
            digest: "sha256:cd".into(),
            size: 5,
        }],
        files: Vec::new(),
        start_up: None,
    }
}

fn token() -> TokenInfo {
    TokenInfo {
        id: "tok_1".into(),
        tenant: "acme".into(),
        role: "billing".into(),
        operator: false,
        created_at: "2026-11-30T10:00:00Z".into(),
        expires_at: Some("2026-12-30T10:00:00Z".into()),
        revoked_at: None,
        token: Some("hth_secret".into()),
    }
}

#[test]
fn problem() {
    let problem = Problem {
        kind: "urn:hearth:problem:timeout".into(),
        title: "Function deadline exceeded".into(),
        status: 504,
        detail: "30000 ms".into(),
        invocation_id: Some("0193".into()),
        outcome: Some("timeout".into()),
        key: None,
        error: None,
    };
    round_trip(
        &problem,
        Some(json!({
            "type": "urn:hearth:problem:timeout",
            "title": "Function deadline exceeded",
            "status": 504,
            "detail": "30000 ms",
            "invocation_id": "0193",
            "outcome": "timeout",
        })),
    );
    // A problem from another server may carry only its status.
    let bare: Problem = serde_json::from_value(json!({ "status": 404 })).expect("bare");
    assert_eq!((bare.status, bare.kind.as_str()), (404, ""));
}

#[test]
fn health_and_queries() {
    round_trip(&Health { status: "ready".into() }, Some(json!({ "status": "ready" })));
    round_trip(&TenantQuery::default(), Some(json!({})));
    round_trip(
        &TenantQuery {
            tenant: Some("acme".into()),
        },
        Some(json!({ "tenant": "acme" })),
    );
    round_trip(&SubmitQuery::default(), Some(json!({ "path": "/", "method": "POST" })));
    let defaulted: SubmitQuery = serde_json::from_value(json!({})).expect("defaults");
    assert_eq!(defaulted, SubmitQuery::default());
    let usage = UsageQuery {
        function: Some("ocr".into()),
        since: Some("2026-11-29".into()),
        limit: Some(10),
        cursor: Some("42".into()),
        ..UsageQuery::default()
    };
    round_trip(
        &usage,
        Some(json!({ "function": "ocr", "since": "2026-11-29", "limit": 10, "cursor": "42" })),
    );
}

#[test]
fn functions() {
    round_trip(&version(), None);
    let wire = serde_json::to_value(version()).expect("serialize");
    assert!(wire.get("files").is_none(), "empty lists are left out: {wire}");
    let plain = FunctionVersion {
        start_up: Some(StartUp::Plain {
            reason: "no export".into(),
        }),
        ..version()
    };
    round_trip(&plain.start_up, Some(json!({ "mode": "plain", "reason": "no export" })));
    round_trip(&Some(StartUp::Snapshot), Some(json!({ "mode": "snapshot" })));
    round_trip(
        &FunctionList {
            functions: vec![version()],
        },
        None,
    );
    round_trip(
        &FunctionDetail {
            function: version(),
            manifest: json!({ "name": "ocr" }),
            versions: vec![version()],
        },
        None,
    );
}

#[test]
fn status() {
    let status = Status {
        tenant: "acme".into(),
        devices: vec![DeviceStatus {
            id: "cpu".into(),
            kind: "cpu".into(),
            name: None,
            total_bytes: None,
            free_bytes_at_start: None,
        }],
        models: vec![WarmModel {
            digest: "sha256:cd".into(),
            placement: "auto".into(),
            device: "cpu".into(),
            size: 5,
            users: 1,
            runs: 2,
            calls: 3,
            busy_ms: 1.25,
        }],
        model_loads: 1,
        model_revivals: 4,
        cold_model_bytes: 5,
        instances: 2,
        max_instances: 1000,
        queued: 0,
        functions: vec![FunctionStatus {
            name: "ocr".into(),
            version: 3,
            models: vec![NamedModel {
                name: "rec".into(),
                digest: "sha256:cd".into(),
                warm: true,
            }],
            instances: InstanceStatus {
                idle: 1,
                queued: [("batch".to_owned(), 2)].into(),
                loaded: true,
                ..InstanceStatus::default()
            },
        }],
        nodes: vec![NodeStatus {
            id: "node-0193".into(),
            url: "http://10.0.0.7:8080".into(),
            started_at: "2026-11-30T23:00:00Z".into(),
            heartbeat_at: "2026-11-30T23:59:58Z".into(),
            details: json!({ "version": "0.1.0" }),
        }],
    };
    round_trip(&status, None);
    let wire = serde_json::to_value(&status).expect("serialize");
    assert_eq!(wire["devices"][0], json!({ "id": "cpu", "kind": "cpu" }));
    assert_eq!(wire["functions"][0]["instances"]["queued"]["batch"], 2);
}

#[test]
fn asynchronous_invocations() {
    let invocation = AsyncInvocation {
        id: "0193".into(),
        function: "ocr".into(),
        state: "succeeded".into(),
        attempts: 1,
        submitted_at: "2026-11-30T10:00:00Z".into(),
        started_at: Some("2026-11-30T10:00:01Z".into()),
        finished_at: Some("2026-11-30T10:00:02Z".into()),
        response: Some(StoredResponse {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: Some("hi".into()),
            body_base64: "aGk=".into(),
        }),
    };
    assert!(invocation.is_finished());
    round_trip(&invocation, None);
    let wire = serde_json::to_value(&invocation).expect("serialize");
    assert_eq!(wire["response"]["headers"][0], json!(["content-type", "text/plain"]));
}

#[test]
fn tokens() {
    round_trip(&token(), None);
    round_trip(&TokenList { tokens: vec![token()] }, None);
    let request = CreateToken {
        tenant: None,
        role: "invoker".into(),
        expires: Some("30d".into()),
    };
    round_trip(&request, Some(json!({ "role": "invoker", "expires": "30d" })));
    let unknown = serde_json::from_value::<CreateToken>(json!({ "role": "admin", "scope": "all" }));
    assert!(unknown.is_err(), "unknown keys are refused");
}

#[test]
fn usage_summary() {
    let row = UsageSummary {
        tenant: "acme".into(),
        function: "ocr".into(),
        version: 3,
        shadow: true,
        errors: 1,
        mean_wall_ms: 4.5,
        day: "2026-11-30".into(),
        invocations: 4,
        ran: 3,
        rejected: 1,
        cold_starts: 1,
        billed_ms: 120,
        guest_cpu_us: 900,
        compute_ms: 2.25,
        gpu_ms: 1.5,
        inference_calls: 2,
        bytes_in: 10,
        bytes_out: 20,
        cost: "0.000000120".into(),
        currency: "USD".into(),
    };
    round_trip(&UsageSummaryPage { rows: vec![row] }, None);
}
