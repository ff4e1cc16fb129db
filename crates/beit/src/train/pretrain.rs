//! BEiT pre-training: masked image modeling (Bao et al. 2021, unilm's run_beit_pretraining.py) of
//! BeitForMaskedImageModeling on an image folder, with the DALL-E dVAE encoder's visual tokens as targets.
//!
//! Per image: one crop seen twice ([`pretrain_data`](super::pretrain_data)), the patches at `image_size` and the
//! tokenizer's pixels at `(image_size / patch_size) * 8` (the encoder downsamples by 8, so there is one token
//! per patch), and a blockwise mask scaled to the patch grid ([`scaled_masking`]). The frozen encoder gives the
//! targets; the loss is cross-entropy on the masked patches only. The recipe is the paper's: AdamW
//! (β 0.9, 0.999, weight decay 0.05), lr 1.5e-3 at batch 2048 scaled linearly ([`paper_lr`]), 10 warmup epochs,
//! cosine decay, no layer decay, drop path 0.1, gradient clipping 3.0, and a shared relative position bias, a
//! mask token and layer scale in the model. The loop, checkpoints, metrics and --resume are [`run`](super::run)'s,
//! as fine-tuning's are.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::data::{ImageFolder, IMAGE_EXTENSIONS};
use super::pretrain_data::{pretrain_sample, TwoViewOptions};
use super::run::{
    eval_processor, read_checkpoint, resume_dir, Best, EpochRecord, EpochStats, Observer, Run, RunCore, RunOptions,
    Task,
};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::{Architecture, BeitForMaskedImageModeling};
use crate::masking::MaskingGenerator;
use crate::model::ForwardOptions;
use crate::nn::Mode;
use crate::processor::loader::{load_ordered, ImageSource, LoaderOptions};
use crate::processor::resample::Filter;
use crate::tokenizer::DalleEncoder;

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
    /// Masked patches whose predicted token is the target.
    pub correct: usize,
    /// Masked patches.
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

/// Pre-training's options: the shared ones (drop path, the deepest layer's stochastic depth, is set as the
/// config's drop_path_rate when given) and masked image modeling's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainOptions {
    /// Schedule, seed, crops and split.
    #[serde(flatten)]
    pub run: RunOptions,
    /// Global gradient-norm clipping (None: off).
    pub clip_grad: Option<f64>,
    /// Masked patches per image (default: unilm's 75 of 196 scaled to the patch grid).
    pub num_masking_patches: Option<usize>,
    /// The seed of `val_split`'s split (default: `seed`, as fine-tuning splits), so that pre-training leaves
    /// out exactly the images fine-tuning validates on (needs DIR/<class>/*).
    pub split_seed: Option<u64>,
}

impl AsMut<RunOptions> for PretrainOptions {
    fn as_mut(&mut self) -> &mut RunOptions {
        &mut self.run
    }
}

impl Default for PretrainOptions {
    /// The paper's recipe at batch 64.
    fn default() -> Self {
        let lr = paper_lr(64);
        let run = RunOptions {
            epochs: 800,
            lr,
            min_lr: paper_min_lr(lr),
            warmup_epochs: 10.0,
            drop_path: Some(0.1),
            ..RunOptions::default()
        };
        PretrainOptions { run, clip_grad: Some(3.0), num_masking_patches: None, split_seed: None }
    }
}

/// Pre-training's fields of an epoch's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MimMetrics {
    /// Mean cross-entropy over the epoch's masked patches.
    pub loss: f64,
    /// Share of masked patches whose token the model predicted (argmax of the logits).
    pub masked_accuracy: f64,
    /// Share of the most common token among the epoch's targets: the accuracy of always guessing it.
    pub majority_token_share: f64,
    /// Masked patches of the epoch.
    pub masked_tokens: usize,
}

/// One epoch of pre-training, as `out/metrics.jsonl` has it.
pub type PretrainEpochMetrics = EpochRecord<MimMetrics>;

