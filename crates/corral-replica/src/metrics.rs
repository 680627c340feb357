//! The replica daemon's Prometheus metrics (names in docs/metrics.md).

use std::time::Instant;

use corral_metrics::latency_buckets;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::registry::ReplicaRegistry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResultLabels {
    pub op: &'static str,
    /// "ok" or the data error code (stale_epoch, bad_payload, checksum, no_space, io, ...).
    pub result: &'static str,
}

/// Every metric of one replica daemon.
#[derive(Clone)]
pub struct ReplicaMetrics {
    requests: Family<OpResultLabels, Counter>,
    bytes: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram>,
    replicas: Gauge,
}

impl Default for ReplicaMetrics {
    fn default() -> Self {
        ReplicaMetrics {
            requests: Family::default(),
            bytes: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            replicas: Gauge::default(),
        }
    }
}

impl ReplicaMetrics {
    /// Create the metrics and register them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ReplicaMetrics::default();
        let r = registry.sub_registry_with_prefix("corral_replica");
        r.register(
            "requests",
            "Data-stream requests executed, by result",
            m.requests.clone(),
        );
        r.register(
            "bytes",
            "Bytes read or written by data-stream requests",
            m.bytes.clone(),
        );
        r.register(
            "request_latency_seconds",
            "Time to execute a data-stream request on the store",
            m.latency.clone(),
        );
        r.register(
            "hosted",
            "Replicas hosted by this daemon",
            m.replicas.clone(),
        );
        m
    }

    /// Refresh state gauges (called at each scrape).
    pub fn refresh(&self, registry: &ReplicaRegistry) {
        self.replicas.set(registry.all().len() as i64);
    }

    /// Count one executed request.
    pub fn record(&self, op: &'static str, result: &'static str, bytes: u64, started: Instant) {
        self.requests
            .get_or_create(&OpResultLabels { op, result })
            .inc();
        let labels = OpLabels { op };
        if result == "ok" && bytes > 0 {
            self.bytes.get_or_create(&labels).inc_by(bytes);
        }
        self.latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
}
