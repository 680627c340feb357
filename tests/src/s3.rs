//! A real S3 server on loopback for the backup tests: [`S3Server`] runs
//! `s3s-fs` (the s3s project's S3 over a directory), installed by
//! `scripts/install-test-deps.sh` into `/opt/corral-s3s` (another binary
//! with `$CORRAL_S3S_FS`). A missing binary fails the test and says how to
//! install it; nothing is skipped.
//!
//! Each server listens on 127.0.0.1 on a port picked free, stores its
//! objects under its own temporary directory, accepts one access key and
//! secret (made up per server) and has one bucket, made before it starts
//! (an s3s-fs bucket is a directory under its root). [`S3Server::settings`]
//! gives what [`corral_backup::target::Target::open`] needs to reach it,
//! the keys in a credentials file; [`S3Server::wrong_credentials_file`]
//! keys it refuses. [`S3Server::kill`] and [`S3Server::restart`] take the
//! store away in the middle of a test and bring it back on the same port
//! with the same objects. The server is killed when dropped, and its log
//! (`s3s-fs.log` in its directory) printed when the test is failing.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use corral_backup::target::S3Settings;

use crate::{free_addr, poll};

/// Where `scripts/install-test-deps.sh` installs s3s-fs.
pub const DEFAULT_S3S_FS: &str = "/opt/corral-s3s/bin/s3s-fs";

