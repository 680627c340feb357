//! The node plugin's volumes: staging (attach the engine's frontend, make
//! a filesystem on a blank device, mount it at the staging path), publishing
//! (bind-mount into the pod, read-only when asked; re-stage if the staging
//! mount vanished; at one target path per node unless the access mode is
//! SINGLE_NODE_MULTI_WRITER), and undoing both — each idempotent, as the kubelet
//! retries every call. What is staged is recorded in the state directory
//! (one JSON file per volume, written atomically), so a restarted plugin
//! can still unstage what its predecessor staged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::attach::{self, AttachMethod, Attachment, Frontend};
use crate::host::{Host, HostError};
use crate::mounts::{self, MountTable};

/// How the pod uses the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Access {
    /// A filesystem mounted in the pod.
    Mount { fs_type: String, flags: Vec<String> },
    /// The raw block device in the pod.
    Block,
}

/// A volume staged on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub access: Access,
    pub attachment: Attachment,
    /// The engine's control address, for volume health.
    pub control_address: Option<String>,
    /// Where the volume is published (bound into pods) on this node.
    #[serde(default)]
    pub publications: Vec<Publication>,
}

/// The CSI access mode that lets several target paths on one node hold a
/// volume at once; every other single-node mode allows one.
pub const MULTI_WRITER_MODE: &str = "SINGLE_NODE_MULTI_WRITER";

/// One NodePublishVolume: the volume bound at `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub target: PathBuf,
    pub read_only: bool,
    /// The CSI access mode's name (`SINGLE_NODE_WRITER`, ...).
    pub mode: String,
    /// Raw block access rather than a mounted filesystem.
    pub block: bool,
}

impl Publication {
    /// Whether the volume may be published at other target paths as well
    /// (CSI: only `SINGLE_NODE_MULTI_WRITER`, of the modes corral takes).
    pub fn shared(&self) -> bool {
        self.mode == MULTI_WRITER_MODE
    }

    /// Same arguments, whatever the target.
    fn same_arguments(&self, other: &Publication) -> bool {
        self.read_only == other.read_only && self.mode == other.mode && self.block == other.block
    }
}

/// Why a node operation failed, by the CSI code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("state directory: {0}")]
    State(String),
}

/// The node's staged volumes and the operations on them.
pub struct NodeVolumes {
    host: Arc<dyn Host>,
    state_dir: PathBuf,
    method: AttachMethod,
}

fn state_error(what: &str, path: &Path, e: impl std::fmt::Display) -> NodeError {
    NodeError::State(format!("{what} {}: {e}", path.display()))
}

impl NodeVolumes {
    pub fn new(host: Arc<dyn Host>, state_dir: PathBuf, method: AttachMethod) -> Self {
        NodeVolumes {
            host,
            state_dir,
            method,
        }
    }

    pub fn method(&self) -> AttachMethod {
        self.method
    }

    fn record_path(&self, volume_id: &str) -> PathBuf {
        self.state_dir
            .join("volumes")
            .join(format!("{volume_id}.json"))
    }

    fn work_dir(&self, volume_id: &str) -> PathBuf {
        self.state_dir.join("volumes").join(volume_id)
    }

    /// The record of a staged volume, if any.
    pub fn record(&self, volume_id: &str) -> Result<Option<StageRecord>, NodeError> {
        let path = self.record_path(volume_id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| state_error("corrupt record", &path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(state_error("read", &path, e)),
        }
    }

    fn save(&self, record: &StageRecord) -> Result<(), NodeError> {
        let path = self.record_path(&record.volume_id);
        let dir = path.parent().unwrap_or(&self.state_dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| state_error("create", &dir, e))?;
        let bytes =
            serde_json::to_vec_pretty(record).map_err(|e| state_error("encode", &path, e))?;
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| state_error("write", &path, e))
    }

    fn forget(&self, volume_id: &str) -> Result<(), NodeError> {
        let path = self.record_path(volume_id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(state_error("remove", &path, e)),
        }
        let _ = std::fs::remove_dir_all(self.work_dir(volume_id));
        Ok(())
    }

