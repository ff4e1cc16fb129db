//! Fine-tuning BeitForSemanticSegmentation (UperNet with the FCN auxiliary head) on images with masks, with the
//! recipe of BEiT's ADE20K fine-tuning (unilm's beit/semantic_segmentation configs on mmseg): AdamW with layer
//! decay, linear warmup then poly decay, drop path 0.1, and mmseg's augmentation (random rescale 0.5–2.0,
//! random crop with `cat_max_ratio`, flip, photometric distortion, padding). `out/best` follows the validation
//! mIoU, computed over the whole validation set as `evaluate`'s mean_iou. The loop, checkpoints and --resume
//! are [`run`](super::run)'s.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::data::normalize;
use super::finetune::ModelSource;
use super::run::{
    eval_processor, read_checkpoint, resume_dir, unshare_relative_bias, Best, EpochRecord, EpochStats, Observer, Run,
    RunCore, RunOptions, Schedule, Task,
};
use super::seg_data::{Mask, SegDataset, SegSplit};
use super::seg_metrics::{MeanIou, SegMetrics};
use crate::checkpoint::align_prefix;
use crate::config::{default_labels, BeitConfig};
use crate::error::{BeitError, Result};
use crate::heads::{Architecture, BeitForSemanticSegmentation};
use crate::model::ForwardOptions;
use crate::nn::Mode;
use crate::processor::BeitImageProcessor;
use crate::rng::Rng;
use crate::weights::{Source, Weights};

/// Images per forward pass when evaluating. Fixed, so that training's evaluation and a later evaluation of the
/// saved checkpoint run the same arithmetic and agree to the last digit.
pub const EVAL_BATCH: usize = 4;

/// Segmentation fine-tuning's options: the shared ones and the segmentation recipe's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegOptions {
    /// Schedule, seed and crop size (`image_size` of a model built from a config).
    #[serde(flatten)]
    pub run: RunOptions,
    /// Layer-wise learning-rate decay (BEiT's ADE20K recipe: 0.65 for base).
    pub layer_decay: f64,
    /// The auxiliary FCN head's weight in the loss (None: the config's, 0.4 by default).
    pub auxiliary_loss_weight: Option<f64>,
    /// BeitImageProcessor's `do_reduce_labels` on every mask (ADE20K: 0 is "other", ignored).
    pub reduce_labels: bool,
    /// mmseg's RandomCrop `cat_max_ratio`: a crop is drawn again (up to 10 times) while one class covers more
    /// than this share of its labelled pixels (1 turns it off).
    pub cat_max_ratio: f64,
    /// mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue).
    pub photometric: bool,
    /// Gradient accumulation: an optimizer step every this many batches.
    pub accum_steps: usize,
}

impl Default for SegOptions {
    /// BEiT-base on ADE20K (upernet_beit_base_12_640_slide_160k_ade20k): lr 7e-4, batch 16, 160k iterations
    /// (~127 epochs of ADE20K's 20210 images), 1500 warmup iterations (~1.2 epochs), poly to 0.
    fn default() -> Self {
        let run = RunOptions {
            epochs: 127,
            batch_size: 16,
            lr: 7e-4,
            min_lr: 0.0,
            weight_decay: 0.05,
            warmup_epochs: 1.2,
            drop_path: Some(0.1),
            schedule: Schedule::Poly { power: 1.0 },
            ..RunOptions::default()
        };
        SegOptions {
            run,
            layer_decay: 0.65,
            auxiliary_loss_weight: None,
            reduce_labels: false,
            cat_max_ratio: 0.75,
            photometric: true,
            accum_steps: 1,
        }
    }
}

impl AsMut<RunOptions> for SegOptions {
    fn as_mut(&mut self) -> &mut RunOptions {
        &mut self.run
    }
}

/// Segmentation's fields of an epoch's record (validation ones are None without a validation split).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentationMetrics {
    /// Mean training loss (cross-entropy plus the weighted auxiliary loss).
    pub train_loss: f64,
    /// The same loss on the validation images, at their own size, averaged over images.
    pub val_loss: Option<f64>,
    /// Validation mIoU (classes absent from predictions and labels skipped).
    pub mean_iou: Option<f64>,
    /// Validation mean per-class accuracy.
    pub mean_accuracy: Option<f64>,
    /// Validation pixel accuracy.
    pub overall_accuracy: Option<f64>,
}

