//! `BeitConfig`: transformers' BeitConfig (plus the PretrainedConfig fields BEiT uses), read from and written to
//! config.json with the same names and defaults. Unknown keys survive a round trip.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::error::{BeitError, Result};

/// transformers' activation names (ACT2FN). `prelu` and `xielu` carry weights of their own and are not BEiT's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    Gelu,
    Gelu10,
    GeluFast,
    GeluNew,
    GeluPython,
    GeluPytorchTanh,
    GeluPythonTanh,
    GeluAccurate,
    Laplace,
    LeakyRelu,
    Linear,
    Mish,
    QuickGelu,
    Relu,
    Relu2,
    Relu6,
    Sigmoid,
    Silu,
    Swish,
    Tanh,
}

impl HiddenAct {
    const NAMES: [(&'static str, HiddenAct); 20] = [
        ("gelu", HiddenAct::Gelu),
        ("gelu_10", HiddenAct::Gelu10),
        ("gelu_fast", HiddenAct::GeluFast),
        ("gelu_new", HiddenAct::GeluNew),
        ("gelu_python", HiddenAct::GeluPython),
        ("gelu_pytorch_tanh", HiddenAct::GeluPytorchTanh),
        ("gelu_python_tanh", HiddenAct::GeluPythonTanh),
        ("gelu_accurate", HiddenAct::GeluAccurate),
        ("laplace", HiddenAct::Laplace),
        ("leaky_relu", HiddenAct::LeakyRelu),
        ("linear", HiddenAct::Linear),
        ("mish", HiddenAct::Mish),
        ("quick_gelu", HiddenAct::QuickGelu),
        ("relu", HiddenAct::Relu),
        ("relu2", HiddenAct::Relu2),
        ("relu6", HiddenAct::Relu6),
        ("sigmoid", HiddenAct::Sigmoid),
        ("silu", HiddenAct::Silu),
        ("swish", HiddenAct::Swish),
        ("tanh", HiddenAct::Tanh),
    ];

    pub fn from_name(name: &str) -> Result<Self> {
        Self::NAMES.iter().find(|(n, _)| *n == name).map(|(_, a)| *a).ok_or_else(|| {
            let known: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
            BeitError::config("hidden_act", format!("unknown activation {name:?}; expected one of {}", known.join(", ")))
        })
    }

    pub fn name(&self) -> &'static str {
        Self::NAMES.iter().find(|(_, a)| a == self).map(|(n, _)| *n).unwrap_or("gelu") // ok: every variant is named
    }
}

/// An int or a [height, width] pair, written back in the form it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size2 {
    pub height: usize,
    pub width: usize,
    pub as_pair: bool,
}

impl Size2 {
    pub fn square(n: usize) -> Self {
        Size2 { height: n, width: n, as_pair: false }
    }

