//! Health, readiness and graceful shutdown.

use crate::server::{Server, deploy, http};

#[tokio::test(flavor = "multi_thread")]
async fn health_and_readiness_answer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    for path in ["/healthz", "/readyz"] {
        let response = reqwest::get(format!("{}{path}", server.url)).await.expect("get");
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_invocations_finish() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"), &[]);
    deploy(&server, tmp.path(), "faults", hearth_fixtures::FAULTS, "").await;

    // The guest sends its head at once and its body 1.5 s later: once the
    // head has arrived the invocation is certainly in flight.
    let response = http()
        .get(server.fn_url("faults", "/slow-body?ms=1500"))
        .send()
        .await
        .expect("head");
    assert_eq!(response.status(), 200);
    let url = server.url.clone();
    let terminated = std::thread::spawn(move || server.terminate());
    assert_eq!(response.text().await.expect("body finishes"), "done\n");
    assert!(terminated.join().expect("join"), "server exits 0 after draining");
    assert!(
        reqwest::get(format!("{url}/healthz")).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn first_start_writes_a_token_file_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let run = || {
        let mut child = std::process::Command::new(crate::server::hearth_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env_remove("HEARTH_ADMIN_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let done = line.starts_with("hearth listening on ");
            lines.push(line);
            if done {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        lines
    };
    let first = run();
    let token_file = data.join("admin-token");
    assert!(
        first.iter().any(|l| l.contains(&token_file.display().to_string())),
        "the file's path is printed: {first:?}"
    );
    let token = std::fs::read_to_string(&token_file)
        .expect("token file")
        .trim()
        .to_owned();
    assert!(token.starts_with("hth_"));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&token_file).expect("metadata").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only its owner reads the token file");
    assert!(
        first.iter().all(|l| !l.contains(&token)),
        "the secret is never printed: {first:?}"
    );
    let second = run();
    assert!(second.iter().all(|l| !l.contains("admin token")), "{second:?}");
    // The store keeps only a hash: not in the database, nor in its WAL
    // (where a fresh row still is).
    for file in ["hearth.db", "hearth.db-wal"] {
        let bytes = std::fs::read(data.join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "token stored in clear in {file}"
        );
    }
}
