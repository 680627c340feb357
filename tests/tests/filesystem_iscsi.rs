//! A real ext4 filesystem on a 3-replica corral volume, reached through the
//! engine's iSCSI target instead of its NBD server. With no kernel iSCSI
//! initiator here, a libiscsi initiator inside nbdkit (an iscsi plugin built
//! by scripts/build-nbdkit-iscsi.sh: nbdkit's own from Debian's source when
//! the mirror has it, else tests/nbdkit-iscsi/iscsi-bridge.c, glue between
//! nbdkit and libiscsi) turns the LUN into an NBD export on a unix socket;
//! then, as in filesystem.rs (corral_tests::ext4): nbdfuse exposes it as a
//! file, losetup makes it a block device, mkfs, mount, write, unmount,
//! fsck, and read everything back after a remount. Every byte the kernel
//! reads or writes crosses corral's iSCSI target (READ/WRITE(16), UNMAP
//! from mkfs's discard, SYNCHRONIZE CACHE). Needs root (loop devices,
//! mount), as the README's test command has.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use corral_tests::ext4::{Ext4OnNbd, assert_root};
use corral_tests::tools::{reap, require, wait_for_pidfile};
use corral_tests::{Cluster, EngineSpec, run_bounded, wait_for_port};

#[test]
fn ext4_through_iscsi_on_a_three_replica_volume() {
    assert_root();
    let plugin = nbdkit_iscsi_plugin();
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("fsiscsi", "256MiB", &[0, 1, 2]))
        .unwrap();
    let portal = cluster.engines[e].iscsi;
    let volume = cluster.engines[e].volume.clone();
    wait_for_port(portal, Duration::from_secs(30)).unwrap();
    let mut nbdkit = Nbdkit::start(cluster.path(), &plugin, portal, &volume);

    // nbdfuse connects, and so nbdkit logs in to the target.
    let mut fs = Ext4OnNbd::attach(cluster.path(), &nbdkit.uri(), 256 << 20).unwrap();
    fs.mkfs_write_fsck_and_read_back(200).unwrap();

    // Unmount, detach, and stop nbdkit: it logs out and exits cleanly.
    drop(fs);
    let status = nbdkit.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "nbdkit exited with {status:?} on SIGTERM:\n{}",
        nbdkit.log_text()
    );

    // It all went through the engine's iSCSI target, as our initiator.
    let engine_log = cluster.engines[e].process.log_text();
    assert!(
        engine_log.lines().any(|l| l.contains("login complete")
            && l.contains("initiator=iqn.2026-11.io.corral:test-filesystem-iscsi")),
        "no iSCSI login from nbdkit in the engine's log:\n{engine_log}"
    );
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["replicas_rw"], 3, "{info}");
    assert_eq!(
        info["generation"], 1,
        "no replica failed along the way: {info}"
    );
    let report = cluster.verify(e).expect("RW replicas identical");
    assert_eq!(
        report["differences"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    cluster.stop_all().unwrap();
}

/// The nbdkit iscsi plugin, built (once, cached under target/) by
/// scripts/build-nbdkit-iscsi.sh.
fn nbdkit_iscsi_plugin() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts").join("build-nbdkit-iscsi.sh");
    let out = run_bounded(Command::new("bash").arg(&script), Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{}: {e:#}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or(""),
    );
    assert!(
        path.is_file(),
        "{} did not print the plugin's path",
        script.display()
    );
    path
}

/// nbdkit with the iscsi plugin: iSCSI in (a libiscsi initiator logged in
/// to `portal` as `iqn.2026-11.io.corral:test-filesystem-iscsi`), NBD out
/// on a unix socket. Stopped on drop; its log is printed when the test fails.
struct Nbdkit {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Nbdkit {
    fn start(dir: &Path, plugin: &Path, portal: SocketAddr, volume: &str) -> Self {
        let socket = dir.join("nbdkit.sock");
        let pidfile = dir.join("nbdkit.pid");
        let log = dir.join("nbdkit.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(require("nbdkit").unwrap())
            .args([
                "--foreground",
                "--exit-with-parent",
                "--unix",
                &socket.display().to_string(),
                "--pidfile",
                &pidfile.display().to_string(),
                &plugin.display().to_string(),
                &format!("target=iqn.2026-11.io.corral:{volume}"),
                &format!("portal={portal}"),
                "lun=0",
                "initiator=iqn.2026-11.io.corral:test-filesystem-iscsi",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut me = Nbdkit {
            child: Some(child),
            socket,
            log,
        };
        let child = me.child.as_mut().unwrap();
        if let Err(e) = wait_for_pidfile("nbdkit", &pidfile, child, Duration::from_secs(30)) {
            panic!("{e}:\n{}", me.log_text());
        }
        me
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGTERM: nbdkit logs out of the target and exits. Its exit status
    /// (None: it had to be killed, or was stopped already).
    fn stop(&mut self) -> Option<ExitStatus> {
        let c = self.child.take()?;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        reap(c, Duration::from_secs(20))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- last lines of nbdkit ({}) -----", self.log.display());
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}
