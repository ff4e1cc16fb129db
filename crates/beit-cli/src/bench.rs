//! `beit bench`: forward-pass throughput on a seeded random pixel batch, with the numbers needed to compare
//! engines (images/s, peak RSS, load time) and to see how far the run is from the machine's sgemm ceiling.
//!
//! Threads: candle's matmul (the `gemm` crate) and its other parallel ops run on rayon's global pool, and candle
//! sizes its gemm parallelism from `RAYON_NUM_THREADS`. Both read the variable once, when first used, so
//! `run` sets it before anything builds a tensor; `main` touches neither rayon nor candle before dispatching.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use beit::config::Size2;
use beit::hub::resolve_model;
use beit::internals::Rng;
use beit::weights::Weights;
use beit::{
    load_pretrained, AnyBeitModel, Architecture, BeitConfig, ForwardOptions, Inference, InferenceDtype, InferencePath,
    LoadOptions, ModelInputs,
};
use candle_core::{Device, Tensor};
use clap::{ArgGroup, Args, ValueEnum};

use crate::common::ModelArgs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchDtype {
    F32,
    Int8,
    Bf16,
}

impl BenchDtype {
    fn name(self) -> &'static str {
        match self {
            BenchDtype::F32 => "f32",
            BenchDtype::Int8 => "int8",
            BenchDtype::Bf16 => "bf16",
        }
    }

    fn inference(self) -> InferenceDtype {
        match self {
            BenchDtype::F32 => InferenceDtype::F32,
            BenchDtype::Int8 => InferenceDtype::Int8,
            BenchDtype::Bf16 => InferenceDtype::Bf16,
        }
    }
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["model", "config"])))]
pub struct BenchArgs {
    /// A checkpoint (directory, weights file or Hub id), loaded as `beit classify` loads it; the load is timed
    /// on its own (load_s).
    #[arg(long)]
    model: Option<String>,
    /// Hub revision (branch, tag or commit), with --model.
    #[arg(long, default_value = "main", requires = "model")]
    revision: String,
    /// Force a weights format when the directory has several: safetensors, bin or msgpack (with --model).
    #[arg(long, requires = "model")]
    weights_format: Option<String>,
    /// Fresh random weights for a preset — base or large (the config.json of microsoft/beit-{base,large}-patch16-224:
    /// BeitForImageClassification, 1000 labels), tiny or small (same head, DeiT sizes) — or a config.json.
    #[arg(long)]
    config: Option<String>,
    /// Class to build (default: config.json's `architectures`, BeitModel when it names none).
    #[arg(long)]
    architecture: Option<String>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    batch_size: usize,
    /// Square input size in pixels (default: the config's image_size). With --config the model is built at this
    /// size; with --model a different size runs with interpolate_pos_encoding.
    #[arg(long, value_parser = positive)]
    image_size: Option<usize>,
    #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
    dtype: BenchDtype,
    /// Run the encoder op by op through candle instead of the fused CPU encoder: the baseline the fused
    /// path is measured against.
    #[arg(long)]
    generic: bool,
    /// Untimed forward passes before the timed ones.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed forward passes; the median is reported.
    #[arg(long, default_value_t = 10, value_parser = positive)]
    runs: usize,
    /// Worker threads (sets RAYON_NUM_THREADS for this process). Default: RAYON_NUM_THREADS if set, otherwise
    /// the cores candle would use (the available physical cores).
    #[arg(long, value_parser = positive)]
    threads: Option<usize>,
    /// The machine's sgemm peak in GFLOP/s, for ceiling_share (340: MKL's measured 2048³ sgemm on 2 cores here).
    #[arg(long, default_value_t = 340.0)]
    ceiling_gflops: f64,
    /// Seed of the fresh weights and the pixel batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also time the path from files (image files or folders, with --model): the front end alone on one core
    /// (decode; decode + the model's processor) over the files read into memory, and the whole path as `beit
    /// classify` runs it (loading threads decoding and preparing, batches of --batch-size through the model).
    #[arg(long, num_args = 1..)]
    files: Vec<std::path::PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What `--files` measured: images per second.
struct FileTimes {
    images: usize,
    decode_per_core: f64,
    prepare_per_core: f64,
    whole: f64,
}

/// The front end on one thread over `paths` read into memory, then the whole path from disk (see `--files`).
fn time_files(
    paths: &[std::path::PathBuf],
    processor: &beit::BeitImageProcessor,
    model: &AnyBeitModel,
    inputs: &ModelInputs,
    batch_size: usize,
) -> Result<FileTimes> {
    use beit::processor::loader::{load_ordered, ImageSource, LoaderOptions};
    use beit::processor::{load_image_bytes, PIL_MAX_IMAGE_PIXELS};
    let files = crate::common::collect_images(paths)?;
    if files.is_empty() {
        bail!("--files: no images found");
    }
    let bytes: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|s| match s {
            ImageSource::Path(p) => {
                Ok((p.display().to_string(), std::fs::read(p).with_context(|| p.display().to_string())?))
            }
            ImageSource::Bytes { name, bytes } => Ok((name.clone(), bytes.clone())),
        })
        .collect::<Result<_>>()?;
    let n = bytes.len() as f64;
    let limit = Some(PIL_MAX_IMAGE_PIXELS);
    let t = Instant::now();
    for (name, b) in &bytes {
        load_image_bytes(b, limit, name)?;
    }
    let decode_per_core = n / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (name, b) in &bytes {
        processor.preprocess_image(&load_image_bytes(b, limit, name)?)?;
    }
    let prepare_per_core = n / t.elapsed().as_secs_f64();
    drop(bytes);
    // The whole path, as `beit classify` runs it: files from disk on the loading threads, batches to the model.
    let p = processor.clone();
    let t = Instant::now();
    let options = LoaderOptions { queue: 2 * batch_size, ..LoaderOptions::default() };
    let mut loaded = load_ordered(files.clone(), &options, move |i| p.preprocess_image(&i));
    let mut batch: Vec<f32> = Vec::new();
    let mut count = 0usize;
    let mut shape = [0usize; 3];
    let run = |batch: &mut Vec<f32>, count: &mut usize, shape: [usize; 3]| -> Result<()> {
        if *count > 0 {
            let x = Tensor::from_vec(std::mem::take(batch), (*count, shape[0], shape[1], shape[2]), &Device::Cpu)?;
            model.forward_named(&x, inputs).context("forward pass over --files")?;
            *count = 0;
        }
        Ok(())
    };
    for (name, r) in loaded.by_ref() {
        let (values, s) = r.with_context(|| name.clone())?;
        shape = s;
        batch.extend(values);
        count += 1;
        if count == batch_size {
            run(&mut batch, &mut count, shape)?;
        }
    }
    run(&mut batch, &mut count, shape)?;
    Ok(FileTimes { images: files.len(), decode_per_core, prepare_per_core, whole: n / t.elapsed().as_secs_f64() })
}

fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1, found 0".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a positive integer, found {s:?}")),
    }
}

/// The config.json of microsoft/beit-base-patch16-224 (and -large-): the training preset of that size as a
/// fine-tuned ImageNet-1k classifier with mean pooling and drop path 0.1. The label names are placeholders (only
/// their count matters for speed).
pub fn microsoft_config(name: &str) -> Result<BeitConfig> {
    if !matches!(name, "base" | "large") {
        bail!("--config: unknown preset {name:?}; expected base, large, tiny, small or a config.json file");
    }
    Ok(BeitConfig {
        use_mean_pooling: true,
        drop_path_rate: 0.1,
        id2label: (0..1000).map(|i| (i, format!("LABEL_{i}"))).collect(),
        architectures: Some(vec![Architecture::BeitForImageClassification.name().to_string()]),
        ..beit::train::preset(name)?
    })
}

/// `--config`: a preset name or a config.json path (a path that exists wins over a preset of the same name).
fn bench_config(spec: &str) -> Result<BeitConfig> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(BeitConfig::from_file(path)?);
    }
    match spec {
        "base" | "large" => microsoft_config(spec),
        "tiny" | "small" => {
            let mut c = beit::train::preset(spec)?;
            c.id2label = (0..1000).map(|i| (i, format!("LABEL_{i}"))).collect();
            c.architectures = Some(vec![Architecture::BeitForImageClassification.name().to_string()]);
            Ok(c)
        }
        _ if spec.ends_with(".json") || spec.contains('/') => {
            bail!("--config: {spec:?} is not a file (expected a preset: base, large, tiny, small, or a config.json)")
        }
        _ => bail!("--config: unknown preset {spec:?}; expected base, large, tiny, small or a config.json file"),
    }
}

