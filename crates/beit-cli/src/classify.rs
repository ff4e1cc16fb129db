//! `beit classify`: top-k labels with scores for each image.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::common::{collect_images, finish, for_each_prepared, ImageArgs, ModelArgs};

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    limits: ImageArgs,
    /// Image files or directories, or Hugging Face datasets stored as parquet (a dataset directory or one
    /// .parquet file: every row's image, named "FILE row N").
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// The image-classification pipeline's JSON: [{"label", "score"}] (a list of those for several images).
    #[arg(long)]
    json: bool,
}

pub fn run(a: ClassifyArgs) -> Result<()> {
    let pipe = a.model.pipeline()?;
    let sources = collect_images(&a.images)?;
    let total = sources.len();
    let mut results: Vec<serde_json::Value> = Vec::new();
    let failed = for_each_prepared(sources, a.batch_size, a.limits.max_image_pixels, &pipe, |batch_paths, images| {
        let preds = pipe.classify_prepared(images, a.top_k)?;
        for (p, pred) in batch_paths.iter().zip(preds) {
            if a.json {
                results.push(serde_json::to_value(&pred)?);
            } else {
                let best: Vec<String> = pred.iter().map(|q| format!("{} ({:.4})", q.label, q.score)).collect();
                println!("{p}: {}", best.join(", "));
            }
        }
        Ok(())
    });
    if a.json {
        let out = if total == 1 && results.len() == 1 { results.remove(0) } else { serde_json::Value::Array(results) };
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    finish(failed, total)
}
