//! Dynamic batching: one OS thread owns the model and runs the requests that arrive together as one batch.
//!
//! Handlers send a `Job` (an image decoded, resized and normalized on the blocking pool, and a oneshot reply) into a
//! bounded channel. The model thread takes the first job, then keeps taking jobs until it has `max_batch_size` of
//! them or `max_batch_delay` has passed since the first — waiting only while other admitted requests are still
//! being read or decoded, so a lone request is not delayed — drops those whose client has gone, groups the rest by task and runs each group as one call. The
//! async runtime's threads never run the model.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use beit::pipeline::{Pipeline, Prediction, Prepared, SlideOptions};
use beit::processor::{SegmentationMap, SizeDict};
use beit::{AnyBeitModel, Architecture, BeitConfig, BeitError};
use image::RgbImage;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::error::{ApiError, ErrorType, ServerError};

/// What a model call returns: the library's typed error, whose kind decides the answer's status
/// ([`ApiError::from_beit`]).
pub type BackendResult<T> = Result<T, BeitError>;
use crate::metrics::Metrics;

/// The three things the server asks of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Classify,
    Segment,
    Embed,
}

impl Task {
    pub fn as_str(&self) -> &'static str {
        match self {
            Task::Classify => "classify",
            Task::Segment => "segment",
            Task::Embed => "embed",
        }
    }
}

/// `/segment`'s sliding window as a request asks for it; what it leaves out comes from the model
/// ([`SlideOptions::for_config`]: windows of its image_size every two thirds of it, at the image's own size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlideRequest {
    /// Window (height, width).
    pub crop: Option<(usize, usize)>,
    /// Step (height, width); default two thirds of the crop.
    pub stride: Option<(usize, usize)>,
    /// Keep-ratio rescale to (long, short) edge bounds first.
    pub scale: Option<(usize, usize)>,
}

impl SlideRequest {
    /// The window the request asked for, the model's defaults filling the rest.
    pub fn resolve(&self, c: &BeitConfig) -> SlideOptions {
        let d = SlideOptions::for_config(c);
        let crop = self.crop.unwrap_or(d.crop);
        SlideOptions { crop, stride: self.stride.unwrap_or((crop.0 * 2 / 3, crop.1 * 2 / 3)), scale: self.scale }
    }
}

/// The model's image processor as a function the request handlers run on the blocking pool, so that resizing
/// and normalizing happen beside the model thread (in parallel across requests), not on it.
#[derive(Clone)]
pub struct Preparer(pub Arc<dyn Fn(&RgbImage) -> BackendResult<Prepared> + Send + Sync>);

impl std::fmt::Debug for Preparer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Preparer")
    }
}

/// What the server says about its model on /info.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// How images are prepared for [`Backend`]'s calls (not shown on /info).
    #[serde(skip)]
    pub preparer: Preparer,
    pub model_dir: String,
    pub architecture: String,
    pub tasks: Vec<Task>,
    pub id2label: BTreeMap<usize, String>,
    pub config: serde_json::Value,
    pub processor: serde_json::Value,
}

impl ModelInfo {
    /// The class's name, or `LABEL_{id}` as transformers names classes without one.
    pub fn label(&self, id: u32) -> String {
        self.id2label.get(&(id as usize)).cloned().unwrap_or_else(|| format!("LABEL_{id}"))
    }

    /// Why this model cannot do `task`, and what it can do.
    pub fn cannot(&self, task: Task) -> String {
        let can: Vec<&str> = self.tasks.iter().map(|t| t.as_str()).collect();
        format!("this model ({}) cannot {}; it can: {}", self.architecture, task.as_str(), can.join(", "))
    }
}

/// The model behind the server: `Pipeline`, or anything else that answers the same way (tests use a slow one
/// and a faulty one). It is created and used on the model thread only, so it need not be `Send`.
///
/// Errors are typed: an input the model refuses (`ErrorKind::InvalidInput` or `Format`) or a task it cannot do
/// (`Unsupported`) is answered 400 with the error's message; anything else is a fault, answered 500 with its
/// cause logged. A panic counts as an internal fault of that call; the server keeps serving.
pub trait Backend {
    /// What /info says, and which tasks the server routes to this backend.
    fn info(&self) -> ModelInfo;
    /// The `top_k` best classes per image, best first.
    fn classify(&self, images: &[&Prepared], top_k: usize) -> BackendResult<Vec<Vec<Prediction>>>;
    /// Class ids per pixel at each image's size.
    fn segment(&self, images: &[&Prepared]) -> BackendResult<Vec<SegmentationMap>>;
    /// The pooled vector per image.
    fn embed(&self, images: &[&Prepared]) -> BackendResult<Vec<Vec<f32>>>;
    /// Class ids per pixel at the image's size by the sliding window (one image: windows are the batch).
    fn segment_slide(&self, _image: &RgbImage, _slide: &SlideRequest) -> BackendResult<SegmentationMap> {
        Err(BeitError::unsupported("sliding-window segmentation", "this backend segments whole images only"))
    }
}

