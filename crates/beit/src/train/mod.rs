//! Fine-tuning (and training from scratch) of BeitForImageClassification on an image folder, with BEiT's
//! recipe, per-epoch metrics, atomic checkpoints and --resume.

pub mod data;
pub mod optim;
pub mod pretrain;
pub mod pretrain_data;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{align_prefix, find_weight_files, load_tensors};
use crate::config::{BeitConfig, Size2};
use crate::error::{BeitError, Result};
use crate::heads::loss::{cross_entropy, cross_entropy_smoothed};
use crate::heads::{Architecture, BeitForImageClassification};
use crate::model::ForwardOptions;
use crate::nn::{seed_training_rng, Mode};
use crate::pretrained::save_pretrained;
use crate::processor::BeitImageProcessor;
use crate::rng::Rng;
use crate::weights::{Source, Weights};
use data::{augment, ImageFolder};
use optim::{cosine_lr, AdamW};

/// Where the model to train comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A checkpoint directory (Hugging Face layout).
    Pretrained(PathBuf),
    /// A preset name (tiny, small, base, large) or a config.json: fresh weights.
    Config(BeitConfig),
}

/// The architecture presets: DeiT/BEiT sizes.
pub fn preset(name: &str) -> Result<BeitConfig> {
    let (hidden, layers, heads) = match name {
        "tiny" => (192, 12, 3),
        "small" => (384, 12, 6),
        "base" => (768, 12, 12),
        "large" => (1024, 24, 16),
        other => return Err(BeitError::invalid_input("preset", format!("unknown preset {other:?}; expected tiny, small, base or large"))),
    };
    Ok(BeitConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 4 * hidden,
        use_relative_position_bias: true,
        layer_scale_init_value: if name == "large" { 1e-5 } else { 0.1 },
        ..BeitConfig::default()
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub layer_decay: f64,
    pub label_smoothing: f64,
    pub accum_steps: usize,
    pub seed: u64,
    /// Overrides the config's drop_path_rate.
    pub drop_path: Option<f64>,
    /// RandomResizedCrop's smallest area share.
    pub scale_min: f64,
    pub hflip: bool,
    /// Input resolution when training from scratch (a pretrained model keeps its own).
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub val_split: Option<f64>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 30,
            batch_size: 64,
            lr: 4e-3,
            min_lr: 1e-6,
            weight_decay: 0.05,
            warmup_epochs: 5.0,
            layer_decay: 0.65,
            label_smoothing: 0.1,
            accum_steps: 1,
            seed: 0,
            drop_path: None,
            scale_min: 0.08,
            hflip: true,
            image_size: None,
            patch_size: None,
            val_split: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    pub lr: f64,
    pub images_per_sec: f64,
    pub seconds: f64,
}

/// What a trainer reports while it runs; `M` is its per-epoch record ([`EpochMetrics`] for fine-tuning,
/// [`pretrain::PretrainEpochMetrics`] for pre-training).
pub trait TrainObserver<M = EpochMetrics> {
    fn batch(&mut self, _epoch: usize, _done: usize, _total: usize, _loss: f64) {}
    fn epoch(&mut self, _metrics: &M, _history: &[M]) {}
    fn note(&mut self, _message: &str) {}
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    /// Last completed epoch (1-based).
    epoch: usize,
    step: usize,
    best_top1: Option<f64>,
    options: TrainOptions,
    history: Vec<EpochMetrics>,
}

/// Evaluation: loss, top-1, top-5 and the confusion matrix (rows: truth, columns: prediction).
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub confusion: Vec<Vec<usize>>,
    pub count: usize,
}

/// The preprocessor_config.json a trained checkpoint ships: resize to the training resolution, then normalize.
fn processor_config(size: usize) -> serde_json::Value {
    serde_json::json!({
        "do_resize": true, "size": {"height": size, "width": size}, "resample": 3, "do_center_crop": false,
        "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "BeitImageProcessor",
    })
}

