//! timm's beit and beitv2 checkpoints (state dicts of `timm.models.beit.Beit`, timm 1.0.31) on the transformers
//! BEiT modules: a `BeitConfig` from the timm model name (plus timm's config.json, when there is one), and the
//! state dict under transformers' names, its fused `qkv` split into query, key and value.
//!
//! The two implementations compute the same function: timm's `q_bias`/`v_bias` with a zero k bias is transformers'
//! key projection without bias; `gamma_1/2` are `lambda_1/2`; global_pool "avg" with `fc_norm` is
//! use_mean_pooling (LayerNorm after the mean of the patch tokens), global_pool "token" with `norm` is CLS pooling
//! (LayerNorm on the sequence). timm's LayerNorm eps is 1e-6.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde_json::{Map, Value};

use crate::config::{BeitConfig, HiddenAct, Size2};
use crate::error::{BeitError, Result};

/// A timm architecture as its `@register_model` function builds it (timm/models/beit.py). Every one has
/// patch 16, mlp_ratio 4, qkv_bias, per-layer relative position bias, no absolute positions, global_pool "avg".
#[derive(Debug, Clone, Copy)]
struct TimmArch {
    name: &'static str,
    img_size: usize,
    embed_dim: usize,
    depth: usize,
    num_heads: usize,
    init_values: f64,
}

const fn arch(name: &'static str, img_size: usize, large: bool, init_values: f64) -> TimmArch {
    let (embed_dim, depth, num_heads) = if large { (1024, 24, 16) } else { (768, 12, 12) };
    TimmArch { name, img_size, embed_dim, depth, num_heads, init_values }
}

const ARCHS: [TimmArch; 7] = [
    arch("beit_base_patch16_224", 224, false, 0.1),
    arch("beit_base_patch16_384", 384, false, 0.1),
    arch("beit_large_patch16_224", 224, true, 1e-5),
    arch("beit_large_patch16_384", 384, true, 1e-5),
    arch("beit_large_patch16_512", 512, true, 1e-5),
    arch("beitv2_base_patch16_224", 224, false, 1e-5),
    arch("beitv2_large_patch16_224", 224, true, 1e-5),
];

/// timm's LayerNorm default (transformers' BEiT default is 1e-12).
pub const TIMM_LAYER_NORM_EPS: f64 = 1e-6;

/// The timm model names beit-rs maps (each also with a pretrained tag, e.g. `.in22k_ft_in22k_in1k`).
pub fn supported_names() -> Vec<&'static str> {
    ARCHS.iter().map(|a| a.name).collect()
}

/// The architecture part of a timm name: without `hf-hub:`/`timm/` and without the pretrained tag after the dot.
pub fn architecture_name(name: &str) -> &str {
    let name = name.strip_prefix("hf-hub:").or_else(|| name.strip_prefix("hf_hub:")).unwrap_or(name);
    let name = name.strip_prefix("timm/").unwrap_or(name);
    name.split('.').next().unwrap_or(name)
}

/// timm's Beit keyword arguments that decide the function it computes, for one architecture, updated by
/// config.json's `model_args`.
#[derive(Debug, Clone, PartialEq)]
pub struct TimmArgs {
    /// timm's architecture name (e.g. beitv2_base_patch16_224).
    pub architecture: String,
    /// Input size.
    pub img_size: (usize, usize),
    /// Patch size.
    pub patch_size: (usize, usize),
    /// Input channels.
    pub in_chans: usize,
    /// Hidden size.
    pub embed_dim: usize,
    /// Number of layers.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP width over hidden size.
    pub mlp_ratio: f64,
    /// Layer scale init; None when not used.
    pub init_values: Option<f64>,
    /// Absolute position embeddings.
    pub use_abs_pos_emb: bool,
    /// A relative position bias in every layer.
    pub use_rel_pos_bias: bool,
    /// One relative position bias shared by all layers.
    pub use_shared_rel_pos_bias: bool,
    /// "avg", "token" or "" (none); None when nothing said, and the state dict decides.
    pub global_pool: Option<String>,
    /// LayerNorm after pooling (None: the state dict decides).
    pub use_fc_norm: Option<bool>,
    /// Stochastic depth rate.
    pub drop_path_rate: f64,
    /// Attention dropout.
    pub attn_drop_rate: f64,
    /// Projection dropout.
    pub proj_drop_rate: f64,
}

