//! A bounded load test on loopback: 200 requests at concurrency 16, good ones (raw, JSON and multipart PNGs) mixed
//! with bad ones, against an in-process server with batching on. Every good answer must equal what
//! `Pipeline::classify` gives in-process, every bad one its 4xx; the server stays up and its memory bounded.
//! Alone in its binary so that the memory reading is this test's.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beit::processor::load_image;
use common::*;
use serde_json::Value;

const REQUESTS: usize = 200;
const CONCURRENCY: usize = 16;
const MAX_BODY: usize = 1 << 20;
const MAX_PIXELS: u64 = 300_000;

#[derive(Clone)]
enum Case {
    /// A fixture image, sent one way, with this top_k; the expected JSON.
    Good {
        path: String,
        content_type: String,
        body: Vec<u8>,
        expected: Value,
    },
    Bad {
        what: &'static str,
        path: String,
        content_type: String,
        body: Vec<u8>,
        status: u16,
        error_type: &'static str,
    },
}

fn png_of(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn cases() -> Vec<Case> {
    let pipe = load_pipeline(&model_dir("cls_single")).unwrap();
    let mut good = Vec::new();
    for (n, name) in png_names().into_iter().enumerate() {
        let bytes = image_bytes(&name);
        let img = load_image(image_path(&name)).unwrap();
        let top_k = [5, 3, 1][n % 3];
        // Through JSON text, as the server writes it (f32 scores in their shortest form).
        let preds = &pipe.classify(std::slice::from_ref(&img), top_k).unwrap()[0];
        let expected: Value = serde_json::from_str(&serde_json::to_string(preds).unwrap()).unwrap();
        let (mct, mbody) = multipart("file", &name, &bytes, &[("top_k", &top_k.to_string())]);
        let json = serde_json::json!({"inputs": base64(&bytes), "parameters": {"top_k": top_k}}).to_string();
        let path = format!("/classify?top_k={top_k}");
        good.push(Case::Good {
            path: path.clone(),
            content_type: "image/png".into(),
            body: bytes.clone(),
            expected: expected.clone(),
        });
        good.push(Case::Good {
            path: "/classify".into(),
            content_type: "application/json".into(),
            body: json.into_bytes(),
            expected: expected.clone(),
        });
        good.push(Case::Good { path: "/classify".into(), content_type: mct, body: mbody, expected });
    }
    let chelsea = image_bytes("chelsea.png");
    let bad = |what, content_type: &str, body: Vec<u8>, status, error_type| Case::Bad {
        what,
        path: "/classify".into(),
        content_type: content_type.into(),
        body,
        status,
        error_type,
    };
    let bads = vec![
        bad(
            "garbage bytes",
            "application/octet-stream",
            b"this is not an image, just bytes".repeat(20),
            400,
            "invalid_image",
        ),
        bad("truncated PNG", "image/png", chelsea[..chelsea.len() / 2].to_vec(), 400, "invalid_image"),
        bad("oversized body", "image/png", vec![0x89; MAX_BODY + 1], 413, "payload_too_large"),
        bad("image over the pixel limit", "image/png", png_of(600, 600), 400, "image_too_large"),
        bad("wrong JSON field type", "application/json", br#"{"inputs": 5}"#.to_vec(), 400, "validation"),
        bad("not JSON", "application/json", b"{\"inputs\": ".to_vec(), 400, "validation"),
        bad("bad base64", "application/json", br#"{"inputs": "%%%"}"#.to_vec(), 400, "validation"),
        bad("empty body", "image/png", Vec::new(), 400, "invalid_image"),
        Case::Bad {
            what: "top_k=0",
            path: "/classify?top_k=0".into(),
            content_type: "image/png".into(),
            body: chelsea.clone(),
            status: 400,
            error_type: "validation",
        },
        Case::Bad {
            what: "segment on a classification model",
            path: "/segment".into(),
            content_type: "image/png".into(),
            body: chelsea,
            status: 400,
            error_type: "unsupported",
        },
    ];
    // 7 good for every 3 bad.
    let mut out = Vec::with_capacity(REQUESTS);
    let (mut g, mut b) = (0, 0);
    for i in 0..REQUESTS {
        if i % 10 < 7 {
            out.push(good[g % good.len()].clone());
            g += 1;
        } else {
            out.push(bads[b % bads.len()].clone());
            b += 1;
        }
    }
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_mixed_good_and_bad_requests() {
    let started = Instant::now();
    let model = model_dir("cls_single");
    let cases = Arc::new(cases());
    let cfg = beit_server::ServerConfig {
        max_batch_size: 8,
        max_batch_delay: Duration::from_millis(5),
        max_queue: 256,
        max_body_bytes: MAX_BODY,
        max_image_pixels: MAX_PIXELS,
        ..config(&model)
    };
    let server = start(&model, cfg).await;
    let http = Http::new(&server);
    // Warm up (first allocations of the model thread, the client pool), then take the memory baseline.
    for _ in 0..4 {
        assert_eq!(http.post("/classify", "image/png", image_bytes("chelsea.png")).await.status, 200);
    }
    let rss_before = rss_bytes();

    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (http, cases, next) = (http.clone(), cases.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let (mut good, mut bad) = (0usize, 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= cases.len() {
                    break;
                }
                match &cases[i] {
                    Case::Good { path, content_type, body, expected } => {
                        good += 1;
                        match http.send(hyper::Method::POST, path, Some(content_type), body.clone()).await {
                            Ok(a) if a.status == 200 && a.json() == *expected => {}
                            Ok(a) => failures.push(format!(
                                "#{i} {path} {content_type}: {} {} != {expected}",
                                a.status,
                                a.text()
                            )),
                            Err(e) => failures.push(format!("#{i} {path}: {e}")),
                        }
                    }
                    Case::Bad { what, path, content_type, body, status, error_type } => {
                        bad += 1;
                        match http.send(hyper::Method::POST, path, Some(content_type), body.clone()).await {
                            Ok(a) if a.status.as_u16() == *status && a.json()["error_type"] == *error_type => {
                                assert!(a.json()["error"].as_str().is_some_and(|s| !s.is_empty()));
                            }
                            Ok(a) => failures.push(format!(
                                "#{i} {what}: expected {status} {error_type}, got {} {}",
                                a.status,
                                a.text()
                            )),
                            // The server answers 413 from Content-Length and closes at once; a client still
                            // writing the body may see the closed socket before it reads the answer. Refused
                            // either way (the server staying up is checked below).
                            Err(e) if *status == 413 && format!("{e:?}").contains("BrokenPipe") => {}
                            Err(e) => failures.push(format!("#{i} {what}: {e}")),
                        }
                    }
                }
            }
            (failures, good, bad)
        }));
    }
    let (mut failures, mut good, mut bad) = (Vec::new(), 0, 0);
    for t in tasks {
        let (f, g, b) = tokio::time::timeout(Duration::from_secs(60), t).await.expect("load test timed out").unwrap();
        failures.extend(f);
        good += g;
        bad += b;
    }
    let elapsed = started.elapsed();
    assert!(failures.is_empty(), "{} of {REQUESTS} requests failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(good + bad, REQUESTS);

    // Still up, and the counters add up.
    let health = http.get("/health").await;
    assert_eq!(health.status, 200, "{}", health.text());
    let m = http.get("/metrics").await.text();
    let ok = metric(&m, "beit_requests_total{endpoint=\"/classify\",status=\"200\"}");
    assert_eq!(ok as usize, good + 4, "{m}");
    let batches = metric(&m, "beit_batch_size_count");
    let images = metric(&m, "beit_batch_size_sum");
    assert_eq!(images as usize, good + 4, "every good request ran exactly once:\n{m}");
    assert!(batches < images, "no request was batched with another ({batches} batches for {images} images)");
    assert_eq!(metric(&m, "beit_queue_depth"), 0.0);

    let rss_after = rss_bytes();
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "{REQUESTS} requests ({good} good, {bad} bad) at concurrency {CONCURRENCY}: {:.2}s; {batches} batches for {images} \
         images; RSS {} MB -> {} MB",
        elapsed.as_secs_f64(),
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(growth < 200 << 20, "memory grew by {} MB", growth >> 20);
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    server.shutdown().await.unwrap();
}
