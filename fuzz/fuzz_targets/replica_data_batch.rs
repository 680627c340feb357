//! Fuzz target: a replica's handling of data-stream batches
//! (`corral_replica::data`) over a real store (`corral_store`) in a
//! temporary directory. Owns the checks that arbitrary `DataRequestBatch`
//! messages never panic the replica or make it allocate beyond what they
//! ask for, that every request gets exactly one reply with its id, in
//! order, that out-of-range, misaligned, fenced or corrupt requests are
//! refused with the right error code and valid ones succeed, and that what
//! the store returns always matches a model of the volume — also after the
//! replica is dropped without a clean close and reopened (recovery).
//!
//! One replica is created per process and wiped (unmapped) before each
//! input. Input: one config byte (low four bits set: crash and reopen at
//! the end), then records of a big-endian u16 length and that many bytes
//! of a protobuf-encoded `DataRequestBatch`. A request with epoch 0 is given the
//! epoch the replica is open at, and a write with CRC32C 0 the CRC of its
//! payload; other values are kept, so fencing and payload checks are
//! exercised too.
#![no_main]

use std::sync::{Arc, Mutex};

use corral_fuzz::{Input, replica::*};
use corral_proto::v1::{
    DataErrorCode, DataReply, DataReplyBatch, DataRequest, DataRequestBatch, ReadOp, UnmapOp,
    data_reply, data_request,
};
use corral_replica::ReplicaRegistry;
use corral_replica::data::execute_stream_batch;
use corral_replica::metrics::ReplicaMetrics;
use corral_replica::registry::HostedReplica;
use corral_store::{CreateParams, Epoch};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const BLOCK: u64 = 4096;

fn tempdir() -> tempfile::TempDir {
    // tmpfs when there is one: a store's metadata commits fsync.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("corral-fuzz")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("temporary directory")
}

fn in_range(offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= SIZE)
}

fn error_code(reply: &DataReply) -> Option<DataErrorCode> {
    match &reply.result {
        Some(data_reply::Result::Error(e)) => {
            Some(DataErrorCode::try_from(e.code).expect("a known error code"))
        }
        _ => None,
    }
}

/// What the replica must answer `req` with: `Err(code)` or `Ok(())`.
fn expected(req: &DataRequest) -> Result<(), DataErrorCode> {
    if req.epoch < EPOCH {
        return Err(DataErrorCode::StaleEpoch);
    }
    if req.epoch > EPOCH {
        return Err(DataErrorCode::NotOpen);
    }
    let range = |offset, len| {
        if in_range(offset, len) {
            Ok(())
        } else {
            Err(DataErrorCode::OutOfRange)
        }
    };
    match &req.op {
        None => Err(DataErrorCode::Invalid),
        Some(data_request::Op::Read(r)) => range(r.offset, u64::from(r.length)),
        Some(data_request::Op::Write(w)) => {
            if crc32c::crc32c(&w.data) != w.crc32c {
                Err(DataErrorCode::BadPayload)
            } else {
                range(w.offset, w.data.len() as u64)
            }
        }
        Some(data_request::Op::Flush(_)) => Ok(()),
        Some(data_request::Op::Unmap(u)) => range(u.offset, u.length),
        Some(data_request::Op::WriteZeroes(z)) => range(z.offset, z.length),
        Some(data_request::Op::Checksums(c)) => {
            range(c.offset, c.length)?;
            if c.offset % BLOCK != 0 || c.length % BLOCK != 0 {
                Err(DataErrorCode::Invalid)
            } else {
                Ok(())
            }
        }
    }
}

/// Check `reply` against the model and apply a successful write to it.
fn check(model: &mut [u8], req: &DataRequest, reply: &DataReply) {
    assert_eq!(reply.id, req.id);
    let want = expected(req);
    let got = error_code(reply);
    assert_eq!(want.err(), got, "{req:?} got {reply:?}");
    if got.is_some() {
        return;
    }
    let span = |offset: u64, len: u64| offset as usize..(offset + len) as usize;
    match (&req.op, &reply.result) {
        (Some(data_request::Op::Read(r)), Some(data_reply::Result::Read(d))) => {
            assert_eq!(d.data.len(), r.length as usize);
            assert_eq!(crc32c::crc32c(&d.data), d.crc32c);
            assert!(
                d.data[..] == model[span(r.offset, u64::from(r.length))],
                "read at {} of {} bytes differs from what was written",
                r.offset,
                r.length
            );
        }
        (Some(data_request::Op::Write(w)), Some(data_reply::Result::Done(_))) => {
            model[span(w.offset, w.data.len() as u64)].copy_from_slice(&w.data);
        }
        (Some(data_request::Op::Unmap(u)), Some(data_reply::Result::Done(_))) => {
            model[span(u.offset, u.length)].fill(0);
        }
        (Some(data_request::Op::WriteZeroes(z)), Some(data_reply::Result::Done(_))) => {
            model[span(z.offset, z.length)].fill(0);
        }
        (Some(data_request::Op::Flush(_)), Some(data_reply::Result::Done(_))) => {}
        (Some(data_request::Op::Checksums(c)), Some(data_reply::Result::Checksums(s))) => {
            let blocks = model[span(c.offset, c.length)].chunks_exact(BLOCK as usize);
            assert_eq!(s.crc32c.len(), blocks.len());
            for (i, (got, block)) in s.crc32c.iter().zip(blocks).enumerate() {
                assert_eq!(*got, crc32c::crc32c(block), "checksum of block {i}");
            }
        }
        (op, result) => panic!("{op:?} answered with {result:?}"),
    }
}