/// The processor evaluation uses during training: the one the checkpoint will ship.
pub fn eval_processor(size: usize) -> BeitImageProcessor {
    BeitImageProcessor::from_json_value(&processor_config(size), "<training>").unwrap_or_default() // ok: a fixed valid config
}

fn processor_json(size: usize) -> String {
    serde_json::to_string_pretty(&processor_config(size)).unwrap_or_default() // ok: a Value always serializes
}

/// Evaluates `model` on decoded images with `processor`, `batch_size` at a time.
pub fn evaluate(
    model: &BeitForImageClassification,
    images: &[image::RgbImage],
    labels: &[usize],
    num_classes: usize,
    processor: &BeitImageProcessor,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    let mut confusion = vec![vec![0usize; num_classes]; num_classes];
    let (mut loss_sum, mut top1, mut top5) = (0f64, 0usize, 0usize);
    let mode = Mode { train: false, uncached: true };
    for (imgs, labs) in images.chunks(batch_size.max(1)).zip(labels.chunks(batch_size.max(1))) {
        let pv = processor.preprocess_rgb(imgs)?;
        let x = Tensor::from_vec(pv.data, pv.shape.to_vec(), device)?;
        let logits = model.forward(&x, &ForwardOptions { mode, ..Default::default() }, None)?.logits.detach();
        let y = Tensor::from_vec(labs.iter().map(|&l| l as i64).collect::<Vec<_>>(), labs.len(), device)?;
        loss_sum += cross_entropy(&logits, &y, -100)?.to_scalar::<f32>()? as f64 * labs.len() as f64;
        for (row, &truth) in logits.to_vec2::<f32>()?.iter().zip(labs) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            confusion[truth][order[0]] += 1;
            top1 += (order[0] == truth) as usize;
            top5 += order.iter().take(5).any(|&c| c == truth) as usize;
        }
    }
    let n = labels.len().max(1) as f64;
    Ok(Evaluation { loss: loss_sum / n, top1: top1 as f64 / n, top5: top5 as f64 / n, confusion, count: labels.len() })
}

/// Writes `files` into `dir` as a whole: a temporary sibling directory, then renames, so a kill leaves either
/// the old checkpoint or the new one.
fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.tmp"));
    let old = parent.join(format!(".{name}.old"));
    let _ = std::fs::remove_dir_all(&tmp);
    fill(&tmp)?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| BeitError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| BeitError::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| BeitError::io(path, e))
}

/// The learning rate of optimizer step `step` in a run of `epochs` epochs of `steps_per_epoch` steps: linear
/// warmup over `warmup_epochs`, then cosine down to `min_lr` (unilm's per-step cosine_scheduler).
pub fn scheduled_lr(step: usize, steps_per_epoch: usize, epochs: usize, warmup_epochs: f64, lr: f64, min_lr: f64) -> f64 {
    let warmup = (warmup_epochs * steps_per_epoch as f64).round() as usize;
    cosine_lr(step, steps_per_epoch * epochs, warmup, lr, min_lr)
}

/// A diverged loss stops the run with the place it happened, instead of writing NaN weights.
fn check_loss(value: f64, epoch: usize, batch: usize) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    Err(BeitError::Diverged { epoch, batch, value })
}

/// The last epoch this invocation runs: all of them, or `stop_after` more (for interrupted runs).
fn end_epoch(start_epoch: usize, epochs: usize, stop_after: Option<usize>) -> usize {
    match stop_after {
        Some(k) => (start_epoch + k).min(epochs),
        None => epochs,
    }
}

/// The config and tensors of a checkpoint directory (`out/last` when resuming).
fn read_checkpoint(dir: &Path, device: &Device) -> Result<(BeitConfig, HashMap<String, Tensor>)> {
    let c = BeitConfig::from_file(&dir.join("config.json"))?;
    let (format, files) = find_weight_files(dir, None)?;
    Ok((c, load_tensors(format, &files, device)?))
}

