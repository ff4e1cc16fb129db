//! `beit mim`: the visual tokens a masked-image-modeling checkpoint predicts for masked patches.

use std::path::PathBuf;

use anyhow::Result;
use beit::processor::load_image_with_limit;
use clap::Args;

use crate::common::{ImageArgs, ModelArgs};

#[derive(Args)]
pub struct MimArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    limits: ImageArgs,
    image: PathBuf,
    /// Share of patches to mask.
    #[arg(long, default_value_t = 0.4)]
    mask_ratio: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

pub fn run(a: MimArgs) -> Result<()> {
    let pipe = a.model.pipeline()?;
    let image = load_image_with_limit(&a.image, Some(a.limits.max_image_pixels))?;
    let pred = pipe.mim(&image, a.mask_ratio, a.seed)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&pred)?);
    } else {
        println!("{} of {} patches masked ({}x{} grid)", pred.masked.len(), pred.grid.0 * pred.grid.1, pred.grid.0, pred.grid.1);
        for ((patch, token), score) in pred.masked.iter().zip(&pred.tokens).zip(&pred.scores) {
            println!("patch {patch:4} (row {}, col {}): token {token} ({score:.4})", patch / pred.grid.1, patch % pred.grid.1);
        }
    }
    Ok(())
}