impl TimmArgs {
    /// The arguments `timm.create_model(name)` passes to Beit. Unknown names are an error listing the known ones.
    pub fn for_name(name: &str) -> Result<Self> {
        let base = architecture_name(name);
        let a = ARCHS.iter().find(|a| a.name == base).ok_or_else(|| {
            BeitError::config(
                "architecture",
                format!(
                    "timm model {name:?} cannot be mapped to BEiT; supported: {} (each with or without a pretrained \
                     tag such as .in22k_ft_in22k_in1k)",
                    supported_names().join(", ")
                ),
            )
        })?;
        Ok(TimmArgs {
            architecture: a.name.to_string(),
            img_size: (a.img_size, a.img_size),
            patch_size: (16, 16),
            in_chans: 3,
            embed_dim: a.embed_dim,
            depth: a.depth,
            num_heads: a.num_heads,
            mlp_ratio: 4.0,
            init_values: Some(a.init_values),
            use_abs_pos_emb: false,
            use_rel_pos_bias: true,
            use_shared_rel_pos_bias: false,
            global_pool: None,
            use_fc_norm: None,
            drop_path_rate: 0.0,
            attn_drop_rate: 0.0,
            proj_drop_rate: 0.0,
        })
    }

    /// timm's `model_args` (what save_for_hf records to rebuild a model that differs from its architecture).
    /// An argument that changes the computation in a way BEiT cannot express is an error naming it.
    pub fn apply_model_args(&mut self, args: &Map<String, Value>) -> Result<()> {
        for (key, v) in args {
            let field = format!("model_args.{key}");
            let bad = |expected: &str| BeitError::config(field.clone(), format!("expected {expected}, found {v}"));
            let uint = || v.as_u64().map(|n| n as usize).filter(|&n| n > 0).ok_or_else(|| bad("a positive integer"));
            let float = || v.as_f64().ok_or_else(|| bad("a number"));
            let boolean = || v.as_bool().ok_or_else(|| bad("true or false"));
            let size = || -> Result<(usize, usize)> {
                if let Some(n) = v.as_u64() {
                    return Ok((n as usize, n as usize));
                }
                match v.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>()).as_deref() {
                    Some([h, w]) if *h > 0 && *w > 0 => Ok((*h as usize, *w as usize)),
                    _ => Err(bad("an integer or [height, width]")),
                }
            };
            match key.as_str() {
                "img_size" => self.img_size = size()?,
                "patch_size" => self.patch_size = size()?,
                "in_chans" => self.in_chans = uint()?,
                "embed_dim" => self.embed_dim = uint()?,
                "depth" => self.depth = uint()?,
                "num_heads" => self.num_heads = uint()?,
                "mlp_ratio" => self.mlp_ratio = float()?,
                "init_values" => self.init_values = if v.is_null() { None } else { Some(float()?) },
                "use_abs_pos_emb" => self.use_abs_pos_emb = boolean()?,
                "use_rel_pos_bias" => self.use_rel_pos_bias = boolean()?,
                "use_shared_rel_pos_bias" => self.use_shared_rel_pos_bias = boolean()?,
                "global_pool" => self.global_pool = Some(v.as_str().ok_or_else(|| bad("a string"))?.to_string()),
                "use_fc_norm" => self.use_fc_norm = if v.is_null() { None } else { Some(boolean()?) },
                "drop_path_rate" => self.drop_path_rate = float()?,
                "attn_drop_rate" => self.attn_drop_rate = float()?,
                "proj_drop_rate" => self.proj_drop_rate = float()?,
                // Training-only or read from the weights: the head's size comes from `head.weight`, absent q/v
                // biases (qkv_bias false) load as zeros.
                "num_classes" | "qkv_bias" | "drop_rate" | "pos_drop_rate" | "head_init_scale" => {}
                "swiglu_mlp" | "scale_mlp" if v.as_bool() == Some(false) => {}
                "attn_head_dim" if v.is_null() => {}
                _ => {
                    return Err(BeitError::config(
                        field,
                        format!("{v} has no transformers BEiT counterpart (timm {} argument)", self.architecture),
                    ))
                }
            }
        }
        Ok(())
    }

    /// transformers' use_mean_pooling for timm's pooling: "avg" pooling normalizes the mean with `fc_norm`,
    /// "token" pooling takes the CLS token of the `norm`ed sequence. When the arguments say nothing, the state
    /// dict says which norm the model has.
    pub fn use_mean_pooling(&self, tensors: &HashMap<String, Tensor>) -> Result<bool> {
        let Some(pool) = &self.global_pool else {
            return Ok(!tensors.contains_key("norm.weight") || tensors.contains_key("fc_norm.weight"));
        };
        let fc_norm = self.use_fc_norm.unwrap_or(pool == "avg");
        match (pool.as_str(), fc_norm) {
            ("avg", true) => Ok(true),
            ("token", false) => Ok(false),
            _ => Err(BeitError::config(
                "global_pool",
                format!(
                    "timm's global_pool {pool:?} with use_fc_norm {fc_norm} has no transformers counterpart: BEiT \
                     pools by mean then LayerNorm (\"avg\" with fc_norm) or takes the CLS token after LayerNorm \
                     (\"token\" without)"
                ),
            )),
        }
    }

    /// The BeitConfig computing what this timm model computes, with `num_classes` classes (0: no head).
    pub fn beit_config(&self, use_mean_pooling: bool, num_classes: usize, labels: Option<Vec<String>>) -> Result<BeitConfig> {
        let mut c = BeitConfig {
            hidden_size: self.embed_dim,
            num_hidden_layers: self.depth,
            num_attention_heads: self.num_heads,
            // timm's Mlp: int(dim * mlp_ratio).
            intermediate_size: (self.embed_dim as f64 * self.mlp_ratio) as usize,
            hidden_act: HiddenAct::Gelu, // nn.GELU, exact
            hidden_dropout_prob: self.proj_drop_rate,
            attention_probs_dropout_prob: self.attn_drop_rate,
            layer_norm_eps: TIMM_LAYER_NORM_EPS,
            image_size: size2(self.img_size),
            patch_size: size2(self.patch_size),
            num_channels: self.in_chans,
            use_mask_token: false,
            use_absolute_position_embeddings: self.use_abs_pos_emb,
            use_relative_position_bias: self.use_rel_pos_bias,
            use_shared_relative_position_bias: self.use_shared_rel_pos_bias,
            layer_scale_init_value: self.init_values.unwrap_or(0.0),
            drop_path_rate: self.drop_path_rate,
            use_mean_pooling,
            architectures: Some(vec![
                if num_classes > 0 { "BeitForImageClassification" } else { "BeitModel" }.to_string()
            ]),
            ..BeitConfig::default()
        };
        c.id2label = match labels {
            Some(l) if l.len() == num_classes && num_classes > 0 => l.into_iter().enumerate().collect(),
            _ if num_classes > 0 => (0..num_classes).map(|i| (i, format!("LABEL_{i}"))).collect(),
            _ => c.id2label, // no head: transformers' default two labels, unused
        };
        c.validate()?;
        c.align_out_features(None, None)?;
        Ok(c)
    }
}

