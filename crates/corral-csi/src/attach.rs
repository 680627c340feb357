//! Attaching an engine's frontend as a block device on this node, and
//! detaching it, by one of three methods:
//!
//! - `iscsi`: the host's open-iscsi (`iscsiadm` discovery and login), the
//!   device found under `/dev/disk/by-path/`; a device that multipathd has
//!   claimed is refused, with how to blacklist it;
//! - `nbd`: the kernel NBD client (`nbd-client` on a free `/dev/nbdN`);
//! - `fuse`: `nbdfuse` exposing the export as a file and a loop device
//!   over it — no kernel module, slower; `nbdfuse` runs in its own session
//!   so it outlives a plugin restart.
//!
//! Every command goes through [`Host`], so the paths needing kernel
//! modules are tested against a recording host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::host::{Host, HostError, wait_for};

/// How this node attaches volumes (`corral csi --attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMethod {
    Iscsi,
    Nbd,
    Fuse,
}

impl std::str::FromStr for AttachMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "iscsi" => Ok(AttachMethod::Iscsi),
            "nbd" => Ok(AttachMethod::Nbd),
            "fuse" => Ok(AttachMethod::Fuse),
            _ => Err(format!(
                "unknown attach method {s:?}: use iscsi, nbd or fuse"
            )),
        }
    }
}

/// Where a published engine serves the volume (from `publish_context`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub volume: String,
    /// `host:port` of the NBD server.
    pub nbd: Option<String>,
    /// `host:port` of the iSCSI portal and the target's IQN.
    pub iscsi: Option<(String, String)>,
}

/// A volume attached on this node: enough to find its device and undo it,
/// recorded in the plugin's state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Attachment {
    Iscsi {
        portal: String,
        target: String,
        device: PathBuf,
    },
    Nbd {
        device: PathBuf,
    },
    Fuse {
        dir: PathBuf,
        pid: u32,
        device: PathBuf,
    },
}

impl Attachment {
    /// The block device.
    pub fn device(&self) -> &Path {
        match self {
            Attachment::Iscsi { device, .. }
            | Attachment::Nbd { device }
            | Attachment::Fuse { device, .. } => device,
        }
    }
}

/// How long a device may take to appear after login or connect.
pub const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// `iscsiadm`'s exit code when the session already exists.
const ISCSI_ERR_SESS_EXISTS: i32 = 15;
/// `iscsiadm`'s exit code when there is no session to log out of.
const ISCSI_ERR_NO_OBJS_FOUND: i32 = 21;

/// Attach `frontend` with `method`; `work_dir` is this volume's private
/// directory in the plugin's state (the fuse method mounts there).
pub fn attach(
    host: &dyn Host,
    method: AttachMethod,
    frontend: &Frontend,
    work_dir: &Path,
) -> Result<Attachment, HostError> {
    match method {
        AttachMethod::Iscsi => {
            let (portal, target) = frontend
                .iscsi
                .as_ref()
                .ok_or_else(|| HostError::Refused("the engine serves no iSCSI frontend".into()))?;
            attach_iscsi(host, portal, target)
        }
        AttachMethod::Nbd => {
            let nbd = frontend
                .nbd
                .as_ref()
                .ok_or_else(|| HostError::Refused("the engine serves no NBD frontend".into()))?;
            attach_nbd(host, nbd, &frontend.volume)
        }
        AttachMethod::Fuse => {
            let nbd = frontend
                .nbd
                .as_ref()
                .ok_or_else(|| HostError::Refused("the engine serves no NBD frontend".into()))?;
            attach_fuse(host, nbd, &frontend.volume, work_dir)
        }
    }
}

/// The udev path of LUN 0 of `target` through `portal`.
pub fn iscsi_device_path(portal: &str, target: &str) -> PathBuf {
    PathBuf::from(format!(
        "/dev/disk/by-path/ip-{portal}-iscsi-{target}-lun-0"
    ))
}

