//! A real ext4 filesystem on a corral volume: nbdfuse exposes the NBD
//! export as a file, losetup makes it a block device, then mkfs, mount,
//! write, unmount, fsck, and read everything back after a remount.
//! Needs root (loop devices, mount), as the README's test command has.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_tests::tools::{random_file, require, run_ok};
use corral_tests::{Cluster, EngineSpec};

/// Undo every step on the way out, even when the test fails half way.
struct Mounted {
    fuse_dir: PathBuf,
    fuse: Option<Child>,
    loop_dev: Option<String>,
    mount_dir: PathBuf,
    mounted: bool,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let quiet = |cmd: &str, args: &[&str]| {
            let _ = Command::new(cmd)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if self.mounted {
            quiet("umount", &[&self.mount_dir.display().to_string()]);
        }
        if let Some(dev) = self.loop_dev.take() {
            quiet("losetup", &["-d", &dev]);
        }
        quiet("fusermount3", &["-u", &self.fuse_dir.display().to_string()]);
        if let Some(mut c) = self.fuse.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sh(tool: &str, args: &[&str]) -> String {
    let out = run_ok(tool, args, Duration::from_secs(120)).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn ext4_on_a_three_replica_volume() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (loop devices and mount)"
    );
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("fs", "256MiB", &[0, 1, 2]))
        .unwrap();
    let uri = cluster.engines[e].nbd_uri();

    let fuse_dir = cluster.path().join("fuse");
    let mount_dir = cluster.path().join("mnt");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&mount_dir).unwrap();
    let pidfile = cluster.path().join("nbdfuse.pid");
    let fuse = Command::new(require("nbdfuse").unwrap())
        .args([
            "-P",
            &pidfile.display().to_string(),
            &fuse_dir.display().to_string(),
            &uri,
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut m = Mounted {
        fuse_dir: fuse_dir.clone(),
        fuse: Some(fuse),
        loop_dev: None,
        mount_dir: mount_dir.clone(),
        mounted: false,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "nbdfuse did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
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
        let data = random_file(&path, *size, 100 + i as u64).unwrap();
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
        assert!(sha(path) == *data, "{} reads back", path.display());
    }
    for d in 0..20 {
        let text =
            std::fs::read_to_string(mount_dir.join(format!("dir-{d}")).join("note")).unwrap();
        assert_eq!(text, format!("note {d}"));
    }
    drop(m);
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["replicas_rw"], 3, "{info}");
    assert_eq!(
        info["generation"], 1,
        "no replica failed along the way: {info}"
    );
}
