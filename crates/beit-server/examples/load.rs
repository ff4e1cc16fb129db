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
//!
//! Soak: `--soak SECONDS` runs at the first `--concurrency` for that long with a mix of requests, each checked:
//! 70% good images from `--images` (files or folders; the answer must equal the one the image got alone before the
//! run), 10% bad (garbage and truncated images: 400 `invalid_image`), 5% images over the server's pixel limit
//! (400 `image_too_large`), 5% bodies over its byte limit (413, or the connection closed after it), 10% clients
//! that hang up after 1-30 ms. Every `--report-seconds` it prints a row: requests/s, good answers, p50/p99 of good
//! ones, refusals as expected, anything unexpected, and the server's resident memory (`--pid`, from /proc).
//! Exits 1 if any good request was lost or answered wrongly, or any refusal was not the expected one.
//!
//! ```sh
//! beit serve --model models/beit-digits --port 8080 &
//! cargo run --release -p beit-server --example load -- --soak 1200 --concurrency 32 --pid $! \
//!     --images data/digits --endpoint /classify
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    soak: Option<f64>,
    report_seconds: f64,
    pid: Option<u32>,
    images: Vec<String>,
    api_key: Option<String>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        url: "http://127.0.0.1:8080".into(),
        image: concat!(env!("CARGO_MANIFEST_DIR"), "/../beit/tests/fixtures/processor/images/chelsea.png").into(),
        endpoint: "/classify".into(),
        concurrency: vec![1, 8, 32],
        requests: 200,
        max_seconds: 120.0,
        soak: None,
        report_seconds: 60.0,
        pid: None,
        images: Vec::new(),
        api_key: std::env::var("BEIT_API_KEY").ok(),
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
            "--soak" => o.soak = Some(val()?.parse().map_err(|e| format!("--soak: {e}"))?),
            "--report-seconds" => o.report_seconds = val()?.parse().map_err(|e| format!("--report-seconds: {e}"))?,
            "--pid" => o.pid = Some(val()?.parse().map_err(|e| format!("--pid: {e}"))?),
            "--images" => o.images.extend(val()?.split(',').map(str::to_owned)),
            "--api-key" => o.api_key = Some(val()?),
            "-h" | "--help" => {
                println!("load [--url U] [--image PATH] [--endpoint /classify] [--concurrency 1,8,32] [--requests N] [--max-seconds S]");
                println!(
                    "     [--soak SECONDS --report-seconds 60 --pid SERVER_PID --images FILES_OR_DIRS] [--api-key K]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The key sent as `Authorization: Bearer`, set once from `--api-key` or `BEIT_API_KEY`.
static API_KEY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

async fn call(client: &HttpClient, method: Method, url: &str, body: Bytes) -> Result<(u16, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url).header("content-type", "application/octet-stream");
    if let Some(Some(key)) = API_KEY.get() {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
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
    let _ = API_KEY.set(o.api_key.clone());
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
    if let Some(seconds) = o.soak {
        let ok = soak(&o, seconds, &client, &base, &info).await;
        std::process::exit(if ok { 0 } else { 1 });
    }
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

/// What one request of the soak was, and what it must get.
#[derive(Clone, Copy)]
enum Kind {
    Good(usize),
    Bad(usize),
    TooManyPixels,
    TooManyBytes,
    HangUp(usize),
}

impl Kind {
    /// The mix: 14 good, 2 bad, 1 too many pixels, 1 too many bytes, 2 hang-ups in every 20.
    fn of(i: usize, goods: usize, bads: usize) -> Kind {
        match i % 20 {
            0..=13 => Kind::Good(i % goods),
            14 | 15 => Kind::Bad(i % bads),
            16 => Kind::TooManyPixels,
            17 => Kind::TooManyBytes,
            _ => Kind::HangUp(i % goods),
        }
    }
}

/// Counts over one report window (and, summed, over the run).
#[derive(Default, Clone)]
struct Window {
    good_latency: Vec<Duration>,
    good_lost: usize,
    good_wrong: usize,
    refused_as_expected: usize,
    unexpected: usize,
    hang_ups: usize,
}

impl Window {
    fn add(&mut self, o: &Window) {
        self.good_latency.extend(&o.good_latency);
        self.good_lost += o.good_lost;
        self.good_wrong += o.good_wrong;
        self.refused_as_expected += o.refused_as_expected;
        self.unexpected += o.unexpected;
        self.hang_ups += o.hang_ups;
    }

    fn requests(&self) -> usize {
        self.good_latency.len()
            + self.good_lost
            + self.good_wrong
            + self.refused_as_expected
            + self.unexpected
            + self.hang_ups
    }
}

/// Files named, and the files in folders named (recursively), in a stable order.
fn image_files(paths: &[String]) -> Vec<std::path::PathBuf> {
    fn walk(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                walk(&e, out);
            }
        } else if p.is_file() {
            out.push(p.to_path_buf());
        }
    }
    let mut out = Vec::new();
    for p in paths {
        walk(std::path::Path::new(p), &mut out);
    }
    out
}

/// Equal answers: the same structure and strings, numbers within 1e-4 (a batch's composition may move the last
/// digits of a score, never a label).
fn same_answer(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => (x.as_f64().unwrap_or(f64::NAN) - y.as_f64().unwrap_or(f64::NAN)).abs() <= 1e-4,
        (V::Array(x), V::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_answer(x, y)),
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_answer(v, w)))
        }
        _ => a == b,
    }
}

