//! A real ext4 filesystem on an NBD export, for the filesystem tests
//! (`tests/filesystem.rs` over the engine's NBD server,
//! `tests/filesystem_iscsi.rs` over its iSCSI target through nbdkit).
//!
//! [`Ext4OnNbd`] owns the kernel side of the stack and its undoing:
//! nbdfuse exposing the export as a file, the loop device over that file,
//! the mount point, and the steps run on them — mkfs, mount, write files,
//! unmount, `fsck -fn`, remount, read everything back. Dropping it
//! unmounts, detaches the loop device and stops nbdfuse, even when a test
//! fails half way. Whatever serves the export (an engine, nbdkit) is the
//! test's. Needs root (loop devices, mount): see [`assert_root`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::tools::{random_file, reap, require, run_ok, wait_for_pidfile};

/// Fail the test at once unless it runs as root (loop devices and mount).
pub fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (loop devices and mount)"
    );
}

/// An NBD export as a loop block device (nbdfuse, then losetup), with a
/// mount point for the ext4 filesystem made on it. Undone on drop.
pub struct Ext4OnNbd {
    fuse_dir: PathBuf,
    fuse: Option<Child>,
    loop_dev: Option<String>,
    mount_dir: PathBuf,
    mounted: bool,
}

/// The files [`Ext4OnNbd`] wrote (paths relative to the mount point), to
/// read back.
struct Written {
    files: Vec<(PathBuf, Vec<u8>)>,
    notes: Vec<(PathBuf, String)>,
}