/// Forward-pass cost of one image in GFLOP (multiply-adds count 2): per layer the four d×d projections and the
/// two MLP matmuls over every token, plus QKᵀ and AV; the patch embedding; the classifier when there is one.
/// Norms, softmax, GELU and the segmentation decoders are not counted.
pub fn gflop_per_image(c: &BeitConfig, height: usize, width: usize, arch: Architecture) -> f64 {
    let patches = ((height / c.patch_size.height) * (width / c.patch_size.width)) as f64;
    let tokens = patches + 1.0;
    let (d, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let layer = 2.0 * tokens * (4.0 * d * d + 2.0 * d * i) + 2.0 * 2.0 * tokens * tokens * d;
    let patch_embed = 2.0 * patches * (c.num_channels * c.patch_size.height * c.patch_size.width) as f64 * d;
    let head = match arch {
        Architecture::BeitForImageClassification | Architecture::Data2VecVisionForImageClassification => {
            2.0 * d * c.num_labels() as f64
        }
        _ => 0.0,
    };
    (c.num_hidden_layers as f64 * layer + patch_embed + head) / 1e9
}

/// Peak resident set size of this process in MB (VmHWM), where /proc provides it.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    // Before any tensor exists: rayon's pool and candle's gemm read RAYON_NUM_THREADS once (see the module doc).
    match a.threads {
        Some(n) => std::env::set_var("RAYON_NUM_THREADS", n.to_string()),
        None if std::env::var("RAYON_NUM_THREADS").is_err() => {
            // Pin the pool to the count candle's gemm uses, so "threads" means one number for every op.
            std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string())
        }
        None => {}
    }
    let threads = candle_core::utils::get_num_threads();
    if !(a.ceiling_gflops.is_finite() && a.ceiling_gflops > 0.0) {
        bail!("--ceiling-gflops: must be a positive number, found {}", a.ceiling_gflops);
    }
    if !a.files.is_empty() && a.model.is_none() {
        bail!("--files needs --model: a checkpoint whose image processor prepares the files");
    }
    let device = Device::Cpu;
    let architecture = a.architecture.as_deref().map(Architecture::from_name).transpose()?;

    let path = if a.generic { InferencePath::Generic } else { InferencePath::Fused };
    let start = Instant::now();
    let (model, source, spec) = match (&a.model, &a.config) {
        (Some(spec), _) => {
            let args = ModelArgs {
                model: spec.clone(),
                revision: a.revision.clone(),
                weights_format: a.weights_format.clone(),
                timm_model: None,
                dtype: a.dtype.name().into(),
            };
            let loc = resolve_model(spec, &args.hub())?;
            let opts = LoadOptions {
                architecture,
                weights_file: loc.weights_file.clone(),
                inference_path: path,
                ..args.load_options()?
            };
            let loaded = load_pretrained(&loc.dir, &opts, &device).with_context(|| spec.clone())?;
            (loaded.model, "checkpoint", spec.clone())
        }
        (None, Some(spec)) => {
            let mut config = bench_config(spec)?;
            if let Some(s) = a.image_size {
                config.image_size = Size2::square(s);
            }
            config.validate().with_context(|| format!("--config {spec}"))?;
            let arch = match architecture {
                Some(arch) => arch,
                None => Architecture::from_config(&config)?,
            };
            let weights = Weights::fresh(&device, a.seed);
            let mut model = AnyBeitModel::load(&weights, &config, arch)?;
            // As load_pretrained does for inference: the weights held once, packed or quantized.
            weights.release();
            model.prepare_inference(Inference { dtype: a.dtype.inference(), path })?;
            (model, "fresh", spec.clone())
        }
        // clap's "source" group requires one of the two.
        (None, None) => bail!("expected --model or --config"),
    };
    let load_s = start.elapsed().as_secs_f64();

    let config = model.config().clone();
    let size = a.image_size.unwrap_or(config.image_size.height);
    let (height, width) = match a.image_size {
        Some(s) => (s, s),
        None => (config.image_size.height, config.image_size.width),
    };
    if height < config.patch_size.height || width < config.patch_size.width {
        bail!(
            "--image-size: {size} is smaller than the model's patch_size {}x{}",
            config.patch_size.height,
            config.patch_size.width
        );
    }
    let interpolate = (height, width) != (config.image_size.height, config.image_size.width);
    let shape = [a.batch_size, config.num_channels, height, width];
    let numel: usize = shape.iter().product();
    let mut rng = Rng::new(a.seed ^ 0x5049_5845_4c53); // a stream of its own, apart from the weights'
    let pixels: Vec<f32> = (0..numel).map(|_| rng.normal() as f32).collect();
    let x = Tensor::from_vec(pixels, shape.to_vec(), &device)?;
    let inputs = ModelInputs {
        options: ForwardOptions { interpolate_pos_encoding: interpolate, ..Default::default() },
        labels: None,
    };

    for _ in 0..a.warmup {
        model.forward_named(&x, &inputs).context("warm-up forward pass")?;
    }
    let mut times = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        let t = Instant::now();
        let out = model.forward_named(&x, &inputs).context("timed forward pass")?;
        times.push(t.elapsed().as_secs_f64());
        drop(out);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let batch = a.batch_size as f64;
    let med = median(&sorted);
    let (fastest, slowest) = (sorted[0], sorted[sorted.len() - 1]);
    let images_per_s = batch / med;
    let arch = model.architecture();
    let gflop = gflop_per_image(&config, height, width, arch);
    let ceiling_share = images_per_s * gflop / a.ceiling_gflops;
    let rss = peak_rss_mb();
    let files = match (&a.files[..], &a.model) {
        ([], _) | (_, None) => None,
        (paths, Some(spec)) => {
            let dir = resolve_model(spec, &beit::hub::HubOptions::from_env())?.dir;
            let processor = beit::pipeline::processor_for(&dir)?;
            Some(time_files(paths, &processor, &model, &inputs, a.batch_size)?)
        }
    };

    if a.json {
        let out = serde_json::json!({
            "images_per_s": images_per_s,
            "images_per_s_min": batch / slowest,
            "images_per_s_max": batch / fastest,
            "ms_per_batch": med * 1e3,
            "peak_rss_mb": rss,
            "load_s": load_s,
            "batch_size": a.batch_size,
            "image_size": size,
            "dtype": a.dtype.name(),
            "path": if a.generic { "generic" } else { "fused" },
            "threads": threads,
            "gflop_per_image": gflop,
            "ceiling_share": ceiling_share,
            "ceiling_gflops": a.ceiling_gflops,
            "architecture": arch.name(),
            "source": source,
            "model": spec,
            "warmup": a.warmup,
            "runs": a.runs,
            "times_s": times,
            "files": files.as_ref().map(|f| serde_json::json!({
                "images": f.images,
                "decode_per_core_images_per_s": f.decode_per_core,
                "decode_prepare_per_core_images_per_s": f.prepare_per_core,
                "whole_path_images_per_s": f.whole,
                "whole_path_share_of_model": f.whole / images_per_s,
            })),
        });
        println!("{out}");
    } else {
        let what = if source == "fresh" { format!("--config {spec}, fresh weights") } else { spec };
        println!(
            "beit bench: {} ({what}), {}{}, batch {}, {height}x{width}, {threads} threads",
            arch.name(),
            a.dtype.name(),
            if a.generic { " generic" } else { "" },
            a.batch_size
        );
        println!(
            "{} {load_s:.2} s; {} warm-up + {} timed runs",
            if source == "fresh" { "build" } else { "load" },
            a.warmup,
            a.runs
        );
        println!(
            "{images_per_s:.2} images/s median (min {:.2}, max {:.2}); {:.1} ms per batch",
            batch / slowest,
            batch / fastest,
            med * 1e3
        );
        let rss = rss.map_or("unknown".to_string(), |r| format!("{r:.0} MB"));
        println!(
            "peak RSS {rss}; {gflop:.3} GFLOP per image; {:.1}% of the {} GFLOP/s sgemm ceiling",
            ceiling_share * 100.0,
            a.ceiling_gflops
        );
        if let Some(f) = &files {
            println!(
                "{} files: decode {:.1} images/s per core, decode + processor {:.1} per core; whole path {:.2} images/s \
                 ({:.0}% of the model's)",
                f.images,
                f.decode_per_core,
                f.prepare_per_core,
                f.whole,
                f.whole / images_per_s * 100.0
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_costs_35_gflop() {
        // FACTS.md: 12 layers x 2.91 GFLOP + the patch embedding, about 35.1 GFLOP at 224x224.
        let c = microsoft_config("base").unwrap();
        let g = gflop_per_image(&c, 224, 224, Architecture::BeitForImageClassification);
        assert!((g - 35.13).abs() < 0.05, "{g}");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), 3.0);
    }
}
