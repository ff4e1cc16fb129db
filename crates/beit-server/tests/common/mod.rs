//! What the server tests share: fixture paths, an in-process server on 127.0.0.1:0, and a plain HTTP/1 client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::io::Write;
use std::sync::{Mutex, Once};

use beit::hub::HubOptions;
use beit::pipeline::{Pipeline, Prediction, Prepared};
use beit::processor::SegmentationMap;
use beit::LoadOptions;
use beit_server::{Backend, BackendResult, ModelInfo, Server, ServerConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures")
}

pub fn model_dir(name: &str) -> String {
    fixtures().join("model").join(name).display().to_string()
}

pub fn image_path(name: &str) -> PathBuf {
    fixtures().join("processor/images").join(name)
}

pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(image_path(name)).unwrap()
}

/// Every PNG fixture image, sorted by name.
pub fn png_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("processor/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    names.sort();
    names
}

pub fn load_pipeline(model: &str) -> Result<Pipeline, String> {
    let hub = HubOptions { offline: true, ..HubOptions::from_env() };
    Pipeline::from_pretrained(model, &LoadOptions { hub: Some(hub), ..Default::default() }).map_err(|e| e.to_string())
}

pub fn config(model: &str) -> ServerConfig {
    ServerConfig { host: "127.0.0.1".into(), port: 0, model_id: model.into(), ..ServerConfig::default() }
}

pub async fn start(model: &str, cfg: ServerConfig) -> Server {
    let m = model.to_string();
    beit_server::start(cfg, move || load_pipeline(&m)).await.unwrap()
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Http {
    pub fn new(server: &Server) -> Self {
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(5)).build_http();
        Http { client, base: format!("http://{}", server.addr()) }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let headers: Vec<(&str, &str)> = content_type.map(|ct| ("content-type", ct)).into_iter().collect();
        self.send_with(method, path, &headers, body).await
    }

    /// A request with these headers.
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let mut b = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            b = b.header(*name, *value);
        }
        let req = b.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer { status: parts.status, headers: parts.headers, body })
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, Vec::new()).await.unwrap()
    }

    pub async fn post(&self, path: &str, content_type: &str, body: Vec<u8>) -> Answer {
        self.send(Method::POST, path, Some(content_type), body).await.unwrap()
    }
}

/// A multipart/form-data body with one file field; returns (content type, body).
pub fn multipart(field: &str, filename: &str, data: &[u8], extra: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = "beitboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in extra {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// This process's resident memory, bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The fixture pipeline, `delay` slower per model call.
pub struct Slow {
    pub inner: Pipeline,
    pub delay: Duration,
}

impl Backend for Slow {
    fn info(&self) -> ModelInfo {
        self.inner.info()
    }
    fn classify(&self, images: &[&Prepared], top_k: usize) -> BackendResult<Vec<Vec<Prediction>>> {
        std::thread::sleep(self.delay);
        Backend::classify(&self.inner, images, top_k)
    }
    fn segment(&self, images: &[&Prepared]) -> BackendResult<Vec<SegmentationMap>> {
        std::thread::sleep(self.delay);
        Backend::segment(&self.inner, images)
    }
    fn embed(&self, images: &[&Prepared]) -> BackendResult<Vec<Vec<f32>>> {
        std::thread::sleep(self.delay);
        Backend::embed(&self.inner, images)
    }
}

pub async fn start_slow(cfg: ServerConfig, delay: Duration) -> beit_server::Server {
    let model = model_dir("cls_single");
    beit_server::start(cfg, move || Ok(Slow { inner: load_pipeline(&model)?, delay })).await.unwrap()
}

/// Everything the server logs, from every thread (the runtime's and the model's, not only the test's).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs, once per test binary, a global subscriber that keeps every log line (info and above), as text or as
/// the server's JSON lines.
pub fn capture_logs(json: bool) {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let builder = tracing_subscriber::fmt().with_writer(|| Capture).with_ansi(false);
        if json {
            tracing::subscriber::set_global_default(builder.event_format(beit_server::log::JsonFormat).finish())
        } else {
            tracing::subscriber::set_global_default(builder.finish())
        }
        .unwrap();
    });
}

/// The logged lines that contain `needle`.
pub fn logged(needle: &str) -> Vec<String> {
    let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&log).lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
}

/// Waits (up to 10 s) until `cond` holds on the server's metrics.
pub async fn wait_for(server: &beit_server::Server, what: &str, cond: impl Fn(&beit_server::Metrics) -> bool) {
    for _ in 0..1000 {
        if cond(server.metrics()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
