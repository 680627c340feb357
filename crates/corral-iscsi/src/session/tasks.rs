//! The task set of one session (we run one connection per session): the
//! SCSI commands accepted and not yet answered, and what task management
//! functions (RFC 7143 §11.5) do to them.
//!
//! A function that aborts commands (ABORT TASK, ABORT TASK SET, CLEAR TASK
//! SET, the resets) marks them aborted — their responses are not sent — and
//! answers only once they have all finished, so that the initiator may
//! reuse their tags as soon as it has the answer. A reset also resets the
//! logical unit's state for the other nexuses ([`TmfDone::reset_lun`]), and
//! TARGET COLD RESET closes the session ([`TmfDone::closes_session`]).
//!
//! Each running command has an id given by [`TaskSet::start`]; its
//! completion is reported with [`TaskSet::finish`].

use std::collections::HashMap;

use crate::connection::{TmfRequest, sn_lt, tmf, tmf_response};
use crate::pdu::{Pdu, op};

/// A command accepted and not yet answered.
#[derive(Debug)]
struct Running {
    itt: u32,
    /// Aborted by task management: its response is not sent.
    aborted: bool,
}

/// A task management function waiting for the commands it aborted.
#[derive(Debug)]
struct PendingTmf {
    done: TmfDone,
    waiting: Vec<u64>,
}

/// A task management function ready to be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmfDone {
    /// The ITT of the request.
    pub itt: u32,
    pub function: u8,
    pub response: u8,
    /// Reset the logical unit (SPC-2 reservation, unit attentions for the
    /// other nexuses) before answering.
    pub reset_lun: bool,
}

impl TmfDone {
    /// The Task Management Function Response to send.
    pub fn response_pdu(&self) -> Pdu {
        let mut r = Pdu::new(op::TASK_MGMT_RESPONSE);
        r.bhs[2] = self.response;
        r.set_itt(self.itt);
        r
    }

    /// TARGET COLD RESET ends the session once answered.
    pub fn closes_session(&self) -> bool {
        self.function == tmf::TARGET_COLD_RESET
    }
}

/// What became of a command that finished.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// Aborted by task management: send no response for it.
    pub aborted: bool,
    /// Task management functions that waited for it last, in the order
    /// they were requested: answer them after the command's own response.
    pub tmfs_done: Vec<TmfDone>,
}

/// The commands of a session and the task management functions waiting
/// for them.
#[derive(Debug, Default)]
pub struct TaskSet {
    running: HashMap<u64, Running>,
    next_id: u64,
    pending: Vec<PendingTmf>,
}