impl Backend for Pipeline {
    fn info(&self) -> ModelInfo {
        let c = &self.pretrained.config;
        let arch = self.pretrained.model.architecture();
        let tasks = match &self.pretrained.model {
            AnyBeitModel::ImageClassification(_) => vec![Task::Classify, Task::Embed],
            AnyBeitModel::SemanticSegmentation(_) => vec![Task::Segment, Task::Embed],
            AnyBeitModel::Backbone(_) => vec![],
            _ => vec![Task::Embed],
        };
        let p = &self.processor;
        let prepare = self.preparer();
        ModelInfo {
            preparer: Preparer(Arc::new(move |image| Ok(prepare(image)?))),
            model_dir: self.model_dir.display().to_string(),
            architecture: arch.name().to_string(),
            tasks,
            id2label: if arch == Architecture::BeitModel { BTreeMap::new() } else { c.id2label.clone() },
            config: serde_json::json!({
                "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "intermediate_size": c.intermediate_size,
                "image_size": [c.image_size.height, c.image_size.width],
                "patch_size": [c.patch_size.height, c.patch_size.width],
                "num_labels": c.num_labels(),
                "use_mean_pooling": c.use_mean_pooling,
                "problem_type": c.problem_type,
            }),
            processor: serde_json::json!({
                "do_resize": p.do_resize,
                "size": size_json(&p.size),
                "do_center_crop": p.do_center_crop,
                "crop_size": size_json(&p.crop_size),
                "do_normalize": p.do_normalize,
                "image_mean": p.image_mean,
                "image_std": p.image_std,
            }),
        }
    }

    fn classify(&self, images: &[&Prepared], top_k: usize) -> BackendResult<Vec<Vec<Prediction>>> {
        Pipeline::classify_prepared(self, images, top_k)
    }

    fn segment(&self, images: &[&Prepared]) -> BackendResult<Vec<SegmentationMap>> {
        Pipeline::segment_prepared(self, images)
    }

    fn embed(&self, images: &[&Prepared]) -> BackendResult<Vec<Vec<f32>>> {
        Ok(Pipeline::embed_prepared(self, images, false)?.to_vec2::<f32>()?)
    }

    fn segment_slide(&self, image: &RgbImage, slide: &SlideRequest) -> BackendResult<SegmentationMap> {
        Pipeline::segment_slide(self, image, &slide.resolve(&self.pretrained.config))
    }
}

fn size_json(s: &SizeDict) -> serde_json::Value {
    match s {
        SizeDict::HeightWidth { height, width } => serde_json::json!({"height": height, "width": width}),
        SizeDict::Other(keys) => serde_json::json!({"keys": keys}),
    }
}

/// A model answer for one image.
#[derive(Debug, Clone)]
pub enum Output {
    Classify(Vec<Prediction>),
    Segment(SegmentationMap),
    Embed(Vec<f32>),
}

/// The model's answer for one image, and how many images its call ran together.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The answer.
    pub output: Output,
    /// Images in the model call that produced it.
    pub batch_size: usize,
}

/// Where the model thread sends one image's answer.
pub type Reply = oneshot::Sender<BackendResult<Answer>>;

/// A job's image: through the processor already, or as decoded for a sliding window (which normalizes window
/// by window).
pub enum JobImage {
    Prepared(Prepared),
    Decoded(RgbImage),
}