fn size2((h, w): (usize, usize)) -> Size2 {
    Size2 { height: h, width: w, as_pair: h != w }
}

/// timm's own config.json (from save_for_hf / the Hub): it names an "architecture" and has no "model_type".
pub fn is_timm_config(v: &Value) -> bool {
    v.get("architecture").is_some() && v.get("model_type").is_none()
}

/// Does this state dict use timm's names?
pub fn is_timm_state_dict(tensors: &HashMap<String, Tensor>) -> bool {
    tensors.keys().any(|k| k == "cls_token" || k.starts_with("blocks.") || k.starts_with("patch_embed."))
}

/// Checkpoints as training scripts save them ({"model": state_dict}, DataParallel's `module.`) hold the state dict
/// one level down, as timm's checkpoint_filter_fn expects: keep that level. Anything else is left alone.
pub fn unwrap_state_dict(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    if is_timm_state_dict(&tensors) {
        return tensors;
    }
    for wrapper in ["model.", "module.", "state_dict.", "model.module."] {
        if tensors.contains_key(&format!("{wrapper}patch_embed.proj.weight")) {
            return tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(wrapper).map(|r| (r.to_string(), v)))
                .collect();
        }
    }
    tensors
}

/// Tensors outside the blocks: (timm, transformers BeitForImageClassification).
const TOP: [(&str, &str); 11] = [
    ("cls_token", "beit.embeddings.cls_token"),
    ("pos_embed", "beit.embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "beit.embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "beit.embeddings.patch_embeddings.projection.bias"),
    ("rel_pos_bias.relative_position_bias_table", "beit.encoder.relative_position_bias.relative_position_bias_table"),
    ("norm.weight", "beit.layernorm.weight"),
    ("norm.bias", "beit.layernorm.bias"),
    ("fc_norm.weight", "beit.pooler.layernorm.weight"),
    ("fc_norm.bias", "beit.pooler.layernorm.bias"),
    ("head.weight", "classifier.weight"),
    ("head.bias", "classifier.bias"),
];

