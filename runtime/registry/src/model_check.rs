//! Untrusted models are parsed first in a child process with a memory and a
//! time bound (`hearth check-model`, under `ulimit -v`), and only then by
//! the server itself: an ONNX file crafted to make the parser allocate
//! without bound, or spin, costs a child process, not the server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Exit status of `hearth check-model` for a model that is not valid (its
/// reason on stderr); any other failure means the child hit a bound or
/// crashed.
pub const INVALID_MODEL_EXIT: i32 = 2;

/// How a deploy checks a model before the server parses it.
#[derive(Debug, Clone)]
pub struct ModelCheck {
    /// The `hearth` binary (its `check-model` command).
    pub program: PathBuf,
    /// Address space the child may use, in MiB.
    pub memory_mb: u64,
    /// How long the child may take.
    pub timeout: Duration,
}

impl ModelCheck {
    /// Parses the model at `path` in a bounded child; why not, if it fails.
    pub async fn run(&self, path: &Path) -> Result<(), String> {
        let mut command = tokio::process::Command::new("sh");
        command
            .arg("-c")
            .arg("ulimit -v \"$1\" && exec \"$2\" check-model \"$3\"")
            .arg("sh")
            .arg((self.memory_mb * 1024).to_string())
            .arg(&self.program)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start the model check: {e}"))?;
        let bounds = format!("{} MiB and {} s", self.memory_mb, self.timeout.as_secs());
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Err(_) => return Err(format!("parsing it did not finish within the bounds ({bounds})")),
            Ok(Err(e)) => return Err(format!("the model check failed: {e}")),
            Ok(Ok(output)) => output,
        };
        if output.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&output.stderr);
        let said = said.trim().trim_start_matches("error: ");
        match output.status.code() {
            Some(INVALID_MODEL_EXIT) => return Err(said.to_owned()),
            // Rust's exit status for a panic.
            Some(101) => {
                let last = said.lines().find(|l| l.contains("panicked")).unwrap_or(said);
                return Err(format!("the ONNX parser failed on it: {last}"));
            }
            _ => {}
        }
        Err(format!(
            "parsing it did not stay within the bounds ({bounds}): the parser stopped with {}",
            output.status
        ))
    }
}
