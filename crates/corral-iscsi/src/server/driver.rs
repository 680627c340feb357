//! The full feature phase of one connection on its socket: one task reads
//! and decodes PDUs, feeds them to [`FullFeature`], runs the SCSI commands
//! it hands out as futures polled by that same task, and writes the
//! stamped responses. What task management and the NOP-In keepalive decide
//! comes from [`crate::session`]; this module carries it out.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use corral_block::BlockDevice;
use corral_block::accept::Shutdown;
use corral_block::send_queue::SendQueue;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::ReadHalf;
use tracing::{debug, info, warn};

use crate::connection::{
    Action, FullFeature, ScsiCommand, StatusSequencer, TmfRequest, decode_lun, reject,
    reject_reason, scsi_response_pdus, sn_lt,
};
use crate::pdu::{Pdu, PduCodec, PduError, RESERVED_TAG, op};
use crate::reservation::Nexus;
use crate::scsi::{ScsiResult, missing_lun};
use crate::session::{Keepalive, KeepaliveStep, TaskSet, TmfDone};

use super::{IscsiError, IscsiTarget, ServerConfig, ensure_spare};

/// What a SCSI command's future yields.
struct Completed {
    id: u64,
    cmd: ScsiCommand,
    result: ScsiResult,
}

/// A SCSI command running inside its connection's task.
type CmdFuture<'a> = Pin<Box<dyn Future<Output = Completed> + Send + 'a>>;

/// How (and by when) a connection is ending.
struct Ending {
    result: Result<(), IscsiError>,
    /// The Logout Response, sent once in-flight commands are answered.
    logout: Option<Pdu>,
    deadline: Instant,
}

/// A connection in the full feature phase.
pub(super) struct ConnectionDriver<'a, D> {
    ff: FullFeature,
    codec: PduCodec,
    target: Option<&'a IscsiTarget<D>>,
    nexus: &'a Nexus,
    config: &'a ServerConfig,
    /// Commands accepted at once (the CmdSN window).
    window: u32,
    seq: StatusSequencer,
    /// The MaxCmdSN last advertised (by the login response, then by every
    /// PDU sent): a non-immediate command numbered beyond it is ignored.
    max_cmd_sn: u32,
    out: SendQueue,
    /// Commands running, and task management functions waiting for them.
    tasks: TaskSet,
    /// Actions not yet carried out because the command window is full;
    /// no further PDU is decoded until they are.
    backlog: VecDeque<Action>,
    ending: Option<Ending>,
    /// The socket failed: responses are dropped, commands still finish.
    broken: bool,
    keepalive: Keepalive,
}

/// Stop reading while this many response bytes wait for the initiator.
const OUT_HIGH_WATER: usize = 16 << 20;

impl<'a, D: BlockDevice> ConnectionDriver<'a, D> {
    pub(super) fn new(
        ff: FullFeature,
        codec: PduCodec,
        target: Option<&'a IscsiTarget<D>>,
        nexus: &'a Nexus,
        config: &'a ServerConfig,
        first_stat_sn: u32,
        keepalive: Keepalive,
    ) -> Self {
        let window = config.limits.command_window.max(1);
        // What the login response advertised.
        let max_cmd_sn = ff.exp_cmd_sn().wrapping_add(window - 1);
        ConnectionDriver {
            ff,
            codec,
            target,
            nexus,
            config,
            window,
            seq: StatusSequencer::new(first_stat_sn),
            max_cmd_sn,
            out: SendQueue::new(),
            tasks: TaskSet::default(),
            backlog: VecDeque::new(),
            ending: None,
            broken: false,
            keepalive,
        }
    }

