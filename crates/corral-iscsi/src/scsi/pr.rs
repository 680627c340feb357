//! Reservation commands of the logical unit: SPC-2 RESERVE/RELEASE(6/10)
//! and SPC-5 PERSISTENT RESERVE IN/OUT. This module decodes their CDBs and
//! parameter lists and turns the outcome into status; the reservation state
//! itself, and the conflict rules every command is checked against, are in
//! [`crate::reservation`].

use bytes::Bytes;
use corral_block::{BlockDevice, BlockError};
use tracing::warn;

use crate::reservation::{Nexus, PersistentReservations, PrError};
use crate::sense::{Sense, status};

use super::cdb::{be16, be32};
use super::{CmdResult, Fail, ScsiLun, ScsiResult};

/// Bytes of the PERSISTENT RESERVE OUT parameter list we accept (the basic
/// list, without SPEC_I_PT or ALL_TG_PT additions).
const PR_OUT_PARAMETER_LIST_LEN: usize = 24;

/// PERSISTENT RESERVE OUT service action REGISTER AND MOVE (not supported).
const REGISTER_AND_MOVE: u8 = 7;

/// The sense of a PERSISTENT RESERVE OUT whose new state could not be saved.
fn save_failed(e: &BlockError) -> Sense {
    match e {
        BlockError::Unavailable(_) => Sense::NOT_READY_UNAVAILABLE,
        _ => Sense::INTERNAL_TARGET_FAILURE,
    }
}

impl<D: BlockDevice> ScsiLun<D> {
    /// RESERVE(6/10): the SPC-2 reservation, or a conflict if another
    /// nexus holds it.
    pub(super) fn reserve(&self, nexus: &Nexus) -> CmdResult {
        if self.lock().reservations.legacy_reserve(nexus) {
            Ok(ScsiResult::good())
        } else {
            Err(Fail::Conflict)
        }
    }

    /// RELEASE(6/10): GOOD whoever asks; only the holder's release counts.
    pub(super) fn release(&self, nexus: &Nexus) -> CmdResult {
        self.lock().reservations.legacy_release(nexus);
        Ok(ScsiResult::good())
    }

    /// Put in force the persistent reservations the device kept (saved by
    /// this or an earlier engine); an error names what could not be read.
    pub async fn restore_reservations(&self) -> Result<(), String> {
        let saved = self
            .device
            .load_reservations()
            .await
            .map_err(|e| e.to_string())?;
        let Some(bytes) = saved else {
            return Ok(());
        };
        let state = PersistentReservations::decode(&bytes).map_err(|e| e.to_string())?;
        self.lock().reservations.set_persistent(state);
        Ok(())
    }

    pub(super) fn persistent_reserve_in(&self, nexus: &Nexus, cdb: &[u8; 16]) -> CmdResult {
        let alloc = usize::from(be16(&cdb[7..9]));
        let v = self
            .lock()
            .reservations
            .persistent()
            .pr_in(cdb[1] & 0x1f, nexus)?;
        Ok(ScsiResult::data(v, alloc))
    }

    /// PERSISTENT RESERVE OUT; registrations it preempts get a unit
    /// attention. A change is saved on the device before it is in force and
    /// before GOOD: a command that could not be saved changes nothing.
    pub(super) async fn persistent_reserve_out(
        &self,
        nexus: &Nexus,
        cdb: &[u8; 16],
        data: &Bytes,
    ) -> CmdResult {
        let sa = cdb[1] & 0x1f;
        let scope = cdb[2] >> 4;
        let kind = cdb[2] & 0x0f;
        let plen = be32(&cdb[5..9]) as usize;
        let transfer_len = plen as u64;
        // RESERVE, RELEASE, PREEMPT and PREEMPT AND ABORT: LU scope only.
        if scope != 0 && matches!(sa, 1 | 2 | 4 | 5) {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if sa == REGISTER_AND_MOVE {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if plen != PR_OUT_PARAMETER_LIST_LEN || data.len() < PR_OUT_PARAMETER_LIST_LEN {
            return self.check_after_transfer(transfer_len, Sense::PARAM_LIST_LENGTH_ERROR);
        }
        let _turn = self.pr_turn.lock().await;
        let before = self.lock().reservations.persistent().clone();
        let mut next = before.clone();
        let outcome = next.pr_out(sa, kind, &data[..PR_OUT_PARAMETER_LIST_LEN], nexus);
        if let Ok(preempted) = &outcome
            && next != before
        {
            let saved = self
                .device
                .save_reservations(Bytes::from(next.encode()))
                .await;
            if let Err(e) = saved {
                warn!(volume = %self.identity.volume, error = %e,
                    "cannot save persistent reservations; PERSISTENT RESERVE OUT fails");
                return self.check_after_transfer(transfer_len, save_failed(&e));
            }
            let mut st = self.lock();
            st.reservations.set_persistent(next);
            for n in preempted {
                st.queue_unit_attention(n, Sense::REGISTRATIONS_PREEMPTED);
            }
        }
        match outcome {
            Ok(_) => Ok(ScsiResult {
                transfer_len,
                ..ScsiResult::good()
            }),
            Err(PrError::Conflict) => Ok(ScsiResult {
                transfer_len,
                ..ScsiResult::status(status::RESERVATION_CONFLICT)
            }),
            Err(PrError::Sense(s)) => self.check_after_transfer(transfer_len, s),
        }
    }
}
