//! Story: the disk under a replica fills up while a deleted snapshot is being
//! merged away.
//!
//! A replica daemon (its real gRPC services on 127.0.0.1) keeps its data dir
//! on a 24 MiB tmpfs (and again on a 32 MiB loop-mounted ext4). The volume
//! has a snapshot holding data, a later snapshot, and writes after both; a
//! filler file then takes all but a few hundred KiB of the filesystem and
//! the older snapshot is deleted, so the background merge runs out of space
//! after its first granule. Then:
//!
//! - no acknowledged write is lost: the head and the remaining snapshot read
//!   back exactly what was written, while full and after;
//! - the error is clear: `ListSnapshots` keeps the layer "deleting", says a
//!   merge is pending and why it is stuck (`merge_error`), and a foreground
//!   write into new space gets the store's `NO_SPACE` code;
//! - once the filler is removed the merge resumes by itself and finishes
//!   within a bounded wait, the data still exact, and the metadata database
//!   still takes commits (a snapshot is taken, the daemon restarts).
//!
//! Needs root (it mounts filesystems), like the README's test command: it
//! fails, rather than skips, without it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corral_proto::v1::{
    CreateReplicaRequest, DataErrorCode, DataReplyBatch, DataRequest, DataRequestBatch,
    ListSnapshotsRequest, ListSnapshotsResponse, OpenReplicaRequest, SnapshotRequest, data_reply,
    data_request, replica_control_client::ReplicaControlClient,
    replica_data_client::ReplicaDataClient,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const VOLUME_SIZE: u64 = 16 * MIB;
const EPOCH: u64 = 1;

/// A small filesystem mounted for the test (a tmpfs, or ext4 on a loop
/// device over an image file), unmounted (lazily, so it always goes) on drop.
struct SmallFs {
    mnt: tempfile::TempDir,
    /// Holds the ext4 image.
    _image: Option<tempfile::TempDir>,
}

impl SmallFs {
    fn tmpfs(size: &str) -> SmallFs {
        let mnt = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(mnt.path()));
        SmallFs { mnt, _image: None }
    }

    /// ext4 of `mib` MiB: a real block filesystem, where punching a hole
    /// gives blocks back to the allocator and the root reserve is usable.
    fn ext4(mib: u64) -> SmallFs {
        let image_dir = tempfile::tempdir().unwrap();
        let image = image_dir.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mib * MIB)
            .unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        let mnt = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(mnt.path()));
        SmallFs {
            mnt,
            _image: Some(image_dir),
        }
    }

    fn path(&self) -> &Path {
        self.mnt.path()
    }
}

/// Runs a setup command (mount, mkfs); fails the test when it fails.
fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a setup command");
    assert!(
        out.status.success(),
        "{cmd:?} failed (this test needs root to mount): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // -d: a loop device set up by mount goes with it.
        let _ = Command::new("umount")
            .args(["-l", "-d"])
            .arg(self.mnt.path())
            .status();
    }
}

struct Daemon {
    addr: String,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(data_dir: PathBuf) -> Daemon {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = stop.clone();
    let task = tokio::spawn(async move {
        corral_replica::serve_listener(listener, data_dir, serving)
            .await
            .unwrap();
    });
    Daemon { addr, stop, task }
}

impl Daemon {
    async fn stop(mut self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("daemon stops")
            .unwrap();
    }

    async fn control(&self) -> ReplicaControlClient<Channel> {
        ReplicaControlClient::connect(self.addr.clone())
            .await
            .unwrap()
    }

