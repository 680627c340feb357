//! The gRPC floor and the gap (issue 13, item 1).
//!
//! **The floor.** One process runs three in-process tonic servers on
//! 127.0.0.1 that implement `corral.v1.ReplicaData/Stream` and store
//! nothing: for every `DataRequestBatch` they answer one `DataReplyBatch`
//! with a `Done` reply per request, carrying the request's id (what the
//! replica answers a successful write). A client shaped like the engine's
//! fan-out (`corral_engine::client`) drives them: `qd` caller tasks, one
//! task per replica stream that batches queued requests (≤ 32 per batch,
//! ids assigned by the stream task, replies matched through a map), and a
//! oneshot per request. A "replicated write" sends a 4 KiB `WriteOp` (with
//! its CRC32C, computed once) to all three replicas and completes when all
//! three have answered. Channels use the engine's endpoint settings
//! (`corral_client::connect`); servers the replica daemon's windows and
//! frame size. The client runs on its own runtime (one worker, like the
//! engine's default `--io-threads 1`), each server on its own one-worker
//! runtime (like three replica daemons started with `--io-threads 1`), all
//! with named threads; CPU is read per thread from
//! `/proc/self/task/*/stat` (utime + stime) before and after a
//! fixed-duration window that follows a one-second warm-up.
//!
//! **The gap.** In the same run, three real replica daemons and an engine
//! (NBD) are started through the test fixture, the volume is written once
//! (1 MiB sequential, so random writes land on allocated, already-marked
//! regions as in the fio matrix), then fio runs 4 KiB random writes
//! (time-based, the same seconds) at each queue depth. The CPU time
//! (utime + stime from `/proc/PID/stat`) of the engine and of each daemon
//! during fio is divided by the writes fio issued.
//!
//! Both parts print µs of CPU per replicated write; the table's last
//! column is engine ÷ floor caller, the gap issue 13 asks to close. With
//! `--perf`, the engine and one replica daemon are also profiled during
//! the first queue depth's run, and their µs per write are split by stage
//! (`crate::stages`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use corral_proto::v1::replica_data_client::ReplicaDataClient;
use corral_proto::v1::replica_data_server::{ReplicaData, ReplicaDataServer};
use corral_proto::v1::{
    DataReply, DataReplyBatch, DataRequest, DataRequestBatch, Done, WriteOp, data_reply,
    data_request,
};
use corral_tests::tools::fio_nbd;
use corral_tests::{Cluster, EngineSpec};

use crate::stages::{self, Profile};
use futures::Stream;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnboundedReceiverStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// Seconds each measurement runs (floor and fio alike).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queue depths to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [32u32, 8, 1])]
    qd: Vec<u32>,
    /// Streams per replica in the floor's client (the engine's
    /// `--streams-per-replica` defaults to 1, as does this).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Size of the real volume, in MiB (the fio matrix uses 1024).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Only the floor (no replica daemons, no engine, no fio).
    #[arg(long)]
    floor_only: bool,
    /// The engine's `--streams-per-replica` (its default when not given).
    #[arg(long)]
    engine_streams: Option<usize>,
    /// Also record `perf` on the engine and on one replica daemon during
    /// the first queue depth's fio run, and print their CPU per write split
    /// by stage.
    #[arg(long)]
    perf: bool,
}

/// The payload of every write, in bytes.
const WRITE_BYTES: usize = 4096;
/// Writes are spread over this many 4 KiB blocks (a 1 GiB volume).
const BLOCKS: u64 = 1 << 18;
/// The engine's chunk (requests of one chunk share a stream).
const CHUNK_BYTES: u64 = 256 << 10;
/// The replica daemon's HTTP/2 settings (`corral_replica::server`).
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
const MAX_FRAME: u32 = (1 << 20) - 1;
/// Reply batches queued per stream on the server (as `corral_replica::data`).
const REPLY_QUEUE: usize = 16;
/// Thread-name prefixes, by which CPU is attributed.
const CLIENT_THREADS: &str = "floor-cli";
const SERVER_THREADS: &str = "floor-srv";

// ---------------------------------------------------------------- servers

/// `ReplicaData` that stores nothing: a `Done` per request.
struct NullReplica;

type ReplyStream = Pin<Box<dyn Stream<Item = Result<DataReplyBatch, Status>> + Send>>;