/// One epoch of segmentation fine-tuning, as `out/metrics.jsonl` has it.
pub type SegEpochMetrics = EpochRecord<SegmentationMetrics>;

/// An evaluation over a whole split.
#[derive(Debug, Clone, Serialize)]
pub struct SegEvaluation {
    /// Mean over images of the loss (images whose mask is all ignored are left out).
    pub loss: f64,
    /// mIoU, accuracies and the per-class values.
    #[serde(flatten)]
    pub metrics: SegMetrics,
    /// Images evaluated.
    pub count: usize,
}

/// Evaluates `model` on `split`: each image preprocessed by `processor` (resized to the model's size), its
/// logits upsampled back to the image's size before the argmax (transformers' post_process_semantic_segmentation)
/// and compared with its mask; areas summed over the whole split.
pub fn evaluate(
    model: &BeitForSemanticSegmentation,
    split: &SegSplit,
    num_labels: usize,
    ignore_index: u32,
    processor: &BeitImageProcessor,
    device: &Device,
) -> Result<SegEvaluation> {
    let mut acc = MeanIou::new(num_labels, ignore_index, false)?;
    let mode = Mode { train: false, uncached: true, ..Mode::default() };
    let options = ForwardOptions { mode, ..Default::default() };
    let (mut loss_sum, mut loss_count) = (0f64, 0usize);
    for (imgs, masks) in split.images.chunks(EVAL_BATCH).zip(split.masks.chunks(EVAL_BATCH)) {
        let pv = processor.preprocess_rgb(imgs)?;
        let x = Tensor::from_vec(pv.data, pv.shape.to_vec(), device)?;
        let out = model.forward(&x, &options, None)?;
        let logits = out.logits.detach();
        let aux = out.auxiliary_logits.map(|a| a.detach());
        for (i, mask) in masks.iter().enumerate() {
            if mask.iter().all(|&v| v as u32 == ignore_index) {
                continue;
            }
            let labels = mask_tensor(mask, device)?;
            let aux_i = aux.as_ref().map(|a| a.narrow(0, i, 1)).transpose()?;
            let l = model.loss(&logits.narrow(0, i, 1)?, aux_i.as_ref(), &labels, mode)?;
            loss_sum += l.to_scalar::<f32>()? as f64;
            loss_count += 1;
        }
        let dims = logits.dims4()?;
        let values = logits.flatten_all()?.to_vec1::<f32>()?;
        let sizes: Vec<(usize, usize)> = masks.iter().map(|m| (m.height() as usize, m.width() as usize)).collect();
        let preds =
            processor.post_process_semantic_segmentation(&values, [dims.0, dims.1, dims.2, dims.3], Some(&sizes))?;
        for ((pred, _), mask) in preds.iter().zip(masks) {
            let label: Vec<u32> = mask.iter().map(|&v| v as u32).collect();
            acc.update(pred, &label)?;
        }
    }
    let loss = if loss_count == 0 { f64::NAN } else { loss_sum / loss_count as f64 };
    Ok(SegEvaluation { loss, metrics: acc.compute(), count: split.images.len() })
}

/// A mask as a (1, height, width) label tensor.
fn mask_tensor(mask: &Mask, device: &Device) -> Result<Tensor> {
    let v: Vec<i64> = mask.iter().map(|&x| x as i64).collect();
    Ok(Tensor::from_vec(v, (1, mask.height() as usize, mask.width() as usize), device)?)
}

/// A segmentation checkpoint loaded for evaluation as training evaluates it (same weights path, no inference
/// packing), so that its numbers equal the run's.
pub fn load_for_eval(dir: &Path) -> Result<(BeitForSemanticSegmentation, BeitConfig)> {
    let (config, tensors) = read_checkpoint(dir)?;
    let w = Weights::build(tensors, dir.to_path_buf(), Source::Checkpoint, &Device::Cpu, true, 0);
    let model = BeitForSemanticSegmentation::load(&w, &config)?;
    Ok((model, config))
}