/// Inside `blocks.N.` / `beit.encoder.layer.N.`. The fused `attn.qkv.weight` is split apart (see QKV).
const BLOCK: [(&str, &str); 15] = [
    ("norm1.weight", "layernorm_before.weight"),
    ("norm1.bias", "layernorm_before.bias"),
    ("attn.q_bias", "attention.attention.query.bias"),
    ("attn.v_bias", "attention.attention.value.bias"),
    ("attn.relative_position_bias_table", "attention.attention.relative_position_bias.relative_position_bias_table"),
    ("attn.proj.weight", "attention.output.dense.weight"),
    ("attn.proj.bias", "attention.output.dense.bias"),
    ("norm2.weight", "layernorm_after.weight"),
    ("norm2.bias", "layernorm_after.bias"),
    ("mlp.fc1.weight", "intermediate.dense.weight"),
    ("mlp.fc1.bias", "intermediate.dense.bias"),
    ("mlp.fc2.weight", "output.dense.weight"),
    ("mlp.fc2.bias", "output.dense.bias"),
    ("gamma_1", "lambda_1"),
    ("gamma_2", "lambda_2"),
];

/// The rows of `attn.qkv.weight`, in order.
const QKV: [&str; 3] = ["query", "key", "value"];

fn block_index(rest: &str) -> Option<(&str, &str)> {
    let (i, tail) = rest.split_once('.')?;
    i.parse::<usize>().ok().map(|_| (i, tail))
}

/// transformers' name (under `beit.`) for a timm tensor, except `attn.qkv.weight`, which becomes three.
pub fn transformers_name(timm: &str) -> Option<String> {
    if let Some((_, hf)) = TOP.iter().find(|(t, _)| *t == timm) {
        return Some(hf.to_string());
    }
    let (i, tail) = block_index(timm.strip_prefix("blocks.")?)?;
    let (_, hf) = BLOCK.iter().find(|(t, _)| *t == tail)?;
    Some(format!("beit.encoder.layer.{i}.{hf}"))
}

/// The timm tensor a transformers name comes from (with or without the `beit.` prefix), for errors and the load
/// report: query, key and value weights come from `attn.qkv.weight`.
pub fn timm_name(transformers: &str) -> Option<String> {
    let bare = transformers.strip_prefix("beit.").unwrap_or(transformers);
    if let Some((t, _)) = TOP.iter().find(|(_, hf)| hf.strip_prefix("beit.").unwrap_or(hf) == bare) {
        return Some(t.to_string());
    }
    let (i, tail) = block_index(bare.strip_prefix("encoder.layer.")?)?;
    if QKV.iter().any(|p| tail == format!("attention.attention.{p}.weight")) {
        return Some(format!("blocks.{i}.attn.qkv.weight"));
    }
    let (t, _) = BLOCK.iter().find(|(_, hf)| *hf == tail)?;
    Some(format!("blocks.{i}.{t}"))
}

