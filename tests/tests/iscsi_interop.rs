//! iSCSI interoperability with real initiators: libiscsi's `iscsi-inq`,
//! `iscsi-ls` (discovery) and `iscsi-readcapacity16` against `corral
//! serve-file --iscsi`; fio's libiscsi engine with `--verify=crc32c` over a
//! 3-replica engine volume; and robustness: initiators that send garbage,
//! disconnect in the middle of a command or exceed the negotiated limits
//! lose their own connection while other sessions keep working.

mod iscsi_common;

use std::io::Write;
use std::time::Duration;

use corral_tests::tools::run_ok;
use corral_tests::{Cluster, EngineSpec, run_bounded};
use iscsi_common::{RawInitiator, ServeFile, bhs, fio_filename, fio_libiscsi, with_data};

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn inq_ls_and_readcapacity16_see_the_volume() {
    let server = ServeFile::start("interop", "64MiB", &[]).unwrap();
    let url = server.url();
    let limit = Duration::from_secs(30);

    let inq = text(&run_ok("iscsi-inq", &[&url], limit).unwrap());
    assert!(
        inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inq}"
    );
    assert!(inq.contains("Vendor:CORRAL"), "{inq}");
    let vpd = text(&run_ok("iscsi-inq", &["-e", "1", "-c", "0x00", &url], limit).unwrap());
    for page in ["0x80", "0x83", "0xb0", "0xb2"] {
        assert!(vpd.contains(page), "VPD page {page} missing:\n{vpd}");
    }

    let ls = text(
        &run_ok(
            "iscsi-ls",
            &["-s", &format!("iscsi://{}", server.portal)],
            limit,
        )
        .unwrap(),
    );
    assert!(
        ls.contains(&format!(
            "Target:iqn.2026-11.io.corral:interop Portal:{},1",
            server.portal
        )),
        "{ls}"
    );
    assert!(ls.contains("Lun:0") && ls.contains("DIRECT_ACCESS"), "{ls}");

    let cap = text(&run_ok("iscsi-readcapacity16", &[&url], limit).unwrap());
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");
    assert!(
        cap.contains(&format!("Total size:{}", 64u64 << 20)),
        "{cap}"
    );
    assert!(cap.contains("LBPME:1"), "{cap}");
}

#[test]
fn block_size_4096_is_advertised() {
    let server = ServeFile::start("big", "64MiB", &["--block-size", "4096"]).unwrap();
    let cap = text(
        &run_ok(
            "iscsi-readcapacity16",
            &[&server.url()],
            Duration::from_secs(30),
        )
        .unwrap(),
    );
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:4096"), "{cap}");
    assert!(
        cap.contains("RETURNED LOGICAL BLOCK ADDRESS:16383"),
        "{cap}"
    );
}

