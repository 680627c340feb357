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
//! module and `driver` (the full feature phase of one connection) only
//! carry them out on the sockets.
//!
//! Connections are accepted by the loop both frontends share
//! ([`corral_block::accept`]). Shutdown: when the [`Shutdown`] token is
//! cancelled the server stops accepting, connections stop reading, in-flight commands finish and
//! their responses are written (for at most
//! [`ServerConfig::shutdown_grace`]), then sockets close.

mod driver;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use corral_block::BlockDevice;
use corral_block::accept::{Shutdown, serve_connections};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::connection::FullFeature;
use crate::login::{
    ChapConfig, Limits, LoginConfig, LoginNegotiation, LoginStep, SessionType, TargetEntry,
};
use crate::pdu::{Digests, Pdu, PduCodec, PduError};
use crate::reservation::Nexus;
use crate::scsi::{LunIdentity, ScsiLun};
use crate::session::{Keepalive, SessionRegistry};

use self::driver::ConnectionDriver;

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
    #[error("target {target}: restoring persistent reservations: {reason}")]
    Reservations { target: String, reason: String },
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
        // Reservations saved by an earlier engine, before any initiator
        // can send a command.
        for t in &self.targets {
            t.lun
                .restore_reservations()
                .await
                .map_err(|reason| IscsiError::Reservations {
                    target: t.name.clone(),
                    reason,
                })?;
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
