//! The engine of one volume as a library: [`Engine::start`] takes its
//! configuration, its bound listeners and the frontends to serve it with,
//! and returns an [`EngineHandle`] — status, a shutdown that stops
//! everything in order, and a wait. `corral engine` and `corral dev` only
//! parse flags and call this; a node daemon can start engines the same way.
//!
//! The lifecycle, in order:
//! 1. the control service answers at once (while the volume cannot be opened
//!    yet, `corral volume info` says why, and `salvage` can help);
//! 2. the volume is opened, retried every half second until
//!    [`EngineOptions::open_timeout`] (see [`crate::open`]);
//! 3. the supervisor and the idle flusher start, then the frontends serve a
//!    [`Metered`] view of the volume;
//! 4. on shutdown the frontends stop accepting and finish what is in flight,
//!    the background tasks stop, the volume is flushed, and the replica
//!    connections are closed.
//!
//! Shutdown is one [`CancellationToken`], level-triggered: a cancellation
//! at any moment — before the volume opens, while it opens, while it serves
//! — is seen by every part, also by one that starts later.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_block::BlockDevice;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::EngineConfig;
use crate::control::{EngineState, serve_control};
use crate::error::{EngineError, OpenWait};
use crate::metrics::{EngineMetrics, Metered};
use crate::open::open_volume;
use crate::volume::Volume;

/// What the engine serves its volume to clients with: NBD, iSCSI… The
/// engine knows no frontend protocol; the caller brings them.
pub trait Frontends: Send + 'static {
    /// Start serving `volume` until `stop` is cancelled.
    fn serve(
        self: Box<Self>,
        volume: Arc<Metered<Volume>>,
        stop: CancellationToken,
    ) -> Result<ServingFrontends, EngineError>;
}

/// Frontends that serve: the addresses they serve on, and a future that
/// completes once every one of them has stopped (with the errors they
/// stopped with).
pub struct ServingFrontends {
    pub uris: Vec<String>,
    pub stopped: BoxFuture<'static, Vec<String>>,
}

/// No frontend: the volume is served only through the control service
/// (tests, and an engine started only to rebuild).
pub struct NoFrontends;

impl Frontends for NoFrontends {
    fn serve(
        self: Box<Self>,
        _volume: Arc<Metered<Volume>>,
        stop: CancellationToken,
    ) -> Result<ServingFrontends, EngineError> {
        Ok(ServingFrontends {
            uris: Vec::new(),
            stopped: Box::pin(async move {
                stop.cancelled().await;
                Vec::new()
            }),
        })
    }
}

/// Everything [`Engine::start`] needs besides the frontends.
pub struct EngineOptions {
    pub config: EngineConfig,
    /// The control service's listener (bound by the caller, so that a busy
    /// port is its error to report before anything starts).
    pub control: TcpListener,
    /// Serve Prometheus metrics on this listener.
    pub metrics: Option<TcpListener>,
    /// Give up opening the volume after this long.
    pub open_timeout: Duration,
    /// How long the volume must stay without writes before each of the two
    /// idle flushes (see [`crate::supervisor::flush_when_idle`]).
    pub idle_flush_period: Duration,
    /// Serve the control service over mutual TLS (the channels to the
    /// replicas follow the process's `corral_client::use_tls`).
    pub control_tls: Option<corral_tls::ServerTls>,
}

impl EngineOptions {
    /// Options with the command line's defaults.
    pub fn new(config: EngineConfig, control: TcpListener) -> Self {
        EngineOptions {
            config,
            control,
            metrics: None,
            open_timeout: Duration::from_secs(60),
            idle_flush_period: Duration::from_secs(3),
            control_tls: None,
        }
    }
}

/// A volume's engine.
pub struct Engine;

/// A running engine.
pub struct EngineHandle {
    state: Arc<EngineState>,
    control: Option<SocketAddr>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), EngineError>>,
}

/// An engine's state in one word, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineStatus {
    /// Waiting to open the volume, and for what.
    Opening(String),
    /// Serving on these frontends.
    Serving { frontends: String },
}

impl Engine {
    /// Start the engine; it runs until `stop` is cancelled (or
    /// [`EngineHandle::shutdown`]), or until it cannot open the volume.
    pub fn start(
        options: EngineOptions,
        frontends: Box<dyn Frontends>,
        stop: CancellationToken,
    ) -> EngineHandle {
        let state = EngineState::new(options.config.clone());
        let control = options.control.local_addr().ok();
        let task = tokio::spawn(run(options, frontends, Arc::clone(&state), stop.clone()));
        EngineHandle {
            state,
            control,
            stop,
            task,
        }
    }
}

impl EngineHandle {
    /// What the control service knows: the volume once open, why not yet.
    pub fn state(&self) -> &Arc<EngineState> {
        &self.state
    }

    /// The control service's address.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control
    }

    pub fn status(&self) -> EngineStatus {
        match self.state.volume() {
            Some(_) => EngineStatus::Serving {
                frontends: self.state.frontends(),
            },
            None => EngineStatus::Opening(self.state.waiting_for()),
        }
    }

    /// Stop: frontends drain, background tasks end, the volume is flushed.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Wait until the engine has stopped.
    pub async fn wait(self) -> Result<(), EngineError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(EngineError::Task(e.to_string())),
        }
    }

    /// [`EngineHandle::shutdown`], then [`EngineHandle::wait`].
    pub async fn stop(self) -> Result<(), EngineError> {
        self.shutdown();
        self.wait().await
    }
}

