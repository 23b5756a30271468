//! Every error a user can cause: precise status, problem+json body, and the
//! server keeps serving afterwards.

use futures::StreamExt as _;
use reqwest::multipart::{Form, Part};

use crate::server::{Server, deploy, function_names, http, problem, still_serves};

/// `faults` has a deadline no fault can reach by accident on a loaded
/// machine; `slow` (the same component) has a short one, for the deadline cases.
const FAULTS_LIMITS: &str = "[limits]\nmemory_mb = 32\ntimeout_ms = 30000\n";
const SLOW_LIMITS: &str = "[limits]\nmemory_mb = 32\ntimeout_ms = 300\n";

async fn server_with_faults(tmp: &std::path::Path, extra_args: &[&str]) -> Server {
    let server = Server::start(&tmp.join("data"), extra_args);
    deploy(&server, tmp, "hello", hearth_fixtures::HELLO, "").await;
    deploy(&server, tmp, "faults", hearth_fixtures::FAULTS, FAULTS_LIMITS).await;
    deploy(&server, tmp, "slow", hearth_fixtures::FAULTS, SLOW_LIMITS).await;
    server
}

fn upload(manifest: &str, component: Vec<u8>) -> Form {
    Form::new()
        .part("manifest", Part::text(manifest.to_owned()))
        .part("component", Part::bytes(component))
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_faults_map_to_precise_problems() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server_with_faults(tmp.path(), &[]).await;
    let call = |path: &str| http().get(server.fn_url("faults", path)).send();
    let call_slow = |path: &str| http().get(server.fn_url("slow", path)).send();

    let body = problem(call("/trap").await.expect("trap"), 500).await;
    assert_eq!(body["type"], "urn:hearth:problem:guest-trap");
    assert!(
        body["detail"].as_str().expect("detail").contains("unreachable"),
        "{body}"
    );
    assert!(body["invocation_id"].is_string());
    still_serves(&server).await;

    let body = problem(call_slow("/loop").await.expect("loop"), 504).await;
    assert_eq!(body["outcome"], "timeout");
    assert!(body["detail"].as_str().expect("detail").contains("300 ms"), "{body}");
    still_serves(&server).await;

    // Parked in a host call (sleeping past the deadline): the deadline still fires.
    let body = problem(call_slow("/sleep?ms=60000").await.expect("sleep"), 504).await;
    assert_eq!(body["outcome"], "timeout");
    still_serves(&server).await;

    let body = problem(call("/membomb").await.expect("membomb"), 500).await;
    assert_eq!(body["outcome"], "memory_limit");
    assert!(body["detail"].as_str().expect("detail").contains("32 MiB"), "{body}");
    still_serves(&server).await;

    let body = problem(call("/stack").await.expect("stack"), 500).await;
    assert_eq!(body["type"], "urn:hearth:problem:guest-trap");
    still_serves(&server).await;

    // Host calls made with the guest's stack nearly used up run on the
    // headroom wasmtime keeps beyond the guest's stack: still a clean trap.
    let body = problem(call("/stack-host").await.expect("stack through host calls"), 500).await;
    assert_eq!(body["type"], "urn:hearth:problem:guest-trap");
    assert!(body["detail"].as_str().expect("detail").contains("stack"), "{body}");
    still_serves(&server).await;

    // Memory the host allocates for the guest (random bytes, copied into
    // guest memory) is held to the guest's limit too; a single request
    // larger than wasmtime-wasi's cap is refused before the host allocates it.
    let rss_before = server.rss_kib();
    let body = problem(call("/host-bomb?mb=8").await.expect("host bomb"), 500).await;
    assert_eq!(body["outcome"], "memory_limit", "{body}");
    let body = problem(call("/host-bomb?mb=4096").await.expect("huge host call"), 500).await;
    assert_eq!(body["outcome"], "guest_trap", "{body}");
    assert!(
        body["detail"].as_str().expect("detail").contains("exceeds limit"),
        "{body}"
    );
    still_serves(&server).await;
    let grown_mib = server.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 256,
        "host-side allocations stayed bounded: RSS grew {grown_mib} MiB"
    );

    let response = call("/").await.expect("ok");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn wasi_nn_handles_a_guest_does_not_own_trap_only_that_instance() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;
    deploy(&server, tmp.path(), "probe-a", hearth_fixtures::NNPROBE, "").await;
    deploy(&server, tmp.path(), "probe-b", hearth_fixtures::NNPROBE, "").await;
    let call = |function: &str, query: &str| http().get(server.fn_url(function, &format!("/handle?{query}"))).send();

    for kind in ["random", "freed"] {
        let body = problem(call("probe-a", &format!("kind={kind}")).await.expect(kind), 500).await;
        assert_eq!(body["type"], "urn:hearth:problem:guest-trap", "{kind}: {body}");
        assert!(
            body["detail"].as_str().expect("detail").contains("handle"),
            "{kind}: {body}"
        );
        still_serves(&server).await;
    }

    // A live tensor in one instance; its number used by another instance.
    let leaked: serde_json::Value = call("probe-a", "kind=leak")
        .await
        .expect("leak")
        .json()
        .await
        .expect("json");
    let handle = leaked["handle"].as_u64().expect("handle number");
    let body = problem(
        call("probe-b", &format!("kind=use&n={handle}")).await.expect("use"),
        500,
    )
    .await;
    assert_eq!(body["type"], "urn:hearth:problem:guest-trap", "{body}");
    // The instance that owns it still uses it.
    let own = call("probe-a", &format!("kind=use&n={handle}")).await.expect("own");
    assert_eq!(own.status(), 200, "{}", own.text().await.unwrap_or_default());
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_function_and_unknown_route_are_404() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server_with_faults(tmp.path(), &[]).await;
    let response = http().get(server.fn_url("nope", "/x")).send().await.expect("invoke");
    assert!(response.headers().contains_key("x-hearth-invocation-id"));
    let body = problem(response, 404).await;
    assert!(body["detail"].as_str().expect("detail").contains("nope"));
    // Without a token, a missing function is indistinguishable from a private one.
    let response = reqwest::get(server.fn_url("nope", "/")).await.expect("anonymous");
    problem(response, 401).await;
    // A known path with a method it does not take: 405, a problem, `Allow`.
    let response = http()
        .put(format!("{}/v1/functions/hello", server.url))
        .send()
        .await
        .expect("put");
    let allow = response.headers()["allow"].to_str().expect("allow").to_owned();
    assert!(allow.contains("GET") && allow.contains("DELETE"), "{allow}");
    problem(response, 405).await;
    // A query that does not parse: 400, a problem (axum's own answer is text).
    let response = http()
        .get(format!("{}/v1/usage?limit=ten", server.url))
        .send()
        .await
        .expect("usage");
    problem(response, 400).await;
    for path in [
        "/fn/other-tenant/hello/",
        "/fn/default/..%2f..%2fetc/",
        "/fn/Default/hello/",
        "/nothing-here",
    ] {
        let response = http().get(format!("{}{path}", server.url)).send().await.expect("get");
        problem(response, 404).await;
    }
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_get_401_with_www_authenticate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server_with_faults(tmp.path(), &[]).await;
    let anonymous = reqwest::Client::new();
    let cases = [
        (None, "Bearer realm=\"hearth\""),
        (Some("Bearer not-a-real-token"), "error=\"invalid_token\""),
        (Some("Basic dXNlcjpwYXNz"), "error=\"invalid_token\""),
    ];
    for url in [server.fn_url("hello", "/"), format!("{}/v1/functions", server.url)] {
        for (authorization, challenge) in cases {
            let mut request = anonymous.get(&url);
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let response = request.send().await.expect("request");
            let www = response.headers()["www-authenticate"]
                .to_str()
                .expect("ascii")
                .to_owned();
            assert!(
                www.starts_with("Bearer") && www.contains(challenge),
                "{url} {authorization:?}: {www}"
            );
            problem(response, 401).await;
        }
    }
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_are_413_declared_or_streamed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &tmp.path().join("data"),
        &["--max-body-bytes", "4096", "--max-upload-bytes", "300000"],
    );
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;
    deploy(&server, tmp.path(), "echo", hearth_fixtures::ECHO, "").await;

    let response = http()
        .post(server.fn_url("echo", "/"))
        .body(vec![1u8; 4096])
        .send()
        .await
        .expect("at limit");
    assert_eq!(response.status(), 200);

    let response = http()
        .post(server.fn_url("echo", "/"))
        .body(vec![1u8; 5000])
        .send()
        .await
        .expect("declared");
    let body = problem(response, 413).await;
    assert!(body["detail"].as_str().expect("detail").contains("4096"));

    // No Content-Length: the limit is enforced while the body streams to the guest.
    let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![7u8; 1000])));
    let response = http()
        .post(server.fn_url("echo", "/"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("streamed");
    problem(response, 413).await;

    // Deploy uploads have their own limit (the examples, ~280 KB, fit under it).
    let component = vec![0u8; 400_000];
    let response = http()
        .post(format!("{}/v1/functions", server.url))
        .multipart(upload("name = \"big\"", component))
        .send()
        .await
        .expect("upload");
    problem(response, 413).await;

    // Every part counts: a manifest sent twice is refused, not read again
    // and again outside the limit.
    let twice = Form::new()
        .part("manifest", Part::text("name = \"twice\""))
        .part("manifest", Part::text("name = \"twice\""))
        .part("component", Part::bytes(vec![0u8; 16]));
    let response = http()
        .post(format!("{}/v1/functions", server.url))
        .multipart(twice)
        .send()
        .await
        .expect("upload");
    let body = problem(response, 400).await;
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("`manifest` appears twice"),
        "{body}"
    );

    assert_eq!(function_names(&server).await, ["echo", "hello"]);
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_upload_reaches_the_cli_as_its_answer() {
    // The server answers 413 while the CLI is still sending; closing at once
    // would reset the connection and the CLI would show a broken pipe
    // instead (about half the attempts before the lingering close).
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &["--max-upload-bytes", "1048576"]);
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;
    let project = tmp.path().join("big-upload");
    std::fs::create_dir_all(project.join("assets")).expect("dir");
    // Incompressible, so the upload really is that big on the wire.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: Vec<u8> = (0..(40 << 20) / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    std::fs::write(project.join("assets/big.bin"), noise).expect("asset");
    std::fs::write(
        project.join("hearth.toml"),
        format!(
            "name = \"big\"\ncomponent = {:?}\n[[files]]\nsource = \"assets/big.bin\"\ntarget = \"/big.bin\"\n",
            hearth_fixtures::ECHO
        ),
    )
    .expect("manifest");
    for _ in 0..10 {
        let output = server
            .cli()
            .args(["deploy", "--no-build"])
            .arg(&project)
            .output()
            .expect("hearth deploy");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains("413"), "{stderr}");
    }
    assert_eq!(function_names(&server).await, ["hello"]);
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_components_are_422_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server_with_faults(tmp.path(), &[]).await;
    let blobs = server.data_dir.join("blobs/sha256");
    let blobs_before = std::fs::read_dir(&blobs).expect("blobs").count();
    let mut truncated = std::fs::read(hearth_fixtures::ECHO).expect("echo");
    truncated.truncate(truncated.len() / 2);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("garbage", b"definitely not wasm".to_vec(), "not a WebAssembly file"),
        ("core", hearth_fixtures::CORE_MODULE.to_vec(), "core WebAssembly module"),
        ("truncated", truncated, "invalid component"),
        ("empty", Vec::new(), "empty"),
    ];
    for (name, bytes, expected) in cases {
        let response = http()
            .post(format!("{}/v1/functions", server.url))
            .multipart(upload(&format!("name = \"{name}\""), bytes))
            .send()
            .await
            .expect("deploy");
        let body = problem(response, 422).await;
        assert!(
            body["detail"].as_str().expect("detail").contains(expected),
            "{name}: {body}"
        );
    }
    assert_eq!(function_names(&server).await, ["faults", "hello", "slow"]);
    assert_eq!(
        std::fs::read_dir(&blobs).expect("blobs").count(),
        blobs_before,
        "no blob kept"
    );
    assert_eq!(
        std::fs::read_dir(server.data_dir.join("tmp")).expect("tmp").count(),
        0,
        "no staging file kept"
    );
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_manifests_are_400_naming_the_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server_with_faults(tmp.path(), &[]).await;
    let hello = std::fs::read(hearth_fixtures::HELLO).expect("hello");
    let cases = [
        ("name = \"x\"\n[limits]\nmemory_mbb = 3", "limits.memory_mbb"),
        ("name = \"x\"\nflavour = \"mint\"", "flavour"),
        ("name = \"X Y\"", "name"),
        ("name = \"x\"\n[limits]\ntimeout_ms = 0", "limits.timeout_ms"),
    ];
    for (manifest, key) in cases {
        let response = http()
            .post(format!("{}/v1/functions", server.url))
            .multipart(upload(manifest, hello.clone()))
            .send()
            .await
            .expect("deploy");
        let body = problem(response, 400).await;
        assert_eq!(body["key"], key, "{manifest}");
        assert!(body["detail"].as_str().expect("detail").contains(key), "{body}");
    }
    // Not TOML at all.
    let response = http()
        .post(format!("{}/v1/functions", server.url))
        .multipart(upload("name = ", hello.clone()))
        .send()
        .await
        .expect("deploy");
    problem(response, 400).await;
    // Not multipart at all.
    let response = http()
        .post(format!("{}/v1/functions", server.url))
        .body("hello")
        .send()
        .await
        .expect("deploy");
    problem(response, 400).await;

    // The CLI refuses the same manifest before uploading, naming the key.
    let dir = crate::server::project(
        &tmp.path().join("typo"),
        "typo",
        hearth_fixtures::HELLO,
        "[limits]\nmemory_mbb = 3\n",
    );
    let output = server.cli().arg("deploy").arg(&dir).output().expect("deploy");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("limits.memory_mbb"));
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_faults_do_not_disturb_healthy_calls() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server_with_faults(tmp.path(), &[]).await;
    let client = http();
    let calls = (0..24).map(|i| {
        let path = ["/trap", "/membomb", "/", "/loop"][i % 4];
        let function = if path == "/loop" { "slow" } else { "faults" };
        let url = server.fn_url(function, path);
        let client = client.clone();
        async move { (path, client.get(url).send().await.expect("call").status().as_u16()) }
    });
    let results: Vec<(&str, u16)> = futures::stream::iter(calls).buffer_unordered(24).collect().await;
    for (path, status) in results {
        let expected = match path {
            "/trap" | "/membomb" => 500,
            "/loop" => 504,
            _ => 200,
        };
        assert_eq!(status, expected, "{path}");
    }
    still_serves(&server).await;
}

