//! Helpers shared by the iSCSI end-to-end tests: a `corral serve-file
//! --iscsi` process, a minimal raw initiator, the fio build with the
//! libiscsi engine, and a parser for iscsi-test-cu's CUnit output.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

/// A minimal initiator for what real ones never send.
pub struct RawInitiator {
    pub stream: TcpStream,
    /// CmdSN of the next command, ITT of the next task.
    cmd_sn: u32,
    itt: u32,
}

pub fn bhs(opcode: u8, flags: u8) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = opcode;
    b[1] = flags;
    b
}

pub fn with_data(mut header: [u8; 48], data: &[u8]) -> Vec<u8> {
    let len = data.len() as u32;
    header[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    let mut v = header.to_vec();
    v.extend_from_slice(data);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

impl RawInitiator {
    pub fn connect(portal: SocketAddr) -> Self {
        let stream = TcpStream::connect(portal).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        RawInitiator {
            stream,
            cmd_sn: 0,
            itt: 0x100,
        }
    }

    /// Log in straight to the full feature phase (no security stage).
    pub fn login(portal: SocketAddr, volume: &str, isid_tail: u8) -> Self {
        Self::login_as(portal, volume, "iqn.2026-11.test:raw", isid_tail)
    }

    /// Log in as initiator `name` with ISID tail `isid_tail` (one I_T
    /// nexus per pair).
    pub fn login_as(portal: SocketAddr, volume: &str, name: &str, isid_tail: u8) -> Self {
        let mut me = Self::connect(portal);
        let mut h = bhs(0x43, 0x80 | (1 << 2) | 3);
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0x12, 0x34, isid_tail]);
        h[16..20].copy_from_slice(&1u32.to_be_bytes());
        let keys = format!(
            "InitiatorName={name}\0SessionType=Normal\0TargetName=iqn.2026-11.io.corral:{volume}\0HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=65536\0"
        );
        me.stream.write_all(&with_data(h, keys.as_bytes())).unwrap();
        let (resp, _) = me.read_pdu().unwrap();
        assert_eq!(resp[0] & 0x3f, 0x23, "login response");
        assert_eq!((resp[36], resp[37]), (0, 0), "login status");
        assert_eq!(resp[1] & 0x83, 0x83, "full feature phase");
        me.cmd_sn = u32::from_be_bytes([resp[28], resp[29], resp[30], resp[31]]);
        me
    }

    /// Run one SCSI command on LUN 0: `data_out` goes as immediate data,
    /// up to `read_len` bytes may come back. Returns (status, Data-In).
    pub fn command(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> (u8, Vec<u8>) {
        let mut flags = 0x80 | 0x01; // final, simple task attribute
        if read_len > 0 {
            flags |= 0x40;
        }
        if !data_out.is_empty() {
            flags |= 0x20;
        }
        let mut h = bhs(0x01, flags);
        self.itt += 1;
        h[16..20].copy_from_slice(&self.itt.to_be_bytes());
        let edtl = if data_out.is_empty() {
            read_len
        } else {
            data_out.len() as u32
        };
        h[20..24].copy_from_slice(&edtl.to_be_bytes());
        h[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        self.stream.write_all(&with_data(h, data_out)).unwrap();
        let mut data_in = Vec::new();
        loop {
            let (resp, data) = self.read_pdu().unwrap();
            match resp[0] & 0x3f {
                // Data-In; with the S bit it carries the status too.
                0x25 => {
                    data_in.extend_from_slice(&data);
                    if resp[1] & 0x01 != 0 {
                        return (resp[3], data_in);
                    }
                }
                // SCSI Response.
                0x21 => return (resp[3], data_in),
                // NOP-In pings and asynchronous messages are not ours.
                0x20 | 0x32 => continue,
                other => panic!("unexpected PDU opcode {other:#04x} in reply to a command"),
            }
        }
    }

    /// Like [`RawInitiator::command`], also returning the sense data of a
    /// CHECK CONDITION (empty otherwise): (status, Data-In, sense).
    pub fn command_sense(
        &mut self,
        cdb: &[u8],
        data_out: &[u8],
        read_len: u32,
    ) -> (u8, Vec<u8>, Vec<u8>) {
        let mut flags = 0x80 | 0x01;
        if read_len > 0 {
            flags |= 0x40;
        }
        if !data_out.is_empty() {
            flags |= 0x20;
        }
        let mut h = bhs(0x01, flags);
        self.itt += 1;
        h[16..20].copy_from_slice(&self.itt.to_be_bytes());
        let edtl = if data_out.is_empty() {
            read_len
        } else {
            data_out.len() as u32
        };
        h[20..24].copy_from_slice(&edtl.to_be_bytes());
        h[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        self.stream.write_all(&with_data(h, data_out)).unwrap();
        let mut data_in = Vec::new();
        loop {
            let (resp, data) = self.read_pdu().unwrap();
            match resp[0] & 0x3f {
                0x25 => {
                    data_in.extend_from_slice(&data);
                    if resp[1] & 0x01 != 0 {
                        return (resp[3], data_in, Vec::new());
                    }
                }
                // SCSI Response: sense data behind a 2-byte length.
                0x21 => {
                    let sense = if data.len() >= 2 {
                        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
                        data[2..(2 + n).min(data.len())].to_vec()
                    } else {
                        Vec::new()
                    };
                    return (resp[3], data_in, sense);
                }
                0x20 | 0x32 => continue,
                other => panic!("unexpected PDU opcode {other:#04x} in reply to a command"),
            }
        }
    }

    pub fn read_pdu(&mut self) -> std::io::Result<([u8; 48], Vec<u8>)> {
        let mut h = [0u8; 48];
        self.stream.read_exact(&mut h)?;
        let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut data = vec![0u8; (len + 3) & !3];
        self.stream.read_exact(&mut data)?;
        data.truncate(len);
        Ok((h, data))
    }

    /// Is the connection closed by the target (EOF or reset) within the timeout?
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

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
