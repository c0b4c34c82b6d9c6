//! `GET /metrics`: HTTP request counters and latency histograms, the active KV policy's numbers and
//! the paged KV pool, in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::policy::ServedPolicy;

/// Latency histogram bucket bounds, seconds (CPU decode of a few hundred tokens takes tens of seconds).
const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Debug, Default, Clone)]
struct Latency {
    /// Cumulative counts per bound of `LATENCY_BUCKETS`.
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Requests by (path, status) and latency by path. The latency of a streamed response is the time to
/// its headers (the first token), not to its end.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    inner: Mutex<(BTreeMap<(String, u16), u64>, BTreeMap<String, Latency>)>,
}

impl HttpMetrics {
    pub fn record(&self, path: &str, status: u16, elapsed: Duration) {
        // Unknown paths share one label so scanners cannot grow the map without bound.
        let path = if KNOWN_PATHS.contains(&path) { path } else { "other" };
        let mut inner = self.inner.lock().expect("metrics lock poisoned");
        *inner.0.entry((path.to_owned(), status)).or_default() += 1;
        let latency = inner.1.entry(path.to_owned()).or_default();
        let secs = elapsed.as_secs_f64();
        for (bucket, &bound) in latency.buckets.iter_mut().zip(&LATENCY_BUCKETS) {
            *bucket += u64::from(secs <= bound);
        }
        latency.count += 1;
        latency.sum += secs;
    }

    fn render(&self, text: &mut String) {
        let inner = self.inner.lock().expect("metrics lock poisoned");
        let _ = writeln!(text, "# HELP mistralrs_http_requests_total HTTP requests by path and status\n# TYPE mistralrs_http_requests_total counter");
        for ((path, status), n) in &inner.0 {
            let _ = writeln!(text, "mistralrs_http_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(text, "# HELP mistralrs_http_request_duration_seconds Time to the response headers, by path\n# TYPE mistralrs_http_request_duration_seconds histogram");
        for (path, l) in &inner.1 {
            for (bound, n) in LATENCY_BUCKETS.iter().zip(&l.buckets) {
                let _ = writeln!(text, "mistralrs_http_request_duration_seconds_bucket{{path=\"{path}\",le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(text, "mistralrs_http_request_duration_seconds_bucket{{path=\"{path}\",le=\"+Inf\"}} {}", l.count);
            let _ = writeln!(text, "mistralrs_http_request_duration_seconds_sum{{path=\"{path}\"}} {}", l.sum);
            let _ = writeln!(text, "mistralrs_http_request_duration_seconds_count{{path=\"{path}\"}} {}", l.count);
        }
    }
}

/// The paths the server routes (upstream's OpenAI API plus ours), for bounded label values.
const KNOWN_PATHS: [&str; 10] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/embeddings",
    "/v1/responses",
    "/health",
    "/metrics",
    "/",
    "/docs",
    "/re_isq",
];

/// The exposition text for the HTTP counters, `policy` (`None` without paged attention) and the KV
/// pool's free blocks.
pub fn render(http: &HttpMetrics, policy: Option<&dyn ServedPolicy>, free_kv_blocks: Option<usize>) -> String {
    let mut text = String::new();
    http.render(&mut text);
    let mut family = |name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(text, "# HELP mistralrs_kv_{name} {help}\n# TYPE mistralrs_kv_{name} {kind}\nmistralrs_kv_{name} {value}");
    };
    family("preemptions_total", "Prefilled sequences the scheduler preempted (KV blocks freed, to be computed again)", "counter", crate::policy::preemptions() as f64);
    if let Some(free) = free_kv_blocks {
        family("blocks_free", "Free blocks in the paged KV pool (prefix-cache entries count as free)", "gauge", free as f64);
    }
    if let Some(policy) = policy {
        for m in policy.metrics() {
            family(m.name, m.help, m.kind, m.value);
        }
        let _ = writeln!(
            text,
            "# HELP mistralrs_kv_policy_info The active KV policy\n# TYPE mistralrs_kv_policy_info gauge\nmistralrs_kv_policy_info{{policy=\"{}\"}} 1",
            policy.name()
        );
    }
    text
}

/// The `/metrics` text: HTTP numbers, the policy's, the KV pool's and the tensor-parallel rank.
fn metrics_text(http: &HttpMetrics, policy: Option<&dyn ServedPolicy>, ring: Option<&super::tp::RingRank>) -> String {
    let mut text = render(http, policy, mistralrs_core::kv_policy::free_kv_blocks());
    text.push_str(&super::tp::metrics_text(ring));
    text
}

pub(super) fn metrics_route(
    http: std::sync::Arc<HttpMetrics>,
    policy: Option<std::sync::Arc<dyn ServedPolicy>>,
    ring: Option<super::tp::RingRank>,
) -> axum::routing::MethodRouter {
    axum::routing::get(move || {
        let text = metrics_text(&http, policy.as_deref(), ring.as_ref());
        async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use crate::policy::PolicyKind;

    #[test]
    fn every_sample_has_help_and_type_and_parses_as_a_number() {
        let policy = PolicyConfig::new(PolicyKind::Retro).build();
        let http = HttpMetrics::default();
        http.record("/v1/completions", 200, Duration::from_millis(300));
        http.record("/v1/completions", 200, Duration::from_secs(3));
        http.record("/wp-admin", 404, Duration::from_millis(1));
        let text = render(&http, Some(policy.as_ref()), Some(12));
        assert!(text.contains("mistralrs_http_requests_total{path=\"/v1/completions\",status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("mistralrs_http_requests_total{path=\"other\",status=\"404\"} 1\n"), "{text}");
        assert!(text.contains("mistralrs_http_request_duration_seconds_bucket{path=\"/v1/completions\",le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("mistralrs_http_request_duration_seconds_bucket{path=\"/v1/completions\",le=\"5\"} 2\n"), "{text}");
        assert!(text.contains("mistralrs_http_request_duration_seconds_count{path=\"/v1/completions\"} 2\n"), "{text}");
        assert!(text.contains("mistralrs_kv_blocks_free 12\n"), "{text}");
        assert!(text.contains("mistralrs_kv_retro_output_cache_blocks_in_use 0\n"), "{text}");
        assert!(text.contains("mistralrs_kv_policy_info{policy=\"retro\"} 1"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            let bare = name.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| bare.strip_suffix(s).filter(|f| text.contains(&format!("# TYPE {f} histogram"))))
                .unwrap_or(bare);
            assert!(text.contains(&format!("# TYPE {family} ")), "no TYPE for {bare}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
