//! What `beit train` and `beit pretrain` share: the flags of the schedule, the data and the output folder, the
//! per-epoch progress bar and summary line, and the per-epoch plots.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use beit::train::{RunOptions, TrainObserver};
use beit::train::Precision;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;

use crate::segment::register_font;

// Flags whose defaults differ between the commands are Options; each command fills them from its library
// options' Default.
#[derive(Args)]
pub struct CommonTrainArgs {
    /// Output folder: last/ and best/ checkpoints, metrics.jsonl and the plot (train: metrics.png; pretrain:
    /// pretrain.png, and the final model itself).
    #[arg(long)]
    pub out: PathBuf,
    /// Epochs of the schedule [default: train 30 (semantic segmentation 127), pretrain 800].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per batch [default: 64; semantic segmentation 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: train 0.004 (semantic segmentation 7e-4); pretrain the paper's 1.5e-3 at
    /// batch 2048, scaled linearly to --batch-size].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Final learning rate of the cosine or poly [default: train 1e-6 (semantic segmentation 0); pretrain
    /// lr / 150, unilm's 1e-5 against 1.5e-3].
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// AdamW's weight decay (biases, norms, tokens and position tables have none).
    #[arg(long, default_value_t = RunOptions::default().weight_decay)]
    pub weight_decay: f64,
    /// Epochs of linear warmup [default: train 5 (semantic segmentation 1.2), pretrain 10].
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    /// Seed of fresh weights, shuffles, augmentation, dropout and drop path.
    #[arg(long, default_value_t = RunOptions::default().seed)]
    pub seed: u64,
    /// Stochastic depth rate, overriding the config's drop_path_rate [default: train the config's, semantic
    /// segmentation and pretrain 0.1].
    #[arg(long)]
    pub drop_path: Option<f64>,
    /// RandomResizedCrop's smallest area share.
    #[arg(long, default_value_t = RunOptions::default().scale_min)]
    pub crop_scale_min: f64,
    /// No random horizontal flips.
    #[arg(long)]
    pub no_hflip: bool,
    /// Input resolution: of a model built from a preset or config.json, or the one a checkpoint's position
    /// tables are resized to (as transformers interpolates them); --resume keeps the run's own.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Patch size of a model built from a preset or config.json (a checkpoint's cannot change).
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// Share of each class of DIR/<class>/* held out for validation: train validates on it, pretrain leaves it
    /// out (with --seed, or pretrain's --split-seed, the same images).
    #[arg(long)]
    pub val_split: Option<f64>,
    /// The Linear layers' products: f32, or bf16 (rounded to nearest even, f32 accumulation and master weights,
    /// as torch's autocast; fast where the CPU has AVX512_BF16). --resume keeps the run's own.
    #[arg(long, value_enum, default_value_t = TrainPrecision::F32)]
    pub precision: TrainPrecision,
    /// Recompute each encoder layer's activations in the backward pass instead of keeping them (transformers'
    /// gradient checkpointing): less memory, a second forward pass, the same gradients.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many epochs of this invocation (the schedule still spans --epochs).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// `--precision`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainPrecision {
    /// f32 throughout.
    F32,
    /// bf16 products, f32 accumulation.
    Bf16,
}

impl CommonTrainArgs {
    /// The shared options; flags left out take `defaults`' values.
    pub fn run_options(&self, defaults: RunOptions) -> Result<RunOptions> {
        let o = RunOptions {
            epochs: self.epochs.unwrap_or(defaults.epochs),
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            lr: self.lr.unwrap_or(defaults.lr),
            min_lr: self.min_lr.unwrap_or(defaults.min_lr),
            weight_decay: self.weight_decay,
            warmup_epochs: self.warmup_epochs.unwrap_or(defaults.warmup_epochs),
            seed: self.seed,
            drop_path: self.drop_path.or(defaults.drop_path),
            scale_min: self.crop_scale_min,
            hflip: !self.no_hflip,
            image_size: self.image_size,
            patch_size: self.patch_size,
            val_split: self.val_split,
            schedule: defaults.schedule,
            precision: match self.precision {
                TrainPrecision::F32 => Precision::F32,
                TrainPrecision::Bf16 => Precision::Bf16,
            },
            gradient_checkpointing: self.gradient_checkpointing,
        };
        if o.batch_size == 0 || o.epochs == 0 {
            bail!("--batch-size and --epochs must be positive");
        }
        Ok(o)
    }
}

/// The per-epoch progress bar on stderr (images done, images/s, the last batch's loss).
#[derive(Default)]
struct EpochBar {
    bar: Option<ProgressBar>,
}

impl EpochBar {
    fn update(&mut self, epoch: usize, done: usize, total: usize, loss: f64) {
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} {per_sec} loss {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        bar.set_prefix(epoch.to_string());
        bar.set_position(done as u64);
        bar.set_message(format!("{loss:.4}"));
    }

    /// Clears the bar before the epoch's summary line is printed.
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// What a training command shows: the progress bar, a summary line per epoch (`line`), the plot of every
/// epoch so far redrawn into `plot_path` (by `plot`), and warnings.
pub struct Observer<M> {
    bar: EpochBar,
    plot_path: PathBuf,
    line: Box<dyn Fn(&M) -> String>,
    plot: fn(&Path, &[M]) -> Result<()>,
}

impl<M> Observer<M> {
    pub fn new(plot_path: PathBuf, line: impl Fn(&M) -> String + 'static, plot: fn(&Path, &[M]) -> Result<()>) -> Self {
        Observer { bar: EpochBar::default(), plot_path, line: Box::new(line), plot }
    }
}

impl<M> TrainObserver<M> for Observer<M> {
    fn batch(&mut self, epoch: usize, done: usize, total: usize, loss: f64) {
        self.bar.update(epoch, done, total, loss);
    }

    fn epoch(&mut self, m: &M, history: &[M]) {
        self.bar.finish();
        eprintln!("{}", (self.line)(m));
        if let Err(e) = (self.plot)(&self.plot_path, history) {
            eprintln!("warning: could not draw {}: {e:#}", self.plot_path.display());
        }
    }

    fn note(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }
}

/// One line of a chart: its legend label, colour and (epoch, value) points.
pub struct Series {
    pub label: &'static str,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a per-epoch plot: title, y range top (from 0) and lines.
pub struct Panel {
    pub caption: &'static str,
    pub y_max: f64,
    pub series: Vec<Series>,
}

/// Side-by-side per-epoch charts (500 pixels wide each) over epochs 1..=`epochs`, as a PNG.
pub fn plot_epochs(path: &Path, epochs: usize, panels: &[Panel]) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (500 * panels.len().max(1) as u32, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = epochs.max(2) as f64;
    for (area, panel) in root.split_evenly((1, panels.len().max(1))).iter().zip(panels) {
        let mut c = ChartBuilder::on(area)
            .caption(panel.caption, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(1f64..n, 0f64..panel.y_max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c.configure_mesh().x_desc("epoch").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        for s in &panel.series {
            let color = s.color;
            c.draw_series(LineSeries::new(s.points.iter().copied(), &color))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        c.configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The parameter count line both commands print.
pub fn parameter_count(weights: &beit::weights::Weights) -> usize {
    weights.params().iter().map(|(_, t)| t.elem_count()).sum()
}
