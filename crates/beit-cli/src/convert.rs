//! `beit convert`: any checkpoint beit-rs reads (.bin, msgpack, a Hub id) to config.json + model.safetensors.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use beit::Pretrained;
use clap::Args;

use crate::common::ModelArgs;

#[derive(Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory (Hugging Face layout).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    if a.model.dtype != "f32" {
        bail!("--dtype {}: convert writes the checkpoint's f32 weights; int8 and bf16 are for inference only", a.model.dtype);
    }
    let mut opts = a.model.load_options()?;
    // Saving needs the dense weights, which inference would release.
    opts.inference = None;
    let m = Pretrained::from_pretrained(&a.model.model, &opts)?;
    m.save(&a.out)?;
    let pre = m.model_dir.join("preprocessor_config.json");
    if pre.is_file() {
        std::fs::copy(&pre, a.out.join("preprocessor_config.json")).with_context(|| format!("copying {}", pre.display()))?;
    }
    eprintln!(
        "wrote {} ({}, {} tensors) from {}",
        a.out.display(),
        m.model.architecture().name(),
        m.weights.params().len(),
        m.weight_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
