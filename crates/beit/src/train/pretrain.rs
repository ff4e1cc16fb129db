//! BEiT pre-training: masked image modeling (Bao et al. 2021, unilm's run_beit_pretraining.py) of
//! BeitForMaskedImageModeling on an image folder, with the DALL-E dVAE encoder's visual tokens as targets.
//!
//! Per image: one crop seen twice ([`pretrain_data`](super::pretrain_data)), the patches at `image_size` and the
//! tokenizer's pixels at `(image_size / patch_size) * 8` (the encoder downsamples by 8, so there is one token
//! per patch), and a blockwise mask scaled to the patch grid ([`scaled_masking`]). The frozen encoder gives the
//! targets; the loss is cross-entropy on the masked patches only. The recipe is the paper's: AdamW
//! (β 0.9, 0.999, weight decay 0.05), lr 1.5e-3 at batch 2048 scaled linearly ([`paper_lr`]), 10 warmup epochs,
//! cosine decay, no layer decay, drop path 0.1, gradient clipping 3.0, and a shared relative position bias, a
//! mask token and layer scale in the model. Checkpoints, metrics and --resume work as the fine-tuning
//! [`Trainer`](super::Trainer)'s do, through the same functions.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::data::{ImageFolder, IMAGE_EXTENSIONS};
use super::optim::AdamW;
use super::pretrain_data::{pretrain_sample, TwoViewOptions};
use super::{
    check_loss, end_epoch, eval_processor, read_checkpoint, read_resume_state, scheduled_lr, CheckpointWriter,
    TrainObserver,
};
use crate::config::{BeitConfig, Size2};
use crate::error::{BeitError, Result};
use crate::heads::{Architecture, BeitForMaskedImageModeling};
use crate::masking::MaskingGenerator;
use crate::model::ForwardOptions;
use crate::nn::{seed_training_rng, Mode};
use crate::processor::load_image;
use crate::processor::resample::Filter;
use crate::rng::Rng;
use crate::tokenizer::DalleEncoder;
use crate::weights::{Source, Weights};

/// The paper's pre-training learning rate, 1.5e-3 at batch 2048, scaled linearly to `batch_size`.
pub fn paper_lr(batch_size: usize) -> f64 {
    1.5e-3 * batch_size as f64 / 2048.0
}

/// unilm's `--min_lr 1e-5` against its `--lr 1.5e-3`, kept as a ratio so that a scaled lr keeps its shape.
pub fn paper_min_lr(lr: f64) -> f64 {
    lr * (1e-5 / 1.5e-3)
}

/// unilm's masking on BEiT's 14x14 grid: 75 of 196 patches, blocks of at least 16.
const UNILM_GRID: f64 = 196.0;
const UNILM_MASKED: f64 = 75.0;
const UNILM_MIN_BLOCK: f64 = 16.0;

/// The blockwise mask for a `height` x `width` patch grid: unilm's 75 of 196 patches and blocks of at least 16,
/// scaled by the number of patches (so 14x14 gives exactly unilm's generator, 4x4 masks 6 patches in blocks of
/// at least 1). `num_masking_patches` overrides the count; the smallest block is never larger than it.
pub fn scaled_masking(height: usize, width: usize, num_masking_patches: Option<usize>) -> Result<MaskingGenerator> {
    let n = height * width;
    // A block must be strictly smaller than the grid (unilm's `w < width and h < height`).
    if height < 2 || width < 2 {
        return Err(BeitError::invalid_input(
            "masking",
            format!("the patch grid is {height}x{width}; blockwise masking needs at least 2x2 patches (raise image_size or lower patch_size)"),
        ));
    }
    let num = match num_masking_patches {
        Some(k) => k,
        None => ((UNILM_MASKED * n as f64 / UNILM_GRID).round() as usize).max(1),
    };
    if num == 0 || num >= n {
        return Err(BeitError::invalid_input(
            "num_masking_patches",
            format!("{num} masked patches of {n} ({height}x{width}); expected 1 to {}", n - 1),
        ));
    }
    let min_block = ((UNILM_MIN_BLOCK * n as f64 / UNILM_GRID).round() as usize).clamp(1, num);
    MaskingGenerator::new(height, width, num, min_block, None, 0.3, None)
}

