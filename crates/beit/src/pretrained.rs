//! from_pretrained: a model directory in the Hugging Face layout (config.json plus weights) to a ready model.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::checkpoint::{align_prefix, find_weight_files, load_tensors, rename_prefix, timm, weights_file, WeightsFormat};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::{
    AnyBeitModel, Architecture, BeitBackbone, BeitForImageClassification, BeitForMaskedImageModeling,
    BeitForSemanticSegmentation,
};
use crate::hub::{resolve_model, HubOptions};
use crate::model::BeitModel;
use crate::processor::BeitImageProcessor;
use crate::model::{Inference, InferencePath};
use crate::nn::InferenceDtype;
use crate::weights::{LoadReport, Weights};

/// How [`from_pretrained`](Pretrained::from_pretrained) loads: weights file or format, timm name, Hub settings, inference dtype.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Build this class instead of the one config.json's `architectures` names.
    pub architecture: Option<Architecture>,
    /// Read this format even when others are present.
    pub weights_format: Option<WeightsFormat>,
    /// One weights file to load instead of searching the directory.
    pub weights_file: Option<PathBuf>,
    /// The checkpoint is timm's beit/beitv2 named so (e.g. `beit_base_patch16_224.in22k_ft_in22k_in1k`): its
    /// config is derived from the name, and config.json may be absent.
    pub timm_model: Option<String>,
    /// Prepare the model for CPU inference after loading: the encoder's Linear weights packed once for the f32
    /// kernel (`F32`) or quantized (`Int8`, dynamic quantization), and the dense copies released so that the
    /// weights are held once. Such a model cannot be saved or trained. `None`: as loaded.
    pub inference: Option<InferenceDtype>,
    /// With `inference`: the fused CPU encoder (the default), or candle op by op (`Generic`: the baseline of
    /// performance comparisons).
    pub inference_path: InferencePath,
    /// Where a Hub repo id is looked up (cache, token, offline): `None` reads the environment as
    /// huggingface_hub does ([`HubOptions::from_env`]).
    pub hub: Option<HubOptions>,
    /// The Hub revision (branch, tag or commit) of a repo id, over the one in `hub` (default "main").
    pub revision: Option<String>,
}

impl LoadOptions {
    /// The Hub settings these options imply.
    pub fn hub_options(&self) -> HubOptions {
        let mut hub = self.hub.clone().unwrap_or_else(HubOptions::from_env);
        if let Some(r) = &self.revision {
            hub.revision = r.clone();
        }
        hub
    }
}

/// A loaded checkpoint: the model, its config, what was (not) found in the files, and the weights it holds.
pub struct Pretrained {
    /// The model, of the class `LoadOptions::architecture` or config.json's `architectures` names.
    pub model: AnyBeitModel,
    /// The model's config.
    pub config: BeitConfig,
    /// Tensors newly initialized (absent from the checkpoint) and tensors of the checkpoint left unused.
    pub report: LoadReport,
    /// The model directory (a Hub snapshot for repo ids): where preprocessor_config.json is looked for.
    pub model_dir: PathBuf,
    /// The weight files read.
    pub weight_files: Vec<PathBuf>,
    /// The model's parameters by name (what `save` writes).
    pub weights: Weights,
}

impl Pretrained {
    /// transformers' `from_pretrained` on the CPU: `spec` is a model directory, a single weights file beside its
    /// config.json, or a Hub repo id (resolved through the Python cache, see [`LoadOptions::hub`]).
    pub fn from_pretrained(spec: &str, options: &LoadOptions) -> Result<Self> {
        let loc = resolve_model(spec, &options.hub_options())?;
        let mut options = options.clone();
        if loc.weights_file.is_some() {
            options.weights_file = loc.weights_file;
        }
        load_pretrained(&loc.dir, &options, &Device::Cpu)
    }

    /// save_pretrained: config.json and model.safetensors with transformers' names for this class.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.weights.is_released() {
            return Err(BeitError::unsupported(
                "save",
                "this model was loaded for inference (LoadOptions::inference): its dense weights were \
                 released; load it without that option to save it",
            ));
        }
        save_pretrained(dir, &self.config, self.model.architecture(), &self.weights.params())
    }
}

