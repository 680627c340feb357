//! Staging and publishing, command by command, on a recording host with
//! the iSCSI method; the state directory is real (a temporary one).

use super::*;
use crate::attach::iscsi_device_path;
use crate::host::{CommandOutput, RecordingHost};

const PORTAL: &str = "127.0.0.1:10001";
const IQN: &str = "iqn.2026-11.io.corral:pvc-1";

fn setup() -> (Arc<RecordingHost>, NodeVolumes, tempfile::TempDir) {
    let host = Arc::new(RecordingHost::new());
    host.answer(
        "iscsiadm",
        &["-m", "discovery"],
        vec![CommandOutput::ok(&format!("{PORTAL},1 {IQN}\n"))],
    );
    host.add_link(iscsi_device_path(PORTAL, IQN), "/dev/sdc");
    host.add_file(
        "/proc/self/mountinfo",
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let volumes = NodeVolumes::new(
        Arc::clone(&host) as Arc<dyn Host>,
        dir.path().join("state"),
        AttachMethod::Iscsi,
    );
    (host, volumes, dir)
}

fn frontend() -> Frontend {
    Frontend {
        volume: "pvc-1".into(),
        nbd: None,
        iscsi: Some((PORTAL.into(), IQN.into())),
    }
}

fn ext4() -> Access {
    Access::Mount {
        fs_type: "ext4".into(),
        flags: vec![],
    }
}

/// A SINGLE_NODE_WRITER mount publication at `target`.
fn writer(target: &Path, read_only: bool) -> Publication {
    Publication {
        target: target.to_path_buf(),
        read_only,
        mode: "SINGLE_NODE_WRITER".into(),
        block: false,
    }
}

fn mounted(host: &RecordingHost, lines: &[(&str, &str, &str)]) {
    let mut text = String::from("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n");
    for (i, (point, source, opts)) in lines.iter().enumerate() {
        text.push_str(&format!(
            "{} 22 8:32 / {point} {opts} - ext4 {source} rw\n",
            90 + i
        ));
    }
    host.add_file("/proc/self/mountinfo", &text);
}

#[test]
fn staging_a_blank_volume_formats_and_mounts_it_once() {
    let (host, volumes, _d) = setup();
    host.answer("blkid", &[], vec![CommandOutput::failed(2, "")]);
    let staging = Path::new("/stage/pvc-1");
    volumes
        .stage("pvc-1", &frontend(), &ext4(), staging, None)
        .unwrap();
    let cmds = host.commands();
    assert!(
        cmds.iter()
            .any(|c| c.starts_with("mkfs.ext4 ") && c.ends_with("/dev/sdc")),
        "{cmds:?}"
    );
    assert_eq!(cmds.last().unwrap(), "mount -t ext4 /dev/sdc /stage/pvc-1");
    let record = volumes.record("pvc-1").unwrap().unwrap();
    assert_eq!(record.attachment.device(), Path::new("/dev/sdc"));

    // The kubelet retries: nothing is run again.
    mounted(&host, &[("/stage/pvc-1", "/dev/sdc", "rw")]);
    host.clear();
    volumes
        .stage("pvc-1", &frontend(), &ext4(), staging, None)
        .unwrap();
    assert!(host.commands().is_empty(), "{:?}", host.commands());

    // Another staging path for the same volume is refused.
    let err = volumes
        .stage("pvc-1", &frontend(), &ext4(), Path::new("/elsewhere"), None)
        .unwrap_err();
    assert!(matches!(err, NodeError::AlreadyExists(_)), "{err}");
}

#[test]
fn unstaging_unmounts_logs_out_and_forgets_and_may_repeat() {
    let (host, volumes, _d) = setup();
    host.answer("blkid", &[], vec![CommandOutput::ok("ext4\n")]);
    let staging = Path::new("/stage/pvc-1");
    volumes
        .stage("pvc-1", &frontend(), &ext4(), staging, None)
        .unwrap();
    assert!(!host.commands().iter().any(|c| c.starts_with("mkfs")));
    mounted(&host, &[("/stage/pvc-1", "/dev/sdc", "rw")]);
    host.clear();
    volumes.unstage("pvc-1", staging).unwrap();
    assert_eq!(
        host.commands(),
        [
            "umount /stage/pvc-1".to_string(),
            format!("iscsiadm -m node -T {IQN} -p {PORTAL} --logout"),
            format!("iscsiadm -m node -T {IQN} -p {PORTAL} -o delete"),
        ]
    );
    assert!(volumes.record("pvc-1").unwrap().is_none());
    mounted(&host, &[]);
    host.clear();
    volumes.unstage("pvc-1", staging).unwrap();
    assert!(host.commands().is_empty());
}

#[test]
fn publishing_binds_read_only_when_asked_and_restages_a_vanished_mount() {
    let (host, volumes, d) = setup();
    host.answer("blkid", &[], vec![CommandOutput::ok("ext4\n")]);
    let staging = Path::new("/stage/pvc-1");
    let err = volumes
        .publish("pvc-1", staging, &writer(Path::new("/t"), false), || Ok(()))
        .unwrap_err();
    assert!(matches!(err, NodeError::FailedPrecondition(_)), "{err}");

    volumes
        .stage("pvc-1", &frontend(), &ext4(), staging, None)
        .unwrap();
    // The staging mount is gone (say, the host rebooted): publish stages again.
    let target = d.path().join("pod/mount");
    let mut restaged = false;
    volumes
        .publish("pvc-1", staging, &writer(&target, true), || {
            restaged = true;
            Ok(())
        })
        .unwrap();
    assert!(restaged);
    assert!(target.is_dir());
    let cmds = host.commands();
    let t = target.display();
    assert_eq!(
        &cmds[cmds.len() - 2..],
        [
            format!("mount --bind /stage/pvc-1 {t}"),
            format!("mount -o remount,bind,ro {t}"),
        ]
    );

    // Published already, same mode: OK; other mode: refused.
    mounted(
        &host,
        &[
            ("/stage/pvc-1", "/dev/sdc", "rw"),
            (&t.to_string(), "/dev/sdc", "ro"),
        ],
    );
    volumes
        .publish("pvc-1", staging, &writer(&target, true), || {
            panic!("no restage")
        })
        .unwrap();
    assert!(
        volumes
            .publish("pvc-1", staging, &writer(&target, false), || Ok(()))
            .is_err()
    );

    host.clear();
    volumes.unpublish("pvc-1", &target).unwrap();
    assert_eq!(host.commands(), [format!("umount {t}")]);
    assert!(!target.exists());
    mounted(&host, &[]);
    volumes.unpublish("pvc-1", &target).unwrap();
}

#[test]
fn a_block_volume_is_attached_without_a_filesystem_and_bound_as_a_file() {
    let (host, volumes, d) = setup();
    let staging = Path::new("/stage/pvc-1");
    volumes
        .stage("pvc-1", &frontend(), &Access::Block, staging, None)
        .unwrap();
    assert!(
        !host
            .commands()
            .iter()
            .any(|c| c.starts_with("mkfs") || c.starts_with("mount"))
    );
    let target = d.path().join("pod/dev/pvc-1");
    let err = volumes
        .publish("pvc-1", staging, &writer(&target, false), || Ok(()))
        .unwrap_err();
    assert!(matches!(err, NodeError::FailedPrecondition(_)), "{err}");
    let block = Publication {
        block: true,
        ..writer(&target, false)
    };
    volumes
        .publish("pvc-1", staging, &block, || Ok(()))
        .unwrap();
    assert!(target.is_file());
    assert_eq!(
        host.commands().last().unwrap(),
        &format!("mount --bind /dev/sdc {}", target.display())
    );
}

#[test]
fn only_multi_writer_volumes_are_published_at_a_second_target_path() {
    let (host, volumes, d) = setup();
    host.answer("blkid", &[], vec![CommandOutput::ok("ext4\n")]);
    let staging = Path::new("/stage/pvc-1");
    volumes
        .stage("pvc-1", &frontend(), &ext4(), staging, None)
        .unwrap();
    let first = d.path().join("pod-a/mount");
    let second = d.path().join("pod-b/mount");
    mounted(&host, &[("/stage/pvc-1", "/dev/sdc", "rw")]);
    for mode in ["SINGLE_NODE_SINGLE_WRITER", "SINGLE_NODE_WRITER"] {
        let at = |target: &Path| Publication {
            mode: mode.into(),
            ..writer(target, false)
        };
        volumes
            .publish("pvc-1", staging, &at(&first), || Ok(()))
            .unwrap();
        mounted(
            &host,
            &[
                ("/stage/pvc-1", "/dev/sdc", "rw"),
                (&first.display().to_string(), "/dev/sdc", "rw"),
            ],
        );
        let err = volumes
            .publish("pvc-1", staging, &at(&second), || Ok(()))
            .unwrap_err();
        assert!(
            matches!(err, NodeError::FailedPrecondition(_)),
            "{mode}: {err}"
        );
        assert!(
            err.to_string().contains(&first.display().to_string()),
            "{err}"
        );
        // The same target with another mode: ALREADY_EXISTS.
        let other = Publication {
            mode: "SINGLE_NODE_MULTI_WRITER".into(),
            ..writer(&first, false)
        };
        let err = volumes
            .publish("pvc-1", staging, &other, || Ok(()))
            .unwrap_err();
        assert!(matches!(err, NodeError::AlreadyExists(_)), "{mode}: {err}");
        volumes.unpublish("pvc-1", &first).unwrap();
        mounted(&host, &[("/stage/pvc-1", "/dev/sdc", "rw")]);
        assert!(
            volumes
                .record("pvc-1")
                .unwrap()
                .unwrap()
                .publications
                .is_empty()
        );
    }

    // SINGLE_NODE_MULTI_WRITER: both targets.
    let shared = |target: &Path| Publication {
        mode: MULTI_WRITER_MODE.into(),
        ..writer(target, false)
    };
    volumes
        .publish("pvc-1", staging, &shared(&first), || Ok(()))
        .unwrap();
    mounted(
        &host,
        &[
            ("/stage/pvc-1", "/dev/sdc", "rw"),
            (&first.display().to_string(), "/dev/sdc", "rw"),
        ],
    );
    volumes
        .publish("pvc-1", staging, &shared(&second), || Ok(()))
        .unwrap();
    let record = volumes.record("pvc-1").unwrap().unwrap();
    assert_eq!(record.publications.len(), 2);

    // A publication whose mount is gone (the node rebooted) holds nothing.
    mounted(&host, &[("/stage/pvc-1", "/dev/sdc", "rw")]);
    volumes
        .publish("pvc-1", staging, &writer(&first, false), || Ok(()))
        .unwrap();
    let record = volumes.record("pvc-1").unwrap().unwrap();
    assert_eq!(record.publications, [writer(&first, false)]);
}

#[test]
fn a_corrupt_record_is_a_clear_error() {
    let (_host, volumes, d) = setup();
    let path = d.path().join("state/volumes");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("pvc-1.json"), b"{not json").unwrap();
    let err = volumes.record("pvc-1").unwrap_err();
    assert!(err.to_string().contains("corrupt record"), "{err}");
}

