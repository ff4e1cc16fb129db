//! Fine-tuning (and training from scratch) of BeitForImageClassification on an image folder with BEiT's recipe
//! (unilm's run_class_finetuning): label smoothing, layer-wise learning-rate decay, gradient accumulation, and
//! top-1/top-5 on the validation split choosing `out/best`. The loop, checkpoints and --resume are
//! [`run`](super::run)'s.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::data::{augment, ImageFolder};
use super::run::{
    eval_processor, read_checkpoint, resume_dir, unshare_relative_bias, Best, EpochRecord, EpochStats, Observer, Run,
    RunCore, RunOptions, Task,
};
use crate::checkpoint::align_prefix;
use crate::config::BeitConfig;
use crate::error::Result;
use crate::heads::loss::{cross_entropy, cross_entropy_smoothed};
use crate::heads::{Architecture, BeitForImageClassification};
use crate::model::ForwardOptions;
use crate::nn::Mode;
use crate::processor::BeitImageProcessor;

/// Where the model to train comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A checkpoint directory (Hugging Face layout).
    Pretrained(PathBuf),
    /// A preset name (tiny, small, base, large) or a config.json: fresh weights.
    Config(BeitConfig),
}

/// Fine-tuning's options: the shared ones and the classification recipe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Schedule, seed, crops and split.
    #[serde(flatten)]
    pub run: RunOptions,
    /// Layer-wise learning-rate decay (0.65 for base, 0.75 for large; 1 turns it off).
    pub layer_decay: f64,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f64,
    /// Gradient accumulation: an optimizer step every this many batches.
    pub accum_steps: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { run: RunOptions::default(), layer_decay: 0.65, label_smoothing: 0.1, accum_steps: 1 }
    }
}

impl AsMut<RunOptions> for TrainOptions {
    fn as_mut(&mut self) -> &mut RunOptions {
        &mut self.run
    }
}

/// Fine-tuning's fields of an epoch's record (validation ones are None without a validation split).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationMetrics {
    /// Mean training loss (label-smoothed cross-entropy).
    pub train_loss: f64,
    /// Validation cross-entropy.
    pub val_loss: Option<f64>,
    /// Validation top-1 accuracy.
    pub top1: Option<f64>,
    /// Validation top-5 accuracy.
    pub top5: Option<f64>,
}

/// One epoch of fine-tuning, as `out/metrics.jsonl` has it.
pub type EpochMetrics = EpochRecord<ClassificationMetrics>;

/// Evaluation: loss, top-1, top-5 and the confusion matrix (rows: truth, columns: prediction).
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy.
    pub top5: f64,
    /// Counts by (true class, predicted class).
    pub confusion: Vec<Vec<usize>>,
    /// Images evaluated.
    pub count: usize,
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
    let mode = Mode { train: false, uncached: true, ..Mode::default() };
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

/// The fine-tuning task: a classifier and its image folder.
pub struct FineTuning {
    /// The model being trained.
    pub model: BeitForImageClassification,
    /// Training and validation images with their classes.
    pub data: ImageFolder,
}

/// A fine-tuning run.
pub type Trainer = Run<FineTuning>;

impl FineTuning {
    /// Top-1, top-5 and the loss on the validation split (None without one).
    fn evaluate(&self, core: &RunCore<Self>) -> Result<Option<Evaluation>> {
        let val = &self.data.val;
        if val.images.is_empty() {
            return Ok(None);
        }
        let p = eval_processor(core.image_size);
        let batch_size = core.opts.run.batch_size;
        evaluate(&self.model, &val.images, &val.labels, self.data.classes.len(), &p, batch_size, &core.device).map(Some)
    }
}

impl Task for FineTuning {
    type Options = TrainOptions;
    type Metrics = ClassificationMetrics;
    const BEST: Best = Best { name: "top1", higher_is_better: true };

    fn best_value(m: &ClassificationMetrics) -> Option<f64> {
        m.top1
    }

