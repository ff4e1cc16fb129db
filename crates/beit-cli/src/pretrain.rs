//! `beit pretrain`: BEiT's masked-image-modeling pre-training on an image folder, with the DALL-E dVAE encoder's
//! visual tokens as targets; writes a BeitForMaskedImageModeling checkpoint that `beit train --model` fine-tunes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit::tokenizer::DalleEncoder;
use beit::train::pretrain::{paper_lr, paper_min_lr, PretrainConfig, PretrainEpochMetrics, PretrainOptions, Pretrainer};
use beit::train::TrainObserver;
use clap::Args;
use plotters::style::{RGBColor, BLUE, RED};

use crate::train::{plot_epochs, EpochBar, Panel, Series};

#[derive(Args)]
pub struct PretrainArgs {
    /// Images, in any subfolders (labels are not used). With DIR/train, only DIR/train is read (DIR/val is
    /// `beit train`'s validation set).
    #[arg(long)]
    data: PathBuf,
    /// The DALL-E dVAE encoder giving the targets: OpenAI's encoder.pkl or a .safetensors state dict.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output: last/ and best/ checkpoints, metrics.jsonl, pretrain.png, and the final model itself.
    #[arg(long)]
    out: PathBuf,
    /// A preset (tiny, small, base, large) or a config.json; vocab_size comes from the tokenizer unless the file
    /// names one (which must then match).
    #[arg(long, default_value = "base")]
    config: String,
    #[arg(long, default_value_t = 800)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate (default: the paper's 1.5e-3 at batch 2048, scaled linearly to --batch-size).
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate of the cosine (default: lr / 150, unilm's 1e-5 against 1.5e-3).
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    #[arg(long, default_value_t = 10.0)]
    warmup_epochs: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stochastic depth rate.
    #[arg(long, default_value_t = 0.1)]
    drop_path: f64,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 3.0)]
    clip_grad: f64,
    /// RandomResizedCrop's smallest area share.
    #[arg(long, default_value_t = 0.08)]
    crop_scale_min: f64,
    #[arg(long)]
    no_hflip: bool,
    /// Input resolution (overrides the config's image_size).
    #[arg(long)]
    image_size: Option<usize>,
    /// Patch size (overrides the config's patch_size).
    #[arg(long)]
    patch_size: Option<usize>,
    /// Masked patches per image (default: unilm's 75 of 196, scaled to the patch grid).
    #[arg(long)]
    num_masking_patches: Option<usize>,
    /// Leave out the images `beit train --val-split F --seed S` validates on (DIR/<class>/* layout).
    #[arg(long)]
    val_split: Option<f64>,
    /// The seed of that split (default: --seed).
    #[arg(long)]
    split_seed: Option<u64>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs of this invocation (the schedule still spans --epochs).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

struct Observer {
    bar: EpochBar,
    out: PathBuf,
    vocab_size: usize,
}

impl TrainObserver<PretrainEpochMetrics> for Observer {
    fn batch(&mut self, epoch: usize, done: usize, total: usize, loss: f64) {
        self.bar.update(epoch, done, total, loss);
    }

    fn epoch(&mut self, m: &PretrainEpochMetrics, history: &[PretrainEpochMetrics]) {
        self.bar.finish();
        eprintln!(
            "epoch {:3}  loss {:.4}  masked-token accuracy {:.2}%  (most common token {:.2}%, 1/vocab {:.2}%)  lr {:.2e}  {:.1} images/s  {:.1} s",
            m.epoch,
            m.loss,
            m.masked_accuracy * 100.0,
            m.majority_token_share * 100.0,
            100.0 / self.vocab_size.max(1) as f64,
            m.lr,
            m.images_per_sec,
            m.seconds
        );
        if let Err(e) = plot(&self.out.join("pretrain.png"), history) {
            eprintln!("warning: could not draw the pre-training plot: {e:#}");
        }
    }

    fn note(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }
}