/// The state dict under transformers' BeitForImageClassification names for config `c`. `attn.qkv.weight` must be
/// [3 * hidden, hidden]; blocks without q/v biases (timm's qkv_bias=False) get zero ones; relative_position_index
/// buffers are dropped; anything unknown keeps its name and is reported unused. The final norm must be the one
/// `c`'s pooling uses.
pub fn convert_state_dict(tensors: HashMap<String, Tensor>, c: &BeitConfig, path: &Path) -> Result<HashMap<String, Tensor>> {
    let (wanted, other) = if c.use_mean_pooling { ("fc_norm.weight", "norm.weight") } else { ("norm.weight", "fc_norm.weight") };
    if !tensors.contains_key(wanted) && tensors.contains_key(other) {
        return Err(BeitError::checkpoint(
            path,
            format!(
                "timm state dict has `{other}` but use_mean_pooling = {} needs `{wanted}` (timm's global_pool {} \
                 normalizes {}); the config does not describe this checkpoint",
                c.use_mean_pooling,
                if c.use_mean_pooling { "\"avg\"" } else { "\"token\"" },
                if c.use_mean_pooling { "after pooling" } else { "the sequence" }
            ),
        ));
    }
    let h = c.hidden_size;
    let mut out = HashMap::with_capacity(tensors.len() + tensors.len() / 8);
    let mut qkv_blocks = Vec::new();
    for (name, t) in tensors {
        if name.contains("relative_position_index") {
            continue;
        }
        let block_qkv = name
            .strip_prefix("blocks.")
            .and_then(block_index)
            .filter(|(_, tail)| *tail == "attn.qkv.weight")
            .map(|(i, _)| i.to_string());
        if let Some(i) = block_qkv {
            if t.dims() != [3 * h, h] {
                return Err(BeitError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name,
                    expected: vec![3 * h, h],
                    found: t.dims().to_vec(),
                });
            }
            for (j, p) in QKV.iter().enumerate() {
                out.insert(format!("beit.encoder.layer.{i}.attention.attention.{p}.weight"), t.narrow(0, j * h, h)?);
            }
            qkv_blocks.push((i, t));
            continue;
        }
        match transformers_name(&name) {
            Some(hf) => out.insert(hf, t),
            None => out.insert(name, t),
        };
    }
    for (i, qkv) in qkv_blocks {
        let bias = |p: &str| format!("beit.encoder.layer.{i}.attention.attention.{p}.bias");
        if !out.contains_key(&bias("query")) && !out.contains_key(&bias("value")) {
            let zeros = Tensor::zeros(h, qkv.dtype(), qkv.device())?;
            out.insert(bias("query"), zeros.clone());
            out.insert(bias("value"), zeros);
        }
    }
    Ok(out)
}

