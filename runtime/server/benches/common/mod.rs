//! What the end-to-end benches share: a release `hearth serve` of their own
//! and deploying a test function to it.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The operator token the benches' servers are started with.
pub const TOKEN: &str = "hth_bench-server";

/// A bench's server process, stopped when dropped: also when the bench
/// panics, so no server outlives it (holding its output pipe open).
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hearth serve` on a free port with its data in `data_dir` and
/// `extra` flags; returns the process and its base URL.
pub fn start_server(data_dir: &Path, extra: &[&str]) -> (Server, String) {
    let mut server = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("HEARTH_ADMIN_TOKEN", TOKEN)
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("hearth serve");
    let stdout = server.stdout.take().expect("stdout");
    let url = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("hearth listening on ").map(|u| u.trim().to_owned()))
        .expect("server address");
    (Server(server), url)
}

/// Deploys `component` as the public function `name`, with `extra` manifest
/// lines, from a project written under `dir`.
pub async fn deploy(client: &hearth_client::Client, dir: &Path, name: &str, component: &str, extra: &str) {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("hearth.toml"),
        format!("name = \"{name}\"\ncomponent = {component:?}\npublic = true\n{extra}"),
    )
    .expect("manifest");
    let project = hearth_client::Project::load(&dir).expect("project");
    client.deploy(&project, |_, _| {}).await.expect("deploy");
}
