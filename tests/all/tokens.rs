//! Tokens: created with a role for a tenant (shown once), listed without
//! secrets, revoked by id or by value with immediate effect, expiring.

use crate::server::*;

fn create(server: &Server, tenant: &str, role: &str, expires: Option<&str>) -> (String, String) {
    let mut command = server.cli();
    command.args(["tokens", "create", "--tenant", tenant, "--role", role, "-o", "json"]);
    if let Some(expires) = expires {
        command.args(["--expires", expires]);
    }
    let output = command.output().expect("cli");
    assert!(output.status.success(), "{output:?}");
    let created: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(created["role"], role);
    assert_eq!(created["tenant"], tenant);
    (
        created["id"].as_str().expect("id").to_owned(),
        created["token"].as_str().expect("token").to_owned(),
    )
}

fn client_for(server: &Server, tenant: &str, token: &str) -> hearth_client::Client {
    hearth_client::Client::new(&server.url, Some(token.to_owned()), tenant).expect("client")
}

async fn status_with(http: &reqwest::Client, url: &str, token: &str) -> reqwest::Response {
    http.get(url).bearer_auth(token).send().await.expect("request")
}

async fn assert_invalid_token(response: reqwest::Response) {
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    problem(response, 401).await;
}

#[tokio::test]
async fn tokens_carry_a_tenant_and_a_role_and_revocation_is_immediate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;

    let (_, deployer) = create(&server, "acme", "deployer", None);
    let (invoker_id, invoker) = create(&server, "acme", "invoker", None);
    let (_, billing) = create(&server, "acme", "billing", Some("30d"));

    // The deployer deploys into acme; the invoker invokes there.
    let project = project(&tmp.path().join("acme-hello"), "hello", hearth_fixtures::HELLO, "");
    let project = hearth_client::Project::load(&project).expect("project");
    client_for(&server, "acme", &deployer)
        .deploy(&project, |_, _| {})
        .await
        .expect("deployer deploys");
    let http = reqwest::Client::new();
    let acme_hello = format!("{}/fn/acme/hello/", server.url);
    let response = status_with(&http, &acme_hello, &invoker).await;
    assert_eq!(response.status(), 200);

    // Roles allow exactly their actions.
    // (Deploy and delete are one permission; a refused upload may reach the
    // client as a broken pipe before the 403, so the delete is asked.)
    let err = client_for(&server, "acme", &invoker)
        .delete("hello")
        .await
        .expect_err("invoker cannot delete");
    assert!(
        matches!(err, hearth_client::ClientError::Api(ref p) if p.status == 403),
        "{err}"
    );
    problem(status_with(&http, &acme_hello, &deployer).await, 403).await;
    let usage = status_with(&http, &format!("{}/v1/usage", server.url), &billing).await;
    assert_eq!(usage.status(), 200);
    problem(
        status_with(&http, &format!("{}/v1/functions", server.url), &billing).await,
        403,
    )
    .await;
    // Another tenant's function does not exist for acme.
    problem(status_with(&http, &server.fn_url("hello", "/"), &invoker).await, 404).await;
    // Only admins manage tokens.
    let err = client_for(&server, "acme", &deployer)
        .create_token(None, "admin", None)
        .await
        .expect_err("deployer cannot mint tokens");
    assert!(
        matches!(err, hearth_client::ClientError::Api(ref p) if p.status == 403),
        "{err}"
    );

    // Listing shows the tokens, never a secret.
    let output = server
        .cli()
        .args(["tokens", "list", "--tenant", "acme", "-o", "json"])
        .output()
        .expect("cli");
    assert!(output.status.success(), "{output:?}");
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|t| t.get("token").is_none()), "{listed:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    for secret in [&deployer, &invoker, &billing] {
        assert!(!text.contains(secret.as_str()));
    }

    // Revocation by id applies to the next request on the same connection.
    let output = server
        .cli()
        .args(["tokens", "revoke", &invoker_id])
        .output()
        .expect("cli");
    assert!(output.status.success(), "{output:?}");
    assert_invalid_token(status_with(&http, &acme_hello, &invoker).await).await;
    // And by the token itself, which never goes in a URL: the path refuses
    // it, the CLI sends it in a body.
    let in_path = http
        .delete(format!("{}/v1/tokens/{billing}", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("delete");
    let body = problem(in_path, 400).await;
    assert!(
        body["detail"].as_str().expect("detail").contains("never goes in a URL"),
        "{body}"
    );
    let output = server.cli().args(["tokens", "revoke", &billing]).output().expect("cli");
    assert!(output.status.success(), "{output:?}");
    assert_invalid_token(status_with(&http, &format!("{}/v1/usage", server.url), &billing).await).await;

    // Expiry.
    let (_, short) = create(&server, "acme", "invoker", Some("1s"));
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let response = status_with(&http, &acme_hello, &short).await;
        if response.status() == 401 {
            assert_invalid_token(response).await;
            break;
        }
        assert_eq!(response.status(), 200);
        assert!(std::time::Instant::now() < guard, "the token never expired");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Bad requests are precise.
    let bad = http
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "tenant": "acme", "role": "root" }))
        .send()
        .await
        .expect("bad role");
    problem(bad, 400).await;
    let bad = http
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "tenant": "acme", "role": "invoker", "expires": "soon" }))
        .send()
        .await
        .expect("bad expiry");
    problem(bad, 400).await;
    let bad = http
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(TOKEN)
        .body("not json")
        .send()
        .await
        .expect("not json");
    problem(bad, 400).await;
}

/// A flood of random tokens costs the store a bounded number of lookups
/// (`hearth_auth_events_total{event="store_lookup"}` counts them): at most
/// the failed-lookup burst plus its rate for the flood's duration, while a
/// cached token goes on working.
#[tokio::test]
async fn random_tokens_cost_a_bounded_number_of_store_lookups() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    let http = reqwest::Client::new();
    let functions = format!("{}/v1/functions", server.url);
    assert_eq!(status_with(&http, &functions, TOKEN).await.status(), 200);
    let lookups = async || {
        let text = status_with(&http, &format!("{}/metrics", server.url), TOKEN)
            .await
            .text()
            .await
            .expect("metrics");
        text.lines()
            .find(|l| l.starts_with("hearth_auth_events_total") && l.contains("event=\"store_lookup\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no lookup counter in {text}")) as u64
    };
    let before = lookups().await;
    let started = std::time::Instant::now();
    let (mut unknown, mut throttled) = (0, 0);
    for _ in 0..1_000 {
        let random = format!("hth_{}", uuid::Uuid::new_v4().simple());
        let response = status_with(&http, &functions, &random).await;
        match response.status().as_u16() {
            401 => unknown += 1,
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                let body = problem(response, 503).await;
                assert!(
                    body["detail"].as_str().is_some_and(|d| d.contains("unknown tokens")),
                    "{body}"
                );
                throttled += 1;
            }
            other => panic!("a random token got {other}"),
        }
    }
    let seconds = started.elapsed().as_secs() + 1;
    assert_eq!(
        status_with(&http, &functions, TOKEN).await.status(),
        200,
        "a cached token is not throttled"
    );
    let spent = lookups().await - before;
    // 50 in a burst and 10 a second (hearth_auth's documented bound), and
    // the operator token's own re-reads (its cache lasts 5 s).
    let bound = 50 + 10 * seconds + seconds.div_ceil(5) + 1;
    assert!(
        spent <= bound,
        "{spent} lookups for 1,000 random tokens in {seconds} s (bound {bound})"
    );
    assert_eq!(unknown + throttled, 1_000);
}
