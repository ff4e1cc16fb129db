//! `beit train` and `beit eval`: fine-tuning (or training from scratch) on an image folder, and evaluation with
//! top-1, top-5 and a confusion matrix.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit::heads::AnyBeitModel;
use beit::pipeline::processor_for;
use beit::train::data::ImageFolder;
use beit::train::{evaluate, preset, EpochMetrics, ModelSource, TrainObserver, TrainOptions, Trainer};
use beit::BeitConfig;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;

use crate::common::ModelArgs;
use crate::segment::register_font;

#[derive(Args)]
pub struct TrainArgs {
    /// A checkpoint (directory or Hub id), a preset (tiny, small, base, large) or a config.json to train from scratch.
    #[arg(long)]
    model: String,
    /// Image folder: DIR/train/<class>/* and DIR/val/<class>/*, or DIR/<class>/* with --val-split.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 4e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    #[arg(long, default_value_t = 5.0)]
    warmup_epochs: f64,
    /// Layer-wise learning-rate decay (0.65 for base, 0.75 for large; 1 turns it off).
    #[arg(long, default_value_t = 0.65)]
    layer_decay: f64,
    #[arg(long, default_value_t = 0.1)]
    label_smoothing: f64,
    /// Gradient accumulation: optimizer steps every N batches.
    #[arg(long, default_value_t = 1)]
    accum_steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stochastic depth rate (overrides the config's drop_path_rate).
    #[arg(long)]
    drop_path: Option<f64>,
    /// RandomResizedCrop's smallest area share.
    #[arg(long, default_value_t = 0.08)]
    crop_scale_min: f64,
    #[arg(long)]
    no_hflip: bool,
    /// Input resolution when training from scratch (a pretrained model keeps its own).
    #[arg(long)]
    image_size: Option<usize>,
    /// Patch size when training from scratch.
    #[arg(long)]
    patch_size: Option<usize>,
    /// Share of each class held out for validation when DIR has no train/val split.
    #[arg(long)]
    val_split: Option<f64>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs of this invocation (the schedule still spans --epochs).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

/// The per-epoch progress bar on stderr (images done, images/s, the last batch's loss), shared by `beit train`
/// and `beit pretrain`.
#[derive(Default)]
pub struct EpochBar {
    bar: Option<ProgressBar>,
}

impl EpochBar {
    pub fn update(&mut self, epoch: usize, done: usize, total: usize, loss: f64) {
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
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

struct Observer {
    bar: EpochBar,
    out: PathBuf,
}

impl TrainObserver for Observer {
    fn batch(&mut self, epoch: usize, done: usize, total: usize, loss: f64) {
        self.bar.update(epoch, done, total, loss);
    }

    fn epoch(&mut self, m: &EpochMetrics, history: &[EpochMetrics]) {
        self.bar.finish();
        let pct = |v: Option<f64>| v.map(|x| format!("{:.2}%", x * 100.0)).unwrap_or_else(|| "-".into());
        eprintln!(
            "epoch {:3}  train loss {:.4}  val loss {}  top-1 {}  top-5 {}  lr {:.2e}  {:.1} images/s  {:.1} s",
            m.epoch,
            m.train_loss,
            m.val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
            pct(m.top1),
            pct(m.top5),
            m.lr,
            m.images_per_sec,
            m.seconds
        );
        if let Err(e) = plot_curves(&self.out.join("metrics.png"), history) {
            eprintln!("warning: could not draw the metrics plot: {e:#}");
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

/// Side-by-side per-epoch charts (500 pixels wide each) over epochs 1..=`epochs`, as a PNG: the metrics plots
/// of `beit train` and `beit pretrain`.
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
        c.configure_series_labels().background_style(WHITE).border_style(BLACK).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Loss (left) and accuracy (right) curves per epoch.
fn plot_curves(path: &Path, history: &[EpochMetrics]) -> Result<()> {
    let max_loss = history.iter().flat_map(|h| [Some(h.train_loss), h.val_loss]).flatten().fold(0.1f64, f64::max);
    let e = |h: &EpochMetrics| h.epoch as f64;
    let loss = Panel {
        caption: "loss",
        y_max: max_loss * 1.05,
        series: vec![
            Series { label: "train", color: BLUE, points: history.iter().map(|h| (e(h), h.train_loss)).collect() },
            Series { label: "val", color: RED, points: history.iter().filter_map(|h| h.val_loss.map(|v| (e(h), v))).collect() },
        ],
    };
    let accuracy = Panel {
        caption: "validation accuracy",
        y_max: 1.0,
        series: vec![
            Series { label: "top-1", color: BLUE, points: history.iter().filter_map(|h| h.top1.map(|v| (e(h), v))).collect() },
            Series { label: "top-5", color: GREEN, points: history.iter().filter_map(|h| h.top5.map(|v| (e(h), v))).collect() },
        ],
    };
    plot_epochs(path, history.len(), &[loss, accuracy])
}

fn source(spec: &str) -> Result<ModelSource> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(ModelSource::Pretrained(p.to_path_buf()));
    }
    if p.is_file() && spec.ends_with(".json") {
        return Ok(ModelSource::Config(BeitConfig::from_file(p)?));
    }
    if ["tiny", "small", "base", "large"].contains(&spec) {
        return Ok(ModelSource::Config(preset(spec)?));
    }
    let hub = beit::hub::resolve_model(spec, &beit::hub::HubOptions::from_env())
        .with_context(|| format!("{spec:?} is not a preset, a config.json or a checkpoint"))?;
    Ok(ModelSource::Pretrained(hub.dir))
}

pub fn run(a: TrainArgs) -> Result<()> {
    let opts = TrainOptions {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        min_lr: a.min_lr,
        weight_decay: a.weight_decay,
        warmup_epochs: a.warmup_epochs,
        layer_decay: a.layer_decay,
        label_smoothing: a.label_smoothing,
        accum_steps: a.accum_steps,
        seed: a.seed,
        drop_path: a.drop_path,
        scale_min: a.crop_scale_min,
        hflip: !a.no_hflip,
        image_size: a.image_size,
        patch_size: a.patch_size,
        val_split: a.val_split,
    };
    if opts.batch_size == 0 || opts.epochs == 0 || opts.accum_steps == 0 {
        bail!("--batch-size, --epochs and --accum-steps must be positive");
    }
    let mut trainer = Trainer::new(source(&a.model)?, &a.data, &a.out, opts, a.resume)?;
    let d = &trainer.data;
    eprintln!(
        "{} classes, {} training and {} validation images; {} parameters; resuming after epoch {}",
        d.classes.len(),
        d.train.images.len(),
        d.val.images.len(),
        trainer.weights.params().iter().map(|(_, t)| t.elem_count()).sum::<usize>(),
        trainer.completed_epochs()
    );
    let mut obs = Observer { bar: EpochBar::default(), out: a.out.clone() };
    let history = trainer.run(&a.out, a.stop_after, &mut obs)?;
    if let Some(best) = history.iter().filter_map(|h| h.top1).reduce(f64::max) {
        eprintln!("best top-1 {:.2}%; checkpoints in {}/best and {}/last", best * 100.0, a.out.display(), a.out.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image folder: DIR/val/<class>/* (or DIR/<class>/*).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Evaluate only this held-out share of DIR/<class>/* (the same split `beit train --val-split` makes with --seed).
    #[arg(long)]
    val_split: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also draw the confusion matrix to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let pipe = a.model.pipeline()?;
    let AnyBeitModel::ImageClassification(model) = &pipe.pretrained.model else {
        bail!("{} is not an image-classification checkpoint", a.model.model);
    };
    let dir = if a.data.join("val").is_dir() { a.data.join("val") } else { a.data.clone() };
    let folder = ImageFolder::load(&dir, a.val_split, a.seed)?;
    let split = if a.val_split.is_some() { &folder.val } else { &folder.train };
    for (p, why) in &folder.skipped {
        eprintln!("warning: skipped {}: {why}", p.display());
    }
    let labels = &pipe.pretrained.config.id2label;
    let names: Vec<String> = labels.values().cloned().collect();
    if names != folder.classes {
        bail!("the data's classes {:?} differ from the model's labels {:?}", folder.classes, names);
    }
    let processor = processor_for(&pipe.model_dir)?;
    let e = evaluate(model, &split.images, &split.labels, names.len(), &processor, a.batch_size, &candle_core::Device::Cpu)?;
    println!("{} images: top-1 {:.2}%  top-5 {:.2}%  loss {:.4}", e.count, e.top1 * 100.0, e.top5 * 100.0, e.loss);
    let w = names.iter().map(|n| n.len()).max().unwrap_or(4).max(5);
    println!("confusion (rows: true class, columns: predicted)");
    print!("{:>w$} ", "");
    for n in &names {
        print!("{:>w$} ", n);
    }
    println!();
    for (n, row) in names.iter().zip(&e.confusion) {
        print!("{n:>w$} ");
        for c in row {
            print!("{c:>w$} ");
        }
        println!();
    }
    if let Some(p) = &a.plot {
        plot_confusion(p, &names, &e.confusion)?;
    }
    Ok(())
}

fn plot_confusion(path: &Path, names: &[String], m: &[Vec<usize>]) -> Result<()> {
    register_font();
    let n = names.len();
    let cell = (480 / n.max(1)).clamp(12, 60) as i32;
    let size = (cell * n as i32 + 140) as u32;
    let root = BitMapBackend::new(path, (size, size)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let max = m.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let style = ("sans-serif", 12).into_font().color(&BLACK);
    for (i, row) in m.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let shade = 255 - (200.0 * v as f64 / max) as u8;
            let (x, y) = (120 + cell * j as i32, 20 + cell * i as i32);
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], RGBColor(shade, shade, 255).filled()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            root.draw(&Text::new(v.to_string(), (x + 3, y + 3), style.clone())).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        root.draw(&Text::new(names[i].clone(), (5, 20 + cell * i as i32 + 3), style.clone()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
