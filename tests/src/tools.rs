//! Wrappers around the real tools the tests drive volumes with (fio,
//! nbdinfo, nbdcopy, nbdfuse, mkfs/fsck), and the waiting on those that run
//! as daemons (nbdfuse, nbdkit). A missing tool is an error, never a skip:
//! the README's test command installs them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::run_bounded;

/// Locate a tool on PATH (or in the sbin directories), or fail with how to get it.
pub fn require(tool: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]) {
        let p = PathBuf::from(dir).join(tool);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{tool} is not installed; run scripts/test.sh, which installs the test tools")
}

/// Run a tool, bounded in time; error (with its output) unless it exits 0.
pub fn run_ok(tool: &str, args: &[&str], limit: Duration) -> Result<Output> {
    let out = run_bounded(Command::new(require(tool)?).args(args), limit)?;
    if !out.status.success() {
        bail!(
            "{tool} {args:?} failed with {}:\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Wait (bounded) for `pidfile` to appear — a daemon such as nbdkit or
/// nbdfuse writes it once it serves — failing early when `child`, the
/// process that writes it, exits first.
pub fn wait_for_pidfile(
    what: &str,
    pidfile: &Path,
    child: &mut Child,
    limit: Duration,
) -> Result<()> {
    crate::poll(limit, &format!("{what} to come up"), || {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited ({status}) before serving");
        }
        Ok(pidfile.exists().then_some(()))
    })
}

/// Wait (bounded) for a child to exit; kill it when over. Returns its exit
/// status, or None when it had to be killed.
pub fn reap(mut child: Child, limit: Duration) -> Option<ExitStatus> {
    match crate::wait_exit(&mut child, limit, "a tool to exit") {
        Ok(status) => Some(status),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

/// fio over NBD against `uri` with a job given as `--key=value` arguments.
/// Fails unless fio exits 0 and reports no errors.
pub fn fio_nbd(uri: &str, name: &str, job: &[&str], limit: Duration) -> Result<String> {
    let mut args = vec![
        format!("--name={name}"),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        // No verify-state files in the working directory.
        "--verify_state_save=0".into(),
    ];
    args.extend(job.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok("fio", &refs, limit)?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !text.contains("err= 0") {
        bail!("fio reported errors:\n{text}");
    }
    Ok(text)
}

/// The value of the first sample line of Prometheus `text` that starts
/// with `prefix` (a metric name with its labels); an error naming it when
/// there is none.
pub fn metric_value(text: &str, prefix: &str) -> Result<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no sample {prefix} in:\n{text}"))
}

/// The Prometheus text a daemon serves at `http://ADDR/metrics` (one
/// HTTP/1.1 GET, 5 s to connect and 10 s to read); an error unless it
/// answers 200.
pub fn scrape_metrics(addr: std::net::SocketAddr) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        bail!("GET http://{addr}/metrics: {out}");
    }
    Ok(out)
}

/// `len` pseudo-random bytes from `seed` (xorshift: cheap, seeded so a
/// failure reproduces, and incompressible, so backups' packs fill).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A file of `len` pseudo-random bytes (seeded, so a failure reproduces).
pub fn random_file(path: &std::path::Path, len: usize, seed: u64) -> Result<Vec<u8>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    std::fs::write(path, &data)?;
    Ok(data)
}