fn attach_iscsi(host: &dyn Host, portal: &str, target: &str) -> Result<Attachment, HostError> {
    let found = host.run_ok(
        "iscsiadm",
        &["-m", "discovery", "-t", "sendtargets", "-p", portal],
    )?;
    if !found
        .stdout
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target))
    {
        return Err(HostError::Refused(format!(
            "discovery on {portal} does not offer {target}"
        )));
    }
    let login = host.run(
        "iscsiadm",
        &["-m", "node", "-T", target, "-p", portal, "--login"],
    )?;
    if !login.success() && login.code != Some(ISCSI_ERR_SESS_EXISTS) {
        return Err(HostError::Failed {
            command: format!("iscsiadm -m node -T {target} -p {portal} --login"),
            code: format!("{:?}", login.code),
            stderr: login.stderr.trim().to_string(),
        });
    }
    let by_path = iscsi_device_path(portal, target);
    let ready = wait_for(host, &by_path.display().to_string(), DEVICE_WAIT, |h| {
        h.exists(&by_path)
    });
    let device = ready.and_then(|()| {
        host.resolve(&by_path).map_err(|source| HostError::Io {
            what: format!("resolve {}", by_path.display()),
            source,
        })
    });
    let checked = device.and_then(|device| refuse_if_held(host, &device).map(|()| device));
    match checked {
        Ok(device) => Ok(Attachment::Iscsi {
            portal: portal.into(),
            target: target.into(),
            device,
        }),
        Err(e) => {
            // Leave no session behind a failed attach.
            let _ = logout_iscsi(host, portal, target);
            Err(e)
        }
    }
}

/// Refuse a disk that device-mapper (multipathd) has claimed: mounting
/// the disk under it would bypass and confuse the multipath device.
fn refuse_if_held(host: &dyn Host, device: &Path) -> Result<(), HostError> {
    let Some(name) = device.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(());
    };
    let holders = host
        .list(&Path::new("/sys/block").join(&name).join("holders"))
        .unwrap_or_default();
    if let Some(holder) = holders.first() {
        return Err(HostError::Refused(format!(
            "{} is held by {holder} (multipathd?): corral volumes have one path; \
             blacklist them in /etc/multipath.conf with \
             `blacklist {{ device {{ vendor \"CORRAL\" product \".*\" }} }}` \
             and run `multipathd reconfigure`",
            device.display()
        )));
    }
    Ok(())
}

fn logout_iscsi(host: &dyn Host, portal: &str, target: &str) -> Result<(), HostError> {
    let out = host.run(
        "iscsiadm",
        &["-m", "node", "-T", target, "-p", portal, "--logout"],
    )?;
    if !out.success() && out.code != Some(ISCSI_ERR_NO_OBJS_FOUND) {
        return Err(HostError::Failed {
            command: format!("iscsiadm -m node -T {target} -p {portal} --logout"),
            code: format!("{:?}", out.code),
            stderr: out.stderr.trim().to_string(),
        });
    }
    // Forget the node record so the host does not log in again at boot.
    let _ = host.run(
        "iscsiadm",
        &["-m", "node", "-T", target, "-p", portal, "-o", "delete"],
    );
    Ok(())
}

fn split_host_port(addr: &str) -> Result<(&str, &str), HostError> {
    addr.rsplit_once(':')
        .map(|(h, p)| (h.trim_start_matches('[').trim_end_matches(']'), p))
        .ok_or_else(|| HostError::Refused(format!("bad frontend address {addr:?}")))
}

