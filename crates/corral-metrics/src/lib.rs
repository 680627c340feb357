//! The Prometheus endpoint of corral's daemons (`--metrics ADDR`).
//!
//! Each daemon registers its metrics (prometheus-client, OpenMetrics text
//! format) in a [`Registry`] and serves it on `GET /metrics`. Gauges that
//! describe state (replica modes, rebuild progress) are refreshed by a
//! callback just before each scrape, so the data path only pays for
//! counters and histograms. Metric names are listed in docs/metrics.md.

use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
pub use prometheus_client;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::exponential_buckets;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Latency buckets for I/O: 10 µs to ~10 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_01, 2.0, 21)
}

/// What a scrape needs: the registry and a refresh of state gauges.
pub struct Exporter {
    registry: Mutex<Registry>,
    refresh: Box<dyn Fn() + Send + Sync>,
}

impl Exporter {
    pub fn new(registry: Registry, refresh: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Exporter {
            registry: Mutex::new(registry),
            refresh: Box::new(refresh),
        })
    }

    /// The OpenMetrics text of every registered metric, state refreshed.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        (self.refresh)();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        encode(&mut out, &registry)?;
        Ok(out)
    }
}

async fn metrics(State(exporter): State<Arc<Exporter>>) -> impl IntoResponse {
    match exporter.render() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(exporter);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn renders_registered_metrics_after_refresh() {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        registry.register("corral_test_things", "Things", c.clone());
        let seen = c.clone();
        let exporter = Exporter::new(registry, move || {
            seen.inc();
        });
        let text = exporter.render().unwrap();
        assert!(text.contains("corral_test_things_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