/// `out/last/trainer_state.json`, and the optimizer moments beside it at optimizer step `step(&state)`.
fn read_resume_state<S: DeserializeOwned>(
    last: &Path,
    optimizer: &mut AdamW,
    step: impl FnOnce(&S) -> usize,
    device: &Device,
) -> Result<S> {
    let state_path = last.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| BeitError::io(&state_path, e))?;
    let state: S =
        serde_json::from_str(&text).map_err(|e| BeitError::Json { path: state_path.clone(), message: e.to_string() })?;
    let moments = candle_core::safetensors::load(last.join("optimizer.safetensors"), device)?;
    optimizer.load_state(&moments, step(&state))?;
    Ok(state)
}

/// What both trainers save: a Hugging Face model directory of `arch` with the preprocessor config of the
/// training resolution.
struct CheckpointWriter<'a> {
    config: &'a BeitConfig,
    arch: Architecture,
    weights: &'a Weights,
    image_size: usize,
}

impl CheckpointWriter<'_> {
    fn save(&self, dir: &Path, extra: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        write_dir_atomically(dir, |tmp| {
            save_pretrained(tmp, self.config, self.arch, &self.weights.params())?;
            write_file(&tmp.join("preprocessor_config.json"), &processor_json(self.image_size))?;
            extra(tmp)
        })
    }

    /// The end of an epoch: `out/best` when it improved, `out/last` with the optimizer and `state` (for
    /// --resume), then `out/metrics.jsonl` with the whole `history`, each written atomically.
    fn end_of_epoch<S: Serialize, M: Serialize>(
        &self,
        out: &Path,
        improved: bool,
        optimizer: &AdamW,
        state: &S,
        history: &[M],
    ) -> Result<()> {
        if improved {
            self.save(&out.join("best"), |_| Ok(()))?;
        }
        let moments = optimizer.state();
        self.save(&out.join("last"), |tmp| {
            candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
            let text = serde_json::to_string_pretty(state).map_err(|e| BeitError::internal("trainer state", e.to_string()))?;
            write_file(&tmp.join("trainer_state.json"), &text)
        })?;
        let lines: Vec<String> = history.iter().filter_map(|h| serde_json::to_string(h).ok()).collect();
        let metrics = out.join("metrics.jsonl");
        let tmp = out.join(".metrics.jsonl.tmp");
        write_file(&tmp, &(lines.join("\n") + "\n"))?;
        std::fs::rename(&tmp, &metrics).map_err(|e| BeitError::io(&metrics, e))
    }
}

/// BEiT fine-tunes pre-trained checkpoints with per-layer relative bias: the shared table is copied into every
/// layer (unilm's run_class_finetuning does the same).
fn unshare_relative_bias(config: &mut BeitConfig, tensors: &mut HashMap<String, Tensor>) {
    if !config.use_shared_relative_position_bias {
        return;
    }
    let key = "beit.encoder.relative_position_bias.relative_position_bias_table";
    if let Some(table) = tensors.remove(key) {
        for i in 0..config.num_hidden_layers {
            tensors.insert(
                format!("beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table"),
                table.clone(),
            );
        }
    }
    config.use_shared_relative_position_bias = false;
    config.use_relative_position_bias = true;
}

pub struct Trainer {
    pub config: BeitConfig,
    pub model: BeitForImageClassification,
    pub weights: Weights,
    pub optimizer: AdamW,
    pub data: ImageFolder,
    pub opts: TrainOptions,
    pub image_size: usize,
    device: Device,
    history: Vec<EpochMetrics>,
    start_epoch: usize,
    best_top1: Option<f64>,
}