/// The visual tokens of the masked patches, in row-major order of the mask (what the loss is computed on).
pub fn masked_labels(tokens: &[u32], mask: &[bool]) -> Vec<u32> {
    tokens.iter().zip(mask).filter(|(_, &m)| m).map(|(&t, _)| t).collect()
}

/// (correct, masked): how many masked patches' predicted tokens equal their targets. Unmasked patches do not count.
pub fn masked_accuracy(predictions: &[u32], tokens: &[u32], mask: &[bool]) -> (usize, usize) {
    let mut correct = 0;
    let mut count = 0;
    for ((p, t), &m) in predictions.iter().zip(tokens).zip(mask) {
        if m {
            count += 1;
            correct += usize::from(p == t);
        }
    }
    (correct, count)
}

/// One batch's masked-image-modeling loss with its masked-token accuracy.
pub struct MimBatch {
    /// Mean cross-entropy over the masked patches (transformers' BeitForMaskedImageModeling loss).
    pub loss: Tensor,
    pub correct: usize,
    pub count: usize,
}

/// The loss and accuracy of `model` on `pixels` (b, c, h, w) with `mask` and `tokens` (b * patches each,
/// row-major per image): the mask token replaces the masked patches and only they are scored.
pub fn mim_batch(model: &BeitForMaskedImageModeling, pixels: &Tensor, mask: &[bool], tokens: &[u32], mode: Mode) -> Result<MimBatch> {
    let b = pixels.dim(0)?;
    if b == 0 || mask.len() != tokens.len() || !mask.len().is_multiple_of(b) {
        return Err(BeitError::invalid_input(
            "masked image modeling batch",
            format!("{} mask flags and {} tokens for {b} images; expected the same whole number per image", mask.len(), tokens.len()),
        ));
    }
    let p = mask.len() / b;
    let labels = masked_labels(tokens, mask);
    if labels.is_empty() {
        return Err(BeitError::invalid_input("masking", "no patch of the batch is masked; raise num_masking_patches"));
    }
    let device = pixels.device();
    let flags: Vec<u8> = mask.iter().map(|&m| u8::from(m)).collect();
    let bool_masked_pos = Tensor::from_vec(flags, (b, p), device)?;
    let labels = Tensor::from_vec(labels, tokens.iter().zip(mask).filter(|(_, &m)| m).count(), device)?;
    let o = ForwardOptions { bool_masked_pos: Some(bool_masked_pos), mode, ..Default::default() };
    let out = model.forward(pixels, &o, Some(&labels))?;
    let (_, patches, _) = out.logits.dims3()?;
    if patches != p {
        return Err(BeitError::invalid_input("masked image modeling batch", format!("{p} mask flags per image for {patches} patches")));
    }
    let loss = out.loss.ok_or_else(|| BeitError::internal("masked image modeling", "the model returned no loss"))?;
    let predictions = out.logits.detach().argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    let (correct, count) = masked_accuracy(&predictions, tokens, mask);
    Ok(MimBatch { loss, correct, count })
}

