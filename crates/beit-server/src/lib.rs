//! `beit serve`: an HTTP inference server for BEiT pipelines, after Hugging Face's text-embeddings-inference.
//!
//! - POST /classify, /segment, /embed: an image (raw bytes, a multipart form, or JSON with base64) in, the Hugging
//!   Face Inference API's answer out.
//! - GET /health, /info, /metrics (Prometheus), /openapi.json.
//! - GET /: a web page to try the model from a browser ([`page`]).
//!
//! The model runs on one dedicated OS thread with dynamic batching (see [`batcher`]); the tokio runtime only
//! parses, decodes (on its blocking pool) and answers. Admission is bounded (`max_queue` requests waiting beyond a
//! running batch; more get 503 with Retry-After) and happens only once a request's image is decoded, so slow
//! uploads hold no slot; bodies must arrive at a minimum rate, headers within a deadline, and one address may hold
//! only so many connections ([`conn`]). Bodies and images are bounded, and a client that disconnects has its
//! queued work dropped. Errors are typed ([`ApiError::from_beit`]); with API keys ([`auth`]) every endpoint but
//! /health and the page's files needs one. Shutdown stops accepting, answers what was admitted, then stops the
//! model thread.

pub mod auth;
pub mod batcher;
pub mod conn;
pub mod decode;
pub mod error;
pub mod input;
pub mod log;
pub mod metrics;
pub mod openapi;
pub mod page;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

pub use auth::{ApiKeys, CorsOrigins};
pub use batcher::{Backend, BackendResult, ModelInfo, Preparer, Task};
pub use error::{ApiError, ErrorType, RequestId, ServerError};
pub use metrics::Metrics;

