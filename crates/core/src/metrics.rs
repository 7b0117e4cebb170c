//! Prometheus metrics, all prefixed `pipeline_controller_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::promotion::Phase;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvironmentLabels {
    pub pipeline: String,
    pub environment: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
}

/// Buckets for delivery durations: a minute to a month.
const DELIVERY_BUCKETS: [f64; 12] = [
    60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0, 172800.0, 604800.0,
    2592000.0,
];

/// Delivery insights ([`crate::insights`]) as metrics: counted as they happen while this
/// process runs, gauges recomputed from the records.
#[derive(Clone)]
pub struct DeliveryMetrics {
    pub deployments: Family<EnvironmentLabels, Counter>,
    pub lead_time: Family<PipelineLabels, Histogram>,
    pub approval_wait: Family<EnvironmentLabels, Histogram>,
    pub time_to_recover: Family<EnvironmentLabels, Histogram>,
    pub failure_ratio: Family<EnvironmentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub approval_waiting: Family<EnvironmentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

pub struct Metrics {
    registry: Registry,
    pub delivery: DeliveryMetrics,
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, Histogram>,
    phases: Family<PhaseLabels, Counter>,
    manifest_files_invalid: Gauge,
    manifest_files_last_good: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl DeliveryMetrics {
    /// Drops every series, for an exporter that stops: another one (the next leader's)
    /// takes over, and two sets of the same counts would be summed twice.
    pub fn clear(&self) {
        self.deployments.clear();
        self.lead_time.clear();
        self.approval_wait.clear();
        self.time_to_recover.clear();
        self.failure_ratio.clear();
        self.approval_waiting.clear();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pipeline_controller");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Webhook and API requests by endpoint and outcome",
            requests.clone(),
        );
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        registry.register(
            "request_duration_seconds",
            "Request latency by endpoint",
            latency.clone(),
        );
        let phases = Family::<PhaseLabels, Counter>::default();
        registry.register(
            "promotions",
            "Promotions entering each phase",
            phases.clone(),
        );
        for phase in Phase::ALL {
            phases
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str().to_string(),
                })
                .get();
        }
        // Embedded mode's manifests folder (always 0 in Kubernetes mode). Counts only, so
        // the label set stays bounded; /readyz names the files.
        let manifest_files_invalid = Gauge::default();
        registry.register(
            "manifest_files_invalid",
            "Manifest files that currently fail to load (embedded mode)",
            manifest_files_invalid.clone(),
        );
        let manifest_files_last_good = Gauge::default();
        registry.register(
            "manifest_files_last_good",
            "Invalid manifest files whose last good version is served instead (embedded mode)",
            manifest_files_last_good.clone(),
        );
        let delivery = DeliveryMetrics {
            deployments: Family::default(),
            lead_time: Family::new_with_constructor(|| Histogram::new(DELIVERY_BUCKETS)),
            approval_wait: Family::new_with_constructor(|| Histogram::new(DELIVERY_BUCKETS)),
            time_to_recover: Family::new_with_constructor(|| Histogram::new(DELIVERY_BUCKETS)),
            failure_ratio: Family::default(),
            approval_waiting: Family::default(),
        };
        registry.register(
            "deployments",
            "Deployments per pipeline and environment (first environment: a revision leaving it; later ones: a promotion into it that succeeded), counted while this process runs",
            delivery.deployments.clone(),
        );
        registry.register(
            "lead_time_seconds",
            "From a revision's deployment in the first environment to its deployment in the last",
            delivery.lead_time.clone(),
        );
        registry.register(
            "approval_wait_seconds",
            "Time promotions waited for approval",
            delivery.approval_wait.clone(),
        );
        registry.register(
            "time_to_recover_seconds",
            "From a failed promotion into an environment to the next successful one",
            delivery.time_to_recover.clone(),
        );
        registry.register(
            "promotion_failure_ratio",
            "Failed out of finished promotions into the environment, over the records kept",
            delivery.failure_ratio.clone(),
        );
        registry.register(
            "approval_waiting_seconds",
            "How long the oldest promotion still waiting for approval has waited (0: none waits)",
            delivery.approval_waiting.clone(),
        );
        Self {
            registry,
            delivery,
            requests,
            latency,
            phases,
            manifest_files_invalid,
            manifest_files_last_good,
        }
    }

    /// Adds metrics computed on each scrape (the process's heap, say: only the binary
    /// knows its allocator).
    pub fn with_collector(
        mut self,
        collector: impl prometheus_client::collector::Collector,
    ) -> Self {
        self.registry.register_collector(Box::new(collector));
        self
    }

    pub fn observe_request(&self, endpoint: &str, outcome: &str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .observe(seconds);
    }

    pub fn record_phase(&self, phase: Phase) {
        self.phases
            .get_or_create(&PhaseLabels {
                phase: phase.as_str().to_string(),
            })
            .inc();
    }

    /// Embedded mode: how many manifest files fail to load now, and how many of those are
    /// served from their last good version.
    pub fn set_manifest_files(&self, invalid: usize, last_good: usize) {
        self.manifest_files_invalid
            .set(i64::try_from(invalid).unwrap_or(i64::MAX));
        self.manifest_files_last_good
            .set(i64::try_from(last_good).unwrap_or(i64::MAX));
    }

    /// Renders the OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
