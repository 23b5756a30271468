//! Per-tenant limits from the server's limits file: over a limit is a 429
//! with `Retry-After` and a problem naming the limit; other tenants are not
//! affected.

use crate::server::*;

const LIMITS: &str = r#"
[tenants.acme]
max_functions = 1
requests_per_second = 0.1
burst = 2
[tenants.beta]
max_concurrent = 1
"#;

fn operator_in(server: &Server, tenant: &str) -> hearth_client::Client {
    hearth_client::Client::new(&server.url, Some(TOKEN.into()), tenant).expect("client")
}

async fn deploy_in(
    server: &Server,
    root: &std::path::Path,
    tenant: &str,
    name: &str,
    component: &str,
) -> Result<u32, hearth_client::ClientError> {
    let dir = project(
        &root.join(tenant).join(name),
        name,
        component,
        "public = true\n[limits]\ntimeout_ms = 30000\n",
    );
    let project = hearth_client::Project::load(&dir).expect("project");
    operator_in(server, tenant)
        .deploy(&project, |_, _| {})
        .await
        .map(|v| v.version)
}

async fn limit_problem(response: reqwest::Response, limit: &str) {
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    let body = problem(response, 429).await;
    assert_eq!(body["key"], limit, "{body}");
    assert_eq!(body["outcome"], "rejected", "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| d.contains(limit)), "{body}");
}

#[tokio::test]
async fn tenants_are_held_to_their_limits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let limits = tmp.path().join("limits.toml");
    std::fs::write(&limits, LIMITS).expect("limits");
    let server = Server::start(
        &tmp.path().join("data"),
        &["--tenant-limits", limits.to_str().expect("utf-8")],
    );
    // Tenants come into being with their first token.
    operator_in(&server, "acme")
        .create_token(Some("acme"), "admin", None)
        .await
        .expect("acme");
    operator_in(&server, "beta")
        .create_token(Some("beta"), "admin", None)
        .await
        .expect("beta");

    // max_functions: a second function is refused; a redeploy of the first is not.
    deploy_in(&server, tmp.path(), "acme", "hello", hearth_fixtures::HELLO)
        .await
        .expect("first");
    deploy_in(&server, tmp.path(), "acme", "hello", hearth_fixtures::HELLO)
        .await
        .expect("redeploy");
    let err = deploy_in(&server, tmp.path(), "acme", "echo", hearth_fixtures::ECHO)
        .await
        .expect_err("second function");
    let hearth_client::ClientError::Api(problem) = err else {
        panic!("{err}")
    };
    assert_eq!(
        (problem.status, problem.key.as_deref()),
        (429, Some("max_functions")),
        "{problem}"
    );

    // requests_per_second: a burst of 2, then refused.
    let http = reqwest::Client::new();
    let url = format!("{}/fn/acme/hello/", server.url);
    for _ in 0..2 {
        assert_eq!(http.get(&url).send().await.expect("call").status(), 200);
    }
    limit_problem(http.get(&url).send().await.expect("call"), "requests_per_second").await;

    // max_concurrent: one call in flight, the next refused at once.
    deploy_in(&server, tmp.path(), "beta", "slow", hearth_fixtures::FAULTS)
        .await
        .expect("beta");
    let slow = tokio::spawn(
        http.get(format!("{}/fn/beta/slow/slow-body?ms=1000", server.url))
            .send(),
    );
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = operator_in(&server, "beta").status().await.expect("status");
        if status.functions.iter().any(|f| f.instances.busy == 1) {
            break;
        }
        assert!(std::time::Instant::now() < guard, "the slow call never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    limit_problem(
        http.get(format!("{}/fn/beta/slow/ok", server.url))
            .send()
            .await
            .expect("call"),
        "max_concurrent",
    )
    .await;
    let slow = slow.await.expect("task").expect("slow");
    assert_eq!(slow.text().await.expect("body"), "done\n");
    assert_eq!(
        http.get(format!("{}/fn/beta/slow/ok", server.url))
            .send()
            .await
            .expect("call")
            .status(),
        200
    );

    // The default tenant has no limits.
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;
    for _ in 0..5 {
        assert_eq!(
            http.get(server.fn_url("hello", "/"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("call")
                .status(),
            200
        );
    }
}

/// Without a limits file a deployer still cannot ask for the host's memory,
/// long deadlines, wide fan-out or the realtime class; the operator's file
/// raises each, per tenant.
#[tokio::test]
async fn built_in_limits_hold_until_the_operator_raises_them() {
    use reqwest::multipart::{Form, Part};
    let tmp = tempfile::tempdir().expect("tempdir");
    let hello = std::fs::read(hearth_fixtures::HELLO).expect("hello");
    let asks = [
        ("[limits]\nmemory_mb = 4096\n", "limits.memory_mb"),
        ("[limits]\ntimeout_ms = 600000\n", "limits.timeout_ms"),
        ("[scaling]\nmax_instances = 1000\n", "scaling.max_instances"),
        ("[scaling]\nqos = \"realtime\"\n", "scaling.qos"),
    ];
    let attempt = async |server: &Server, tenant: &str, ask: &str| {
        let form = Form::new()
            .part("manifest", Part::text(format!("name = \"big\"\n{ask}")))
            .part("component", Part::bytes(hello.clone()));
        http()
            .post(format!("{}/v1/functions?tenant={tenant}", server.url))
            .multipart(form)
            .send()
            .await
            .expect("deploy")
    };

    let server = Server::start(&tmp.path().join("plain"), &[]);
    for (ask, key) in asks {
        let refused = problem(attempt(&server, "default", ask).await, 422).await;
        assert_eq!(refused["key"], key, "{refused}");
        assert!(
            refused["detail"]
                .as_str()
                .is_some_and(|d| d.contains("--tenant-limits")),
            "{refused}"
        );
    }
    assert!(function_names(&server).await.is_empty(), "nothing was stored");
    drop(server);

    let limits = tmp.path().join("limits.toml");
    std::fs::write(
        &limits,
        "[tenants.acme]\nmax_memory_mb = 4096\nmax_timeout_ms = 600000\nmax_instances = 1000\nrealtime = true\n",
    )
    .expect("limits");
    let server = Server::start(
        &tmp.path().join("raised"),
        &["--tenant-limits", limits.to_str().expect("utf-8")],
    );
    operator_in(&server, "acme")
        .create_token(Some("acme"), "admin", None)
        .await
        .expect("acme");
    for (ask, key) in asks {
        let response = attempt(&server, "acme", ask).await;
        assert_eq!(
            response.status(),
            201,
            "{key}: {}",
            response.text().await.unwrap_or_default()
        );
        // Another tenant is still held to the built-in limits.
        problem(attempt(&server, "default", ask).await, 422).await;
    }
}