/// Slow clients are cut off, oversized heads refused, and the server keeps
/// serving everyone else.
#[tokio::test]
async fn slow_and_oversized_requests_are_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &tmp.path().join("data"),
        &["--header-read-timeout-ms", "300", "--body-idle-timeout-ms", "300"],
    );
    deploy(&server, tmp.path(), "hello", hearth_fixtures::HELLO, "").await;
    deploy(&server, tmp.path(), "echo", hearth_fixtures::ECHO, "public = true\n").await;
    let addr = server.url.trim_start_matches("http://").to_owned();

    // Slowloris: a head that never ends is closed by the server.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
        .await
        .expect("partial head");
    let mut buf = Vec::new();
    // The guard is what fails if the head timeout does not fire: the server
    // must end the connection (EOF, or a reset) well within it, having
    // answered nothing but, at most, a 408.
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), slow.read_to_end(&mut buf))
        .await
        .expect("the server closes a slow head (hang guard)");
    let said = String::from_utf8_lossy(&buf);
    assert!(said.is_empty() || said.starts_with("HTTP/1.1 408"), "{read:?}: {said}");

    // A body that stalls is cut off too: the request fails, nothing hangs.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    stalled
        .write_all(b"POST /fn/default/echo/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
        .await
        .expect("partial body");
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), stalled.read_to_end(&mut answer))
        .await
        .expect("the server ends a stalled body (hang guard)")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Too many headers: 431.
    let mut request = http().get(server.fn_url("hello", "/"));
    for i in 0..150 {
        request = request.header(format!("x-h{i}"), "v");
    }
    let response = request.send().await.expect("many headers");
    assert_eq!(response.status(), 431);

    still_serves(&server).await;
}

