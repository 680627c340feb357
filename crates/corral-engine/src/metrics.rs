//! The engine's Prometheus metrics (names in docs/metrics.md).
//!
//! I/O is counted and timed by [`Metered`], a `BlockDevice` wrapper the
//! frontends serve, so every frontend is measured the same way. Replica
//! modes, membership, fencing, repairs and rebuild progress are gauges
//! refreshed from the volume at each scrape.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use corral_block::{BlockDevice, BlockResult};
use corral_metrics::latency_buckets;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::replica_set::Mode;
use crate::volume::Volume;

/// A block operation.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum IoOp {
    read,
    write,
    flush,
    unmap,
    write_zeroes,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: IoOp,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResultLabels {
    pub op: IoOp,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaModeLabels {
    pub replica: String,
    pub mode: &'static str,
}

/// Every metric of one engine.
#[derive(Clone)]
pub struct EngineMetrics {
    ops: Family<OpResultLabels, Counter>,
    bytes: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram>,
    replica_mode: Family<ReplicaModeLabels, Gauge>,
    rebuild_total: Family<ReplicaLabels, Gauge>,
    rebuild_done: Family<ReplicaLabels, Gauge>,
    rebuild_copied: Family<ReplicaLabels, Gauge>,
    rebuild_skipped: Family<ReplicaLabels, Gauge>,
    replicas_rw: Gauge,
    generation: Gauge,
    epoch: Gauge,
    fenced: Gauge,
    failures: Gauge,
    repaired: Gauge,
    flushes_without_round: Gauge,
}

impl EngineMetrics {
    /// Create the metrics and register them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = EngineMetrics {
            ops: Family::default(),
            bytes: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            replica_mode: Family::default(),
            rebuild_total: Family::default(),
            rebuild_done: Family::default(),
            rebuild_copied: Family::default(),
            rebuild_skipped: Family::default(),
            replicas_rw: Gauge::default(),
            generation: Gauge::default(),
            epoch: Gauge::default(),
            fenced: Gauge::default(),
            failures: Gauge::default(),
            repaired: Gauge::default(),
            flushes_without_round: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("corral_engine");
        r.register(
            "io_ops",
            "Block operations served, by result",
            m.ops.clone(),
        );
        r.register(
            "io_bytes",
            "Bytes read, written, unmapped or zeroed",
            m.bytes.clone(),
        );
        r.register(
            "io_latency_seconds",
            "Latency of block operations as the frontends see it",
            m.latency.clone(),
        );
        r.register(
            "replica_mode",
            "1 for each replica's current mode (RW, WO, ERR)",
            m.replica_mode.clone(),
        );
        r.register("replicas_rw", "Replicas in RW mode", m.replicas_rw.clone());
        r.register(
            "membership_generation",
            "Current membership generation",
            m.generation.clone(),
        );
        r.register("epoch", "This engine's volume epoch", m.epoch.clone());
        r.register(
            "fenced",
            "1 once a newer engine has fenced this one",
            m.fenced.clone(),
        );
        r.register(
            "replica_failures",
            "Replicas moved to ERR since start",
            m.failures.clone(),
        );
        r.register(
            "repaired_blocks",
            "Blocks rewritten by repair on read",
            m.repaired.clone(),
        );
        r.register(
            "flushes_without_round",
            "Frontend flushes answered without a round to the replicas (every write before them was durable already, decision 76)",
            m.flushes_without_round.clone(),
        );
        r.register(
            "rebuild_total_bytes",
            "Bytes the latest rebuild into a replica walks",
            m.rebuild_total.clone(),
        );
        r.register(
            "rebuild_done_bytes",
            "Bytes the latest rebuild has walked",
            m.rebuild_done.clone(),
        );
        r.register(
            "rebuild_copied_bytes",
            "Bytes the latest rebuild has copied",
            m.rebuild_copied.clone(),
        );
        r.register(
            "rebuild_skipped_bytes",
            "Bytes the latest rebuild found identical",
            m.rebuild_skipped.clone(),
        );
        m
    }

    /// Refresh the state gauges from the volume (called at each scrape).
    pub fn refresh(&self, volume: &Volume) {
        let set = volume.replica_set();
        self.replica_mode.clear();
        for s in set.status() {
            for mode in [Mode::Rw, Mode::Wo, Mode::Err] {
                self.replica_mode
                    .get_or_create(&ReplicaModeLabels {
                        replica: s.address.clone(),
                        mode: mode.as_str(),
                    })
                    .set(i64::from(s.mode == mode));
            }
            if let Some(r) = &s.rebuild {
                let p = r.to_pb();
                let l = ReplicaLabels {
                    replica: s.address.clone(),
                };
                self.rebuild_total
                    .get_or_create(&l)
                    .set(p.total_bytes as i64);
                self.rebuild_done.get_or_create(&l).set(p.done_bytes as i64);
                self.rebuild_copied
                    .get_or_create(&l)
                    .set(p.copied_bytes as i64);
                self.rebuild_skipped
                    .get_or_create(&l)
                    .set(p.skipped_bytes as i64);
            }
        }
        self.replicas_rw.set(set.rw_count() as i64);
        self.generation.set(set.generation().0 as i64);
        self.epoch.set(set.epoch().0 as i64);
        self.fenced.set(i64::from(set.is_fenced()));
        self.failures.set(set.failures() as i64);
        self.repaired.set(volume.repaired_blocks() as i64);
        self.flushes_without_round
            .set(volume.flushes_without_round() as i64);
    }

    fn record(&self, op: IoOp, bytes: u64, started: Instant, ok: bool) {
        self.ops
            .get_or_create(&OpResultLabels {
                op,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        let labels = OpLabels { op };
        if ok && bytes > 0 {
            self.bytes.get_or_create(&labels).inc_by(bytes);
        }
        self.latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
}

/// A `BlockDevice` that counts and times every operation of the one inside.
pub struct Metered<D> {
    inner: Arc<D>,
    metrics: EngineMetrics,
}

impl<D: BlockDevice> Metered<D> {
    pub fn new(inner: Arc<D>, metrics: EngineMetrics) -> Self {
        Metered { inner, metrics }
    }
}

impl<D: BlockDevice> BlockDevice for Metered<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        let t = Instant::now();
        let r = self.inner.read(offset, len).await;
        self.metrics
            .record(IoOp::read, u64::from(len), t, r.is_ok());
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        let t = Instant::now();
        let n = data.len() as u64;
        let r = self.inner.write(offset, data, fua).await;
        self.metrics.record(IoOp::write, n, t, r.is_ok());
        r
    }

    async fn flush(&self) -> BlockResult<()> {
        let t = Instant::now();
        let r = self.inner.flush().await;
        self.metrics.record(IoOp::flush, 0, t, r.is_ok());
        r
    }

    async fn unmap(&self, offset: u64, len: u64) -> BlockResult<()> {
        let t = Instant::now();
        let r = self.inner.unmap(offset, len).await;
        self.metrics.record(IoOp::unmap, len, t, r.is_ok());
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, fua).await;
        self.metrics.record(IoOp::write_zeroes, len, t, r.is_ok());
        r
    }

    async fn load_reservations(&self) -> BlockResult<Option<Bytes>> {
        self.inner.load_reservations().await
    }

    async fn save_reservations(&self, state: Bytes) -> BlockResult<()> {
        self.inner.save_reservations(state).await
    }
}
