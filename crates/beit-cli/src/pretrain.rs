//! `beit pretrain`: BEiT's masked-image-modeling pre-training on an image folder, with the DALL-E dVAE encoder's
//! visual tokens as targets; writes a BeitForMaskedImageModeling checkpoint that `beit train --model` fine-tunes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit::tokenizer::DalleEncoder;
use beit::train::pretrain::{paper_lr, paper_min_lr, PretrainConfig, PretrainEpochMetrics, PretrainOptions, Pretrainer};
use beit::train::RunOptions;
use clap::Args;
use plotters::style::{RGBColor, BLUE, RED};

use crate::training::{parameter_count, plot_epochs, CommonTrainArgs, Observer, Panel, Series};

#[derive(Args)]
pub struct PretrainArgs {
    /// Images, in any subfolders (labels are not used). With DIR/train, only DIR/train is read (DIR/val is
    /// `beit train`'s validation set).
    #[arg(long)]
    data: PathBuf,
    /// The DALL-E dVAE encoder giving the targets: OpenAI's encoder.pkl or a .safetensors state dict.
    #[arg(long)]
    tokenizer: PathBuf,
    /// A preset (tiny, small, base, large) or a config.json; vocab_size comes from the tokenizer unless the file
    /// names one (which must then match).
    #[arg(long, default_value = "base")]
    config: String,
    #[command(flatten)]
    common: CommonTrainArgs,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 3.0)]
    clip_grad: f64,
    /// Masked patches per image (default: unilm's 75 of 196, scaled to the patch grid).
    #[arg(long)]
    num_masking_patches: Option<usize>,
    /// The seed of --val-split's split (default: --seed, as `beit train --val-split F --seed S` splits).
    #[arg(long)]
    split_seed: Option<u64>,
}

/// Loss (left); masked-token accuracy with the most-common-token baseline (right).
fn plot(path: &Path, history: &[PretrainEpochMetrics]) -> Result<()> {
    let e = |h: &PretrainEpochMetrics| h.epoch as f64;
    let points = |value: fn(&PretrainEpochMetrics) -> f64| history.iter().map(|h| (e(h), value(h))).collect();
    let max_loss = history.iter().map(|h| h.task.loss).fold(0.1f64, f64::max);
    let loss = Panel {
        caption: "masked image modeling loss",
        y_max: max_loss * 1.05,
        series: vec![Series { label: "train", color: BLUE, points: points(|h| h.task.loss) }],
    };
    let accuracy = Panel {
        caption: "masked-token accuracy",
        y_max: 1.0,
        series: vec![
            Series { label: "accuracy", color: RED, points: points(|h| h.task.masked_accuracy) },
            Series {
                label: "most common token",
                color: RGBColor(128, 128, 128),
                points: points(|h| h.task.majority_token_share),
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
    let c = &a.common;
    // The paper's learning rate scales with the batch, and the final one with it.
    let lr = c.lr.unwrap_or_else(|| paper_lr(c.batch_size.unwrap_or(PretrainOptions::default().run.batch_size)));
    let defaults = RunOptions { lr, min_lr: paper_min_lr(lr), ..PretrainOptions::default().run };
    let opts = PretrainOptions {
        run: c.run_options(defaults)?,
        clip_grad: (a.clip_grad > 0.0).then_some(a.clip_grad),
        num_masking_patches: a.num_masking_patches,
        split_seed: a.split_seed,
    };
    if !a.tokenizer.is_file() {
        bail!("--tokenizer {}: no such file (OpenAI's encoder: https://cdn.openai.com/dall-e/encoder.pkl)", a.tokenizer.display());
    }
    let model = config(&a.config)?;
    let tokenizer =
        DalleEncoder::load(&a.tokenizer).with_context(|| format!("loading the tokenizer {}", a.tokenizer.display()))?;
    let vocab_size = tokenizer.vocab_size;
    let mut p = Pretrainer::new(model, tokenizer, &a.data, &c.out, opts, c.resume)?;
    let m = &p.task.masking;
    eprintln!(
        "{} images; {} parameters; {}x{} patches of {} pixels, {} masked (blocks of at least {}); tokenizer view {}x{}, \
         vocabulary {}; lr {:.3e}; resuming after epoch {}",
        p.task.data.images.len(),
        parameter_count(&p.core.weights),
        m.height,
        m.width,
        p.core.config.patch_size.height,
        m.num_masking_patches,
        m.min_num_patches,
        p.task.views.second_size,
        p.task.views.second_size,
        vocab_size,
        p.core.opts.run.lr,
        p.completed_epochs()
    );
    let line = move |m: &PretrainEpochMetrics| {
        let t = &m.task;
        format!(
            "epoch {:3}  loss {:.4}  masked-token accuracy {:.2}%  (most common token {:.2}%, 1/vocab {:.2}%)  lr {:.2e}  {:.1} images/s  {:.1} s",
            m.epoch,
            t.loss,
            t.masked_accuracy * 100.0,
            t.majority_token_share * 100.0,
            100.0 / vocab_size.max(1) as f64,
            m.lr,
            m.images_per_sec,
            m.seconds
        )
    };
    let mut obs = Observer::new(c.out.join("pretrain.png"), line, plot);
    let history = p.run(&c.out, c.stop_after, &mut obs)?;
    if let Some(last) = history.last() {
        eprintln!(
            "masked-token accuracy {:.2}% after epoch {} (most common token {:.2}%); checkpoints in {}/best and {}/last",
            last.task.masked_accuracy * 100.0,
            last.epoch,
            last.task.majority_token_share * 100.0,
            c.out.display(),
            c.out.display()
        );
    }
    Ok(())
}