impl TaskSet {
    /// Commands running (accepted and not answered).
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// A command with `itt` starts; returns its id.
    pub fn start(&mut self, itt: u32) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.running.insert(
            id,
            Running {
                itt,
                aborted: false,
            },
        );
        id
    }

    /// The command `id` finished.
    pub fn finish(&mut self, id: u64) -> Finished {
        let aborted = self.running.remove(&id).is_some_and(|r| r.aborted);
        let mut tmfs_done = Vec::new();
        if !self.pending.is_empty() {
            for t in &mut self.pending {
                t.waiting.retain(|&w| w != id);
            }
            let mut i = 0;
            while i < self.pending.len() {
                if self.pending[i].waiting.is_empty() {
                    tmfs_done.push(self.pending.remove(i).done);
                } else {
                    i += 1;
                }
            }
        }
        Finished { aborted, tmfs_done }
    }

    /// A task management request. `lun_exists`: its LUN is one we serve;
    /// `exp_cmd_sn`: the session's ExpCmdSN. Returns the answer when it is
    /// due at once; otherwise it comes from [`TaskSet::finish`] of the last
    /// command it aborted.
    pub fn request(
        &mut self,
        req: &TmfRequest,
        lun_exists: bool,
        exp_cmd_sn: u32,
    ) -> Option<TmfDone> {
        let all: Vec<u64> = self.running.keys().copied().collect();
        let mut waiting = Vec::new();
        let mut reset_lun = false;
        let response = match req.function {
            tmf::ABORT_TASK => {
                let ids: Vec<u64> = self
                    .running
                    .iter()
                    .filter(|(_, r)| r.itt == req.referenced_itt)
                    .map(|(&id, _)| id)
                    .collect();
                if !ids.is_empty() {
                    waiting = ids;
                    tmf_response::FUNCTION_COMPLETE
                } else if sn_lt(req.ref_cmd_sn, exp_cmd_sn) && !sn_lt(req.ref_cmd_sn, req.cmd_sn) {
                    // Not running, but received: it has been answered.
                    // (RFC 7143 §11.5.1 b) puts RefCmdSN *below* the
                    // request's CmdSN here; this is the rule as it was.)
                    tmf_response::FUNCTION_COMPLETE
                } else {
                    tmf_response::TASK_DOES_NOT_EXIST
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                if lun_exists {
                    waiting = all;
                    tmf_response::FUNCTION_COMPLETE
                } else {
                    tmf_response::LUN_DOES_NOT_EXIST
                }
            }
            tmf::LOGICAL_UNIT_RESET | tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                if req.function == tmf::LOGICAL_UNIT_RESET && !lun_exists {
                    tmf_response::LUN_DOES_NOT_EXIST
                } else {
                    waiting = all;
                    reset_lun = true;
                    tmf_response::FUNCTION_COMPLETE
                }
            }
            _ => tmf_response::NOT_SUPPORTED,
        };
        for id in &waiting {
            if let Some(r) = self.running.get_mut(id) {
                r.aborted = true;
            }
        }
        let done = TmfDone {
            itt: req.itt,
            function: req.function,
            response,
            reset_lun,
        };
        if waiting.is_empty() {
            Some(done)
        } else {
            self.pending.push(PendingTmf { done, waiting });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(function: u8, referenced_itt: u32) -> TmfRequest {
        TmfRequest {
            itt: 0x100 + u32::from(function),
            function,
            lun_raw: 0,
            referenced_itt,
            ref_cmd_sn: 0,
            cmd_sn: 10,
        }
    }

    #[test]
    fn abort_task_answers_once_the_aborted_command_finishes() {
        let mut t = TaskSet::default();
        let a = t.start(7);
        let b = t.start(8);
        assert_eq!(t.request(&req(tmf::ABORT_TASK, 7), true, 10), None);
        // Another command finishing does not complete it.
        assert_eq!(t.finish(b), Finished::default());
        let f = t.finish(a);
        assert!(f.aborted, "the aborted command gets no response");
        assert_eq!(f.tmfs_done.len(), 1);
        let done = &f.tmfs_done[0];
        assert_eq!(done.response, tmf_response::FUNCTION_COMPLETE);
        assert!(!done.reset_lun && !done.closes_session());
        let pdu = done.response_pdu();
        assert_eq!(pdu.opcode(), op::TASK_MGMT_RESPONSE);
        assert_eq!((pdu.bhs[2], pdu.itt()), (0, 0x101));
        assert!(t.is_empty());
    }

    #[test]
    fn abort_task_of_an_unknown_task() {
        let mut t = TaskSet::default();
        // RefCmdSN not yet received: the task does not exist.
        let mut r = req(tmf::ABORT_TASK, 7);
        r.ref_cmd_sn = 12;
        let done = t.request(&r, true, 10).unwrap();
        assert_eq!(done.response, tmf_response::TASK_DOES_NOT_EXIST);
        // RefCmdSN below ExpCmdSN and not below the request's CmdSN.
        r.ref_cmd_sn = 9;
        r.cmd_sn = 9;
        let done = t.request(&r, true, 10).unwrap();
        assert_eq!(done.response, tmf_response::FUNCTION_COMPLETE);
        // Below the request's own CmdSN: the task does not exist (kept as
        // it was; RFC 7143 §11.5.1 b) reads the other way).
        r.cmd_sn = 10;
        let done = t.request(&r, true, 10).unwrap();
        assert_eq!(done.response, tmf_response::TASK_DOES_NOT_EXIST);
    }

    #[test]
    fn abort_task_set_waits_for_every_command() {
        let mut t = TaskSet::default();
        let a = t.start(1);
        let b = t.start(2);
        assert_eq!(t.request(&req(tmf::ABORT_TASK_SET, 0), true, 10), None);
        assert!(t.finish(a).tmfs_done.is_empty());
        let f = t.finish(b);
        assert!(f.aborted);
        assert_eq!(f.tmfs_done[0].response, tmf_response::FUNCTION_COMPLETE);
        assert!(!f.tmfs_done[0].reset_lun);
        // With nothing running, the answer is immediate.
        let done = t.request(&req(tmf::CLEAR_TASK_SET, 0), true, 10).unwrap();
        assert_eq!(done.response, tmf_response::FUNCTION_COMPLETE);
    }

    #[test]
    fn task_set_functions_and_lun_reset_need_an_existing_lun() {
        let mut t = TaskSet::default();
        let a = t.start(1);
        for f in [
            tmf::ABORT_TASK_SET,
            tmf::CLEAR_TASK_SET,
            tmf::LOGICAL_UNIT_RESET,
        ] {
            let done = t.request(&req(f, 0), false, 10).unwrap();
            assert_eq!(done.response, tmf_response::LUN_DOES_NOT_EXIST);
            assert!(!done.reset_lun);
        }
        // Nothing was aborted.
        assert!(!t.finish(a).aborted);
    }

    #[test]
    fn resets_abort_everything_and_reset_the_lun() {
        for (function, lun_exists) in [
            (tmf::LOGICAL_UNIT_RESET, true),
            (tmf::TARGET_WARM_RESET, false),
            (tmf::TARGET_COLD_RESET, false),
        ] {
            let mut t = TaskSet::default();
            let a = t.start(1);
            assert_eq!(t.request(&req(function, 0), lun_exists, 10), None);
            let f = t.finish(a);
            assert!(f.aborted);
            let done = &f.tmfs_done[0];
            assert_eq!(done.response, tmf_response::FUNCTION_COMPLETE);
            assert!(done.reset_lun);
            assert_eq!(done.closes_session(), function == tmf::TARGET_COLD_RESET);
        }
        let done = TaskSet::default()
            .request(&req(tmf::TARGET_WARM_RESET, 0), false, 10)
            .unwrap();
        assert!(done.reset_lun);
    }

    #[test]
    fn other_functions_are_not_supported() {
        let mut t = TaskSet::default();
        let a = t.start(1);
        for f in [tmf::CLEAR_ACA, tmf::TASK_REASSIGN, 14] {
            let done = t.request(&req(f, 1), true, 10).unwrap();
            assert_eq!(done.response, tmf_response::NOT_SUPPORTED);
        }
        assert!(!t.finish(a).aborted);
    }

    #[test]
    fn functions_waiting_on_the_same_command_answer_in_request_order() {
        let mut t = TaskSet::default();
        let a = t.start(1);
        let b = t.start(2);
        assert_eq!(t.request(&req(tmf::ABORT_TASK, 1), true, 10), None);
        assert_eq!(t.request(&req(tmf::ABORT_TASK_SET, 0), true, 10), None);
        let f = t.finish(a);
        assert_eq!(f.tmfs_done.len(), 1);
        assert_eq!(f.tmfs_done[0].function, tmf::ABORT_TASK);
        let f = t.finish(b);
        assert_eq!(f.tmfs_done.len(), 1);
        assert_eq!(f.tmfs_done[0].function, tmf::ABORT_TASK_SET);
        // A command already aborted still counts for a later function.
        let c = t.start(3);
        assert_eq!(t.request(&req(tmf::ABORT_TASK, 3), true, 10), None);
        assert_eq!(t.request(&req(tmf::TARGET_WARM_RESET, 0), true, 10), None);
        let f = t.finish(c);
        let functions: Vec<u8> = f.tmfs_done.iter().map(|d| d.function).collect();
        assert_eq!(functions, vec![tmf::ABORT_TASK, tmf::TARGET_WARM_RESET]);
    }
}
