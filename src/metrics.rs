//! Prometheus metrics: one struct of typed families, registered once on a private registry and
//! passed down. Labels are low-cardinality by construction: route and limit names from config,
//! fixed enums for the rest; a key value is never a label.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What became of a request, as the `decision` label of `tollgate_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestDecision {
    Allowed,
    Limited,
    ShadowLimited,
    NoRoute,
    FallbackAllowed,
    FallbackLimited,
    /// Refused with 400 before any limit was decided: a path with no normal form, or a key
    /// source repeated with different values.
    BadRequest,
}

impl RequestDecision {
    pub const ALL: [RequestDecision; 7] = [
        RequestDecision::Allowed,
        RequestDecision::Limited,
        RequestDecision::ShadowLimited,
        RequestDecision::NoRoute,
        RequestDecision::FallbackAllowed,
        RequestDecision::FallbackLimited,
        RequestDecision::BadRequest,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RequestDecision::Allowed => "allowed",
            RequestDecision::Limited => "limited",
            RequestDecision::ShadowLimited => "shadow_limited",
            RequestDecision::NoRoute => "no_route",
            RequestDecision::FallbackAllowed => "fallback_allowed",
            RequestDecision::FallbackLimited => "fallback_limited",
            RequestDecision::BadRequest => "bad_request",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Every `decision` label, in [`RequestDecision::ALL`] order.
pub const DECISIONS: [&str; 7] = [
    "allowed",
    "limited",
    "shadow_limited",
    "no_route",
    "fallback_allowed",
    "fallback_limited",
    "bad_request",
];
/// Store error kinds as the `kind` label of `tollgate_store_errors_total`.
pub const STORE_ERROR_KINDS: [&str; 3] = ["timeout", "connection", "script"];
/// Response classes as the `class` label of `tollgate_upstream_responses_total`.
pub const UPSTREAM_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "error"];
/// The `route` label of requests that matched no route.
pub const NO_ROUTE_LABEL: &str = "";

/// A route's series, resolved once (a label lookup hashes the label values: not per request).
pub struct RouteStats {
    /// In the order of [`DECISIONS`].
    decisions: Vec<IntCounter>,
    /// In the order of [`UPSTREAM_CLASSES`].
    upstream: Vec<IntCounter>,
    pub upstream_duration: prometheus::Histogram,
}

impl std::fmt::Debug for RouteStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteStats")
    }
}

impl RouteStats {
    /// The counter of a decision.
    pub fn decision(&self, decision: RequestDecision) -> &IntCounter {
        &self.decisions[decision.index()]
    }

    /// The counter of an upstream class (one of [`UPSTREAM_CLASSES`]).
    pub fn upstream(&self, class: &str) -> Option<&IntCounter> {
        UPSTREAM_CLASSES
            .iter()
            .position(|c| *c == class)
            .and_then(|i| self.upstream.get(i))
    }
}

/// Every metric family the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub decision_duration: HistogramVec,
    pub store_errors: IntCounterVec,
    pub breaker_state: IntGauge,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    /// TLS certificate pairs (re)loaded into a running listener, by result.
    pub tls_cert_reloads: IntCounterVec,
    pub upstream_responses: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub memory_buckets: IntGaugeVec,
    pub in_flight: IntGauge,
    pub runtime_tasks: IntGaugeVec,
    pub deny_cache_hits: IntCounter,
    /// Resolved series used on every request.
    pub no_route: IntCounter,
    /// Requests refused with 400 before a route was chosen (route label "").
    pub bad_request: IntCounter,
    pub proxy_tasks: IntGauge,
    /// Rate-limit service calls by domain (configured names; "" for any other) and decision.
    pub rls_requests: IntCounterVec,
    /// Runtime override changes made through this instance's admin API, by action.
    pub override_changes: IntCounterVec,
    /// Runtime overrides held (as this instance last loaded them).
    pub overrides_held: IntGauge,
    /// Requests Redis charged after their decision had been given up (and that were refunded),
    /// counted by every Redis store this process builds (a reload's new store adds to it).
    pub redis_late_refunds: Arc<AtomicU64>,
}

