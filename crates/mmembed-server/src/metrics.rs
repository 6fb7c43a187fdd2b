//! `/metrics` in the Prometheus text format (the `prometheus-client`
//! crate): requests by route and code, instances by modality, latency,
//! backend batch sizes and queue wait, queue depth.

use std::sync::Arc;
use std::time::Duration;

use mmembed_core::EmbedRequest;
use mmembed_core::batching::BatchEvent;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteCode {
    route: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModalityLabel {
    modality: String,
}

/// Every metric the server keeps.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteCode, Counter>,
    latency: Family<RouteLabel, Histogram>,
    instances: Family<ModalityLabel, Counter>,
    batch_requests: Histogram,
    batch_wait: Histogram,
    abandoned: Counter,
    queue_depth: Gauge,
    in_flight: Gauge,
    model_loaded: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers the metrics.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("mmembed");
        let requests = Family::<RouteCode, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and HTTP/gRPC status code",
            requests.clone(),
        );
        let latency = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            // 1 ms to about 65 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register(
            "request_duration_seconds",
            "Time from request to answer, by route",
            latency.clone(),
        );
        let instances = Family::<ModalityLabel, Counter>::default();
        registry.register(
            "instances",
            "Inputs received in predict calls, by modality",
            instances.clone(),
        );
        let batch_requests = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "batch_requests",
            "Requests merged into one backend call",
            batch_requests.clone(),
        );
        let batch_wait = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "batch_queue_wait_seconds",
            "How long the oldest request of each backend call waited in the queue",
            batch_wait.clone(),
        );
        let abandoned = Counter::default();
        registry.register(
            "abandoned_requests",
            "Queued requests dropped unrun because their caller stopped waiting",
            abandoned.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Cost units waiting in the batching queue (a text or image is 1)",
            queue_depth.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Predict calls being answered",
            in_flight.clone(),
        );
        let model_loaded = Gauge::default();
        registry.register(
            "model_loaded",
            "1 once the backend is ready",
            model_loaded.clone(),
        );
        Arc::new(Self {
            registry,
            requests,
            latency,
            instances,
            batch_requests,
            batch_wait,
            abandoned,
            queue_depth,
            in_flight,
            model_loaded,
        })
    }

    /// Counts one answered request.
    pub fn observe(&self, route: &str, code: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RouteCode {
                route: route.to_string(),
                code: code.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabel {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a predict call's inputs.
    pub fn count_instances(&self, reqs: &[EmbedRequest]) {
        for r in reqs {
            for m in r.modalities() {
                self.instances
                    .get_or_create(&ModalityLabel {
                        modality: m.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// Records one backend batch (the batcher's hook).
    pub fn batch(&self, e: &BatchEvent) {
        if e.requests > 0 {
            self.batch_requests.observe(e.requests as f64);
            self.batch_wait.observe(e.oldest_wait.as_secs_f64());
        }
        self.abandoned.inc_by(e.abandoned as u64);
    }

    /// Tracks a predict call in flight until the guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(self.clone())
    }

    /// Marks the model loaded.
    pub fn set_loaded(&self) {
        self.model_loaded.set(1);
    }

    /// The text exposition, with the queue depth read now.
    pub fn encode(&self, queue_depth: usize) -> String {
        self.queue_depth
            .set(i64::try_from(queue_depth).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Decrements the in-flight gauge when dropped (also on cancellation).
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}
