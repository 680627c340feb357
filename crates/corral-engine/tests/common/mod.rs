//! The engine's test harness: replica daemons served in-process on
//! 127.0.0.1 (the real gRPC services over real stores in a temporary
//! directory, no child processes), which a test can stop, restart on the
//! same address, or wipe — and a bounded wait.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_engine::open::open_volume;
use corral_engine::{EngineConfig, Volume};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One in-process replica daemon.
pub struct TestReplica {
    pub addr: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl TestReplica {
    /// A daemon on a free port with an empty data directory.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr").to_string();
        let mut r = TestReplica {
            addr,
            stop: CancellationToken::new(),
            task: None,
            dir,
        };
        r.serve(listener);
        r
    }

    fn serve(&mut self, listener: TcpListener) {
        let path = self.dir.path().to_path_buf();
        self.stop = CancellationToken::new();
        let stop = self.stop.clone();
        self.task = Some(tokio::spawn(async move {
            corral_replica::serve_listener(listener, path, stop)
                .await
                .expect("replica daemon");
        }));
    }

    /// The daemon's data directory (a volume's store is `<dir>/<volume>`).
    #[allow(dead_code)]
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stop the daemon (its streams end, its port closes).
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("replica daemon stops within 10 s")
                .expect("replica daemon task");
        }
    }

    /// Start the stopped daemon again on the same address and data dir.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(&self.addr).await.expect("rebind");
        self.serve(listener);
    }

    /// Stop, lose every file, come back empty at the same address.
    pub async fn wipe(&mut self) {
        self.stop().await;
        for entry in std::fs::read_dir(self.dir.path()).expect("data dir") {
            std::fs::remove_dir_all(entry.expect("entry").path()).expect("wipe");
        }
        self.restart().await;
    }

    /// The daemon's data directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// An 8 MiB volume "vol" over `reps`: 64 KiB chunks, a 3 s replica
/// timeout, returns retried every 200 ms.
pub fn config(reps: &[TestReplica]) -> EngineConfig {
    let mut cfg = EngineConfig::new(
        "vol",
        8 << 20,
        reps.iter().map(|r| r.addr.clone()).collect(),
    );
    cfg.replica_timeout = Duration::from_secs(3);
    cfg.chunk_size = 64 << 10;
    cfg.retry_interval = Duration::from_millis(200);
    cfg
}

/// Open the volume and run its supervisor until the returned guard is
/// dropped.
pub async fn start(cfg: &EngineConfig) -> (Arc<Volume>, tokio_util::sync::DropGuard) {
    let volume = open_volume(cfg, None).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(corral_engine::supervisor::run(
        Arc::clone(&volume),
        corral_engine::supervisor::SupervisorConfig::of(cfg),
        stop.clone(),
    ));
    (volume, stop.drop_guard())
}

/// `n` daemons.
pub async fn replicas(n: usize) -> Vec<TestReplica> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(TestReplica::start().await);
    }
    v
}

/// Poll `check` every 20 ms until it holds, at most `limit`; panics with
/// `what` (and what `explain` says) otherwise.
pub async fn wait_until(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}: {}",
            explain()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
