//! Helpers shared by the iSCSI end-to-end tests: a `corral serve-file
//! --iscsi` process, the minimal raw initiator (from
//! [`corral_tests::iscsi_raw`]), the fio build with the libiscsi engine,
//! and a parser for iscsi-test-cu's CUnit output.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use corral_tests::{corral_bin, free_addr, iscsi_url, run_bounded, wait_for_port};

/// `corral serve-file --iscsi` on a free port, killed on drop.
pub struct ServeFile {
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub portal: SocketAddr,
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl ServeFile {
    /// Serve a new sparse file of `size` (e.g. "1GiB") as volume `name`.
    pub fn start(name: &str, size: &str, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("corral-iscsi-").tempdir()?;
        let file = dir.path().join(format!("{name}.img"));
        let portal = free_addr();
        let log = dir.path().join("serve-file.log");
        let bin = corral_bin();
        if !bin.exists() {
            bail!(
                "{} is missing: build it first (cargo build -p corral)",
                bin.display()
            );
        }
        let out = std::fs::File::create(&log)?;
        let mut args: Vec<String> = vec![
            "serve-file".into(),
            "--file".into(),
            file.display().to_string(),
            "--size".into(),
            size.into(),
            "--iscsi".into(),
            portal.to_string(),
            "--name".into(),
            name.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(&bin)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {} {args:?}", bin.display()))?;
        let mut s = ServeFile {
            dir,
            file,
            portal,
            name: name.to_string(),
            log,
            child: Some(child),
        };
        if let Err(e) = wait_for_port(portal, Duration::from_secs(20)) {
            bail!("{e}\n{}", s.log_text());
        }
        if let Some(status) = s.exited() {
            bail!("serve-file exited ({status}):\n{}", s.log_text());
        }
        Ok(s)
    }

    /// The libiscsi URL of LUN 0.
    pub fn url(&self) -> String {
        iscsi_url(self.portal, &self.name)
    }

    /// The fio `--filename` for the libiscsi engine (colons escaped).
    pub fn fio_filename(&self) -> String {
        fio_filename(self.portal, &self.name)
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (bounded) for a clean exit.
    pub fn terminate(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("serve-file is not running");
        };
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("serve-file did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServeFile {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "----- last lines of serve-file ({}) -----",
                self.log.display()
            );
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[allow(unused_imports)]
pub use corral_tests::iscsi_raw::{RawInitiator, bhs, with_data};

/// The fio `--filename` of LUN 0 of `volume` at `portal`.
pub fn fio_filename(portal: SocketAddr, volume: &str) -> String {
    let ip = portal.ip().to_string();
    format!(
        "iscsi\\://{ip}\\:{}/iqn.2026-11.io.corral\\:{volume}/0",
        portal.port()
    )
}

/// fio with the libiscsi engine, built (once, cached under target/) by
/// scripts/build-fio-libiscsi.sh.
pub fn fio_libiscsi() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts").join("build-fio-libiscsi.sh");
    let out = run_bounded(Command::new("bash").arg(&script), Duration::from_secs(900))?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    let p = PathBuf::from(path);
    if !p.is_file() {
        bail!("{} did not print the fio path", script.display());
    }
    Ok(p)
}

/// iscsi-test-cu's outcome: CUnit counts, with skips (tests that printed
/// `[SKIPPED]`) taken out of the passes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CunitSummary {
    pub tests: usize,
    pub passed: usize,
    pub skipped: usize,
    pub failed: usize,
    pub failures: Vec<String>,
    /// The "Run Summary" table was printed (the run finished).
    pub complete: bool,
}

/// Parse iscsi-test-cu output.
pub fn parse_cunit(text: &str) -> CunitSummary {
    let mut s = CunitSummary::default();
    let mut suite = String::new();
    let mut current: Option<(String, String)> = None;
    let finish = |cur: Option<(String, String)>, s: &mut CunitSummary| {
        if let Some((name, body)) = cur {
            s.tests += 1;
            let trimmed = body.trim_end();
            let passed = trimmed.ends_with("passed") && !trimmed.ends_with("FAILED");
            if !passed || body.contains("\nFAILED") {
                s.failed += 1;
                s.failures.push(name);
            } else if body.contains("[SKIPPED]") {
                s.skipped += 1;
            } else {
                s.passed += 1;
            }
        }
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Suite: ") {
            finish(current.take(), &mut s);
            suite = rest.trim().to_string();
            continue;
        }
        if line.starts_with("Run Summary") {
            finish(current.take(), &mut s);
            s.complete = true;
            continue;
        }
        if let Some(rest) = line.trim_start().strip_prefix("Test: ")
            && line.starts_with("  ")
        {
            finish(current.take(), &mut s);
            let (name, tail) = rest.split_once(" ...").unwrap_or((rest, ""));
            current = Some((format!("{suite}.{name}"), tail.to_string()));
            continue;
        }
        if let Some((_, body)) = current.as_mut() {
            body.push('\n');
            body.push_str(line);
        }
    }
    finish(current.take(), &mut s);
    s
}
