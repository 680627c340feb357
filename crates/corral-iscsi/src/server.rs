//! The tokio server: sockets around the sans-IO [`crate::login`] and
//! [`crate::connection`] layers, and the target/session registry.
//!
//! Per connection: TCP_NODELAY, the login (bounded by a timeout), then a
//! reader loop that decodes PDUs from a `BytesMut` (check-then-parse) and
//! feeds them to [`FullFeature`]; each SCSI command runs in its own task,
//! bounded by a per-connection semaphore that also closes the CmdSN window.
//! One writer task per connection stamps StatSN/ExpCmdSN/MaxCmdSN in wire
//! order, coalesces small PDUs into one `write`, and sends large Data-In
//! payloads straight from their `Bytes`.
//!
//! An idle connection is pinged with NOP-In; an initiator that does not
//! answer in time is dropped. A new login with the ISID of a live session
//! reinstates it (the old connection is closed first). A client that breaks
//! the protocol loses only its own connection.
//!
//! Shutdown: when the broadcast fires (or its senders are dropped) the server
//! stops accepting, connections stop reading, in-flight commands finish and
//! their responses are written (for at most
//! [`ServerConfig::shutdown_grace`]), then sockets close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use corral_block::BlockDevice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

use crate::connection::{
    Action, FullFeature, ScsiCommand, StatusSequencer, TmfRequest, decode_lun, reject,
    reject_reason, scsi_response_pdus, sn_lt, tmf, tmf_response,
};
use crate::login::{
    ChapConfig, Limits, LoginConfig, LoginNegotiation, LoginStep, SessionType, TargetEntry,
};
use crate::pdu::{Digests, Pdu, PduCodec, PduError, RESERVED_TAG, op};
use crate::reservation::Nexus;
use crate::scsi::{LunIdentity, ScsiLun, missing_lun};

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
    shutdown: broadcast::Receiver<()>,
) -> Result<(), IscsiError> {
    IscsiServer::new(vec![target]).run(listener, shutdown).await
}

/// An iSCSI server (one portal) over a set of targets.
pub struct IscsiServer<D> {
    targets: Vec<Arc<IscsiTarget<D>>>,
    config: ServerConfig,
}

struct SessionEntry {
    tsih: u16,
    kill: watch::Sender<bool>,
}

struct Shared<D> {
    targets: Vec<Arc<IscsiTarget<D>>>,
    login: Arc<LoginConfig>,
    config: ServerConfig,
    /// Live normal sessions by (target, initiator port).
    sessions: Mutex<HashMap<(usize, Nexus), SessionEntry>>,
    next_tsih: AtomicU16,
    seed: AtomicU64,
}

impl<D> Shared<D> {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, Nexus), SessionEntry>> {
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

    /// Accept and serve connections until `shutdown` fires.
    pub async fn run(
        self,
        listener: TcpListener,
        mut shutdown: broadcast::Receiver<()>,
    ) -> Result<(), IscsiError> {
        if self.targets.is_empty() {
            return Err(IscsiError::Config("no targets".into()));
        }
        let local = listener.local_addr().ok();
        info!(
            ?local,
            targets = self.targets.len(),
            "iSCSI target listening"
        );
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
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
            seed: AtomicU64::new(seed),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
        let mut conns = JoinSet::new();
        loop {
            while let Some(done) = conns.try_join_next() {
                report_join(done);
            }
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = shutdown.recv() => break,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.recv() => break,
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let shared = Arc::clone(&shared);
            let stop = stop_rx.clone();
            conns.spawn(
                async move {
                    let _permit = permit;
                    match handle_tcp(stream, shared, stop).await {
                        Ok(()) => debug!("connection closed"),
                        Err(IscsiError::Pdu(e)) => warn!(error = %e, "dropping initiator"),
                        Err(e) => debug!(error = %e, "connection ended"),
                    }
                }
                .instrument(tracing::info_span!("iscsi", %peer)),
            );
        }
        drop(listener);
        info!(
            connections = conns.len(),
            "iSCSI target shutting down; draining connections"
        );
        let _ = stop_tx.send(true);
        while let Some(done) = conns.join_next().await {
            report_join(done);
        }
        info!("iSCSI target stopped");
        Ok(())
    }
}

