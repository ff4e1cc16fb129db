//! `beit train` and `beit eval`: fine-tuning (or training from scratch) on an image folder, and evaluation with
//! top-1, top-5 and a confusion matrix; with `--task semantic-segmentation`, on images with masks, evaluated by
//! mIoU.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit::heads::AnyBeitModel;
use beit::pipeline::processor_for;
use beit::train::data::ImageFolder;
use beit::train::seg_data::SegDataset;
use beit::train::segmentation::{self, SegEpochMetrics, SegOptions, SegTrainer};
use beit::train::{evaluate, preset, EpochMetrics, ModelSource, TrainOptions, Trainer};
use beit::BeitConfig;
use clap::{Args, ValueEnum};
use plotters::prelude::*;

use crate::common::ModelArgs;
use crate::segment::register_font;
use crate::training::{parameter_count, plot_epochs, CommonTrainArgs, Observer, Panel, Series};

/// What `beit train` and `beit eval` work on.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskKind {
    /// Class folders; BeitForImageClassification.
    ImageClassification,
    /// Images with masks of class ids; BeitForSemanticSegmentation (UperNet).
    SemanticSegmentation,
}

#[derive(Args)]
pub struct TrainArgs {
    /// A checkpoint (directory or Hub id), a preset (tiny, small, base, large) or a config.json to train from scratch.
    #[arg(long)]
    model: String,
    /// Image folder: DIR/train/<class>/* and DIR/val/<class>/*, or DIR/<class>/* with --val-split. Semantic
    /// segmentation: DIR/images/{training,validation}/X.jpg with DIR/annotations/{training,validation}/X.png
    /// (ADE20K's layout; or train/val), class names in DIR/labels.txt or DIR/id2label.json.
    #[arg(long)]
    data: PathBuf,
    /// What to train.
    #[arg(long, value_enum, default_value_t = TaskKind::ImageClassification)]
    task: TaskKind,
    /// Semantic segmentation: reduce every mask's labels (0 becomes 255, ignored; other ids go down by one), as
    /// BeitImageProcessor's do_reduce_labels for ADE20K.
    #[arg(long)]
    reduce_labels: bool,
    /// Semantic segmentation: the auxiliary FCN head's weight in the loss [default: the config's, 0.4].
    #[arg(long)]
    aux_loss_weight: Option<f64>,
    #[command(flatten)]
    common: CommonTrainArgs,
    /// Layer-wise learning-rate decay (0.65 for base, 0.75 for large; 1 turns it off).
    #[arg(long, default_value_t = TrainOptions::default().layer_decay)]
    layer_decay: f64,
    #[arg(long, default_value_t = TrainOptions::default().label_smoothing)]
    label_smoothing: f64,
    /// Gradient accumulation: optimizer steps every N batches.
    #[arg(long, default_value_t = TrainOptions::default().accum_steps)]
    accum_steps: usize,
}

/// The epoch's summary line.
fn summary(m: &EpochMetrics) -> String {
    let t = &m.task;
    let pct = |v: Option<f64>| v.map(|x| format!("{:.2}%", x * 100.0)).unwrap_or_else(|| "-".into());
    format!(
        "epoch {:3}  train loss {:.4}  val loss {}  top-1 {}  top-5 {}  lr {:.2e}  {:.1} images/s  {:.1} s",
        m.epoch,
        t.train_loss,
        t.val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
        pct(t.top1),
        pct(t.top5),
        m.lr,
        m.images_per_sec,
        m.seconds
    )
}