/// A staged ext4 or xfs volume on /dev/sdc, mounted at its staging path.
fn staged(fs: &str) -> (Arc<RecordingHost>, NodeVolumes, tempfile::TempDir) {
    let (host, volumes, d) = setup();
    let access = Access::Mount {
        fs_type: fs.into(),
        flags: vec![],
    };
    let staging = Path::new("/stage/pvc-1");
    volumes
        .stage("pvc-1", &frontend(), &access, staging, None)
        .unwrap();
    mounted(&host, &[("/stage/pvc-1", "/dev/sdc", "rw")]);
    host.answer(
        "blockdev",
        &["--getsize64"],
        vec![CommandOutput::ok("134217728\n")],
    );
    host.clear();
    (host, volumes, d)
}

#[test]
fn expanding_ext4_rescans_the_session_and_runs_resize2fs_on_the_device() {
    let (host, volumes, _d) = staged("ext4");
    assert_eq!(volumes.expand("pvc-1", Some(128 << 20)).unwrap(), 128 << 20);
    let expected = [
        format!("iscsiadm -m node -T {IQN} -p {PORTAL} --rescan"),
        "blockdev --getsize64 /dev/sdc".to_string(),
        "resize2fs /dev/sdc".to_string(),
    ];
    assert_eq!(host.commands(), expected);
    // Again: the same commands, nothing refused (resize2fs of a grown
    // filesystem changes nothing).
    host.clear();
    volumes.expand("pvc-1", Some(128 << 20)).unwrap();
    assert_eq!(host.commands(), expected);
}

