//! A small Prometheus exporter (text exposition format 0.0.4), written by hand: the server has a fixed handful of
//! series, and this keeps it free of another dependency and its derive macros while giving exact control over the
//! names, labels and buckets.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Request latency buckets, seconds.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Batch size buckets.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = self.bounds.get(i).map(|b| format!("{b}")).unwrap_or_else(|| "+Inf".into());
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            let _ = writeln!(out, "{name}_bucket{} {cumulative}", label_set(&l));
        }
        let _ = writeln!(out, "{name}_sum{} {}", label_set(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", label_set(labels), self.count);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label_set(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", parts.join(","))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these plain counters half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    request_duration: Mutex<BTreeMap<String, Histogram>>,
    inference_duration: Mutex<BTreeMap<String, Histogram>>,
    batch_size: Mutex<Option<Histogram>>,
    queue_wait: Mutex<Option<Histogram>>,
    /// Requests in the batching queue, waiting for the model thread.
    pub queue_depth: AtomicUsize,
    /// Requests admitted and not yet answered (reading, decoding, queued or running).
    pub in_flight: AtomicUsize,
    /// Requests admitted and not yet queued (their body is being read or their image decoded): the model thread
    /// waits for these, up to the batch delay, and not at all when there are none.
    pub arriving: AtomicUsize,
    /// Queued requests dropped before they ran because their client had gone.
    pub cancelled: AtomicU64,
    /// Requests refused with 503 because the queue was full.
    pub rejected: AtomicU64,
    /// Refusals by reason (the answer's `error_type`: overloaded, queue_timeout, unauthorized, ...).
    rejections: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observe_request(&self, endpoint: &str, status: u16, elapsed: Duration) {
        *lock(&self.requests).entry((endpoint.to_string(), status)).or_default() += 1;
        lock(&self.request_duration)
            .entry(endpoint.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(elapsed.as_secs_f64());
    }

    /// One call of the model: its task, how many images, how long it took.
    pub fn observe_batch(&self, task: &str, size: usize, elapsed: Duration) {
        lock(&self.batch_size).get_or_insert_with(|| Histogram::new(BATCH_BUCKETS)).observe(size as f64);
        lock(&self.inference_duration)
            .entry(task.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_queue_wait(&self, waited: Duration) {
        lock(&self.queue_wait).get_or_insert_with(|| Histogram::new(LATENCY_BUCKETS)).observe(waited.as_secs_f64());
    }

    /// One request refused for `reason`.
    pub fn reject(&self, reason: &'static str) {
        *lock(&self.rejections).entry(reason).or_default() += 1;
    }

    /// How many requests were refused for `reason` so far.
    pub fn rejections(&self, reason: &str) -> u64 {
        lock(&self.rejections).get(reason).copied().unwrap_or(0)
    }

    /// How many requests were answered with this endpoint and status so far.
    pub fn requests(&self, endpoint: &str, status: u16) -> u64 {
        lock(&self.requests).get(&(endpoint.to_string(), status)).copied().unwrap_or(0)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        header(&mut out, "beit_requests_total", "counter", "HTTP requests answered, by endpoint and status code.");
        for ((endpoint, status), n) in lock(&self.requests).iter() {
            let status = status.to_string();
            let _ =
                writeln!(out, "beit_requests_total{} {n}", label_set(&[("endpoint", endpoint), ("status", &status)]));
        }

        header(&mut out, "beit_request_duration_seconds", "histogram", "Time from routing a request to its answer.");
        for (endpoint, h) in lock(&self.request_duration).iter() {
            h.render(&mut out, "beit_request_duration_seconds", &[("endpoint", endpoint)]);
        }

        header(
            &mut out,
            "beit_inference_duration_seconds",
            "histogram",
            "Time of one model call (one batch), by task.",
        );
        for (task, h) in lock(&self.inference_duration).iter() {
            h.render(&mut out, "beit_inference_duration_seconds", &[("task", task)]);
        }

        header(&mut out, "beit_batch_size", "histogram", "Images per model call.");
        let batch = lock(&self.batch_size).clone().unwrap_or_else(|| Histogram::new(BATCH_BUCKETS));
        batch.render(&mut out, "beit_batch_size", &[]);

        header(
            &mut out,
            "beit_queue_wait_seconds",
            "histogram",
            "Time a request waited in the queue before its batch ran.",
        );
        let wait = lock(&self.queue_wait).clone().unwrap_or_else(|| Histogram::new(LATENCY_BUCKETS));
        wait.render(&mut out, "beit_queue_wait_seconds", &[]);

        header(&mut out, "beit_queue_depth", "gauge", "Requests waiting in the batching queue.");
        let _ = writeln!(out, "beit_queue_depth {}", self.queue_depth.load(Ordering::Relaxed));
        header(&mut out, "beit_requests_in_flight", "gauge", "Requests admitted and not yet answered.");
        let _ = writeln!(out, "beit_requests_in_flight {}", self.in_flight.load(Ordering::Relaxed));
        header(
            &mut out,
            "beit_requests_arriving",
            "gauge",
            "Requests admitted whose body is being read or image decoded.",
        );
        let _ = writeln!(out, "beit_requests_arriving {}", self.arriving.load(Ordering::Relaxed));
        header(
            &mut out,
            "beit_requests_cancelled_total",
            "counter",
            "Queued requests dropped because the client disconnected.",
        );
        let _ = writeln!(out, "beit_requests_cancelled_total {}", self.cancelled.load(Ordering::Relaxed));
        header(
            &mut out,
            "beit_requests_rejected_total",
            "counter",
            "Requests refused with 503 because the queue was full.",
        );
        let _ = writeln!(out, "beit_requests_rejected_total {}", self.rejected.load(Ordering::Relaxed));
        header(
            &mut out,
            "beit_requests_rejected_by_reason_total",
            "counter",
            "Requests refused before an answer about their content, by reason (the answer's error_type).",
        );
        for (reason, n) in lock(&self.rejections).iter() {
            let _ = writeln!(out, "beit_requests_rejected_by_reason_total{} {n}", label_set(&[("reason", reason)]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_inf() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", &[("a", "q\"b")]);
        assert_eq!(
            out,
            "x_bucket{a=\"q\\\"b\",le=\"1\"} 2\nx_bucket{a=\"q\\\"b\",le=\"2\"} 3\nx_bucket{a=\"q\\\"b\",le=\"+Inf\"} 4\n\
             x_sum{a=\"q\\\"b\"} 6\nx_count{a=\"q\\\"b\"} 4\n"
        );
    }

    #[test]
    fn render_has_every_family() {
        let m = Metrics::new();
        m.observe_request("/classify", 200, Duration::from_millis(3));
        m.observe_request("/classify", 400, Duration::from_millis(1));
        m.observe_batch("classify", 3, Duration::from_millis(2));
        let text = m.render();
        assert!(text.contains("beit_requests_total{endpoint=\"/classify\",status=\"200\"} 1\n"), "{text}");
        assert!(text.contains("beit_requests_total{endpoint=\"/classify\",status=\"400\"} 1\n"), "{text}");
        assert!(text.contains("beit_batch_size_bucket{le=\"4\"} 1\n"), "{text}");
        assert!(text.contains("beit_batch_size_sum 3\n"), "{text}");
        assert!(text.contains("beit_queue_depth 0\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
        }
        assert_eq!(m.requests("/classify", 200), 1);
    }
}