/// The semantic-segmentation task: the model and its images with masks.
pub struct SegFineTuning {
    /// The model being trained.
    pub model: BeitForSemanticSegmentation,
    /// Training and validation pairs.
    pub data: SegDataset,
}

/// A segmentation fine-tuning run.
pub type SegTrainer = Run<SegFineTuning>;

impl SegFineTuning {
    fn evaluate(&self, core: &RunCore<Self>) -> Result<Option<SegEvaluation>> {
        if self.data.val.images.is_empty() {
            return Ok(None);
        }
        let ignore = core.config.semantic_loss_ignore_index as u32;
        let p = eval_processor(core.image_size);
        evaluate(&self.model, &self.data.val, core.config.num_labels(), ignore, &p, &core.device).map(Some)
    }
}

impl Task for SegFineTuning {
    type Options = SegOptions;
    type Metrics = SegmentationMetrics;
    const BEST: Best = Best { name: "mean_iou", higher_is_better: true };

    fn best_value(m: &SegmentationMetrics) -> Option<f64> {
        m.mean_iou
    }

    fn skipped(&self) -> &[(PathBuf, String)] {
        &self.data.skipped
    }

    fn reduce_labels(opts: &SegOptions) -> Option<bool> {
        Some(opts.reduce_labels)
    }

    fn epoch(&mut self, core: &mut RunCore<Self>, obs: &mut Observer<'_, Self>) -> Result<(Self::Metrics, EpochStats)> {
        let o = core.opts.clone();
        let (size, device) = (core.image_size, core.device.clone());
        let ignore = core.config.semantic_loss_ignore_index as u16;
        let processor = eval_processor(size);
        let options = ForwardOptions { mode: o.run.train_mode(), ..Default::default() };
        let (model, train) = (&self.model, &self.data.train);
        let aug =
            Augment { size, ignore, cat_max_ratio: o.cat_max_ratio, hflip: o.run.hflip, photometric: o.photometric };
        let stats = core.train_epoch(train.images.len(), o.accum_steps, None, obs, |batch, rng| {
            let mut pixels = Vec::with_capacity(batch.len() * 3 * size * size);
            let mut labels = Vec::with_capacity(batch.len() * size * size);
            for &i in batch {
                let (p, l) = aug.apply(&train.images[i], &train.masks[i], rng, &processor)?;
                pixels.extend(p);
                labels.extend(l);
            }
            let x = Tensor::from_vec(pixels, (batch.len(), 3, size, size), &device)?;
            let y = Tensor::from_vec(labels, (batch.len(), size, size), &device)?;
            let loss = model.forward(&x, &options, Some(&y))?.loss;
            let loss = loss.ok_or_else(|| BeitError::internal("segmentation loss", "not returned with labels"))?;
            Ok((loss, batch.len()))
        })?;
        let eval = self.evaluate(core)?;
        let m = SegmentationMetrics {
            train_loss: stats.loss,
            val_loss: eval.as_ref().map(|e| e.loss),
            mean_iou: eval.as_ref().map(|e| e.metrics.mean_iou),
            mean_accuracy: eval.as_ref().map(|e| e.metrics.mean_accuracy),
            overall_accuracy: eval.as_ref().map(|e| e.metrics.overall_accuracy),
        };
        Ok((m, stats))
    }
}

/// The four encoder outputs the pyramid takes (transformers' `out_indices`, hidden state i - 1 for index i):
/// unilm's for 12 and 24 layers, otherwise evenly spaced.
fn default_out_indices(layers: usize) -> Vec<i64> {
    match layers {
        12 => vec![3, 5, 7, 11],
        24 => vec![7, 11, 15, 23],
        n => (1..=4).map(|k| (k * n / 4).max(k) as i64).collect(),
    }
}