/// Loss (left); masked-token accuracy with the most-common-token baseline (right).
fn plot(path: &Path, history: &[PretrainEpochMetrics]) -> Result<()> {
    let e = |h: &PretrainEpochMetrics| h.epoch as f64;
    let max_loss = history.iter().map(|h| h.loss).fold(0.1f64, f64::max);
    let loss = Panel {
        caption: "masked image modeling loss",
        y_max: max_loss * 1.05,
        series: vec![Series { label: "train", color: BLUE, points: history.iter().map(|h| (e(h), h.loss)).collect() }],
    };
    let accuracy = Panel {
        caption: "masked-token accuracy",
        y_max: 1.0,
        series: vec![
            Series { label: "accuracy", color: RED, points: history.iter().map(|h| (e(h), h.masked_accuracy)).collect() },
            Series {
                label: "most common token",
                color: RGBColor(128, 128, 128),
                points: history.iter().map(|h| (e(h), h.majority_token_share)).collect(),
            },
        ],
    };
    plot_epochs(path, history.len(), &[loss, accuracy])
}

fn config(spec: &str) -> Result<PretrainConfig> {
    if ["tiny", "small", "base", "large"].contains(&spec) {
        return Ok(PretrainConfig::preset(spec)?);
    }
    let p = Path::new(spec);
    if !p.is_file() {
        bail!("--config {spec:?} is neither a preset (tiny, small, base, large) nor a config.json file");
    }
    Ok(PretrainConfig::from_file(p)?)
}

pub fn run(a: PretrainArgs) -> Result<()> {
    if a.batch_size == 0 || a.epochs == 0 {
        bail!("--batch-size and --epochs must be positive");
    }
    if !a.tokenizer.is_file() {
        bail!("--tokenizer {}: no such file (OpenAI's encoder: https://cdn.openai.com/dall-e/encoder.pkl)", a.tokenizer.display());
    }
    let model = config(&a.config)?;
    let tokenizer =
        DalleEncoder::load(&a.tokenizer).with_context(|| format!("loading the tokenizer {}", a.tokenizer.display()))?;
    let lr = a.lr.unwrap_or_else(|| paper_lr(a.batch_size));
    let opts = PretrainOptions {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr,
        min_lr: a.min_lr.unwrap_or_else(|| paper_min_lr(lr)),
        weight_decay: a.weight_decay,
        warmup_epochs: a.warmup_epochs,
        seed: a.seed,
        drop_path: a.drop_path,
        clip_grad: (a.clip_grad > 0.0).then_some(a.clip_grad),
        scale_min: a.crop_scale_min,
        hflip: !a.no_hflip,
        image_size: a.image_size,
        patch_size: a.patch_size,
        num_masking_patches: a.num_masking_patches,
        val_split: a.val_split,
        split_seed: a.split_seed,
    };
    let vocab_size = tokenizer.vocab_size;
    let mut p = Pretrainer::new(model, tokenizer, &a.data, &a.out, opts, a.resume)?;
    let m = &p.masking;
    eprintln!(
        "{} images; {} parameters; {}x{} patches of {} pixels, {} masked (blocks of at least {}); tokenizer view {}x{}, \
         vocabulary {}; lr {:.3e}; resuming after epoch {}",
        p.data.images.len(),
        p.weights.params().iter().map(|(_, t)| t.elem_count()).sum::<usize>(),
        m.height,
        m.width,
        p.config.patch_size.height,
        m.num_masking_patches,
        m.min_num_patches,
        p.views.second_size,
        p.views.second_size,
        vocab_size,
        p.opts.lr,
        p.completed_epochs()
    );
    let mut obs = Observer { bar: EpochBar::default(), out: a.out.clone(), vocab_size };
    let history = p.run(&a.out, a.stop_after, &mut obs)?;
    if let Some(last) = history.last() {
        eprintln!(
            "masked-token accuracy {:.2}% after epoch {} (most common token {:.2}%); checkpoints in {}/best and {}/last",
            last.masked_accuracy * 100.0,
            last.epoch,
            last.majority_token_share * 100.0,
            a.out.display(),
            a.out.display()
        );
    }
    Ok(())
}
