//! The HTTP endpoints.

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use base64::Engine;
use beit::processor::SegmentationMap;
use beit::BeitError;
use image::{GrayImage, ImageFormat};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::batcher::{Answer, BackendResult, Batcher, Job, JobImage, ModelInfo, Output, SlideRequest, Task};
use crate::decode::decode_rgb;
use crate::error::{ApiError, ErrorType, RequestId, REQUEST_ID_HEADER};
use crate::input::SegmentParams;
use crate::metrics::Metrics;
use crate::ServerConfig;

/// What every handler shares.
pub struct AppState {
    pub config: ServerConfig,
    pub info: ModelInfo,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    /// One permit per request admitted to inference: `max_queue` waiting plus a running batch.
    pub admission: Arc<Semaphore>,
}

/// Every endpoint, behind the key check, behind CORS (preflights carry no key), inside [`track`] (so refusals are
/// counted and logged).
pub fn router(state: Arc<AppState>) -> Router {
    let keys = Arc::new(state.config.api_keys.clone());
    let origins = Arc::new(state.config.cors_origins.clone());
    Router::new()
        .route("/classify", post(classify))
        .route("/segment", post(segment))
        .route("/embed", post(embed))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .merge(crate::page::routes::<Arc<AppState>>())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The inference handlers read bodies themselves, against --max-body-bytes.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(keys, crate::auth::require_key))
        .layer(middleware::from_fn_with_state(origins, crate::auth::cors))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Names every request (the client's `x-request-id` if usable, else a fresh one), puts the id on the answer (the
/// header, and the body of an error written without it), counts and times every answer, counts refusals by
/// reason, and writes one access-log line (target `beit_server::access`) per request.
async fn track(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let id =
        req.headers().get(REQUEST_ID_HEADER).and_then(|v| RequestId::from_client(v.as_bytes())).unwrap_or_default();
    req.extensions_mut().insert(id.clone());
    let endpoint = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let started = Instant::now();
    let mut resp = next.run(req).await;
    if let Some(e) = resp.extensions_mut().remove::<ApiError>() {
        if e.kind.is_rejection() {
            state.metrics.reject(e.kind.as_str());
        }
        if e.request_id.is_none() {
            let (mut parts, _) = resp.into_parts();
            parts.headers.remove(header::CONTENT_LENGTH);
            let body = e.with_request_id(&id).body().to_string();
            resp = Response::from_parts(parts, body.into());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let (status, elapsed) = (resp.status().as_u16(), started.elapsed());
    state.metrics.observe_request(endpoint.as_deref().unwrap_or("unmatched"), status, elapsed);
    let batch_size = resp.extensions().get::<BatchSize>().map(|b| b.0 as u64);
    let latency_ms = elapsed.as_secs_f64() * 1e3;
    tracing::info!(target: "beit_server::access", %method, path = %path, status, latency_ms, batch_size, request_id = %id, "request");
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorType::NotFound, "no such endpoint; see GET /openapi.json").closing()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorType::MethodNotAllowed, "this endpoint takes another method; see GET /openapi.json").closing()
}

#[derive(Debug, Deserialize)]
struct QueryParams {
    top_k: Option<usize>,
    mode: Option<String>,
    crop: Option<String>,
    stride: Option<String>,
    scale: Option<String>,
}

impl QueryParams {
    fn segment(&self) -> Result<SegmentParams, ApiError> {
        let mut p = SegmentParams::default();
        for (name, v) in [("mode", &self.mode), ("crop", &self.crop), ("stride", &self.stride), ("scale", &self.scale)]
        {
            if let Some(v) = v {
                p.set(name, &serde_json::Value::String(v.clone()))?;
            }
        }
        Ok(p)
    }
}

/// The sliding window a request asked for (None: the whole image), checked against its task.
fn slide_request(task: Task, p: SegmentParams) -> Result<Option<SlideRequest>, ApiError> {
    if p.is_empty() {
        return Ok(None);
    }
    if task != Task::Segment {
        return Err(ApiError::validation(format!(
            "`mode`, `crop`, `stride` and `scale` are /segment's parameters, not /{}'s",
            task.as_str()
        )));
    }
    match p.mode.as_deref() {
        Some("slide") => Ok(Some(SlideRequest { crop: p.crop, stride: p.stride, scale: p.scale })),
        None | Some("whole") => Err(ApiError::validation("`crop`, `stride` and `scale` need `mode` \"slide\"")),
        Some(other) => Err(ApiError::validation(format!("`mode` must be \"whole\" or \"slide\", found {other:?}"))),
    }
}

/// Counts a request on one of the metrics' gauges until dropped.
struct Counting {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &AtomicUsize,
}

impl Counting {
    fn new(metrics: &Arc<Metrics>, gauge: fn(&Metrics) -> &AtomicUsize) -> Self {
        gauge(metrics).fetch_add(1, Ordering::SeqCst);
        Counting { metrics: metrics.clone(), gauge }
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Ordering::SeqCst);
    }
}

