//! The task heads on top of BeitModel, and `AnyBeitModel`: the class a checkpoint's `architectures` names.

pub mod backbone;
pub mod image_classification;
pub mod loss;
pub mod masked_image_modeling;
pub mod semantic_segmentation;

use candle_core::Tensor;

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::model::{BeitModel, ForwardOptions, Inference};
use crate::weights::Weights;
pub use backbone::BeitBackbone;
pub use image_classification::BeitForImageClassification;
pub use masked_image_modeling::BeitForMaskedImageModeling;
pub use semantic_segmentation::BeitForSemanticSegmentation;

/// transformers' class names for what beit-rs can build. The Data2VecVision classes are BEiT's with another
/// weight prefix (`data2vec_vision.`), and Data2VecVisionModel has no pooler unless a head asks for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// transformers' `BeitModel`.
    BeitModel,
    /// transformers' `BeitForMaskedImageModeling`.
    BeitForMaskedImageModeling,
    /// transformers' `BeitForImageClassification`.
    BeitForImageClassification,
    /// transformers' `BeitForSemanticSegmentation`.
    BeitForSemanticSegmentation,
    /// transformers' `BeitBackbone`.
    BeitBackbone,
    /// transformers' `Data2VecVisionModel`.
    Data2VecVisionModel,
    /// transformers' `Data2VecVisionForImageClassification`.
    Data2VecVisionForImageClassification,
    /// transformers' `Data2VecVisionForSemanticSegmentation`.
    Data2VecVisionForSemanticSegmentation,
}

impl Architecture {
    /// Every class, in a fixed order.
    pub const ALL: [Architecture; 8] = [
        Architecture::BeitModel,
        Architecture::BeitForMaskedImageModeling,
        Architecture::BeitForImageClassification,
        Architecture::BeitForSemanticSegmentation,
        Architecture::BeitBackbone,
        Architecture::Data2VecVisionModel,
        Architecture::Data2VecVisionForImageClassification,
        Architecture::Data2VecVisionForSemanticSegmentation,
    ];

    /// transformers' class name.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::BeitModel => "BeitModel",
            Architecture::BeitForMaskedImageModeling => "BeitForMaskedImageModeling",
            Architecture::BeitForImageClassification => "BeitForImageClassification",
            Architecture::BeitForSemanticSegmentation => "BeitForSemanticSegmentation",
            Architecture::BeitBackbone => "BeitBackbone",
            Architecture::Data2VecVisionModel => "Data2VecVisionModel",
            Architecture::Data2VecVisionForImageClassification => "Data2VecVisionForImageClassification",
            Architecture::Data2VecVisionForSemanticSegmentation => "Data2VecVisionForSemanticSegmentation",
        }
    }

    /// The class transformers calls `name` (Flax names map to the PyTorch class with the same weights).
    pub fn from_name(name: &str) -> Result<Self> {
        // Flax classes share the PyTorch ones' weights and outputs.
        let name = name.strip_prefix("Flax").unwrap_or(name);
        Self::ALL.iter().copied().find(|a| a.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
            BeitError::config("architectures", format!("unknown class {name:?}; expected one of {}", known.join(", ")))
        })
    }

    /// The class config.json's `architectures` names (BeitModel when it names none).
    pub fn from_config(c: &BeitConfig) -> Result<Self> {
        match c.architectures.as_deref() {
            Some([first, ..]) => Self::from_name(first),
            _ => Ok(Architecture::BeitModel),
        }
    }

    /// Head classes keep the backbone under `beit.` (`data2vec_vision.`); the bare models keep it at the top.
    pub fn has_base_prefix(&self) -> bool {
        !matches!(self, Architecture::BeitModel | Architecture::BeitBackbone | Architecture::Data2VecVisionModel)
    }

    /// The same task in the family a config's `model_type` names: the class picks the task, the checkpoint the
    /// family (so `--head BeitModel` on a data2vec-vision checkpoint builds Data2VecVisionModel). Data2VecVision
    /// has no masked-image-modeling head and no backbone in transformers: asking for one is an error.
    pub fn for_model_type(self, model_type: &str) -> Result<Self> {
        use Architecture::*;
        if model_type != crate::config::DATA2VEC_VISION {
            return Ok(match self {
                Data2VecVisionModel => BeitModel,
                Data2VecVisionForImageClassification => BeitForImageClassification,
                Data2VecVisionForSemanticSegmentation => BeitForSemanticSegmentation,
                other => other,
            });
        }
        match self {
            BeitModel | Data2VecVisionModel => Ok(Data2VecVisionModel),
            BeitForImageClassification | Data2VecVisionForImageClassification => Ok(Data2VecVisionForImageClassification),
            BeitForSemanticSegmentation | Data2VecVisionForSemanticSegmentation => {
                Ok(Data2VecVisionForSemanticSegmentation)
            }
            BeitForMaskedImageModeling | BeitBackbone => Err(BeitError::config(
                "architectures",
                format!(
                    "{} has no Data2VecVision counterpart in transformers (model_type {:?}); expected one of \
                     Data2VecVisionModel, Data2VecVisionForImageClassification, Data2VecVisionForSemanticSegmentation",
                    self.name(),
                    model_type
                ),
            )),
        }
    }
}