    fn to_json(self) -> Value {
        if self.as_pair {
            json!([self.height, self.width])
        } else {
            json!(self.height)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BeitConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub image_size: Size2,
    pub patch_size: Size2,
    pub num_channels: usize,
    pub use_mask_token: bool,
    pub use_absolute_position_embeddings: bool,
    pub use_relative_position_bias: bool,
    pub use_shared_relative_position_bias: bool,
    pub layer_scale_init_value: f64,
    pub drop_path_rate: f64,
    pub use_mean_pooling: bool,
    pub pool_scales: Vec<usize>,
    pub use_auxiliary_head: bool,
    pub auxiliary_loss_weight: f64,
    pub auxiliary_channels: usize,
    pub auxiliary_num_convs: usize,
    pub auxiliary_concat_input: bool,
    pub semantic_loss_ignore_index: i64,
    /// Backbone stages ("stem", "stage1", …) and their indices, aligned as transformers aligns them.
    pub out_features: Vec<String>,
    pub out_indices: Vec<i64>,
    pub add_fpn: bool,
    pub reshape_hidden_states: bool,
    /// Read by BeitBackbone's FPN without being declared by BeitConfig.
    pub batch_norm_eps: f64,
    /// PretrainedConfig fields.
    pub id2label: BTreeMap<usize, String>,
    pub architectures: Option<Vec<String>>,
    pub problem_type: Option<String>,
    pub output_hidden_states: bool,
    pub output_attentions: bool,
    /// Every other key of config.json, kept for the round trip.
    pub extra: Map<String, Value>,
}

impl Default for BeitConfig {
    fn default() -> Self {
        let mut c = BeitConfig {
            model_type: "beit".into(),
            vocab_size: 8192,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            image_size: Size2::square(224),
            patch_size: Size2::square(16),
            num_channels: 3,
            use_mask_token: false,
            use_absolute_position_embeddings: false,
            use_relative_position_bias: false,
            use_shared_relative_position_bias: false,
            layer_scale_init_value: 0.1,
            drop_path_rate: 0.1,
            use_mean_pooling: true,
            pool_scales: vec![1, 2, 3, 6],
            use_auxiliary_head: true,
            auxiliary_loss_weight: 0.4,
            auxiliary_channels: 256,
            auxiliary_num_convs: 1,
            auxiliary_concat_input: false,
            semantic_loss_ignore_index: 255,
            out_features: vec![],
            out_indices: vec![],
            add_fpn: false,
            reshape_hidden_states: true,
            batch_norm_eps: 1e-5,
            id2label: (0..2).map(|i| (i, format!("LABEL_{i}"))).collect(),
            architectures: None,
            problem_type: None,
            output_hidden_states: false,
            output_attentions: false,
            extra: Map::new(),
        };
        c.align_out_features(None, None).ok(); // ok: None/None always aligns to the last stage
        c
    }
}

/// Takes `key` out of `map` and deserializes it, naming the field and the value when the type is wrong.
fn take<T: DeserializeOwned>(map: &mut Map<String, Value>, key: &str, default: T, expected: &str) -> Result<T> {
    match map.remove(key) {
        None => Ok(default),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| BeitError::config(key, format!("expected {expected}, found {v}"))),
    }
}

fn take_opt<T: DeserializeOwned>(map: &mut Map<String, Value>, key: &str, expected: &str) -> Result<Option<T>> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| BeitError::config(key, format!("expected {expected}, found {v}"))),
    }
}

fn take_size2(map: &mut Map<String, Value>, key: &str, default: usize) -> Result<Size2> {
    match map.remove(key) {
        None => Ok(Size2::square(default)),
        Some(v) => {
            if let Ok(n) = serde_json::from_value::<usize>(v.clone()) {
                return Ok(Size2::square(n));
            }
            match serde_json::from_value::<Vec<usize>>(v.clone()) {
                Ok(p) if p.len() == 2 => Ok(Size2 { height: p[0], width: p[1], as_pair: true }),
                _ => Err(BeitError::config(key, format!("expected an integer or [height, width], found {v}"))),
            }
        }
    }
}

/// The `model_type`s beit-rs builds: BEiT itself, and Data2VecVision, whose models are BEiT's under other names.
pub const BEIT: &str = "beit";
pub const DATA2VEC_VISION: &str = "data2vec-vision";
pub const MODEL_TYPES: [&str; 2] = [BEIT, DATA2VEC_VISION];

/// Data2VecVisionConfig's out_indices default (BeitConfig's aligns to the last stage instead).
const DATA2VEC_OUT_INDICES: [i64; 4] = [3, 5, 7, 11];

/// Upper bounds that keep a hostile config.json from asking for absurd allocations.
pub const MAX_DIM: usize = 1 << 16;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_NUM_LABELS: usize = 1 << 20;

