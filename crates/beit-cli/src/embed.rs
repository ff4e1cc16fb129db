//! `beit embed`: pooled embeddings (or every token) for each image, as .npy or .safetensors.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use beit::npy::write_npy_f32;
use candle_core::Tensor;
use clap::Args;

use crate::common::{collect_images, finish, for_each_prepared, ImageArgs, ModelArgs};

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    limits: ImageArgs,
    /// Image files or directories, or Hugging Face datasets stored as parquet (a dataset directory or one
    /// .parquet file: every row's image, named "FILE row N").
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Output file: .npy (one array, images in order) or .safetensors (`embeddings` plus `images` order in metadata).
    #[arg(long)]
    out: PathBuf,
    /// Every token (1 + patches per image) instead of the pooled vector.
    #[arg(long)]
    tokens: bool,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or_default().to_string();
    if ext != "npy" && ext != "safetensors" {
        bail!("{}: the output must end in .npy or .safetensors", a.out.display());
    }
    let pipe = a.model.pipeline()?;
    let sources = collect_images(&a.images)?;
    let total = sources.len();
    let mut parts: Vec<Tensor> = Vec::new();
    let mut done: Vec<String> = Vec::new();
    let failed = for_each_prepared(sources, a.batch_size, a.limits.max_image_pixels, &pipe, |batch_paths, images| {
        parts.push(pipe.embed_prepared(images, a.tokens)?);
        done.extend(batch_paths.iter().cloned());
        Ok(())
    });
    if !parts.is_empty() {
        // Token counts differ between image sizes; the processor makes them equal for one model.
        let all = Tensor::cat(&parts, 0).context("joining the batches")?;
        if ext == "npy" {
            write_npy_f32(&a.out, all.dims(), &all.flatten_all()?.to_vec1::<f32>()?)?;
        } else {
            let map: HashMap<String, Tensor> = [("embeddings".to_string(), all)].into();
            candle_core::safetensors::save(&map, &a.out)?;
        }
        eprintln!("wrote {} embeddings to {} (images: {})", done.len(), a.out.display(), done.join(", "));
    }
    finish(failed, total)
}
