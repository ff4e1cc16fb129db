//! BeitForMaskedImageModeling: predicts the visual token of every patch; the loss counts masked patches only.

use candle_core::{DType, Tensor};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::loss::cross_entropy;
use crate::model::{BeitModel, BeitModelOutput, ForwardOptions};
use crate::nn::{LayerNorm, Linear};
use crate::weights::Weights;

/// transformers' BeitForMaskedImageModeling.
#[derive(Debug, Clone)]
pub struct BeitForMaskedImageModeling {
    /// The encoder (with a mask token, without a pooler).
    pub beit: BeitModel,
    /// The final LayerNorm before the token classifier.
    pub layernorm: LayerNorm,
    /// Hidden state to visual-token logits.
    pub lm_head: Linear,
}

/// MaskedLMOutput.
#[derive(Debug, Clone)]
pub struct MaskedImageModelingOutput {
    /// Cross entropy over the masked patches when labels were given.
    pub loss: Option<Tensor>,
    /// (batch, patches, vocab_size)
    pub logits: Tensor,
    /// The encoder's output.
    pub base: BeitModelOutput,
}

impl BeitForMaskedImageModeling {
    /// Builds the model from `w`.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        Ok(BeitForMaskedImageModeling {
            beit: BeitModel::load(&w.pp("beit"), c, false)?,
            layernorm: LayerNorm::load_head(&w.pp("layernorm"), c.hidden_size, c.layer_norm_eps)?,
            lm_head: Linear::load_head(&w.pp("lm_head"), c.hidden_size, c.vocab_size, c.initializer_range)?,
        })
    }

    /// `labels` holds the visual token of each masked patch, in row-major order of `bool_masked_pos`.
    pub fn forward(&self, pixel_values: &Tensor, o: &ForwardOptions, labels: Option<&Tensor>) -> Result<MaskedImageModelingOutput> {
        let base = self.beit.forward(pixel_values, o)?;
        let seq = self.layernorm.forward(&base.last_hidden_state, o.mode)?;
        let n = seq.dim(1)?;
        let logits = self.lm_head.forward(&seq.narrow(1, 1, n - 1)?)?;
        let loss = match labels {
            None => None,
            Some(labels) => {
                let mask = o.bool_masked_pos.as_ref().ok_or_else(|| {
                    BeitError::invalid_input("labels", "given without bool_masked_pos: the loss counts masked patches only")
                })?;
                let (b, p, v) = logits.dims3()?;
                let flags = mask.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
                let rows: Vec<u32> = flags.iter().enumerate().filter(|(_, &f)| f != 0).map(|(i, _)| i as u32).collect();
                let rows = Tensor::from_vec(rows.clone(), rows.len(), logits.device())?;
                let masked = logits.reshape((b * p, v))?.index_select(&rows, 0)?;
                Some(cross_entropy(&masked, labels, -100)?)
            }
        };
        Ok(MaskedImageModelingOutput { loss, logits, base })
    }
}
