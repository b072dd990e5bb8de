//! Logs and metrics: `tracing` set-up (text or JSON lines) and the counters and latency histograms served at `/metrics` in the Prometheus text format.
//!
//! Nothing here ever receives a resource body, a token or a key: request logs carry the route
//! template (`/{type}/{id}`), never the URL, whose query string may hold identifiers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber; `RUST_LOG` wins over the configured level. Idempotent.
pub fn init(config: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&config.level)).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// The gateway's metrics; one instance per server, shared by the HTTP layer and the store.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (route, method, status) → latency histogram.
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    /// Store operation → latency histogram.
    store: Mutex<BTreeMap<&'static str, Histogram>>,
    validation_failures: AtomicU64,
    token_grants: AtomicU64,
    /// Reason → count.
    token_denials: Mutex<BTreeMap<String, u64>>,
    /// (partner, outcome: delivered | retry | refused) → attempt duration histogram.
    deliveries: Mutex<BTreeMap<(String, &'static str), Histogram>>,
    /// Partner → time from queueing to the partner's acceptance.
    delivery_latency: Mutex<BTreeMap<String, Histogram>>,
}

/// The method label of a request: a known method, or `other`. A method is whatever token the client
/// sends, so using it as sent would let anyone grow the metrics without bound.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// The outbox as it stands: (partner, status) → (messages, creation time of the oldest in ms), read from the store when metrics are served.
pub type QueueDepth = Vec<(String, String, i64, i64)>;

impl Metrics {
    /// Records one delivery attempt. Partner names come from the configuration, so the labels are bounded.
    pub fn observe_delivery(&self, partner: &str, outcome: &'static str, duration: Duration) {
        if let Ok(mut map) = self.deliveries.lock() {
            map.entry((partner.to_string(), outcome)).or_default().observe(duration.as_secs_f64());
        }
    }

    /// Records the time a message took from being queued to being accepted by its partner.
    pub fn observe_delivered(&self, partner: &str, latency: Duration) {
        if let Ok(mut map) = self.delivery_latency.lock() {
            map.entry(partner.to_string()).or_default().observe(latency.as_secs_f64());
        }
    }

    /// The outbox gauges in the Prometheus text format (queue depth by partner and status, age of the oldest pending message).
    pub fn render_queue(depth: &QueueDepth, now_ms: i64) -> String {
        let mut out = String::from("# HELP iop_outbox_messages Outbound messages by partner and status.\n# TYPE iop_outbox_messages gauge\n");
        for (partner, status, count, _) in depth {
            let _ = writeln!(out, "iop_outbox_messages{{partner=\"{}\",status=\"{}\"}} {count}", escape(partner), escape(status));
        }
        out.push_str("# HELP iop_outbox_oldest_pending_seconds Age of the oldest message waiting for each partner.\n# TYPE iop_outbox_oldest_pending_seconds gauge\n");
        for (partner, _, _, oldest) in depth.iter().filter(|(_, status, _, _)| status == "pending" || status == "in-flight") {
            let _ = writeln!(out, "iop_outbox_oldest_pending_seconds{{partner=\"{}\"}} {:.3}", escape(partner), (now_ms - oldest).max(0) as f64 / 1000.0);
        }
        out
    }

