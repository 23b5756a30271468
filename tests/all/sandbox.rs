//! Outgoing HTTP from guests: refused unless the manifest lists the origin,
//! and refused to internal addresses (loopback, private, link-local…) unless
//! the operator admits them with `--allow-outbound-cidr`, at deploy and at
//! every request (redirects included).

use reqwest::multipart::{Form, Part};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::server::*;

/// A server on `ip` answering every request with `answer` (a whole HTTP/1.1
/// response after the status line's `HTTP/1.1 `); its port.
async fn answering(ip: &str, answer: String) -> u16 {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(format!("HTTP/1.1 {answer}").as_bytes()).await;
            });
        }
    });
    port
}

/// A server on `ip` answering 200 with `body`.
async fn saying(ip: &str, body: &str) -> u16 {
    let answer = format!(
        "200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    answering(ip, answer).await
}

/// A server on `ip` redirecting every request to `to`.
async fn redirecting(ip: &str, to: &str) -> u16 {
    answering(
        ip,
        format!("302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// What `function`'s `/fetch` of `url` answered: status and body.
async fn fetch(server: &Server, function: &str, url: &str) -> (u16, String) {
    let response = reqwest::get(format!("{}?url={url}", server.fn_url(function, "/fetch")))
        .await
        .expect("fetch");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test]
async fn outgoing_requests_reach_only_listed_origins_on_permitted_addresses() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 127.0.0.2 stands for a private service the operator admits; 127.0.0.1
    // for the host itself, which stays denied.
    let server = Server::start(&tmp.path().join("data"), &["--allow-outbound-cidr", "127.0.0.2/32"]);
    let admitted = saying("127.0.0.2", "pong").await;
    let host = saying("127.0.0.1", "host secret").await;
    let listed = format!("public = true\nallowed_outbound_hosts = [\"http://127.0.0.2:{admitted}\"]\n");
    deploy(&server, tmp.path(), "open", hearth_fixtures::FAULTS, &listed).await;
    deploy(
        &server,
        tmp.path(),
        "closed",
        hearth_fixtures::FAULTS,
        "public = true\n",
    )
    .await;

    let allowed = format!("http://127.0.0.2:{admitted}/x");
    assert_eq!(fetch(&server, "open", &allowed).await, (200, "200\npong".to_owned()));
    // The pong server is up, so a failure here is the host's refusal.
    let (status, body) = fetch(&server, "closed", &allowed).await;
    assert_eq!(status, 502, "{body}");
    assert!(!body.contains("pong"), "{body}");
    let hearth_port = server.url.rsplit(':').next().expect("port").to_owned();
    for denied in [
        format!("http://127.0.0.1:{hearth_port}/v1/status"),
        format!("http://127.0.0.1:{host}/x"),
        format!("http://localhost:{admitted}/x"),
        format!("https://127.0.0.2:{admitted}/x"),
        format!("http://127.0.0.2:{}/x", admitted.wrapping_add(1)),
    ] {
        let (status, body) = fetch(&server, "open", &denied).await;
        assert_eq!(status, 502, "{denied}: {body}");
        assert!(
            !body.contains("pong") && !body.contains("secret") && !body.contains("devices"),
            "{denied}: {body}"
        );
    }

    // A manifest naming an internal address, literally or by a name that
    // resolves to one (`127.1` is 127.0.0.1 to the resolver), is refused at
    // deploy, naming the key.
    let hello = std::fs::read(hearth_fixtures::FAULTS).expect("faults");
    for internal in [
        "http://169.254.169.254",
        format!("http://127.0.0.1:{host}").as_str(),
        "http://[::1]:8080",
        "http://10.0.0.1",
        "http://100.64.0.1",
        "http://[fd00:ec2::254]",
        "http://[::ffff:127.0.0.1]",
        "http://localhost:8080",
        "http://127.1:8080",
    ] {
        let manifest =
            format!("name = \"internal\"\nallowed_outbound_hosts = [\"https://example.com\", \"{internal}\"]\n");
        let form = Form::new()
            .part("manifest", Part::text(manifest))
            .part("component", Part::bytes(hello.clone()));
        let response = post_deploy(&server, form).await;
        let refused = problem(response, 422).await;
        assert_eq!(refused["key"], "allowed_outbound_hosts[1]", "{internal}: {refused}");
        assert!(
            refused["detail"]
                .as_str()
                .expect("detail")
                .contains("--allow-outbound-cidr"),
            "{refused}"
        );
    }
    assert!(
        !function_names(&server).await.contains(&"internal".to_owned()),
        "a refused deploy stores nothing"
    );

    // Redirects are new requests, each checked: a listed, admitted origin
    // that redirects to the host is refused; one redirecting to an
    // admitted, listed origin is followed.
    let to_host = redirecting("127.0.0.2", &format!("http://127.0.0.1:{host}/x")).await;
    let to_pong = redirecting("127.0.0.2", &allowed).await;
    let hops = format!(
        "public = true\nallowed_outbound_hosts = [\"http://127.0.0.2:{admitted}\", \"http://127.0.0.2:{to_host}\", \"http://127.0.0.2:{to_pong}\"]\n"
    );
    deploy(&server, tmp.path(), "hops", hearth_fixtures::FAULTS, &hops).await;
    assert_eq!(
        fetch(&server, "hops", &format!("http://127.0.0.2:{to_pong}/")).await,
        (200, "200\npong".to_owned()),
        "the guest follows redirects"
    );
    let (status, body) = fetch(&server, "hops", &format!("http://127.0.0.2:{to_host}/")).await;
    assert_eq!(status, 502, "{body}");
    assert!(!body.contains("secret"), "{body}");
    still_serves(&server, "open").await;
}

/// The operator's policy holds at call time too: a function deployed while
/// a range was admitted loses it when the server restarts without it, and
/// a listed name is checked once resolved.
#[tokio::test]
async fn a_narrowed_policy_applies_to_functions_already_deployed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let host = saying("127.0.0.1", "host secret").await;
    let server = Server::start(&data, &["--allow-outbound-cidr", "127.0.0.0/8"]);
    // `127.1` is a name the resolver turns into 127.0.0.1.
    let listed = format!("public = true\nallowed_outbound_hosts = [\"http://127.1:{host}\"]\n");
    deploy(&server, tmp.path(), "sneaky", hearth_fixtures::FAULTS, &listed).await;
    let url = format!("http://127.1:{host}/x");
    assert_eq!(
        fetch(&server, "sneaky", &url).await,
        (200, "200\nhost secret".to_owned())
    );
    assert!(server.terminate(), "clean stop");

    let server = Server::start(&data, &[]);
    let (status, body) = fetch(&server, "sneaky", &url).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("DestinationIpProhibited"), "{body}");
    still_serves(&server, "sneaky").await;
}

async fn still_serves(server: &Server, function: &str) {
    let response = reqwest::get(server.fn_url(function, "/ok")).await.expect("ok");
    assert_eq!(response.status(), 200);
}
