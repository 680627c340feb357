//! The tokio server: sockets around the sans-IO [`crate::login`] and
//! [`crate::connection`] layers, and the target/session registry.
//!
//! Per connection: TCP_NODELAY, the login (bounded by a timeout), then one
//! task runs the full feature phase: it reads and decodes PDUs from a
//! `BytesMut` (check-then-parse) and feeds them to [`FullFeature`]; SCSI
//! commands run as futures polled by that same task (a `FuturesUnordered`,
//! no task spawned per command, at most a command window of them); their
//! responses are stamped with StatSN/ExpCmdSN/MaxCmdSN in wire order and
//! queued, and the queue goes out with one non-blocking `writev` per loop
//! turn (small PDUs copied together, large Data-In payloads sent from their
//! `Bytes`). Reading pauses while the window is full or too many response
//! bytes wait for the initiator.
//!
//! An idle connection is pinged with NOP-In; an initiator that does not
//! answer in time is dropped. A new login with the ISID of a live session
//! reinstates it (the old connection is closed first). A client that breaks
//! the protocol loses only its own connection. Those rules, and task
//! management, are decided by the sans-IO [`crate::session`] modules; this
//! module only carries them out on the sockets.
//!
//! Connections are accepted by the loop both frontends share
//! ([`corral_block::accept`]). Shutdown: when the [`Shutdown`] token is
//! cancelled the server stops accepting, connections stop reading, in-flight commands finish and
//! their responses are written (for at most
//! [`ServerConfig::shutdown_grace`]), then sockets close.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use corral_block::BlockDevice;
use corral_block::accept::{Shutdown, serve_connections};
use corral_block::send_queue::SendQueue;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::connection::{
    Action, FullFeature, ScsiCommand, StatusSequencer, TmfRequest, decode_lun, reject,
    reject_reason, scsi_response_pdus,
};
use crate::login::{
    ChapConfig, Limits, LoginConfig, LoginNegotiation, LoginStep, SessionType, TargetEntry,
};
use crate::pdu::{Digests, Pdu, PduCodec, PduError};
use crate::reservation::Nexus;
use crate::scsi::{LunIdentity, ScsiLun, ScsiResult, missing_lun};
use crate::session::{Keepalive, KeepaliveStep, SessionRegistry, TaskSet, TmfDone};

/// Errors of the iSCSI server.
#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Pdu(#[from] PduError),
    #[error("login timed out")]
    LoginTimeout,
    #[error("login failed (status {0:#06x})")]
    LoginFailed(u16),
    #[error("the initiator did not answer a NOP-In ping")]
    PingTimeout,
    #[error("connection closed in the middle of a PDU")]
    UnexpectedEof,
    #[error("the initiator broke the protocol; connection dropped")]
    ProtocolViolation,
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The IQN prefix of corral targets.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.corral:";

/// The target name of a volume: `iqn.2026-11.io.corral:<volume>`.
pub fn target_name(volume: &str) -> String {
    format!("{IQN_PREFIX}{volume}")
}

/// Server limits and timeouts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Negotiation limits (MaxRecvDataSegmentLength, bursts, command window).
    pub limits: Limits,
    /// Time an initiator has to complete the login.
    pub login_timeout: Duration,
    /// Idle time after which we ping the initiator with a NOP-In.
    pub nop_interval: Duration,
    /// Time the initiator has to answer the ping before we drop it.
    pub nop_timeout: Duration,
    /// At shutdown, how long in-flight commands may take to be answered.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            limits: Limits::default(),
            login_timeout: Duration::from_secs(30),
            nop_interval: Duration::from_secs(15),
            nop_timeout: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// One iSCSI target: a name and LUN 0 over a block device.
pub struct IscsiTarget<D> {
    name: String,
    alias: Option<String>,
    chap: Option<ChapConfig>,
    lun: ScsiLun<D>,
}

impl<D: BlockDevice> IscsiTarget<D> {
    /// A target named `iqn.2026-11.io.corral:<volume>` serving `device` at LUN 0.
    pub fn for_volume(volume: &str, device: Arc<D>) -> Self {
        Self::new(&target_name(volume), volume, device)
    }

