//! `BeitConfig`: transformers' BeitConfig (plus the PretrainedConfig fields BEiT uses), read from and written to
//! config.json through serde with the same names and defaults. Unknown keys survive a round trip.
//!
//! serde_path_to_error says which key (and which element in it) serde refused; `field_error` words that in
//! config.json's terms: the field, what it takes, and what the file has there.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::{DeserializeOwned, Error as _, Unexpected};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::error::{BeitError, Result};

/// transformers' activation names (ACT2FN). `prelu` and `xielu` carry weights of their own and are not BEiT's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum HiddenAct {
    /// `gelu`: exact GELU (erf).
    Gelu,
    /// `gelu_10`: exact GELU clipped to [-10, 10].
    Gelu10,
    /// `gelu_fast`: GELU's tanh approximation, written another way.
    GeluFast,
    /// `gelu_new`: GELU's tanh approximation (GPT-2's).
    GeluNew,
    /// `gelu_python`: exact GELU, written in Python.
    GeluPython,
    /// `gelu_pytorch_tanh`: GELU's tanh approximation, torch's.
    GeluPytorchTanh,
    /// `gelu_python_tanh`: GELU's tanh approximation, written in Python.
    GeluPythonTanh,
    /// `gelu_accurate`: GELU's tanh approximation with π computed in full.
    GeluAccurate,
    /// `laplace`: the Laplace activation.
    Laplace,
    /// `leaky_relu`: LeakyReLU with slope 0.01.
    LeakyRelu,
    /// `linear`: the identity.
    Linear,
    /// `mish`: x·tanh(softplus(x)).
    Mish,
    /// `quick_gelu`: x·sigmoid(1.702x).
    QuickGelu,
    /// `relu`.
    Relu,
    /// `relu2`: ReLU squared.
    Relu2,
    /// `relu6`: ReLU clipped at 6.
    Relu6,
    /// `sigmoid`.
    Sigmoid,
    /// `silu`: x·sigmoid(x).
    Silu,
    /// `swish`: silu under another name.
    Swish,
    /// `tanh`.
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

    /// The activation transformers calls `name`.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::try_from(name.to_string()).map_err(|message| BeitError::config("hidden_act", message))
    }

    /// transformers' name for it.
    pub fn name(&self) -> &'static str {
        Self::NAMES.iter().find(|(_, a)| a == self).map(|(n, _)| *n).unwrap_or("gelu") // ok: every variant is named
    }
}

/// Reads `hidden_act`.
impl TryFrom<String> for HiddenAct {
    type Error = String;

    fn try_from(name: String) -> std::result::Result<Self, String> {
        Self::NAMES.iter().find(|(n, _)| *n == name).map(|(_, a)| *a).ok_or_else(|| {
            let known: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
            format!("unknown activation {name:?}; expected one of {}", known.join(", "))
        })
    }
}

/// Writes `hidden_act`.
impl From<HiddenAct> for &'static str {
    fn from(act: HiddenAct) -> Self {
        act.name()
    }
}

/// An int or a [height, width] pair, written back in the form it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size2 {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Read, and written, as [height, width] rather than one int.
    pub as_pair: bool,
}

impl Size2 {
    /// n by n, written as one int.
    pub fn square(n: usize) -> Self {
        Size2 { height: n, width: n, as_pair: false }
    }
}

impl Serialize for Size2 {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.as_pair {
            [self.height, self.width].serialize(s)
        } else {
            self.height.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Size2 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let int = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
        let size = match &v {
            Value::Array(p) if p.len() == 2 => {
                int(&p[0]).zip(int(&p[1])).map(|(height, width)| Size2 { height, width, as_pair: true })
            }
            _ => int(&v).map(Size2::square),
        };
        // field_error shows the value from the file: `Unexpected` only has to be something.
        size.ok_or_else(|| D::Error::invalid_value(Unexpected::Other("a value"), &"an integer or [height, width]"))
    }
}

