//! BeitBackbone: feature maps at chosen stages (as DPT uses BEiT), optionally through the FPN.

use candle_core::Tensor;

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::semantic_segmentation::BeitFeaturePyramid;
use crate::model::check_pixel_values;
use crate::model::embeddings::BeitEmbeddings;
use crate::model::encoder::{BeitEncoder, EncoderInputs};
use crate::model::ForwardOptions;
use crate::weights::Weights;

/// transformers' BeitBackbone: the hidden states of `out_indices` reshaped to feature maps (batch, hidden, h, w).
#[derive(Debug, Clone)]
pub struct BeitBackbone {
    /// The configuration it was built from (`out_indices`, `add_fpn`, `reshape_hidden_states`).
    pub config: BeitConfig,
    /// Patch embeddings, CLS token and position embeddings.
    pub embeddings: BeitEmbeddings,
    /// The transformer layers.
    pub encoder: BeitEncoder,
    /// The feature pyramid (fpn1..fpn4) when `add_fpn` is set.
    pub pyramid: Option<BeitFeaturePyramid>,
    /// Stage indices (0 = embeddings) in stage order.
    stages: Vec<usize>,
}

/// BackboneOutput.
#[derive(Debug, Clone)]
pub struct BackboneOutput {
    /// One map per requested stage, (batch, hidden, h, w).
    pub feature_maps: Vec<Tensor>,
    /// Every layer's output when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's attention probabilities when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

impl BeitBackbone {
    /// Builds the backbone from `w`; checks `out_indices` against the depth and `add_fpn`.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        c.validate()?;
        let mut stages = c.out_stage_indices();
        stages.sort_unstable();
        stages.dedup();
        let pyramid = if c.add_fpn {
            if c.out_indices.len() != 4 {
                return Err(BeitError::config(
                    "out_indices",
                    format!("BeitBackbone with add_fpn needs 4 out_indices, found {:?}", c.out_indices),
                ));
            }
            Some(BeitFeaturePyramid::load(w, c, c.batch_norm_eps)?)
        } else {
            None
        };
        Ok(BeitBackbone {
            config: c.clone(),
            embeddings: BeitEmbeddings::load(&w.pp("embeddings"), c)?,
            encoder: BeitEncoder::load(&w.pp("encoder"), c)?,
            pyramid,
            stages,
        })
    }

    /// The feature maps of `pixel_values` (batch, channels, height, width).
    pub fn forward(&self, pixel_values: &Tensor, o: &ForwardOptions) -> Result<BackboneOutput> {
        let pixel_values = check_pixel_values(pixel_values)?;
        let (b, _, h, w) = pixel_values.dims4()?;
        let (x, (gh, gw)) = self.embeddings.forward(&pixel_values, None, o.mode)?;
        let e = EncoderInputs {
            head_mask: None,
            output_attentions: o.output_attentions,
            output_hidden_states: true,
            interpolate_pos_encoding: false,
            resolution: (h, w),
            mode: o.mode,
        };
        let out = self.encoder.forward(&x, &e, self.config.num_attention_heads, self.config.patch_size.height)?;
        let hidden = out.hidden_states.unwrap_or_default();
        let mut maps = Vec::with_capacity(self.stages.len());
        for &s in &self.stages {
            let x = hidden
                .get(s)
                .ok_or_else(|| BeitError::internal("out_indices", format!("stage {s} was not computed")))?;
            maps.push(if self.config.reshape_hidden_states {
                let n = x.dim(1)?;
                x.narrow(1, 1, n - 1)?.transpose(1, 2)?.reshape((b, (), gh, gw))?
            } else {
                x.clone()
            });
        }
        if let Some(p) = &self.pyramid {
            maps = p.forward(&maps, o.mode)?;
        }
        Ok(BackboneOutput {
            feature_maps: maps,
            hidden_states: o.output_hidden_states.then_some(hidden),
            attentions: out.attentions,
        })
    }
}