impl SegTrainer {
    /// Builds the model and optimizer; with `resume`, continues from `out/last` when it exists. Every mask is
    /// checked against its image and the model's labels before anything trains.
    pub fn new(source: ModelSource, data_dir: &Path, out: &Path, opts: SegOptions, resume: bool) -> Result<Self> {
        let data = SegDataset::load(data_dir, opts.reduce_labels)?;
        let resume_from = resume_dir(out, resume);
        let data_labels = data.classes.as_ref().map(|c| c.iter().cloned().enumerate().collect::<BTreeMap<_, _>>());
        // Without class names: the largest id found (or a segmentation checkpoint's own labels).
        let ignore = BeitConfig::default().semantic_loss_ignore_index;
        let inferred = || {
            let max = data.train.masks.iter().chain(&data.val.masks).flat_map(|m| m.iter()).map(|&v| v as i64);
            default_labels(max.filter(|&v| v != ignore).max().map_or(1, |m| m as usize + 1))
        };
        let (mut config, tensors) = match (&resume_from, source) {
            (Some(last), _) => read_checkpoint(last)?,
            (None, ModelSource::Pretrained(dir)) => {
                let (mut c, t) = read_checkpoint(&dir)?;
                let is_seg = c.architectures.iter().flatten().any(|a| a.ends_with("ForSemanticSegmentation"));
                let mut t = align_prefix(t, "beit", true);
                if !is_seg {
                    // A classifier or MIM model: the encoder only; the pyramid and heads start fresh.
                    t.retain(|k, _| {
                        k.starts_with("beit.") && !k.starts_with("beit.pooler") && !k.contains("mask_token")
                    });
                    c.id2label = data_labels.clone().unwrap_or_else(inferred);
                } else if let Some(l) = data_labels.clone().filter(|l| l.len() != c.id2label.len()) {
                    // A new label set: fresh classifiers, as transformers' ignore_mismatched_sizes.
                    t.retain(|k, _| {
                        !k.starts_with("decode_head.classifier.") && !k.starts_with("auxiliary_head.classifier.")
                    });
                    c.id2label = l;
                } else if let Some(l) = data_labels.clone() {
                    c.id2label = l;
                }
                c.use_mask_token = false;
                // Resized before unsharing: the shared table once, then copied into every layer.
                opts.run.fit_checkpoint(&mut c, &mut t, &dir)?;
                unshare_relative_bias(&mut c, &mut t);
                (c, t)
            }
            (None, ModelSource::Config(mut c)) => {
                opts.run.resize(&mut c);
                c.id2label = data_labels.clone().unwrap_or_else(inferred);
                (c, HashMap::new())
            }
        };
        if resume_from.is_none() {
            if config.out_indices.len() != 4 {
                let indices = default_out_indices(config.num_hidden_layers);
                config.align_out_features(None, Some(indices))?;
            }
            config.architectures = Some(vec![Architecture::BeitForSemanticSegmentation.name().to_string()]);
            config.problem_type = None;
            if let Some(dp) = opts.run.drop_path {
                config.drop_path_rate = dp;
            }
            if let Some(w) = opts.auxiliary_loss_weight {
                config.auxiliary_loss_weight = w;
            }
        }
        config.validate()?;
        if config.image_size.height != config.image_size.width {
            return Err(BeitError::config(
                "image_size",
                format!("segmentation crops are square; found {:?}", config.image_size),
            ));
        }
        data.check(config.num_labels(), config.semantic_loss_ignore_index)?;
        let layer_decay = opts.layer_decay;
        let (core, model) = RunCore::<SegFineTuning>::build(
            config,
            tensors,
            out,
            opts,
            layer_decay,
            resume_from.as_deref(),
            BeitForSemanticSegmentation::load,
        )?;
        Ok(Run { core, task: SegFineTuning { model, data } })
    }

    /// mIoU, accuracies and the loss on the validation split (None without one).
    pub fn evaluate(&self) -> Result<Option<SegEvaluation>> {
        self.task.evaluate(&self.core)
    }
}