/// Loss (left) and accuracy (right) curves per epoch.
fn plot_curves(path: &Path, history: &[EpochMetrics]) -> Result<()> {
    let max_loss =
        history.iter().flat_map(|h| [Some(h.task.train_loss), h.task.val_loss]).flatten().fold(0.1f64, f64::max);
    let e = |h: &EpochMetrics| h.epoch as f64;
    let series = |label, color, value: fn(&EpochMetrics) -> Option<f64>| Series {
        label,
        color,
        points: history.iter().filter_map(|h| value(h).map(|v| (e(h), v))).collect(),
    };
    let loss = Panel {
        caption: "loss",
        y_max: max_loss * 1.05,
        series: vec![series("train", BLUE, |h| Some(h.task.train_loss)), series("val", RED, |h| h.task.val_loss)],
    };
    let accuracy = Panel {
        caption: "validation accuracy",
        y_max: 1.0,
        series: vec![series("top-1", BLUE, |h| h.task.top1), series("top-5", GREEN, |h| h.task.top5)],
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

/// A segmentation epoch's summary line.
fn seg_summary(m: &SegEpochMetrics) -> String {
    let t = &m.task;
    let pct = |v: Option<f64>| v.map(|x| format!("{:.2}%", x * 100.0)).unwrap_or_else(|| "-".into());
    format!(
        "epoch {:3}  train loss {:.4}  val loss {}  mIoU {}  mAcc {}  aAcc {}  lr {:.2e}  {:.1} images/s  {:.1} s",
        m.epoch,
        t.train_loss,
        t.val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
        pct(t.mean_iou),
        pct(t.mean_accuracy),
        pct(t.overall_accuracy),
        m.lr,
        m.images_per_sec,
        m.seconds
    )
}

/// Segmentation's loss (left) and validation mIoU and accuracies (right) per epoch.
fn plot_seg_curves(path: &Path, history: &[SegEpochMetrics]) -> Result<()> {
    let max_loss = history
        .iter()
        .flat_map(|h| [Some(h.task.train_loss), h.task.val_loss])
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.1f64, f64::max);
    let e = |h: &SegEpochMetrics| h.epoch as f64;
    let series = |label, color, value: fn(&SegEpochMetrics) -> Option<f64>| Series {
        label,
        color,
        points: history.iter().filter_map(|h| value(h).filter(|v| v.is_finite()).map(|v| (e(h), v))).collect(),
    };
    let loss = Panel {
        caption: "loss",
        y_max: max_loss * 1.05,
        series: vec![series("train", BLUE, |h| Some(h.task.train_loss)), series("val", RED, |h| h.task.val_loss)],
    };
    let scores = Panel {
        caption: "validation",
        y_max: 1.0,
        series: vec![
            series("mIoU", BLUE, |h| h.task.mean_iou),
            series("mAcc", GREEN, |h| h.task.mean_accuracy),
            series("aAcc", MAGENTA, |h| h.task.overall_accuracy),
        ],
    };
    plot_epochs(path, history.len(), &[loss, scores])
}

fn run_segmentation(a: TrainArgs) -> Result<()> {
    let c = &a.common;
    if c.val_split.is_some() {
        bail!("--val-split is for image classification; segmentation data brings its validation images (images/validation)");
    }
    let d = SegOptions::default();
    let opts = SegOptions {
        run: c.run_options(d.run.clone())?,
        layer_decay: a.layer_decay,
        auxiliary_loss_weight: a.aux_loss_weight,
        reduce_labels: a.reduce_labels,
        accum_steps: a.accum_steps,
        ..d
    };
    if opts.accum_steps == 0 {
        bail!("--accum-steps must be positive");
    }
    let mut trainer = SegTrainer::new(source(&a.model)?, &a.data, &c.out, opts, c.resume)?;
    let d = &trainer.task.data;
    let size = trainer.core.image_size;
    eprintln!(
        "{} classes, {} training and {} validation images; crops {size}x{size}; {} parameters; resuming after epoch {}",
        trainer.core.config.num_labels(),
        d.train.images.len(),
        d.val.images.len(),
        parameter_count(&trainer.core.weights),
        trainer.completed_epochs()
    );
    let mut obs = Observer::new(c.out.join("metrics.png"), seg_summary, plot_seg_curves);
    let history = trainer.run(&c.out, c.stop_after, &mut obs)?;
    if let Some(best) = history.iter().filter_map(|h| h.task.mean_iou).reduce(f64::max) {
        eprintln!(
            "best mIoU {:.2}%; checkpoints in {}/best and {}/last",
            best * 100.0,
            c.out.display(),
            c.out.display()
        );
    }
    Ok(())
}

pub fn run(a: TrainArgs) -> Result<()> {
    if a.task == TaskKind::SemanticSegmentation {
        return run_segmentation(a);
    }
    let c = &a.common;
    let d = TrainOptions::default();
    let opts = TrainOptions {
        run: c.run_options(d.run)?,
        layer_decay: a.layer_decay,
        label_smoothing: a.label_smoothing,
        accum_steps: a.accum_steps,
    };
    if opts.accum_steps == 0 {
        bail!("--accum-steps must be positive");
    }
    let mut trainer = Trainer::new(source(&a.model)?, &a.data, &c.out, opts, c.resume)?;
    let d = &trainer.task.data;
    eprintln!(
        "{} classes, {} training and {} validation images; {} parameters; resuming after epoch {}",
        d.classes.len(),
        d.train.images.len(),
        d.val.images.len(),
        parameter_count(&trainer.core.weights),
        trainer.completed_epochs()
    );
    let mut obs = Observer::new(c.out.join("metrics.png"), summary, plot_curves);
    let history = trainer.run(&c.out, c.stop_after, &mut obs)?;
    if let Some(best) = history.iter().filter_map(|h| h.task.top1).reduce(f64::max) {
        eprintln!(
            "best top-1 {:.2}%; checkpoints in {}/best and {}/last",
            best * 100.0,
            c.out.display(),
            c.out.display()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image folder: DIR/val/<class>/* (or DIR/<class>/*). Semantic segmentation: the training data's layout;
    /// its validation images are evaluated.
    #[arg(long)]
    data: PathBuf,
    /// What the model does.
    #[arg(long, value_enum, default_value_t = TaskKind::ImageClassification)]
    task: TaskKind,
    /// Semantic segmentation: reduce the masks' labels as the model was trained; on by default when the model's
    /// preprocessor_config.json has do_reduce_labels (`beit train --reduce-labels` writes it).
    #[arg(long)]
    reduce_labels: bool,
    /// Semantic segmentation: also write the numbers (mIoU, mAcc, aAcc, per-class IoU and accuracy) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
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

/// The checkpoint directory of `spec`: a directory or a Hub id.
fn checkpoint_dir(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let hub = beit::hub::resolve_model(spec, &beit::hub::HubOptions::from_env())
        .with_context(|| format!("{spec:?} is not a checkpoint directory"))?;
    Ok(hub.dir)
}

fn eval_segmentation(a: EvalArgs) -> Result<()> {
    let dir = checkpoint_dir(&a.model.model)?;
    // Loaded as training evaluates, so the numbers equal the run's metrics.jsonl.
    let (model, config) = segmentation::load_for_eval(&dir)?;
    let processor = processor_for(&dir)?;
    // As transformers' BeitImageProcessor.from_pretrained would: the model's own do_reduce_labels.
    let data = SegDataset::load(&a.data, a.reduce_labels || processor.do_reduce_labels)?;
    for (p, why) in &data.skipped {
        eprintln!("warning: skipped {}: {why}", p.display());
    }
    if data.val.images.is_empty() {
        bail!("{}: no validation images (images/validation or images/val)", a.data.display());
    }
    let ignore = config.semantic_loss_ignore_index;
    data.check(config.num_labels(), ignore)?;
    let n = config.num_labels();
    let e = segmentation::evaluate(&model, &data.val, n, ignore as u32, &processor, &candle_core::Device::Cpu)?;
    let m = &e.metrics;
    let names: Vec<String> =
        (0..n).map(|i| config.id2label.get(&i).cloned().unwrap_or_else(|| i.to_string())).collect();
    let w = names.iter().map(|n| n.len()).max().unwrap_or(5).max(5);
    let pct = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{:.2}%", v * 100.0) };
    println!("{:<w$}  {:>8}  {:>8}", "class", "IoU", "accuracy");
    for ((name, iou), acc) in names.iter().zip(&m.per_category_iou).zip(&m.per_category_accuracy) {
        println!("{name:<w$}  {:>8}  {:>8}", pct(*iou), pct(*acc));
    }
    println!(
        "{} images: mIoU {}  mAcc {}  aAcc {}  loss {:.4}",
        e.count,
        pct(m.mean_iou),
        pct(m.mean_accuracy),
        pct(m.overall_accuracy),
        e.loss
    );
    if let Some(path) = &a.json {
        let mut v = serde_json::to_value(&e)?;
        v["classes"] = serde_json::json!(names);
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if a.task == TaskKind::SemanticSegmentation {
        return eval_segmentation(a);
    }
    let pipe = a.model.pipeline()?;
    let AnyBeitModel::ImageClassification(model) = &pipe.pretrained.model else {
        bail!("{} is not an image-classification checkpoint", a.model.model);
    };
    // A parquet dataset names its validation split itself (data/validation-*.parquet, or test-*).
    let parquet = beit::train::parquet::is_parquet_dataset(&a.data);
    let dir = if !parquet && a.data.join("val").is_dir() { a.data.join("val") } else { a.data.clone() };
    let folder = ImageFolder::load(&dir, a.val_split, a.seed)?;
    let use_val = a.val_split.is_some() || (parquet && !folder.val.images.is_empty());
    let split = if use_val { &folder.val } else { &folder.train };
    for (p, why) in &folder.skipped {
        eprintln!("warning: skipped {}: {why}", p.display());
    }
    let labels = &pipe.pretrained.config.id2label;
    let names: Vec<String> = labels.values().cloned().collect();
    if names != folder.classes {
        bail!("the data's classes {:?} differ from the model's labels {:?}", folder.classes, names);
    }
    let processor = processor_for(&pipe.model_dir)?;
    let e = evaluate(
        model,
        &split.images,
        &split.labels,
        names.len(),
        &processor,
        a.batch_size,
        &candle_core::Device::Cpu,
    )?;
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