/// torch's clip_grad_norm_ (L2 over all gradients together): scales them down to `max_norm` when above it.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub seed: u64,
    /// Stochastic depth rate of the deepest layer (the config's drop_path_rate is set to it).
    pub drop_path: f64,
    /// Global gradient-norm clipping (None: off).
    pub clip_grad: Option<f64>,
    /// RandomResizedCrop's smallest area share (unilm: 0.08).
    pub scale_min: f64,
    pub hflip: bool,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    /// Masked patches per image (default: unilm's 75 of 196 scaled to the patch grid).
    pub num_masking_patches: Option<usize>,
    /// Leave out the share of each class that `beit train --val-split` holds out with the same seed, so that
    /// pre-training never sees the validation images (needs DIR/<class>/*).
    pub val_split: Option<f64>,
    /// The seed of that split (default: `seed`, as `beit train --seed` splits).
    pub split_seed: Option<u64>,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        let lr = paper_lr(64);
        PretrainOptions {
            epochs: 800,
            batch_size: 64,
            lr,
            min_lr: paper_min_lr(lr),
            weight_decay: 0.05,
            warmup_epochs: 10.0,
            seed: 0,
            drop_path: 0.1,
            clip_grad: Some(3.0),
            scale_min: 0.08,
            hflip: true,
            image_size: None,
            patch_size: None,
            num_masking_patches: None,
            val_split: None,
            split_seed: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainEpochMetrics {
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's masked patches.
    pub loss: f64,
    /// Share of masked patches whose token the model predicted (argmax of the logits).
    pub masked_accuracy: f64,
    /// Share of the most common token among the epoch's targets: the accuracy of always guessing it.
    pub majority_token_share: f64,
    pub masked_tokens: usize,
    pub lr: f64,
    pub images_per_sec: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PretrainerState {
    /// Last completed epoch (1-based).
    epoch: usize,
    step: usize,
    best_loss: Option<f64>,
    options: PretrainOptions,
    history: Vec<PretrainEpochMetrics>,
}

/// The model to pre-train: a config (a preset or config.json), with fresh weights.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    pub config: BeitConfig,
    /// Whether the config named its vocab_size (then it must equal the tokenizer's); otherwise the tokenizer's
    /// vocabulary is used.
    pub vocab_size_given: bool,
}

impl PretrainConfig {
    /// A preset (tiny, small, base, large): the vocabulary comes from the tokenizer.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(PretrainConfig { config: super::preset(name)?, vocab_size_given: false })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BeitError::io(path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| BeitError::Json { path: path.to_path_buf(), message: e.to_string() })?;
        let vocab_size_given = value.get("vocab_size").is_some();
        Ok(PretrainConfig { config: BeitConfig::from_file(path)?, vocab_size_given })
    }
}

fn vocab_mismatch(config_vocab: usize, tokenizer_vocab: usize, source: &str) -> BeitError {
    BeitError::config(
        "vocab_size",
        format!(
            "{source} has vocab_size {config_vocab} but the tokenizer's vocabulary has {tokenizer_vocab} tokens; \
             they must be equal (leave vocab_size out of config.json to take the tokenizer's)"
        ),
    )
}

/// BEiT's pre-training architecture on `c`: a mask token, one relative position bias shared by all layers,
/// drop path from the options, the tokenizer's vocabulary.
fn pretraining_config(p: PretrainConfig, opts: &PretrainOptions, tokenizer: &DalleEncoder) -> Result<BeitConfig> {
    let mut c = p.config;
    if let Some(s) = opts.image_size {
        c.image_size = Size2::square(s);
    }
    if let Some(s) = opts.patch_size {
        c.patch_size = Size2::square(s);
    }
    if p.vocab_size_given && c.vocab_size != tokenizer.vocab_size {
        return Err(vocab_mismatch(c.vocab_size, tokenizer.vocab_size, "the config"));
    }
    c.vocab_size = tokenizer.vocab_size;
    c.use_mask_token = true;
    c.use_shared_relative_position_bias = true;
    c.use_relative_position_bias = false;
    c.drop_path_rate = opts.drop_path;
    Ok(c)
}

/// Checks what the two views and the tokenizer need of the config; returns (image size, patch grid side).
fn check_geometry(c: &BeitConfig, tokenizer: &DalleEncoder) -> Result<(usize, usize)> {
    let (img, patch) = (c.image_size, c.patch_size);
    if img.height != img.width || patch.height != patch.width {
        return Err(BeitError::config(
            "image_size",
            format!("pre-training takes square images and patches, found image {}x{}, patch {}x{}", img.height, img.width, patch.height, patch.width),
        ));
    }
    if img.height % patch.height != 0 {
        return Err(BeitError::config(
            "image_size",
            format!("{} is not a multiple of patch_size {}: the patches must tile the image", img.height, patch.height),
        ));
    }
    if c.num_channels != tokenizer.input_channels {
        return Err(BeitError::config(
            "num_channels",
            format!("{} but the tokenizer takes {} channels", c.num_channels, tokenizer.input_channels),
        ));
    }
    Ok((img.height, img.height / patch.height))
}