/// A counter whose value is read from an atomic at scrape time: the Redis store counts into
/// the atomic without knowing about Prometheus, and stores swapped in by reloads share it.
struct PulledCounter {
    desc: prometheus::core::Desc,
    value: Arc<AtomicU64>,
}

impl PulledCounter {
    fn new(name: &str, help: &str, value: Arc<AtomicU64>) -> prometheus::Result<PulledCounter> {
        Ok(PulledCounter {
            desc: prometheus::core::Desc::new(
                name.into(),
                help.into(),
                Vec::new(),
                Default::default(),
            )?,
            value,
        })
    }
}

impl prometheus::core::Collector for PulledCounter {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut counter = prometheus::proto::Counter::default();
        // Counts stay far below 2^53: exact as a double.
        counter.set_value(self.value.load(Ordering::Relaxed) as f64);
        let mut family = prometheus::proto::MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(prometheus::proto::MetricType::COUNTER);
        let mut metric = prometheus::proto::Metric::default();
        metric.set_counter(counter);
        family.set_metric(vec![metric]);
        vec![family]
    }
}

fn fail(e: prometheus::Error) -> String {
    format!("metric registration failed: {e}")
}

impl Metrics {
    pub fn new() -> Result<Metrics, String> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests by route and rate-limit decision",
            ),
            &["route", "decision"],
        )
        .map_err(fail)?;
        let decision_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_decision_duration_seconds",
                "Time to decide every limit of a request, by store",
            )
            .buckets(vec![
                0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001,
                0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
            &["store"],
        )
        .map_err(fail)?;
        let store_errors = IntCounterVec::new(
            Opts::new("tollgate_store_errors_total", "Failed store calls by kind"),
            &["kind"],
        )
        .map_err(fail)?;
        let breaker_state = IntGauge::new(
            "tollgate_breaker_state",
            "Redis circuit breaker: 0 closed, 1 open, 2 half-open",
        )
        .map_err(fail)?;
        let config_reloads = IntCounterVec::new(
            Opts::new("tollgate_config_reloads_total", "Config reloads by result"),
            &["result"],
        )
        .map_err(fail)?;
        let tls_cert_reloads = IntCounterVec::new(
            Opts::new(
                "tollgate_tls_cert_reloads_total",
                "TLS certificate pairs re-read after their files or the config changed, by result \
                 (error: the previous pair keeps serving)",
            ),
            &["result"],
        )
        .map_err(fail)?;
        let config_generation = IntGauge::new(
            "tollgate_config_generation",
            "Generation of the config in force (1 = as started)",
        )
        .map_err(fail)?;
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_responses_total",
                "Upstream responses by route and status class",
            ),
            &["route", "class"],
        )
        .map_err(fail)?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_upstream_duration_seconds",
                "Time from sending upstream to the upstream's response header, by route",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["route"],
        )
        .map_err(fail)?;
        let memory_buckets = IntGaugeVec::new(
            Opts::new(
                "tollgate_memory_buckets",
                "Buckets held in memory, and the most that will be held",
            ),
            &["state"],
        )
        .map_err(fail)?;
        let in_flight = IntGauge::new(
            "tollgate_requests_in_flight",
            "Requests being processed by the proxy",
        )
        .map_err(fail)?;
        let runtime_tasks = IntGaugeVec::new(
            Opts::new(
                "tollgate_runtime_alive_tasks",
                "Tokio tasks alive on the proxy and store runtimes (a leak shows as growth)",
            ),
            &["runtime"],
        )
        .map_err(fail)?;
        let deny_cache_hits = IntCounter::new(
            "tollgate_deny_cache_hits_total",
            "Denials answered from memory without a Redis call (the bucket cannot admit yet)",
        )
        .map_err(fail)?;
        let rls_requests = IntCounterVec::new(
            Opts::new(
                "tollgate_rls_requests_total",
                "Rate-limit service (ShouldRateLimit) calls by domain and decision; domain is \
                 \"\" for domains not in the config",
            ),
            &["domain", "decision"],
        )
        .map_err(fail)?;
        let override_changes = IntCounterVec::new(
            Opts::new(
                "tollgate_override_changes_total",
                "Runtime override changes made through this instance's admin API, by action \
                 (set, unlimited, block, delete)",
            ),
            &["action"],
        )
        .map_err(fail)?;
        let overrides_held = IntGauge::new(
            "tollgate_overrides",
            "Runtime overrides held, as this instance last loaded them",
        )
        .map_err(fail)?;
        let redis_late_refunds = Arc::new(AtomicU64::new(0));
        let late_refunds_counter = PulledCounter::new(
            "tollgate_redis_late_refunds_total",
            "Requests Redis charged after the gateway had given up on the reply (past \
             timeout_ms, decided by the fallback instead); each charge is given back, as much \
             of it as the bucket still holds",
            redis_late_refunds.clone(),
        )
        .map_err(fail)?;
        for c in [
            Box::new(late_refunds_counter) as Box<dyn prometheus::core::Collector>,
            Box::new(rls_requests.clone()),
            Box::new(override_changes.clone()),
            Box::new(overrides_held.clone()),
            Box::new(runtime_tasks.clone()),
            Box::new(deny_cache_hits.clone()),
            Box::new(requests.clone()),
            Box::new(decision_duration.clone()),
            Box::new(store_errors.clone()),
            Box::new(breaker_state.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_generation.clone()),
            Box::new(tls_cert_reloads.clone()),
            Box::new(upstream_responses.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(memory_buckets.clone()),
            Box::new(in_flight.clone()),
        ] {
            registry.register(c).map_err(fail)?;
        }
        for kind in STORE_ERROR_KINDS {
            store_errors.with_label_values(&[kind]);
        }
        for action in ["set", "unlimited", "block", "delete"] {
            override_changes.with_label_values(&[action]);
        }
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
            tls_cert_reloads.with_label_values(&[result]);
        }
        let no_route = requests.with_label_values(&[NO_ROUTE_LABEL, "no_route"]);
        let bad_request = requests.with_label_values(&[NO_ROUTE_LABEL, "bad_request"]);
        let proxy_tasks = runtime_tasks.with_label_values(&["proxy"]);
        Ok(Metrics {
            registry,
            requests,
            decision_duration,
            store_errors,
            breaker_state,
            config_reloads,
            config_generation,
            tls_cert_reloads,
            upstream_responses,
            upstream_duration,
            memory_buckets,
            in_flight,
            runtime_tasks,
            deny_cache_hits,
            no_route,
            bad_request,
            proxy_tasks,
            rls_requests,
            override_changes,
            overrides_held,
            redis_late_refunds,
        })
    }

    /// The decision-duration histogram of a store label (a handle: resolve it once).
    pub fn decision_duration(&self, store: &str) -> prometheus::Histogram {
        self.decision_duration.with_label_values(&[store])
    }

    /// Resolves a route's series once.
    pub fn route_stats(&self, route: &str) -> RouteStats {
        RouteStats {
            decisions: RequestDecision::ALL
                .iter()
                .map(|d| {
                    let label = if *d == RequestDecision::NoRoute {
                        NO_ROUTE_LABEL
                    } else {
                        route
                    };
                    self.requests.with_label_values(&[label, d.label()])
                })
                .collect(),
            upstream: UPSTREAM_CLASSES
                .iter()
                .map(|c| self.upstream_responses.with_label_values(&[route, c]))
                .collect(),
            upstream_duration: self.upstream_duration.with_label_values(&[route]),
        }
    }

    /// Creates the series of a route at 0 so dashboards see them before the first request.
    pub fn touch_route(&self, route: &str, store_label: &str) {
        for decision in DECISIONS {
            if decision != "no_route" {
                self.requests.with_label_values(&[route, decision]);
            }
        }
        for class in UPSTREAM_CLASSES {
            self.upstream_responses.with_label_values(&[route, class]);
        }
        self.upstream_duration.with_label_values(&[route]);
        self.decision_duration.with_label_values(&[store_label]);
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// The `class` label for an upstream status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