/// The `model_type` of BEiT.
pub const BEIT: &str = "beit";
/// The `model_type` of Data2VecVision, whose models are BEiT's under other names.
pub const DATA2VEC_VISION: &str = "data2vec-vision";
/// The `model_type`s beit-rs builds.
pub const MODEL_TYPES: [&str; 2] = [BEIT, DATA2VEC_VISION];

/// Data2VecVisionConfig's out_indices default (BeitConfig's aligns to the last stage instead).
const DATA2VEC_OUT_INDICES: [i64; 4] = [3, 5, 7, 11];

/// The keys BeitConfig declares and Data2VecVisionConfig does not (no MIM head, no backbone, no out_features
/// alignment): in a data2vec-vision config they are unknown keys, kept and written back as they were.
const BEIT_ONLY: [&str; 6] =
    ["vocab_size", "out_features", "segmentation_indices", "add_fpn", "reshape_hidden_states", "batch_norm_eps"];

/// The FPN's BatchNorm epsilon when config.json has none (torch's default), and then not written.
const BATCH_NORM_EPS: f64 = 1e-5;

/// Upper bound on widths and image sides, so that a hostile config.json cannot ask for absurd allocations.
pub const MAX_DIM: usize = 1 << 16;
/// Upper bound on num_hidden_layers.
pub const MAX_LAYERS: usize = 1024;
/// Upper bound on the number of labels.
pub const MAX_NUM_LABELS: usize = 1 << 20;