impl Trainer {
    /// Builds the model and optimizer; with `resume`, continues from `out/last` when it exists.
    pub fn new(source: ModelSource, data_dir: &Path, out: &Path, opts: TrainOptions, resume: bool) -> Result<Self> {
        let device = Device::Cpu;
        let data = ImageFolder::load(data_dir, opts.val_split, opts.seed)?;
        let id2label: std::collections::BTreeMap<usize, String> = data.classes.iter().cloned().enumerate().collect();
        let last = out.join("last");
        let state_path = last.join("trainer_state.json");
        let resuming = resume && state_path.is_file();
        let (mut config, tensors) = if resuming {
            read_checkpoint(&last, &device)?
        } else {
            match source {
                ModelSource::Pretrained(dir) => {
                    let mut c = BeitConfig::from_file(&dir.join("config.json"))?;
                    let (format, files) = find_weight_files(&dir, None)?;
                    let mut t = align_prefix(load_tensors(format, &files, &device)?, "beit", true);
                    if c.id2label != id2label {
                        // A new label set: a fresh classifier, as transformers' ignore_mismatched_sizes.
                        t.retain(|k, _| !k.starts_with("classifier."));
                    }
                    unshare_relative_bias(&mut c, &mut t);
                    (c, t)
                }
                ModelSource::Config(mut c) => {
                    if let Some(s) = opts.image_size {
                        c.image_size = Size2::square(s);
                    }
                    if let Some(p) = opts.patch_size {
                        c.patch_size = Size2::square(p);
                    }
                    (c, HashMap::new())
                }
            }
        };
        config.id2label = id2label;
        config.architectures = Some(vec![Architecture::BeitForImageClassification.name().to_string()]);
        config.problem_type = None;
        if let Some(dp) = opts.drop_path {
            config.drop_path_rate = dp;
        }
        config.validate()?;
        let source_kind = if tensors.is_empty() { Source::Fresh } else { Source::Checkpoint };
        let weights = Weights::build(tensors, out.join("<init>"), source_kind, &device, true, opts.seed);
        let model = BeitForImageClassification::load(&weights, &config)?;
        let mut optimizer = AdamW::new(weights.vars(), config.num_hidden_layers, opts.layer_decay, opts.weight_decay)?;
        let image_size = config.image_size.height;
        let (mut history, mut start_epoch, mut best_top1, mut opts) = (Vec::new(), 0, None, opts);
        if resuming {
            let state: TrainerState = read_resume_state(&last, &mut optimizer, |s: &TrainerState| s.step, &device)?;
            // The run's own options win over the command line's, so the resumed run is the same run.
            let epochs = opts.epochs.max(state.options.epochs);
            opts = TrainOptions { epochs, ..state.options };
            history = state.history;
            start_epoch = state.epoch;
            best_top1 = state.best_top1;
        }
        Ok(Trainer { config, model, weights, optimizer, data, opts, image_size, device, history, start_epoch, best_top1 })
    }

    pub fn completed_epochs(&self) -> usize {
        self.start_epoch
    }

    fn steps_per_epoch(&self) -> usize {
        self.data.train.images.len().div_ceil(self.opts.batch_size.max(1)).div_ceil(self.opts.accum_steps.max(1))
    }

    /// One epoch of training (1-based `epoch`): returns the mean training loss and images/s.
    fn train_epoch(&mut self, epoch: usize, obs: &mut dyn TrainObserver) -> Result<(f64, f64, f64)> {
        let o = self.opts.clone();
        let n = self.data.train.images.len();
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::derive(o.seed, 2, epoch as u64);
        rng.shuffle(&mut order);
        seed_training_rng(Rng::derive(o.seed, 3, epoch as u64).next_u64());
        let processor = eval_processor(self.image_size);
        let steps_per_epoch = self.steps_per_epoch();
        let mode = Mode { train: true, uncached: true };
        let (mut loss_sum, mut seen, mut lr) = (0f64, 0usize, 0f64);
        let start = Instant::now();
        let mut accum: Vec<Option<Tensor>> = Vec::new();
        let batches: Vec<&[usize]> = order.chunks(o.batch_size.max(1)).collect();
        for (bi, batch) in batches.iter().enumerate() {
            let mut pixels = Vec::with_capacity(batch.len() * 3 * self.image_size * self.image_size);
            for &i in batch.iter() {
                pixels.extend(augment(&self.data.train.images[i], self.image_size, o.scale_min, o.hflip, &mut rng, &processor)?);
            }
            let labels: Vec<u32> = batch.iter().map(|&i| self.data.train.labels[i] as u32).collect();
            let x = Tensor::from_vec(pixels, (batch.len(), 3, self.image_size, self.image_size), &self.device)?;
            let logits = self.model.forward(&x, &ForwardOptions { mode, ..Default::default() }, None)?.logits;
            let loss = cross_entropy_smoothed(&logits, &labels, o.label_smoothing)?;
            let value = loss.to_scalar::<f32>()? as f64;
            check_loss(value, epoch, bi)?;
            let grads = self.optimizer.grads(&(loss / o.accum_steps.max(1) as f64)?.backward()?);
            accum = if accum.is_empty() {
                grads
            } else {
                accum
                    .into_iter()
                    .zip(grads)
                    .map(|(a, g)| match (a, g) {
                        (Some(a), Some(g)) => Ok(Some((a + g)?)),
                        (a, g) => Ok(a.or(g)),
                    })
                    .collect::<Result<_>>()?
            };
            if (bi + 1) % o.accum_steps.max(1) == 0 || bi + 1 == batches.len() {
                lr = scheduled_lr(self.optimizer.step, steps_per_epoch, o.epochs, o.warmup_epochs, o.lr, o.min_lr);
                self.optimizer.step(&accum, lr)?;
                accum.clear();
            }
            loss_sum += value * batch.len() as f64;
            seen += batch.len();
            obs.batch(epoch, seen, n, value);
        }
        let secs = start.elapsed().as_secs_f64();
        Ok((loss_sum / seen.max(1) as f64, seen as f64 / secs.max(1e-9), lr))
    }

