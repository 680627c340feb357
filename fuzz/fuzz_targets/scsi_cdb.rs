//! Fuzz target: SCSI command decoding and execution (`corral_iscsi::scsi`)
//! over an in-memory device. Owns the checks that any CDB with any
//! Data-Out bytes, from any of a few nexuses, interleaved with session
//! arrivals, departures and resets, never panics the logical unit and
//! always yields a status with sense data exactly when it is CHECK
//! CONDITION, and Data-In no larger than a command may transfer.
//!
//! Input: one config byte (bit 0: 4096-byte blocks, bit 1: a 1 PiB device
//! that keeps nothing), then records of: an action byte (bits 0-1 the
//! nexus; bit 7 add the nexus first, bit 6 reset, bit 5 remove the nexus
//! after, bit 4 also ask a missing LUN), a CDB length byte (0-32), the CDB,
//! a big-endian u16 Data-Out length and the Data-Out bytes.
#![no_main]

use bytes::Bytes;
use corral_fuzz::{Input, MemDevice};
use corral_iscsi::ScsiLun;
use corral_iscsi::reservation::Nexus;
use corral_iscsi::scsi::{LunIdentity, MAX_TRANSFER_BYTES, missing_lun};
use corral_iscsi::sense::status;
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;

fn nexus(i: u8) -> Nexus {
    Nexus {
        initiator: format!("iqn.2026-11.test:init{}", i >> 1),
        isid: [0x40, 0, 0, 0, 0, i],
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let config = input.u8();
    let block_size = if config & 1 != 0 { 4096 } else { 512 };
    let device = if config & 2 != 0 {
        MemDevice::huge(block_size)
    } else {
        MemDevice::small(1 << 20, block_size)
    };
    let lun = ScsiLun::new(
        device,
        LunIdentity {
            target_name: "iqn.2026-11.io.corral:fuzz".into(),
            volume: "fuzz".into(),
        },
    );
    let mut commands = 0;
    while !input.is_empty() && commands < 64 {
        commands += 1;
        let action = input.u8();
        let nx = nexus(action & 3);
        let cdb_len = usize::from(input.u8() % 33);
        let cdb = input.bytes(cdb_len).to_vec();
        let data_len = usize::from(input.u16());
        let data_out = Bytes::copy_from_slice(input.bytes(data_len));
        if action & 0x80 != 0 {
            lun.nexus_added(&nx);
        }
        if action & 0x40 != 0 {
            lun.reset(Some(&nx));
        }
        let r = block_on(lun.execute(&nx, &cdb, data_out));
        assert!(
            matches!(
                r.status,
                status::GOOD | status::CHECK_CONDITION | status::RESERVATION_CONFLICT
            ),
            "status {:#x}",
            r.status
        );
        assert_eq!(r.sense.is_some(), r.status == status::CHECK_CONDITION);
        if let Some(sense) = &r.sense {
            assert!(sense.len() <= 252, "sense of {} bytes", sense.len());
        }
        assert!(r.data_in.len() as u64 <= MAX_TRANSFER_BYTES);
        if action & 0x20 != 0 {
            lun.nexus_removed(&nx);
        }
        if action & 0x10 != 0 {
            let m = missing_lun(&cdb);
            assert_eq!(m.sense.is_some(), m.status == status::CHECK_CONDITION);
        }
    }
});