/// Writes `dir/config.json` (architectures set to `arch`) and `dir/model.safetensors`, each through a temporary
/// file and a rename, so that a reader never sees half a file. A data2vec-vision config is written with its own
/// class names and the `data2vec_vision.` weight prefix, so that transformers loads it as it saved it.
pub fn save_pretrained(dir: &Path, config: &BeitConfig, arch: Architecture, params: &[(String, Tensor)]) -> Result<()> {
    let arch = arch.for_model_type(&config.model_type)?;
    std::fs::create_dir_all(dir).map_err(|e| BeitError::io(dir, e))?;
    let mut config = config.clone();
    config.architectures = Some(vec![arch.name().to_string()]);
    let tensors: HashMap<String, Tensor> =
        params.iter().map(|(name, t)| Ok((name.clone(), t.contiguous()?))).collect::<Result<_>>()?;
    let tensors = rename_prefix(tensors, "beit", config.base_model_prefix());
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

/// How the checkpoint's own tensor names relate to the ones the BEiT modules ask for, so that errors and the load
/// report speak of the tensors in the file.
enum Naming {
    Transformers,
    /// `data2vec_vision.` read as `beit.`.
    Data2Vec,
    /// timm's names (checkpoint/timm.rs).
    Timm,
}

impl Naming {
    fn checkpoint_name(&self, name: &str) -> String {
        match self {
            Naming::Transformers => name.to_string(),
            Naming::Data2Vec => match name.strip_prefix("beit.") {
                Some(rest) => format!("data2vec_vision.{rest}"),
                None => name.to_string(),
            },
            Naming::Timm => timm::timm_name(name).unwrap_or_else(|| name.to_string()),
        }
    }

    fn error(&self, e: BeitError) -> BeitError {
        match e {
            BeitError::MissingTensor { path, name } => BeitError::MissingTensor { name: self.checkpoint_name(&name), path },
            BeitError::ShapeMismatch { path, name, expected, found } => {
                BeitError::ShapeMismatch { name: self.checkpoint_name(&name), path, expected, found }
            }
            other => other,
        }
    }

    fn report(&self, r: LoadReport) -> LoadReport {
        let names = |v: Vec<String>| {
            // query, key and value all come from one timm qkv: list it once.
            let mut seen = std::collections::HashSet::new();
            v.iter().map(|n| self.checkpoint_name(n)).filter(|n| seen.insert(n.clone())).collect()
        };
        LoadReport { newly_initialized: names(r.newly_initialized), unused: names(r.unused) }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| BeitError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| BeitError::Json { path: path.to_path_buf(), message: e.to_string() })
}

/// from_pretrained on a directory: transformers' BEiT and Data2VecVision checkpoints, and timm's beit/beitv2 (with
/// timm's config.json, with `opts.timm_model`, or beside a transformers config.json describing them).
pub fn load_pretrained(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Pretrained> {
    if !dir.is_dir() {
        return Err(BeitError::checkpoint(dir, "not a directory (expected config.json and model weights)"));
    }
    let config_path = dir.join("config.json");
    let config_json = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
    if config_json.is_none() && opts.timm_model.is_none() {
        return Err(BeitError::checkpoint(
            &config_path,
            "missing: a model directory needs config.json beside its weights (a timm checkpoint without one: \
             name it in LoadOptions::timm_model)",
        ));
    }
    let timm_config = config_json.as_ref().filter(|v| timm::is_timm_config(v));
    let from_timm_name = opts.timm_model.is_some() || timm_config.is_some();
    // A transformers config is checked before any weights are read; a timm one needs the head's shape.
    let hf_config = if from_timm_name { None } else { Some(BeitConfig::from_file(&config_path)?) };
    let (format, files) = match &opts.weights_file {
        Some(f) => weights_file(f)?,
        None => find_weight_files(dir, opts.weights_format)?,
    };
    let tensors = load_tensors(format, &files, device)?;
    let source = files.first().cloned().unwrap_or_else(|| dir.to_path_buf());

    let (config, tensors, naming) = if let Some(config) = hf_config {
        let tensors = timm::unwrap_state_dict(tensors);
        if timm::is_timm_state_dict(&tensors) {
            // timm weights beside a transformers config that describes them (e.g. a size timm has no name for).
            if config.layer_norm_eps != timm::TIMM_LAYER_NORM_EPS {
                tracing::warn!(
                    "{}: layer_norm_eps is {}, timm's LayerNorm uses {}: outputs will differ from timm's",
                    config_path.display(),
                    config.layer_norm_eps,
                    timm::TIMM_LAYER_NORM_EPS
                );
            }
            let tensors = timm::convert_state_dict(tensors, &config, &source)?;
            (config, tensors, Naming::Timm)
        } else if config.is_data2vec() {
            (config, rename_prefix(tensors, "data2vec_vision", "beit"), Naming::Data2Vec)
        } else {
            (config, tensors, Naming::Transformers)
        }
    } else {
        if config_json.is_some() && timm_config.is_none() {
            tracing::warn!("{}: ignored, the config comes from the timm model name", config_path.display());
        }
        let tensors = timm::unwrap_state_dict(tensors);
        if !timm::is_timm_state_dict(&tensors) {
            let mut some: Vec<&String> = tensors.keys().collect();
            some.sort();
            some.truncate(4);
            return Err(BeitError::checkpoint(
                &source,
                format!("expected timm's beit state dict (cls_token, patch_embed.proj.weight, blocks.N.…), found {some:?}…"),
            ));
        }
        let config =
            timm::config_for_checkpoint(opts.timm_model.as_deref(), timm_config, &tensors, &config_path, &source)?;
        let tensors = timm::convert_state_dict(tensors, &config, &source)?;
        (config, tensors, Naming::Timm)
    };
    let arch = match opts.architecture {
        Some(a) => a,
        None => Architecture::from_config(&config)?,
    }
    .for_model_type(&config.model_type)?;
    let tensors = align_prefix(tensors, "beit", arch.has_base_prefix());
    let weights = Weights::new(tensors, source, device);
    let mut model = AnyBeitModel::load(&weights, &config, arch).map_err(|e| naming.error(e))?;
    let report = naming.report(weights.report());
    if let Some(dtype) = opts.inference {
        // Released first, so that each dense weight is freed as soon as its packed or quantized copy exists.
        weights.release();
        model.prepare_inference(Inference { dtype, path: opts.inference_path })?;
    }
    for name in &report.newly_initialized {
        tracing::warn!("{name} was not in the checkpoint and is newly initialized");
    }
    if !report.unused.is_empty() {
        tracing::info!("{} checkpoint tensors are unused by {}: {:?}", report.unused.len(), arch.name(), report.unused);
    }
    Ok(Pretrained { model, config, report, model_dir: dir.to_path_buf(), weight_files: files, weights })
}

/// `from_pretrained` on each model class, as transformers names them: the class picks the task (a head absent
/// from the checkpoint is newly initialized, with a warning), the checkpoint the family (BEiT or Data2VecVision).
macro_rules! from_pretrained {
    ($($ty:ident => $arch:ident / $variant:ident),* $(,)?) => {$(
        impl $ty {
            #[doc = concat!("Loads a `", stringify!($arch), "` from `spec`: a model directory, a weights file beside its ")]
            /// config.json, or a Hub repo id; `options` as [`Pretrained::from_pretrained`] takes them
            /// (`options.architecture` is ignored: the class decides).
            pub fn from_pretrained(spec: &str, options: &LoadOptions) -> Result<Self> {
                let options = LoadOptions { architecture: Some(Architecture::$arch), ..options.clone() };
                let loaded = Pretrained::from_pretrained(spec, &options)?;
                match loaded.model {
                    AnyBeitModel::$variant(m) => Ok(m),
                    other => Err(BeitError::internal(
                        "from_pretrained",
                        format!("asked for {}, built {}", stringify!($arch), other.architecture().name()),
                    )),
                }
            }
        }
    )*};
}

from_pretrained!(
    BeitModel => BeitModel / Model,
    BeitForMaskedImageModeling => BeitForMaskedImageModeling / MaskedImageModeling,
    BeitForImageClassification => BeitForImageClassification / ImageClassification,
    BeitForSemanticSegmentation => BeitForSemanticSegmentation / SemanticSegmentation,
    BeitBackbone => BeitBackbone / Backbone,
);

impl BeitImageProcessor {
    /// transformers' `BeitImageProcessor.from_pretrained`: `preprocessor_config.json` of a model directory, of
    /// the directory of a weights file, or of a Hub repo id (see [`LoadOptions::hub`] for `hub`; `None` reads
    /// the environment). A directory without the file is an error, as in transformers.
    pub fn from_pretrained(spec: &str, hub: Option<&HubOptions>) -> Result<Self> {
        let hub = hub.cloned().unwrap_or_else(HubOptions::from_env);
        let loc = resolve_model(spec, &hub)?;
        let path = loc.dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Err(BeitError::checkpoint(path, "missing: BeitImageProcessor.from_pretrained needs it"));
        }
        Ok(BeitImageProcessor::from_json_file(&path)?)
    }
}