/// One image waiting for the model.
pub struct Job {
    /// What to do with it.
    pub task: Task,
    /// The image.
    pub image: JobImage,
    /// Classification only.
    pub top_k: usize,
    /// Segmentation only: the sliding window instead of the whole image resized.
    pub slide: Option<SlideRequest>,
    /// When it was queued.
    pub enqueued: Instant,
    /// Set by whoever takes the job first: the model thread (it runs the job) or the waiting handler (it gave up
    /// at --max-queue-wait-ms and answered 503). The loser leaves the job alone.
    pub claim: Arc<AtomicBool>,
    /// Where the answer goes.
    pub reply: Reply,
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Capacity of the channel to the model thread.
    pub capacity: usize,
}

/// The async side's handle on the model thread.
pub struct Batcher {
    /// `None` once closed: the model thread then drains what is queued and exits.
    tx: Mutex<Option<SyncSender<Job>>>,
    alive: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the model thread, which builds the backend with `loader` and then serves jobs. Returns once the
    /// model is loaded (or failed to load).
    pub async fn spawn<F, B>(
        loader: F,
        cfg: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Batcher, ModelInfo), ServerError>
    where
        F: FnOnce() -> Result<B, String> + Send + 'static,
        B: Backend + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.capacity.max(1));
        let (init_tx, init_rx) = oneshot::channel::<Result<ModelInfo, String>>();
        let alive = Arc::new(AtomicBool::new(true));
        let (alive2, metrics2) = (alive.clone(), metrics.clone());
        let thread = std::thread::Builder::new()
            .name("beit-model".into())
            .spawn(move || {
                let backend = match catch_unwind(AssertUnwindSafe(loader)) {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        let _ = init_tx.send(Err(e));
                        alive2.store(false, Ordering::SeqCst);
                        return;
                    }
                    Err(_) => {
                        let _ = init_tx.send(Err("the model loader panicked".into()));
                        alive2.store(false, Ordering::SeqCst);
                        return;
                    }
                };
                let info = backend.info();
                if init_tx.send(Ok(info.clone())).is_err() {
                    return; // the server gave up waiting
                }
                worker_loop(&backend, &info, rx, cfg, &metrics2);
                alive2.store(false, Ordering::SeqCst);
            })
            .map_err(|e| ServerError::Worker(e.to_string()))?;
        let info = match init_rx.await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(ServerError::Load(e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ServerError::Worker("the model thread stopped while loading".into()));
            }
        };
        let b = Batcher { tx: Mutex::new(Some(tx)), alive, thread: Mutex::new(Some(thread)), metrics };
        Ok((b, info))
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Queues a job without waiting: a full queue is a 503.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(ApiError::new(ErrorType::Unhealthy, "the server is shutting down"));
        };
        // Count before sending so the model thread's decrement never runs first.
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => {
                        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                        ApiError::new(ErrorType::Overloaded, "the queue is full; retry later")
                    }
                    TrySendError::Disconnected(_) => {
                        ApiError::new(ErrorType::Unhealthy, "the model thread has stopped")
                    }
                })
            }
        }
    }

    /// Stops taking jobs and waits until the model thread has run the queued ones and exited.
    pub async fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            // ok to ignore: a panicked model thread has nothing more to report at shutdown.
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

/// How often the model thread rechecks, while forming a batch, whether requests are still on their way.
const WAIT_SLICE: Duration = Duration::from_micros(250);

