//! The iscsi and nbd attach methods' commands, against the real tools.
//!
//! This machine's kernel has neither the iSCSI initiator nor the NBD
//! client, so the node plugin's attach paths run against a recording host
//! in its unit tests. Here the commands it recorded are handed to Debian's
//! real `iscsiadm` and `nbd-client`, against a real corral target, to show
//! that the tools accept every argument and get as far as the kernel lets
//! them: iscsiadm rejects none as invalid (its exit code 7), and nbd-client
//! negotiates the export by name before it finds no NBD driver.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use corral_csi::attach::{self, AttachMethod, Frontend, iscsi_device_path};
use corral_csi::host::{CommandOutput, RecordingHost};
use corral_tests::tools::require;
use corral_tests::{corral_bin, free_addr, wait_for_port};

/// iscsiadm's exit code for invalid arguments (ISCSI_ERR_INVAL).
const ISCSI_ERR_INVAL: i32 = 7;

/// `corral serve-file` on a fresh file, killed on drop.
struct Target {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(flag: &str, addr: SocketAddr) -> Result<Target> {
    let dir = tempfile::tempdir()?;
    let child = Command::new(corral_bin())
        .args([
            "serve-file",
            "--file",
            &dir.path().join("vol.img").display().to_string(),
            "--size",
            "64MiB",
            flag,
            &addr.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn corral serve-file")?;
    let target = Target { child, _dir: dir };
    wait_for_port(addr, Duration::from_secs(20))?;
    Ok(target)
}

/// Run a recorded command line with the real tool, bounded in time.
fn run_real(line: &str) -> Result<Output> {
    let mut words = line.split_whitespace();
    let program = words.next().context("an empty command")?;
    let tool = require(program)?;
    let args: Vec<&str> = words.collect();
    let child = Command::new("timeout")
        .arg("30")
        .arg(tool)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    Ok(child.wait_with_output()?)
}

#[test]
fn iscsiadm_accepts_every_argument_the_iscsi_attach_gives_it() -> Result<()> {
    let portal = free_addr();
    let _target = serve("--iscsi", portal)?;
    let portal = portal.to_string();
    let iqn = "iqn.2026-11.io.corral:vol";
    // The plugin's attach and detach, recorded.
    let host = RecordingHost::new();
    host.answer(
        "iscsiadm",
        &["-m", "discovery"],
        vec![CommandOutput::ok(&format!("{portal},1 {iqn}\n"))],
    );
    host.add_link(iscsi_device_path(&portal, iqn), "/dev/sdx");
    let frontend = Frontend {
        volume: "vol".into(),
        nbd: None,
        iscsi: Some((portal.clone(), iqn.into())),
    };
    let attached = attach::attach(&host, AttachMethod::Iscsi, &frontend, Path::new("/w"))?;
    attach::detach(&host, &attached)?;
    let lines: Vec<String> = host
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("iscsiadm "))
        .collect();
    ensure!(
        lines.len() >= 4,
        "discovery, login, logout, delete: {lines:?}"
    );
    for line in &lines {
        let out = run_real(line)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() != Some(ISCSI_ERR_INVAL) && !stderr.contains("Usage"),
            "iscsiadm rejects `{line}` as invalid: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn nbd_client_negotiates_the_export_the_nbd_attach_names() -> Result<()> {
    let addr = free_addr();
    let _target = serve("--nbd", addr)?;
    // nbd-client is run for real after being recorded; the device then
    // "connects" on the recording host.
    let outputs: Arc<Mutex<Vec<Output>>> = Arc::default();
    let host = RecordingHost::new();
    let ran = Arc::clone(&outputs);
    host.after_run(move |host, program, args| {
        if program != "nbd-client" {
            return;
        }
        if let Ok(real) = run_real(&format!("{program} {}", args.join(" "))) {
            ran.lock().unwrap_or_else(|p| p.into_inner()).push(real);
        }
        if let Some(name) = args.get(2).and_then(|d| d.strip_prefix("/dev/")) {
            host.add_path(format!("/sys/block/{name}/pid"));
        }
    });
    host.add_path("/sys/block/nbd0");
    host.add_file("/sys/block/nbd0/size", "0\n");
    let frontend = Frontend {
        volume: "vol".into(),
        nbd: Some(addr.to_string()),
        iscsi: None,
    };
    attach::attach(&host, AttachMethod::Nbd, &frontend, Path::new("/w"))?;
    let outputs = outputs.lock().unwrap_or_else(|p| p.into_inner());
    let out = outputs.first().context("nbd-client was not run")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It found the export by name and learned its size; what stops it is
    // the missing kernel driver, not the command line or the server.
    ensure!(
        said.contains("size = 64MB"),
        "nbd-client did not negotiate: {said}"
    );
    ensure!(
        !said.contains("unrecognized") && !said.contains("Unknown error returned by server"),
        "nbd-client refused the attach's arguments: {said}"
    );
    Ok(())
}