impl BeitConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BeitError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            BeitError::Json { message, .. } => BeitError::Json { path: path.to_path_buf(), message },
            BeitError::Config { field, message } => BeitError::ConfigFile { path: path.to_path_buf(), field, message },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| BeitError::Json { path: "config.json".into(), message: e.to_string() })?;
        Self::from_json(value)
    }

    pub fn from_json(value: Value) -> Result<Self> {
        let Value::Object(mut m) = value else {
            return Err(BeitError::config("<root>", format!("expected a JSON object, found {value}")));
        };
        if m.contains_key("architecture") && !m.contains_key("model_type") {
            return Err(BeitError::config(
                "model_type",
                format!(
                    "missing, and \"architecture\": {} says this is timm's config.json, not transformers'; \
                     load the model directory (load_pretrained maps timm checkpoints)",
                    m["architecture"]
                ),
            ));
        }
        let d = BeitConfig::default();
        let model_type: String = take(&mut m, "model_type", d.model_type.clone(), "a string")?;
        if !MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(BeitError::config(
                "model_type",
                format!("unknown model type {model_type:?}; beit-rs loads {}", MODEL_TYPES.join(", ")),
            ));
        }
        // Data2VecVisionConfig declares no vocab_size (no MIM head), no backbone fields and no out_features
        // alignment: those keys, when present, stay unknown keys and are written back as they were.
        let is_d2v = model_type == DATA2VEC_VISION;
        let int = "a non-negative integer";
        let float = "a number";
        let boolean = "true or false";
        let hidden_act: String = take(&mut m, "hidden_act", "gelu".to_string(), "an activation name")?;
        let id2label_raw: Option<BTreeMap<String, String>> =
            take_opt(&mut m, "id2label", "an object mapping ids to label names")?;
        let num_labels: Option<usize> = take_opt(&mut m, "num_labels", int)?;
        // Bounded before the default labels are built from it (found by fuzzing: `"num_labels": 999932999932`
        // allocated ~30 TB); the same bound `validate` puts on the number of labels.
        if let Some(n) = num_labels.filter(|&n| n > MAX_NUM_LABELS) {
            return Err(BeitError::config("num_labels", format!("{n} is larger than the supported maximum {MAX_NUM_LABELS}")));
        }
        let id2label = match id2label_raw {
            Some(raw) => raw
                .into_iter()
                .map(|(k, v)| {
                    k.parse::<usize>()
                        .map(|i| (i, v))
                        .map_err(|_| BeitError::config("id2label", format!("expected integer keys, found {k:?}")))
                })
                .collect::<Result<BTreeMap<_, _>>>()?,
            None => (0..num_labels.unwrap_or(2)).map(|i| (i, format!("LABEL_{i}"))).collect(),
        };
        m.remove("label2id"); // derived from id2label
        let (out_features, mut out_indices): (Option<Vec<String>>, Option<Vec<i64>>) = if is_d2v {
            (None, take_opt(&mut m, "out_indices", "a list of integers")?)
        } else {
            m.remove("stage_names"); // derived from num_hidden_layers
            (take_opt(&mut m, "out_features", "a list of stage names")?, take_opt(&mut m, "out_indices", "a list of integers")?)
        };
        if !is_d2v {
            if let Some(seg) = take_opt::<Vec<i64>>(&mut m, "segmentation_indices", "a list of integers")? {
                out_indices = Some(seg); // the deprecated name, as transformers accepts it
            }
        }
        let beit_only = |m: &mut Map<String, Value>, key: &str, default: bool| -> Result<bool> {
            if is_d2v { Ok(default) } else { take(m, key, default, boolean) }
        };
        let mut c = BeitConfig {
            model_type,
            vocab_size: if is_d2v { d.vocab_size } else { take(&mut m, "vocab_size", d.vocab_size, int)? },
            hidden_size: take(&mut m, "hidden_size", d.hidden_size, int)?,
            num_hidden_layers: take(&mut m, "num_hidden_layers", d.num_hidden_layers, int)?,
            num_attention_heads: take(&mut m, "num_attention_heads", d.num_attention_heads, int)?,
            intermediate_size: take(&mut m, "intermediate_size", d.intermediate_size, int)?,
            hidden_act: HiddenAct::from_name(&hidden_act)?,
            hidden_dropout_prob: take(&mut m, "hidden_dropout_prob", d.hidden_dropout_prob, float)?,
            attention_probs_dropout_prob: take(
                &mut m,
                "attention_probs_dropout_prob",
                d.attention_probs_dropout_prob,
                float,
            )?,
            initializer_range: take(&mut m, "initializer_range", d.initializer_range, float)?,
            layer_norm_eps: take(&mut m, "layer_norm_eps", d.layer_norm_eps, float)?,
            image_size: take_size2(&mut m, "image_size", 224)?,
            patch_size: take_size2(&mut m, "patch_size", 16)?,
            num_channels: take(&mut m, "num_channels", d.num_channels, int)?,
            use_mask_token: take(&mut m, "use_mask_token", d.use_mask_token, boolean)?,
            use_absolute_position_embeddings: take(
                &mut m,
                "use_absolute_position_embeddings",
                d.use_absolute_position_embeddings,
                boolean,
            )?,
            use_relative_position_bias: take(
                &mut m,
                "use_relative_position_bias",
                d.use_relative_position_bias,
                boolean,
            )?,
            use_shared_relative_position_bias: take(
                &mut m,
                "use_shared_relative_position_bias",
                d.use_shared_relative_position_bias,
                boolean,
            )?,
            layer_scale_init_value: take(&mut m, "layer_scale_init_value", d.layer_scale_init_value, float)?,
            drop_path_rate: take(&mut m, "drop_path_rate", d.drop_path_rate, float)?,
            use_mean_pooling: take(&mut m, "use_mean_pooling", d.use_mean_pooling, boolean)?,
            pool_scales: take(&mut m, "pool_scales", d.pool_scales.clone(), "a list of positive integers")?,
            use_auxiliary_head: take(&mut m, "use_auxiliary_head", d.use_auxiliary_head, boolean)?,
            auxiliary_loss_weight: take(&mut m, "auxiliary_loss_weight", d.auxiliary_loss_weight, float)?,
            auxiliary_channels: take(&mut m, "auxiliary_channels", d.auxiliary_channels, int)?,
            auxiliary_num_convs: take(&mut m, "auxiliary_num_convs", d.auxiliary_num_convs, int)?,
            auxiliary_concat_input: take(&mut m, "auxiliary_concat_input", d.auxiliary_concat_input, boolean)?,
            semantic_loss_ignore_index: take(
                &mut m,
                "semantic_loss_ignore_index",
                d.semantic_loss_ignore_index,
                "an integer",
            )?,
            out_features: vec![],
            out_indices: vec![],
            add_fpn: beit_only(&mut m, "add_fpn", d.add_fpn)?,
            reshape_hidden_states: beit_only(&mut m, "reshape_hidden_states", d.reshape_hidden_states)?,
            batch_norm_eps: if is_d2v { d.batch_norm_eps } else { take(&mut m, "batch_norm_eps", d.batch_norm_eps, float)? },
            id2label,
            architectures: take_opt(&mut m, "architectures", "a list of class names")?,
            problem_type: take_opt(&mut m, "problem_type", "a string")?,
            output_hidden_states: take(&mut m, "output_hidden_states", false, boolean)?,
            output_attentions: take(&mut m, "output_attentions", false, boolean)?,
            extra: m,
        };
        c.validate()?;
        if is_d2v {
            // Kept as given: only Data2VecVisionForSemanticSegmentation reads them, and checks them when built.
            c.out_features = vec![];
            c.out_indices = out_indices.unwrap_or_else(|| DATA2VEC_OUT_INDICES.to_vec());
        } else {
            c.align_out_features(out_features, out_indices)?;
        }
        Ok(c)
    }

    pub fn is_data2vec(&self) -> bool {
        self.model_type == DATA2VEC_VISION
    }

    /// transformers' `base_model_prefix`: where head classes keep the backbone's weights.
    pub fn base_model_prefix(&self) -> &'static str {
        if self.is_data2vec() { "data2vec_vision" } else { "beit" }
    }

    /// transformers' get_aligned_output_features_output_indices.
    pub fn align_out_features(&mut self, features: Option<Vec<String>>, indices: Option<Vec<i64>>) -> Result<()> {
        let stages = self.stage_names();
        let n = stages.len() as i64;
        let resolve = |i: i64| -> Result<usize> {
            let j = if i < 0 { i + n } else { i };
            if j < 0 || j >= n {
                return Err(BeitError::config(
                    "out_indices",
                    format!("index {i} is out of range for {} stages (stem + {} layers)", n, n - 1),
                ));
            }
            Ok(j as usize)
        };
        match (features, indices) {
            (None, None) => {
                self.out_features = vec![stages[stages.len() - 1].clone()];
                self.out_indices = vec![n - 1];
            }
            (Some(f), None) => {
                self.out_indices = f
                    .iter()
                    .map(|name| {
                        stages.iter().position(|s| s == name).map(|p| p as i64).ok_or_else(|| {
                            BeitError::config("out_features", format!("unknown stage {name:?}; stages are {stages:?}"))
                        })
                    })
                    .collect::<Result<_>>()?;
                self.out_features = f;
            }
            (None, Some(i)) => {
                self.out_features = i.iter().map(|&k| resolve(k).map(|j| stages[j].clone())).collect::<Result<_>>()?;
                self.out_indices = i;
            }
            (Some(f), Some(i)) => {
                if f.len() != i.len() {
                    return Err(BeitError::config(
                        "out_features",
                        format!("{} features but {} out_indices", f.len(), i.len()),
                    ));
                }
                for (name, &k) in f.iter().zip(&i) {
                    if stages[resolve(k)?] != *name {
                        return Err(BeitError::config(
                            "out_features",
                            format!("{name:?} does not match out_indices entry {k}"),
                        ));
                    }
                }
                self.out_features = f;
                self.out_indices = i;
            }
        }
        Ok(())
    }

    pub fn stage_names(&self) -> Vec<String> {
        std::iter::once("stem".to_string()).chain((1..=self.num_hidden_layers).map(|i| format!("stage{i}"))).collect()
    }

    /// out_indices as non-negative stage numbers (0 = embeddings, i = output of layer i).
    pub fn out_stage_indices(&self) -> Vec<usize> {
        let n = self.num_hidden_layers as i64 + 1;
        self.out_indices.iter().map(|&i| if i < 0 { (i + n) as usize } else { i as usize }).collect()
    }

    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Patches along (height, width) at the configured image size.
    pub fn patch_grid(&self) -> (usize, usize) {
        (self.image_size.height / self.patch_size.height, self.image_size.width / self.patch_size.width)
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_channels", self.num_channels),
            ("vocab_size", self.vocab_size),
            ("image_size", self.image_size.height.min(self.image_size.width)),
            ("patch_size", self.patch_size.height.min(self.patch_size.width)),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(BeitError::config(field, "must be positive, found 0"));
            }
        }
        let bounded = [
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, 4 * MAX_DIM),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_channels", self.num_channels, 1024),
            ("vocab_size", self.vocab_size, 1 << 20),
            ("image_size", self.image_size.height.max(self.image_size.width), MAX_DIM),
            ("auxiliary_channels", self.auxiliary_channels, MAX_DIM),
            ("num_labels", self.id2label.len(), MAX_NUM_LABELS),
        ];
        for (field, v, max) in bounded {
            if v > max {
                return Err(BeitError::config(field, format!("{v} is larger than the supported maximum {max}")));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(BeitError::config(
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.patch_size.height > self.image_size.height || self.patch_size.width > self.image_size.width {
            return Err(BeitError::config(
                "patch_size",
                format!(
                    "{}x{} is larger than image_size {}x{}",
                    self.patch_size.height, self.patch_size.width, self.image_size.height, self.image_size.width
                ),
            ));
        }
        for (field, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
            ("drop_path_rate", self.drop_path_rate),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(BeitError::config(field, format!("must be in [0, 1), found {p}")));
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(BeitError::config("layer_norm_eps", format!("must be positive, found {}", self.layer_norm_eps)));
        }
        if !self.layer_scale_init_value.is_finite() || self.layer_scale_init_value < 0.0 {
            return Err(BeitError::config(
                "layer_scale_init_value",
                format!("must be >= 0, found {}", self.layer_scale_init_value),
            ));
        }
        if self.pool_scales.iter().any(|&s| s == 0) {
            return Err(BeitError::config("pool_scales", format!("scales must be positive, found {:?}", self.pool_scales)));
        }
        if let Some(p) = &self.problem_type {
            if !["regression", "single_label_classification", "multi_label_classification"].contains(&p.as_str()) {
                return Err(BeitError::config("problem_type", format!("unknown problem type {p:?}")));
            }
        }
        Ok(())
    }

    /// config.json as transformers writes it (sorted keys, id2label and label2id, stage_names).
    pub fn to_json(&self) -> Value {
        let mut m: BTreeMap<String, Value> = self.extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        let is_d2v = self.is_data2vec();
        put("model_type", json!(self.model_type));
        if !is_d2v {
            put("vocab_size", json!(self.vocab_size));
        }
        put("hidden_size", json!(self.hidden_size));
        put("num_hidden_layers", json!(self.num_hidden_layers));
        put("num_attention_heads", json!(self.num_attention_heads));
        put("intermediate_size", json!(self.intermediate_size));
        put("hidden_act", json!(self.hidden_act.name()));
        put("hidden_dropout_prob", json!(self.hidden_dropout_prob));
        put("attention_probs_dropout_prob", json!(self.attention_probs_dropout_prob));
        put("initializer_range", json!(self.initializer_range));
        put("layer_norm_eps", json!(self.layer_norm_eps));
        put("image_size", self.image_size.to_json());
        put("patch_size", self.patch_size.to_json());
        put("num_channels", json!(self.num_channels));
        put("use_mask_token", json!(self.use_mask_token));
        put("use_absolute_position_embeddings", json!(self.use_absolute_position_embeddings));
        put("use_relative_position_bias", json!(self.use_relative_position_bias));
        put("use_shared_relative_position_bias", json!(self.use_shared_relative_position_bias));
        put("layer_scale_init_value", json!(self.layer_scale_init_value));
        put("drop_path_rate", json!(self.drop_path_rate));
        put("use_mean_pooling", json!(self.use_mean_pooling));
        put("pool_scales", json!(self.pool_scales));
        put("use_auxiliary_head", json!(self.use_auxiliary_head));
        put("auxiliary_loss_weight", json!(self.auxiliary_loss_weight));
        put("auxiliary_channels", json!(self.auxiliary_channels));
        put("auxiliary_num_convs", json!(self.auxiliary_num_convs));
        put("auxiliary_concat_input", json!(self.auxiliary_concat_input));
        put("semantic_loss_ignore_index", json!(self.semantic_loss_ignore_index));
        put("out_indices", json!(self.out_indices));
        if !is_d2v {
            put("out_features", json!(self.out_features));
            put("stage_names", json!(self.stage_names()));
            put("add_fpn", json!(self.add_fpn));
            put("reshape_hidden_states", json!(self.reshape_hidden_states));
            if self.batch_norm_eps != 1e-5 {
                put("batch_norm_eps", json!(self.batch_norm_eps));
            }
        }
        let id2label: BTreeMap<String, &String> = self.id2label.iter().map(|(k, v)| (k.to_string(), v)).collect();
        let label2id: BTreeMap<&String, usize> = self.id2label.iter().map(|(k, v)| (v, *k)).collect();
        put("id2label", json!(id2label));
        put("label2id", json!(label2id));
        if let Some(a) = &self.architectures {
            put("architectures", json!(a));
        }
        if let Some(p) = &self.problem_type {
            put("problem_type", json!(p));
        }
        if self.output_hidden_states {
            put("output_hidden_states", json!(true));
        }
        if self.output_attentions {
            put("output_attentions", json!(true));
        }
        Value::Object(m.into_iter().collect())
    }

    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.to_json()).unwrap_or_default() // ok: a Value always serializes
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json_string() + "\n").map_err(|e| BeitError::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_transformers() {
        let c = BeitConfig::from_json_str("{}").unwrap();
        assert_eq!(c.hidden_size, 768);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.out_features, vec!["stage12"]);
        assert_eq!(c.out_indices, vec![12]);
        assert_eq!(c.num_labels(), 2);
        assert!(c.use_mean_pooling && !c.use_mask_token);
    }

    #[test]
    fn round_trip_keeps_unknown_keys_and_labels() {
        let text = r#"{"hidden_size": 64, "num_attention_heads": 4, "custom_key": {"a": [1, 2]},
            "id2label": {"0": "cat", "1": "dog", "2": "bird"}, "image_size": [32, 48], "out_indices": [1, 2],
            "architectures": ["BeitForImageClassification"], "transformers_version": "4.57.6"}"#;
        let c = BeitConfig::from_json_str(text).unwrap();
        assert_eq!(c.num_labels(), 3);
        assert_eq!(c.out_features, vec!["stage1", "stage2"]);
        let back = BeitConfig::from_json(c.to_json()).unwrap();
        assert_eq!(back, c);
        let v = c.to_json();
        assert_eq!(v["custom_key"], json!({"a": [1, 2]}));
        assert_eq!(v["label2id"]["dog"], json!(1));
        assert_eq!(v["image_size"], json!([32, 48]));
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            (r#"{"hidden_size": 30, "num_attention_heads": 4}"#, "hidden_size"),
            (r#"{"hidden_size": 0}"#, "hidden_size"),
            (r#"{"hidden_act": "gelu_magic"}"#, "hidden_act"),
            (r#"{"hidden_size": "big"}"#, "hidden_size"),
            (r#"{"use_mean_pooling": 3}"#, "use_mean_pooling"),
            (r#"{"num_hidden_layers": 1000000000}"#, "num_hidden_layers"),
            (r#"{"out_indices": [20]}"#, "out_indices"),
            (r#"{"patch_size": 500}"#, "patch_size"),
            (r#"{"id2label": {"x": "cat"}}"#, "id2label"),
            (r#"{"image_size": [1, 2, 3]}"#, "image_size"),
        ];
        for (text, field) in cases {
            let err = BeitConfig::from_json_str(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        assert!(BeitConfig::from_json_str("[1]").is_err());
        assert!(BeitConfig::from_json_str("{").is_err());
    }

    #[test]
    fn data2vec_defaults_and_round_trip() {
        // What Data2VecVisionConfig.save_pretrained writes for a 2-layer model: out_indices beyond the layers.
        let text = r#"{"model_type": "data2vec-vision", "num_hidden_layers": 2, "hidden_size": 32,
            "num_attention_heads": 4, "custom": 1}"#;
        let c = BeitConfig::from_json_str(text).unwrap();
        assert!(c.is_data2vec());
        assert_eq!(c.base_model_prefix(), "data2vec_vision");
        assert_eq!(c.out_indices, vec![3, 5, 7, 11]);
        assert!(c.out_features.is_empty());
        let v = c.to_json();
        for key in ["vocab_size", "out_features", "stage_names", "add_fpn", "reshape_hidden_states"] {
            assert!(v.get(key).is_none(), "{key} written for data2vec-vision");
        }
        assert_eq!(v["out_indices"], json!([3, 5, 7, 11]));
        assert_eq!(BeitConfig::from_json(v).unwrap(), c);
        // A BEiT-only key in a data2vec config is an unknown key, kept as it was.
        let c = BeitConfig::from_json_str(r#"{"model_type": "data2vec-vision", "vocab_size": 5, "add_fpn": "x"}"#).unwrap();
        assert_eq!(c.to_json()["vocab_size"], json!(5));
        assert_eq!(c.to_json()["add_fpn"], json!("x"));
    }

    #[test]
    fn unknown_model_types_and_timm_configs_are_errors() {
        let e = BeitConfig::from_json_str(r#"{"model_type": "vit"}"#).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("\"vit\"") && e.contains("data2vec-vision"), "{e}");
        let e = BeitConfig::from_json_str(r#"{"architecture": "beit_base_patch16_224", "num_classes": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("timm") && e.contains("beit_base_patch16_224"), "{e}");
    }

    #[test]
    fn num_labels_without_id2label() {
        let c = BeitConfig::from_json_str(r#"{"num_labels": 4}"#).unwrap();
        assert_eq!(c.id2label.get(&3).map(String::as_str), Some("LABEL_3"));
    }

    /// Fuzz regression (fuzz target config_json): a huge `num_labels` is refused before building its labels.
    #[test]
    fn fuzz_huge_num_labels_is_refused_without_allocating() {
        let text = include_str!("../tests/fixtures/fuzz/config_huge_num_labels.json");
        let e = BeitConfig::from_json_str(text).unwrap_err().to_string();
        assert!(e.contains("num_labels") && e.contains("999932999932"), "{e}");
    }
}
