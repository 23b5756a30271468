//! Real servers for Hearth's tests, each started on a free loopback port in a
//! temporary directory and stopped when dropped:
//!
//! - [`Postgres`]: a throwaway PostgreSQL cluster (Debian's `postgresql`
//!   package; `scripts/test.sh` installs it when missing). PostgreSQL refuses
//!   to run as root, so under root the cluster belongs to the `postgres` user.
//!
//! - [`S3`]: moto's S3 API server (PyPI `moto[server]`; `scripts/test.sh`
//!   installs it when missing), with one bucket.
//!
//! A missing server is a panic that says how to install it, never a skip.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

    /// Runs one SQL statement in `database` and returns its output, rows
    /// unaligned, without headers (`psql -At`).
    pub fn query(&self, database: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let output = self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "hearth",
                "-At",
                "-d",
                database,
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
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

    /// A PostgreSQL program, run as the cluster's owner.
    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        match &self.owner {
            Some(owner) => {
                let mut c = Command::new("runuser");
                c.args(["-u", owner, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let output = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {tool} from {}: {e}", self.bin.display()));
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
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
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

/// How long a server may take to accept connections before the test gives
/// up (a hang guard, not a timing assertion).
const START_GUARD: Duration = Duration::from_secs(60);

/// An S3 API server (moto) on loopback, with the bucket `hearth`.
#[derive(Debug)]
pub struct S3 {
    child: Child,
    port: u16,
}

impl S3 {
    /// The bucket every test uses.
    pub const BUCKET: &'static str = "hearth";

    /// Starts moto's server and creates [`S3::BUCKET`].
    pub fn start() -> S3 {
        let python = std::env::var("HEARTH_PYTHON").unwrap_or_else(|_| "python3".into());
        let port = free_port();
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting moto with {python}: {e} (`pip install 'moto[server]'`)"));
        let mut s3 = S3 { child, port };
        let started = Instant::now();
        // Poll until it accepts connections (or exits: moto is not installed).
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = s3.child.try_wait() {
                panic!("moto's server exited ({status}): is it installed? `pip install 'moto[server]'`");
            }
            assert!(started.elapsed() < START_GUARD, "moto's server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = s3.request("PUT", &format!("/{}", S3::BUCKET));
        assert_eq!(status, 200, "creating the bucket");
        s3
    }

    /// The endpoint URL (`AWS_ENDPOINT_URL`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a Hearth node needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "hearth-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "hearth-test".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The keys of the objects in the bucket whose keys start with `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let body = self.get(&format!("/{}?list-type=2&prefix={prefix}", S3::BUCKET));
        body.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(key, _)| key.to_owned()))
            .collect()
    }

    fn request(&self, method: &str, path: &str) -> u16 {
        let (status, _) = self.exchange(method, path);
        status
    }

    fn get(&self, path: &str) -> String {
        let (status, body) = self.exchange("GET", path);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// One plain HTTP/1.1 exchange (moto accepts unsigned requests).
    fn exchange(&self, method: &str, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to moto");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("writing to moto");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("reading from moto");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