    /// A target with an explicit IQN; `volume` names the LUN (serial, ids).
    pub fn new(name: &str, volume: &str, device: Arc<D>) -> Self {
        IscsiTarget {
            name: name.to_string(),
            alias: Some(volume.to_string()),
            chap: None,
            lun: ScsiLun::new(
                device,
                LunIdentity {
                    target_name: name.to_string(),
                    volume: volume.to_string(),
                },
            ),
        }
    }

    /// Require CHAP (one-way, or mutual when `chap.mutual` is set).
    pub fn with_chap(mut self, chap: ChapConfig) -> Self {
        self.chap = Some(chap);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn lun(&self) -> &ScsiLun<D> {
        &self.lun
    }
}

/// Serve `target` on `listener` with the default [`ServerConfig`] until
/// `shutdown` fires (or all its senders are dropped).
pub async fn serve<D: BlockDevice>(
    listener: TcpListener,
    target: Arc<IscsiTarget<D>>,
    shutdown: Shutdown,
) -> Result<(), IscsiError> {
    IscsiServer::new(vec![target]).run(listener, shutdown).await
}

/// An iSCSI server (one portal) over a set of targets.
pub struct IscsiServer<D> {
    targets: Vec<Arc<IscsiTarget<D>>>,
    config: ServerConfig,
}

/// What the server keeps of a live normal session, to close it when a new
/// login reinstates it.
struct SessionHandle {
    /// Cancelled to close the session (reinstatement).
    kill: Shutdown,
    /// Resolves (with an error) once the session's connection has ended.
    closed: oneshot::Receiver<()>,
}

struct Shared<D> {
    targets: Vec<Arc<IscsiTarget<D>>>,
    login: Arc<LoginConfig>,
    config: ServerConfig,
    /// Live normal sessions by (target, initiator port), and TSIHs.
    sessions: Mutex<SessionRegistry<SessionHandle>>,
    seed: AtomicU64,
}

impl<D> Shared<D> {
    fn sessions(&self) -> std::sync::MutexGuard<'_, SessionRegistry<SessionHandle>> {
        match self.sessions.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl<D: BlockDevice> IscsiServer<D> {
    pub fn new(targets: Vec<Arc<IscsiTarget<D>>>) -> Self {
        IscsiServer {
            targets,
            config: ServerConfig::default(),
        }
    }

    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Accept and serve connections until `shutdown` is cancelled.
    pub async fn run(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), IscsiError> {
        if self.targets.is_empty() {
            return Err(IscsiError::Config("no targets".into()));
        }
        info!(targets = self.targets.len(), "iSCSI target configured");
        let login = Arc::new(LoginConfig {
            targets: self
                .targets
                .iter()
                .map(|t| TargetEntry {
                    name: t.name.clone(),
                    alias: t.alias.clone(),
                    chap: t.chap.clone(),
                })
                .collect(),
            limits: self.config.limits,
            portal_group: 1,
        });
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let shared = Arc::new(Shared {
            targets: self.targets,
            login,
            config: self.config,
            sessions: Mutex::new(SessionRegistry::default()),
            seed: AtomicU64::new(seed),
        });
        let max = shared.config.max_connections;
        serve_connections(
            listener,
            max,
            shutdown,
            "iSCSI target",
            "iscsi",
            move |stream, _peer, stop| {
                let shared = Arc::clone(&shared);
                async move {
                    match handle_tcp(stream, shared, stop).await {
                        Ok(()) => debug!("connection closed"),
                        Err(IscsiError::Pdu(e)) => warn!(error = %e, "dropping initiator"),
                        Err(e) => debug!(error = %e, "connection ended"),
                    }
                }
            },
        )
        .await;
        Ok(())
    }
}

const READ_CHUNK: usize = 256 << 10;
const MIN_SPARE: usize = 16 << 10;
/// Largest login PDU data segment we accept.
const LOGIN_MAX_DATA: u32 = 64 << 10;

fn ensure_spare(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_SPARE {
        buf.reserve(READ_CHUNK);
    }
}

async fn handle_tcp<D: BlockDevice>(
    stream: TcpStream,
    shared: Arc<Shared<D>>,
    stop: Shutdown,
) -> Result<(), IscsiError> {
    let local = stream.local_addr()?;
    handle_connection(stream, local, shared, stop).await
}

/// Read one PDU (login phase), or `None` at a clean EOF.
async fn read_pdu<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    codec: &PduCodec,
) -> Result<Option<Pdu>, IscsiError> {
    loop {
        if let Some(p) = codec.decode(buf)? {
            return Ok(Some(p));
        }
        ensure_spare(buf);
        if rd.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(IscsiError::UnexpectedEof)
            };
        }
    }
}

