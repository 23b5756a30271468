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

/// Files in `dir` (none when it does not exist).
fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Garbage collection deletes the blob and compiled artifact of a deleted
/// function, keeps a live one's, and counts what it removed.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_deletes_what_no_version_references() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    deploy(&server, tmp.path(), "keep", hearth_fixtures::HELLO, "public = true\n").await;
    deploy(&server, tmp.path(), "gone", hearth_fixtures::ECHO, "").await;
    let (blobs, compiled) = (data.join("blobs").join("sha256"), data.join("compiled"));
    assert_eq!(files_in(&blobs).len(), 2, "{:?}", files_in(&blobs));
    assert_eq!(files_in(&compiled).len(), 2, "{:?}", files_in(&compiled));
    server.client().delete("gone").await.expect("delete");
    assert!(server.terminate(), "clean stop");

    // Collections every second, with no grace (nothing is being deployed).
    let server = Server::start(&data, &["--gc-interval-s", "1", "--gc-grace-s", "0"]);
    let guard = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while files_in(&blobs).len() > 1 || files_in(&compiled).len() > 1 {
        assert!(
            std::time::Instant::now() < guard,
            "{:?} {:?}",
            files_in(&blobs),
            files_in(&compiled)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let response = http().get(server.fn_url("keep", "/")).send().await.expect("keep");
    assert_eq!(response.status(), 200, "the live function's files stay");
    assert_eq!((files_in(&blobs).len(), files_in(&compiled).len()), (1, 1));
    let metrics = crate::server::metrics_text(&server).await;
    for kind in ["blob", "compiled"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("hearth_gc_removed_files_total") && l.contains(&format!("kind=\"{kind}\"")))
            .unwrap_or_else(|| panic!("no {kind} counter in {metrics}"));
        assert!(line.ends_with(" 1"), "{line}");
        let bytes = metrics
            .lines()
            .find(|l| l.starts_with("hearth_gc_removed_bytes_total{") && l.contains(&format!("kind=\"{kind}\"")))
            .unwrap_or_else(|| panic!("no {kind} byte counter in {metrics}"));
        assert!(!bytes.ends_with(" 0"), "{bytes}");
    }
}