/// Holds an admission permit and the in-flight gauge for the life of a request.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    _in_flight: Counting,
}

fn admit(state: &AppState) -> Result<Admitted, ApiError> {
    match state.admission.clone().try_acquire_owned() {
        Ok(permit) => Ok(Admitted { _permit: permit, _in_flight: Counting::new(&state.metrics, |m| &m.in_flight) }),
        Err(_) => {
            state.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::new(ErrorType::Overloaded, "the queue is full; retry later"))
        }
    }
}

/// The id [`track`] gave the request.
fn request_id(req: &Request) -> RequestId {
    req.extensions().get::<RequestId>().cloned().unwrap_or_default()
}

/// How many images the model call that answered a request ran together, for the access log.
#[derive(Debug, Clone, Copy)]
struct BatchSize(usize);

/// How the model thread answered the request `id`.
struct Done {
    batch_size: usize,
    id: RequestId,
}

impl Done {
    /// The response, carrying its batch size for [`track`].
    fn respond(self, body: impl IntoResponse) -> Response {
        (Extension(BatchSize(self.batch_size)), body).into_response()
    }

    /// The model thread answered a task with another task's output: a bug.
    fn wrong_output(&self, task: Task) -> ApiError {
        let what = format!("answered {} with another task's output", task.as_str());
        ApiError::from_beit(&BeitError::internal("the model thread", what), &self.id)
    }
}

/// Read, decode, admit, queue, wait: the path every inference request takes. A request takes a queue slot only
/// once its image is decoded, so clients that send slowly (or not at all) hold none. Refusals before the body is
/// read close the connection (it still holds the unread body).
async fn infer(state: &AppState, task: Task, req: Request) -> Result<(Output, Done), ApiError> {
    let id = request_id(&req);
    if !state.info.tasks.contains(&task) {
        return Err(ApiError::new(ErrorType::Unsupported, state.info.cannot(task)).closing());
    }
    let query = match Query::<QueryParams>::try_from_uri(req.uri()) {
        Ok(q) => q.0,
        Err(e) => return Err(ApiError::validation(format!("bad query string: {}", e.body_text())).closing()),
    };
    let query_segment = query.segment().map_err(ApiError::closing)?;
    let reading = Counting::new(&state.metrics, |m| &m.reading);
    let input = crate::input::parse(req, &state.config.body_limits()).await?;
    drop(reading);
    let top_k = input.top_k.or(query.top_k).unwrap_or(5);
    let slide = slide_request(task, input.segment.or(query_segment))?;
    if top_k == 0 {
        return Err(ApiError::validation("`top_k` must be at least 1"));
    }
    // On its way to the queue: the model thread waits for it (up to the batch delay) while it decodes.
    let arriving = Counting::new(&state.metrics, |m| &m.arriving);
    let max_pixels = state.config.max_image_pixels;
    let bytes = input.image;
    // Decoded and, but for a sliding window, resized and normalized here: on the blocking pool, beside the model.
    let prepare = state.info.preparer.clone();
    let sliding = slide.is_some();
    let image = tokio::task::spawn_blocking(move || {
        let img = decode_rgb(&bytes, max_pixels)?;
        if sliding {
            Ok(JobImage::Decoded(img))
        } else {
            (prepare.0)(&img).map(JobImage::Prepared)
        }
    })
    .await
    .unwrap_or_else(|e| Err(BeitError::internal("decoding the request's image", e.to_string())))
    .map_err(|e| ApiError::from_beit(&e, &id))?;
    let _admitted = admit(state)?;
    let (tx, rx) = oneshot::channel();
    let claim = Arc::new(AtomicBool::new(false));
    state.batcher.submit(Job {
        task,
        image,
        top_k,
        slide,
        enqueued: Instant::now(),
        claim: claim.clone(),
        reply: tx,
    })?;
    // Queued: no longer on its way (counted until now so that the model thread never misses it).
    drop(arriving);
    // If this future is dropped (the client went away), `rx` goes with it and the model thread skips the job.
    let answer = wait(state, rx, &claim).await?.map_err(|e| ApiError::from_beit(&e, &id))?;
    Ok((answer.output, Done { batch_size: answer.batch_size, id }))
}