    /// Serve the connection until it ends; `kill` is cancelled when the
    /// session is reinstated by a new login.
    pub(super) async fn run(
        mut self,
        rd: &mut ReadHalf<'_>,
        stream: &TcpStream,
        buf: &mut BytesMut,
        stop: &Shutdown,
        kill: Option<Shutdown>,
    ) -> Result<(), IscsiError> {
        let inflight: &mut FuturesUnordered<CmdFuture<'a>> = &mut FuturesUnordered::new();
        // A discovery session is never reinstated: a token nobody cancels.
        let kill = kill.unwrap_or_default();
        loop {
            // 1. Handle what the initiator sent.
            if self.ending.is_none() {
                self.process(buf, inflight);
            }
            // 2. Collect finished commands; this also starts new ones.
            while let Some(Some(done)) = inflight.next().now_or_never() {
                self.complete(done);
            }
            if self.ending.is_none()
                && !self.backlog.is_empty()
                && self.tasks.len() < self.window as usize
            {
                continue;
            }
            if let Some(end) = &mut self.ending
                && inflight.is_empty()
                && let Some(resp) = end.logout.take()
            {
                self.push(resp);
            }
            // 3. Write what is queued, as far as the socket takes it.
            if !self.broken
                && let Err(e) = self.out.write_to(stream)
            {
                self.break_socket(e);
            }
            if self.ending.is_some() && inflight.is_empty() && self.out.is_empty() {
                return self.finish();
            }
            // 4. Wait for something to do.
            let wake = match &self.ending {
                Some(end) => end.deadline,
                None => self.keepalive.deadline(),
            };
            let accepting = self.accepting();
            if accepting {
                ensure_spare(buf);
            }
            let writing = !self.broken && !self.out.is_empty();
            let open = self.ending.is_none();
            tokio::select! {
                biased;
                Some(done) = inflight.next(), if !inflight.is_empty() => self.complete(done),
                r = stream.writable(), if writing => {
                    if let Err(e) = r {
                        self.break_socket(e);
                    }
                }
                // A read that does not fill the buffer clears the socket's
                // readiness, so an idle socket costs no extra system call.
                r = rd.read_buf(buf), if accepting => match r {
                    Ok(0) => {
                        let r = if buf.is_empty() {
                            Ok(())
                        } else {
                            Err(IscsiError::UnexpectedEof)
                        };
                        self.end(r);
                    }
                    Ok(_) => self.keepalive.received(Instant::now()),
                    Err(e) => self.end(Err(e.into())),
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    if self.ending.is_some() {
                        if inflight.is_empty() {
                            warn!("initiator is not reading its responses; closing");
                        } else {
                            warn!(commands = inflight.len(), "commands did not finish in time; closing");
                        }
                        return self.finish();
                    }
                    match self.keepalive.on_deadline(Instant::now()) {
                        KeepaliveStep::Wait => {}
                        KeepaliveStep::Ping(p) => self.push(p),
                        KeepaliveStep::TimedOut => return Err(IscsiError::PingTimeout),
                    }
                }
                _ = stop.cancelled(), if open => self.end(Ok(())),
                _ = kill.cancelled(), if open => {
                    info!("session reinstated elsewhere; closing this connection");
                    self.end(Ok(()));
                }
            }
        }
    }

    /// The socket failed: drop queued and future responses, stop reading,
    /// and let the commands in flight finish (a replicated write is never
    /// abandoned half-way by its frontend) before the connection closes.
    fn break_socket(&mut self, e: std::io::Error) {
        debug!(error = %e, "writing responses failed");
        self.broken = true;
        self.out.clear();
        self.end(Err(e.into()));
    }

    /// Whether we take new PDUs from the initiator now.
    fn accepting(&self) -> bool {
        self.ending.is_none() && self.backlog.is_empty() && self.out.len() < OUT_HIGH_WATER
    }

    /// Stop reading; finish in-flight commands (for at most the shutdown
    /// grace), write their responses and close with `result`.
    fn end(&mut self, result: Result<(), IscsiError>) {
        self.end_with(result, None);
    }

    fn end_with(&mut self, result: Result<(), IscsiError>, logout: Option<Pdu>) {
        if self.ending.is_none() {
            self.ending = Some(Ending {
                result,
                logout,
                deadline: Instant::now() + self.config.shutdown_grace,
            });
        }
    }

    fn finish(&mut self) -> Result<(), IscsiError> {
        match self.ending.take() {
            Some(end) => end.result,
            None => Ok(()),
        }
    }

    /// Decode buffered PDUs and carry out their actions while we accept.
    fn process(&mut self, buf: &mut BytesMut, inflight: &mut FuturesUnordered<CmdFuture<'a>>) {
        loop {
            while let Some(a) = self.backlog.pop_front() {
                if let Err(a) = self.act(a, inflight) {
                    self.backlog.push_front(a);
                    return;
                }
                if self.ending.is_some() {
                    self.backlog.clear();
                    return;
                }
            }
            if !self.accepting() {
                return;
            }
            let pdu = match self.codec.decode(buf) {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(PduError::DataDigest { bhs }) => {
                    // The header is good: reject and go on (ERL 0 may not
                    // recover the command, the initiator will).
                    let p = Pdu {
                        bhs: *bhs,
                        ahs: Bytes::new(),
                        data: Bytes::new(),
                    };
                    self.push(reject(&p, reject_reason::DATA_DIGEST_ERROR));
                    continue;
                }
                Err(e) => {
                    if let PduError::DataSegmentTooLong { .. } = e
                        && buf.len() >= 48
                    {
                        let mut bhs = [0u8; 48];
                        bhs.copy_from_slice(&buf[..48]);
                        let p = Pdu {
                            bhs,
                            ahs: Bytes::new(),
                            data: Bytes::new(),
                        };
                        self.push(reject(&p, reject_reason::PROTOCOL_ERROR));
                    }
                    self.end(Err(e.into()));
                    return;
                }
            };
            if self.admit(&pdu) {
                self.backlog.extend(self.ff.receive(pdu));
            }
        }
    }

    /// Commands received and not yet answered: running, waiting for a
    /// window slot, or still collecting their Data-Out.
    fn outstanding(&self) -> usize {
        self.tasks.len() + self.backlog.len() + self.ff.collecting()
    }