fn attach_nbd(host: &dyn Host, addr: &str, volume: &str) -> Result<Attachment, HostError> {
    let (h, port) = split_host_port(addr)?;
    let sys = Path::new("/sys/block");
    if !host.exists(&sys.join("nbd0")) {
        host.run_ok("modprobe", &["nbd"])?;
    }
    let names = host.list(sys).map_err(|source| HostError::Io {
        what: "list /sys/block".into(),
        source,
    })?;
    // A device is free when no client process holds it and its size is 0.
    let free = names.iter().filter(|n| n.starts_with("nbd")).find(|n| {
        let dir = sys.join(n);
        !host.exists(&dir.join("pid"))
            && host
                .read(&dir.join("size"))
                .map(|s| s.trim() == "0")
                .unwrap_or(false)
    });
    let Some(name) = free else {
        return Err(HostError::Refused(
            "no free /dev/nbdN device (load the nbd module with more nbds_max)".into(),
        ));
    };
    let device = PathBuf::from("/dev").join(name);
    let dev = device.display().to_string();
    host.run_ok("nbd-client", &[h, port, &dev, "-N", volume])?;
    let pid = sys.join(name).join("pid");
    wait_for(host, &format!("{dev} to connect"), DEVICE_WAIT, |h| {
        h.exists(&pid)
    })?;
    Ok(Attachment::Nbd { device })
}

fn attach_fuse(
    host: &dyn Host,
    addr: &str,
    volume: &str,
    work_dir: &Path,
) -> Result<Attachment, HostError> {
    let dir = work_dir.join("fuse");
    host.make_dir(&dir).map_err(|source| HostError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    let pidfile = work_dir.join("nbdfuse.pid");
    let uri = format!("nbd://{addr}/{volume}");
    let dir_s = dir.display().to_string();
    let pid = host.spawn(
        "nbdfuse",
        &["-P", &pidfile.display().to_string(), &dir_s, &uri],
        &work_dir.join("nbdfuse.log"),
    )?;
    let image = dir.join("nbd");
    if let Err(e) = wait_for(host, "nbdfuse to serve", DEVICE_WAIT, |h| {
        h.exists(&pidfile) && h.exists(&image)
    }) {
        host.signal(pid, libc::SIGTERM);
        return Err(e);
    }
    let image_s = image.display().to_string();
    let out = match host.run_ok("losetup", &["--find", "--show", &image_s]) {
        Ok(out) => out,
        Err(e) => {
            let _ = host.run("fusermount3", &["-u", &dir_s]);
            host.signal(pid, libc::SIGTERM);
            return Err(e);
        }
    };
    Ok(Attachment::Fuse {
        dir,
        pid,
        device: PathBuf::from(out.stdout.trim()),
    })
}

/// Undo an attachment. Safe to repeat: what is already undone is skipped.
pub fn detach(host: &dyn Host, attachment: &Attachment) -> Result<(), HostError> {
    match attachment {
        Attachment::Iscsi { portal, target, .. } => logout_iscsi(host, portal, target),
        Attachment::Nbd { device } => {
            let dev = device.display().to_string();
            if let Some(name) = device.file_name() {
                let pid = Path::new("/sys/block").join(name).join("pid");
                if !host.exists(&pid) {
                    return Ok(());
                }
            }
            host.run_ok("nbd-client", &["-d", &dev]).map(|_| ())
        }
        Attachment::Fuse { dir, pid, device } => {
            let dev = device.display().to_string();
            let held = host
                .run("losetup", &["--noheadings", "-O", "NAME", &dev])
                .map(|o| o.success() && !o.stdout.trim().is_empty())
                .unwrap_or(false);
            if held {
                host.run_ok("losetup", &["-d", &dev])?;
            }
            let dir_s = dir.display().to_string();
            let mounted = host
                .read(Path::new("/proc/self/mountinfo"))
                .map(|t| crate::mounts::MountTable::parse(&t).is_mount_point(dir))
                .unwrap_or(false);
            if mounted {
                // nbdfuse exits when its mount goes away.
                host.run_ok("fusermount3", &["-u", &dir_s])?;
            }
            // Only if the pid still is our nbdfuse (it may have exited
            // with its mount, and the pid been reused).
            let cmdline = host
                .read(&Path::new("/proc").join(pid.to_string()).join("cmdline"))
                .unwrap_or_default();
            if cmdline.contains("nbdfuse") && cmdline.contains(&dir_s) {
                host.signal(*pid, libc::SIGTERM);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
