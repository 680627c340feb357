//! The iSCSI and NBD attach paths, command by command, against a
//! recording host (this machine has neither kernel initiator).

use std::path::Path;

use super::*;
use crate::host::{CommandOutput, RecordingHost};

const PORTAL: &str = "127.0.0.1:10001";
const IQN: &str = "iqn.2026-11.io.corral:pvc-1";

fn iscsi_frontend() -> Frontend {
    Frontend {
        volume: "pvc-1".into(),
        nbd: Some("127.0.0.1:10002".into()),
        iscsi: Some((PORTAL.into(), IQN.into())),
    }
}

fn discovery_answer(host: &RecordingHost) {
    host.answer(
        "iscsiadm",
        &["-m", "discovery"],
        vec![CommandOutput::ok(&format!("{PORTAL},1 {IQN}\n"))],
    );
}

#[test]
fn iscsi_attach_discovers_logs_in_and_finds_the_by_path_device() {
    let host = RecordingHost::new();
    discovery_answer(&host);
    host.add_link(iscsi_device_path(PORTAL, IQN), "/dev/sdc");
    let a = attach(
        &host,
        AttachMethod::Iscsi,
        &iscsi_frontend(),
        Path::new("/w"),
    )
    .unwrap();
    assert_eq!(a.device(), Path::new("/dev/sdc"));
    assert_eq!(
        host.commands(),
        [
            format!("iscsiadm -m discovery -t sendtargets -p {PORTAL}"),
            format!("iscsiadm -m node -T {IQN} -p {PORTAL} --login"),
        ]
    );
    host.clear();
    detach(&host, &a).unwrap();
    assert_eq!(
        host.commands(),
        [
            format!("iscsiadm -m node -T {IQN} -p {PORTAL} --logout"),
            format!("iscsiadm -m node -T {IQN} -p {PORTAL} -o delete"),
        ]
    );
}

#[test]
fn an_existing_session_is_reused_and_a_missing_one_is_not_an_error_on_logout() {
    let host = RecordingHost::new();
    discovery_answer(&host);
    host.answer(
        "iscsiadm",
        &["-m", "node", "-T", IQN, "-p", PORTAL, "--login"],
        vec![CommandOutput::failed(15, "session exists")],
    );
    host.answer(
        "iscsiadm",
        &["-m", "node", "-T", IQN, "-p", PORTAL, "--logout"],
        vec![CommandOutput::failed(21, "No matching sessions found")],
    );
    host.add_link(iscsi_device_path(PORTAL, IQN), "/dev/sdd");
    let a = attach(
        &host,
        AttachMethod::Iscsi,
        &iscsi_frontend(),
        Path::new("/w"),
    )
    .unwrap();
    detach(&host, &a).unwrap();
    detach(&host, &a).unwrap();
}