async fn run(
    options: EngineOptions,
    frontends: Box<dyn Frontends>,
    state: Arc<EngineState>,
    stop: CancellationToken,
) -> Result<(), EngineError> {
    let EngineOptions {
        config,
        control,
        metrics,
        open_timeout,
        idle_flush_period,
        control_tls,
    } = options;
    let control_task = tokio::spawn(serve_control(
        control,
        control_tls,
        Arc::clone(&state),
        stop.clone(),
    ));

    let mut registry = corral_metrics::Registry::default();
    let engine_metrics = EngineMetrics::register(&mut registry);
    if let Some(listener) = metrics {
        let refreshed = engine_metrics.clone();
        let seen = Arc::clone(&state);
        let exporter = corral_metrics::Exporter::new(registry, move || {
            if let Some(v) = seen.volume() {
                refreshed.refresh(v);
            }
        });
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = corral_metrics::serve(listener, exporter, stop).await {
                warn!(error = %e, "metrics endpoint stopped");
            }
        });
    }

    let volume = tokio::select! {
        v = open_with_retry(&config, &state, open_timeout) => v,
        _ = stop.cancelled() => {
            info!(volume = %config.volume, "stopped before the volume opened");
            return finish_control(control_task).await;
        }
    };
    let volume = match volume {
        Ok(v) => v,
        Err(e) => {
            stop.cancel();
            let _ = finish_control(control_task).await;
            return Err(e);
        }
    };
    state.set_volume(Arc::clone(&volume));
    let supervisor = tokio::spawn(crate::supervisor::run(
        Arc::clone(&volume),
        crate::supervisor::SupervisorConfig::of(&config),
        stop.clone(),
    ));
    let filler = volume.clone_filling().map(|fill| {
        tokio::spawn(crate::clone::run_filler(
            Arc::clone(&volume),
            Arc::clone(fill),
            config.retry_interval,
            stop.clone(),
        ))
    });
    // A restore serves once it is filled, unless asked to serve at once.
    let wait_for_fill = config
        .restore
        .as_ref()
        .is_some_and(|r| !r.serve_while_filling)
        && volume.clone_filling().is_some_and(|f| f.is_restore());
    let filler = match filler {
        Some(task) if wait_for_fill => {
            info!(volume = %config.volume, "restoring: the frontends start once the volume is filled (--serve-while-filling serves at once)");
            tokio::select! {
                _ = task => {}
                _ = stop.cancelled() => {}
            }
            None
        }
        other => other,
    };
    let idle_flush = tokio::spawn(crate::supervisor::flush_when_idle(
        Arc::clone(&volume),
        idle_flush_period,
        stop.clone(),
    ));

    let metered = Arc::new(Metered::new(Arc::clone(&volume), engine_metrics));
    let served = frontends.serve(metered, stop.clone());
    let errors = match served {
        Ok(serving) => {
            let uris = serving.uris.join(" ");
            info!(volume = %config.volume, size = volume.size(), frontends = %uris, "engine serving");
            state.set_frontends(uris);
            serving.stopped.await
        }
        Err(e) => {
            stop.cancel();
            vec![e.to_string()]
        }
    };
    for e in &errors {
        warn!(error = %e, "frontend stopped with an error");
    }
    let control_result = finish_control(control_task).await;
    let _ = supervisor.await;
    let _ = idle_flush.await;
    if let Some(filler) = filler {
        let _ = filler.await;
    }
    // Make everything acknowledged durable before leaving.
    if let Err(e) = volume.flush_replicas().await {
        warn!(error = %e, "final flush failed");
    }
    volume.replica_set().shutdown();
    info!(volume = %config.volume, "engine stopped");
    control_result?;
    match errors.into_iter().next() {
        Some(e) => Err(EngineError::Frontend(e)),
        None => Ok(()),
    }
}

async fn finish_control(task: JoinHandle<Result<(), EngineError>>) -> Result<(), EngineError> {
    match task.await {
        Ok(result) => result,
        Err(e) => Err(EngineError::Task(e.to_string())),
    }
}

/// Open the volume, retrying every half second while it cannot be opened
/// yet (replicas unreachable, waiting for a member), up to `limit`. A new
/// reason to wait is logged once.
async fn open_with_retry(
    cfg: &EngineConfig,
    state: &EngineState,
    limit: Duration,
) -> Result<Arc<Volume>, EngineError> {
    let start = Instant::now();
    let mut last: Option<OpenWait> = None;
    loop {
        let trust = state.salvage_target();
        match open_volume(cfg, trust.as_deref()).await {
            Ok(v) => return Ok(v),
            Err(EngineError::Open { volume, wait }) => {
                if last.as_ref() != Some(&wait) {
                    warn!(volume = %volume, reason = %wait, "cannot open the volume yet; retrying");
                    state.set_waiting_for(&wait.to_string());
                    last = Some(wait.clone());
                }
                if start.elapsed() >= limit {
                    return Err(EngineError::OpenTimedOut {
                        volume,
                        after: limit,
                        wait,
                    });
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(other) => return Err(other),
        }
    }
}