    /// Records a request; the method is reduced to [`method_label`] here, whatever the caller passes.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, latency: Duration) {
        if let Ok(mut map) = self.requests.lock() {
            map.entry((route.to_string(), method_label(method).to_string(), status)).or_default().observe(latency.as_secs_f64());
        }
    }

    pub fn observe_store(&self, operation: &'static str, latency: Duration) {
        if let Ok(mut map) = self.store.lock() {
            map.entry(operation).or_default().observe(latency.as_secs_f64());
        }
    }

    pub fn validation_failed(&self) {
        self.validation_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn token_granted(&self) {
        self.token_grants.fetch_add(1, Ordering::Relaxed);
    }

    pub fn token_denied(&self, reason: &str) {
        if let Ok(mut map) = self.token_denials.lock() {
            *map.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP iop_http_request_duration_seconds HTTP requests by route template, method and status.\n");
        out.push_str("# TYPE iop_http_request_duration_seconds histogram\n");
        if let Ok(map) = self.requests.lock() {
            for ((route, method, status), histogram) in map.iter() {
                let labels = format!("route=\"{}\",method=\"{}\",status=\"{status}\"", escape(route), escape(method));
                histogram.render(&mut out, "iop_http_request_duration_seconds", &labels);
            }
        }
        out.push_str("# HELP iop_store_operation_duration_seconds Store operations by kind.\n");
        out.push_str("# TYPE iop_store_operation_duration_seconds histogram\n");
        if let Ok(map) = self.store.lock() {
            for (operation, histogram) in map.iter() {
                histogram.render(&mut out, "iop_store_operation_duration_seconds", &format!("operation=\"{operation}\""));
            }
        }
        out.push_str("# HELP iop_validation_failures_total Writes refused because the resource did not validate.\n");
        out.push_str("# TYPE iop_validation_failures_total counter\n");
        let _ = writeln!(out, "iop_validation_failures_total {}", self.validation_failures.load(Ordering::Relaxed));
        out.push_str("# HELP iop_token_grants_total Access tokens issued.\n# TYPE iop_token_grants_total counter\n");
        let _ = writeln!(out, "iop_token_grants_total {}", self.token_grants.load(Ordering::Relaxed));
        out.push_str("# HELP iop_outbox_attempt_duration_seconds Delivery attempts by partner and outcome.\n");
        out.push_str("# TYPE iop_outbox_attempt_duration_seconds histogram\n");
        if let Ok(map) = self.deliveries.lock() {
            for ((partner, outcome), histogram) in map.iter() {
                histogram.render(&mut out, "iop_outbox_attempt_duration_seconds", &format!("partner=\"{}\",outcome=\"{outcome}\"", escape(partner)));
            }
        }
        out.push_str("# HELP iop_outbox_delivery_latency_seconds Time from queueing to the partner's acceptance.\n");
        out.push_str("# TYPE iop_outbox_delivery_latency_seconds histogram\n");
        if let Ok(map) = self.delivery_latency.lock() {
            for (partner, histogram) in map.iter() {
                histogram.render(&mut out, "iop_outbox_delivery_latency_seconds", &format!("partner=\"{}\"", escape(partner)));
            }
        }
        out.push_str("# HELP iop_token_denials_total Token requests refused, by reason.\n# TYPE iop_token_denials_total counter\n");
        if let Ok(map) = self.token_denials.lock() {
            for (reason, count) in map.iter() {
                let _ = writeln!(out, "iop_token_denials_total{{reason=\"{}\"}} {count}", escape(reason));
            }
        }
        out
    }
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histograms_and_counters_in_prometheus_text() {
        let m = Metrics::default();
        m.observe_request("/{type}/{id}", "GET", 200, Duration::from_millis(3));
        m.observe_store("read", Duration::from_millis(1));
        m.token_denied("invalid_client");
        m.validation_failed();
        let text = m.render();
        assert!(text.contains("iop_http_request_duration_seconds_bucket{route=\"/{type}/{id}\",method=\"GET\",status=\"200\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("iop_http_request_duration_seconds_bucket{route=\"/{type}/{id}\",method=\"GET\",status=\"200\",le=\"0.0025\"} 0"));
        assert!(text.contains("iop_token_denials_total{reason=\"invalid_client\"} 1"));
        assert!(text.contains("iop_validation_failures_total 1"));
    }

    #[test]
    fn made_up_methods_share_one_label() {
        let m = Metrics::default();
        for i in 0..100 {
            m.observe_request("/{type}", &format!("X{i}"), 405, Duration::from_millis(1));
        }
        m.observe_request("/{type}", "get", 405, Duration::from_millis(1));
        let text = m.render();
        assert!(!text.contains("X1") && !text.contains("\"get\""), "{text}");
        assert_eq!(text.matches("method=\"other\",status=\"405\",le=\"+Inf\"} 101").count(), 1, "{text}");
    }
}