/// The images to pre-train on (labels are not used).
#[derive(Debug, Clone, Default)]
pub struct PretrainData {
    pub images: Vec<RgbImage>,
    pub paths: Vec<PathBuf>,
    /// Files that could not be read, with the reason: skipped and reported.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Image files under `dir`, at any depth, sorted; directories reached twice (symlink loops) are walked once.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let key = std::fs::canonicalize(&d).map_err(|e| BeitError::io(&d, e))?;
        if !seen.insert(key) {
            continue;
        }
        for e in std::fs::read_dir(&d).map_err(|e| BeitError::io(&d, e))? {
            let p = e.map_err(|e| BeitError::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
                if p.is_file() && IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                    files.push(p);
                }
            }
        }
    }
    files.sort();
    Ok(files)
}

impl PretrainData {
    /// Every image under `dir`, or under `dir/train` when it exists (`dir/val` is `beit train`'s validation
    /// set); with `val_split`, the training part of `beit train --val-split`'s split of `dir/<class>/*`.
    pub fn load(dir: &Path, val_split: Option<f64>, split_seed: u64) -> Result<Self> {
        if !dir.is_dir() {
            return Err(BeitError::invalid_input(dir.display().to_string(), "is not a directory (expected an image folder)"));
        }
        if val_split.is_some() {
            let folder = ImageFolder::load(dir, val_split, split_seed)?;
            let train = folder.train;
            return Ok(PretrainData { images: train.images, paths: train.paths, skipped: folder.skipped });
        }
        let root = if dir.join("train").is_dir() { dir.join("train") } else { dir.to_path_buf() };
        let files = list_images(&root)?;
        if files.is_empty() {
            return Err(BeitError::invalid_input(
                root.display().to_string(),
                format!("no images found (searched every subfolder for {})", IMAGE_EXTENSIONS.join(", ")),
            ));
        }
        let mut d = PretrainData::default();
        for p in files {
            match load_image(&p) {
                Ok(img) => {
                    d.images.push(img);
                    d.paths.push(p);
                }
                Err(e) => d.skipped.push((p, e.to_string())),
            }
        }
        if d.images.is_empty() {
            return Err(BeitError::invalid_input(root.display().to_string(), format!("none of the {} images could be read", d.skipped.len())));
        }
        Ok(d)
    }
}

pub struct Pretrainer {
    pub config: BeitConfig,
    pub model: BeitForMaskedImageModeling,
    pub weights: Weights,
    pub optimizer: AdamW,
    pub tokenizer: DalleEncoder,
    pub data: PretrainData,
    pub opts: PretrainOptions,
    pub masking: MaskingGenerator,
    pub views: TwoViewOptions,
    pub image_size: usize,
    device: Device,
    history: Vec<PretrainEpochMetrics>,
    start_epoch: usize,
    best_loss: Option<f64>,
}