    async fn stream(&self, epoch: u64) -> Stream {
        let mut client = ReplicaDataClient::connect(self.addr.clone()).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(corral_proto::VOLUME_METADATA_KEY, "vol".parse().unwrap());
        let replies = client.stream(req).await.unwrap().into_inner();
        Stream {
            tx,
            rx: replies,
            next_id: 1,
            epoch,
        }
    }
}

struct Stream {
    tx: mpsc::Sender<DataRequestBatch>,
    rx: tonic::Streaming<DataReplyBatch>,
    next_id: u64,
    epoch: u64,
}

impl Stream {
    async fn call(&mut self, op: data_request::Op) -> data_reply::Result {
        let id = self.next_id;
        self.next_id += 1;
        let req = DataRequest {
            id,
            epoch: self.epoch,
            op: Some(op),
        };
        self.tx
            .send(DataRequestBatch {
                requests: vec![req],
            })
            .await
            .unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .expect("a reply within 20 s")
            .unwrap()
            .unwrap();
        assert_eq!(batch.replies.len(), 1);
        assert_eq!(batch.replies[0].id, id);
        batch.replies[0].result.clone().unwrap()
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> data_reply::Result {
        self.call(data_request::Op::Write(corral_proto::v1::WriteOp {
            offset,
            data: Bytes::copy_from_slice(data),
            crc32c: crc32c::crc32c(data),
            ..Default::default()
        }))
        .await
    }

    /// Writes `data` at `offset` and into `model`; the write must be acknowledged.
    async fn write_ok(&mut self, model: &mut [u8], offset: u64, data: &[u8]) {
        let r = self.write(offset, data).await;
        assert!(
            matches!(r, data_reply::Result::Done(_)),
            "write at {offset}: {r:?}"
        );
        model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    async fn flush(&mut self) {
        let r = self
            .call(data_request::Op::Flush(corral_proto::v1::FlushOp {}))
            .await;
        assert!(matches!(r, data_reply::Result::Done(_)), "flush: {r:?}");
    }

    /// The whole view (`snapshot` empty: the head), 1 MiB a read.
    async fn read_all(&mut self, snapshot: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(VOLUME_SIZE as usize);
        for offset in (0..VOLUME_SIZE).step_by(MIB as usize) {
            let r = self
                .call(data_request::Op::Read(corral_proto::v1::ReadOp {
                    offset,
                    length: MIB as u32,
                    snapshot: snapshot.into(),
                }))
                .await;
            match r {
                data_reply::Result::Read(r) => out.extend_from_slice(&r.data),
                other => panic!("read of {snapshot:?} at {offset}: {other:?}"),
            }
        }
        out
    }
}

/// A recognisable pattern per write: no two writes of the story look alike.
fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 4096) as u8) ^ (i as u8))
        .collect()
}

/// Compares a view with what was written, block by block; `unsure` is a
/// byte range written by a write that was not acknowledged: each of its
/// blocks may hold the old or the new data, nothing else.
fn assert_view(what: &str, got: &[u8], want: &[u8], unsure: Option<(u64, &[u8])>) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (b, (g, w)) in got.chunks(4096).zip(want.chunks(4096)).enumerate() {
        if g == w {
            continue;
        }
        let offset = b as u64 * 4096;
        if let Some((at, new)) = unsure
            && offset >= at
            && offset < at + new.len() as u64
        {
            let lo = (offset - at) as usize;
            if g == &new[lo..lo + 4096] {
                continue;
            }
        }
        panic!("{what}: the 4 KiB block at byte {offset} differs from what was written");
    }
}

async fn list(control: &mut ReplicaControlClient<Channel>) -> ListSnapshotsResponse {
    control
        .list_snapshots(ListSnapshotsRequest {
            volume: "vol".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn snapshot(control: &mut ReplicaControlClient<Channel>, name: &str) {
    control
        .create_snapshot(SnapshotRequest {
            volume: "vol".into(),
            epoch: EPOCH,
            name: name.into(),
            answer_when_switched: false,
        })
        .await
        .unwrap();
}

/// CPU time (user and system) this process has used, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which ends with the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Writes `path` until the filesystem is full, then gives back `leave` bytes.
fn fill_up(path: &Path, leave: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xf1u8; 64 * KIB as usize];
    let mut len = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filler: {e}"),
        }
    }
    assert!(len > leave, "the filler took {len} bytes");
    f.set_len(len - leave).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_that_runs_out_of_space_loses_nothing_says_why_and_finishes_when_space_returns() {
    story(SmallFs::tmpfs("24m")).await;
}

/// The same on ext4, whose punched holes and allocator are a real block
/// filesystem's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_on_ext4() {
    story(SmallFs::ext4(32)).await;
}