fn worker_loop<B: Backend>(
    backend: &B,
    info: &ModelInfo,
    rx: mpsc::Receiver<Job>,
    cfg: BatchConfig,
    metrics: &Metrics,
) {
    let max = cfg.max_batch_size.max(1);
    // Every job is received here: `recv` returns queued jobs before reporting that the channel was closed.
    while let Ok(first) = rx.recv() {
        metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
        let deadline = Instant::now() + cfg.max_batch_delay;
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(j) => {
                    metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                    batch.push(j);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            // Wait only while some admitted request is still on its way (being read or decoded), and never past
            // the deadline: a lone request runs at once.
            let now = Instant::now();
            if now >= deadline || metrics.arriving.load(Ordering::SeqCst) == 0 {
                break;
            }
            match rx.recv_timeout((deadline - now).min(WAIT_SLICE)) {
                Ok(j) => {
                    metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                    batch.push(j);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        run_batch(backend, info, batch, metrics);
    }
}

/// Runs one batch: skips jobs whose client has gone, one model call per task, one call per image if the batch
/// call fails (so one bad input fails alone).
fn run_batch<B: Backend>(backend: &B, info: &ModelInfo, batch: Vec<Job>, metrics: &Metrics) {
    let now = Instant::now();
    // Sliding-window jobs run apart, grouped by their window.
    let mut groups: BTreeMap<(Task, Option<SlideRequest>), Vec<Job>> = BTreeMap::new();
    for job in batch {
        if job.claim.swap(true, Ordering::SeqCst) {
            continue; // its handler gave up waiting and has answered
        }
        if job.reply.is_closed() {
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        metrics.observe_queue_wait(now.duration_since(job.enqueued));
        groups.entry((job.task, job.slide)).or_default().push(job);
    }
    for ((task, slide), jobs) in groups {
        let (images, rest): (Vec<JobImage>, Vec<(usize, Reply)>) =
            jobs.into_iter().map(|j| (j.image, (j.top_k, j.reply))).unzip();
        let top_k = rest.iter().map(|r| r.0).max().unwrap_or(1);
        let started = Instant::now();
        let result = run_task(backend, info, task, slide.as_ref(), &images, top_k);
        metrics.observe_batch(task.as_str(), images.len(), started.elapsed());
        match result {
            Ok(outputs) => {
                let batch_size = images.len();
                for (out, (k, reply)) in outputs.into_iter().zip(rest) {
                    // ok to ignore: the client may have gone while the batch ran.
                    let _ = reply.send(Ok(Answer { output: truncate(out, k), batch_size }));
                }
            }
            Err(e) if images.len() == 1 => {
                if let Some((_, reply)) = rest.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(e) => {
                tracing::debug!("a batch of {} failed ({e}); running its images one by one", images.len());
                for (image, (k, reply)) in images.into_iter().zip(rest) {
                    if reply.is_closed() {
                        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let started = Instant::now();
                    let r = run_task(backend, info, task, slide.as_ref(), std::slice::from_ref(&image), k);
                    metrics.observe_batch(task.as_str(), 1, started.elapsed());
                    let one = r.and_then(|mut v| v.pop().ok_or_else(|| fault("gave no output for one image")));
                    let _ = reply.send(one.map(|output| Answer { output, batch_size: 1 }));
                }
            }
        }
    }
}

fn truncate(out: Output, k: usize) -> Output {
    match out {
        Output::Classify(mut p) => {
            p.truncate(k);
            Output::Classify(p)
        }
        other => other,
    }
}

/// A fault of the backend: a bug, not the request's doing.
fn fault(message: impl Into<String>) -> BeitError {
    BeitError::internal("the server's model backend", message)
}

/// One model call, with panics and wrong output counts turned into internal errors.
fn run_task<B: Backend>(
    backend: &B,
    info: &ModelInfo,
    task: Task,
    slide: Option<&SlideRequest>,
    images: &[JobImage],
    top_k: usize,
) -> BackendResult<Vec<Output>> {
    if !info.tasks.contains(&task) {
        return Err(BeitError::unsupported(task.as_str(), info.cannot(task)));
    }
    let r = catch_unwind(AssertUnwindSafe(|| -> BackendResult<Vec<Output>> {
        if let (Task::Segment, Some(s)) = (task, slide) {
            let decoded = |i: &JobImage| match i {
                JobImage::Decoded(img) => backend.segment_slide(img, s).map(Output::Segment),
                JobImage::Prepared(_) => Err(fault("a sliding-window job came without its decoded image")),
            };
            return images.iter().map(decoded).collect();
        }
        let prepared: Vec<&Prepared> = images
            .iter()
            .map(|i| match i {
                JobImage::Prepared(p) => Ok(p),
                JobImage::Decoded(_) => Err(fault("a job came without its prepared image")),
            })
            .collect::<BackendResult<_>>()?;
        Ok(match task {
            Task::Classify => backend.classify(&prepared, top_k)?.into_iter().map(Output::Classify).collect(),
            Task::Segment => backend.segment(&prepared)?.into_iter().map(Output::Segment).collect(),
            Task::Embed => backend.embed(&prepared)?.into_iter().map(Output::Embed).collect(),
        })
    }));
    match r {
        Ok(Ok(v)) if v.len() == images.len() => Ok(v),
        Ok(Ok(v)) => Err(fault(format!("{} gave {} outputs for {} images", task.as_str(), v.len(), images.len()))),
        Ok(Err(e)) => Err(e),
        Err(payload) => {
            let why = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(fault(format!("{} panicked: {why}", task.as_str())))
        }
    }
}
