//! Operations: request ids on every answer, a queue-wait limit answered 503, one JSON log line per request, and
//! refusals by reason on /metrics. Alone in its binary because it installs a global (JSON) log subscriber.

mod common;

use std::time::{Duration, Instant};

use beit_server::ServerConfig;
use common::*;
use hyper::Method;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id() {
    capture_logs(true);
    let model = model_dir("cls_single");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    let png = image_bytes("chelsea.png");
    let post = |id: Option<&'static str>, body: Vec<u8>| {
        let http = http.clone();
        async move {
            let mut headers = vec![("content-type", "image/png")];
            headers.extend(id.map(|id| ("x-request-id", id)));
            http.send_with(Method::POST, "/classify", &headers, body).await.unwrap()
        }
    };

    // The client's id, if usable, comes back; otherwise the server names the request.
    let a = post(Some("client-id_42.x:y"), png.clone()).await;
    assert_eq!((a.status.as_u16(), a.headers["x-request-id"].to_str().unwrap()), (200, "client-id_42.x:y"));
    let mut seen = std::collections::HashSet::new();
    for bad in [None, Some("has space"), Some("")] {
        let a = post(bad, png.clone()).await;
        let id = a.headers["x-request-id"].to_str().unwrap().to_string();
        assert!(!id.is_empty() && Some(id.as_str()) != bad, "{bad:?} -> {id}");
        assert!(seen.insert(id), "ids repeat");
    }
    let long = "x".repeat(129);
    let a = http.send_with(Method::GET, "/health", &[("x-request-id", &long)], Vec::new()).await.unwrap();
    assert_ne!(a.headers["x-request-id"], long.as_str());

    // Error bodies name the request too, whichever layer wrote them.
    let bad_image = post(Some("bad-image-1"), b"junk".to_vec()).await;
    let not_found = http.send_with(Method::GET, "/nope", &[("x-request-id", "lost-1")], Vec::new()).await.unwrap();
    for (a, id) in [(bad_image, "bad-image-1"), (not_found, "lost-1")] {
        assert_eq!(a.headers["x-request-id"], id);
        assert_eq!(a.json()["request_id"], id, "{}", a.text());
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_json_log_line_per_request() {
    capture_logs(true);
    let model = model_dir("cls_single");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    let headers = [("content-type", "image/png"), ("x-request-id", "json-log-1")];
    let a = http.send_with(Method::POST, "/classify?top_k=2", &headers, image_bytes("chelsea.png")).await.unwrap();
    assert_eq!(a.status, 200);
    let headers = [("content-type", "image/png"), ("x-request-id", "json-log-2")];
    assert_eq!(http.send_with(Method::POST, "/classify", &headers, b"junk".to_vec()).await.unwrap().status, 400);

    let line = |id: &str| -> Value {
        let lines = logged(&format!("\"request_id\":\"{id}\""));
        assert_eq!(lines.len(), 1, "one line per request: {lines:?}");
        serde_json::from_str(&lines[0]).unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", lines[0]))
    };
    let ok = line("json-log-1");
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["target"], "beit_server::access");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], "/classify", "the query string stays out of the log");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["batch_size"], 1);
    assert!(ok["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{ok}");
    assert!(ok["time"].as_str().is_some_and(|t| t.len() == 24 && t.ends_with('Z')), "{ok}");
    let bad = line("json-log-2");
    assert_eq!(bad["status"], 400);
    assert!(bad.get("batch_size").is_none(), "no model call, no batch size: {bad}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_too_long_in_the_queue_is_answered_503() {
    capture_logs(true);
    let limit = Duration::from_millis(300);
    let cfg = ServerConfig { max_batch_size: 1, max_queue_wait: Some(limit), ..config("slow") };
    let server = start_slow(cfg, Duration::from_millis(1500)).await;
    let http = Http::new(&server);
    let busy = {
        let http = http.clone();
        tokio::spawn(async move { http.post("/classify", "image/png", image_bytes("chelsea.png")).await })
    };
    // The first request is on the model thread; the second waits behind it, past the limit.
    for _ in 0..1000 {
        let m = server.metrics();
        let in_flight = m.in_flight.load(std::sync::atomic::Ordering::SeqCst);
        if in_flight == 1 && m.queue_depth.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let late = http.post("/classify", "image/png", image_bytes("camera.png")).await;
    let waited = started.elapsed();
    assert_eq!(late.status, 503, "{}", late.text());
    assert_eq!(late.json()["error_type"], "queue_timeout");
    assert_eq!(late.headers["retry-after"], "1");
    assert!(waited >= limit && waited < Duration::from_millis(1400), "answered after {waited:?}, not at the limit");
    let first = busy.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.text());

    // The expired request never ran; the refusal is counted by reason, the wait observed.
    let m = http.get("/metrics").await.text();
    assert!(m.contains("beit_batch_size_count 1\n"), "{m}");
    assert!(m.contains("beit_requests_rejected_by_reason_total{reason=\"queue_timeout\"} 1\n"), "{m}");
    assert!(m.contains("beit_queue_wait_seconds_count 1\n"), "{m}");
    // Room again, and served.
    assert_eq!(http.post("/classify", "image/png", image_bytes("chelsea.png")).await.status, 200);
    server.shutdown().await.unwrap();
}
