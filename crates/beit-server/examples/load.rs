//! Throughput and latency of a running `beit serve`, at several concurrencies (a benchmark, not a test).
//!
//! ```sh
//! beit serve --model M --port 8080 --max-batch-size 8 &
//! cargo run --release -p beit-server --example load -- --url http://127.0.0.1:8080 \
//!     --image crates/beit/tests/fixtures/processor/images/chelsea.png --concurrency 1,8,32 --requests 200
//! ```
//!
//! Sends `--requests` POSTs of the image's raw bytes to `--endpoint` (default /classify) at each concurrency, after
//! a short warm-up, and prints one Markdown table row per concurrency: requests/s, p50, p99, errors, and the
//! server's mean batch size over that run (from /metrics). Loopback only by intent: point it at your own server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

struct Opts {
    url: String,
    image: String,
    endpoint: String,
    concurrency: Vec<usize>,
    requests: usize,
    max_seconds: f64,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        url: "http://127.0.0.1:8080".into(),
        image: concat!(env!("CARGO_MANIFEST_DIR"), "/../beit/tests/fixtures/processor/images/chelsea.png").into(),
        endpoint: "/classify".into(),
        concurrency: vec![1, 8, 32],
        requests: 200,
        max_seconds: 120.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--url" => o.url = val()?,
            "--image" => o.image = val()?,
            "--endpoint" => o.endpoint = val()?,
            "--concurrency" => {
                o.concurrency = val()?
                    .split(',')
                    .map(|c| c.trim().parse().map_err(|e| format!("--concurrency: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--requests" => o.requests = val()?.parse().map_err(|e| format!("--requests: {e}"))?,
            "--max-seconds" => o.max_seconds = val()?.parse().map_err(|e| format!("--max-seconds: {e}"))?,
            "-h" | "--help" => {
                println!("load [--url U] [--image PATH] [--endpoint /classify] [--concurrency 1,8,32] [--requests N] [--max-seconds S]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn call(client: &HttpClient, method: Method, url: &str, body: Bytes) -> Result<(u16, Bytes), String> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/octet-stream")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

/// (count, sum) of the server's beit_batch_size histogram.
async fn batch_stats(client: &HttpClient, base: &str) -> (f64, f64) {
    let Ok((_, text)) = call(client, Method::GET, &format!("{base}/metrics"), Bytes::new()).await else {
        return (0.0, 0.0);
    };
    let text = String::from_utf8_lossy(&text).into_owned();
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (get("beit_batch_size_count"), get("beit_batch_size_sum"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let image = match std::fs::read(&o.image) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            eprintln!("error: {}: {e}", o.image);
            std::process::exit(2);
        }
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build_http();
    let base = o.url.trim_end_matches('/').to_string();
    let info = match call(&client, Method::GET, &format!("{base}/info"), Bytes::new()).await {
        Ok((200, b)) => serde_json::from_slice::<serde_json::Value>(&b).unwrap_or_default(),
        other => {
            eprintln!("error: GET {base}/info: {other:?}");
            std::process::exit(1);
        }
    };
    println!(
        "server: {} ({}), max_batch_size {}, max_batch_delay_ms {}; image {} ({} bytes); {} {} requests per level",
        info["model_id"].as_str().unwrap_or("?"),
        info["architecture"].as_str().unwrap_or("?"),
        info["limits"]["max_batch_size"],
        info["limits"]["max_batch_delay_ms"],
        o.image,
        image.len(),
        o.requests,
        o.endpoint,
    );
    println!("| concurrency | requests | errors | req/s | p50 ms | p99 ms | mean batch |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let url = format!("{base}{}", o.endpoint);
    for &c in &o.concurrency {
        // Warm-up: open the connections and let the model thread settle.
        let warm: Vec<_> = (0..c.min(8))
            .map(|_| {
                let (client, url, image) = (client.clone(), url.clone(), image.clone());
                tokio::spawn(async move { call(&client, Method::POST, &url, image).await })
            })
            .collect();
        for w in warm {
            let _ = w.await;
        }
        let (b0, s0) = batch_stats(&client, &base).await;
        let next = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(o.max_seconds);
        let started = Instant::now();
        let tasks: Vec<_> = (0..c)
            .map(|_| {
                let (client, url, image, next) = (client.clone(), url.clone(), image.clone(), next.clone());
                let n = o.requests;
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut errors = 0usize;
                    while next.fetch_add(1, Ordering::SeqCst) < n && Instant::now() < deadline {
                        let t = Instant::now();
                        match call(&client, Method::POST, &url, image.clone()).await {
                            Ok((200, _)) => lat.push(t.elapsed()),
                            _ => errors += 1,
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        let mut lat = Vec::new();
        let mut errors = 0;
        for t in tasks {
            if let Ok((l, e)) = t.await {
                lat.extend(l);
                errors += e;
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let (b1, s1) = batch_stats(&client, &base).await;
        lat.sort();
        let mean_batch = if b1 > b0 { (s1 - s0) / (b1 - b0) } else { 0.0 };
        println!(
            "| {c} | {} | {errors} | {:.1} | {:.1} | {:.1} | {mean_batch:.2} |",
            lat.len(),
            lat.len() as f64 / wall,
            percentile(&lat, 50.0).as_secs_f64() * 1e3,
            percentile(&lat, 99.0).as_secs_f64() * 1e3,
        );
    }
}