/// mmseg's training pipeline for one pair: Resize (ratio 0.5–2.0 of the scale (4·size, size), aspect kept),
/// RandomCrop to size×size with `cat_max_ratio`, RandomFlip, PhotoMetricDistortion, Normalize, Pad (0 in the
/// image, the ignore index in the mask). Every draw comes from the run's rng, so a resumed run sees the same
/// crops.
#[derive(Debug, Clone, Copy)]
pub struct Augment {
    /// The crop (the model's input) size.
    pub size: usize,
    /// The mask value of padding and of pixels to skip.
    pub ignore: u16,
    /// See [`SegOptions::cat_max_ratio`].
    pub cat_max_ratio: f64,
    /// Random horizontal flips.
    pub hflip: bool,
    /// See [`SegOptions::photometric`].
    pub photometric: bool,
}

impl Augment {
    /// One training view: normalized CHW pixels and the (size×size) labels.
    pub fn apply(
        &self,
        img: &RgbImage,
        mask: &Mask,
        rng: &mut Rng,
        p: &BeitImageProcessor,
    ) -> Result<(Vec<f32>, Vec<i64>)> {
        let s = self.size;
        let (w, h) = (img.width() as usize, img.height() as usize);
        // Resize: mmseg's ratio_range with img_scale (4·size, size) and keep_ratio.
        let r = 0.5 + 1.5 * rng.uniform();
        let (long, short) = (w.max(h) as f64, w.min(h) as f64);
        let f = (4.0 * s as f64 * r / long).min(s as f64 * r / short);
        let (nw, nh) = (((w as f64 * f + 0.5) as usize).max(1), ((h as f64 * f + 0.5) as usize).max(1));
        let pixels = resize_bilinear(img.as_raw(), w, h, nw, nh);
        let labels = resize_nearest(mask.as_raw(), w, h, nw, nh);
        // RandomCrop.
        let (ch, cw) = (s.min(nh), s.min(nw));
        let mut bbox = (rng.below(nh - ch + 1), rng.below(nw - cw + 1));
        if self.cat_max_ratio < 1.0 {
            for _ in 0..10 {
                let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
                for y in bbox.0..bbox.0 + ch {
                    for &v in &labels[y * nw + bbox.1..y * nw + bbox.1 + cw] {
                        if v != self.ignore {
                            *counts.entry(v).or_default() += 1;
                        }
                    }
                }
                let total: usize = counts.values().sum();
                let max = counts.values().copied().max().unwrap_or(0);
                if counts.len() > 1 && (max as f64) / (total as f64) < self.cat_max_ratio {
                    break;
                }
                bbox = (rng.below(nh - ch + 1), rng.below(nw - cw + 1));
            }
        }
        let mut crop = Vec::with_capacity(ch * cw * 3);
        let mut crop_labels = Vec::with_capacity(ch * cw);
        for y in bbox.0..bbox.0 + ch {
            crop.extend_from_slice(&pixels[(y * nw + bbox.1) * 3..(y * nw + bbox.1 + cw) * 3]);
            crop_labels.extend_from_slice(&labels[y * nw + bbox.1..y * nw + bbox.1 + cw]);
        }
        // RandomFlip (prob 0.5).
        if self.hflip && rng.uniform() < 0.5 {
            for y in 0..ch {
                crop_labels[y * cw..(y + 1) * cw].reverse();
                let row = &mut crop[y * cw * 3..(y + 1) * cw * 3];
                for x in 0..cw / 2 {
                    for c in 0..3 {
                        row.swap(x * 3 + c, (cw - 1 - x) * 3 + c);
                    }
                }
            }
        }
        if self.photometric {
            photometric_distortion(&mut crop, rng);
        }
        // Normalize, then pad to size×size (bottom and right, as mmseg's Pad).
        let norm = normalize(&crop, ch, cw, p);
        let mut out = vec![0f32; 3 * s * s];
        let mut out_labels = vec![self.ignore as i64; s * s];
        for y in 0..ch {
            for c in 0..3 {
                out[c * s * s + y * s..c * s * s + y * s + cw]
                    .copy_from_slice(&norm[c * ch * cw + y * cw..c * ch * cw + (y + 1) * cw]);
            }
            for x in 0..cw {
                out_labels[y * s + x] = crop_labels[y * cw + x] as i64;
            }
        }
        Ok((out, out_labels))
    }
}

