//! Writes the seed inputs of every fuzz target into `corpus/<target>/`
//! (`seed-*` files), built with the crates' own encoders in the input
//! formats the targets document: valid iSCSI PDUs and login sequences
//! (with and without CHAP), common SCSI commands, NBD negotiations and
//! request streams, and replica data batches.
//!
//! Run from `fuzz/`: `cargo run --example write_seeds` (no sanitizer
//! needed). The committed corpus is these seeds plus what the fuzzers
//! found, minimised with `scripts/fuzz.sh --merge`.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use corral_fuzz::login;
use corral_iscsi::pdu::{Digests, Pdu, PduCodec, op};
use corral_iscsi::text::TextParams;
use corral_nbd::RequestHeader;
use corral_nbd::proto::{IHAVEOPT, cmd, cmd_flags, info, opt};
use corral_proto::v1::{
    ChecksumsOp, DataRequest, DataRequestBatch, FlushOp, ReadOp, UnmapOp, WriteOp, WriteZeroesOp,
    data_request::Op,
};
use prost::Message;

fn write(target: &str, name: &str, data: &[u8]) {
    write_file(target, &format!("seed-{name}"), data);
}

fn write_file(target: &str, file: &str, data: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(file), data).expect("write a corpus file");
}

// ---- iSCSI ----

fn text(keys: &[(&str, &str)]) -> Bytes {
    let mut t = TextParams::default();
    for (k, v) in keys {
        t.push(k, *v);
    }
    Bytes::from(t.encode())
}

/// A Login Request: `flags` is T|C|CSG|NSG.
fn login_pdu(flags: u8, cmd_sn: u32, keys: &[(&str, &str)]) -> Pdu {
    let mut p = Pdu::new(op::LOGIN_REQUEST);
    p.set_immediate(true);
    p.bhs[1] = flags;
    p.bhs[8..14].copy_from_slice(&[0x40, 0, 0x01, 0x37, 0, 1]);
    p.set_itt(1);
    p.set_u16(20, 0);
    p.set_u32(24, cmd_sn);
    p.data = text(keys);
    p
}

fn wire(codec: &PduCodec, pdus: &[Pdu]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in pdus {
        codec.encode(p, &mut out);
    }
    out.to_vec()
}

const SEC_TO_OP: u8 = 0x80 | 1;
const OP_TO_FFP: u8 = 0x80 | (1 << 2) | 3;
const SEC_TO_FFP: u8 = 0x80 | 3;
const SEC_STAY: u8 = 0;