/// The replica under test, created once per process (creating a store per
/// input would cost more than the input): each input starts by unmapping
/// the whole volume, so it starts from zeroes like the model.
struct Replica {
    dir: tempfile::TempDir,
    registry: ReplicaRegistry,
    replica: Arc<HostedReplica>,
    session: u64,
}

impl Replica {
    fn create() -> Self {
        let dir = tempdir();
        let registry = ReplicaRegistry::open(dir.path()).expect("open the data dir");
        let params = CreateParams {
            volume: "fuzz".into(),
            size: SIZE,
            block_size: BLOCK_SIZE,
            chunk_size: CHUNK_SIZE,
            instance_id: "fuzz-1".into(),
        };
        let replica = registry.create(params).expect("create the replica");
        let session = replica.open_at(Epoch(EPOCH), 0).expect("open the replica");
        Replica {
            dir,
            registry,
            replica,
            session,
        }
    }

    /// Drop the store without a clean close and open it again.
    fn crash_and_reopen(self) -> Self {
        let Replica {
            dir,
            registry,
            replica,
            ..
        } = self;
        drop(replica);
        drop(registry);
        let registry = ReplicaRegistry::open(dir.path()).expect("reopen the data dir");
        let replica = registry.get("fuzz").expect("the replica is still there");
        let session = replica.open_at(Epoch(EPOCH), 0).expect("reopen the replica");
        Replica {
            dir,
            registry,
            replica,
            session,
        }
    }

    fn execute(&self, batch: DataRequestBatch, metrics: &ReplicaMetrics) -> DataReplyBatch {
        execute_stream_batch(&self.replica, self.session, batch, metrics)
    }
}

static REPLICA: Mutex<Option<Replica>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let config = input.u8();
    let mut slot = REPLICA.lock().unwrap_or_else(|p| p.into_inner());
    let mut r = slot.take().unwrap_or_else(Replica::create);
    let metrics = ReplicaMetrics::default();
    let mut model = vec![0u8; SIZE as usize];
    let wipe = DataRequestBatch {
        requests: vec![DataRequest {
            id: 0,
            epoch: EPOCH,
            op: Some(data_request::Op::Unmap(UnmapOp {
                offset: 0,
                length: SIZE,
            })),
        }],
    };
    let wiped = r.execute(wipe.clone(), &metrics);
    check(&mut model, &wipe.requests[0], &wiped.replies[0]);
    let mut batches = 0;
    while !input.is_empty() && batches < 16 {
        batches += 1;
        let len = usize::from(input.u16());
        let Ok(mut batch) = DataRequestBatch::decode(input.bytes(len)) else {
            continue;
        };
        for req in &mut batch.requests {
            if req.epoch == 0 {
                req.epoch = EPOCH;
            }
            if let Some(data_request::Op::Write(w)) = &mut req.op
                && w.crc32c == 0
            {
                w.crc32c = crc32c::crc32c(&w.data);
            }
        }
        let requests = batch.requests.clone();
        let replies = r.execute(batch, &metrics);
        assert_eq!(replies.replies.len(), requests.len());
        for (req, reply) in requests.iter().zip(&replies.replies) {
            check(&mut model, req, reply);
        }
    }
    if config & 0x0f == 0x0f {
        // An unclean stop (the page cache survives, as after kill -9): what
        // was written reads back after recovery.
        r = r.crash_and_reopen();
        let read = DataRequestBatch {
            requests: (0..SIZE >> 20)
                .map(|i| DataRequest {
                    id: i,
                    epoch: EPOCH,
                    op: Some(data_request::Op::Read(ReadOp {
                        offset: i << 20,
                        length: 1 << 20, ..Default::default() })),
                })
                .collect(),
        };
        let requests = read.requests.clone();
        let replies = r.execute(read, &metrics);
        for (req, reply) in requests.iter().zip(&replies.replies) {
            check(&mut model, req, reply);
        }
    }
    *slot = Some(r);
});