/// A loaded model of any class: what `Pretrained` holds when the class is only known from the checkpoint.
#[derive(Debug, Clone)]
pub enum AnyBeitModel {
    /// The bare encoder.
    Model(BeitModel),
    /// Masked image modeling head.
    MaskedImageModeling(BeitForMaskedImageModeling),
    /// Image classification head.
    ImageClassification(BeitForImageClassification),
    /// Semantic segmentation heads.
    SemanticSegmentation(BeitForSemanticSegmentation),
    /// Backbone (feature maps).
    Backbone(BeitBackbone),
}

/// Inputs for any class: pixel values, options, and optional labels.
#[derive(Debug, Clone, Default)]
pub struct ModelInputs {
    /// What the forward computes and returns.
    pub options: ForwardOptions,
    /// Labels for the loss, in the shape the head expects.
    pub labels: Option<Tensor>,
}

impl AnyBeitModel {
    /// Builds the class `arch` from `w` (the Data2VecVision classes from BEiT's with their prefix).
    pub fn load(w: &Weights, c: &BeitConfig, arch: Architecture) -> Result<Self> {
        Ok(match arch.for_model_type(&c.model_type)? {
            Architecture::BeitModel => AnyBeitModel::Model(BeitModel::load(w, c, true)?),
            Architecture::BeitForMaskedImageModeling => {
                AnyBeitModel::MaskedImageModeling(BeitForMaskedImageModeling::load(w, c)?)
            }
            Architecture::BeitForImageClassification => {
                AnyBeitModel::ImageClassification(BeitForImageClassification::load(w, c)?)
            }
            Architecture::BeitForSemanticSegmentation => {
                AnyBeitModel::SemanticSegmentation(BeitForSemanticSegmentation::load(w, c)?)
            }
            Architecture::BeitBackbone => AnyBeitModel::Backbone(BeitBackbone::load(w, c)?),
            // Data2VecVisionModel is built with add_pooling_layer=False: no pooler_output.
            Architecture::Data2VecVisionModel => AnyBeitModel::Model(BeitModel::load(w, c, false)?),
            Architecture::Data2VecVisionForImageClassification => {
                AnyBeitModel::ImageClassification(BeitForImageClassification::load(w, c)?)
            }
            Architecture::Data2VecVisionForSemanticSegmentation => {
                AnyBeitModel::SemanticSegmentation(BeitForSemanticSegmentation::load(w, c)?)
            }
        })
    }

    /// The transformers class this is, in the family of its config's model_type.
    pub fn architecture(&self) -> Architecture {
        let beit = match self {
            AnyBeitModel::Model(_) => Architecture::BeitModel,
            AnyBeitModel::MaskedImageModeling(_) => Architecture::BeitForMaskedImageModeling,
            AnyBeitModel::ImageClassification(_) => Architecture::BeitForImageClassification,
            AnyBeitModel::SemanticSegmentation(_) => Architecture::BeitForSemanticSegmentation,
            AnyBeitModel::Backbone(_) => Architecture::BeitBackbone,
        };
        // ok: only MIM and Backbone have no data2vec counterpart, and those are never built from a data2vec config.
        beit.for_model_type(&self.config().model_type).unwrap_or(beit)
    }

