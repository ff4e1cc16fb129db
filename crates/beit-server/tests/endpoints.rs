//! The endpoints one by one: segment, embed, metrics, info, a full queue, a client that leaves, shutdown.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine;
use beit::pipeline::Pipeline;
use beit::processor::load_image;
use beit_server::ServerConfig;
use common::*;
use serde_json::Value;

fn as_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap()
}

fn in_flight(m: &beit_server::Metrics) -> usize {
    m.in_flight.load(std::sync::atomic::Ordering::SeqCst)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_answers_masks_and_pixel_shares() {
    let model = model_dir("seg_uper_aux1");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    let a = http.post("/segment", "image/png", image_bytes("chelsea.png")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let segs = a.json();
    let segs = segs.as_array().unwrap();
    assert!(!segs.is_empty());

    let pipe = load_pipeline(&model).unwrap();
    let img = load_image(image_path("chelsea.png")).unwrap();
    let (ids, (h, w)) = pipe.segment(std::slice::from_ref(&img)).unwrap().remove(0);
    assert_eq!((w as u32, h as u32), img.dimensions());
    let mut classes: Vec<u32> = ids.clone();
    classes.sort_unstable();
    classes.dedup();
    assert_eq!(segs.len(), classes.len());
    let mut covered = vec![0u32; ids.len()];
    for (seg, &class) in segs.iter().zip(&classes) {
        let label = pipe.pretrained.config.id2label.get(&(class as usize)).cloned().unwrap_or(format!("LABEL_{class}"));
        assert_eq!(seg["label"], label.as_str());
        let png = base64::engine::general_purpose::STANDARD.decode(seg["mask"].as_str().unwrap()).unwrap();
        let mask = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
        let mask = match mask {
            image::DynamicImage::ImageLuma8(m) => m,
            other => panic!("mask is {:?}, expected L8", other.color()),
        };
        assert_eq!(mask.dimensions(), img.dimensions());
        let mut n = 0;
        for (i, (&id, &v)) in ids.iter().zip(mask.as_raw()).enumerate() {
            assert_eq!(v, if id == class { 255 } else { 0 });
            if v == 255 {
                covered[i] += 1;
                n += 1;
            }
        }
        let share = n as f64 / ids.len() as f64;
        assert!((seg["score"].as_f64().unwrap() - share).abs() < 1e-6, "score {} vs share {share}", seg["score"]);
    }
    assert!(covered.iter().all(|&c| c == 1), "the masks must partition the image");
    server.shutdown().await.unwrap();
}

/// The class ids a /segment answer's masks paint.
fn painted_ids(segs: &Value, pipe: &Pipeline, (w, h): (u32, u32)) -> Vec<u32> {
    let mut ids = vec![u32::MAX; (w * h) as usize];
    for seg in segs.as_array().unwrap() {
        let label = seg["label"].as_str().unwrap();
        let id2label = &pipe.pretrained.config.id2label;
        let class = id2label.iter().find(|(_, l)| l.as_str() == label).map(|(i, _)| *i as u32).unwrap();
        let png = base64::engine::general_purpose::STANDARD.decode(seg["mask"].as_str().unwrap()).unwrap();
        let mask = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().to_luma8();
        assert_eq!(mask.dimensions(), (w, h));
        for (id, &v) in ids.iter_mut().zip(mask.as_raw()) {
            if v == 255 {
                *id = class;
            }
        }
    }
    ids
}

/// `mode: slide` in JSON parameters, a form or the query string: the library's sliding window, with the model's
/// defaults for what the request leaves out; mistakes are 400s naming the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_slides_windows_as_asked() {
    use beit::pipeline::SlideOptions;
    let model = model_dir("seg_uper_aux1");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    let pipe = load_pipeline(&model).unwrap();
    let img = load_image(image_path("chelsea.png")).unwrap();
    let bytes = image_bytes("chelsea.png");
    let want = |crop, stride, scale| pipe.segment_slide(&img, &SlideOptions { crop, stride, scale }).unwrap().0;
    let json = serde_json::json!({"inputs": base64(&bytes), "parameters": {"mode": "slide", "crop": [32, 32], "stride": 16, "scale": [96, 64]}});
    let a = http.post("/segment", "application/json", json.to_string().into_bytes()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(painted_ids(&a.json(), &pipe, img.dimensions()), want((32, 32), (16, 16), Some((96, 64))));
    // The query string, defaults from the model: crop = image_size 32, stride two thirds of it.
    let a = http.post("/segment?mode=slide&scale=80,48", "image/png", bytes.clone()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(painted_ids(&a.json(), &pipe, img.dimensions()), want((32, 32), (21, 21), Some((80, 48))));
    let (ct, body) = multipart("file", "chelsea.png", &bytes, &[("mode", "slide"), ("crop", "24,32"), ("scale", "64")]);
    let a = http.post("/segment", &ct, body).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(painted_ids(&a.json(), &pipe, img.dimensions()), want((24, 32), (16, 21), Some((64, 64))));
    for (path, params, status, says) in [
        ("/segment", serde_json::json!({"crop": 32}), 400, "need `mode`"),
        ("/segment", serde_json::json!({"mode": "tiles"}), 400, "`mode` must be"),
        ("/segment", serde_json::json!({"mode": "slide", "crop": [0, 3]}), 400, "`crop` must be"),
        (
            "/segment",
            serde_json::json!({"mode": "slide", "crop": 16, "stride": 20, "scale": 64}),
            400,
            "stride of at most",
        ),
        ("/embed", serde_json::json!({"mode": "slide"}), 400, "/segment's parameters"),
    ] {
        let json = serde_json::json!({"inputs": base64(&bytes), "parameters": params});
        let a = http.post(path, "application/json", json.to_string().into_bytes()).await;
        assert_eq!(a.status, status, "{params}: {}", a.text());
        assert!(a.text().contains(says), "{params}: {}", a.text());
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_answers_the_pooled_vector() {
    let model = model_dir("cls_single");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    let pipe = load_pipeline(&model).unwrap();
    let img = load_image(image_path("coffee.png")).unwrap();
    let expected = pipe.embed(std::slice::from_ref(&img), false).unwrap().to_vec2::<f32>().unwrap().remove(0);
    assert_eq!(expected.len(), pipe.pretrained.config.hidden_size);
    let body = serde_json::json!({"inputs": base64(&image_bytes("coffee.png"))}).to_string();
    let a = http.post("/embed", "application/json", body.into_bytes()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json(), as_json(&expected));
    // The segmentation model embeds too (no pooler: mean of the patch tokens as its config says).
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg_over_http_matches_the_library_decoder() {
    let model = model_dir("cls_single");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    let pipe = load_pipeline(&model).unwrap();
    for name in ["coffee_q90.jpg", "chelsea_q90_444.jpg"] {
        let img = load_image(image_path(name)).unwrap();
        let expected = as_json(&pipe.classify(std::slice::from_ref(&img), 5).unwrap()[0]);
        let a = http.post("/classify", "image/jpeg", image_bytes(name)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json(), expected, "{name}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_info_health_openapi() {
    let model = model_dir("cls_single");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    assert_eq!(http.post("/classify", "image/png", image_bytes("chelsea.png")).await.status, 200);
    assert_eq!(http.post("/classify", "image/png", b"junk".to_vec()).await.status, 400);
    assert_eq!(http.post("/embed", "image/png", image_bytes("camera.png")).await.status, 200);

    let m = http.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = m.text();
    for needle in [
        "# TYPE beit_requests_total counter",
        "beit_requests_total{endpoint=\"/classify\",status=\"200\"} 1\n",
        "beit_requests_total{endpoint=\"/classify\",status=\"400\"} 1\n",
        "beit_requests_total{endpoint=\"/embed\",status=\"200\"} 1\n",
        "# TYPE beit_request_duration_seconds histogram",
        "beit_request_duration_seconds_bucket{endpoint=\"/classify\",le=\"+Inf\"} 2\n",
        "beit_request_duration_seconds_count{endpoint=\"/classify\"} 2\n",
        "beit_inference_duration_seconds_count{task=\"classify\"} 1\n",
        "beit_inference_duration_seconds_count{task=\"embed\"} 1\n",
        "# TYPE beit_batch_size histogram",
        "beit_batch_size_count 2\n",
        "beit_batch_size_sum 2\n",
        "# TYPE beit_queue_depth gauge",
        "beit_queue_depth 0\n",
        "beit_requests_in_flight 0\n",
        "beit_requests_cancelled_total 0\n",
        "beit_requests_rejected_total 0\n",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }

    let info = http.get("/info").await;
    assert_eq!(info.status, 200);
    let info = info.json();
    assert_eq!(info["architecture"], "BeitForImageClassification");
    assert_eq!(info["tasks"], serde_json::json!(["classify", "embed"]));
    assert_eq!(info["config"]["hidden_size"], 32);
    assert_eq!(info["labels"].as_array().unwrap().len(), 5);
    assert_eq!(info["limits"]["max_batch_size"], 8);
    assert_eq!(info["limits"]["max_image_pixels"], 25_000_000);

    let h = http.get("/health").await;
    assert_eq!((h.status.as_u16(), h.json()["status"].clone()), (200, Value::from("ok")));

    let api = http.get("/openapi.json").await.json();
    assert!(api["openapi"].as_str().unwrap().starts_with("3."));
    for p in ["/classify", "/segment", "/embed", "/health", "/info", "/metrics", "/openapi.json"] {
        assert!(api["paths"][p].is_object(), "{p} missing from the OpenAPI document");
    }
    assert!(api["paths"]["/segment"]["post"]["description"].as_str().unwrap().contains("share of the image's pixels"));

    let nf = http.get("/nope").await;
    assert_eq!(nf.status, 404);
    assert_eq!(nf.json()["error_type"], "not_found");
    let nf = http.post("/nope", "image/png", Vec::new()).await;
    assert_eq!(nf.status, 404);
    let na = http.get("/classify").await;
    assert_eq!((na.status.as_u16(), na.json()["error_type"].clone()), (405, Value::from("method_not_allowed")));
    let text = http.get("/metrics").await.text();
    assert!(text.contains("beit_requests_total{endpoint=\"unmatched\",status=\"404\"} 2\n"), "{text}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let cfg = ServerConfig { max_queue: 1, max_batch_size: 1, ..config("slow") };
    let server = start_slow(cfg, Duration::from_millis(600)).await;
    let http = Http::new(&server);
    // One request runs, one waits: the queue is full.
    let first: Vec<_> = (0..2)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.post("/classify", "image/png", image_bytes("chelsea.png")).await.status })
        })
        .collect();
    wait_for(&server, "two requests admitted", |m| in_flight(m) == 2).await;
    let a = http.post("/classify", "image/png", image_bytes("chelsea.png")).await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.json()["error_type"], "overloaded");
    for t in first {
        assert_eq!(t.await.unwrap(), 200);
    }
    // Room again.
    assert_eq!(http.post("/classify", "image/png", image_bytes("chelsea.png")).await.status, 200);
    let text = http.get("/metrics").await.text();
    assert_eq!(metric(&text, "beit_requests_rejected_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "beit_requests_total{endpoint=\"/classify\",status=\"503\"}"), 1.0, "{text}");
    server.shutdown().await.unwrap();
}

/// A raw HTTP/1.1 request on its own connection.
fn raw_request(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_has_its_work_dropped() {
    let cfg = ServerConfig { max_batch_size: 1, ..config("slow") };
    // Long enough that the hang-up is noticed while the first request still runs, even on a loaded CI machine.
    let server = start_slow(cfg, Duration::from_millis(2500)).await;
    let http = Http::new(&server);
    let addr = server.addr();
    let busy = {
        let http = http.clone();
        tokio::spawn(async move { http.post("/classify", "image/png", image_bytes("chelsea.png")).await.status })
    };
    // The busy request is on the model thread (admitted, not queued).
    wait_for(&server, "the first request running", |m| {
        in_flight(m) == 1 && m.queue_depth.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
    // Queued behind the busy one, then the client hangs up.
    let png = image_bytes("camera.png");
    let head = format!(
        "POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\r\n",
        png.len()
    );
    let conn = tokio::task::spawn_blocking(move || raw_request(addr, &head, &png)).await.unwrap();
    wait_for(&server, "the second request queued", |m| m.queue_depth.load(std::sync::atomic::Ordering::SeqCst) == 1)
        .await;
    drop(conn);
    // The server has dropped the abandoned request's handler (its admission ended) before the model thread is free.
    wait_for(&server, "the hang-up noticed", |m| in_flight(m) == 1).await;
    assert_eq!(busy.await.unwrap(), 200);
    let mut text = String::new();
    for _ in 0..50 {
        text = http.get("/metrics").await.text();
        if metric(&text, "beit_requests_cancelled_total") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&text, "beit_requests_cancelled_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "beit_batch_size_count"), 1.0, "the abandoned request ran:\n{text}");
    assert_eq!(http.get("/health").await.status, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_limited_too() {
    let model = model_dir("cls_single");
    let server = start(&model, ServerConfig { max_body_bytes: 1000, ..config(&model) }).await;
    let addr = server.addr();
    let answer = tokio::task::spawn_blocking(move || {
        let chunk = vec![b'x'; 600];
        let mut body = Vec::new();
        for _ in 0..2 {
            body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            body.extend_from_slice(&chunk);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        let head =
            "POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut s = raw_request(addr, head, &body);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests() {
    let server = start_slow(config("slow"), Duration::from_millis(400)).await;
    let http = Http::new(&server);
    let addr = server.addr();
    let pending: Vec<_> = (0..3)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.post("/classify", "image/png", image_bytes("chelsea.png")).await })
        })
        .collect();
    wait_for(&server, "three requests admitted", |m| in_flight(m) == 3).await;
    tokio::time::timeout(Duration::from_secs(20), server.shutdown()).await.expect("shutdown hung").unwrap();
    for t in pending {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json().as_array().unwrap().len(), 5);
    }
    assert!(std::net::TcpStream::connect(addr).is_err(), "still accepting after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_and_models_fail_to_start() {
    let model = model_dir("cls_single");
    let e = beit_server::start(ServerConfig { max_queue: 0, ..config(&model) }, move || load_pipeline(&model)).await;
    assert!(matches!(e, Err(beit_server::ServerError::Config { name: "max-queue", .. })));
    let e = beit_server::start(config("x"), || load_pipeline("/nonexistent/model")).await;
    assert!(matches!(e, Err(beit_server::ServerError::Load(_))));
    let e = beit_server::start(config("x"), || -> Result<Pipeline, String> { panic!("loader bug") }).await;
    assert!(matches!(e, Err(beit_server::ServerError::Load(_))));
}
