//! Real servers for Hearth's tests, each started on a free loopback port in a
//! temporary directory and stopped when dropped:
//!
//! - [`Postgres`]: a throwaway PostgreSQL cluster (Debian's `postgresql`
//!   package; `scripts/test.sh` installs it when missing). PostgreSQL refuses
//!   to run as root, so under root the cluster belongs to the `postgres` user.
//!
//! A missing server is a panic that says how to install it, never a skip.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// A PostgreSQL cluster of its own, with `trust` authentication on
/// 127.0.0.1 and one superuser, `hearth`.
#[derive(Debug)]
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    /// The user that owns the cluster when the tests run as root.
    owner: Option<String>,
}

impl Postgres {
    /// Creates (`initdb`) and starts a cluster. Takes about a second.
    pub fn start() -> Postgres {
        let bin = postgres_bin();
        let dir = tempfile::Builder::new()
            .prefix("hearth-pg")
            .tempdir()
            .expect("creating a directory for PostgreSQL");
        let owner = running_as_root().then(|| "postgres".to_owned());
        if let Some(owner) = &owner {
            let uid = id(&["-u", owner]);
            let gid = id(&["-g", owner]);
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("handing the directory to postgres");
        }
        let pg = Postgres {
            dir,
            bin,
            port: free_port(),
            owner,
        };
        let data = pg.data().display().to_string();
        pg.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "hearth", "-E", "UTF8", "--no-sync"],
        );
        pg.start_server();
        pg
    }

    /// The connection URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://hearth@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let port = self.port.to_string();
        self.run("createdb", &["-h", "127.0.0.1", "-p", &port, "-U", "hearth", name]);
        self.url(name)
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        let data = self.data().display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }

    /// Starts the server again after [`Postgres::stop`], on the same port.
    pub fn start_server(&self) {
        let data = self.data().display().to_string();
        let log = self.dir.path().join("server.log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        self.run("pg_ctl", &["-D", &data, "-o", &options, "-l", &log, "-w", "start"]);
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let program = self.bin.join(tool);
        let mut command = match &self.owner {
            Some(owner) => {
                let mut c = Command::new("runuser");
                c.args(["-u", owner, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let output = command
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        assert!(
            output.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        // Immediate: the test is over, nothing needs to be kept.
        let mut command = match &self.owner {
            Some(owner) => {
                let mut c = Command::new("runuser");
                c.args(["-u", owner, "--"]).arg(self.bin.join("pg_ctl"));
                c
            }
            None => Command::new(self.bin.join("pg_ctl")),
        };
        let _ = command.args(["-D", &data, "-m", "immediate", "-w", "stop"]).output();
    }
}

/// Where PostgreSQL's server programs are: `HEARTH_PG_BIN`, else the newest
/// `/usr/lib/postgresql/N/bin` (Debian), else the directory of `initdb` on
/// the PATH.
fn postgres_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_PG_BIN") {
        return PathBuf::from(dir);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .max();
    if let Some(version) = newest {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").exists())
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed (no initdb): `apt-get install postgresql`, \
                 or set HEARTH_PG_BIN to the directory of initdb and pg_ctl"
            )
        })
}

fn running_as_root() -> bool {
    Path::new("/proc/self").metadata().is_ok_and(|m| m.uid() == 0)
}

fn id(args: &[&str]) -> u32 {
    let output = Command::new("id").args(args).output().expect("running id");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no user for `id {args:?}`: PostgreSQL cannot run as root without one"))
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("finding a free port")
}