impl Pretrainer {
    /// Builds the model, the optimizer and the data; with `resume`, continues from `out/last` when it exists.
    pub fn new(
        model: PretrainConfig,
        tokenizer: DalleEncoder,
        data_dir: &Path,
        out: &Path,
        opts: PretrainOptions,
        resume: bool,
    ) -> Result<Self> {
        let device = Device::Cpu;
        let last = out.join("last");
        let resuming = resume && last.join("trainer_state.json").is_file();
        let (mut config, tensors) = if resuming {
            let (c, t) = read_checkpoint(&last, &device)?;
            if c.vocab_size != tokenizer.vocab_size {
                let source = format!("{}", last.join("config.json").display());
                return Err(vocab_mismatch(c.vocab_size, tokenizer.vocab_size, &source));
            }
            (c, t)
        } else {
            (pretraining_config(model, &opts, &tokenizer)?, Default::default())
        };
        config.architectures = Some(vec![Architecture::BeitForMaskedImageModeling.name().to_string()]);
        config.validate()?;
        let (image_size, grid) = check_geometry(&config, &tokenizer)?;
        let mut opts = opts;
        let (mut history, mut start_epoch, mut best_loss) = (Vec::new(), 0, None);
        let source_kind = if tensors.is_empty() { Source::Fresh } else { Source::Checkpoint };
        let weights = Weights::build(tensors, out.join("<init>"), source_kind, &device, true, opts.seed);
        let model = BeitForMaskedImageModeling::load(&weights, &config)?;
        // No layer decay in pre-training (unilm's run_beit_pretraining has none).
        let mut optimizer = AdamW::new(weights.vars(), config.num_hidden_layers, 1.0, opts.weight_decay)?;
        if resuming {
            let state: PretrainerState = read_resume_state(&last, &mut optimizer, |s: &PretrainerState| s.step, &device)?;
            // The run's own options win over the command line's, so the resumed run is the same run.
            let epochs = opts.epochs.max(state.options.epochs);
            opts = PretrainOptions { epochs, ..state.options };
            history = state.history;
            start_epoch = state.epoch;
            best_loss = state.best_loss;
        }
        let masking = scaled_masking(grid, grid, opts.num_masking_patches)?;
        let views = TwoViewOptions {
            size: image_size,
            second_size: grid * 8,
            interpolation: Filter::Bicubic,
            second_interpolation: Filter::Lanczos,
            scale: (opts.scale_min, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: opts.hflip,
        };
        if !(opts.scale_min > 0.0 && opts.scale_min <= 1.0) {
            return Err(BeitError::invalid_input("crop scale minimum", format!("{} is not in (0, 1]", opts.scale_min)));
        }
        let data = PretrainData::load(data_dir, opts.val_split, opts.split_seed.unwrap_or(opts.seed))?;
        Ok(Pretrainer {
            config,
            model,
            weights,
            optimizer,
            tokenizer,
            data,
            opts,
            masking,
            views,
            image_size,
            device,
            history,
            start_epoch,
            best_loss,
        })
    }

    pub fn completed_epochs(&self) -> usize {
        self.start_epoch
    }

    fn steps_per_epoch(&self) -> usize {
        self.data.images.len().div_ceil(self.opts.batch_size.max(1))
    }

    /// One epoch (1-based): its metrics but the timings' wall clock.
    fn train_epoch(&mut self, epoch: usize, obs: &mut dyn TrainObserver<PretrainEpochMetrics>) -> Result<PretrainEpochMetrics> {
        let o = self.opts.clone();
        let n = self.data.images.len();
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::derive(o.seed, 2, epoch as u64);
        rng.shuffle(&mut order);
        seed_training_rng(Rng::derive(o.seed, 3, epoch as u64).next_u64());
        let processor = eval_processor(self.image_size);
        let steps_per_epoch = self.steps_per_epoch();
        let mode = Mode { train: true, uncached: true };
        let (s, t) = (self.views.size, self.views.second_size);
        let mut token_counts = vec![0usize; self.tokenizer.vocab_size];
        let (mut loss_sum, mut correct, mut count, mut seen, mut lr) = (0f64, 0usize, 0usize, 0usize, 0f64);
        let start = Instant::now();
        for (bi, batch) in order.chunks(o.batch_size.max(1)).enumerate() {
            let mut patches = Vec::with_capacity(batch.len() * 3 * s * s);
            let mut pixels01 = Vec::with_capacity(batch.len() * 3 * t * t);
            let mut mask = Vec::with_capacity(batch.len() * self.masking.height * self.masking.width);
            for &i in batch {
                let sample = pretrain_sample(&self.data.images[i], &self.views, &processor, &self.masking, &mut rng)?;
                patches.extend(sample.patches);
                pixels01.extend(sample.tokenizer_pixels);
                mask.extend(sample.mask);
            }
            let x = Tensor::from_vec(patches, (batch.len(), 3, s, s), &self.device)?;
            // The frozen tokenizer: plain tensors, not Vars, so no gradient reaches it.
            let tokenizer_in = Tensor::from_vec(pixels01, (batch.len(), 3, t, t), &self.device)?;
            let tokens = self.tokenizer.tokens(&tokenizer_in)?.flatten_all()?.to_vec1::<u32>()?;
            let step = mim_batch(&self.model, &x, &mask, &tokens, mode)?;
            let value = step.loss.to_scalar::<f32>()? as f64;
            check_loss(value, epoch, bi)?;
            let mut grads = self.optimizer.grads(&step.loss.backward()?);
            if let Some(max) = o.clip_grad {
                clip_grad_norm(&mut grads, max)?;
            }
            lr = scheduled_lr(self.optimizer.step, steps_per_epoch, o.epochs, o.warmup_epochs, o.lr, o.min_lr);
            self.optimizer.step(&grads, lr)?;
            for token in masked_labels(&tokens, &mask) {
                if let Some(c) = token_counts.get_mut(token as usize) {
                    *c += 1;
                }
            }
            loss_sum += value * step.count as f64;
            correct += step.correct;
            count += step.count;
            seen += batch.len();
            obs.batch(epoch, seen, n, value);
        }
        let secs = start.elapsed().as_secs_f64();
        let denom = count.max(1) as f64;
        Ok(PretrainEpochMetrics {
            epoch,
            loss: loss_sum / denom,
            masked_accuracy: correct as f64 / denom,
            majority_token_share: token_counts.iter().copied().max().unwrap_or(0) as f64 / denom,
            masked_tokens: count,
            lr,
            images_per_sec: seen as f64 / secs.max(1e-9),
            seconds: secs,
        })
    }

    fn writer(&self) -> CheckpointWriter<'_> {
        CheckpointWriter {
            config: &self.config,
            arch: Architecture::BeitForMaskedImageModeling,
            weights: &self.weights,
            image_size: self.image_size,
        }
    }