use batcher::{BatchConfig, Batcher};
use routes::AppState;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port (see [`Server::addr`]).
    pub port: u16,
    /// Most images per model call; 1 turns batching off.
    pub max_batch_size: usize,
    /// How long the model thread waits for more requests after the first of a batch.
    pub max_batch_delay: Duration,
    /// Requests admitted to wait beyond a running batch; more are refused with 503.
    pub max_queue: usize,
    /// How long a request may wait in the queue before it is answered 503 rather than served late; `None`: no limit.
    pub max_queue_wait: Option<Duration>,
    /// Largest request body, bytes (413 above).
    pub max_body_bytes: usize,
    /// After `body_grace`, a body must arrive at this many bytes per second on average or get 408; 0: no minimum.
    pub min_body_rate: u64,
    /// How long a body may take before `min_body_rate` counts.
    pub body_grace: Duration,
    /// How long a connection may take to send a request's headers (and may sit idle between requests) before it
    /// is closed.
    pub header_timeout: Duration,
    /// Connections one client address may hold open; more are answered 429 and closed.
    pub max_connections_per_client: usize,
    /// Largest image, pixels, checked from its header before decoding (400 above).
    pub max_image_pixels: u64,
    /// What /info calls the model (the --model argument).
    pub model_id: String,
    /// Keys a request must present (`Authorization: Bearer <key>`) on every endpoint but /health and the page;
    /// none: open.
    pub api_keys: ApiKeys,
    /// Origins whose pages may call the API from a browser (`*`: any); none: CORS off.
    pub cors_origins: CorsOrigins,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch_size: 8,
            max_batch_delay: Duration::from_millis(5),
            max_queue: 64,
            max_queue_wait: None,
            max_body_bytes: 16 << 20,
            min_body_rate: 1024,
            body_grace: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            max_connections_per_client: 64,
            max_image_pixels: 25_000_000,
            model_id: String::new(),
            api_keys: ApiKeys::default(),
            cors_origins: CorsOrigins::default(),
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |name: &'static str, message: &str| Err(ServerError::Config { name, message: message.into() });
        if self.max_batch_size == 0 {
            return bad("max-batch-size", "must be at least 1");
        }
        if self.max_queue == 0 {
            return bad("max-queue", "must be at least 1");
        }
        if self.max_body_bytes == 0 {
            return bad("max-body-bytes", "must be at least 1");
        }
        if self.header_timeout.is_zero() {
            return bad("header-timeout-ms", "must be at least 1");
        }
        if self.max_connections_per_client == 0 {
            return bad("max-connections-per-client", "must be at least 1");
        }
        if self.max_image_pixels == 0 {
            return bad("max-image-pixels", "must be at least 1");
        }
        if self.max_queue_wait.is_some_and(|w| w.is_zero()) {
            return bad("max-queue-wait-ms", "must be at least 1");
        }
        if self.max_batch_delay > Duration::from_secs(60) {
            return bad("max-batch-delay-ms", "must be at most 60000");
        }
        Ok(())
    }

    /// How a request's body must arrive.
    pub fn body_limits(&self) -> input::BodyLimits {
        input::BodyLimits { max_bytes: self.max_body_bytes, min_rate: self.min_body_rate, grace: self.body_grace }
    }

    /// Requests admitted at once: the queue plus one running batch.
    pub fn admitted(&self) -> usize {
        self.max_queue.saturating_add(self.max_batch_size)
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

/// Loads the model on its own thread (with `loader`), binds `host:port` and starts serving on the current tokio
/// runtime. Returns once the server accepts connections.
pub async fn start<F, B>(config: ServerConfig, loader: F) -> Result<Server, ServerError>
where
    F: FnOnce() -> Result<B, String> + Send + 'static,
    B: Backend + 'static,
{
    config.validate()?;
    let metrics = Arc::new(Metrics::new());
    let bc = BatchConfig {
        max_batch_size: config.max_batch_size,
        max_batch_delay: config.max_batch_delay,
        capacity: config.admitted(),
    };
    let (batcher, info) = Batcher::spawn(loader, bc, metrics.clone()).await?;
    let addr_text = format!("{}:{}", config.host, config.port);
    let listener = match TcpListener::bind(&addr_text).await {
        Ok(l) => l,
        Err(source) => {
            batcher.close().await;
            return Err(ServerError::Bind { addr: addr_text, source });
        }
    };
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    let admission = Arc::new(Semaphore::new(config.admitted()));
    let state = Arc::new(AppState { config, info, batcher, metrics, admission });
    let app = routes::router(state.clone());
    let connections = conn::Connections::new(state.config.max_connections_per_client, state.metrics.clone());
    let header_timeout = state.config.header_timeout;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let st = state.clone();
    let task = tokio::spawn(async move {
        let stop = async move {
            // ok to ignore: a dropped sender also means stop.
            let _ = stop_rx.await;
        };
        conn::serve(listener, app, connections, header_timeout, stop).await;
        // Every connection is closed and every admitted request answered; now drain and stop the model thread.
        st.batcher.close().await;
        Ok(())
    });
    Ok(Server { addr, state, stop: Some(stop_tx), task })
}

impl Server {
    /// The bound address (with the port the OS picked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    pub fn info(&self) -> &ModelInfo {
        &self.state.info
    }

    /// Stops accepting connections, finishes the requests in flight, stops the model thread.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Serves until `signal` completes, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
        tokio::pin!(signal);
        let mut this = self;
        tokio::select! {
            _ = &mut signal => this.shutdown().await,
            r = &mut this.task => flatten(r),
        }
    }

    /// Serves until Ctrl-C or SIGTERM, then shuts down gracefully; a second signal during the drain stops at once.
    pub async fn run_until_signal(self) -> Result<(), ServerError> {
        let mut this = self;
        tokio::select! {
            _ = shutdown_signal() => {}
            r = &mut this.task => return flatten(r),
        }
        tracing::info!("shutting down: answering the requests in flight (a second signal stops at once)");
        tokio::select! {
            r = this.shutdown() => r,
            _ = shutdown_signal() => {
                tracing::warn!("second signal: stopping without finishing the requests in flight");
                Ok(())
            }
        }
    }

    async fn wait(self) -> Result<(), ServerError> {
        flatten(self.task.await)
    }
}

fn flatten(r: Result<Result<(), ServerError>, tokio::task::JoinError>) -> Result<(), ServerError> {
    r.map_err(|e| ServerError::Serve(std::io::Error::other(e.to_string())))?
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Builds a multi-threaded tokio runtime, starts the server, calls `on_ready` with its address, and serves until
/// Ctrl-C or SIGTERM. For the `beit serve` command.
pub fn run_blocking<F, B>(
    config: ServerConfig,
    loader: F,
    on_ready: impl FnOnce(SocketAddr, &ModelInfo),
) -> Result<(), ServerError>
where
    F: FnOnce() -> Result<B, String> + Send + 'static,
    B: Backend + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(ServerError::Serve)?;
    rt.block_on(async move {
        let server = start(config, loader).await?;
        on_ready(server.addr(), server.info());
        server.run_until_signal().await
    })
}