fn operational() -> Vec<(&'static str, &'static str)> {
    vec![
        ("HeaderDigest", "CRC32C,None"),
        ("DataDigest", "CRC32C,None"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("ErrorRecoveryLevel", "0"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
    ]
}

fn iscsi_login() {
    let codec = PduCodec::new(64 << 10);
    let init = ("InitiatorName", "iqn.2004-10.com.ubuntu:01:fuzz");
    // open-iscsi to a target without CHAP.
    let seq = [
        login_pdu(
            SEC_TO_OP,
            1,
            &[
                init,
                ("InitiatorAlias", "host"),
                ("SessionType", "Normal"),
                ("TargetName", login::OPEN_TARGET),
                ("AuthMethod", "None"),
            ],
        ),
        login_pdu(OP_TO_FFP, 1, &operational()),
    ];
    write(
        "iscsi_login",
        "open",
        &[&[0u8][..], &wire(&codec, &seq)].concat(),
    );
    // Straight to the full feature phase.
    let mut keys = vec![init, ("TargetName", login::OPEN_TARGET)];
    keys.extend(operational());
    let seq = [login_pdu(OP_TO_FFP, 1, &keys)];
    write(
        "iscsi_login",
        "direct",
        &[&[1u8][..], &wire(&codec, &seq)].concat(),
    );
    let seq = [login_pdu(
        SEC_TO_FFP,
        1,
        &[
            init,
            ("TargetName", login::OPEN_TARGET),
            ("AuthMethod", "None"),
        ],
    )];
    write(
        "iscsi_login",
        "sec-to-ffp",
        &[&[2u8][..], &wire(&codec, &seq)].concat(),
    );
    // Discovery.
    let seq = [
        login_pdu(
            SEC_TO_OP,
            1,
            &[init, ("SessionType", "Discovery"), ("AuthMethod", "None")],
        ),
        login_pdu(
            OP_TO_FFP,
            1,
            &[("HeaderDigest", "None"), ("DataDigest", "None")],
        ),
    ];
    write(
        "iscsi_login",
        "discovery",
        &[&[3u8][..], &wire(&codec, &seq)].concat(),
    );
    // CHAP, one-way and mutual.
    for (name, target, mutual) in [
        ("chap", login::CHAP_TARGET, false),
        ("mutual", login::MUTUAL_TARGET, true),
    ] {
        let mut answer = vec![
            ("CHAP_N", login::CHAP_USER),
            ("CHAP_R", login::AUTO_RESPONSE),
        ];
        if mutual {
            answer.push(("CHAP_I", "77"));
            answer.push(("CHAP_C", "0x0123456789abcdef0123456789abcdef"));
        }
        let seq = [
            login_pdu(
                SEC_STAY,
                1,
                &[init, ("TargetName", target), ("AuthMethod", "CHAP,None")],
            ),
            login_pdu(SEC_STAY, 1, &[("CHAP_A", "5")]),
            login_pdu(SEC_TO_OP, 1, &answer),
            login_pdu(OP_TO_FFP, 1, &operational()),
        ];
        write(
            "iscsi_login",
            name,
            &[&[4u8][..], &wire(&codec, &seq)].concat(),
        );
    }
    // Findings (docs/fuzzing.md): keys a response once carried twice.
    let mut keys = vec![init, ("TargetName", login::OPEN_TARGET)];
    keys.push(("MaxRecvDataSegmentLength", "Reject"));
    let seq = [login_pdu(OP_TO_FFP, 1, &keys)];
    let bytes = [&[0u8][..], &wire(&codec, &seq)].concat();
    write_file("iscsi_login", "regression-invalid-mrdsl", &bytes);
    let keys = [
        init,
        ("TargetName", login::OPEN_TARGET),
        ("AuthMethod", "None"),
        ("MaxRecvDataSegmentLength", "65536"),
    ];
    let seq = [login_pdu(SEC_TO_FFP, 1, &keys)];
    let bytes = [&[0u8][..], &wire(&codec, &seq)].concat();
    write_file("iscsi_login", "regression-security-stage-mrdsl", &bytes);
    let keys = [
        init,
        ("TargetName", login::OPEN_TARGET),
        ("TargetPortalGroupTag", "1"),
    ];
    let seq = [login_pdu(SEC_TO_OP, 1, &keys)];
    let bytes = [&[0u8][..], &wire(&codec, &seq)].concat();
    write_file("iscsi_login", "regression-target-key", &bytes);
    // Text continued over two PDUs (the C bit).
    let whole = text(&[
        init,
        ("TargetName", login::OPEN_TARGET),
        ("AuthMethod", "None"),
    ]);
    let mut first = login_pdu(0x40, 1, &[]);
    first.data = whole.slice(..20);
    let mut second = login_pdu(SEC_TO_OP, 1, &[]);
    second.data = whole.slice(20..);
    let seq = [first, second, login_pdu(OP_TO_FFP, 1, &operational())];
    write(
        "iscsi_login",
        "continued",
        &[&[5u8][..], &wire(&codec, &seq)].concat(),
    );
}

fn iscsi_pdu() {
    let mut pdus = Vec::new();
    let mut cmd = Pdu::new(op::SCSI_COMMAND);
    cmd.bhs[1] = 0x80 | 0x20; // final, write
    cmd.set_itt(0x10);
    cmd.set_u32(20, 4096);
    cmd.bhs[32] = 0x2a;
    cmd.data = Bytes::from(vec![0x5a; 512]);
    pdus.push(("scsi-write", cmd));
    let mut read = Pdu::new(op::SCSI_COMMAND);
    read.bhs[1] = 0x80 | 0x40;
    read.set_itt(0x11);
    read.set_u32(20, 4096);
    read.bhs[32] = 0x28;
    read.ahs = Bytes::from(vec![0, 8, 0x01, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    pdus.push(("scsi-read-ahs", read));
    let mut nop = Pdu::new(op::NOP_OUT);
    nop.set_immediate(true);
    nop.set_itt(0x12);
    nop.set_u32(20, 0xffff_ffff);
    nop.data = Bytes::from_static(b"ping");
    pdus.push(("nop-out", nop));
    let mut txt = Pdu::new(op::TEXT_REQUEST);
    txt.data = text(&[("SendTargets", "All")]);
    pdus.push(("text", txt));
    pdus.push((
        "login",
        login_pdu(
            SEC_TO_OP,
            1,
            &[("InitiatorName", "iqn.x"), ("AuthMethod", "None")],
        ),
    ));
    let mut data_out = Pdu::new(op::DATA_OUT);
    data_out.set_u32(20, 0x1234);
    data_out.set_u32(40, 512);
    data_out.data = Bytes::from(vec![1; 777]);
    pdus.push(("data-out", data_out));
    let mut logout = Pdu::new(op::LOGOUT_REQUEST);
    logout.set_immediate(true);
    pdus.push(("logout", logout));
    let mut tmf = Pdu::new(op::TASK_MGMT_REQUEST);
    tmf.bhs[1] = 0x80 | 1;
    pdus.push(("tmf", tmf));
    pdus.push(("snack", Pdu::new(op::SNACK_REQUEST)));
    for (config, digests) in [
        (0x04u8, Digests::default()),
        (
            0x07,
            Digests {
                header: true,
                data: true,
            },
        ),
    ] {
        let codec = PduCodec {
            digests,
            max_recv_data_segment: 8192,
        };
        for (name, p) in &pdus {
            let bytes = wire(&codec, std::slice::from_ref(p));
            write(
                "iscsi_pdu",
                &format!("{name}-{config:02x}"),
                &[&[config][..], &bytes].concat(),
            );
        }
        let all: Vec<Pdu> = pdus.iter().map(|(_, p)| p.clone()).collect();
        write(
            "iscsi_pdu",
            &format!("stream-{config:02x}"),
            &[&[config][..], &wire(&codec, &all)].concat(),
        );
    }
}

// ---- SCSI ----

fn record(action: u8, cdb: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = vec![action, cdb.len() as u8];
    v.extend_from_slice(cdb);
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn scsi_cdb() {
    let cdb16 = |op: u8, lba: u64, blocks: u32| {
        let mut c = vec![0u8; 16];
        c[0] = op;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    };
    let write16 = cdb16(0x8a, 8, 1);
    let read16 = cdb16(0x88, 8, 1);
    let caw = cdb16(0x89, 8, 0);
    let mut caw = caw;
    caw[13] = 1;
    let ws16 = cdb16(0x93, 16, 32);
    let mut ws_unmap = cdb16(0x93, 64, 64);
    ws_unmap[1] = 0x08;
    let verify16 = cdb16(0x8f, 0, 4);
    let orwrite = cdb16(0x8b, 0, 1);
    let prefetch = cdb16(0x90, 0, 8);
    let sync16 = cdb16(0x91, 0, 0);
    let mut get_lba = vec![0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    get_lba[13] = 0x40;
    let rc16 = vec![0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let rsoc = vec![0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let rsoc_one = vec![0xa3, 0x0c, 0x01, 0x28, 0, 0, 0, 0, 0x02, 0, 0, 0];
    let unmap_params = {
        let mut p = vec![0, 22, 0, 16, 0, 0, 0, 0];
        p.extend_from_slice(&100u64.to_be_bytes());
        p.extend_from_slice(&8u32.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p
    };
    let pr_register = {
        let mut p = vec![0u8; 24];
        p[8..16].copy_from_slice(&0xabcdu64.to_be_bytes());
        p
    };
    let pr_reserve = {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&0xabcdu64.to_be_bytes());
        p
    };
    let mode_select = {
        // MODE SELECT(6): header, caching page with WCE off.
        let mut p = vec![0u8, 0, 0, 0, 0x08, 18];
        p.extend_from_slice(&[0u8; 18]);
        p
    };
    let sector = vec![0x77u8; 512];
    let two = [sector.clone(), sector.clone()].concat();
    let seeds: Vec<(&str, u8, Vec<Vec<u8>>)> = vec![
        (
            "inquiry",
            0,
            vec![
                record(0x80, &[0x12, 0, 0, 0, 96, 0], &[]),
                record(0, &[0x12, 1, 0x00, 0, 255, 0], &[]),
                record(0, &[0x12, 1, 0x80, 0, 255, 0], &[]),
                record(0, &[0x12, 1, 0x83, 0, 255, 0], &[]),
                record(0, &[0x12, 1, 0xb0, 0, 255, 0], &[]),
                record(0, &[0x12, 1, 0xb1, 0, 255, 0], &[]),
                record(0, &[0x12, 1, 0xb2, 0, 255, 0], &[]),
            ],
        ),
        (
            "capacity",
            1,
            vec![
                record(0x80, &[0x00, 0, 0, 0, 0, 0], &[]),
                record(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
                record(0, &rc16, &[]),
                record(0, &get_lba, &[]),
                record(0x10, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]),
                record(0, &[0x03, 0, 0, 0, 252, 0], &[]),
            ],
        ),
        (
            "read-write",
            0,
            vec![
                record(0, &[0x0a, 0, 0, 1, 1, 0], &sector),
                record(0, &[0x08, 0, 0, 1, 1, 0], &[]),
                record(0, &[0x2a, 0, 0, 0, 0, 2, 0, 0, 2, 0], &two),
                record(0, &[0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0], &[]),
                record(0, &[0xaa, 0, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0], &sector),
                record(0, &[0xa8, 0, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0], &[]),
                record(0, &write16, &sector),
                record(0, &read16, &[]),
                record(0, &[0x2e, 0, 0, 0, 0, 9, 0, 0, 1, 0], &sector),
                record(0, &[0x2f, 0x02, 0, 0, 0, 9, 0, 0, 1, 0], &sector),
                record(0, &verify16, &[]),
                record(0, &caw, &two),
                record(0, &orwrite, &sector),
                record(0, &prefetch, &[]),
                record(0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
                record(0, &sync16, &[]),
            ],
        ),
        (
            "write-same-unmap",
            0,
            vec![
                record(0, &ws16, &sector),
                record(0, &ws_unmap, &vec![0; 512]),
                record(0, &[0x41, 0, 0, 0, 1, 0, 0, 0, 8, 0], &sector),
                record(0, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &unmap_params),
            ],
        ),
        (
            "modes",
            2,
            vec![
                record(0, &[0x1a, 0, 0x3f, 0, 255, 0], &[]),
                record(0, &[0x5a, 0, 0x08, 0, 0, 0, 0, 1, 0, 0], &[]),
                record(0, &[0x5a, 0x08, 0x0a, 0, 0, 0, 0, 1, 0, 0], &[]),
                record(
                    0,
                    &[0x15, 0x10, 0, 0, mode_select.len() as u8, 0],
                    &mode_select,
                ),
                record(0, &rsoc, &[]),
                record(0, &rsoc_one, &[]),
                record(0, &[0x1b, 0, 0, 0, 1, 0], &[]),
                record(0, &[0x1e, 0, 0, 0, 0, 0], &[]),
                record(0, &[0x37, 0, 0x08, 0, 0, 0, 0, 1, 0, 0], &[]),
            ],
        ),
        (
            "reservations",
            0,
            vec![
                record(0x80, &[0x5f, 0x00, 0, 0, 0, 0, 0, 0, 24, 0], &pr_register),
                record(0x01, &[0x5f, 0x00, 0, 0, 0, 0, 0, 0, 24, 0], &pr_register),
                record(0, &[0x5f, 0x01, 0x01, 0, 0, 0, 0, 0, 24, 0], &pr_reserve),
                record(0x01, &[0x2a, 0, 0, 0, 0, 2, 0, 0, 1, 0], &sector),
                record(0, &[0x5e, 0x00, 0, 0, 0, 0, 0, 1, 0, 0], &[]),
                record(0, &[0x5e, 0x01, 0, 0, 0, 0, 0, 1, 0, 0], &[]),
                record(0, &[0x5e, 0x02, 0, 0, 0, 0, 0, 1, 0, 0], &[]),
                record(0, &[0x5e, 0x03, 0, 0, 0, 0, 0, 1, 0, 0], &[]),
                record(0x02, &[0x16, 0, 0, 0, 0, 0], &[]),
                record(0x40, &[0x17, 0, 0, 0, 0, 0], &[]),
                record(0x20, &[0x00, 0, 0, 0, 0, 0], &[]),
            ],
        ),
    ];
    for (name, config, records) in seeds {
        let mut v = vec![config];
        for r in records {
            v.extend_from_slice(&r);
        }
        write("scsi_cdb", name, &v);
    }
}

// ---- NBD ----

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn nbd_handshake() {
    let head = |config: u8| vec![config, 1, 7, 16, 255];
    let seeds: Vec<(&str, u8, u32, Vec<Vec<u8>>)> = vec![
        (
            "go",
            0x07,
            3,
            vec![
                option(opt::STRUCTURED_REPLY, &[]),
                option(opt::LIST, &[]),
                option(
                    opt::INFO,
                    &go_data("vol1", &[info::NAME, info::DESCRIPTION]),
                ),
                option(opt::GO, &go_data("", &[info::BLOCK_SIZE])),
            ],
        ),
        (
            "export-name",
            0x02,
            1,
            vec![option(opt::EXPORT_NAME, b"vol0")],
        ),
        (
            "export-name-zeroes",
            0x04,
            1,
            vec![option(opt::EXPORT_NAME, b"")],
        ),
        (
            "abort",
            0x03,
            3,
            vec![
                option(opt::STARTTLS, &[]),
                option(99, b"junk"),
                option(opt::GO, &go_data("nope", &[])),
                option(opt::ABORT, &[]),
            ],
        ),
        (
            "go-then-request",
            0x05,
            3,
            vec![
                option(opt::GO, &go_data("vol2", &[info::NAME])),
                b"\x25\x60\x95\x13\0\0\0\0".to_vec(),
            ],
        ),
    ];
    for (name, config, client_flags, options) in seeds {
        let mut v = head(config);
        v.extend_from_slice(&client_flags.to_be_bytes());
        for o in options {
            v.extend_from_slice(&o);
        }
        write("nbd_handshake", name, &v);
    }
}

fn request(command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    RequestHeader {
        flags,
        command,
        cookie: 0x1000 + u64::from(command),
        offset,
        length,
    }
    .encode(&mut b);
    b.extend_from_slice(payload);
    b.to_vec()
}

fn nbd_transmission() {
    let head = |config: u8| vec![config, 28, 3, 100, 255];
    let payload = vec![0x42u8; 4096];
    let seeds: Vec<(&str, u8, Vec<Vec<u8>>)> = vec![
        (
            "mixed",
            0x04,
            vec![
                request(cmd::WRITE, cmd_flags::FUA, 4096, 4096, &payload),
                request(cmd::READ, 0, 0, 8192, &[]),
                request(cmd::FLUSH, 0, 0, 0, &[]),
                request(cmd::TRIM, 0, 8192, 4096, &[]),
                request(cmd::WRITE_ZEROES, cmd_flags::NO_HOLE, 0, 512, &[]),
                request(cmd::DISC, 0, 0, 0, &[]),
            ],
        ),
        (
            "structured",
            0x05,
            vec![
                request(cmd::READ, cmd_flags::DF, 0, 512, &[]),
                request(cmd::READ, 0, 1 << 20, 512, &[]),
                request(cmd::BLOCK_STATUS, 0, 0, 4096, &[]),
                request(cmd::CACHE, 0, 0, 4096, &[]),
            ],
        ),
        (
            "rejects",
            0x0c,
            vec![
                request(cmd::READ, cmd_flags::DF, 0, 512, &[]),
                request(cmd::TRIM, 0, u64::MAX - 10, 4096, &[]),
                request(cmd::WRITE, 0, (1 << 20) - 1, 2, &[1, 2]),
                request(cmd::WRITE, 0, 0, 1 << 20, &[]),
            ],
        ),
        (
            "huge-export",
            0x06,
            vec![
                request(cmd::WRITE, 0, 1 << 61, 16, &[9; 16]),
                request(cmd::READ, 0, (1 << 62) - 512, 1024, &[]),
                request(cmd::WRITE_ZEROES, cmd_flags::FUA, 1 << 40, u32::MAX, &[]),
            ],
        ),
    ];
    for (name, config, requests) in seeds {
        let mut v = head(config);
        for r in requests {
            v.extend_from_slice(&r);
        }
        write("nbd_transmission", name, &v);
    }
}

// ---- replica ----

fn req(id: u64, epoch: u64, op: Op) -> DataRequest {
    DataRequest {
        id,
        epoch,
        op: Some(op),
    }
}

fn batch_record(requests: Vec<DataRequest>) -> Vec<u8> {
    let bytes = DataRequestBatch { requests }.encode_to_vec();
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(&bytes);
    v
}

fn write_op(offset: u64, data: &[u8], fua: bool) -> Op {
    Op::Write(WriteOp {
        offset,
        data: Bytes::copy_from_slice(data),
        crc32c: 0,
        fua, ..Default::default() })
}

fn replica_data_batch() {
    let block = vec![0xabu8; 4096];
    let odd = vec![0x11u8; 1000];
    let seeds: Vec<(&str, u8, Vec<Vec<DataRequest>>)> = vec![
        (
            "write-read",
            0,
            vec![
                vec![
                    req(1, 0, write_op(0, &block, false)),
                    req(2, 0, write_op(1 << 20, &odd, true)),
                    req(
                        3,
                        0,
                        Op::Read(ReadOp {
                            offset: 0,
                            length: 8192, ..Default::default() }),
                    ),
                ],
                vec![
                    req(
                        4,
                        0,
                        Op::Read(ReadOp {
                            offset: (1 << 20) - 3,
                            length: 1010, ..Default::default() }),
                    ),
                    req(5, 0, Op::Flush(FlushOp {})),
                ],
            ],
        ),
        (
            "unmap-zeroes-checksums",
            3,
            vec![vec![
                req(
                    1,
                    0,
                    write_op(4096, &[&block[..], &block[..]].concat(), false),
                ),
                req(
                    2,
                    0,
                    Op::Unmap(UnmapOp {
                        offset: 5000,
                        length: 4000,
                    }),
                ),
                req(
                    3,
                    0,
                    Op::WriteZeroes(WriteZeroesOp {
                        offset: 8000,
                        length: 100,
                        fua: true,
                    }),
                ),
                req(
                    4,
                    0,
                    Op::Checksums(ChecksumsOp {
                        offset: 0,
                        length: 16384, ..Default::default() }),
                ),
                req(
                    5,
                    0,
                    Op::Checksums(ChecksumsOp {
                        offset: 10,
                        length: 4096, ..Default::default() }),
                ),
                req(
                    6,
                    0,
                    Op::Read(ReadOp {
                        offset: 4096,
                        length: 8192, ..Default::default() }),
                ),
            ]],
        ),
        (
            "refusals",
            0,
            vec![vec![
                req(
                    1,
                    3,
                    Op::Read(ReadOp {
                        offset: 0,
                        length: 1, ..Default::default() }),
                ),
                req(
                    2,
                    9,
                    Op::Read(ReadOp {
                        offset: 0,
                        length: 1, ..Default::default() }),
                ),
                req(
                    3,
                    0,
                    Op::Read(ReadOp {
                        offset: 8 << 20,
                        length: 1, ..Default::default() }),
                ),
                req(
                    4,
                    0,
                    Op::Unmap(UnmapOp {
                        offset: u64::MAX,
                        length: 2,
                    }),
                ),
                req(
                    5,
                    0,
                    Op::Write(WriteOp {
                        offset: 0,
                        data: Bytes::from_static(b"bad"),
                        crc32c: 1,
                        fua: false, ..Default::default() }),
                ),
                DataRequest {
                    id: 6,
                    epoch: 0,
                    op: None,
                },
                req(
                    7,
                    0,
                    Op::Checksums(ChecksumsOp {
                        offset: 0,
                        length: u64::MAX, ..Default::default() }),
                ),
                req(
                    8,
                    0,
                    Op::Read(ReadOp {
                        offset: 0,
                        length: u32::MAX, ..Default::default() }),
                ),
            ]],
        ),
        (
            "regions-crash",
            0x0f,
            vec![
                (0..4u64)
                    .map(|i| req(i, 0, write_op((i << 20) + 4090, &odd, false)))
                    .collect(),
                vec![req(9, 0, Op::Flush(FlushOp {}))],
                vec![req(10, 0, write_op(3 << 20, &block, false))],
            ],
        ),
    ];
    for (name, config, batches) in seeds {
        let mut v = vec![config];
        for b in batches {
            v.extend_from_slice(&batch_record(b));
        }
        write("replica_data_batch", name, &v);
    }
}

fn main() {
    iscsi_pdu();
    iscsi_login();
    scsi_cdb();
    nbd_handshake();
    nbd_transmission();
    replica_data_batch();
    println!("seeds written under corpus/");
}