#[tonic::async_trait]
impl ReplicaData for NullReplica {
    type StreamStream = ReplyStream;

    async fn stream(
        &self,
        request: Request<Streaming<DataRequestBatch>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        if request
            .metadata()
            .get(corral_proto::VOLUME_METADATA_KEY)
            .is_none()
        {
            return Err(Status::invalid_argument("no volume metadata"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DataReplyBatch, Status>>(REPLY_QUEUE);
        // The same shape as the replica's stream: a task reads batches and
        // queues one reply batch for each.
        tokio::spawn(async move {
            while let Ok(Some(batch)) = inbound.message().await {
                let replies = batch
                    .requests
                    .iter()
                    .map(|r| DataReply {
                        id: r.id,
                        result: Some(data_reply::Result::Done(Done {})),
                    })
                    .collect();
                if tx.send(Ok(DataReplyBatch { replies })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn runtime(name: &str) -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("runtime {name}"))
}

/// Start a null replica on its own runtime; returns the runtime and address.
fn start_server(i: usize) -> Result<(Runtime, String)> {
    let rt = runtime(&format!("{SERVER_THREADS}{i}"))?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            // The replica sets TCP_NODELAY on the sockets it hands to tonic.
            let _ = s.set_nodelay(true);
        }
        s
    });
    rt.spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(
                ReplicaDataServer::new(NullReplica)
                    .max_decoding_message_size(corral_proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(corral_proto::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(incoming),
    );
    Ok((rt, addr))
}

// ---------------------------------------------------------------- client

struct Pending {
    request: DataRequest,
    reply: oneshot::Sender<()>,
}

/// Drive one stream like `corral_engine::client::run_stream`: batch queued
/// requests out (≤ 32, ids assigned here), match replies in by id.
async fn run_stream(
    mut client: ReplicaDataClient<Channel>,
    mut queue: mpsc::UnboundedReceiver<Pending>,
) -> Result<()> {
    let (out, out_rx) = mpsc::unbounded_channel::<DataRequestBatch>();
    let mut request = Request::new(UnboundedReceiverStream::new(out_rx));
    request
        .metadata_mut()
        .insert(corral_proto::VOLUME_METADATA_KEY, "floor".parse()?);
    let mut inbound = client.stream(request).await?.into_inner();
    let mut waiting: HashMap<u64, oneshot::Sender<()>> = HashMap::new();
    let mut next_id: u64 = 1;
    loop {
        tokio::select! {
            pending = queue.recv() => {
                let Some(first) = pending else { return Ok(()) };
                let mut batch = Vec::with_capacity(corral_proto::MAX_BATCH_REQUESTS);
                let mut bytes = 0;
                let mut add = |p: Pending, batch: &mut Vec<DataRequest>, bytes: &mut usize| {
                    let mut request = p.request;
                    request.id = next_id;
                    next_id += 1;
                    *bytes += WRITE_BYTES;
                    waiting.insert(request.id, p.reply);
                    batch.push(request);
                };
                add(first, &mut batch, &mut bytes);
                while batch.len() < corral_proto::MAX_BATCH_REQUESTS
                    && bytes < corral_proto::MAX_BATCH_BYTES
                {
                    match queue.try_recv() {
                        Ok(p) => add(p, &mut batch, &mut bytes),
                        Err(_) => break,
                    }
                }
                if out.send(DataRequestBatch { requests: batch }).is_err() {
                    bail!("request stream closed");
                }
            }
            reply = inbound.message() => match reply? {
                Some(replies) => {
                    for reply in replies.replies {
                        if !matches!(reply.result, Some(data_reply::Result::Done(_))) {
                            bail!("reply {} is not Done", reply.id);
                        }
                        if let Some(tx) = waiting.remove(&reply.id) {
                            let _ = tx.send(());
                        }
                    }
                }
                None => bail!("server closed the stream"),
            }
        }
    }
}

/// One caller: replicated writes one after another until `stop`.
async fn caller(
    index: u64,
    replicas: Arc<Vec<Vec<mpsc::UnboundedSender<Pending>>>>,
    payload: Bytes,
    crc32c: u32,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Result<()> {
    // A cheap deterministic walk over the volume's blocks.
    let mut block = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) % BLOCKS;
    while !stop.load(Ordering::Relaxed) {
        block = (block
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
            % BLOCKS;
        let offset = block * WRITE_BYTES as u64;
        let chunk = offset / CHUNK_BYTES;
        let mut replies = Vec::with_capacity(replicas.len());
        for streams in replicas.iter() {
            let (tx, rx) = oneshot::channel();
            let request = DataRequest {
                id: 0,
                epoch: 1,
                op: Some(data_request::Op::Write(WriteOp {
                    offset,
                    data: payload.clone(),
                    crc32c,
                    fua: false,
                    ..Default::default()
                })),
            };
            let stream = &streams[(chunk % streams.len() as u64) as usize];
            if stream.send(Pending { request, reply: tx }).is_err() {
                bail!("stream task ended");
            }
            replies.push(rx);
        }
        for rx in replies {
            rx.await.context("stream task dropped a request")?;
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

// ---------------------------------------------------------------- CPU

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// (command, utime + stime in clock ticks) from a `/proc/.../stat` text.
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let (comm, rest) = stat[open + 1..].rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 0, utime 11, stime 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm.to_string(), utime + stime))
}

/// CPU seconds of a process.
pub(crate) fn process_cpu_s(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    let (_, ticks) = parse_stat(&stat).with_context(|| format!("parse /proc/{pid}/stat"))?;
    Ok(ticks as f64 / clock_ticks_per_s())
}

/// CPU seconds of this process's threads: (client, servers, other).
fn thread_cpu_s() -> Result<(f64, f64, f64)> {
    let (mut client, mut server, mut other) = (0u64, 0u64, 0u64);
    for entry in std::fs::read_dir("/proc/self/task").context("/proc/self/task")? {
        let path = entry?.path().join("stat");
        // A thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (comm, ticks) = parse_stat(&stat).with_context(|| format!("parse {path:?}"))?;
        if comm.starts_with(CLIENT_THREADS) {
            client += ticks;
        } else if comm.starts_with(SERVER_THREADS) {
            server += ticks;
        } else {
            other += ticks;
        }
    }
    let hz = clock_ticks_per_s();
    Ok((client as f64 / hz, server as f64 / hz, other as f64 / hz))
}

// ---------------------------------------------------------------- runs

struct FloorSample {
    qd: u32,
    writes_per_s: f64,
    client_us: f64,
    server_us: f64,
    other_us: f64,
}

struct Floor {
    // Field order is drop order: the client runtime goes first.
    client_rt: Runtime,
    replicas: Arc<Vec<Vec<mpsc::UnboundedSender<Pending>>>>,
    _servers: Vec<Runtime>,
}

impl Floor {
    fn start(streams: usize) -> Result<Self> {
        let mut servers = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..3 {
            let (rt, addr) = start_server(i)?;
            servers.push(rt);
            addrs.push(addr);
        }
        let client_rt = runtime(CLIENT_THREADS)?;
        let mut replicas = Vec::new();
        for addr in &addrs {
            let mut queues = Vec::new();
            for _ in 0..streams.max(1) {
                let channel = client_rt
                    .block_on(corral_client::connect(addr, Duration::from_secs(5)))
                    .with_context(|| format!("connect {addr}"))?;
                let client = ReplicaDataClient::new(channel)
                    .max_decoding_message_size(corral_proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(corral_proto::MAX_MESSAGE_BYTES);
                let (tx, rx) = mpsc::unbounded_channel();
                client_rt.spawn(async move {
                    if let Err(e) = run_stream(client, rx).await {
                        eprintln!("floor: stream ended: {e:#}");
                    }
                });
                queues.push(tx);
            }
            replicas.push(queues);
        }
        Ok(Floor {
            client_rt,
            replicas: Arc::new(replicas),
            _servers: servers,
        })
    }

    fn measure(&self, qd: u32, seconds: u64) -> Result<FloorSample> {
        let payload: Bytes = (0..WRITE_BYTES).map(|i| (i * 7 + 1) as u8).collect();
        let crc32c = crc32c::crc32c(&payload);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let callers: Vec<_> = (0..u64::from(qd))
            .map(|i| {
                self.client_rt.spawn(caller(
                    i,
                    Arc::clone(&self.replicas),
                    payload.clone(),
                    crc32c,
                    Arc::clone(&stop),
                    Arc::clone(&done),
                ))
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        let (c0, s0, o0) = thread_cpu_s()?;
        let n0 = done.load(Ordering::Relaxed);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(seconds));
        let (c1, s1, o1) = thread_cpu_s()?;
        let n1 = done.load(Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for c in callers {
            self.client_rt
                .block_on(c)
                .context("caller task panicked")??;
        }
        let n = (n1 - n0) as f64;
        if n == 0.0 {
            bail!("the floor completed no writes at QD{qd}");
        }
        let us = |before: f64, after: f64| (after - before) * 1e6 / n;
        Ok(FloorSample {
            qd,
            writes_per_s: n / elapsed,
            client_us: us(c0, c1),
            server_us: us(s0, s1),
            other_us: us(o0, o1),
        })
    }
}

struct RealSample {
    qd: u32,
    writes_per_s: f64,
    engine_us: f64,
    replica_us: Vec<f64>,
    /// With `--perf`: the engine's and the first daemon's split by stage.
    stages: Option<StageSplits>,
}

/// Percent of samples per stage, for the engine and one replica daemon.
struct StageSplits {
    engine: Vec<(&'static str, f64)>,
    replica: Vec<(&'static str, f64)>,
}

/// Writes fio issued, from its "issued rwts: total=r,w,t,d" line.
fn fio_writes(text: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| l.contains("issued rwts:"))
        .context("no `issued rwts` line in fio's output")?;
    let total = line
        .split("total=")
        .nth(1)
        .context("no total= in fio's issued line")?;
    total
        .split([',', ' '])
        .nth(1)
        .context("no write count in fio's issued line")?
        .parse()
        .context("fio's write count")
}

fn real(args: &FloorArgs) -> Result<Vec<RealSample>> {
    let mut cluster = Cluster::new()?;
    // Three "nodes" on this machine: one I/O thread per daemon, as the fio
    // matrix and `corral dev` run them.
    for _ in 0..3 {
        cluster.start_replica_with(&["--io-threads", "1"])?;
    }
    let mut spec = EngineSpec::new("floor", &format!("{}MiB", args.size_mib), &[0, 1, 2])
        .set("--replica-timeout", "8s");
    if let Some(n) = args.engine_streams {
        spec = spec.set("--streams-per-replica", &n.to_string());
    }
    let e = cluster.start_engine(&spec)?;
    let uri = cluster.engines[e].nbd_uri();
    let size = format!("--size={}m", args.size_mib);
    fio_nbd(
        &uri,
        "prefill",
        &["--rw=write", "--bs=1m", "--iodepth=8", &size],
        Duration::from_secs(1800),
    )
    .inspect_err(|_| cluster.print_log_tails(60))?;
    let engine_pid = cluster.engines[e].process.pid().context("engine pid")?;
    let replica_pids: Vec<i32> = cluster
        .replicas
        .iter()
        .map(|r| r.process.pid().context("replica pid"))
        .collect::<Result<_>>()?;
    let profiles = tempfile::tempdir()?;
    let mut samples = Vec::new();
    for (i, &qd) in args.qd.iter().enumerate() {
        // The profiles skip fio's first second (its start) and its last.
        let recording = if args.perf && i == 0 {
            let window = args.seconds.saturating_sub(2).max(1);
            Some((
                Profile::record(engine_pid, window, profiles.path().join("engine.data"))?,
                Profile::record(
                    replica_pids[0],
                    window,
                    profiles.path().join("replica.data"),
                )?,
            ))
        } else {
            None
        };
        let before_e = process_cpu_s(engine_pid)?;
        let before_r: Vec<f64> = replica_pids
            .iter()
            .map(|p| process_cpu_s(*p))
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        let out = fio_nbd(
            &uri,
            &format!("randwrite-4k-qd{qd}"),
            &[
                "--rw=randwrite",
                "--bs=4k",
                &format!("--iodepth={qd}"),
                &size,
                &format!("--runtime={}", args.seconds),
                "--time_based",
                "--randrepeat=0",
            ],
            Duration::from_secs(args.seconds + 120),
        )
        .inspect_err(|_| cluster.print_log_tails(60))?;
        let elapsed = t0.elapsed().as_secs_f64();
        let after_e = process_cpu_s(engine_pid)?;
        let after_r: Vec<f64> = replica_pids
            .iter()
            .map(|p| process_cpu_s(*p))
            .collect::<Result<_>>()?;
        let writes = fio_writes(&out)?;
        if writes == 0 {
            bail!("fio completed no writes at QD{qd}");
        }
        let n = writes as f64;
        let stages = match recording {
            Some((engine, replica)) => Some(StageSplits {
                engine: stages::split(&engine.finish()?)?,
                replica: stages::split(&replica.finish()?)?,
            }),
            None => None,
        };
        samples.push(RealSample {
            qd,
            writes_per_s: n / args.seconds as f64,
            engine_us: (after_e - before_e) * 1e6 / n,
            replica_us: before_r
                .iter()
                .zip(&after_r)
                .map(|(b, a)| (a - b) * 1e6 / n)
                .collect(),
            stages,
        });
        eprintln!("floor: fio QD{qd}: {writes} writes in {elapsed:.1} s (fio process included)");
    }
    cluster.stop_all()?;
    Ok(samples)
}

pub fn run(args: &FloorArgs) -> Result<()> {
    if args.seconds == 0 || args.qd.contains(&0) {
        bail!("--seconds and every --qd must be at least 1");
    }
    let floor = Floor::start(args.streams)?;
    let mut floors = Vec::new();
    for &qd in &args.qd {
        let s = floor.measure(qd, args.seconds)?;
        eprintln!(
            "floor: QD{qd}: {:.0} writes/s, caller {:.1} µs, servers {:.1} µs per write",
            s.writes_per_s, s.client_us, s.server_us
        );
        floors.push(s);
    }
    drop(floor);
    let reals = if args.floor_only {
        Vec::new()
    } else {
        real(args)?
    };

    println!(
        "### The floor: tonic, three null replicas, {} stream(s) per replica, {} s per row\n",
        args.streams.max(1),
        args.seconds
    );
    println!(
        "| QD | replicated writes/s | caller CPU µs/write | server CPU µs/write (3 servers) | per server µs/write | other threads µs/write |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &floors {
        println!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.qd,
            s.writes_per_s,
            s.client_us,
            s.server_us,
            s.server_us / 3.0,
            s.other_us
        );
    }
    if reals.is_empty() {
        return Ok(());
    }
    println!(
        "\n### The gap: engine (NBD) + 3 replica daemons, fio 4 KiB randwrite, {} s per row\n",
        args.seconds
    );
    println!(
        "| QD | floor writes/s | fio writes/s | floor caller µs/write | engine µs/write | engine ÷ floor caller | floor per-server µs/write | replica daemons µs/write (each) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for r in &reals {
        let Some(f) = floors.iter().find(|f| f.qd == r.qd) else {
            continue;
        };
        let each: Vec<String> = r.replica_us.iter().map(|u| format!("{u:.1}")).collect();
        println!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1}× | {:.1} | {} |",
            r.qd,
            f.writes_per_s,
            r.writes_per_s,
            f.client_us,
            r.engine_us,
            r.engine_us / f.client_us,
            f.server_us / 3.0,
            each.join(" / ")
        );
    }
    for r in &reals {
        if let Some(split) = &r.stages {
            print_stages(r.qd, "engine", &split.engine, r.engine_us);
            let first = r.replica_us.first().copied().unwrap_or(0.0);
            print_stages(r.qd, "replica daemon", &split.replica, first);
        }
    }
    Ok(())
}

/// One process's CPU per write split by stage (percent of its samples,
/// scaled by its measured µs per write).
fn print_stages(qd: u32, process: &str, split: &[(&str, f64)], us_per_write: f64) {
    println!("\n### {process} CPU per write by stage, QD{qd} (perf, self time)\n");
    println!("| stage | share of samples | µs/write |");
    println!("| --- | ---: | ---: |");
    for (stage, pct) in split {
        println!(
            "| {stage} | {pct:.1}% | {:.2} |",
            us_per_write * pct / 100.0
        );
    }
    println!("| **total** | | **{us_per_write:.1}** |");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_issued_line() {
        let text = "  issued rwts: total=0,87120,0,0 short=0,0,0,0 dropped=0,0,0,0\n";
        assert_eq!(fio_writes(text).ok(), Some(87120));
    }

    #[test]
    fn parses_stat_with_spaces_in_comm() {
        let stat = "12 (floor cli) S 1 1 1 0 -1 0 0 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(parse_stat(stat), Some(("floor cli".to_string(), 12)));
    }
}