    /// NodeStageVolume: attach, format if blank, mount at `staging`.
    pub fn stage(
        &self,
        volume_id: &str,
        frontend: &Frontend,
        access: &Access,
        staging: &Path,
        control_address: Option<String>,
    ) -> Result<(), NodeError> {
        let host = self.host.as_ref();
        let existing = self.record(volume_id)?;
        if let Some(r) = &existing {
            if r.staging_path != staging {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {volume_id} is staged at {}, not {}",
                    r.staging_path.display(),
                    staging.display()
                )));
            }
            if &r.access != access {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {volume_id} is staged with another access type"
                )));
            }
        }
        let publications = existing
            .as_ref()
            .map(|r| r.publications.clone())
            .unwrap_or_default();
        // Reuse an attachment whose device is still there (a retried or
        // repeated stage); otherwise attach afresh.
        let attachment = match existing {
            Some(r) if host.exists(r.attachment.device()) => r.attachment,
            Some(r) => {
                let _ = attach::detach(host, &r.attachment);
                self.attach(volume_id, frontend)?
            }
            None => self.attach(volume_id, frontend)?,
        };
        let record = StageRecord {
            volume_id: volume_id.to_string(),
            staging_path: staging.to_path_buf(),
            access: access.clone(),
            attachment,
            control_address,
            publications,
        };
        // Record before mounting: from here on an unstage can undo it.
        self.save(&record)?;
        if let Access::Mount { fs_type, flags } = access {
            let table = MountTable::read(host)?;
            if let Some(m) = table.at(staging) {
                let device = record.attachment.device().display().to_string();
                if m.source != device {
                    return Err(NodeError::AlreadyExists(format!(
                        "{} has {} mounted, not {device}",
                        staging.display(),
                        m.source
                    )));
                }
                return Ok(());
            }
            host.make_dir(staging)
                .map_err(|e| state_error("create", staging, e))?;
            mounts::format_if_blank(host, record.attachment.device(), fs_type)?;
            mounts::mount(host, record.attachment.device(), fs_type, flags, staging)?;
        }
        Ok(())
    }

    fn attach(&self, volume_id: &str, frontend: &Frontend) -> Result<Attachment, NodeError> {
        let work = self.work_dir(volume_id);
        self.host
            .make_dir(&work)
            .map_err(|e| state_error("create", &work, e))?;
        Ok(attach::attach(
            self.host.as_ref(),
            self.method,
            frontend,
            &work,
        )?)
    }

    /// NodeUnstageVolume: unmount the staging path and detach. Unknown or
    /// already unstaged: OK.
    pub fn unstage(&self, volume_id: &str, staging: &Path) -> Result<(), NodeError> {
        let host = self.host.as_ref();
        mounts::unmount(host, staging)?;
        if let Some(r) = self.record(volume_id)? {
            attach::detach(host, &r.attachment)?;
        }
        self.forget(volume_id)
    }

    /// NodePublishVolume: bind the staged volume at `publication.target`.
    /// `restage` re-stages when the staging mount has vanished.
    ///
    /// A second target path on this node is refused (FAILED_PRECONDITION)
    /// unless both publications are `SINGLE_NODE_MULTI_WRITER`; the same
    /// target with other arguments is ALREADY_EXISTS (CSI spec,
    /// NodePublishVolume, the table for plugins with
    /// `SINGLE_NODE_MULTI_WRITER`).
    pub fn publish(
        &self,
        volume_id: &str,
        staging: &Path,
        publication: &Publication,
        restage: impl FnOnce() -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        let host = self.host.as_ref();
        let target = publication.target.as_path();
        let Some(mut record) = self.record(volume_id)? else {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume_id} is not staged on this node"
            )));
        };
        if record.staging_path != staging {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume_id} is staged at {}, not {}",
                record.staging_path.display(),
                staging.display()
            )));
        }
        let staged_block = record.access == Access::Block;
        if publication.block != staged_block {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume_id} is staged for {} access, not {}",
                if staged_block { "block" } else { "mount" },
                if publication.block { "block" } else { "mount" },
            )));
        }
        let table = MountTable::read(host)?;
        // Publications whose target is no longer mounted (say, the node
        // rebooted) hold nothing.
        let before = record.publications.len();
        record
            .publications
            .retain(|p| p.target == target || table.is_mount_point(&p.target));
        let pruned = record.publications.len() != before;
        let here = record.publications.iter().find(|p| p.target == target);
        if let Some(m) = table.at(target) {
            let same = match here {
                Some(p) => p.same_arguments(publication),
                // Mounted by a plugin that kept no record of it.
                None => m.read_only == publication.read_only,
            };
            if !same {
                return Err(NodeError::AlreadyExists(format!(
                    "{} is already published with other arguments ({})",
                    target.display(),
                    if m.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            if here.is_none() || pruned {
                record.publications.retain(|p| p.target != target);
                record.publications.push(publication.clone());
                self.save(&record)?;
            }
            return Ok(());
        }
        if let Some(other) = record.publications.iter().find(|p| p.target != target)
            && !(other.shared() && publication.shared())
        {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume_id} is already published at {} ({}); only {MULTI_WRITER_MODE} \
                 volumes may be published at several target paths on one node",
                other.target.display(),
                other.mode
            )));
        }
        match &record.access {
            Access::Mount { .. } => {
                if !table.is_mount_point(staging) {
                    tracing::warn!(volume_id, staging = %staging.display(), "staging mount vanished: staging again");
                    restage()?;
                }
                std::fs::create_dir_all(target).map_err(|e| state_error("create", target, e))?;
                mounts::bind(host, staging, target, publication.read_only)?;
            }
            Access::Block => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| state_error("create", parent, e))?;
                }
                if !target.exists() {
                    std::fs::File::create(target).map_err(|e| state_error("create", target, e))?;
                }
                mounts::bind(
                    host,
                    record.attachment.device(),
                    target,
                    publication.read_only,
                )?;
            }
        }
        // A re-stage rewrote the record: add to what is recorded now.
        let mut record = self.record(volume_id)?.unwrap_or(record);
        record
            .publications
            .retain(|p| p.target != target && table.is_mount_point(&p.target));
        record.publications.push(publication.clone());
        self.save(&record)
    }

    /// NodeUnpublishVolume: unmount and remove `target`. Already gone: OK.
    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), NodeError> {
        mounts::unmount(self.host.as_ref(), target)?;
        let removed = match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|e| state_error("remove", target, e))?;
        if let Some(mut record) = self.record(volume_id)?
            && record.publications.iter().any(|p| p.target == target)
        {
            record.publications.retain(|p| p.target != target);
            self.save(&record)?;
        }
        Ok(())
    }
}