#[test]
fn expanding_xfs_runs_xfs_growfs_on_the_staging_mount() {
    let (host, volumes, _d) = staged("xfs");
    volumes.expand("pvc-1", None).unwrap();
    let cmds = host.commands();
    assert_eq!(cmds.last().unwrap(), "xfs_growfs /stage/pvc-1");
    assert!(!cmds.iter().any(|c| c.starts_with("resize2fs")), "{cmds:?}");
}

#[test]
fn expanding_a_block_volume_only_rescans() {
    let (host, volumes, _d) = setup();
    volumes
        .stage(
            "pvc-1",
            &frontend(),
            &Access::Block,
            Path::new("/stage/pvc-1"),
            None,
        )
        .unwrap();
    host.clear();
    host.answer(
        "blockdev",
        &["--getsize64"],
        vec![CommandOutput::ok("134217728\n")],
    );
    assert_eq!(volumes.expand("pvc-1", Some(64 << 20)).unwrap(), 128 << 20);
    assert_eq!(
        host.commands(),
        [
            format!("iscsiadm -m node -T {IQN} -p {PORTAL} --rescan"),
            "blockdev --getsize64 /dev/sdc".to_string(),
        ]
    );
}

#[test]
fn an_nbd_device_that_kept_its_old_size_is_refused_until_restaged() {
    let (host, volumes, _d) = setup();
    volumes
        .save(&StageRecord {
            volume_id: "pvc-1".into(),
            staging_path: "/stage/pvc-1".into(),
            access: ext4(),
            attachment: Attachment::Nbd {
                device: "/dev/nbd1".into(),
            },
            control_address: None,
            publications: vec![],
        })
        .unwrap();
    mounted(&host, &[("/stage/pvc-1", "/dev/nbd1", "rw")]);
    host.answer(
        "blockdev",
        &["--getsize64"],
        vec![
            CommandOutput::ok("67108864\n"),
            CommandOutput::ok("134217728\n"),
        ],
    );
    let err = volumes.expand("pvc-1", Some(128 << 20)).unwrap_err();
    assert!(matches!(err, NodeError::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("staged again"), "{err}");
    assert_eq!(host.commands(), ["blockdev --getsize64 /dev/nbd1"]);
    // Once the device is as large (restaged), the filesystem grows.
    host.clear();
    volumes.expand("pvc-1", Some(128 << 20)).unwrap();
    assert_eq!(
        host.commands(),
        ["blockdev --getsize64 /dev/nbd1", "resize2fs /dev/nbd1"]
    );
}

#[test]
fn expanding_a_volume_not_staged_here_is_not_found() {
    let (_host, volumes, _d) = setup();
    let err = volumes.expand("pvc-9", Some(1 << 20)).unwrap_err();
    assert!(matches!(err, NodeError::NotFound(_)), "{err}");
}