/// The s3s-fs binary: `$CORRAL_S3S_FS`, or [`DEFAULT_S3S_FS`].
pub fn s3s_fs_bin() -> PathBuf {
    std::env::var_os("CORRAL_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_S3S_FS))
}

/// How long a starting s3s-fs may take to listen.
const START_LIMIT: Duration = Duration::from_secs(20);

/// One s3s-fs process with its directory, port, keys and bucket.
pub struct S3Server {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    bucket: String,
    access_key: String,
    secret_key: String,
    child: Option<Child>,
    /// The log's length when the process was last started.
    log_from: usize,
}

impl S3Server {
    /// Starts s3s-fs with a bucket named "corral-backups".
    pub fn start() -> Result<Self> {
        Self::start_with_bucket("corral-backups")
    }

    /// Starts s3s-fs with one bucket, `bucket`.
    pub fn start_with_bucket(bucket: &str) -> Result<Self> {
        let bin = s3s_fs_bin();
        if !bin.is_file() {
            bail!(
                "{} is missing: run scripts/install-test-deps.sh (it installs s3s-fs), \
                 or set CORRAL_S3S_FS to an s3s-fs binary",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("corral-s3s-")
            .tempdir()
            .context("a directory for s3s-fs")?;
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join(bucket))
            .with_context(|| format!("create bucket {bucket} under {}", root.display()))?;
        let salt: u64 = rand::random();
        let mut server = S3Server {
            dir,
            addr: free_addr(),
            bucket: bucket.to_string(),
            access_key: format!("corral-test-{:08x}", salt as u32),
            secret_key: format!("secret-{salt:016x}"),
            child: None,
            log_from: 0,
        };
        // A port picked free can be taken before s3s-fs binds it: start
        // again on another (a few times at most).
        let mut tries = 0;
        loop {
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(e) if server.port_was_taken() && tries < 3 => {
                    tries += 1;
                    eprintln!("s3s-fs: {e}; trying another port");
                    server.addr = free_addr();
                }
                Err(e) => return Err(e.context(server.log_tail(40))),
            }
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("s3s-fs.log")
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_tail(&self, keep: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "last lines of {}:\n{}",
            self.log_path().display(),
            lines[lines.len().saturating_sub(keep)..].join("\n")
        )
    }

    /// Did the last start find its port taken?
    fn port_was_taken(&self) -> bool {
        self.log_text()
            .get(self.log_from..)
            .unwrap_or_default()
            .contains("Address already in use")
    }

    /// Starts the process on `self.addr` and waits (bounded) until it
    /// listens; an exit before that is an error.
    fn spawn_and_wait(&mut self) -> Result<()> {
        let bin = s3s_fs_bin();
        self.log_from = self.log_text().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&bin)
            .arg("--host")
            .arg(self.addr.ip().to_string())
            .arg("--port")
            .arg(self.addr.port().to_string())
            .arg("--access-key")
            .arg(&self.access_key)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg(self.root())
            .env(
                "RUST_LOG",
                std::env::var("CORRAL_S3S_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        self.child = Some(child);
        let addr = self.addr;
        let child = self.child.as_mut().expect("just spawned");
        let waited = poll(START_LIMIT, &format!("s3s-fs to listen on {addr}"), || {
            if let Some(status) = child.try_wait()? {
                bail!("s3s-fs exited ({status}) before listening on {addr}");
            }
            Ok(
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .is_ok()
                    .then_some(()),
            )
        });
        if waited.is_err() {
            self.stop();
        }
        waited
    }

    /// SIGKILL and reap, if running.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bucket the server was started with.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The target URL `s3://BUCKET/PREFIX` (`s3://BUCKET` for an empty
    /// prefix).
    pub fn url(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The directory holding the bucket's objects (one file per object,
    /// under its key).
    pub fn bucket_dir(&self) -> PathBuf {
        self.root().join(&self.bucket)
    }

    /// Writes a credentials file (`KEY=VALUE` lines, as
    /// [`S3Settings::credentials_file`] reads them) with `key` and
    /// `secret` into the server's directory; its path.
    pub fn credentials_file_with(&self, name: &str, key: &str, secret: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "# s3s-fs at {}\nAWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret}\nAWS_REGION=us-east-1\n",
                self.endpoint()
            ),
        )
        .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// A credentials file with the server's keys.
    pub fn credentials_file(&self) -> Result<PathBuf> {
        self.credentials_file_with("credentials", &self.access_key, &self.secret_key)
    }

    /// A credentials file with the server's access key ID and a wrong
    /// secret (the store refuses the requests' signatures).
    pub fn wrong_credentials_file(&self) -> Result<PathBuf> {
        self.credentials_file_with(
            "credentials-wrong-secret",
            &self.access_key,
            "not-the-secret",
        )
    }

    /// A credentials file with an access key ID the server does not know.
    pub fn unknown_key_credentials_file(&self) -> Result<PathBuf> {
        self.credentials_file_with(
            "credentials-unknown-key",
            "no-such-key-id",
            &self.secret_key,
        )
    }

    /// Settings for a target on this server: its endpoint, the keys in a
    /// credentials file, the default retries.
    pub fn settings(&self) -> Result<S3Settings> {
        Ok(self.settings_with(self.credentials_file()?))
    }

    /// Settings for a target on this server with the keys in `credentials`.
    pub fn settings_with(&self, credentials: PathBuf) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            credentials_file: Some(credentials),
            ..Default::default()
        }
    }

    /// Is the process running?
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL: the store goes away (connections refused) until
    /// [`S3Server::restart`]; the objects stay on disk.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            bail!("s3s-fs is not running");
        };
        c.kill().context("kill s3s-fs")?;
        c.wait().context("reap s3s-fs")?;
        Ok(())
    }

    /// Starts the server again on the same port, with the same keys and
    /// objects. The port, freed by [`S3Server::kill`], can be taken
    /// meanwhile (by another test's connection): a start that finds it
    /// taken is tried again a few times, as the holder lets it go.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("s3s-fs is still running: kill it first");
        }
        self.stop();
        let mut tries = 0;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) if self.port_was_taken() && tries < 5 => {
                    tries += 1;
                    eprintln!("s3s-fs restart: {e}; trying again");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.context(self.log_tail(40))),
            }
        }
    }

    /// The server's directory (its root, log and credentials files).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("----- s3s-fs at {} -----", self.endpoint());
            eprintln!("{}", self.log_tail(40));
            // CORRAL_TEST_KEEP=1 keeps a failing test's directory.
            if std::env::var_os("CORRAL_TEST_KEEP").is_some() {
                self.dir.disable_cleanup(true);
                eprintln!("kept {}", self.dir.path().display());
            }
        }
    }
}
