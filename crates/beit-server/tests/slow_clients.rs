//! Slow clients cannot starve the rest: uploads that stall hold no queue slot, bodies that fall behind the minimum
//! rate get 408, headers that never end are cut off, and one address cannot hold more than its share of
//! connections.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use beit_server::ServerConfig;
use common::*;

/// A connection that sent `head` (and `body`) and then nothing more.
fn stalled(addr: SocketAddr, head: &str, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

fn upload_head(content_length: usize) -> String {
    format!("POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: {content_length}\r\n\r\n")
}

/// Everything the server sends on `s` until it closes (at most 10 s).
fn read_all(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    // ok to ignore: a reset after the answer still leaves the answer in `out`.
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_leave_good_clients_served() {
    let model = model_dir("cls_single");
    // Three admission slots, and ten times as many uploads that announce a body and never send it.
    let cfg = ServerConfig {
        max_queue: 2,
        max_batch_size: 1,
        body_grace: Duration::from_secs(60),
        max_connections_per_client: 100,
        ..config(&model)
    };
    let stalls = 30;
    assert!(stalls > cfg.admitted());
    let server = start(&model, cfg).await;
    let addr = server.addr();
    let held = tokio::task::spawn_blocking(move || {
        (0..stalls).map(|_| stalled(addr, &upload_head(1_000_000), b"\x89PNG")).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    wait_for(&server, "the stalled uploads reading", |m| m.reading.load(Ordering::SeqCst) == stalls).await;

    let http = Http::new(&server);
    for _ in 0..3 {
        let started = Instant::now();
        let a = http.post("/classify", "image/png", image_bytes("chelsea.png")).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert!(started.elapsed() < Duration::from_secs(5), "served after {:?}", started.elapsed());
    }
    assert_eq!(server.metrics().rejected.load(Ordering::SeqCst), 0);
    assert_eq!(server.metrics().reading.load(Ordering::SeqCst), stalls, "the stalled uploads are still there");
    drop(held);
    wait_for(&server, "the stalled uploads gone", |m| m.reading.load(Ordering::SeqCst) == 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_minimum_rate_is_408() {
    let model = model_dir("cls_single");
    let cfg = ServerConfig { min_body_rate: 1000, body_grace: Duration::from_millis(300), ..config(&model) };
    let server = start(&model, cfg).await;
    let addr = server.addr();
    let started = Instant::now();
    let answer =
        tokio::task::spawn_blocking(move || read_all(stalled(addr, &upload_head(100_000), b"\x89PNG\r\n\x1a\n")))
            .await
            .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error_type\":\"timeout\"") && answer.contains("8 bytes in"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "refused after {:?}", started.elapsed());
    let m = Http::new(&server).get("/metrics").await.text();
    assert!(m.contains("beit_requests_rejected_by_reason_total{reason=\"timeout\"} 1\n"), "{m}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_never_end_are_cut_off() {
    let model = model_dir("cls_single");
    let cfg = ServerConfig { header_timeout: Duration::from_millis(300), ..config(&model) };
    let server = start(&model, cfg).await;
    let addr = server.addr();
    let started = Instant::now();
    let answer =
        tokio::task::spawn_blocking(move || read_all(stalled(addr, "POST /classify HTTP/1.1\r\nhost: x\r\n", b"")))
            .await
            .unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(5), "closed after {elapsed:?}");
    assert!(!answer.contains("200 OK"), "{answer}");
    wait_for(&server, "the connection closed", |m| m.connections.load(Ordering::SeqCst) == 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_its_connections() {
    let model = model_dir("cls_single");
    let cfg = ServerConfig { max_connections_per_client: 3, ..config(&model) };
    let server = start(&model, cfg).await;
    let addr = server.addr();
    let mut idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_for(&server, "three connections open", |m| m.connections.load(Ordering::SeqCst) == 3).await;
    let answer =
        tokio::task::spawn_blocking(move || read_all(stalled(addr, "GET /health HTTP/1.1\r\nhost: x\r\n\r\n", b"")))
            .await
            .unwrap();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("\"error_type\":\"too_many_connections\""), "{answer}");
    // One closes: room for another.
    idle.pop();
    wait_for(&server, "one connection closed", |m| m.connections.load(Ordering::SeqCst) == 2).await;
    let http = Http::new(&server);
    assert_eq!(http.get("/health").await.status, 200);
    // hyper's pool may open a second connection while the first is on its way back to the pool; a second free
    // slot keeps that one from being refused (and counted) too.
    idle.pop();
    let m = http.get("/metrics").await.text();
    assert!(m.contains("beit_requests_rejected_by_reason_total{reason=\"too_many_connections\"} 1\n"), "{m}");
    drop(idle);
    server.shutdown().await.unwrap();
}