/// transformers' BeitConfig, or Data2VecVisionConfig when `model_type` is "data2vec-vision". Read it with
/// [`BeitConfig::from_file`] or [`BeitConfig::from_json`]: the derived `Deserialize` alone types the fields but
/// neither validates them nor derives what transformers derives (labels from num_labels, aligned out_features,
/// Data2VecVision's defaults); [`BeitConfig::to_json`] writes what transformers writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BeitConfig {
    /// "beit" or "data2vec-vision" ([`MODEL_TYPES`]).
    pub model_type: String,
    /// The visual tokens the masked-image-modeling head predicts (BEiT only).
    pub vocab_size: usize,
    /// The encoder's width.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// The MLP's hidden width.
    pub intermediate_size: usize,
    /// The MLP's activation.
    pub hidden_act: HiddenAct,
    /// Dropout on the attention and MLP outputs (training).
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities (training).
    pub attention_probs_dropout_prob: f64,
    /// Standard deviation of the initial weights.
    pub initializer_range: f64,
    /// LayerNorm's epsilon.
    pub layer_norm_eps: f64,
    /// The input's size.
    pub image_size: Size2,
    /// The patches' size.
    pub patch_size: Size2,
    /// The input's channels.
    pub num_channels: usize,
    /// Whether the embeddings have a mask token (masked image modeling).
    pub use_mask_token: bool,
    /// Learned absolute position embeddings.
    pub use_absolute_position_embeddings: bool,
    /// A relative position bias in each layer.
    pub use_relative_position_bias: bool,
    /// One relative position bias shared by all layers.
    pub use_shared_relative_position_bias: bool,
    /// LayerScale's initial value (0: no LayerScale).
    pub layer_scale_init_value: f64,
    /// Stochastic depth at the last layer (training).
    pub drop_path_rate: f64,
    /// Pool the patch tokens' mean (else the CLS token).
    pub use_mean_pooling: bool,
    /// The scales of the UperNet decode head's pyramid pooling.
    pub pool_scales: Vec<usize>,
    /// Whether segmentation has the FCN auxiliary head.
    pub use_auxiliary_head: bool,
    /// The auxiliary head's weight in the loss.
    pub auxiliary_loss_weight: f64,
    /// The auxiliary head's channels.
    pub auxiliary_channels: usize,
    /// The auxiliary head's convolutions.
    pub auxiliary_num_convs: usize,
    /// Whether the auxiliary head concatenates its input to its convolutions' output.
    pub auxiliary_concat_input: bool,
    /// The label the segmentation loss ignores.
    pub semantic_loss_ignore_index: i64,
    /// Backbone stages ("stem", "stage1", …) and their indices, aligned as transformers aligns them.
    #[serde(deserialize_with = "null_as_default")]
    pub out_features: Vec<String>,
    /// The stages' indices, negative ones from the end (`segmentation_indices`: transformers' deprecated name).
    #[serde(alias = "segmentation_indices", deserialize_with = "null_as_default")]
    pub out_indices: Vec<i64>,
    /// Whether BeitBackbone adds its feature pyramid.
    pub add_fpn: bool,
    /// Whether BeitBackbone outputs feature maps (else token sequences).
    pub reshape_hidden_states: bool,
    /// Read by BeitBackbone's FPN without being declared by BeitConfig.
    #[serde(skip_serializing_if = "is_default_batch_norm_eps")]
    pub batch_norm_eps: f64,
    /// PretrainedConfig's class names by id (label2id and num_labels are derived from it).
    #[serde(deserialize_with = "id2label")]
    pub id2label: BTreeMap<usize, String>,
    /// PretrainedConfig's model classes the checkpoint is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// PretrainedConfig's classification loss: regression, single_label_classification or
    /// multi_label_classification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem_type: Option<String>,
    /// PretrainedConfig's: whether forward returns every layer's hidden states.
    #[serde(skip_serializing_if = "is_false")]
    pub output_hidden_states: bool,
    /// PretrainedConfig's: whether forward returns every layer's attention probabilities.
    #[serde(skip_serializing_if = "is_false")]
    pub output_attentions: bool,
    /// Every other key of config.json, kept for the round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for BeitConfig {
    /// transformers' `BeitConfig()`.
    fn default() -> Self {
        let mut c = BeitConfig {
            model_type: BEIT.into(),
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
            batch_norm_eps: BATCH_NORM_EPS,
            id2label: default_labels(2),
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

/// transformers' label names for `n` classes when id2label is not given: LABEL_0, LABEL_1, ...
pub fn default_labels(n: usize) -> BTreeMap<usize, String> {
    (0..n).map(|i| (i, format!("LABEL_{i}"))).collect()
}

/// transformers' `num_labels` argument: not a field, the number of default labels when id2label is not given.
#[derive(Deserialize)]
struct NumLabels {
    num_labels: Option<usize>,
}

/// `null` reads as not given.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// id2label's ids are JSON object keys, so strings: "0", "1", ...
fn id2label<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<BTreeMap<usize, String>, D::Error> {
    let raw: Option<BTreeMap<String, String>> = Option::deserialize(d)?;
    let parse = |(k, v): (String, String)| match k.parse() {
        Ok(id) => Ok((id, v)),
        Err(_) => Err(D::Error::custom(format!("expected integer keys, found {k:?}"))),
    };
    raw.unwrap_or_default().into_iter().map(parse).collect()
}

fn is_false(b: &bool) -> bool {
    !b
}

fn is_default_batch_norm_eps(eps: &f64) -> bool {
    *eps == BATCH_NORM_EPS
}

/// Deserializes `T` from config.json's keys; a value serde refuses becomes an error naming its field.
fn parse<T: DeserializeOwned>(m: &Map<String, Value>) -> Result<T> {
    serde_path_to_error::deserialize(m).map_err(|e| field_error(m, e))
}

/// serde's refusal in config.json's terms: the field (and where in it), what the field takes, and what the file
/// has there. serde words type errors "invalid type: <found>, expected <Rust type>" (serde::de::Error's provided
/// methods, which serde_json keeps): the Rust type is translated, the found value shown from `m` itself. Other
/// messages (the custom ones here, hidden_act's) pass through.
fn field_error(m: &Map<String, Value>, e: serde_path_to_error::Error<serde_json::Error>) -> BeitError {
    use serde_path_to_error::Segment;
    let path = e.path();
    let mut segments = path.iter();
    let field = match segments.next() {
        Some(Segment::Map { key }) => key.clone(),
        _ => "<root>".to_string(),
    };
    let mut found = m.get(&field);
    for segment in segments {
        found = match segment {
            Segment::Seq { index } => found.and_then(|v| v.get(index)),
            Segment::Map { key } => found.and_then(|v| v.get(key)),
            _ => None,
        };
    }
    let serde_says = e.inner().to_string();
    let message = match (serde_says.split_once(", expected "), found) {
        (Some((head, expected)), Some(v)) if head.starts_with("invalid ") => {
            let expected = match expected {
                "usize" | "u64" => "a non-negative integer",
                "i64" => "an integer",
                "f64" => "a number",
                "a boolean" => "true or false",
                "a sequence" => "a list",
                "a map" => "an object",
                other => other,
            };
            format!("expected {expected}, found {}", describe(v))
        }
        _ => serde_says,
    };
    let at = if path.iter().count() > 1 { format!("at {path}: ") } else { String::new() };
    BeitError::config(field, at + &message)
}

/// A JSON value as a message shows it: what kind of value, then the value.
fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => return "null".into(),
        Value::Bool(_) => "the boolean",
        Value::Number(_) => "the number",
        Value::String(_) => "the string",
        Value::Array(_) => "the list",
        Value::Object(_) => "the object",
    };
    format!("{kind} {v}")
}