    /// Pre-trains up to `opts.epochs`, or `stop_after` more epochs when given, writing `out/last`, `out/best`
    /// (lowest loss) and `out/metrics.jsonl` after every epoch, and the final model into `out` itself at the end.
    pub fn run(
        &mut self,
        out: &Path,
        stop_after: Option<usize>,
        obs: &mut dyn TrainObserver<PretrainEpochMetrics>,
    ) -> Result<Vec<PretrainEpochMetrics>> {
        std::fs::create_dir_all(out).map_err(|e| BeitError::io(out, e))?;
        for (p, why) in &self.data.skipped {
            obs.note(&format!("skipped {}: {why}", p.display()));
        }
        let end = end_epoch(self.start_epoch, self.opts.epochs, stop_after);
        for epoch in self.start_epoch + 1..=end {
            let t = Instant::now();
            let mut m = self.train_epoch(epoch, obs)?;
            m.seconds = t.elapsed().as_secs_f64();
            self.history.push(m.clone());
            let improved = self.best_loss.is_none_or(|b| m.loss < b);
            if improved {
                self.best_loss = Some(m.loss);
            }
            let state = PretrainerState {
                epoch,
                step: self.optimizer.step,
                best_loss: self.best_loss,
                options: self.opts.clone(),
                history: self.history.clone(),
            };
            self.writer().end_of_epoch(out, improved, &self.optimizer, &state, &self.history)?;
            self.start_epoch = epoch;
            obs.epoch(&m, &self.history);
        }
        if self.start_epoch == self.opts.epochs {
            // The final model beside last/ and best/, so that OUT itself loads with from_pretrained.
            let w = self.writer();
            crate::pretrained::save_pretrained(out, w.config, w.arch, &w.weights.params())?;
            super::write_file(&out.join("preprocessor_config.json"), &super::processor_json(self.image_size))?;
        }
        Ok(self.history.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> DalleEncoder {
        DalleEncoder::load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/encoder.safetensors")).unwrap()
    }

    fn tiny_config() -> BeitConfig {
        BeitConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            image_size: Size2::square(16),
            patch_size: Size2::square(4),
            vocab_size: 64,
            use_mask_token: true,
            use_shared_relative_position_bias: true,
            drop_path_rate: 0.0,
            ..BeitConfig::default()
        }
    }

    #[test]
    fn masking_scales_with_the_grid() {
        let m = scaled_masking(14, 14, None).unwrap();
        assert_eq!((m.num_masking_patches, m.min_num_patches, m.max_num_patches), (75, 16, 75));
        let unilm = MaskingGenerator::beit_default();
        assert_eq!(m.log_aspect_ratio, unilm.log_aspect_ratio);
        // 16 patches: 75/196 of them is 6.1 -> 6; 16/196 of them is 1.3 -> 1.
        let m = scaled_masking(4, 4, None).unwrap();
        assert_eq!((m.num_masking_patches, m.min_num_patches), (6, 1));
        // 7x7 (112 / 16): 18.75 -> 19 masked, blocks of at least 4.
        let m = scaled_masking(7, 7, None).unwrap();
        assert_eq!((m.num_masking_patches, m.min_num_patches), (19, 4));
        // An explicit count keeps the smallest block no larger than itself.
        let m = scaled_masking(14, 14, Some(10)).unwrap();
        assert_eq!((m.num_masking_patches, m.min_num_patches), (10, 10));
        let mut rng = Rng::new(1);
        let m = scaled_masking(4, 4, None).unwrap();
        for _ in 0..200 {
            let k = m.generate(&mut rng).iter().filter(|&&x| x).count();
            assert!((1..=6).contains(&k), "{k}");
        }
        assert!(scaled_masking(1, 4, None).unwrap_err().to_string().contains("2x2"));
        assert!(scaled_masking(4, 4, Some(16)).unwrap_err().to_string().contains("expected 1 to 15"));
        assert!(scaled_masking(4, 4, Some(0)).is_err());
    }

    #[test]
    fn accuracy_counts_masked_patches_only() {
        let tokens = [1, 2, 3, 4, 5, 6];
        let preds = [1, 0, 3, 0, 0, 6];
        let mask = [true, true, false, false, true, true];
        // Masked: 1 (right), 2 (wrong), 5 (wrong), 6 (right); the right guess 3 is not masked.
        assert_eq!(masked_accuracy(&preds, &tokens, &mask), (2, 4));
        assert_eq!(masked_labels(&tokens, &mask), vec![1, 2, 5, 6]);
        assert_eq!(masked_accuracy(&preds, &tokens, &[false; 6]), (0, 0));
    }

    #[test]
    fn loss_counts_masked_patches_only() {
        let device = Device::Cpu;
        let config = tiny_config();
        let w = Weights::build(Default::default(), PathBuf::from("<test>"), Source::Fresh, &device, true, 3);
        let model = BeitForMaskedImageModeling::load(&w, &config).unwrap();
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..2 * 3 * 16 * 16).map(|_| rng.normal() as f32).collect();
        let x = Tensor::from_vec(x, (2, 3, 16, 16), &device).unwrap();
        let mask: Vec<bool> = (0..32).map(|i| i % 3 == 0).collect();
        let tokens: Vec<u32> = (0..32).map(|i| (i * 7 % 64) as u32).collect();
        // Training mode (the gradient is checked below); without dropout or drop path it is deterministic.
        let mode = Mode { train: true, uncached: true };
        let a = mim_batch(&model, &x, &mask, &tokens, mode).unwrap();
        let la = a.loss.to_scalar::<f32>().unwrap();
        assert_eq!(a.count, 11);

        // The loss is the mean cross-entropy of the masked rows of the logits: computed here by hand.
        let m = Tensor::from_vec(mask.iter().map(|&b| u8::from(b)).collect::<Vec<_>>(), (2, 16), &device).unwrap();
        let o = ForwardOptions { bool_masked_pos: Some(m), mode, ..Default::default() };
        let logits = model.forward(&x, &o, None).unwrap().logits.flatten_to(1).unwrap().to_vec2::<f32>().unwrap();
        let mut manual = 0f64;
        for (i, row) in logits.iter().enumerate().filter(|(i, _)| mask[*i]) {
            let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            manual += lse - row[tokens[i] as usize] as f64;
        }
        manual /= 11.0;
        assert!((la as f64 - manual).abs() < 1e-5, "{la} vs {manual}");

        // Other targets on unmasked patches change nothing; on one masked patch they do.
        let mut unmasked_changed = tokens.clone();
        for (i, t) in unmasked_changed.iter_mut().enumerate() {
            if !mask[i] {
                *t = (*t + 1) % 64;
            }
        }
        let b = mim_batch(&model, &x, &mask, &unmasked_changed, mode).unwrap();
        assert_eq!(b.loss.to_scalar::<f32>().unwrap(), la);
        let mut masked_changed = tokens.clone();
        masked_changed[0] = (masked_changed[0] + 1) % 64;
        let c = mim_batch(&model, &x, &mask, &masked_changed, mode).unwrap();
        assert_ne!(c.loss.to_scalar::<f32>().unwrap(), la);

        // The gradient reaches the mask token (it replaces the masked patches) and the shared bias table.
        let grads = a.loss.backward().unwrap();
        let names: Vec<String> = w.vars().iter().filter(|(_, v)| grads.get(v.as_tensor()).is_some()).map(|(n, _)| n.clone()).collect();
        assert!(names.iter().any(|n| n == "beit.embeddings.mask_token"), "{names:?}");
        assert!(names.iter().any(|n| n == "beit.encoder.relative_position_bias.relative_position_bias_table"), "{names:?}");

        // An all-unmasked batch is an error, not a NaN loss.
        let e = mim_batch(&model, &x, &[false; 32], &tokens, mode).err().unwrap().to_string();
        assert!(e.contains("no patch"), "{e}");
    }