/// OpenCV's INTER_LINEAR resize of RGB u8 (what mmcv's imresize uses for images): half-pixel centres, edge
/// clamping, no antialiasing, rounded.
fn resize_bilinear(src: &[u8], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u8> {
    let taps = |n: usize, out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n as f32 / out as f32;
        (0..out)
            .map(|d| {
                let s = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
                let i = (s.floor() as usize).min(n - 1);
                let j = (i + 1).min(n - 1);
                (i, j, if i == n - 1 { 0.0 } else { s - i as f32 })
            })
            .collect()
    };
    let (xs, ys) = (taps(w, nw), taps(h, nh));
    let mut out = Vec::with_capacity(nw * nh * 3);
    for &(y0, y1, fy) in &ys {
        for &(x0, x1, fx) in &xs {
            for c in 0..3 {
                let v = |y: usize, x: usize| src[(y * w + x) * 3 + c] as f32;
                let top = v(y0, x0) * (1.0 - fx) + v(y0, x1) * fx;
                let bottom = v(y1, x0) * (1.0 - fx) + v(y1, x1) * fx;
                out.push((top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

/// OpenCV's INTER_NEAREST (mmcv's for masks): source pixel floor(d · n / out).
fn resize_nearest(src: &[u16], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(nw * nh);
    for y in 0..nh {
        let sy = (y * h / nh).min(h - 1);
        for x in 0..nw {
            out.push(src[sy * w + (x * w / nw).min(w - 1)]);
        }
    }
    out
}

/// mmseg's `convert`: `x * alpha + beta` in float, clipped to 0..255, truncated to u8.
fn convert(v: u8, alpha: f32, beta: f32) -> u8 {
    (v as f32 * alpha + beta).clamp(0.0, 255.0) as u8
}

/// mmseg's PhotoMetricDistortion, each step with probability 1/2: brightness (delta ±32), contrast (0.5–1.5)
/// before or after (1/2 each) saturation (0.5–1.5) and hue (±18 of OpenCV's 180) in HSV.
fn photometric_distortion(rgb: &mut [u8], rng: &mut Rng) {
    if rng.below(2) == 1 {
        let beta = (-32.0 + 64.0 * rng.uniform()) as f32;
        rgb.iter_mut().for_each(|v| *v = convert(*v, 1.0, beta));
    }
    let contrast = |rgb: &mut [u8], rng: &mut Rng| {
        if rng.below(2) == 1 {
            let alpha = (0.5 + rng.uniform()) as f32;
            rgb.iter_mut().for_each(|v| *v = convert(*v, alpha, 0.0));
        }
    };
    let mode = rng.below(2);
    if mode == 1 {
        contrast(rgb, rng);
    }
    if rng.below(2) == 1 {
        let alpha = (0.5 + rng.uniform()) as f32;
        for px in rgb.chunks_exact_mut(3) {
            let [h, s, v] = rgb_to_hsv(px);
            px.copy_from_slice(&hsv_to_rgb([h, convert(s, alpha, 0.0), v]));
        }
    }
    if rng.below(2) == 1 {
        let delta = rng.below(36) as i32 - 18;
        for px in rgb.chunks_exact_mut(3) {
            let [h, s, v] = rgb_to_hsv(px);
            px.copy_from_slice(&hsv_to_rgb([(h as i32 + delta).rem_euclid(180) as u8, s, v]));
        }
    }
    if mode == 0 {
        contrast(rgb, rng);
    }
}

/// OpenCV's 8-bit RGB→HSV: H in 0..180 (degrees / 2), S and V in 0..255.
fn rgb_to_hsv(px: &[u8]) -> [u8; 3] {
    let (r, g, b) = (px[0] as f32, px[1] as f32, px[2] as f32);
    let v = r.max(g).max(b);
    let d = v - r.min(g).min(b);
    let s = if v > 0.0 { 255.0 * d / v } else { 0.0 };
    let mut h = if d == 0.0 {
        0.0
    } else if v == r {
        60.0 * (g - b) / d
    } else if v == g {
        120.0 + 60.0 * (b - r) / d
    } else {
        240.0 + 60.0 * (r - g) / d
    };
    if h < 0.0 {
        h += 360.0;
    }
    [((h / 2.0).round() as u16 % 180) as u8, s.round() as u8, v as u8]
}

/// OpenCV's 8-bit HSV→RGB.
fn hsv_to_rgb(hsv: [u8; 3]) -> [u8; 3] {
    let (h, s, v) = (hsv[0] as f32 * 2.0 / 60.0, hsv[1] as f32 / 255.0, hsv[2] as f32);
    let sector = (h.floor() as i32).rem_euclid(6);
    let f = h - h.floor();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match sector {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r.round() as u8, g.round() as u8, b.round() as u8]
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    #[test]
    fn augmentation_pads_small_images_and_keeps_labels_on_their_pixels() {
        // A 40x4 image whose mask is its column index: rescaled to at most 13 rows, shorter than the crop of 16.
        let img = RgbImage::from_fn(40, 4, |x, _| image::Rgb([x as u8 * 6, 0, 0]));
        let mask = Mask::from_fn(40, 4, |x, _| Luma([x as u16]));
        let aug = Augment { size: 16, ignore: 255, cat_max_ratio: 0.75, hflip: true, photometric: false };
        let p = eval_processor(16);
        let mut rng = Rng::new(1);
        for _ in 0..20 {
            let (px, labels) = aug.apply(&img, &mask, &mut rng, &p).unwrap();
            assert_eq!((px.len(), labels.len()), (3 * 256, 256));
            // The bottom-right corner is padding: 0 in the image, ignored in the mask.
            assert_eq!((px[255], labels[255]), (0.0, 255));
            // Nearest resizing keeps ids; the first row is monotone (or reversed by the flip).
            let row: Vec<i64> = labels[..16].iter().copied().filter(|&v| v != 255).collect();
            assert!(!row.is_empty() && row.iter().all(|&v| v < 40));
            assert!(row.windows(2).all(|w| w[0] <= w[1]) || row.windows(2).all(|w| w[0] >= w[1]), "{row:?}");
        }
    }

    #[test]
    fn same_rng_same_view() {
        let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 5, y as u8 * 7, 100]));
        let mask = Mask::from_fn(40, 30, |x, y| Luma([((x / 10 + y / 10) % 3) as u16]));
        let aug = Augment { size: 16, ignore: 255, cat_max_ratio: 0.75, hflip: true, photometric: true };
        let p = eval_processor(16);
        let a = aug.apply(&img, &mask, &mut Rng::new(9), &p).unwrap();
        let b = aug.apply(&img, &mask, &mut Rng::new(9), &p).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn hsv_round_trips_and_poly_is_the_default_schedule() {
        for px in [[255u8, 0, 0], [10, 200, 30], [0, 0, 0], [128, 128, 128], [20, 40, 250]] {
            let back = hsv_to_rgb(rgb_to_hsv(&px));
            for c in 0..3 {
                assert!((back[c] as i32 - px[c] as i32).abs() <= 3, "{px:?} -> {back:?}");
            }
        }
        assert_eq!(rgb_to_hsv(&[255, 0, 0]), [0, 255, 255]);
        assert_eq!(rgb_to_hsv(&[0, 0, 255]), [120, 255, 255]);
        assert_eq!(SegOptions::default().run.schedule, Schedule::Poly { power: 1.0 });
    }

    #[test]
    fn resizing_matches_opencv_on_simple_cases() {
        // Upscaling 2 -> 4 with half-pixel centres: 0, 0.25, 0.75, 1 of the way.
        let src = [0u8, 0, 0, 100, 100, 100];
        let out = resize_bilinear(&src, 2, 1, 4, 1);
        assert_eq!(out.iter().step_by(3).copied().collect::<Vec<_>>(), vec![0, 25, 75, 100]);
        assert_eq!(resize_nearest(&[1, 2, 3, 4], 4, 1, 2, 1), vec![1, 3]);
        assert_eq!(default_out_indices(12), vec![3, 5, 7, 11]);
        assert_eq!(default_out_indices(4), vec![1, 2, 3, 4]);
    }
}