/// Waits for the model thread's answer. Past --max-queue-wait-ms, a job the model thread has not taken yet is
/// given up (503) rather than served late; one it has taken is waited for.
async fn wait(
    state: &AppState,
    mut rx: oneshot::Receiver<BackendResult<Answer>>,
    claim: &AtomicBool,
) -> Result<BackendResult<Answer>, ApiError> {
    let gone = |_| ApiError::new(ErrorType::Unhealthy, "the model thread stopped before answering");
    let Some(limit) = state.config.max_queue_wait else {
        return rx.await.map_err(gone);
    };
    match tokio::time::timeout(limit, &mut rx).await {
        Ok(answer) => answer.map_err(gone),
        Err(_) if !claim.swap(true, Ordering::SeqCst) => Err(ApiError::new(
            ErrorType::QueueTimeout,
            format!(
                "the request waited {} ms in the queue, the server's limit (--max-queue-wait-ms); retry later",
                limit.as_millis()
            ),
        )),
        Err(_) => rx.await.map_err(gone),
    }
}

async fn classify(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    match infer(&state, Task::Classify, req).await? {
        (Output::Classify(p), done) => Ok(done.respond(Json(p))),
        (_, done) => Err(done.wrong_output(Task::Classify)),
    }
}

async fn embed(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    match infer(&state, Task::Embed, req).await? {
        (Output::Embed(v), done) => Ok(done.respond(Json(v))),
        (_, done) => Err(done.wrong_output(Task::Embed)),
    }
}

/// One class of a segmentation: the image-segmentation pipeline's `{label, score, mask}`.
#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    pub label: String,
    /// The class's share of the image's pixels.
    pub score: f32,
    /// Base64 PNG, 8-bit grayscale at the image's size: 255 where the pixel is this class, 0 elsewhere.
    pub mask: String,
}

/// Per class present (ascending class id, as the pipeline's `np.unique`), its share and mask. A map whose size
/// is not its pixel count is an internal error (the backend made it).
pub fn segments(map: &SegmentationMap, info: &ModelInfo) -> Result<Vec<Segment>, BeitError> {
    let (ids, (h, w)) = map;
    let wrong_size = || {
        let found = format!("{} class ids for {w}x{h} pixels", ids.len());
        BeitError::internal("segmentation map", format!("expected one class id per pixel, found {found}"))
    };
    if ids.len() != h * w || ids.is_empty() {
        return Err(wrong_size());
    }
    let mut counts = std::collections::BTreeMap::<u32, usize>::new();
    for &i in ids {
        *counts.entry(i).or_default() += 1;
    }
    let engine = base64::engine::general_purpose::STANDARD;
    counts
        .into_iter()
        .map(|(class, n)| {
            let data: Vec<u8> = ids.iter().map(|&i| if i == class { 255 } else { 0 }).collect();
            let mask = GrayImage::from_raw(*w as u32, *h as u32, data).ok_or_else(wrong_size)?;
            let mut png = Vec::new();
            mask.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
                .map_err(|e| BeitError::internal("segmentation mask", format!("PNG encoding failed: {e}")))?;
            Ok(Segment {
                label: info.label(class),
                score: (n as f64 / ids.len() as f64) as f32,
                mask: engine.encode(png),
            })
        })
        .collect()
}

async fn segment(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let (map, done) = match infer(&state, Task::Segment, req).await? {
        (Output::Segment(m), done) => (m, done),
        (_, done) => return Err(done.wrong_output(Task::Segment)),
    };
    let st = state.clone();
    match tokio::task::spawn_blocking(move || segments(&map, &st.info)).await {
        Ok(Ok(segs)) => Ok(done.respond(Json(segs))),
        Ok(Err(e)) => Err(ApiError::from_beit(&e, &done.id)),
        Err(e) => {
            Err(ApiError::from_beit(&BeitError::internal("encoding the segmentation masks", e.to_string()), &done.id))
        }
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.batcher.is_alive() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
    } else {
        ApiError::new(ErrorType::Unhealthy, "the model thread has stopped").into_response()
    }
}

async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let c = &state.config;
    Json(serde_json::json!({
        "model_id": c.model_id,
        "model_dir": state.info.model_dir,
        "architecture": state.info.architecture,
        "tasks": state.info.tasks,
        "labels": state.info.id2label.values().collect::<Vec<_>>(),
        "config": state.info.config,
        "processor": state.info.processor,
        "api_key_required": !c.api_keys.is_empty(),
        "limits": {
            "max_batch_size": c.max_batch_size,
            "max_batch_delay_ms": c.max_batch_delay.as_millis() as u64,
            "max_queue": c.max_queue,
            "max_queue_wait_ms": c.max_queue_wait.map(|w| w.as_millis() as u64),
            "max_body_bytes": c.max_body_bytes,
            "min_body_rate": c.min_body_rate,
            "body_grace_ms": c.body_grace.as_millis() as u64,
            "header_timeout_ms": c.header_timeout.as_millis() as u64,
            "max_connections_per_client": c.max_connections_per_client,
            "max_image_pixels": c.max_image_pixels,
        },
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

async fn openapi(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(crate::openapi::document(&state.config))
}