/// The stories run one at a time: one measures the process's CPU time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn story(fs: SmallFs) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let data_dir = fs.path().join("data");
    let filler = fs.path().join("filler");
    let daemon = start(data_dir.clone()).await;
    let mut control = daemon.control().await;
    control
        .create_replica(CreateReplicaRequest {
            volume: "vol".into(),
            size: VOLUME_SIZE,
            block_size: 512,
            chunk_size: 64 << 10,
        })
        .await
        .unwrap();
    control
        .open_replica(OpenReplicaRequest {
            volume: "vol".into(),
            epoch: EPOCH,
            engine_id: 0,
        })
        .await
        .unwrap();
    let mut io = daemon.stream(EPOCH).await;
    let mut head = vec![0u8; VOLUME_SIZE as usize];

    // Snapshot "old": 256 KiB at the start and 8 MiB from 4 MiB on.
    io.write_ok(&mut head, 0, &pattern(1, 256 * KIB)).await;
    for (i, at) in (4 * MIB..12 * MIB).step_by(MIB as usize).enumerate() {
        io.write_ok(&mut head, at, &pattern(10 + i as u8, MIB))
            .await;
    }
    snapshot(&mut control, "old").await;
    // Its child: the first 256 KiB again (so the merge's first granule
    // copies nothing), one block every 256 KiB of 4..8 MiB, and a new MiB.
    io.write_ok(&mut head, 0, &pattern(2, 256 * KIB)).await;
    for (i, at) in (4 * MIB..8 * MIB).step_by(256 * KIB as usize).enumerate() {
        io.write_ok(&mut head, at, &pattern(30 + i as u8, 4 * KIB))
            .await;
    }
    io.write_ok(&mut head, 12 * MIB, &pattern(3, MIB)).await;
    snapshot(&mut control, "kept").await;
    let kept = head.clone();
    // The head: a new MiB and half a MiB over "old"'s data.
    io.write_ok(&mut head, 13 * MIB, &pattern(4, MIB)).await;
    io.write_ok(&mut head, 5 * MIB, &pattern(5, 512 * KIB))
        .await;
    io.flush().await;
    assert_view("head", &io.read_all("").await, &head, None);
    assert_view("snapshot kept", &io.read_all("kept").await, &kept, None);

    // The disk fills up (all but 512 KiB), then "old" is deleted: merging
    // it into "kept" needs about 4 MiB per granule.
    fill_up(&filler, 512 * KIB);
    let deleted = control
        .delete_snapshot(SnapshotRequest {
            volume: "vol".into(),
            epoch: EPOCH,
            name: "old".into(),
            answer_when_switched: false,
        })
        .await
        .expect("the delete itself is one small commit")
        .into_inner();
    assert_eq!(
        deleted
            .snapshots
            .iter()
            .map(|s| &s.name)
            .collect::<Vec<_>>(),
        ["kept"]
    );

    // The merge gets stuck, and says why.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stuck = loop {
        let l = list(&mut control).await;
        if !l.merge_error.is_empty() {
            break l;
        }
        assert!(l.merge_pending, "the merge cannot finish on a full disk");
        assert!(
            Instant::now() < deadline,
            "no merge error reported within 20 s: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(stuck.merge_pending, "{stuck:?}");
    assert!(
        stuck.merge_error.contains("no space left on device"),
        "{}",
        stuck.merge_error
    );
    assert!(
        stuck
            .layers
            .iter()
            .any(|l| l.snapshot == "old" && l.deleting),
        "the layer stays, marked deleting: {stuck:?}"
    );
    // Stuck, it waits between tries rather than spinning: this process (the
    // daemon's threads) uses a small part of one core meanwhile.
    let cpu = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds() - cpu;
    assert!(
        used < 0.75,
        "{used:.2} s of CPU in 3 s while the merge is stuck"
    );
    let l = list(&mut control).await;
    assert!(l.merge_pending && !l.merge_error.is_empty(), "{l:?}");

    // A foreground write into space nothing holds yet is refused as out of
    // space, not as an I/O error (and not a panic).
    let refused = pattern(6, MIB);
    let r = io.write(14 * MIB, &refused).await;
    assert!(
        matches!(&r, data_reply::Result::Error(e) if e.code == DataErrorCode::NoSpace as i32),
        "{r:?}"
    );
    let unsure = Some((14 * MIB, refused.as_slice()));

    // Nothing acknowledged is lost while the disk is full.
    assert_view("head while full", &io.read_all("").await, &head, unsure);
    assert_view(
        "snapshot kept while full",
        &io.read_all("kept").await,
        &kept,
        None,
    );

    // Space comes back: the merge resumes by itself and finishes.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let l = list(&mut control).await;
        if !l.merge_pending {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "the merge did not finish within 30 s of space coming back: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(done.merge_error.is_empty(), "{done:?}");
    assert!(done.layers.iter().all(|l| l.snapshot != "old"), "{done:?}");
    assert_view(
        "head after the merge",
        &io.read_all("").await,
        &head,
        unsure,
    );
    assert_view(
        "snapshot kept after the merge",
        &io.read_all("kept").await,
        &kept,
        None,
    );

    // The volume takes writes and snapshots again; the refused write, retried, lands.
    io.write_ok(&mut head, 14 * MIB, &refused).await;
    io.flush().await;
    snapshot(&mut control, "after").await;
    assert_view("head", &io.read_all("").await, &head, None);
    drop(io);
    drop(control);
    daemon.stop().await;

    // And all of it is on disk: a restarted daemon reads the same.
    let daemon = start(data_dir).await;
    let mut control = daemon.control().await;
    control
        .open_replica(OpenReplicaRequest {
            volume: "vol".into(),
            epoch: EPOCH + 1,
            engine_id: 0,
        })
        .await
        .unwrap();
    let l = list(&mut control).await;
    assert_eq!(
        l.snapshots.iter().map(|s| &s.name).collect::<Vec<_>>(),
        ["kept", "after"]
    );
    assert!(!l.merge_pending, "{l:?}");
    let mut io = daemon.stream(EPOCH + 1).await;
    assert_view("head after a restart", &io.read_all("").await, &head, None);
    assert_view(
        "snapshot kept after a restart",
        &io.read_all("kept").await,
        &kept,
        None,
    );
    drop(io);
    drop(control);
    daemon.stop().await;
}
