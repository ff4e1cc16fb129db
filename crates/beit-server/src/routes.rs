//! The HTTP endpoints.

use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use beit::pipeline::Prediction;
use beit::processor::SegmentationMap;
use beit::BeitError;
use image::{GrayImage, ImageFormat};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::batcher::{Batcher, Job, ModelInfo, Output, Task};
use crate::decode::decode_rgb;
use crate::error::{ApiError, ErrorType, RequestId};
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

/// Every endpoint, behind the key check (inside the metrics, so refusals are counted).
pub fn router(state: Arc<AppState>) -> Router {
    let metrics = state.metrics.clone();
    let keys = Arc::new(state.config.api_keys.clone());
    Router::new()
        .route("/classify", post(classify))
        .route("/segment", post(segment))
        .route("/embed", post(embed))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The inference handlers read bodies themselves, against --max-body-bytes.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(keys, crate::auth::require_key))
        .layer(middleware::from_fn_with_state(metrics, track))
        .with_state(state)
}

/// Names every request (a [`RequestId`] in its extensions), counts every answer by endpoint and status, and
/// times it.
async fn track(State(metrics): State<Arc<Metrics>>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(RequestId::new());
    let endpoint = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics.observe_request(endpoint.as_deref().unwrap_or("unmatched"), resp.status().as_u16(), started.elapsed());
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorType::NotFound, "no such endpoint; see GET /openapi.json").closing()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorType::MethodNotAllowed, "this endpoint takes another method; see GET /openapi.json").closing()
}

#[derive(Debug, Deserialize)]
struct TopKQuery {
    top_k: Option<usize>,
}

/// Holds an admission permit and the in-flight gauge for the life of a request.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a request as on its way to the queue until it is queued (or fails).
struct Arriving(Arc<Metrics>);

impl Arriving {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.arriving.fetch_add(1, Ordering::SeqCst);
        Arriving(metrics.clone())
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.0.arriving.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(state: &AppState) -> Result<Admitted, ApiError> {
    match state.admission.clone().try_acquire_owned() {
        Ok(permit) => {
            state.metrics.in_flight.fetch_add(1, Ordering::SeqCst);
            Ok(Admitted { _permit: permit, metrics: state.metrics.clone() })
        }
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

/// [`infer_inner`], with the request's id on every error.
async fn infer(state: &AppState, task: Task, req: Request) -> Result<(Output, RequestId), ApiError> {
    let id = request_id(&req);
    match infer_inner(state, task, req, &id).await {
        Ok(out) => Ok((out, id)),
        Err(e) => Err(e.with_request_id(&id)),
    }
}

/// Parse, decode, queue, wait: the path every inference request takes. Refusals before the body is read close
/// the connection (it still holds the unread body).
async fn infer_inner(state: &AppState, task: Task, req: Request, id: &RequestId) -> Result<Output, ApiError> {
    if !state.info.tasks.contains(&task) {
        return Err(ApiError::new(ErrorType::Unsupported, state.info.cannot(task)).closing());
    }
    let _admitted = admit(state).map_err(ApiError::closing)?;
    let arriving = Arriving::new(&state.metrics);
    let query_top_k = match Query::<TopKQuery>::try_from_uri(req.uri()) {
        Ok(q) => q.0.top_k,
        Err(e) => return Err(ApiError::validation(format!("bad query string: {}", e.body_text())).closing()),
    };
    let input = crate::input::parse(req, state.config.max_body_bytes).await?;
    let top_k = input.top_k.or(query_top_k).unwrap_or(5);
    if top_k == 0 {
        return Err(ApiError::validation("`top_k` must be at least 1"));
    }
    let max_pixels = state.config.max_image_pixels;
    let bytes = input.image;
    let image = tokio::task::spawn_blocking(move || decode_rgb(&bytes, max_pixels))
        .await
        .unwrap_or_else(|e| Err(BeitError::internal("decoding the request's image", e.to_string())))
        .map_err(|e| ApiError::from_beit(&e, id))?;
    let (tx, rx) = oneshot::channel();
    state.batcher.submit(Job { task, image, top_k, enqueued: Instant::now(), reply: tx })?;
    // Queued: no longer on its way (counted until now so that the model thread never misses it).
    drop(arriving);
    // If this future is dropped (the client went away), `rx` goes with it and the model thread skips the job.
    rx.await
        .map_err(|_| ApiError::new(ErrorType::Unhealthy, "the model thread stopped before answering"))?
        .map_err(|e| ApiError::from_beit(&e, id))
}

/// The model thread answered a task with another task's output: a bug.
fn wrong_output(task: Task, id: &RequestId) -> ApiError {
    let e = BeitError::internal("the model thread", format!("answered {} with another task's output", task.as_str()));
    ApiError::from_beit(&e, id)
}

async fn classify(State(state): State<Arc<AppState>>, req: Request) -> Result<Json<Vec<Prediction>>, ApiError> {
    match infer(&state, Task::Classify, req).await? {
        (Output::Classify(p), _) => Ok(Json(p)),
        (_, id) => Err(wrong_output(Task::Classify, &id)),
    }
}

async fn embed(State(state): State<Arc<AppState>>, req: Request) -> Result<Json<Vec<f32>>, ApiError> {
    match infer(&state, Task::Embed, req).await? {
        (Output::Embed(v), _) => Ok(Json(v)),
        (_, id) => Err(wrong_output(Task::Embed, &id)),
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

async fn segment(State(state): State<Arc<AppState>>, req: Request) -> Result<Json<Vec<Segment>>, ApiError> {
    let (map, id) = match infer(&state, Task::Segment, req).await? {
        (Output::Segment(m), id) => (m, id),
        (_, id) => return Err(wrong_output(Task::Segment, &id)),
    };
    let st = state.clone();
    tokio::task::spawn_blocking(move || segments(&map, &st.info))
        .await
        .unwrap_or_else(|e| Err(BeitError::internal("encoding the segmentation masks", e.to_string())))
        .map(Json)
        .map_err(|e| ApiError::from_beit(&e, &id))
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
            "max_body_bytes": c.max_body_bytes,
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