#[test]
fn a_target_the_portal_does_not_offer_is_refused_before_login() {
    let host = RecordingHost::new();
    host.answer(
        "iscsiadm",
        &["-m", "discovery"],
        vec![CommandOutput::ok(&format!(
            "{PORTAL},1 iqn.2026-11.io.corral:other\n"
        ))],
    );
    let err = attach(
        &host,
        AttachMethod::Iscsi,
        &iscsi_frontend(),
        Path::new("/w"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not offer"), "{err}");
    assert!(!host.commands().iter().any(|c| c.contains("--login")));
}

#[test]
fn a_failed_login_is_reported_with_iscsiadm_s_words() {
    let host = RecordingHost::new();
    discovery_answer(&host);
    host.answer(
        "iscsiadm",
        &["-m", "node"],
        vec![CommandOutput::failed(24, "iscsiadm: initiator reported error (24 - iSCSI login failed due to authorization failure)")],
    );
    let err = attach(
        &host,
        AttachMethod::Iscsi,
        &iscsi_frontend(),
        Path::new("/w"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("authorization failure"), "{err}");
}

#[test]
fn a_device_that_never_appears_times_out_and_logs_out() {
    let host = RecordingHost::new();
    discovery_answer(&host);
    let err = attach(
        &host,
        AttachMethod::Iscsi,
        &iscsi_frontend(),
        Path::new("/w"),
    )
    .unwrap_err();
    assert!(matches!(err, HostError::TimedOut { .. }), "{err}");
    assert!(host.commands().iter().any(|c| c.ends_with("--logout")));
}

#[test]
fn a_disk_claimed_by_multipathd_is_refused_with_how_to_blacklist_it() {
    let host = RecordingHost::new();
    discovery_answer(&host);
    host.add_link(iscsi_device_path(PORTAL, IQN), "/dev/sdc");
    host.add_path("/sys/block/sdc/holders/dm-0");
    let err = attach(
        &host,
        AttachMethod::Iscsi,
        &iscsi_frontend(),
        Path::new("/w"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("dm-0") && msg.contains("blacklist"), "{msg}");
    assert!(host.commands().iter().any(|c| c.ends_with("--logout")));
}

#[test]
fn nbd_attach_connects_the_first_free_device() {
    let host = RecordingHost::new();
    host.add_path("/sys/block/nbd0");
    host.add_path("/sys/block/nbd0/pid"); // in use
    host.add_file("/sys/block/nbd0/size", "2097152\n");
    host.add_path("/sys/block/nbd1");
    host.add_file("/sys/block/nbd1/size", "0\n");
    host.add_path("/sys/block/sda");
    let attached = attach_nbd_after_connect(&host).unwrap();
    assert_eq!(attached.device(), Path::new("/dev/nbd1"));
    assert_eq!(
        host.commands(),
        ["nbd-client 127.0.0.1 10002 /dev/nbd1 -N pvc-1"]
    );
    host.clear();
    detach(&host, &attached).unwrap();
    assert_eq!(host.commands(), ["nbd-client -d /dev/nbd1"]);
}

/// Attach over NBD with a host on which the connect "happens": the pid
/// file appears once nbd-client has been run.
fn attach_nbd_after_connect(host: &RecordingHost) -> Result<Attachment, HostError> {
    host.after_run(|host, program, args| {
        if let ("nbd-client", Some(name)) =
            (program, args.get(2).and_then(|d| d.strip_prefix("/dev/")))
        {
            host.add_path(format!("/sys/block/{name}/pid"));
        }
    });
    attach(host, AttachMethod::Nbd, &iscsi_frontend(), Path::new("/w"))
}

#[test]
fn nbd_without_a_free_device_is_refused() {
    let host = RecordingHost::new();
    host.add_path("/sys/block/nbd0");
    host.add_path("/sys/block/nbd0/pid");
    host.add_file("/sys/block/nbd0/size", "8\n");
    let err = attach(&host, AttachMethod::Nbd, &iscsi_frontend(), Path::new("/w")).unwrap_err();
    assert!(err.to_string().contains("no free /dev/nbd"), "{err}");
}

#[test]
fn nbd_loads_the_module_when_no_device_exists() {
    let host = RecordingHost::new();
    let _ = attach(&host, AttachMethod::Nbd, &iscsi_frontend(), Path::new("/w"));
    assert_eq!(
        host.commands().first().map(String::as_str),
        Some("modprobe nbd")
    );
}

#[test]
fn a_method_the_engine_does_not_serve_is_refused() {
    let host = RecordingHost::new();
    let mut f = iscsi_frontend();
    f.iscsi = None;
    assert!(attach(&host, AttachMethod::Iscsi, &f, Path::new("/w")).is_err());
    assert!(host.commands().is_empty());
}

#[test]
fn attach_methods_parse_by_name() {
    assert_eq!("fuse".parse::<AttachMethod>(), Ok(AttachMethod::Fuse));
    assert!("loop".parse::<AttachMethod>().is_err());
}