/// The model to pre-train: a config (a preset or config.json), with fresh weights.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    /// The architecture (pre-training sets its mask token, shared bias and vocabulary).
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

    /// A config.json; its vocab_size, when it names one, must be the tokenizer's.
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
    opts.run.resize(&mut c);
    if p.vocab_size_given && c.vocab_size != tokenizer.vocab_size {
        return Err(vocab_mismatch(c.vocab_size, tokenizer.vocab_size, "the config"));
    }
    c.vocab_size = tokenizer.vocab_size;
    c.use_mask_token = true;
    c.use_shared_relative_position_bias = true;
    c.use_relative_position_bias = false;
    if let Some(dp) = opts.run.drop_path {
        c.drop_path_rate = dp;
    }
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
    /// The decoded images.
    pub images: Vec<RgbImage>,
    /// Their files, in the same order.
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
        // Decoded on every core, in order (the threaded loader).
        let sources = files.iter().cloned().map(ImageSource::Path).collect();
        for (p, (_, result)) in files.into_iter().zip(load_ordered(sources, &LoaderOptions::default(), Ok)) {
            match result {
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

/// The pre-training task: a masked-image-modeling model, the frozen tokenizer giving its targets, the images,
/// the mask generator and the two views.
pub struct Pretraining {
    /// The model being trained.
    pub model: BeitForMaskedImageModeling,
    /// The frozen DALL-E encoder.
    pub tokenizer: DalleEncoder,
    /// The images.
    pub data: PretrainData,
    /// Blockwise masking on the patch grid.
    pub masking: MaskingGenerator,
    /// The crop seen by the model and, downsampled by 8 per patch, by the tokenizer.
    pub views: TwoViewOptions,
}

/// A pre-training run.
pub type Pretrainer = Run<Pretraining>;

impl Task for Pretraining {
    type Options = PretrainOptions;
    type Metrics = MimMetrics;
    const BEST: Best = Best { name: "loss", higher_is_better: false };

    fn best_value(m: &MimMetrics) -> Option<f64> {
        Some(m.loss)
    }

    fn skipped(&self) -> &[(PathBuf, String)] {
        &self.data.skipped
    }

    fn epoch(&mut self, core: &mut RunCore<Self>, obs: &mut Observer<'_, Self>) -> Result<(Self::Metrics, EpochStats)> {
        let processor = eval_processor(core.image_size);
        let (s, t, device) = (self.views.size, self.views.second_size, core.device.clone());
        let mode = core.opts.run.train_mode();
        let mut token_counts = vec![0usize; self.tokenizer.vocab_size];
        let (mut correct, mut count) = (0usize, 0usize);
        let clip = core.opts.clip_grad;
        let stats = core.train_epoch(self.data.images.len(), 1, clip, obs, |batch, rng| {
            let mut patches = Vec::with_capacity(batch.len() * 3 * s * s);
            let mut pixels01 = Vec::with_capacity(batch.len() * 3 * t * t);
            let mut mask = Vec::with_capacity(batch.len() * self.masking.height * self.masking.width);
            for &i in batch {
                let sample = pretrain_sample(&self.data.images[i], &self.views, &processor, &self.masking, rng)?;
                patches.extend(sample.patches);
                pixels01.extend(sample.tokenizer_pixels);
                mask.extend(sample.mask);
            }
            let x = Tensor::from_vec(patches, (batch.len(), 3, s, s), &device)?;
            // The frozen tokenizer: plain tensors, not Vars, so no gradient reaches it.
            let tokenizer_in = Tensor::from_vec(pixels01, (batch.len(), 3, t, t), &device)?;
            let tokens = self.tokenizer.tokens(&tokenizer_in)?.flatten_all()?.to_vec1::<u32>()?;
            let step = mim_batch(&self.model, &x, &mask, &tokens, mode)?;
            for token in masked_labels(&tokens, &mask) {
                if let Some(c) = token_counts.get_mut(token as usize) {
                    *c += 1;
                }
            }
            correct += step.correct;
            count += step.count;
            Ok((step.loss, step.count))
        })?;
        let denom = count.max(1) as f64;
        let m = MimMetrics {
            loss: stats.loss,
            masked_accuracy: correct as f64 / denom,
            majority_token_share: token_counts.iter().copied().max().unwrap_or(0) as f64 / denom,
            masked_tokens: count,
        };
        Ok((m, stats))
    }

    /// The final model beside last/ and best/, so that OUT itself loads with from_pretrained.
    fn completed(&self, core: &RunCore<Self>, out: &Path) -> Result<()> {
        core.save_model(out)
    }
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
        let resume_from = resume_dir(out, resume);
        let (mut config, tensors) = match &resume_from {
            Some(last) => {
                let (c, t) = read_checkpoint(last)?;
                if c.vocab_size != tokenizer.vocab_size {
                    let source = format!("{}", last.join("config.json").display());
                    return Err(vocab_mismatch(c.vocab_size, tokenizer.vocab_size, &source));
                }
                (c, t)
            }
            None => (pretraining_config(model, &opts, &tokenizer)?, HashMap::new()),
        };
        config.architectures = Some(vec![Architecture::BeitForMaskedImageModeling.name().to_string()]);
        config.validate()?;
        let (_, grid) = check_geometry(&config, &tokenizer)?;
        // No layer decay in pre-training (unilm's run_beit_pretraining has none).
        let (core, model) = RunCore::<Pretraining>::build(
            config,
            tensors,
            out,
            opts,
            1.0,
            resume_from.as_deref(),
            BeitForMaskedImageModeling::load,
        )?;
        let o = &core.opts;
        let masking = scaled_masking(grid, grid, o.num_masking_patches)?;
        let views = TwoViewOptions {
            size: core.image_size,
            second_size: grid * 8,
            interpolation: Filter::Bicubic,
            second_interpolation: Filter::Lanczos,
            scale: (o.run.scale_min, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: o.run.hflip,
        };
        if !(o.run.scale_min > 0.0 && o.run.scale_min <= 1.0) {
            return Err(BeitError::invalid_input("crop scale minimum", format!("{} is not in (0, 1]", o.run.scale_min)));
        }
        let data = PretrainData::load(data_dir, o.run.val_split, o.split_seed.unwrap_or(o.run.seed))?;
        Ok(Run { core, task: Pretraining { model, tokenizer, data, masking, views } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Size2;
    use crate::rng::Rng;
    use crate::weights::{Source, Weights};
    use candle_core::Device;

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
        let mode = Mode { train: true, uncached: true, ..Mode::default() };
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
