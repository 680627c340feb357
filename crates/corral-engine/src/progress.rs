//! The progress of a rebuild, as the control service and the metrics see
//! it: what it walks, how far it has come, how it ended; and of the
//! snapshot replay that comes before a returning replica's rebuild.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corral_proto::v1 as pb;

use crate::members::RebuildKind;

/// Where a rebuild is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebuildState {
    Running,
    Done,
    Failed,
}

impl RebuildState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RebuildState::Running => "running",
            RebuildState::Done => "done",
            RebuildState::Failed => "failed",
        }
    }
}

/// Progress of one rebuild, shared with the status RPCs.
#[derive(Debug)]
pub struct RebuildProgress {
    pub address: String,
    pub kind: RebuildKind,
    pub total_bytes: AtomicU64,
    pub done_bytes: AtomicU64,
    pub copied_bytes: AtomicU64,
    pub skipped_bytes: AtomicU64,
    started: Instant,
    outcome: Mutex<Option<(Duration, Result<(), String>)>>,
}

impl RebuildProgress {
    pub fn new(address: &str, kind: RebuildKind) -> Self {
        RebuildProgress {
            address: address.to_string(),
            kind,
            total_bytes: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            skipped_bytes: AtomicU64::new(0),
            started: Instant::now(),
            outcome: Mutex::new(None),
        }
    }

    /// The rebuild ended: how.
    pub fn finish(&self, result: Result<(), String>) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((self.started.elapsed(), result));
    }

    /// True while the copier runs.
    pub fn running(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// For `corral volume rebuild-status` and `info`.
    pub fn to_pb(&self) -> pb::RebuildStatus {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let total = self.total_bytes.load(Ordering::Relaxed);
        let done = self.done_bytes.load(Ordering::Relaxed);
        let (state, elapsed, error) = match outcome {
            None => (RebuildState::Running, self.started.elapsed(), String::new()),
            Some((d, Ok(()))) => (RebuildState::Done, d, String::new()),
            Some((d, Err(e))) => (RebuildState::Failed, d, e),
        };
        let eta_ms = if state == RebuildState::Running && done > 0 && total > done {
            let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
            ((total - done) as f64 / rate * 1000.0) as u64
        } else {
            0
        };
        pb::RebuildStatus {
            address: self.address.clone(),
            kind: self.kind.as_str().to_string(),
            state: state.as_str().to_string(),
            total_bytes: total,
            done_bytes: done,
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
            skipped_bytes: self.skipped_bytes.load(Ordering::Relaxed),
            elapsed_ms: elapsed.as_millis() as u64,
            eta_ms,
            error,
            ..Default::default()
        }
    }
}

/// The replay of the snapshots a returning replica lacks
/// ([`crate::chain_sync::reconcile`]), shown with the rebuilds while it
/// runs (kind "snapshot replay").
#[derive(Debug)]
pub struct ReplayProgress {
    pub address: String,
    pub snapshots_total: u32,
    pub snapshots_done: AtomicU32,
    pub compared_bytes: AtomicU64,
    pub copied_bytes: AtomicU64,
    current: Mutex<String>,
    started: Instant,
}

impl ReplayProgress {
    pub fn new(address: &str, snapshots_total: usize) -> Self {
        ReplayProgress {
            address: address.to_string(),
            snapshots_total: u32::try_from(snapshots_total).unwrap_or(u32::MAX),
            snapshots_done: AtomicU32::new(0),
            compared_bytes: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            current: Mutex::new(String::new()),
            started: Instant::now(),
        }
    }

    /// Snapshot `name` is being replayed now.
    pub fn replaying(&self, name: &str) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
    }

    /// The snapshot being replayed is done: `compared` bytes were compared,
    /// `copied` of them sent.
    pub fn replayed(&self, compared: u64, copied: u64) {
        self.compared_bytes.fetch_add(compared, Ordering::Relaxed);
        self.copied_bytes.fetch_add(copied, Ordering::Relaxed);
        self.snapshots_done.fetch_add(1, Ordering::Relaxed);
    }

    /// For `corral volume rebuild-status` and `info`.
    pub fn to_pb(&self) -> pb::RebuildStatus {
        let compared = self.compared_bytes.load(Ordering::Relaxed);
        let copied = self.copied_bytes.load(Ordering::Relaxed);
        pb::RebuildStatus {
            address: self.address.clone(),
            kind: "snapshot replay".to_string(),
            state: RebuildState::Running.as_str().to_string(),
            total_bytes: 0,
            done_bytes: compared,
            copied_bytes: copied,
            skipped_bytes: compared.saturating_sub(copied),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            eta_ms: 0,
            error: String::new(),
            snapshots_total: self.snapshots_total,
            snapshots_done: self.snapshots_done.load(Ordering::Relaxed),
            snapshot: self
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}