impl BeitConfig {
    /// Reads config.json; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BeitError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            BeitError::Json { message, .. } => BeitError::Json { path: path.to_path_buf(), message },
            BeitError::Config { field, message } => BeitError::ConfigFile { path: path.to_path_buf(), field, message },
            other => other,
        })
    }

    /// Reads config.json's text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| BeitError::Json { path: "config.json".into(), message: e.to_string() })?;
        Self::from_json(value)
    }

    /// Reads config.json's JSON as transformers does: typed and validated fields, labels from num_labels when
    /// id2label is not given, out_features and out_indices aligned, Data2VecVisionConfig's keys and defaults for a
    /// data2vec-vision config; every other key kept in `extra`.
    pub fn from_json(value: Value) -> Result<Self> {
        let Value::Object(mut m) = value else {
            return Err(BeitError::config("<root>", format!("expected a JSON object, found {}", describe(&value))));
        };
        if let (Some(architecture), None) = (m.get("architecture"), m.get("model_type")) {
            return Err(BeitError::config(
                "model_type",
                format!(
                    "missing, and \"architecture\": {architecture} says this is timm's config.json, not \
                     transformers'; load the model directory (load_pretrained maps timm checkpoints)"
                ),
            ));
        }
        // A model_type that is not a string is refused with the other fields' types below.
        let model_type = m.get("model_type").and_then(Value::as_str);
        if let Some(t) = model_type.filter(|t| !MODEL_TYPES.contains(t)) {
            return Err(BeitError::config(
                "model_type",
                format!("unknown model type {t:?}; beit-rs loads {}", MODEL_TYPES.join(", ")),
            ));
        }
        let is_d2v = model_type == Some(DATA2VEC_VISION);
        m.remove("label2id"); // derived from id2label
        let kept: Map<String, Value> =
            if is_d2v { BEIT_ONLY.iter().filter_map(|k| m.remove_entry(*k)).collect() } else { Map::new() };
        if !is_d2v {
            m.remove("stage_names"); // derived from num_hidden_layers
            // The deprecated name wins, as in transformers.
            if m.get("segmentation_indices").is_some_and(|v| !v.is_null()) {
                m.remove("out_indices");
            } else {
                m.remove("segmentation_indices");
            }
        }
        let given = |key: &str| m.get(key).is_some_and(|v| !v.is_null());
        let (labels_given, features_given) = (given("id2label"), given("out_features"));
        let indices_given = given("out_indices") || given("segmentation_indices");
        let NumLabels { num_labels } = parse(&m)?;
        m.remove("num_labels"); // an argument, not saved
        // Bounded before the default labels are built from it (found by fuzzing: `"num_labels": 999932999932`
        // allocated ~30 TB); the same bound `validate` puts on the number of labels.
        if let Some(n) = num_labels.filter(|&n| n > MAX_NUM_LABELS) {
            return Err(BeitError::config("num_labels", format!("{n} is larger than the supported maximum {MAX_NUM_LABELS}")));
        }
        let mut c: BeitConfig = parse(&m)?;
        c.extra.extend(kept);
        if !labels_given {
            c.id2label = default_labels(num_labels.unwrap_or(2));
        }
        c.validate()?;
        if is_d2v {
            // Kept as given: only Data2VecVisionForSemanticSegmentation reads them, and checks them when built.
            c.out_features = vec![];
            if !indices_given {
                c.out_indices = DATA2VEC_OUT_INDICES.to_vec();
            }
        } else {
            let features = features_given.then(|| std::mem::take(&mut c.out_features));
            let indices = indices_given.then(|| std::mem::take(&mut c.out_indices));
            c.align_out_features(features, indices)?;
        }
        Ok(c)
    }

    /// Whether this is a Data2VecVision config.
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

    /// Backbone stage names: "stem", then "stage1" to "stage{num_hidden_layers}".
    pub fn stage_names(&self) -> Vec<String> {
        std::iter::once("stem".to_string()).chain((1..=self.num_hidden_layers).map(|i| format!("stage{i}"))).collect()
    }

    /// out_indices as non-negative stage numbers (0 = embeddings, i = output of layer i).
    pub fn out_stage_indices(&self) -> Vec<usize> {
        let n = self.num_hidden_layers as i64 + 1;
        self.out_indices.iter().map(|&i| if i < 0 { (i + n) as usize } else { i as usize }).collect()
    }

    /// The classifier's classes.
    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    /// The width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Patches along (height, width) at the configured image size.
    pub fn patch_grid(&self) -> (usize, usize) {
        (self.image_size.height / self.patch_size.height, self.image_size.width / self.patch_size.width)
    }

    /// Checks every value's domain, and bounds the sizes a hostile config.json could make absurd.
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

    /// config.json as transformers writes it: keys sorted, label2id beside id2label, stage_names; a data2vec-vision
    /// config without the keys only BeitConfig declares, unless it was read with them.
    pub fn to_json(&self) -> Value {
        // ok: numbers, strings, lists and maps with string or integer keys always serialize (NaN as null).
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Value::Object(m) = &mut v {
            if self.is_data2vec() {
                for key in BEIT_ONLY.iter().filter(|k| !self.extra.contains_key(**k)) {
                    m.remove(*key);
                }
            } else {
                m.insert("stage_names".into(), json!(self.stage_names()));
            }
            let label2id: BTreeMap<&String, usize> = self.id2label.iter().map(|(k, v)| (v, *k)).collect();
            m.insert("label2id".into(), json!(label2id));
        }
        v.sort_all_objects();
        v
    }

    /// [`BeitConfig::to_json`], indented.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.to_json()).unwrap_or_default() // ok: a Value always serializes
    }

    /// Writes config.json.
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

    /// A wrong type names the field (and the element in it), what the field takes and what the file has there; read
    /// from a file, the error names the file too.
    #[test]
    fn type_errors_say_what_was_expected_and_found() {
        for (text, want) in [
            (r#"{"hidden_size": "768"}"#, r#"field `hidden_size`: expected a non-negative integer, found the string "768""#),
            (r#"{"semantic_loss_ignore_index": 1.5}"#, "expected an integer, found the number 1.5"),
            (r#"{"layer_norm_eps": null}"#, "`layer_norm_eps`: expected a number, found null"),
            (r#"{"use_mask_token": 1}"#, "`use_mask_token`: expected true or false, found the number 1"),
            (r#"{"pool_scales": [1, "a"]}"#, r#"at pool_scales[1]: expected a non-negative integer, found the string "a""#),
            (r#"{"architectures": "BeitModel"}"#, r#"`architectures`: expected a list, found the string "BeitModel""#),
            (r#"{"id2label": {"0": 3}}"#, "`id2label`: at id2label.0: expected a string, found the number 3"),
            (r#"{"id2label": {"x": "cat"}}"#, r#"`id2label`: expected integer keys, found "x""#),
            (r#"{"image_size": [1, 2, 3]}"#, "expected an integer or [height, width], found the list [1,2,3]"),
            (r#"{"hidden_act": "gelu_magic"}"#, r#"unknown activation "gelu_magic"; expected one of gelu, gelu_10,"#),
            (r#"{"segmentation_indices": ["x"]}"#, "`segmentation_indices`: at segmentation_indices[0]: expected an integer"),
            (r#"{"num_labels": -1}"#, "`num_labels`: expected a non-negative integer, found the number -1"),
            (r#"{"model_type": 3}"#, "`model_type`: expected a string, found the number 3"),
        ] {
            let e = BeitConfig::from_json_str(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let path = std::env::temp_dir().join(format!("beit-config-test-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"hidden_size": "768"}"#).unwrap();
        let e = BeitConfig::from_file(&path).unwrap_err();
        std::fs::remove_file(&path).ok();
        assert!(matches!(&e, BeitError::ConfigFile { field, .. } if field == "hidden_size"), "{e}");
        assert!(e.to_string().starts_with(&format!("{}: field `hidden_size`: expected", path.display())), "{e}");
    }

    /// What transformers derives rather than reads: the deprecated segmentation_indices wins over out_indices, null
    /// reads as not given, label2id and stage_names are recomputed, keys are written sorted, batch_norm_eps and the
    /// output_* flags only when not their defaults. Data2VecVisionConfig keeps BEiT-only keys as they were.
    #[test]
    fn derived_deprecated_and_data2vec_keys() {
        let c = BeitConfig::from_json_str(
            r#"{"segmentation_indices": [3, 5], "out_indices": [1], "out_features": null, "label2id": {"x": 9},
            "stage_names": ["x"], "num_hidden_layers": 6, "id2label": {"10": "k", "2": "c"}, "num_labels": 7}"#,
        )
        .unwrap();
        assert_eq!(c.out_indices, [3, 5]);
        assert_eq!(c.out_features, ["stage3", "stage5"]);
        assert!(c.extra.is_empty(), "{:?}", c.extra);
        let v = c.to_json();
        assert_eq!(v["label2id"], json!({"c": 2, "k": 10}));
        assert_eq!(v["stage_names"], json!(["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6"]));
        for key in ["segmentation_indices", "num_labels", "batch_norm_eps", "output_attentions", "problem_type"] {
            assert!(v.get(key).is_none(), "{key}");
        }
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        assert_eq!(v["id2label"].as_object().unwrap().keys().collect::<Vec<_>>(), ["10", "2"]);
        let v = BeitConfig::from_json_str(r#"{"batch_norm_eps": 0.001, "output_attentions": true}"#).unwrap().to_json();
        assert_eq!((&v["batch_norm_eps"], &v["output_attentions"]), (&json!(0.001), &json!(true)));

        let text = r#"{"model_type": "data2vec-vision", "segmentation_indices": [1], "stage_names": ["x"],
            "out_features": ["stage1"], "batch_norm_eps": "x", "num_labels": 3}"#;
        let c = BeitConfig::from_json_str(text).unwrap();
        assert_eq!((c.out_indices.clone(), c.out_features.len(), c.num_labels()), (vec![3, 5, 7, 11], 0, 3));
        let v = c.to_json();
        assert_eq!((&v["segmentation_indices"], &v["stage_names"]), (&json!([1]), &json!(["x"])));
        assert_eq!((&v["out_features"], &v["batch_norm_eps"]), (&json!(["stage1"]), &json!("x")));
        assert_eq!(BeitConfig::from_json(v).unwrap(), c);
    }
}