fn report_join(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        warn!(error = %e, "connection task failed");
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
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
    stop: watch::Receiver<bool>,
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
    kill: Option<watch::Receiver<bool>>,
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
                let tsih = loop {
                    let t = shared.next_tsih.fetch_add(1, Ordering::Relaxed);
                    if t != 0 {
                        break t;
                    }
                };
                let mut kill = None;
                if let (SessionType::Normal, Some(t)) = (outcome.session_type, outcome.target) {
                    let nexus = Nexus {
                        initiator: outcome.initiator_name.clone(),
                        isid: outcome.isid,
                    };
                    kill = Some(register_session(shared, t, nexus, tsih).await);
                }
                resp.set_u16(14, tsih);
                out.clear();
                codec.encode(&resp, &mut out);
                wr.write_all(&out).await?;
                return Ok(Some(LoggedIn {
                    outcome: *outcome,
                    tsih,
                    kill,
                }));
            }
        }
    }
}

/// Register a normal session, reinstating (closing) an older one with the
/// same initiator port; returns the receiver that closes this session.
async fn register_session<D>(
    shared: &Arc<Shared<D>>,
    target: usize,
    nexus: Nexus,
    tsih: u16,
) -> watch::Receiver<bool> {
    let key = (target, nexus);
    let (tx, rx) = watch::channel(false);
    let old = shared
        .sessions()
        .insert(key.clone(), SessionEntry { tsih, kill: tx });
    if let Some(old) = old {
        info!(
            old_tsih = old.tsih,
            tsih, "session reinstatement: closing the old session"
        );
        let _ = old.kill.send(true);
        // Wait (bounded) for the old connection to finish its commands.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !old.kill.is_closed() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    rx
}

/// A message for the writer.
enum Outgoing {
    /// PDUs to write; `finishes` counts SCSI commands they complete.
    Pdus { pdus: Vec<Pdu>, finishes: u32 },
    /// Write nothing more; close after what is queued.
    Close,
}

/// Control of one running SCSI command.
struct TaskCtl {
    aborted: AtomicBool,
    done: watch::Receiver<bool>,
}

type TaskTable = Arc<Mutex<HashMap<u32, Arc<TaskCtl>>>>;

fn lock_tasks(t: &TaskTable) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<TaskCtl>>> {
    match t.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Counters shared by the reader and the writer of a connection.
struct Window {
    exp_cmd_sn: AtomicU32,
    /// SCSI commands accepted and not yet answered.
    active: AtomicU32,
    size: u32,
}

impl Window {
    fn room(&self) -> u32 {
        self.size
            .saturating_sub(self.active.load(Ordering::Acquire))
    }
}

/// Serve one initiator over any byte stream.
async fn handle_connection<D, S>(
    stream: S,
    local: SocketAddr,
    shared: Arc<Shared<D>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), IscsiError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let timeout = shared.config.login_timeout;
    let logged = tokio::select! {
        r = tokio::time::timeout(timeout, login(&mut rd, &mut wr, &mut buf, &shared)) => {
            r.unwrap_or(Err(IscsiError::LoginTimeout))?
        }
        _ = stopped(&mut stop) => return Ok(()),
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
    let window = Arc::new(Window {
        exp_cmd_sn: AtomicU32::new(outcome.exp_cmd_sn),
        active: AtomicU32::new(0),
        size: shared.config.limits.command_window.max(1),
    });
    let ff = FullFeature::new(
        params,
        outcome.session_type,
        outcome.exp_cmd_sn,
        window.size,
        send_targets,
        target.as_ref().map(|t| t.name.clone()),
    );
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let mut writer = tokio::spawn(write_pdus(
        wr,
        rx,
        codec.clone(),
        StatusSequencer::new(outcome.next_stat_sn),
        Arc::clone(&window),
    ));
    let tasks: TaskTable = Arc::new(Mutex::new(HashMap::new()));
    let mut conn = Conn {
        ff,
        codec,
        target: target.clone(),
        nexus: nexus.clone(),
        tx: tx.clone(),
        tasks: Arc::clone(&tasks),
        window: Arc::clone(&window),
        slots: Arc::new(Semaphore::new(window.size as usize)),
        config: shared.config.clone(),
    };
    let ended = conn
        .read_loop(&mut rd, &mut buf, &mut stop, logged.kill)
        .await;
    // Let running commands finish (bounded), then close the writer.
    let grace = shared.config.shutdown_grace;
    let _ = tokio::time::timeout(grace, conn.wait_all()).await;
    let _ = tx.send(Outgoing::Close);
    drop(conn);
    drop(tx);
    match tokio::time::timeout(grace, &mut writer).await {
        Ok(Ok(Err(e))) => debug!(error = %e, "writing PDUs failed"),
        Ok(_) => {}
        Err(_) => {
            warn!("initiator is not reading its responses; closing");
            writer.abort();
        }
    }
    if let Some(t) = &target {
        t.lun.nexus_removed(&nexus);
        let mut sessions = shared.sessions();
        let key = (outcome.target.unwrap_or(usize::MAX), nexus.clone());
        if sessions.get(&key).is_some_and(|e| e.tsih == logged.tsih) {
            sessions.remove(&key);
        }
    }
    ended
}

/// The reader side of a connection in the full feature phase.
struct Conn<D> {
    ff: FullFeature,
    codec: PduCodec,
    target: Option<Arc<IscsiTarget<D>>>,
    nexus: Nexus,
    tx: mpsc::UnboundedSender<Outgoing>,
    tasks: TaskTable,
    window: Arc<Window>,
    slots: Arc<Semaphore>,
    config: ServerConfig,
}

impl<D: BlockDevice> Conn<D> {
    async fn read_loop<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        buf: &mut BytesMut,
        stop: &mut watch::Receiver<bool>,
        kill: Option<watch::Receiver<bool>>,
    ) -> Result<(), IscsiError> {
        let (_keep, mut kill) = match kill {
            Some(k) => (None, k),
            None => {
                let (tx, rx) = watch::channel(false);
                (Some(tx), rx)
            }
        };
        let mut last_rx = Instant::now();
        let mut ping: Option<(u32, Instant)> = None;
        let mut ping_ttt: u32 = 0x4000_0000;
        loop {
            loop {
                let pdu = match self.codec.decode(buf) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(PduError::DataDigest { bhs }) => {
                        // The header is good: reject and go on (ERL 0 may
                        // not recover the command, the initiator will).
                        let p = Pdu {
                            bhs: *bhs,
                            ahs: bytes::Bytes::new(),
                            data: bytes::Bytes::new(),
                        };
                        self.send(vec![reject(&p, reject_reason::DATA_DIGEST_ERROR)], 0);
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
                                ahs: bytes::Bytes::new(),
                                data: bytes::Bytes::new(),
                            };
                            self.send(vec![reject(&p, reject_reason::PROTOCOL_ERROR)], 0);
                        }
                        return Err(e.into());
                    }
                };
                last_rx = Instant::now();
                let actions = self.ff.receive(pdu);
                self.window
                    .exp_cmd_sn
                    .store(self.ff.exp_cmd_sn(), Ordering::Release);
                for a in actions {
                    match a {
                        Action::Send(p) => self.send(vec![p], 0),
                        Action::Execute(cmd) => {
                            let permit = tokio::select! {
                                p = Arc::clone(&self.slots).acquire_owned() => p.ok(),
                                _ = stopped(stop) => None,
                            };
                            let Some(permit) = permit else {
                                return Ok(());
                            };
                            self.execute(cmd, permit);
                        }
                        Action::TaskManagement(req) => self.task_management(req),
                        Action::Logout(resp) => {
                            let _ =
                                tokio::time::timeout(self.config.shutdown_grace, self.wait_all())
                                    .await;
                            self.send(vec![resp], 0);
                            return Ok(());
                        }
                        Action::FailWrite(itt) => {
                            let pdus = self.ff.fail_write(itt);
                            self.send(pdus, 0);
                        }
                        Action::PingAnswered(ttt) => {
                            if ping.is_some_and(|(t, _)| t == ttt) {
                                ping = None;
                            }
                        }
                        Action::Close(p) => {
                            if let Some(p) = p {
                                self.send(vec![p], 0);
                            }
                            return Err(IscsiError::ProtocolViolation);
                        }
                    }
                }
            }
            ensure_spare(buf);
            let wake = match ping {
                Some((_, sent)) => sent + self.config.nop_timeout,
                None => last_rx + self.config.nop_interval,
            };
            tokio::select! {
                r = rd.read_buf(buf) => {
                    if r? == 0 {
                        return if buf.is_empty() {
                            Ok(())
                        } else {
                            Err(IscsiError::UnexpectedEof)
                        };
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if ping.is_some() {
                        return Err(IscsiError::PingTimeout);
                    }
                    if Instant::now() >= last_rx + self.config.nop_interval {
                        ping_ttt = ping_ttt.wrapping_add(1);
                        if ping_ttt == RESERVED_TAG {
                            ping_ttt = 0x4000_0000;
                        }
                        let mut p = Pdu::new(op::NOP_IN);
                        p.set_itt(RESERVED_TAG);
                        p.set_u32(20, ping_ttt);
                        self.send(vec![p], 0);
                        ping = Some((ping_ttt, Instant::now()));
                    }
                }
                _ = stopped(stop) => return Ok(()),
                _ = kill.wait_for(|k| *k) => {
                    info!("session reinstated elsewhere; closing this connection");
                    return Ok(());
                }
            }
        }
    }

    fn send(&self, pdus: Vec<Pdu>, finishes: u32) {
        let _ = self.tx.send(Outgoing::Pdus { pdus, finishes });
    }

    fn execute(&self, cmd: ScsiCommand, permit: tokio::sync::OwnedSemaphorePermit) {
        let (done_tx, done_rx) = watch::channel(false);
        let ctl = Arc::new(TaskCtl {
            aborted: AtomicBool::new(false),
            done: done_rx,
        });
        lock_tasks(&self.tasks).insert(cmd.itt, Arc::clone(&ctl));
        self.window.active.fetch_add(1, Ordering::AcqRel);
        let target = self.target.clone();
        let nexus = self.nexus.clone();
        let tx = self.tx.clone();
        let tasks = Arc::clone(&self.tasks);
        let params = *self.ff.params();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match (&target, decode_lun(cmd.lun_raw)) {
                (Some(t), Some(0)) => t.lun.execute(&nexus, &cmd.cdb, cmd.data.clone()).await,
                _ => missing_lun(&cmd.cdb),
            };
            let pdus = if ctl.aborted.load(Ordering::Acquire) {
                Vec::new()
            } else {
                scsi_response_pdus(&cmd, &result, &params)
            };
            let _ = tx.send(Outgoing::Pdus { pdus, finishes: 1 });
            {
                let mut t = lock_tasks(&tasks);
                if t.get(&cmd.itt).is_some_and(|c| Arc::ptr_eq(c, &ctl)) {
                    t.remove(&cmd.itt);
                }
            }
            let _ = done_tx.send(true);
        });
    }

    /// Wait until every running command has finished.
    async fn wait_all(&self) {
        let ctls: Vec<Arc<TaskCtl>> = lock_tasks(&self.tasks).values().cloned().collect();
        for c in ctls {
            let mut rx = c.done.clone();
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    fn task_management(&mut self, req: TmfRequest) {
        let tasks = Arc::clone(&self.tasks);
        let tx = self.tx.clone();
        let target = self.target.clone();
        let nexus = self.nexus.clone();
        let exp = self.ff.exp_cmd_sn();
        let lun_ok = decode_lun(req.lun_raw) == Some(0) && target.is_some();
        tokio::spawn(async move {
            let abort = |ctls: Vec<Arc<TaskCtl>>| async move {
                for c in &ctls {
                    c.aborted.store(true, Ordering::Release);
                }
                for c in ctls {
                    let mut rx = c.done.clone();
                    let _ = rx.wait_for(|d| *d).await;
                }
            };
            let response = match req.function {
                tmf::ABORT_TASK => {
                    let ctl = lock_tasks(&tasks).get(&req.referenced_itt).cloned();
                    match ctl {
                        Some(c) => {
                            abort(vec![c]).await;
                            tmf_response::FUNCTION_COMPLETE
                        }
                        None if sn_lt(req.ref_cmd_sn, exp)
                            && !sn_lt(req.ref_cmd_sn, req.cmd_sn) =>
                        {
                            tmf_response::FUNCTION_COMPLETE
                        }
                        None => tmf_response::TASK_DOES_NOT_EXIST,
                    }
                }
                tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                    if lun_ok {
                        let all: Vec<Arc<TaskCtl>> = lock_tasks(&tasks).values().cloned().collect();
                        abort(all).await;
                        tmf_response::FUNCTION_COMPLETE
                    } else {
                        tmf_response::LUN_DOES_NOT_EXIST
                    }
                }
                tmf::LOGICAL_UNIT_RESET | tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                    if req.function == tmf::LOGICAL_UNIT_RESET && !lun_ok {
                        tmf_response::LUN_DOES_NOT_EXIST
                    } else {
                        let all: Vec<Arc<TaskCtl>> = lock_tasks(&tasks).values().cloned().collect();
                        abort(all).await;
                        if let Some(t) = &target {
                            t.lun.reset(Some(&nexus));
                        }
                        tmf_response::FUNCTION_COMPLETE
                    }
                }
                _ => tmf_response::NOT_SUPPORTED,
            };
            let mut r = Pdu::new(op::TASK_MGMT_RESPONSE);
            r.bhs[2] = response;
            r.set_itt(req.itt);
            let _ = tx.send(Outgoing::Pdus {
                pdus: vec![r],
                finishes: 0,
            });
            if req.function == tmf::TARGET_COLD_RESET {
                let _ = tx.send(Outgoing::Close);
            }
        });
    }
}

