//! The engine as a library: started from a config, stopped by one
//! cancellation at any moment of its life, over in-process replica daemons.

use std::time::Duration;

use corral_engine::{Engine, EngineConfig, EngineOptions, EngineStatus, engine::NoFrontends};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod common;
use common::{replicas, wait_until};

async fn options(replicas: Vec<String>) -> EngineOptions {
    let mut cfg = EngineConfig::new("vol", 4 << 20, replicas);
    cfg.replica_timeout = Duration::from_secs(2);
    cfg.chunk_size = 64 << 10;
    let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut options = EngineOptions::new(cfg, control);
    options.open_timeout = Duration::from_secs(120);
    options
}

async fn stops_in_time(engine: corral_engine::EngineHandle) {
    engine.shutdown();
    tokio::time::timeout(Duration::from_secs(10), engine.wait())
        .await
        .expect("the engine stops within 10 s")
        .expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_serves_until_stopped_and_then_flushes() {
    let reps = replicas(3).await;
    let stop = CancellationToken::new();
    let engine = Engine::start(
        options(reps.iter().map(|r| r.addr.clone()).collect()).await,
        Box::new(NoFrontends),
        stop.clone(),
    );
    let state = std::sync::Arc::clone(engine.state());
    wait_until(
        Duration::from_secs(30),
        "the volume to open",
        || state.volume().is_some(),
        || state.waiting_for(),
    )
    .await;
    assert!(matches!(engine.status(), EngineStatus::Serving { .. }));
    stops_in_time(engine).await;
    assert!(stop.is_cancelled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_waiting_for_its_replicas_stops_when_told() {
    // Nothing listens on these ports: the engine waits, retrying.
    let mut nowhere = Vec::new();
    for _ in 0..3 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        nowhere.push(l.local_addr().unwrap().to_string());
    }
    let engine = Engine::start(
        options(nowhere).await,
        Box::new(NoFrontends),
        CancellationToken::new(),
    );
    let state = std::sync::Arc::clone(engine.state());
    wait_until(
        Duration::from_secs(10),
        "a reason to wait",
        || state.waiting_for().contains("no replica daemon reachable"),
        || state.waiting_for(),
    )
    .await;
    assert!(matches!(engine.status(), EngineStatus::Opening(_)));
    stops_in_time(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_before_the_engine_starts_is_not_lost() {
    let reps = replicas(1).await;
    let stop = CancellationToken::new();
    stop.cancel();
    let engine = Engine::start(
        options(vec![reps[0].addr.clone()]).await,
        Box::new(NoFrontends),
        stop,
    );
    tokio::time::timeout(Duration::from_secs(10), engine.wait())
        .await
        .expect("returns at once")
        .expect("a clean stop");
}
