//! Filesystems and mounts on the node: reading the mount table
//! (`/proc/self/mountinfo`), making a filesystem only on a blank device,
//! mounting, bind-mounting and unmounting — through [`Host`].

use std::path::{Path, PathBuf};

use crate::host::{Host, HostError};

/// One line of `/proc/self/mountinfo`: what is mounted where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    /// The mount's root inside its filesystem (a bind of a subdirectory,
    /// or of a device node, shows here).
    pub root: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub read_only: bool,
}

/// The mount table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountTable {
    pub mounts: Vec<Mount>,
}

/// Undo mountinfo's octal escapes (`\040` is a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl MountTable {
    /// Parse mountinfo text; malformed lines are skipped.
    pub fn parse(text: &str) -> Self {
        let mut mounts = Vec::new();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                continue;
            }
            mounts.push(Mount {
                root: PathBuf::from(unescape(l[3])),
                mount_point: PathBuf::from(unescape(l[4])),
                read_only: l[5].split(',').any(|o| o == "ro"),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
            });
        }
        MountTable { mounts }
    }

    /// Read the host's table.
    pub fn read(host: &dyn Host) -> Result<Self, HostError> {
        let path = Path::new("/proc/self/mountinfo");
        host.read(path)
            .map(|t| Self::parse(&t))
            .map_err(|source| HostError::Io {
                what: "read /proc/self/mountinfo".into(),
                source,
            })
    }

    /// The newest mount on `path`, if any.
    pub fn at(&self, path: &Path) -> Option<&Mount> {
        self.mounts.iter().rev().find(|m| m.mount_point == path)
    }

    pub fn is_mount_point(&self, path: &Path) -> bool {
        self.at(path).is_some()
    }
}

/// The filesystem on `device`, or `None` when it is blank (`blkid -p`
/// exits 2 when it finds nothing).
pub fn filesystem_on(host: &dyn Host, device: &Path) -> Result<Option<String>, HostError> {
    let dev = device.display().to_string();
    let out = host.run("blkid", &["-p", "-o", "value", "-s", "TYPE", &dev])?;
    match out.code {
        Some(0) => {
            let t = out.stdout.trim();
            Ok((!t.is_empty()).then(|| t.to_string()))
        }
        Some(2) => Ok(None),
        _ => Err(HostError::Failed {
            command: format!("blkid -p {dev}"),
            code: format!("{:?}", out.code),
            stderr: out.stderr.trim().to_string(),
        }),
    }
}

/// Make `fs_type` on `device` only if the device is blank; a device with
/// another filesystem is refused (never reformatted).
pub fn format_if_blank(host: &dyn Host, device: &Path, fs_type: &str) -> Result<(), HostError> {
    let dev = device.display().to_string();
    match filesystem_on(host, device)? {
        Some(found) if found == fs_type => Ok(()),
        Some(found) => Err(HostError::Refused(format!(
            "{dev} already holds a {found} filesystem, not {fs_type}: refusing to format it"
        ))),
        None => {
            let mkfs = format!("mkfs.{fs_type}");
            match fs_type {
                "ext4" => host.run_ok(&mkfs, &["-F", "-q", "-E", "nodiscard", &dev])?,
                "xfs" => host.run_ok(&mkfs, &["-q", "-K", &dev])?,
                other => {
                    return Err(HostError::Refused(format!(
                        "unsupported filesystem {other}"
                    )));
                }
            };
            Ok(())
        }
    }
}

/// Mount `device` (`fs_type`) on `target` with `flags`.
pub fn mount(
    host: &dyn Host,
    device: &Path,
    fs_type: &str,
    flags: &[String],
    target: &Path,
) -> Result<(), HostError> {
    let dev = device.display().to_string();
    let tgt = target.display().to_string();
    let mut args = vec!["-t", fs_type];
    let opts = flags.join(",");
    if !opts.is_empty() {
        args.extend(["-o", opts.as_str()]);
    }
    args.extend([dev.as_str(), tgt.as_str()]);
    host.run_ok("mount", &args).map(|_| ())
}

/// Bind-mount `source` on `target`, read-only if asked.
pub fn bind(
    host: &dyn Host,
    source: &Path,
    target: &Path,
    read_only: bool,
) -> Result<(), HostError> {
    let src = source.display().to_string();
    let tgt = target.display().to_string();
    host.run_ok("mount", &["--bind", &src, &tgt])?;
    if read_only {
        host.run_ok("mount", &["-o", "remount,bind,ro", &tgt])?;
    }
    Ok(())
}

/// Unmount `target` if something is mounted there.
pub fn unmount(host: &dyn Host, target: &Path) -> Result<(), HostError> {
    if MountTable::read(host)?.is_mount_point(target) {
        host.run_ok("umount", &[&target.display().to_string()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{CommandOutput, RecordingHost};

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 7:3 / /var/lib/corral/staging/pvc\\0401 rw,relatime shared:50 - ext4 /dev/loop3 rw
99 22 7:3 / /var/lib/kubelet/pods/x/mount ro,relatime shared:50 - ext4 /dev/loop3 ro
100 22 0:5 /loop4 /var/lib/kubelet/pods/y/dev ro,nosuid - devtmpfs udev rw
";

    #[test]
    fn the_mount_table_reads_points_sources_and_flags() {
        let t = MountTable::parse(MOUNTINFO);
        assert_eq!(t.mounts.len(), 4);
        let staged = t.at(Path::new("/var/lib/corral/staging/pvc 1")).unwrap();
        assert_eq!(staged.source, "/dev/loop3");
        assert!(!staged.read_only);
        assert!(
            t.at(Path::new("/var/lib/kubelet/pods/x/mount"))
                .unwrap()
                .read_only
        );
        assert_eq!(
            t.at(Path::new("/var/lib/kubelet/pods/y/dev")).unwrap().root,
            Path::new("/loop4")
        );
        assert!(!t.is_mount_point(Path::new("/var/lib")));
        assert_eq!(MountTable::parse("garbage\n\n1 2 - x").mounts.len(), 0);
    }

    #[test]
    fn only_a_blank_device_is_formatted() {
        let host = RecordingHost::new();
        host.answer("blkid", &[], vec![CommandOutput::failed(2, "")]);
        format_if_blank(&host, Path::new("/dev/loop3"), "ext4").unwrap();
        assert!(host.commands().iter().any(|c| c.starts_with("mkfs.ext4 ")));

        let host = RecordingHost::new();
        host.answer("blkid", &[], vec![CommandOutput::ok("ext4\n")]);
        format_if_blank(&host, Path::new("/dev/loop3"), "ext4").unwrap();
        assert!(!host.commands().iter().any(|c| c.starts_with("mkfs")));

        let host = RecordingHost::new();
        host.answer("blkid", &[], vec![CommandOutput::ok("xfs\n")]);
        let err = format_if_blank(&host, Path::new("/dev/loop3"), "ext4").unwrap_err();
        assert!(err.to_string().contains("refusing"), "{err}");
        assert!(!host.commands().iter().any(|c| c.starts_with("mkfs")));

        let host = RecordingHost::new();
        host.answer("blkid", &[], vec![CommandOutput::failed(4, "bad device")]);
        assert!(format_if_blank(&host, Path::new("/dev/loop3"), "ext4").is_err());
    }

    #[test]
    fn a_read_only_bind_is_remounted_read_only() {
        let host = RecordingHost::new();
        bind(&host, Path::new("/s"), Path::new("/t"), true).unwrap();
        assert_eq!(
            host.commands(),
            ["mount --bind /s /t", "mount -o remount,bind,ro /t"]
        );
    }
}
