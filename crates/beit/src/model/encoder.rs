//! BeitEncoder: the stack of layers, with the shared relative position bias when the config asks for one.

use candle_core::Tensor;

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use std::sync::Arc;

use crate::model::attention::AttentionInputs;
use crate::model::checkpoint::checkpointed;
use crate::model::fused::{FusedEncoder, FusedInputs};
use crate::model::layer::BeitLayer;
use crate::model::relative_position::BeitRelativePositionBias;
use crate::model::{Inference, InferencePath};
use crate::nn::Mode;
use crate::weights::Weights;

/// The stack of BeitLayers (transformers' BeitEncoder).
#[derive(Debug, Clone)]
pub struct BeitEncoder {
    /// The bias every layer shares, with use_shared_relative_position_bias.
    pub relative_position_bias: Option<BeitRelativePositionBias>,
    /// The layers, in order.
    pub layer: Vec<BeitLayer>,
    /// Built by [`prepare_inference`](Self::prepare_inference) on the fused path: the layers over f32 slices,
    /// with their packed weights.
    fused: Option<Arc<FusedEncoder>>,
}

/// What the encoder returns: the last hidden state and, when asked, every layer's input and attentions.
#[derive(Debug, Clone)]
pub struct BeitEncoderOutput {
    /// (batch, tokens, hidden): the last layer's output (after the final LayerNorm unless mean pooling).
    pub last_hidden_state: Tensor,
    /// The embeddings' output and every layer's output, when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's attention probabilities (batch, heads, tokens, tokens), when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

/// What one encoder call needs besides the hidden states.
pub struct EncoderInputs<'a> {
    /// [heads] or [layers, heads]: 1 keeps a head, 0 masks it.
    pub head_mask: Option<&'a Tensor>,
    /// Return every layer's attention probabilities.
    pub output_attentions: bool,
    /// Return the embeddings' output and every layer's output.
    pub output_hidden_states: bool,
    /// Interpolate the position embeddings and relative position tables to the input's patch grid.
    pub interpolate_pos_encoding: bool,
    /// Input resolution in pixels.
    pub resolution: (usize, usize),
    /// Training or inference.
    pub mode: Mode,
}

impl EncoderInputs<'_> {
    /// Whether the fused encoder, when built, computes what this call asks for: it has no backward pass, no
    /// head mask, and never forms the attention probabilities as tensors. The one place that decides.
    pub fn fused_applies(&self) -> bool {
        !self.mode.train && self.head_mask.is_none() && !self.output_attentions
    }
}

impl BeitEncoder {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        let window = c.patch_grid();
        let relative_position_bias = if c.use_shared_relative_position_bias {
            Some(BeitRelativePositionBias::load(&w.pp("relative_position_bias"), c, window)?)
        } else {
            None
        };
        let n = c.num_hidden_layers;
        // Stochastic depth grows linearly with depth (torch.linspace(0, drop_path_rate, n)).
        let layer = (0..n)
            .map(|i| {
                let dpr = if n > 1 { c.drop_path_rate * i as f64 / (n - 1) as f64 } else { 0.0 };
                BeitLayer::load(&w.pp(format!("layer.{i}")), c, c.use_relative_position_bias.then_some(window), dpr)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BeitEncoder { relative_position_bias, layer, fused: None })
    }

    /// CPU inference: every layer's Linear weights packed or quantized (see
    /// [`Linear::prepare_inference`](crate::nn::Linear::prepare_inference)) and, on the fused path, the fused
    /// encoder built from them, which then runs every call it applies to
    /// ([`EncoderInputs::fused_applies`]). Weights off the CPU stay as they are, and run the generic path.
    pub fn prepare_inference(&mut self, inference: impl Into<Inference>) -> Result<()> {
        use rayon::prelude::*;
        let Inference { dtype, path } = inference.into();
        self.fused = match path {
            InferencePath::Fused => FusedEncoder::prepare(&mut self.layer, dtype)?.map(Arc::new),
            InferencePath::Generic => {
                self.layer.par_iter_mut().try_for_each(|l| l.prepare_inference(dtype))?;
                None
            }
        };
        Ok(())
    }

    /// Whether [`prepare_inference`](Self::prepare_inference) built the fused encoder.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// head_mask as transformers takes it ([heads] for every layer, or [layers, heads]) -> one (1, heads, 1, 1)
    /// multiplier per layer.
    fn layer_head_masks(&self, head_mask: Option<&Tensor>, heads: usize) -> Result<Vec<Option<Tensor>>> {
        let layers = self.layer.len();
        let Some(m) = head_mask else { return Ok(vec![None; layers]) };
        let m = m.to_dtype(candle_core::DType::F32)?;
        let per_layer = match m.dims() {
            [h] if *h == heads => vec![m.clone(); layers],
            [l, h] if *l == layers && *h == heads => (0..layers).map(|i| m.get(i)).collect::<candle_core::Result<_>>()?,
            d => {
                return Err(BeitError::invalid_input(
                    "head_mask",
                    format!("shape {d:?}, expected [{heads}] or [{layers}, {heads}] (layers, heads)"),
                ))
            }
        };
        per_layer.into_iter().map(|t| Ok(Some(t.reshape((1, heads, 1, 1))?))).collect()
    }

    /// Runs every layer on the embeddings `x`, fused or autograd as the call's options allow.
    pub fn forward(&self, x: &Tensor, e: &EncoderInputs, heads: usize, patch_size: usize) -> Result<BeitEncoderOutput> {
        let window = (e.resolution.0 / patch_size, e.resolution.1 / patch_size);
        let n = x.dim(1)?;
        let shared = match &self.relative_position_bias {
            Some(rpb) => Some(rpb.forward(window, e.interpolate_pos_encoding, n, e.mode)?),
            None => None,
        };
        if let (Some(fused), true) = (&self.fused, e.fused_applies()) {
            let a = FusedInputs {
                shared_relative_position_bias: shared.as_ref(),
                interpolate_pos_encoding: e.interpolate_pos_encoding,
                window,
                mode: e.mode,
                output_hidden_states: e.output_hidden_states,
            };
            let (last_hidden_state, hidden_states) = fused.forward(x, &a)?;
            return Ok(BeitEncoderOutput { last_hidden_state, hidden_states, attentions: None });
        }
        let head_masks = self.layer_head_masks(e.head_mask, heads)?;
        let mut hidden_states = e.output_hidden_states.then(Vec::new);
        let mut attentions = e.output_attentions.then(Vec::new);
        let mut x = x.clone();
        for (layer, head_mask) in self.layer.iter().zip(&head_masks) {
            if let Some(hs) = hidden_states.as_mut() {
                hs.push(x.clone());
            }
            let a = AttentionInputs {
                head_mask: head_mask.as_ref(),
                output_attentions: e.output_attentions,
                shared_relative_position_bias: shared.as_ref(),
                interpolate_pos_encoding: e.interpolate_pos_encoding,
                window,
                mode: e.mode,
            };
            if e.mode.train && e.mode.checkpoint && head_mask.is_none() && !e.output_attentions {
                x = checkpointed(layer, &x, &a)?;
                continue;
            }
            let (y, probs) = layer.forward(&x, &a)?;
            x = y;
            if let (Some(all), Some(p)) = (attentions.as_mut(), probs) {
                all.push(p);
            }
        }
        if let Some(hs) = hidden_states.as_mut() {
            hs.push(x.clone());
        }
        Ok(BeitEncoderOutput { last_hidden_state: x, hidden_states, attentions })
    }
}