struct LoggedIn {
    outcome: crate::login::LoginOutcome,
    tsih: u16,
    /// A normal session's registration: cancelled when it is reinstated
    /// elsewhere, and the guard whose drop tells the reinstating login that
    /// this connection has ended.
    session: Option<(Shutdown, oneshot::Sender<()>)>,
}

async fn login<D, R, W>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    shared: &Arc<Shared<D>>,
) -> Result<Option<LoggedIn>, IscsiError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let codec = PduCodec::new(LOGIN_MAX_DATA);
    let seed = shared
        .seed
        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    let mut neg = LoginNegotiation::new(Arc::clone(&shared.login), seed);
    let mut out = BytesMut::new();
    loop {
        let Some(pdu) = read_pdu(rd, buf, &codec).await? else {
            return Ok(None);
        };
        match neg.receive(&pdu) {
            LoginStep::Continue(resp) => {
                out.clear();
                codec.encode(&resp, &mut out);
                wr.write_all(&out).await?;
            }
            LoginStep::Failed(resp) => {
                out.clear();
                codec.encode(&resp, &mut out);
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                return Err(IscsiError::LoginFailed(u16::from_be_bytes([
                    resp.bhs[36],
                    resp.bhs[37],
                ])));
            }
            LoginStep::Complete(mut resp, outcome) => {
                let tsih = shared.sessions().allocate_tsih();
                let mut session = None;
                if let (SessionType::Normal, Some(t)) = (outcome.session_type, outcome.target) {
                    let nexus = Nexus {
                        initiator: outcome.initiator_name.clone(),
                        isid: outcome.isid,
                    };
                    session = Some(register_session(shared, t, nexus, tsih).await);
                }
                resp.set_u16(14, tsih);
                out.clear();
                codec.encode(&resp, &mut out);
                wr.write_all(&out).await?;
                return Ok(Some(LoggedIn {
                    outcome: *outcome,
                    tsih,
                    session,
                }));
            }
        }
    }
}

/// Register a normal session, reinstating (closing) an older one with the
/// same initiator port and waiting (bounded) until its connection has
/// finished its commands; returns this session's kill token and the guard
/// to hold while its connection lives.
async fn register_session<D>(
    shared: &Arc<Shared<D>>,
    target: usize,
    nexus: Nexus,
    tsih: u16,
) -> (Shutdown, oneshot::Sender<()>) {
    let kill = Shutdown::new();
    let (alive, closed) = oneshot::channel();
    let handle = SessionHandle {
        kill: kill.clone(),
        closed,
    };
    let old = shared.sessions().register(target, nexus, tsih, handle);
    if let Some(old) = old {
        info!(
            old_tsih = old.tsih,
            tsih, "session reinstatement: closing the old session"
        );
        old.handle.kill.cancel();
        if tokio::time::timeout(Duration::from_secs(10), old.handle.closed)
            .await
            .is_err()
        {
            warn!(
                old_tsih = old.tsih,
                "the old session did not close in 10 s; going on"
            );
        }
    }
    (kill, alive)
}

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

