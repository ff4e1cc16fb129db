//! `beit serve`: an HTTP inference server (crates/beit-server) over the model's pipeline.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use beit_server::{ApiKeys, CorsOrigins, ServerConfig};
use clap::Args;

use crate::common::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most images per model call (1 turns batching off).
    #[arg(long, default_value_t = 8)]
    max_batch_size: usize,
    /// How long to wait for more requests after the first of a batch, in milliseconds.
    #[arg(long, default_value_t = 5)]
    max_batch_delay_ms: u64,
    /// Requests that may wait beyond a running batch; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Answer a request 503 (`queue_timeout`, with Retry-After) once it has waited this long in the queue, rather
    /// than serve it late. No limit unless given.
    #[arg(long, value_name = "MS")]
    max_queue_wait_ms: Option<u64>,
    /// Largest request body, in bytes (413 above).
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// After --body-grace-ms, a request body must keep arriving at this many bytes per second on average, or the
    /// request gets 408 (0: no minimum). A request holds no queue slot while its body arrives.
    #[arg(long, value_name = "BYTES_PER_S", default_value_t = 1024)]
    min_body_rate: u64,
    /// How long a body may take before --min-body-rate counts, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    body_grace_ms: u64,
    /// How long a connection may take to send a request's headers (or sit idle between requests), in
    /// milliseconds, before it is closed.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// Connections one client address may hold open; more are answered 429 and closed.
    #[arg(long, default_value_t = 64)]
    max_connections_per_client: usize,
    /// Largest image, in pixels, checked from the header before decoding (400 above).
    #[arg(long, default_value_t = 25_000_000)]
    max_image_pixels: u64,
    /// An API key clients must send as `Authorization: Bearer KEY` on every endpoint but /health and the page at /; repeat for
    /// several. Other users can read it in the process list: prefer --api-key-file or BEIT_API_KEY.
    #[arg(long = "api-key", value_name = "KEY")]
    api_keys: Vec<String>,
    /// A file of API keys, one per line (blank lines and # comments skipped). The BEIT_API_KEYS environment
    /// variable may name one too.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// An origin (e.g. https://app.example.com) whose pages may call the API from a browser; repeat for several,
    /// `*` for any. CORS is off unless given.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Log lines as text, or as one JSON object per line (each request: method, path, status, latency, batch
    /// size, request id). RUST_LOG filters them.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    /// Whether the log is JSON lines.
    pub fn json_logs(&self) -> bool {
        self.log_format == LogFormat::Json
    }
}

/// The keys from --api-key, --api-key-file, BEIT_API_KEY (one key) and BEIT_API_KEYS (a keys file), together.
fn api_keys(a: &ServeArgs) -> Result<ApiKeys> {
    let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    let mut keys = ApiKeys::new(a.api_keys.iter().cloned(), "--api-key")?;
    if let Some(k) = env("BEIT_API_KEY") {
        keys = keys.merged(ApiKeys::new([k], "BEIT_API_KEY")?);
    }
    for file in a.api_key_file.iter().cloned().chain(env("BEIT_API_KEYS").map(PathBuf::from)) {
        keys = keys.merged(ApiKeys::from_file(&file)?);
    }
    Ok(keys)
}

pub fn run(a: ServeArgs) -> Result<()> {
    let api_keys = api_keys(&a)?;
    let config = ServerConfig {
        host: a.host,
        port: a.port,
        max_batch_size: a.max_batch_size,
        max_batch_delay: Duration::from_millis(a.max_batch_delay_ms),
        max_queue: a.max_queue,
        max_queue_wait: a.max_queue_wait_ms.map(Duration::from_millis),
        max_body_bytes: a.max_body_bytes,
        min_body_rate: a.min_body_rate,
        body_grace: Duration::from_millis(a.body_grace_ms),
        header_timeout: Duration::from_millis(a.header_timeout_ms),
        max_connections_per_client: a.max_connections_per_client,
        max_image_pixels: a.max_image_pixels,
        model_id: a.model.model.clone(),
        api_keys,
        cors_origins: CorsOrigins(a.cors_origins),
    };
    let access = match config.api_keys.len() {
        0 => "open (no API key)".to_string(),
        n => format!("API key required ({n} key{})", if n == 1 { "" } else { "s" }),
    };
    config.validate()?;
    let model = a.model;
    beit_server::run_blocking(
        config,
        move || model.pipeline().map_err(|e| format!("{e:#}")),
        |addr, info| {
            let tasks: Vec<&str> = info.tasks.iter().map(|t| t.as_str()).collect();
            eprintln!(
                "beit serve: {} ({}) on http://{addr}; tasks: {}; {access}",
                info.model_dir,
                info.architecture,
                tasks.join(", ")
            );
        },
    )?;
    eprintln!("beit serve: stopped");
    Ok(())
}