    /// CPU inference for the encoder (see [`BeitModel::prepare_inference`]). The model can then no longer be
    /// trained or saved: its dense Linear weights are released.
    pub fn prepare_inference(&mut self, inference: impl Into<Inference>) -> Result<()> {
        match self {
            AnyBeitModel::Model(m) => m.prepare_inference(inference),
            AnyBeitModel::MaskedImageModeling(m) => m.beit.prepare_inference(inference),
            AnyBeitModel::ImageClassification(m) => m.beit.prepare_inference(inference),
            AnyBeitModel::SemanticSegmentation(m) => m.prepare_inference(inference),
            AnyBeitModel::Backbone(m) => m.encoder.prepare_inference(inference),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &BeitConfig {
        match self {
            AnyBeitModel::Model(m) => &m.config,
            AnyBeitModel::MaskedImageModeling(m) => &m.beit.config,
            AnyBeitModel::ImageClassification(m) => &m.beit.config,
            AnyBeitModel::SemanticSegmentation(m) => &m.beit.config,
            AnyBeitModel::Backbone(m) => &m.config,
        }
    }

    /// Every output under transformers' field names: `loss`, `logits`, `last_hidden_state`, `pooler_output`,
    /// `hidden_states.N`, `attentions.N`.
    pub fn forward_named(&self, pixel_values: &Tensor, inputs: &ModelInputs) -> Result<Vec<(String, Tensor)>> {
        let o = &inputs.options;
        let mut out = Vec::new();
        let (hidden_states, attentions) = match self {
            AnyBeitModel::Model(m) => {
                if inputs.labels.is_some() {
                    return Err(BeitError::unsupported("labels", "BeitModel has no head and takes no labels"));
                }
                let b = m.forward(pixel_values, o)?;
                out.push(("last_hidden_state".to_string(), b.last_hidden_state));
                if let Some(p) = b.pooler_output {
                    out.push(("pooler_output".to_string(), p));
                }
                (b.hidden_states, b.attentions)
            }
            AnyBeitModel::MaskedImageModeling(m) => {
                let r = m.forward(pixel_values, o, inputs.labels.as_ref())?;
                if let Some(l) = r.loss {
                    out.push(("loss".to_string(), l.reshape(1)?));
                }
                out.push(("logits".to_string(), r.logits));
                (r.base.hidden_states, r.base.attentions)
            }
            AnyBeitModel::ImageClassification(m) => {
                let r = m.forward(pixel_values, o, inputs.labels.as_ref())?;
                if let Some(l) = r.loss {
                    out.push(("loss".to_string(), l.reshape(1)?));
                }
                out.push(("logits".to_string(), r.logits));
                (r.base.hidden_states, r.base.attentions)
            }
            AnyBeitModel::SemanticSegmentation(m) => {
                let r = m.forward(pixel_values, o, inputs.labels.as_ref())?;
                if let Some(l) = r.loss {
                    out.push(("loss".to_string(), l.reshape(1)?));
                }
                out.push(("logits".to_string(), r.logits));
                (r.base.hidden_states, r.base.attentions)
            }
            AnyBeitModel::Backbone(m) => {
                if inputs.labels.is_some() {
                    return Err(BeitError::unsupported("labels", "BeitBackbone has no head and takes no labels"));
                }
                let r = m.forward(pixel_values, o)?;
                for (i, f) in r.feature_maps.into_iter().enumerate() {
                    out.push((format!("feature_maps.{i}"), f));
                }
                (r.hidden_states, r.attentions)
            }
        };
        for (name, list) in [("hidden_states", hidden_states), ("attentions", attentions)] {
            for (i, t) in list.into_iter().flatten().enumerate() {
                out.push((format!("{name}.{i}"), t));
            }
        }
        Ok(out)
    }
}
