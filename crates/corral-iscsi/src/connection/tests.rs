//! Tests of the full feature phase: write data collection, the CmdSN
//! window, and response PDUs.

use super::*;

fn params() -> SessionParams {
    SessionParams {
        initial_r2t: false,
        first_burst: 4096,
        max_burst: 8192,
        max_outstanding_r2t: 1,
        initiator_max_recv_data_segment: 4096,
        ..SessionParams::default()
    }
}

fn write_cmd(itt: u32, sn: u32, edtl: u32, imm: &[u8], fin: bool) -> Pdu {
    let mut p = Pdu::new(op::SCSI_COMMAND);
    p.bhs[1] = if fin { 0x80 } else { 0 } | 0x20;
    p.set_itt(itt);
    p.set_u32(20, edtl);
    p.set_u32(24, sn);
    p.bhs[32] = 0x2a;
    p.data = Bytes::copy_from_slice(imm);
    p
}

fn data_out(itt: u32, ttt: u32, sn: u32, off: u32, data: &[u8], fin: bool) -> Pdu {
    let mut p = Pdu::new(op::DATA_OUT);
    p.bhs[1] = if fin { 0x80 } else { 0 };
    p.set_itt(itt);
    p.set_u32(20, ttt);
    p.set_u32(36, sn);
    p.set_u32(40, off);
    p.data = Bytes::copy_from_slice(data);
    p
}

#[test]
fn immediate_unsolicited_then_r2t() {
    let mut ff = FullFeature::new(params(), SessionType::Normal, 10, 8, vec![], None);
    let a = ff.receive(write_cmd(1, 10, 20000, &[1; 1024], false));
    assert!(a.is_empty());
    let a = ff.receive(data_out(1, RESERVED_TAG, 0, 1024, &[2; 3072], true));
    // Unsolicited burst done: one R2T (MaxOutstandingR2T = 1) for 8192.
    let [Action::Send(r2t)] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(r2t.opcode(), op::R2T);
    assert_eq!((r2t.u32_at(40), r2t.u32_at(44)), (4096, 8192));
    let ttt = r2t.u32_at(20);
    let a = ff.receive(data_out(1, ttt, 0, 4096, &[3; 4096], false));
    assert!(a.is_empty());
    let a = ff.receive(data_out(1, ttt, 1, 8192, &[3; 4096], true));
    let [Action::Send(r2t)] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!((r2t.u32_at(40), r2t.u32_at(44)), (12288, 7712));
    let ttt = r2t.u32_at(20);
    let a = ff.receive(data_out(1, ttt, 0, 12288, &[4; 7712], true));
    let [Action::Execute(cmd)] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(cmd.data.len(), 20000);
    assert_eq!(ff.exp_cmd_sn(), 11);
}

#[test]
fn bad_data_sn_closes() {
    let mut ff = FullFeature::new(params(), SessionType::Normal, 1, 8, vec![], None);
    ff.receive(write_cmd(1, 1, 1024, &[], false));
    let a = ff.receive(data_out(1, RESERVED_TAG, 5, 0, &[0; 512], false));
    assert!(matches!(a[..], [Action::FailWrite(1)]));
    let r = ff.fail_write(1);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].bhs[3], status::CHECK_CONDITION);
    assert_eq!(ff.collecting(), 0);
}

#[test]
fn window_holds_early_and_ignores_outside() {
    let mut ff = FullFeature::new(params(), SessionType::Normal, 5, 4, vec![], None);
    let nop = |sn: u32| {
        let mut p = Pdu::new(op::NOP_OUT);
        p.set_itt(sn);
        p.set_u32(24, sn);
        p
    };
    assert!(ff.receive(nop(6)).is_empty(), "held");
    assert!(ff.receive(nop(100)).is_empty(), "outside");
    assert!(ff.receive(nop(4)).is_empty(), "too low");
    let a = ff.receive(nop(5));
    assert_eq!(a.len(), 2, "5 and the held 6");
    assert_eq!(ff.exp_cmd_sn(), 7);
}

#[test]
fn read_response_is_collapsed_and_segmented() {
    let cmd = ScsiCommand {
        itt: 9,
        lun_raw: 0,
        cdb: Bytes::new(),
        edtl: 10000,
        read: true,
        write: false,
        data: Bytes::new(),
        cmd_sn: 0,
        immediate: false,
    };
    let result = ScsiResult {
        status: 0,
        sense: None,
        data_in: Bytes::from(vec![1u8; 9000]),
        transfer_len: 9000,
    };
    let pdus = scsi_response_pdus(&cmd, &result, &params());
    assert_eq!(pdus.len(), 3);
    let last = &pdus[2];
    assert_eq!(last.flags() & 0x81, 0x81);
    assert_eq!(last.flags() & 0x02, 0x02, "underflow");
    assert_eq!(last.u32_at(44), 1000);
    assert_eq!(pdus[1].flags() & 0x80, 0x80, "end of an 8 KiB burst");
    let mut seq = StatusSequencer::new(100);
    let mut p = pdus[0].clone();
    seq.stamp(&mut p, 5, 10);
    assert_eq!(seq.stat_sn(), 100);
    let mut p = last.clone();
    seq.stamp(&mut p, 5, 10);
    assert_eq!(p.u32_at(24), 100);
    assert_eq!(p.u32_at(32), 14);
    assert_eq!(seq.stat_sn(), 101);
}
