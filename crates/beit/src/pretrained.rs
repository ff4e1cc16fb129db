//! from_pretrained: a model directory in the Hugging Face layout (config.json plus weights) to a ready model.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::checkpoint::{align_prefix, find_weight_files, load_tensors, weights_file, WeightsFormat};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::{AnyBeitModel, Architecture};
use crate::weights::{LoadReport, Weights};

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Build this class instead of the one config.json's `architectures` names.
    pub architecture: Option<Architecture>,
    pub weights_format: Option<WeightsFormat>,
    /// One weights file to load instead of searching the directory.
    pub weights_file: Option<PathBuf>,
}

pub struct Pretrained {
    pub model: AnyBeitModel,
    pub config: BeitConfig,
    pub report: LoadReport,
    pub weight_files: Vec<PathBuf>,
    pub weights: Weights,
}

impl Pretrained {
    /// save_pretrained: config.json and model.safetensors with transformers' names for this class.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_pretrained(dir, &self.config, self.model.architecture(), &self.weights.params())
    }
}

/// Writes `dir/config.json` (architectures set to `arch`) and `dir/model.safetensors`, each through a temporary
/// file and a rename, so that a reader never sees half a file.
pub fn save_pretrained(dir: &Path, config: &BeitConfig, arch: Architecture, params: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| BeitError::io(dir, e))?;
    let mut config = config.clone();
    config.architectures = Some(vec![arch.name().to_string()]);
    let tensors: HashMap<String, Tensor> =
        params.iter().map(|(name, t)| Ok((name.clone(), t.contiguous()?))).collect::<Result<_>>()?;
    let weights = dir.join("model.safetensors");
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| BeitError::checkpoint(&tmp, e.to_string()))?;
    let mut metadata_fixed = std::fs::read(&tmp).map_err(|e| BeitError::io(&tmp, e))?;
    add_pt_format_metadata(&mut metadata_fixed);
    std::fs::write(&tmp, metadata_fixed).map_err(|e| BeitError::io(&tmp, e))?;
    std::fs::rename(&tmp, &weights).map_err(|e| BeitError::io(&weights, e))?;
    let cfg = dir.join("config.json");
    let tmp = dir.join(".config.json.tmp");
    config.save(&tmp)?;
    std::fs::rename(&tmp, &cfg).map_err(|e| BeitError::io(&cfg, e))
}

/// transformers reads `{"format": "pt"}` from a safetensors header and warns without it; candle writes none.
/// The header is JSON after an 8-byte length: add the key and fix the length.
fn add_pt_format_metadata(bytes: &mut Vec<u8>) {
    let Some(len) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize) else {
        return;
    };
    let Some(Ok(mut header)) = bytes.get(8..8 + len).map(serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>)
    else {
        return;
    };
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let Ok(mut text) = serde_json::to_vec(&header) else { return };
    // Data offsets are relative to the end of the header; keep 8-byte alignment with trailing spaces.
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    *bytes = out;
}

pub fn load_pretrained(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Pretrained> {
    if !dir.is_dir() {
        return Err(BeitError::checkpoint(dir, "not a directory (expected config.json and model weights)"));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(BeitError::checkpoint(&config_path, "missing: a model directory needs config.json beside its weights"));
    }
    let config = BeitConfig::from_file(&config_path)?;
    let arch = match opts.architecture {
        Some(a) => a,
        None => Architecture::from_config(&config)?,
    };
    let (format, files) = match &opts.weights_file {
        Some(f) => weights_file(f)?,
        None => find_weight_files(dir, opts.weights_format)?,
    };
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
    Ok(Pretrained { model, config, report, weight_files: files, weights })
}