    #[test]
    fn clipping_scales_the_global_norm() {
        let d = Device::Cpu;
        let mut g = vec![Some(Tensor::new(&[3f32, 0.0], &d).unwrap()), None, Some(Tensor::new(&[4f32], &d).unwrap())];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let a = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        let b = g[2].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.8).abs() < 1e-6, "{a:?} {b:?}");
        // Below the limit: untouched.
        let mut g = vec![Some(Tensor::new(&[0.3f32], &d).unwrap())];
        clip_grad_norm(&mut g, 1.0).unwrap();
        assert_eq!(g[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), vec![0.3]);
    }

    #[test]
    fn config_takes_the_tokenizer_vocabulary_and_refuses_a_mismatch() {
        let tok = tokenizer();
        let opts = PretrainOptions::default();
        let c = pretraining_config(PretrainConfig { config: BeitConfig::default(), vocab_size_given: false }, &opts, &tok).unwrap();
        assert_eq!(c.vocab_size, 64);
        assert!(c.use_mask_token && c.use_shared_relative_position_bias && !c.use_relative_position_bias);
        assert_eq!(c.drop_path_rate, 0.1);
        let e = pretraining_config(PretrainConfig { config: BeitConfig::default(), vocab_size_given: true }, &opts, &tok)
            .unwrap_err()
            .to_string();
        assert!(e.contains("8192") && e.contains("64") && e.contains("vocab_size"), "{e}");
        let mut odd = tiny_config();
        odd.image_size = Size2::square(18);
        let e = check_geometry(&odd, &tok).unwrap_err().to_string();
        assert!(e.contains("18") && e.contains("multiple of patch_size 4"), "{e}");
        assert_eq!(check_geometry(&tiny_config(), &tok).unwrap(), (16, 4));
    }

    #[test]
    fn paper_schedule() {
        assert!((paper_lr(2048) - 1.5e-3).abs() < 1e-15);
        assert!((paper_lr(256) - 1.875e-4).abs() < 1e-15);
        assert!((paper_min_lr(1.5e-3) - 1e-5).abs() < 1e-15);
    }

    #[test]
    fn lists_images_recursively() {
        let dir = std::env::temp_dir().join(format!("beit-pretrain-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        for f in ["x.png", "a/y.JPG", "a/b/z.webp", "a/notes.txt"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let names: Vec<String> =
            list_images(&dir).unwrap().iter().map(|p| p.strip_prefix(&dir).unwrap().display().to_string()).collect();
        assert_eq!(names, vec!["a/b/z.webp", "a/y.JPG", "x.png"]);
        // Unreadable images are skipped; none readable is an error naming the folder.
        let e = PretrainData::load(&dir, None, 0).unwrap_err().to_string();
        assert!(e.contains("none of the 3 images"), "{e}");
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        let e = PretrainData::load(&dir.join("empty"), None, 0).unwrap_err().to_string();
        assert!(e.contains("no images found"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