    pub fn evaluate(&self) -> Result<Option<Evaluation>> {
        if self.data.val.images.is_empty() {
            return Ok(None);
        }
        let p = eval_processor(self.image_size);
        evaluate(&self.model, &self.data.val.images, &self.data.val.labels, self.data.classes.len(), &p, self.opts.batch_size, &self.device)
            .map(Some)
    }

    fn writer(&self) -> CheckpointWriter<'_> {
        CheckpointWriter {
            config: &self.config,
            arch: Architecture::BeitForImageClassification,
            weights: &self.weights,
            image_size: self.image_size,
        }
    }

    /// Trains up to `opts.epochs`, or `stop_after` more epochs when given (for interrupted runs), writing
    /// `out/last`, `out/best` and `out/metrics.jsonl` after every epoch.
    pub fn run(&mut self, out: &Path, stop_after: Option<usize>, obs: &mut dyn TrainObserver) -> Result<Vec<EpochMetrics>> {
        std::fs::create_dir_all(out).map_err(|e| BeitError::io(out, e))?;
        for (p, why) in &self.data.skipped {
            obs.note(&format!("skipped {}: {why}", p.display()));
        }
        let end = end_epoch(self.start_epoch, self.opts.epochs, stop_after);
        for epoch in self.start_epoch + 1..=end {
            let t = Instant::now();
            let (train_loss, ips, lr) = self.train_epoch(epoch, obs)?;
            let eval = self.evaluate()?;
            let m = EpochMetrics {
                epoch,
                train_loss,
                val_loss: eval.as_ref().map(|e| e.loss),
                top1: eval.as_ref().map(|e| e.top1),
                top5: eval.as_ref().map(|e| e.top5),
                lr,
                images_per_sec: ips,
                seconds: t.elapsed().as_secs_f64(),
            };
            self.history.push(m.clone());
            let improved = match (m.top1, self.best_top1) {
                (Some(a), Some(b)) => a > b,
                (Some(_), None) => true,
                _ => false,
            };
            if improved {
                self.best_top1 = m.top1;
            }
            let state = TrainerState {
                epoch,
                step: self.optimizer.step,
                best_top1: self.best_top1,
                options: self.opts.clone(),
                history: self.history.clone(),
            };
            self.writer().end_of_epoch(out, improved, &self.optimizer, &state, &self.history)?;
            self.start_epoch = epoch;
            obs.epoch(&m, &self.history);
        }
        Ok(self.history.clone())
    }
}

/// Top-1 of logits against labels, for quick checks.
pub fn accuracy(logits: &Tensor, labels: &[usize]) -> Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| **p as usize == **l).count() as f64 / labels.len().max(1) as f64)
}