/// Serve one initiator.
///
/// After the login, everything runs in this one task: PDUs are read and
/// decoded, SCSI commands run as futures in a `FuturesUnordered` polled by
/// the same loop (only the device's own I/O leaves the task), and responses
/// are stamped and queued in wire order, then written with one `writev` per
/// loop turn, so the responses of commands that complete together share a
/// system call.
async fn handle_connection<D: BlockDevice>(
    mut stream: TcpStream,
    local: SocketAddr,
    shared: Arc<Shared<D>>,
    stop: Shutdown,
) -> Result<(), IscsiError> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let timeout = shared.config.login_timeout;
    let (mut rd, mut wr) = stream.split();
    let logged = tokio::select! {
        r = tokio::time::timeout(timeout, login(&mut rd, &mut wr, &mut buf, &shared)) => {
            r.unwrap_or(Err(IscsiError::LoginTimeout))?
        }
        _ = stop.cancelled() => return Ok(()),
    };
    let Some(logged) = logged else {
        return Ok(());
    };
    let outcome = logged.outcome;
    let params = outcome.params;
    let mut codec = PduCodec::new(params.target_max_recv_data_segment);
    codec.digests = Digests {
        header: params.header_digest,
        data: params.data_digest,
    };
    let portal = match local {
        SocketAddr::V4(a) => format!("{}:{},1", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{},1", a.ip(), a.port()),
    };
    let send_targets: Vec<(String, String)> = shared
        .targets
        .iter()
        .map(|t| (t.name.clone(), portal.clone()))
        .collect();
    let target = outcome.target.and_then(|t| shared.targets.get(t).cloned());
    let nexus = Nexus {
        initiator: outcome.initiator_name.clone(),
        isid: outcome.isid,
    };
    info!(
        initiator = %outcome.initiator_name,
        tsih = logged.tsih,
        kind = ?outcome.session_type,
        target = target.as_ref().map(|t| t.name.as_str()).unwrap_or("-"),
        "login complete"
    );
    if let Some(t) = &target {
        t.lun.nexus_added(&nexus);
    }
    let ff = FullFeature::new(
        params,
        outcome.session_type,
        outcome.exp_cmd_sn,
        shared.config.limits.command_window.max(1),
        send_targets,
        target.as_ref().map(|t| t.name.clone()),
    );
    let keepalive = Keepalive::new(
        Instant::now(),
        shared.config.nop_interval,
        shared.config.nop_timeout,
    );
    let ended = ConnectionDriver::new(
        ff,
        codec,
        target.as_deref(),
        &nexus,
        &shared.config,
        outcome.next_stat_sn,
        keepalive,
    )
    .run(
        &mut rd,
        wr.as_ref(),
        &mut buf,
        &stop,
        logged.session.as_ref().map(|(kill, _)| kill.clone()),
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    if let Some(t) = &target {
        t.lun.nexus_removed(&nexus);
        let target_index = outcome.target.unwrap_or(usize::MAX);
        shared.sessions().ended(target_index, &nexus, logged.tsih);
    }
    ended
}

/// A connection in the full feature phase.
struct ConnectionDriver<'a, D> {
    ff: FullFeature,
    codec: PduCodec,
    target: Option<&'a IscsiTarget<D>>,
    nexus: &'a Nexus,
    config: &'a ServerConfig,
    /// Commands accepted at once (the CmdSN window).
    window: u32,
    seq: StatusSequencer,
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
    fn new(
        ff: FullFeature,
        codec: PduCodec,
        target: Option<&'a IscsiTarget<D>>,
        nexus: &'a Nexus,
        config: &'a ServerConfig,
        first_stat_sn: u32,
        keepalive: Keepalive,
    ) -> Self {
        ConnectionDriver {
            ff,
            codec,
            target,
            nexus,
            config,
            window: config.limits.command_window.max(1),
            seq: StatusSequencer::new(first_stat_sn),
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
    async fn run(
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
            self.backlog.extend(self.ff.receive(pdu));
        }
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
        let room = self.window.saturating_sub(self.tasks.len() as u32);
        self.seq.stamp(&mut p, self.ff.exp_cmd_sn(), room);
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