impl Ext4OnNbd {
    /// Expose the NBD export at `uri` through nbdfuse (mounted on
    /// `dir/fuse`), check that it is `size` bytes, and attach it to a loop
    /// device; the filesystem will be mounted on `dir/mnt`.
    pub fn attach(dir: &Path, uri: &str, size: u64) -> Result<Self> {
        let fuse_dir = dir.join("fuse");
        let mount_dir = dir.join("mnt");
        std::fs::create_dir_all(&fuse_dir)?;
        std::fs::create_dir_all(&mount_dir)?;
        let pidfile = dir.join("nbdfuse.pid");
        let fuse = Command::new(require("nbdfuse")?)
            .args([
                "-P",
                &pidfile.display().to_string(),
                &fuse_dir.display().to_string(),
                uri,
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("spawn nbdfuse")?;
        let mut me = Ext4OnNbd {
            fuse_dir,
            fuse: Some(fuse),
            loop_dev: None,
            mount_dir,
            mounted: false,
        };
        let fuse = me.fuse.as_mut().expect("nbdfuse was just spawned");
        wait_for_pidfile("nbdfuse", &pidfile, fuse, Duration::from_secs(30))?;
        let image = me.fuse_dir.join("nbd");
        let len = std::fs::metadata(&image)?.len();
        ensure!(len == size, "nbdfuse exposes {len} bytes, not {size}");
        me.loop_dev = Some(sh(
            "losetup",
            &["--find", "--show", &image.display().to_string()],
        )?);
        Ok(me)
    }

    /// The filesystem round trip: mkfs.ext4, mount, write files of assorted
    /// sizes (pseudo-random from `seed`) and a directory tree, unmount,
    /// `fsck.ext4 -n -f` (which exits 0 only when the filesystem is clean),
    /// remount, and read every file back.
    pub fn mkfs_write_fsck_and_read_back(&mut self, seed: u64) -> Result<()> {
        let dev = self.loop_dev.clone().context("no loop device")?;
        sh("mkfs.ext4", &["-q", "-F", &dev])?;
        self.mount()?;
        let written = self.write_files(seed)?;
        self.unmount()?;
        run_ok("fsck.ext4", &["-n", "-f", &dev], Duration::from_secs(120))?;
        self.mount()?;
        self.read_back(&written)
    }

    /// mkfs.ext4, mount, write files (pseudo-random from `seed`), unmount:
    /// what was written, to read back later — also on a later attachment of
    /// the same export under the same directory (see
    /// [`Ext4OnNbd::resize_fsck_and_read_back`]).
    pub fn mkfs_and_write(&mut self, seed: u64) -> Result<Ext4Files> {
        let dev = self.loop_dev.clone().context("no loop device")?;
        sh("mkfs.ext4", &["-q", "-F", &dev])?;
        self.mount()?;
        let written = self.write_files(seed)?;
        self.unmount()?;
        Ok(Ext4Files(written))
    }

    /// Grow the (unmounted) filesystem to the whole device: `e2fsck -f -y`
    /// (resize2fs wants a freshly checked filesystem; it must find nothing
    /// to fix), `resize2fs`, `fsck.ext4 -n -f` (clean), mount, and read
    /// `files` back. Returns the filesystem's size in bytes afterwards.
    pub fn resize_fsck_and_read_back(&mut self, files: &Ext4Files) -> Result<u64> {
        let dev = self.loop_dev.clone().context("no loop device")?;
        run_ok("e2fsck", &["-f", "-y", &dev], Duration::from_secs(120))?;
        sh("resize2fs", &[&dev])?;
        run_ok("fsck.ext4", &["-n", "-f", &dev], Duration::from_secs(120))?;
        let size = fs_size(&dev)?;
        self.mount()?;
        self.read_back(&files.0)?;
        Ok(size)
    }

    /// `fsck.ext4 -n -f` (clean) of the unmounted filesystem, mount, and
    /// read `files` back: the filesystem another attachment wrote (a copy
    /// of it: a restored backup, a clone).
    pub fn fsck_and_read_back(&mut self, files: &Ext4Files) -> Result<()> {
        let dev = self.loop_dev.clone().context("no loop device")?;
        run_ok("fsck.ext4", &["-n", "-f", &dev], Duration::from_secs(120))?;
        self.mount()?;
        self.read_back(&files.0)
    }

    fn mount(&mut self) -> Result<()> {
        let dev = self.loop_dev.as_deref().context("no loop device")?;
        sh("mount", &[dev, &self.mount_dir.display().to_string()])?;
        self.mounted = true;
        Ok(())
    }

    fn unmount(&mut self) -> Result<()> {
        sh("sync", &[])?;
        sh("umount", &[&self.mount_dir.display().to_string()])?;
        self.mounted = false;
        Ok(())
    }

    /// Files of assorted sizes, plus a directory tree.
    fn write_files(&self, seed: u64) -> Result<Written> {
        let mut files = Vec::new();
        for (i, size) in [1usize, 4096, 65_537, 1 << 20, 5 << 20, 20 << 20]
            .iter()
            .enumerate()
        {
            let path = self.mount_dir.join(format!("file-{i}"));
            let data = random_file(&path, *size, seed + i as u64)?;
            files.push((PathBuf::from(format!("file-{i}")), data));
        }
        let mut notes = Vec::new();
        for d in 0..20 {
            let dir = self.mount_dir.join(format!("dir-{d}"));
            std::fs::create_dir_all(&dir)?;
            let text = format!("note {d}");
            std::fs::write(dir.join("note"), &text)?;
            notes.push((PathBuf::from(format!("dir-{d}/note")), text));
        }
        Ok(Written { files, notes })
    }

    fn read_back(&self, written: &Written) -> Result<()> {
        for (name, data) in &written.files {
            let path = self.mount_dir.join(name);
            let read = std::fs::read(&path)?;
            ensure!(
                read == *data,
                "{} does not read back as written",
                path.display()
            );
        }
        for (name, text) in &written.notes {
            let path = self.mount_dir.join(name);
            let read = std::fs::read_to_string(&path)?;
            ensure!(read == *text, "{}: {read:?}, not {text:?}", path.display());
        }
        Ok(())
    }
}

impl Drop for Ext4OnNbd {
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
        if let Some(fuse) = self.fuse.take() {
            quiet("fusermount3", &["-u", &self.fuse_dir.display().to_string()]);
            reap(fuse, Duration::from_secs(10));
        }
    }
}

/// The files [`Ext4OnNbd::mkfs_and_write`] wrote.
pub struct Ext4Files(Written);

/// An ext4 filesystem's size in bytes (`dumpe2fs -h`: block count × block size).
fn fs_size(dev: &str) -> Result<u64> {
    let text = sh("dumpe2fs", &["-h", dev])?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("dumpe2fs -h {dev}: no {name:?}"))
    };
    Ok(field("Block count:")? * field("Block size:")?)
}

/// Run a tool (bounded), failing unless it exits 0; its trimmed stdout.
fn sh(tool: &str, args: &[&str]) -> Result<String> {
    let out = run_ok(tool, args, Duration::from_secs(120))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