/// Resident memory of `pid` in MiB, from /proc.
fn rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

fn error_type(body: &Bytes) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error_type"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn soak(o: &Opts, seconds: f64, client: &HttpClient, base: &str, info: &serde_json::Value) -> bool {
    let files = image_files(if o.images.is_empty() { std::slice::from_ref(&o.image) } else { &o.images });
    let url = format!("{base}{}", o.endpoint);
    // Each good image's answer when it is alone on the server: the reference every later answer must equal.
    let mut goods = Vec::new();
    for f in &files {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        let bytes = Bytes::from(bytes);
        match call(client, Method::POST, &url, bytes.clone()).await {
            Ok((200, body)) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(answer) => goods.push((bytes, answer)),
                Err(e) => eprintln!("warning: {}: answer is not JSON: {e}", f.display()),
            },
            other => eprintln!("skipping {}: alone it got {:?}", f.display(), other.map(|(s, _)| s)),
        }
    }
    if goods.is_empty() {
        eprintln!("error: none of {} files got a 200 answer from {url}", files.len());
        return false;
    }
    let first = goods[0].0.clone();
    let bads = vec![
        Bytes::from_static(b"this is not an image, and the server must say so"),
        first.slice(..first.len() / 2),
        Bytes::from((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<u8>>()),
    ];
    let max_pixels = info["limits"]["max_image_pixels"].as_u64().unwrap_or(25_000_000);
    let side = ((max_pixels as f64).sqrt() as u32).saturating_add(64);
    let mut too_many_pixels = Vec::new();
    if let Err(e) = image::GrayImage::new(side, side)
        .write_to(&mut std::io::Cursor::new(&mut too_many_pixels), image::ImageFormat::Png)
    {
        eprintln!("error: encoding the oversized PNG: {e}");
        return false;
    }
    let too_many_pixels = Bytes::from(too_many_pixels);
    let max_body = info["limits"]["max_body_bytes"].as_u64().unwrap_or(16 << 20) as usize;
    let too_many_bytes = Bytes::from(vec![0u8; max_body + 1]);
    let concurrency = o.concurrency.first().copied().unwrap_or(32);
    println!(
        "soak: {seconds:.0} s at concurrency {concurrency} on {url}; {} good images, {} bad, a {side}x{side} PNG ({} bytes) over the {max_pixels}-pixel limit, a {} byte body over the byte limit; server pid {:?}",
        goods.len(),
        bads.len(),
        too_many_pixels.len(),
        too_many_bytes.len(),
        o.pid
    );
    println!("| minute | requests | req/s | good | p50 ms | p99 ms | refused as expected | hang-ups | lost | wrong | unexpected | RSS MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let goods = Arc::new(goods);
    let bads = Arc::new(bads);
    let window = Arc::new(Mutex::new(Window::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, goods, bads, window, next) =
                (client.clone(), url.clone(), goods.clone(), bads.clone(), window.clone(), next.clone());
            let (too_many_pixels, too_many_bytes) = (too_many_pixels.clone(), too_many_bytes.clone());
            tokio::spawn(async move {
                let mut reported = 0;
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let mut w = Window::default();
                    let t = Instant::now();
                    let outcome = match Kind::of(i, goods.len(), bads.len()) {
                        Kind::Good(g) => match call(&client, Method::POST, &url, goods[g].0.clone()).await {
                            Ok((200, body)) => {
                                let same = serde_json::from_slice::<serde_json::Value>(&body)
                                    .is_ok_and(|a| same_answer(&a, &goods[g].1));
                                if same {
                                    w.good_latency.push(t.elapsed());
                                    Ok(())
                                } else {
                                    w.good_wrong += 1;
                                    Err(format!("good image {g}: answer differs: {}", String::from_utf8_lossy(&body)))
                                }
                            }
                            other => {
                                w.good_lost += 1;
                                Err(format!(
                                    "good image {g}: {:?}",
                                    other.map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
                                ))
                            }
                        },
                        Kind::Bad(b) => match call(&client, Method::POST, &url, bads[b].clone()).await {
                            Ok((400, body)) if error_type(&body) == "invalid_image" => Ok(()),
                            other => Err(format!("bad image {b}: {:?}", other.map(|(s, b)| (s, error_type(&b))))),
                        },
                        Kind::TooManyPixels => match call(&client, Method::POST, &url, too_many_pixels.clone()).await {
                            Ok((400, body)) if error_type(&body) == "image_too_large" => Ok(()),
                            other => Err(format!("too many pixels: {:?}", other.map(|(s, b)| (s, error_type(&b))))),
                        },
                        // The server may answer 413 from Content-Length and close before the body is sent: the
                        // client then sees the connection end, which is a refusal too.
                        Kind::TooManyBytes => match call(&client, Method::POST, &url, too_many_bytes.clone()).await {
                            Ok((413, _)) | Err(_) => Ok(()),
                            other => Err(format!("too many bytes: {:?}", other.map(|(s, b)| (s, error_type(&b))))),
                        },
                        Kind::HangUp(g) => {
                            let wait = Duration::from_millis(1 + (i as u64 * 7919) % 30);
                            let _ =
                                tokio::time::timeout(wait, call(&client, Method::POST, &url, goods[g].0.clone())).await;
                            w.hang_ups += 1;
                            Ok(())
                        }
                    };
                    match outcome {
                        Ok(()) => {
                            if w.good_latency.is_empty() && w.hang_ups == 0 {
                                w.refused_as_expected += 1;
                            }
                        }
                        Err(e) => {
                            if w.good_lost == 0 && w.good_wrong == 0 {
                                w.unexpected += 1;
                            }
                            if reported < 3 {
                                reported += 1;
                                eprintln!("unexpected: {e}");
                            }
                        }
                    }
                    if let Ok(mut shared) = window.lock() {
                        shared.add(&w);
                    }
                }
            })
        })
        .collect();
    let mut total = Window::default();
    let mut rss = Vec::new();
    let mut minute = 0usize;
    let mut last = started;
    let report = |w: &mut Window, minute: usize, wall: f64, rss: Option<f64>| {
        w.good_latency.sort();
        println!(
            "| {minute} | {} | {:.1} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
            w.requests(),
            w.requests() as f64 / wall,
            w.good_latency.len(),
            percentile(&w.good_latency, 50.0).as_secs_f64() * 1e3,
            percentile(&w.good_latency, 99.0).as_secs_f64() * 1e3,
            w.refused_as_expected,
            w.hang_ups,
            w.good_lost,
            w.good_wrong,
            w.unexpected,
            rss.map_or("?".into(), |r: f64| format!("{r:.0}")),
        );
    };
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs_f64(o.report_seconds).min(deadline - Instant::now())).await;
        let mut w = window.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
        minute += 1;
        let r = rss_mib(o.pid);
        rss.extend(r);
        report(&mut w, minute, last.elapsed().as_secs_f64(), r);
        last = Instant::now();
        total.add(&w);
    }
    for t in tasks {
        let _ = t.await;
    }
    let rest = window.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
    total.add(&rest);
    let wall = started.elapsed().as_secs_f64();
    report(&mut total, 0, wall, rss_mib(o.pid));
    println!(
        "total (row 0): {} requests in {wall:.0} s; good answered {} , lost {}, wrong {}; refusals as expected {}; hang-ups {}; unexpected {}",
        total.requests(),
        total.good_latency.len(),
        total.good_lost,
        total.good_wrong,
        total.refused_as_expected,
        total.hang_ups,
        total.unexpected
    );
    if rss.len() >= 2 {
        let after_warmup = rss[1.min(rss.len() - 1)];
        let max = rss.iter().copied().fold(f64::MIN, f64::max);
        println!(
            "RSS MiB: after the first report {:.0}, after the second {after_warmup:.0}, last {:.0}, max {max:.0}",
            rss[0],
            rss[rss.len() - 1]
        );
    }
    total.good_lost == 0 && total.good_wrong == 0 && total.unexpected == 0
}