#[test]
fn fio_libiscsi_verifies_over_a_three_replica_volume() {
    let fio = fio_libiscsi().unwrap();
    let mut cluster = Cluster::with_replicas(3).unwrap();
    let e = cluster
        .start_engine(&EngineSpec::new("fiovol", "256MiB", &[0, 1, 2]))
        .unwrap();
    let engine = &cluster.engines[e];
    corral_tests::wait_for_port(engine.iscsi, Duration::from_secs(30)).unwrap();
    let filename = fio_filename(engine.iscsi, &engine.volume);
    for (name, rw, bs, depth) in [
        ("randwrite", "randwrite", "4k", "32"),
        ("seqwrite", "write", "1m", "8"),
    ] {
        let out = run_bounded(
            std::process::Command::new(&fio).args([
                &format!("--name={name}"),
                "--ioengine=libiscsi",
                &format!("--filename={filename}"),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--iodepth={depth}"),
                "--size=64m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--randrepeat=0",
            ]),
            Duration::from_secs(300),
        )
        .unwrap();
        let stdout = text(&out);
        assert!(
            out.status.success() && stdout.contains("err= 0"),
            "fio {name} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cluster.stop_all().unwrap();
}

/// What an initiator's login should come to.
enum Login {
    /// It logs in, and INQUIRY sees the direct-access LUN.
    Accepted,
    /// The login fails (the target refuses the initiator, or the initiator
    /// the target).
    Refused,
}

/// Run `iscsi-inq` against `url` (credentials in it, libiscsi style) and
/// assert that its login comes to `expected`.
fn iscsi_inq(url: &str, expected: Login) {
    let out = run_bounded(
        std::process::Command::new("iscsi-inq").arg(url),
        Duration::from_secs(30),
    )
    .unwrap();
    let stdout = text(&out);
    match expected {
        Login::Accepted => assert!(
            out.status.success() && stdout.contains("DIRECT_ACCESS"),
            "{url}: iscsi-inq {}:\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Login::Refused => assert!(!out.status.success(), "{url} logged in:\n{stdout}"),
    }
}

#[test]
fn misbehaving_initiators_lose_only_their_own_connection() {
    let mut server = ServeFile::start("robust", "64MiB", &[]).unwrap();
    let url = server.url();

    // A healthy session stays logged in across everything below.
    let mut healthy = RawInitiator::login(server.portal, "robust", 1);

    // Garbage instead of a login: the connection is dropped.
    let mut g = RawInitiator::connect(server.portal);
    g.stream.write_all(&[0xffu8; 200]).unwrap();
    assert!(g.closed(), "garbage must drop the connection");

    // Garbage after login.
    let mut g = RawInitiator::login(server.portal, "robust", 2);
    g.stream.write_all(&[0x3fu8; 96]).unwrap();
    assert!(g.closed(), "an unknown opcode must drop the connection");

    // A data segment over the negotiated MaxRecvDataSegmentLength: a
    // Reject, then the connection is dropped.
    let mut g = RawInitiator::login(server.portal, "robust", 3);
    let mut h = bhs(0x00, 0x80);
    h[16..20].copy_from_slice(&7u32.to_be_bytes());
    h[5..8].copy_from_slice(&(1u32 << 20).to_be_bytes()[1..]);
    g.stream.write_all(&h).unwrap();
    assert!(g.closed(), "an oversized segment must drop the connection");

    // Disconnect in the middle of a write (command sent, data missing).
    {
        let mut g = RawInitiator::login(server.portal, "robust", 4);
        let mut h = bhs(0x01, 0x20); // SCSI command, W, not final: data follows
        h[16..20].copy_from_slice(&9u32.to_be_bytes());
        h[20..24].copy_from_slice(&(1u32 << 20).to_be_bytes());
        h[24..28].copy_from_slice(&1u32.to_be_bytes());
        h[32] = 0x2a; // WRITE(10)
        h[39..41].copy_from_slice(&2048u16.to_be_bytes());
        g.stream.write_all(&with_data(h, &[0xab; 4096])).unwrap();
        // Half a PDU, then vanish.
        g.stream.write_all(&bhs(0x05, 0)[..20]).unwrap();
    }

    // The healthy session still answers a NOP-Out ping, and new
    // initiators still get in.
    let mut nop = bhs(0x40, 0x80);
    nop[16..20].copy_from_slice(&0x55u32.to_be_bytes());
    nop[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    nop[24..28].copy_from_slice(&1u32.to_be_bytes());
    healthy.stream.write_all(&with_data(nop, b"ping")).unwrap();
    loop {
        let (h, data) = healthy.read_pdu().unwrap();
        if h[0] & 0x3f == 0x20 && h[16..20] == 0x55u32.to_be_bytes() {
            assert_eq!(data, b"ping");
            break;
        }
    }
    iscsi_inq(&url, Login::Accepted);
    assert!(server.exited().is_none(), "serve-file died");
    let status = server.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "serve-file exited with {status}");
}

/// Serve a 16 MiB file behind the CHAP settings in `conf`.
fn chap_server(name: &str, conf: &str) -> (tempfile::TempDir, ServeFile) {
    let creds = tempfile::tempdir().unwrap();
    let chap = creds.path().join("chap.conf");
    std::fs::write(&chap, conf).unwrap();
    let server =
        ServeFile::start(name, "16MiB", &["--iscsi-chap", chap.to_str().unwrap()]).unwrap();
    (creds, server)
}

#[test]
fn one_way_chap_keeps_out_initiators_without_the_secret() {
    let (_creds, server) = chap_server("guarded", "user = alice\nsecret = alices-secret-1\n");
    let url = |creds: &str| {
        format!(
            "iscsi://{creds}{}/iqn.2026-11.io.corral:guarded/0",
            server.portal
        )
    };
    iscsi_inq(&url("alice%alices-secret-1@"), Login::Accepted);
    for bad in [
        url(""),
        url("alice%not-the-secret@"),
        url("mallory%alices-secret-1@"),
    ] {
        iscsi_inq(&bad, Login::Refused);
    }
    // The target kept serving throughout.
    iscsi_inq(&url("alice%alices-secret-1@"), Login::Accepted);
}

#[test]
fn mutual_chap_makes_the_target_prove_itself_too() {
    let (_creds, server) = chap_server(
        "mutual",
        "# corral serve-file --iscsi-chap\nuser = alice\nsecret = alices-secret-1\n\
         mutual_user = corral\nmutual_secret = targets-secret-2\n",
    );
    let url = |args: &str| {
        format!(
            "iscsi://alice%alices-secret-1@{}/iqn.2026-11.io.corral:mutual/0{args}",
            server.portal
        )
    };
    iscsi_inq(
        &url("?target_user=corral&target_password=targets-secret-2"),
        Login::Accepted,
    );
    // The initiator expects another target secret: it refuses the target's
    // answer. And with mutual CHAP configured, one-way logins are refused.
    for bad in [
        url("?target_user=corral&target_password=some-other-secret"),
        url(""),
    ] {
        iscsi_inq(&bad, Login::Refused);
    }
}
