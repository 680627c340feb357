//! A real ext4 filesystem on a 3-replica corral volume, reached through the
//! engine's iSCSI target instead of its NBD server. With no kernel iSCSI
//! initiator here, a libiscsi initiator inside nbdkit (an iscsi plugin built
//! by scripts/build-nbdkit-iscsi.sh: nbdkit's own from Debian's source when
//! the mirror has it, else tests/nbdkit-iscsi/iscsi-bridge.c, glue between
//! nbdkit and libiscsi) turns the LUN into an NBD export
//! on a unix socket; then, as in filesystem.rs: nbdfuse exposes it as a
//! file, losetup makes it a block device, mkfs, mount, write, unmount,
//! fsck, and read everything back after a remount. Every byte the kernel
//! reads or writes crosses corral's iSCSI target (READ/WRITE(16), UNMAP
//! from mkfs's discard, SYNCHRONIZE CACHE). Needs root (loop devices,
//! mount), as the README's test command has.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use corral_tests::tools::{random_file, require, run_ok};
use corral_tests::{Cluster, EngineSpec, run_bounded, wait_for_port};

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

/// Undo every step on the way out, even when the test fails half way:
/// unmount, detach the loop device, unmount nbdfuse, stop nbdkit.
struct Stack {
    nbdkit: Option<Child>,
    nbdkit_log: PathBuf,
    fuse_dir: PathBuf,
    fuse: Option<Child>,
    loop_dev: Option<String>,
    mount_dir: PathBuf,
    mounted: bool,
}

/// Wait (bounded) for a child to exit; kill it when over.
fn reap(mut c: Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = c.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
    None
}

impl Stack {
    /// Tear down the NBD side (nbdfuse, then nbdkit, which logs out of the
    /// target); returns nbdkit's exit status (None: it had to be killed).
    fn stop_nbd(&mut self) -> Option<ExitStatus> {
        let quiet = |cmd: &str, args: &[&str]| {
            let _ = Command::new(cmd)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if self.mounted {
            quiet("umount", &[&self.mount_dir.display().to_string()]);
            self.mounted = false;
        }
        if let Some(dev) = self.loop_dev.take() {
            quiet("losetup", &["-d", &dev]);
        }
        if let Some(c) = self.fuse.take() {
            quiet("fusermount3", &["-u", &self.fuse_dir.display().to_string()]);
            reap(c, Duration::from_secs(10));
        }
        let c = self.nbdkit.take()?;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        reap(c, Duration::from_secs(20))
    }

    fn nbdkit_log(&self) -> String {
        std::fs::read_to_string(&self.nbdkit_log).unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop_nbd();
        if std::thread::panicking() {
            let text = self.nbdkit_log();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "----- last lines of nbdkit ({}) -----",
                self.nbdkit_log.display()
            );
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

fn sh(tool: &str, args: &[&str]) -> String {
    let out = run_ok(tool, args, Duration::from_secs(120)).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Wait (bounded) for `pidfile` to appear, failing early when the process
/// that writes it exits.
fn wait_pidfile(what: &str, pidfile: &Path, child: &mut Option<Child>, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pidfile.exists() {
        if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
            panic!("{what} exited ({status}) before serving:\n{}", log());
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not come up:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ext4_through_iscsi_on_a_three_replica_volume() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (loop devices and mount)"
    );
    let plugin = nbdkit_iscsi_plugin();
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("fsiscsi", "256MiB", &[0, 1, 2]))
        .unwrap();
    let portal = cluster.engines[e].iscsi;
    let volume = cluster.engines[e].volume.clone();
    wait_for_port(portal, Duration::from_secs(30)).unwrap();

    // nbdkit: iSCSI in (libiscsi), NBD out on a unix socket.
    let socket = cluster.path().join("nbdkit.sock");
    let nbdkit_pid = cluster.path().join("nbdkit.pid");
    let nbdkit_log = cluster.path().join("nbdkit.log");
    let log = std::fs::File::create(&nbdkit_log).unwrap();
    let nbdkit = Command::new(require("nbdkit").unwrap())
        .args([
            "--foreground",
            "--exit-with-parent",
            "--unix",
            &socket.display().to_string(),
            "--pidfile",
            &nbdkit_pid.display().to_string(),
            &plugin.display().to_string(),
            &format!("target=iqn.2026-11.io.corral:{volume}"),
            &format!("portal={portal}"),
            "lun=0",
            "initiator=iqn.2026-11.io.corral:test-filesystem-iscsi",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();

    let fuse_dir = cluster.path().join("fuse");
    let mount_dir = cluster.path().join("mnt");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&mount_dir).unwrap();
    let mut m = Stack {
        nbdkit: Some(nbdkit),
        nbdkit_log,
        fuse_dir: fuse_dir.clone(),
        fuse: None,
        loop_dev: None,
        mount_dir: mount_dir.clone(),
        mounted: false,
    };
    let nbdkit_log = m.nbdkit_log.clone();
    let log = move || std::fs::read_to_string(&nbdkit_log).unwrap_or_default();
    wait_pidfile("nbdkit", &nbdkit_pid, &mut m.nbdkit, &log);

    // nbdfuse connects, and so nbdkit logs in to the target.
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let fuse_pid = cluster.path().join("nbdfuse.pid");
    m.fuse = Some(
        Command::new(require("nbdfuse").unwrap())
            .args([
                "-P",
                &fuse_pid.display().to_string(),
                &fuse_dir.display().to_string(),
                &uri,
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_pidfile("nbdfuse", &fuse_pid, &mut m.fuse, &log);
    let image = fuse_dir.join("nbd");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 256 << 20);

    let dev = sh(
        "losetup",
        &["--find", "--show", &image.display().to_string()],
    );
    m.loop_dev = Some(dev.clone());
    sh("mkfs.ext4", &["-q", "-F", &dev]);
    sh("mount", &[&dev, &mount_dir.display().to_string()]);
    m.mounted = true;

    // Files of assorted sizes, plus a directory tree.
    let mut written = Vec::new();
    for (i, size) in [1usize, 4096, 65_537, 1 << 20, 5 << 20, 20 << 20]
        .iter()
        .enumerate()
    {
        let path = mount_dir.join(format!("file-{i}"));
        let data = random_file(&path, *size, 200 + i as u64).unwrap();
        written.push((path, data));
    }
    for d in 0..20 {
        let dir = mount_dir.join(format!("dir-{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("note"), format!("note {d}")).unwrap();
    }
    sh("sync", &[]);
    sh("umount", &[&mount_dir.display().to_string()]);
    m.mounted = false;

    // fsck exits 0 only when the filesystem is clean.
    run_ok("fsck.ext4", &["-n", "-f", &dev], Duration::from_secs(120)).unwrap();

    sh("mount", &[&dev, &mount_dir.display().to_string()]);
    m.mounted = true;
    for (path, data) in &written {
        assert!(
            std::fs::read(path).unwrap() == *data,
            "{} reads back",
            path.display()
        );
    }
    for d in 0..20 {
        let text =
            std::fs::read_to_string(mount_dir.join(format!("dir-{d}")).join("note")).unwrap();
        assert_eq!(text, format!("note {d}"));
    }

    // Unmount, detach, and stop nbdkit: it logs out and exits cleanly.
    let status = m.stop_nbd();
    assert!(
        status.is_some_and(|s| s.success()),
        "nbdkit exited with {status:?} on SIGTERM:\n{}",
        m.nbdkit_log()
    );
    drop(m);

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