    /// Whether a command may enter the session, so that the commands
    /// outstanding stay within the window (a write collecting its data holds
    /// a slot too): a non-immediate command numbered beyond the MaxCmdSN we
    /// advertised is ignored (RFC 7143 §3.2.2.1), an immediate SCSI command
    /// while the window is full is rejected (§11.17.1, "immediate command
    /// reject").
    fn admit(&mut self, pdu: &Pdu) -> bool {
        let numbered = match pdu.opcode() {
            op::NOP_OUT => pdu.itt() != RESERVED_TAG,
            op::SCSI_COMMAND | op::TASK_MGMT_REQUEST | op::TEXT_REQUEST | op::LOGOUT_REQUEST => {
                true
            }
            _ => false,
        };
        if !numbered {
            return true;
        }
        if pdu.immediate() {
            if pdu.opcode() == op::SCSI_COMMAND && self.outstanding() >= self.window as usize {
                debug!(
                    itt = pdu.itt(),
                    "immediate command with a full window rejected"
                );
                self.push(reject(pdu, reject_reason::IMMEDIATE_COMMAND_REJECT));
                return false;
            }
            return true;
        }
        let cmd_sn = pdu.u32_at(24);
        if sn_lt(self.max_cmd_sn, cmd_sn) {
            debug!(
                cmd_sn,
                max_cmd_sn = self.max_cmd_sn,
                "command beyond MaxCmdSN ignored"
            );
            return false;
        }
        true
    }

    /// Carry out one action; gives it back when the command window is full.
    fn act(
        &mut self,
        a: Action,
        inflight: &mut FuturesUnordered<CmdFuture<'a>>,
    ) -> Result<(), Action> {
        match a {
            Action::Send(p) => self.push(p),
            Action::Execute(cmd) => {
                if self.tasks.len() >= self.window as usize {
                    return Err(Action::Execute(cmd));
                }
                self.start(cmd, inflight);
            }
            Action::TaskManagement(req) => self.task_management(req),
            Action::Logout(resp) => self.end_with(Ok(()), Some(resp)),
            Action::FailWrite(itt) => {
                for p in self.ff.fail_write(itt) {
                    self.push(p);
                }
            }
            Action::PingAnswered(ttt) => self.keepalive.answered(ttt),
            Action::Close(p) => {
                if let Some(p) = p {
                    self.push(p);
                }
                self.end(Err(IscsiError::ProtocolViolation));
            }
        }
        Ok(())
    }

    /// Stamp StatSN/ExpCmdSN/MaxCmdSN (wire order) and queue `p`.
    fn push(&mut self, mut p: Pdu) {
        let room = self.window.saturating_sub(self.outstanding() as u32);
        self.seq.stamp(&mut p, self.ff.exp_cmd_sn(), room);
        // The initiator may use the highest MaxCmdSN it has seen.
        if sn_lt(self.max_cmd_sn, p.u32_at(32)) {
            self.max_cmd_sn = p.u32_at(32);
        }
        if self.broken {
            return;
        }
        let buf = self.out.buf(p.data.len());
        self.codec.encode_header(&p, buf);
        self.out.payload(&p.data);
        self.codec.encode_data_trailer(&p.data, self.out.buf(0));
    }

    fn start(&mut self, mut cmd: ScsiCommand, inflight: &mut FuturesUnordered<CmdFuture<'a>>) {
        let id = self.tasks.start(cmd.itt);
        let target = self.target;
        let nexus = self.nexus;
        inflight.push(Box::pin(async move {
            let data = std::mem::take(&mut cmd.data);
            let result = match (target, decode_lun(cmd.lun_raw)) {
                (Some(t), Some(0)) => t.lun.execute(nexus, &cmd.cdb, data).await,
                _ => missing_lun(&cmd.cdb),
            };
            Completed { id, cmd, result }
        }));
    }

    fn complete(&mut self, done: Completed) {
        let finished = self.tasks.finish(done.id);
        if !finished.aborted {
            for p in scsi_response_pdus(&done.cmd, &done.result, self.ff.params()) {
                self.push(p);
            }
        }
        for t in finished.tmfs_done {
            self.answer_tmf(t);
        }
    }

    fn task_management(&mut self, req: TmfRequest) {
        let lun_exists = decode_lun(req.lun_raw) == Some(0) && self.target.is_some();
        if let Some(done) = self.tasks.request(&req, lun_exists, self.ff.exp_cmd_sn()) {
            self.answer_tmf(done);
        }
    }

    /// Carry out a task management function's outcome and answer it.
    fn answer_tmf(&mut self, t: TmfDone) {
        if t.reset_lun
            && let Some(target) = self.target
        {
            target.lun.reset(Some(self.nexus));
        }
        self.push(t.response_pdu());
        if t.closes_session() {
            self.end(Ok(()));
        }
    }
}