/// PDUs whose payload is at most this large are copied into the batch buffer.
const COPY_MAX: usize = 64 << 10;
/// Write the batch buffer once it holds this much.
const BATCH_MAX: usize = 1 << 20;

/// The single writer of a connection.
async fn write_pdus<W>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    codec: PduCodec,
    mut seq: StatusSequencer,
    window: Arc<Window>,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(COPY_MAX * 2);
    let mut failed: Option<std::io::Error> = None;
    let mut closing = false;
    while let Some(first) = rx.recv().await {
        if failed.is_some() || closing {
            if let Outgoing::Pdus { finishes, .. } = first {
                window.active.fetch_sub(finishes, Ordering::AcqRel);
            }
            continue;
        }
        let mut next = Some(first);
        let res: std::io::Result<()> = async {
            while let Some(msg) = next.take() {
                match msg {
                    Outgoing::Close => {
                        closing = true;
                        break;
                    }
                    Outgoing::Pdus { mut pdus, finishes } => {
                        if finishes > 0 {
                            window.active.fetch_sub(finishes, Ordering::AcqRel);
                        }
                        for p in pdus.iter_mut() {
                            let exp = window.exp_cmd_sn.load(Ordering::Acquire);
                            seq.stamp(p, exp, window.room());
                            codec.encode_header(p, &mut out);
                            if p.data.len() <= COPY_MAX {
                                out.extend_from_slice(&p.data);
                            } else {
                                wr.write_all(&out).await?;
                                out.clear();
                                wr.write_all(&p.data).await?;
                            }
                            codec.encode_data_trailer(&p.data, &mut out);
                            if out.len() >= BATCH_MAX {
                                wr.write_all(&out).await?;
                                out.clear();
                            }
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            if !out.is_empty() {
                wr.write_all(&out).await?;
                out.clear();
            }
            wr.flush().await
        }
        .await;
        if let Err(e) = res {
            out.clear();
            failed = Some(e);
        }
        if closing {
            let _ = wr.shutdown().await;
            // Keep draining so counters stay right; nothing more is written.
        }
    }
    match failed {
        Some(e) => Err(e),
        None => {
            let _ = wr.shutdown().await;
            Ok(())
        }
    }
}