/// Connections are bounded: past `--max-connections` a connection gets a
/// 503 problem and is closed, and a slot comes back when a connection
/// ends. A connection that never sends anything is closed after the head
/// timeout, so idle sockets cannot hold the slots.
#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_get_503_and_idle_ones_are_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &tmp.path().join("data"),
        &["--max-connections", "2", "--header-read-timeout-ms", "5000"],
    );
    let addr = server.url.trim_start_matches("http://").to_owned();
    let guard = std::time::Duration::from_secs(30);
    // Two kept-alive connections, each having had an answer: both slots
    // are taken.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(guard, stream.read(&mut buf))
            .await
            .expect("answer (hang guard)")
            .expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(stream);
    }
    let mut third = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let mut answer = Vec::new();
    tokio::time::timeout(guard, third.read_to_end(&mut answer))
        .await
        .expect("refused and closed (hang guard)")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("application/problem+json") && answer.contains("connection limit"),
        "{answer}"
    );

    // A slot comes back when a connection closes.
    drop(held.pop());
    let again = tokio::time::timeout(guard, async {
        loop {
            if let Ok(response) = http().get(format!("{}/healthz", server.url)).send().await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    again.await.expect("a freed slot serves again (hang guard)");

    // Idle: connected, never a byte. The server closes it without a word
    // (once it has seen the closed connections go: until then a new one may
    // still be refused with the 503).
    drop(held);
    let until = std::time::Instant::now() + guard;
    loop {
        assert!(
            std::time::Instant::now() < until,
            "the closed connections' slots never came back"
        );
        let mut idle = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let mut said = Vec::new();
        tokio::time::timeout(guard, idle.read_to_end(&mut said))
            .await
            .expect("the server closes an idle connection (hang guard)")
            .expect("read");
        if said.starts_with(b"HTTP/1.1 503") {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said));
        break;
    }
}
