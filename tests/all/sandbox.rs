//! Outgoing HTTP from guests: refused unless the manifest lists the origin;
//! the server's own API and loopback are not reachable unless listed.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::server::*;

/// A one-route HTTP server on loopback answering `pong`.
async fn pong_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong")
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn outgoing_requests_reach_only_listed_origins() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    let port = pong_server().await;
    let listed = format!("public = true\nallowed_outbound_hosts = [\"http://127.0.0.1:{port}\"]\n");
    deploy(&server, tmp.path(), "open", hearth_fixtures::FAULTS, &listed).await;
    deploy(
        &server,
        tmp.path(),
        "closed",
        hearth_fixtures::FAULTS,
        "public = true\n",
    )
    .await;

    let fetch = |function: &str, url: String| {
        let url = format!("{}?url={url}", server.fn_url(function, "/fetch"));
        async move {
            let response = reqwest::get(url).await.expect("fetch");
            let status = response.status().as_u16();
            (status, response.text().await.expect("body"))
        }
    };
    let allowed = format!("http://127.0.0.1:{port}/x");
    assert_eq!(fetch("open", allowed.clone()).await, (200, "200\npong".to_owned()));

    // The pong server is up, so a failure here is the host's refusal.
    let (status, body) = fetch("closed", allowed).await;
    assert_eq!(status, 502, "{body}");
    assert!(!body.contains("pong"), "{body}");

    let hearth_port = server.url.rsplit(':').next().expect("port").to_owned();
    for denied in [
        format!("http://127.0.0.1:{hearth_port}/v1/status"),
        format!("http://localhost:{port}/x"),
        format!("https://127.0.0.1:{port}/x"),
        format!("http://127.0.0.1:{}/x", port.wrapping_add(1)),
    ] {
        let (status, body) = fetch("open", denied.clone()).await;
        assert_eq!(status, 502, "{denied}: {body}");
        assert!(!body.contains("pong") && !body.contains("devices"), "{denied}: {body}");
    }

    // A listed name that resolves to loopback (`127.1` is 127.0.0.1 to the
    // resolver, the classic way around a literal check) is refused once
    // resolved, although the listing matches it.
    let sneaky = format!("public = true\nallowed_outbound_hosts = [\"http://127.1:{port}\"]\n");
    deploy(&server, tmp.path(), "sneaky", hearth_fixtures::FAULTS, &sneaky).await;
    let (status, body) = fetch("sneaky", format!("http://127.1:{port}/x")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("DestinationIpProhibited"), "{body}");
    still_serves_public(&server).await;
}

async fn still_serves_public(server: &Server) {
    let response = reqwest::get(server.fn_url("open", "/ok")).await.expect("ok");
    assert_eq!(response.status(), 200);
}
