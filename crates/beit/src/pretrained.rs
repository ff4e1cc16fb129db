//! from_pretrained: a model directory in the Hugging Face layout (config.json plus weights) to a ready model.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::checkpoint::{align_prefix, find_weight_files, load_tensors, WeightsFormat};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::{AnyBeitModel, Architecture};
use crate::weights::{LoadReport, Weights};

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Build this class instead of the one config.json's `architectures` names.
    pub architecture: Option<Architecture>,
    pub weights_format: Option<WeightsFormat>,
}

pub struct Pretrained {
    pub model: AnyBeitModel,
    pub config: BeitConfig,
    pub report: LoadReport,
    pub weight_files: Vec<PathBuf>,
}

pub fn load_pretrained(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Pretrained> {
    if !dir.is_dir() {
        return Err(BeitError::checkpoint(dir, "not a directory (expected config.json and model weights)"));
    }
    let config = BeitConfig::from_file(&dir.join("config.json"))?;
    let arch = match opts.architecture {
        Some(a) => a,
        None => Architecture::from_config(&config)?,
    };
    let (format, files) = find_weight_files(dir, opts.weights_format)?;
    let tensors = load_tensors(format, &files, device)?;
    let tensors = align_prefix(tensors, "beit", arch.has_base_prefix());
    let source = files.first().cloned().unwrap_or_else(|| dir.to_path_buf());
    let weights = Weights::new(tensors, source, device);
    let model = AnyBeitModel::load(&weights, &config, arch)?;
    let report = weights.report();
    for name in &report.newly_initialized {
        tracing::warn!("{name} was not in the checkpoint and is newly initialized");
    }
    if !report.unused.is_empty() {
        tracing::info!("{} checkpoint tensors are unused by {}: {:?}", report.unused.len(), arch.name(), report.unused);
    }
    Ok(Pretrained { model, config, report, weight_files: files })
}
