//! What every model-taking command shares: `--model` (directory, weights file or Hub id), image collection,
//! batching with a progress bar, and per-image failure reporting.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use beit::checkpoint::WeightsFormat;
use beit::hub::HubOptions;
use beit::pipeline::{Pipeline, Prepared};
use beit::processor::loader::{load_ordered, ImageSource, LoaderOptions};
use beit::{InferenceDtype, LoadOptions};
use clap::Args;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A model directory, a single weights file (beside its config.json), or a Hub repo id.
    #[arg(long)]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Force a weights format when the directory has several: safetensors, bin or msgpack.
    #[arg(long)]
    pub weights_format: Option<String>,

    /// The checkpoint is timm's beit/beitv2 model NAME (e.g. beit_base_patch16_224.in22k_ft_in22k_in1k): its
    /// config comes from the name, so it needs no config.json (timm's own config.json is recognized without it).
    #[arg(long, value_name = "NAME")]
    pub timm_model: Option<String>,

    /// Number format of the encoder's matrix multiplies: f32 (transformers' outputs to 1e-4), int8 (dynamic
    /// quantization as onnxruntime's quantize_dynamic: about 3x faster on CPUs with AVX-512 VNNI; logits move,
    /// by at most 0.08 on models/beit-digits, whose top-1 is unchanged) or bf16 (bf16 weights and activations,
    /// f32 accumulation, LayerNorm, softmax, GELU and residual in f32; fast on CPUs with AVX512_BF16).
    #[arg(long, default_value = "f32", value_parser = ["f32", "int8", "bf16"])]
    pub dtype: String,
}

/// Options of the commands that decode image files.
#[derive(Args, Clone)]
pub struct ImageArgs {
    /// Refuse images with more pixels than this, from their header, before decoding (Pillow's
    /// decompression-bomb limit by default).
    #[arg(long, default_value_t = beit::processor::PIL_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            weights_format: self.weights_format.as_deref().map(WeightsFormat::from_name).transpose()?,
            timm_model: self.timm_model.clone(),
            inference: Some(match self.dtype.as_str() {
                "int8" => InferenceDtype::Int8,
                "bf16" => InferenceDtype::Bf16,
                _ => InferenceDtype::F32,
            }),
            hub: Some(self.hub()),
            ..Default::default()
        })
    }

    pub fn hub(&self) -> HubOptions {
        HubOptions { revision: self.revision.clone(), ..HubOptions::from_env() }
    }

    pub fn pipeline(&self) -> Result<Pipeline> {
        Ok(Pipeline::from_pretrained(&self.model, &self.load_options()?)?)
    }
}

use beit::train::data::IMAGE_EXTENSIONS;

/// The given files, the image files inside given directories (sorted, recursively), and every row's image of the
/// given parquet datasets (a Hugging Face dataset directory or one .parquet file), named "FILE row N".
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<ImageSource>> {
    let mut out = Vec::new();
    for p in inputs {
        if beit::train::parquet::is_parquet_dataset(p) {
            let (sources, skipped) = beit::train::parquet::image_sources(p)?;
            for (row, why) in skipped {
                tracing::warn!("{row}: skipped: {why}");
            }
            if sources.is_empty() {
                tracing::warn!("{}: no images found", p.display());
            }
            out.extend(sources);
        } else if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found).with_context(|| format!("reading directory {}", p.display()))?;
            found.sort();
            if found.is_empty() {
                tracing::warn!("{}: no image files found", p.display());
            }
            out.extend(found.into_iter().map(ImageSource::Path));
        } else {
            out.push(ImageSource::Path(p.clone()));
        }
    }
    if out.is_empty() {
        anyhow::bail!("no images given");
    }
    Ok(out)
}

/// A file name for what is written about an image: its file stem, or `FILE_rowN` for a parquet row.
pub fn output_stem(name: &str) -> String {
    if let Some((file, row)) = name.rsplit_once(" row ") {
        if file.ends_with(".parquet") && row.parse::<usize>().is_ok() {
            let stem = Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or("image");
            return format!("{stem}_row{row}");
        }
    }
    Path::new(name).file_stem().and_then(|s| s.to_str()).unwrap_or("image").to_string()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Runs `f` on batches of images, in order, while worker threads decode the next ones and run `prepare` on each
/// (the processor's resize and normalize, so that they overlap the model; a queue of two batches). An image that
/// fails to load, or a batch that fails, is reported for its images and the others go on. Returns how many images
/// failed.
pub fn for_each_batch<T, P, F>(
    sources: Vec<ImageSource>,
    batch_size: usize,
    max_pixels: u64,
    prepare: P,
    mut f: F,
) -> usize
where
    T: Send + 'static,
    P: Fn(RgbImage) -> beit::processor::Result<T> + Send + Sync + 'static,
    F: FnMut(&[String], &[T]) -> Result<()>,
{
    let names: Vec<String> = sources.iter().map(ImageSource::name).collect();
    let bar = if names.len() > 4 {
        let b = ProgressBar::new(names.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut failed = 0;
    let batch_size = batch_size.max(1);
    let options = LoaderOptions { workers: 0, queue: 2 * batch_size, max_pixels: Some(max_pixels) };
    let mut loaded = load_ordered(sources, &options, prepare);
    for chunk in names.chunks(batch_size) {
        let mut ok_paths = Vec::with_capacity(chunk.len());
        let mut images = Vec::with_capacity(chunk.len());
        for (p, (_, result)) in chunk.iter().zip(loaded.by_ref()) {
            match result {
                Ok(img) => {
                    ok_paths.push(p.clone());
                    images.push(img);
                }
                Err(e) => {
                    failed += 1;
                    bar.suspend(|| eprintln!("error: {e}"));
                }
            }
        }
        if !images.is_empty() {
            if let Err(e) = f(&ok_paths, &images) {
                failed += ok_paths.len();
                bar.suspend(|| eprintln!("error: {e:#}"));
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    failed
}

/// [`for_each_batch`] with the pipeline's processor run on the loading threads.
pub fn for_each_prepared<F>(
    sources: Vec<ImageSource>,
    batch_size: usize,
    max_pixels: u64,
    pipe: &Pipeline,
    f: F,
) -> usize
where
    F: FnMut(&[String], &[Prepared]) -> Result<()>,
{
    let prepare = pipe.preparer();
    for_each_batch(sources, batch_size, max_pixels, move |i| prepare(&i), f)
}

/// The exit status of a command over many images: an error when any failed.
pub fn finish(failed: usize, total: usize) -> Result<()> {
    if failed > 0 {
        anyhow::bail!("{failed} of {total} images failed");
    }
    Ok(())
}