/// The class count and label names of a timm checkpoint: the head's rows (config.json's num_classes must agree),
/// names from timm's `label_names` (with `label_descriptions` when present, as transformers' id2label has them).
pub fn classes(
    tensors: &HashMap<String, Tensor>,
    timm_config: Option<&Value>,
    path: &Path,
) -> Result<(usize, Option<Vec<String>>)> {
    let from_head = match tensors.get("head.weight") {
        Some(t) => match t.dims() {
            [rows, _] => Some(*rows),
            d => {
                return Err(BeitError::checkpoint(path, format!("tensor `head.weight` has shape {d:?}, expected [classes, dim]")))
            }
        },
        None => None,
    };
    let stated = timm_config.and_then(|v| v.get("num_classes")).and_then(Value::as_u64).map(|n| n as usize);
    let n = match (from_head, stated) {
        (Some(a), Some(b)) if a != b => {
            return Err(BeitError::checkpoint(
                path,
                format!("config.json says num_classes {b} but `head.weight` has {a} rows"),
            ))
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => 0,
    };
    let labels = timm_config.and_then(|v| {
        let cfg = v.get("pretrained_cfg");
        let names = v.get("label_names").or_else(|| cfg.and_then(|c| c.get("label_names")))?;
        let descriptions = v.get("label_descriptions").or_else(|| cfg.and_then(|c| c.get("label_descriptions")));
        let names: Vec<String> = match names {
            Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<_>>()?,
            // {"0": "name", ...}: ids with gaps are not a label list.
            Value::Object(o) => {
                let by_id: BTreeMap<usize, String> = o
                    .iter()
                    .map(|(k, x)| Some((k.parse::<usize>().ok()?, x.as_str()?.to_string())))
                    .collect::<Option<_>>()?;
                if by_id.keys().copied().eq(0..by_id.len()) { by_id.into_values().collect() } else { return None }
            }
            _ => return None,
        };
        Some(
            names
                .into_iter()
                .map(|name| match descriptions.and_then(|d| d.get(&name)).and_then(Value::as_str) {
                    Some(desc) => desc.to_string(),
                    None => name,
                })
                .collect(),
        )
    });
    Ok((n, labels))
}

/// The BeitConfig of a timm checkpoint: the architecture from `name` (else config.json's "architecture"), updated
/// by config.json's model_args and global_pool; classes from the head. Field errors name config.json.
pub fn config_for_checkpoint(
    name: Option<&str>,
    timm_config: Option<&Value>,
    tensors: &HashMap<String, Tensor>,
    config_path: &Path,
    weights_path: &Path,
) -> Result<BeitConfig> {
    let in_file = |e: BeitError| match e {
        BeitError::Config { field, message } => {
            BeitError::ConfigFile { path: config_path.to_path_buf(), field, message }
        }
        other => other,
    };
    let mut args = match name {
        Some(n) => TimmArgs::for_name(n).map_err(|e| match e {
            BeitError::Config { message, .. } => BeitError::invalid_input("timm model name", message),
            other => other,
        })?,
        None => {
            let arch = timm_config.and_then(|v| v.get("architecture")).and_then(Value::as_str).ok_or_else(|| {
                in_file(BeitError::config("architecture", "expected the timm model name as a string"))
            })?;
            TimmArgs::for_name(arch).map_err(in_file)?
        }
    };
    if let Some(v) = timm_config {
        if let Some(pool) = v.get("global_pool").and_then(Value::as_str) {
            args.global_pool = Some(pool.to_string());
        }
        match v.get("model_args") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => args.apply_model_args(m).map_err(in_file)?,
            Some(other) => {
                return Err(in_file(BeitError::config("model_args", format!("expected an object, found {other}"))))
            }
        }
    }
    let mean = args.use_mean_pooling(tensors).map_err(in_file)?;
    let (num_classes, labels) = classes(tensors, timm_config, weights_path)?;
    args.beit_config(mean, num_classes, labels).map_err(in_file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn names_map_both_ways() {
        for (t, hf) in [
            ("blocks.3.norm1.weight", "beit.encoder.layer.3.layernorm_before.weight"),
            ("blocks.11.attn.q_bias", "beit.encoder.layer.11.attention.attention.query.bias"),
            ("blocks.0.gamma_2", "beit.encoder.layer.0.lambda_2"),
            ("fc_norm.bias", "beit.pooler.layernorm.bias"),
            ("head.weight", "classifier.weight"),
            ("rel_pos_bias.relative_position_bias_table", "beit.encoder.relative_position_bias.relative_position_bias_table"),
        ] {
            assert_eq!(transformers_name(t).as_deref(), Some(hf));
            assert_eq!(timm_name(hf).as_deref(), Some(t));
            assert_eq!(timm_name(hf.strip_prefix("beit.").unwrap_or(hf)).as_deref(), Some(t));
        }
        assert_eq!(timm_name("encoder.layer.1.attention.attention.key.weight").as_deref(), Some("blocks.1.attn.qkv.weight"));
        assert_eq!(transformers_name("blocks.x.norm1.weight"), None);
        assert_eq!(transformers_name("mask_token"), None);
    }

    #[test]
    fn names_with_tags_and_hub_prefixes() {
        assert_eq!(architecture_name("timm/beit_base_patch16_224.in22k_ft_in22k_in1k"), "beit_base_patch16_224");
        assert_eq!(architecture_name("hf-hub:timm/beitv2_large_patch16_224.in1k_ft_in1k"), "beitv2_large_patch16_224");
        let a = TimmArgs::for_name("beit_large_patch16_512.in22k_ft_in22k_in1k").unwrap();
        assert_eq!((a.embed_dim, a.depth, a.num_heads, a.img_size), (1024, 24, 16, (512, 512)));
        let e = TimmArgs::for_name("beit3_base_patch16_224.pt").unwrap_err().to_string();
        assert!(e.contains("beit3_base_patch16_224.pt") && e.contains("beitv2_large_patch16_224"), "{e}");
    }

    #[test]
    fn model_args_that_beit_cannot_express_are_errors() {
        let mut a = TimmArgs::for_name("beit_base_patch16_224").unwrap();
        let args: Map<String, Value> = serde_json::from_str(r#"{"depth": 2, "img_size": [32, 48], "init_values": null}"#).unwrap();
        a.apply_model_args(&args).unwrap();
        assert_eq!((a.depth, a.img_size, a.init_values), (2, (32, 48), None));
        for bad in [r#"{"swiglu_mlp": true}"#, r#"{"norm_layer": "rmsnorm"}"#, r#"{"depth": "two"}"#] {
            let args: Map<String, Value> = serde_json::from_str(bad).unwrap();
            let e = a.apply_model_args(&args).unwrap_err().to_string();
            assert!(e.contains("model_args."), "{bad}: {e}");
        }
        a.global_pool = Some(String::new());
        assert!(a.use_mean_pooling(&HashMap::new()).unwrap_err().to_string().contains("global_pool"));
    }

    #[test]
    fn qkv_is_split_and_missing_biases_are_zero() {
        let dev = Device::Cpu;
        let c = BeitConfig::from_json_str(r#"{"hidden_size": 4, "num_attention_heads": 2, "num_hidden_layers": 1}"#).unwrap();
        let qkv = Tensor::arange(0f32, 48., &dev).unwrap().reshape((12, 4)).unwrap();
        let mut t = HashMap::new();
        t.insert("blocks.0.attn.qkv.weight".to_string(), qkv);
        t.insert("fc_norm.weight".to_string(), Tensor::ones(4, DType::F32, &dev).unwrap());
        t.insert("blocks.0.attn.relative_position_index".to_string(), Tensor::zeros(4, DType::F32, &dev).unwrap());
        let out = convert_state_dict(t.clone(), &c, Path::new("x")).unwrap();
        let v = out["beit.encoder.layer.0.attention.attention.value.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[0], 32.0);
        assert!(out.contains_key("beit.encoder.layer.0.attention.attention.query.bias"));
        assert!(!out.keys().any(|k| k.contains("relative_position_index")));
        // A CLS-pooling config on an "avg" checkpoint.
        let mut cls = c.clone();
        cls.use_mean_pooling = false;
        let e = convert_state_dict(t.clone(), &cls, Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("fc_norm.weight") && e.contains("norm.weight"), "{e}");
        // A qkv of the wrong width.
        t.insert("blocks.0.attn.qkv.weight".to_string(), Tensor::zeros((12, 3), DType::F32, &dev).unwrap());
        let e = convert_state_dict(t, &c, Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("blocks.0.attn.qkv.weight") && e.contains("[12, 4]"), "{e}");
    }

    #[test]
    fn wrapped_state_dicts_are_unwrapped() {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert("model.patch_embed.proj.weight".to_string(), Tensor::zeros(1, DType::F32, &dev).unwrap());
        t.insert("model.cls_token".to_string(), Tensor::zeros(1, DType::F32, &dev).unwrap());
        let u = unwrap_state_dict(t);
        assert!(u.contains_key("cls_token") && is_timm_state_dict(&u));
    }
}
