//! `beit preprocess`: exactly what BeitImageProcessor produces, for parity checks.

use std::path::PathBuf;

use anyhow::{bail, Result};
use beit::npy::{write_npy_f32, write_npy_i64};
use beit::pipeline::processor_for;
use beit::processor::{load_image, load_segmentation_map};
use beit::BeitImageProcessor;
use clap::Args;

#[derive(Args)]
pub struct PreprocessArgs {
    /// A preprocessor_config.json, or a (model) directory holding one.
    #[arg(long)]
    processor: PathBuf,
    image: PathBuf,
    /// Pixel values: float32 NCHW .npy.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    segmentation_map: Option<PathBuf>,
    /// Labels for the segmentation map: int64 .npy.
    #[arg(long)]
    labels_out: Option<PathBuf>,
}

pub fn run(a: PreprocessArgs) -> Result<()> {
    let processor = if a.processor.is_file() {
        BeitImageProcessor::from_json_file(&a.processor)?
    } else {
        processor_for(&a.processor)?
    };
    let pv = processor.preprocess_rgb(&[load_image(&a.image)?])?;
    write_npy_f32(&a.out, &pv.shape, &pv.data)?;
    match (&a.segmentation_map, &a.labels_out) {
        (Some(map), Some(out)) => {
            let labels = processor.preprocess_segmentation_maps(&[load_segmentation_map(map)?])?;
            write_npy_i64(out, &labels.shape, &labels.data)?;
        }
        (None, None) => {}
        _ => bail!("--segmentation-map and --labels-out go together"),
    }
    Ok(())
}