    fn skipped(&self) -> &[(PathBuf, String)] {
        &self.data.skipped
    }

    fn epoch(&mut self, core: &mut RunCore<Self>, obs: &mut Observer<'_, Self>) -> Result<(Self::Metrics, EpochStats)> {
        let o = core.opts.clone();
        let (size, device) = (core.image_size, core.device.clone());
        let processor = eval_processor(size);
        let options = ForwardOptions { mode: o.run.train_mode(), ..Default::default() };
        let (model, train) = (&self.model, &self.data.train);
        let stats = core.train_epoch(train.images.len(), o.accum_steps, None, obs, |batch, rng| {
            let mut pixels = Vec::with_capacity(batch.len() * 3 * size * size);
            for &i in batch {
                pixels.extend(augment(&train.images[i], size, o.run.scale_min, o.run.hflip, rng, &processor)?);
            }
            let labels: Vec<u32> = batch.iter().map(|&i| train.labels[i] as u32).collect();
            let x = Tensor::from_vec(pixels, (batch.len(), 3, size, size), &device)?;
            let logits = model.forward(&x, &options, None)?.logits;
            Ok((cross_entropy_smoothed(&logits, &labels, o.label_smoothing)?, batch.len()))
        })?;
        let eval = self.evaluate(core)?;
        let m = ClassificationMetrics {
            train_loss: stats.loss,
            val_loss: eval.as_ref().map(|e| e.loss),
            top1: eval.as_ref().map(|e| e.top1),
            top5: eval.as_ref().map(|e| e.top5),
        };
        Ok((m, stats))
    }
}

impl Trainer {
    /// Builds the model and optimizer; with `resume`, continues from `out/last` when it exists.
    pub fn new(source: ModelSource, data_dir: &Path, out: &Path, opts: TrainOptions, resume: bool) -> Result<Self> {
        let data = ImageFolder::load(data_dir, opts.run.val_split, opts.run.seed)?;
        let id2label: BTreeMap<usize, String> = data.classes.iter().cloned().enumerate().collect();
        let resume_from = resume_dir(out, resume);
        let (mut config, tensors) = match (&resume_from, source) {
            (Some(last), _) => read_checkpoint(last)?,
            (None, ModelSource::Pretrained(dir)) => {
                let (mut c, t) = read_checkpoint(&dir)?;
                let mut t = align_prefix(t, "beit", true);
                if c.id2label != id2label {
                    // A new label set: a fresh classifier, as transformers' ignore_mismatched_sizes.
                    t.retain(|k, _| !k.starts_with("classifier."));
                }
                // Resized before unsharing: the shared table once, then copied into every layer.
                opts.run.fit_checkpoint(&mut c, &mut t, &dir)?;
                unshare_relative_bias(&mut c, &mut t);
                (c, t)
            }
            (None, ModelSource::Config(mut c)) => {
                opts.run.resize(&mut c);
                (c, HashMap::new())
            }
        };
        config.id2label = id2label;
        config.architectures = Some(vec![Architecture::BeitForImageClassification.name().to_string()]);
        config.problem_type = None;
        if let Some(dp) = opts.run.drop_path {
            config.drop_path_rate = dp;
        }
        config.validate()?;
        let layer_decay = opts.layer_decay;
        let (core, model) = RunCore::<FineTuning>::build(
            config,
            tensors,
            out,
            opts,
            layer_decay,
            resume_from.as_deref(),
            BeitForImageClassification::load,
        )?;
        Ok(Run { core, task: FineTuning { model, data } })
    }

    /// Top-1, top-5 and the loss on the validation split (None without one).
    pub fn evaluate(&self) -> Result<Option<Evaluation>> {
        self.task.evaluate(&self.core)
    }
}

/// Top-1 of logits against labels, for quick checks.
pub fn accuracy(logits: &Tensor, labels: &[usize]) -> Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| **p as usize == **l).count() as f64 / labels.len().max(1) as f64)
}
