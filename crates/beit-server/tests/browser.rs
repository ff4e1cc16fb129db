//! The web page at `/`: served without a key (always tested), and driven in headless Chromium through
//! chromedriver's WebDriver protocol (skipped, saying why, where no browser is installed).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use beit_server::{ApiKeys, ServerConfig};
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

const KEY: &str = "k-page-0123456789";

/// Every `src="..."`/`href="..."` in an HTML text.
fn references(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in [" src=\"", " href=\""] {
        for (at, _) in html.match_indices(attr) {
            out.push(html[at + attr.len()..].split('"').next().unwrap().to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_without_a_key() {
    let model = model_dir("cls_single");
    let cfg = ServerConfig { api_keys: ApiKeys::new([KEY], "test").unwrap(), ..config(&model) };
    let server = start(&model, cfg).await;
    let http = Http::new(&server);

    let page = http.get("/").await;
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let refs = references(&page.text());
    assert!(refs.iter().any(|r| r == "/page.css") && refs.iter().any(|r| r == "/page.js"), "{refs:?}");
    // Everything the page refers to is served, without a key, with the type a browser needs to use it.
    for r in refs.iter().filter(|r| !r.starts_with("data:")) {
        let a = http.get(r).await;
        assert_eq!(a.status, 200, "{r}: {}", a.text());
        let ct = a.headers["content-type"].to_str().unwrap();
        let expected = if r.ends_with(".css") { "text/css" } else { "text/javascript" };
        assert!(ct.starts_with(expected), "{r}: {ct}");
    }
    for path in ["/", "/page.css", "/page.js"] {
        let a = http.get(path).await;
        let csp = a.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.starts_with("default-src 'self';"), "{path}: {csp}");
        assert!(csp.contains("img-src 'self' data: blob:"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{path}: {csp}");
        assert_eq!(a.headers["cache-control"], "no-cache", "{path}");
        assert_eq!(a.headers["x-content-type-options"], "nosniff", "{path}");
    }

    // Exactly those paths are open: the API, and any other file name, still need the key.
    for path in ["/info", "/metrics", "/openapi.json", "/index.html", "/page.css/", "/static/page.js"] {
        assert_eq!(http.get(path).await.status, 401, "{path}");
    }
    let a = http.post("/classify", "image/png", image_bytes("chelsea.png")).await;
    assert_eq!(a.status, 401, "{}", a.text());
    let auth = format!("Bearer {KEY}");
    let a = http
        .send_with(Method::POST, "/classify", &[("authorization", auth.as_str())], image_bytes("chelsea.png"))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    server.shutdown().await.unwrap();
}

/// Where the browser and its driver are: BEIT_CHROMIUM and BEIT_CHROMEDRIVER, else Debian's paths.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let path = |var: &str, default: &str| PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.into()));
    let chromium = path("BEIT_CHROMIUM", "/usr/bin/chromium");
    let driver = path("BEIT_CHROMEDRIVER", "/usr/bin/chromedriver");
    for p in [&chromium, &driver] {
        if !p.is_file() {
            return Err(format!("{} is absent (apt-get install chromium chromium-driver)", p.display()));
        }
    }
    Ok((chromium, driver))
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// chromedriver, killed (with its browsers) when dropped, and one browser session.
struct Driver {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    port: u16,
    child: Child,
    profile: PathBuf,
    session: String,
}

impl Drop for Driver {
    /// Closes the session, which ends Chromium (killing only the driver would leave it running), then the driver.
    /// Plain blocking HTTP: a Drop cannot await, and this must run when a test panics too.
    fn drop(&mut self) {
        if !self.session.is_empty() {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let req = format!(
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    self.session, self.port
                );
                let _ = s.write_all(req.as_bytes());
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Driver {
    async fn start(chromium: &Path, driver: &Path) -> Driver {
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
        let profile = std::env::temp_dir().join(format!("beit-browser-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&profile).unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        let mut d =
            Driver { client, base: format!("http://127.0.0.1:{port}"), port, child, profile, session: String::new() };
        let started = Instant::now();
        loop {
            if let Ok(v) = d.call(Method::GET, "/status", None).await {
                if v["ready"] == true {
                    break;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not get ready in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=390,844",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", d.profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": args,
                // Headless Chromium keeps windows at least 500 px wide; a phone's viewport needs emulating.
                "mobileEmulation": {"deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 1.0}},
            },
        }}});
        let v = d.call(Method::POST, "/session", Some(caps)).await.unwrap();
        d.session = v["sessionId"].as_str().unwrap().to_string();
        d
    }

    /// A WebDriver command; its `value`, or the driver's error.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(90), self.client.request(req))
            .await
            .map_err(|_| format!("{path}: no answer in 90 s"))?
            .map_err(|e| format!("{path}: {e:?}"))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{path}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{path}: {status}: {}", v["value"]));
        }
        Ok(v["value"].clone())
    }

    /// A command on the session.
    async fn on(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, body).await.unwrap()
    }

    async fn goto(&self, url: &str) {
        self.on(Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self.on(Method::POST, "/element", Some(json!({"using": "css selector", "value": css}))).await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    async fn find_all(&self, css: &str) -> Vec<String> {
        let v = self.on(Method::POST, "/elements", Some(json!({"using": "css selector", "value": css}))).await;
        v.as_array().unwrap().iter().map(|e| e[ELEMENT].as_str().unwrap().to_string()).collect()
    }

    async fn text(&self, css: &str) -> String {
        let el = self.find(css).await;
        self.on(Method::GET, &format!("/element/{el}/text"), None).await.as_str().unwrap().to_string()
    }

    async fn attr(&self, el: &str, name: &str) -> Value {
        self.on(Method::GET, &format!("/element/{el}/attribute/{name}"), None).await
    }

    async fn property(&self, css: &str, name: &str) -> Value {
        let el = self.find(css).await;
        self.on(Method::GET, &format!("/element/{el}/property/{name}"), None).await
    }

    async fn displayed(&self, css: &str) -> bool {
        let el = self.find(css).await;
        self.on(Method::GET, &format!("/element/{el}/displayed"), None).await == true
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.on(Method::POST, &format!("/element/{el}/clear"), Some(json!({}))).await;
        self.on(Method::POST, &format!("/element/{el}/value"), Some(json!({"text": text}))).await;
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.on(Method::POST, &format!("/element/{el}/click"), Some(json!({}))).await;
    }

    /// How many API calls the page has finished (success or error).
    async fn answers(&self) -> u64 {
        let el = self.find("#status").await;
        self.attr(&el, "data-answers").await.as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// Waits until the page has finished more than `before` API calls; returns how it ended (`#status`'s
    /// `data-state`: ready, done or error).
    async fn wait_answer(&self, before: u64) -> String {
        let started = Instant::now();
        while self.answers().await <= before {
            assert!(started.elapsed() < Duration::from_secs(60), "the page did not answer in 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let el = self.find("#status").await;
        self.attr(&el, "data-state").await.as_str().unwrap_or_default().to_string()
    }

    /// Chooses `image` in the file input, as a user would, and waits for the page's answer.
    async fn upload(&self, image: &Path) -> String {
        let before = self.answers().await;
        let input = self.find("#file").await;
        let path = image.canonicalize().unwrap().display().to_string();
        self.on(Method::POST, &format!("/element/{input}/value"), Some(json!({"text": path}))).await;
        self.wait_answer(before).await
    }

    async fn script(&self, script: &str) -> Value {
        self.on(Method::POST, "/execute/sync", Some(json!({"script": script, "args": []}))).await
    }

    /// Saves a screenshot as `name` under BEIT_SCREENSHOT_DIR, if set: a relative path is taken from the
    /// workspace's root (cargo runs tests in the crate's directory, whatever directory it was started in).
    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("BEIT_SCREENSHOT_DIR") else { return };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(dir);
        let v = self.on(Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = Path::new(&dir).join(name);
        std::fs::write(&path, png).unwrap();
        println!("screenshot: {}", path.display());
    }
}

/// Classifier, segmenter and keys, one after another with one browser (it is heavy; two at once on a small CI
/// machine would only slow each other down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_real_browser() {
    let (chromium, driver) = match browser() {
        Ok(found) => found,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let d = Driver::start(&chromium, &driver).await;
    classifier(&d).await;
    segmenter(&d).await;
    keys(&d).await;
}

/// The page shows the same top label and score as POST /classify for the same bytes.
async fn classifier(d: &Driver) {
    let model = model_dir("cls_single");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    let expected = http.post("/classify", "image/png", image_bytes("chelsea.png")).await.json();
    let (label, score) = (expected[0]["label"].as_str().unwrap(), expected[0]["score"].as_f64().unwrap());

    let before = 0;
    d.goto(&format!("http://{}/", server.addr())).await;
    assert_eq!(d.wait_answer(before).await, "ready");
    assert_eq!(d.text("#model-name").await, model);
    let model_el = d.find("#model").await;
    assert_eq!(d.attr(&model_el, "data-task").await, "classify");
    assert_eq!(d.text("#error").await, "");
    // Not shown when the server needs no key.
    assert!(!d.displayed("#api-key").await);

    assert_eq!(d.upload(&image_path("chelsea.png")).await, "done", "{}", d.text("#error").await);
    assert_eq!(d.text("#top-label").await, label);
    assert_eq!(d.text("#top-score").await, format!("{score:.4}"));
    let rows = d.find_all("#predictions li").await;
    assert_eq!(rows.len(), expected.as_array().unwrap().len());
    for (row, want) in rows.iter().zip(expected.as_array().unwrap()) {
        assert_eq!(d.attr(row, "data-label").await, want["label"]);
        let shown: f64 = d.attr(row, "data-score").await.as_str().unwrap().parse().unwrap();
        assert_eq!(shown, want["score"].as_f64().unwrap());
    }
    // A phone-sized window scrolls only vertically.
    let width = d.script("return [document.documentElement.scrollWidth, window.innerWidth]").await;
    assert_eq!(width[1], 390, "not a phone-sized viewport");
    assert!(width[0].as_u64() <= width[1].as_u64(), "the page scrolls horizontally at phone width: {width}");
    d.screenshot("page-classify.png").await;

    // An image the server cannot decode: its own words, and the status.
    let bad = std::env::temp_dir().join(format!("beit-browser-not-an-image-{}.png", std::process::id()));
    std::fs::write(&bad, b"not an image at all").unwrap();
    let state = d.upload(&bad).await;
    let _ = std::fs::remove_file(&bad);
    assert_eq!(state, "error");
    let wanted = http.post("/classify", "application/octet-stream", b"not an image at all".to_vec()).await;
    let error = d.text("#error").await;
    assert!(error.contains(wanted.json()["error"].as_str().unwrap()), "{error} vs {}", wanted.text());
    assert!(error.starts_with(&wanted.status.as_u16().to_string()), "{error}");
    server.shutdown().await.unwrap();
}

/// The overlay appears at the image's size and the legend lists exactly the classes POST /segment returned.
async fn segmenter(d: &Driver) {
    let model = model_dir("seg_uper_aux1");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    let expected = http.post("/segment", "image/png", image_bytes("chelsea.png")).await.json();
    let expected = expected.as_array().unwrap();

    d.goto(&format!("http://{}/", server.addr())).await;
    assert_eq!(d.wait_answer(0).await, "ready");
    let model_el = d.find("#model").await;
    assert_eq!(d.attr(&model_el, "data-task").await, "segment");
    assert_eq!(d.upload(&image_path("chelsea.png")).await, "done", "{}", d.text("#error").await);
    assert!(d.displayed("#overlay").await);
    let overlay = d.find("#overlay").await;
    assert_eq!(d.attr(&overlay, "data-ready").await, "true");
    let (w, h) = image::image_dimensions(image_path("chelsea.png")).unwrap();
    assert_eq!(d.property("#overlay", "width").await, w);
    assert_eq!(d.property("#overlay", "height").await, h);
    let items = d.find_all("#legend li").await;
    assert_eq!(items.len(), expected.len());
    for (li, seg) in items.iter().zip(expected) {
        assert_eq!(d.attr(li, "data-label").await, seg["label"]);
        let text = d.on(Method::GET, &format!("/element/{li}/text"), None).await;
        let share = format!("{:.1} %", seg["score"].as_f64().unwrap() * 100.0);
        assert!(text.as_str().unwrap().contains(&share), "{text} lacks {share}");
    }
    d.screenshot("page-segment.png").await;
    server.shutdown().await.unwrap();
}

/// A server with a key: the page asks for it, shows the server's 401 for a wrong one, and works with the right one.
async fn keys(d: &Driver) {
    let model = model_dir("cls_single");
    let cfg = ServerConfig { api_keys: ApiKeys::new([KEY], "test").unwrap(), ..config(&model) };
    let server = start(&model, cfg).await;
    let http = Http::new(&server);

    d.goto(&format!("http://{}/", server.addr())).await;
    assert_eq!(d.wait_answer(0).await, "error");
    let missing = http.get("/info").await;
    assert_eq!(missing.status, 401);
    let error = d.text("#error").await;
    assert!(error.starts_with("401") && error.contains(missing.json()["error"].as_str().unwrap()), "{error}");
    assert!(d.displayed("#api-key").await, "no key field after a 401");

    let n = d.answers().await;
    d.type_into("#api-key", "k-wrong-key").await;
    d.click("#save-key").await;
    assert_eq!(d.wait_answer(n).await, "error");
    let wrong = http.send_with(Method::GET, "/info", &[("authorization", "Bearer k-wrong-key")], Vec::new()).await;
    let wrong = wrong.unwrap();
    assert_eq!(wrong.status, 401);
    let error = d.text("#error").await;
    assert!(error.starts_with("401") && error.contains(wrong.json()["error"].as_str().unwrap()), "{error}");

    let n = d.answers().await;
    d.type_into("#api-key", KEY).await;
    d.click("#save-key").await;
    assert_eq!(d.wait_answer(n).await, "ready", "{}", d.text("#error").await);
    assert_eq!(d.text("#error").await, "");
    assert_eq!(d.text("#model-name").await, model);
    let auth = format!("Bearer {KEY}");
    let headers = [("authorization", auth.as_str()), ("content-type", "image/png")];
    let expected = http.send_with(Method::POST, "/classify", &headers, image_bytes("coffee.png")).await.unwrap();
    let expected = expected.json();
    assert_eq!(d.upload(&image_path("coffee.png")).await, "done", "{}", d.text("#error").await);
    assert_eq!(d.text("#top-label").await, expected[0]["label"].as_str().unwrap());
    assert_eq!(d.text("#top-score").await, format!("{:.4}", expected[0]["score"].as_f64().unwrap()));
    server.shutdown().await.unwrap();
}