impl NodeVolumes {
    /// NodeExpandVolume, once the engine serves `wanted` bytes (if known):
    /// make the device show the new size (an iSCSI rescan; an NBD or fuse
    /// attachment keeps the size it connected with), then grow a mounted
    /// filesystem online — `resize2fs DEVICE` for ext4, `xfs_growfs
    /// STAGING` for xfs. A block volume only gets the rescan. Returns the
    /// device's size (`wanted` when it cannot be read). Safe to repeat.
    pub fn expand(&self, volume_id: &str, wanted: Option<u64>) -> Result<u64, NodeError> {
        let host = self.host.as_ref();
        let Some(record) = self.record(volume_id)? else {
            return Err(NodeError::NotFound(format!(
                "volume {volume_id} is not staged on this node"
            )));
        };
        let device = record.attachment.device();
        let dev = device.display().to_string();
        if let Attachment::Iscsi { portal, target, .. } = &record.attachment {
            host.run_ok(
                "iscsiadm",
                &["-m", "node", "-T", target, "-p", portal, "--rescan"],
            )?;
        }
        let size = host
            .run_ok("blockdev", &["--getsize64", &dev])
            .ok()
            .and_then(|o| o.stdout.trim().parse::<u64>().ok());
        if let (Some(size), Some(wanted)) = (size, wanted)
            && size < wanted
        {
            return Err(NodeError::FailedPrecondition(match record.attachment {
                Attachment::Iscsi { .. } => {
                    format!("{dev} still has {size} bytes after a rescan, not {wanted}; try again")
                }
                Attachment::Nbd { .. } | Attachment::Fuse { .. } => format!(
                    "{dev} has {size} bytes, not {wanted}: an NBD attachment keeps the size \
                     it connected with; the volume shows its new size when it is staged \
                     again (restart the pod using it), and its filesystem grows then"
                ),
            }));
        }
        if let Access::Mount { fs_type, .. } = &record.access {
            let table = MountTable::read(host)?;
            if !table.is_mount_point(&record.staging_path) {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {volume_id} is not mounted at its staging path {}",
                    record.staging_path.display()
                )));
            }
            match fs_type.as_str() {
                "xfs" => {
                    let staging = record.staging_path.display().to_string();
                    host.run_ok("xfs_growfs", &[&staging])?;
                }
                _ => {
                    host.run_ok("resize2fs", &[&dev])?;
                }
            }
        }
        tracing::info!(volume_id, device = %dev, ?size, "expanded on the node");
        Ok(size.or(wanted).unwrap_or(0))
    }
}

/// Bytes and inodes of a mounted filesystem (`statvfs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

/// `statvfs` of `path`.
pub fn fs_usage(path: &Path) -> std::io::Result<FsUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated string and s a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frag = s.f_frsize as u64;
    let total = s.f_blocks as u64 * frag;
    let free = s.f_bfree as u64 * frag;
    Ok(FsUsage {
        total_bytes: total,
        available_bytes: s.f_bavail as u64 * frag,
        used_bytes: total.saturating_sub(free),
        total_inodes: s.f_files as u64,
        free_inodes: s.f_ffree as u64,
        used_inodes: (s.f_files as u64).saturating_sub(s.f_ffree as u64),
    })
}

/// The size of a block device (or file), in bytes.
pub fn device_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path)?;
    f.seek(std::io::SeekFrom::End(0))
}

#[cfg(test)]
mod tests;
