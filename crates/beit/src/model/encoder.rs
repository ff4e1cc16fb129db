//! BeitEncoder: the stack of layers, with the shared relative position bias when the config asks for one.

use candle_core::Tensor;

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::model::attention::AttentionInputs;
use crate::model::layer::BeitLayer;
use crate::model::relative_position::BeitRelativePositionBias;
use crate::nn::{InferenceDtype, Mode};
use crate::weights::Weights;

#[derive(Debug, Clone)]
pub struct BeitEncoder {
    pub relative_position_bias: Option<BeitRelativePositionBias>,
    pub layer: Vec<BeitLayer>,
}

/// What the encoder returns: the last hidden state and, when asked, every layer's input and attentions.
#[derive(Debug, Clone)]
pub struct BeitEncoderOutput {
    pub last_hidden_state: Tensor,
    pub hidden_states: Option<Vec<Tensor>>,
    pub attentions: Option<Vec<Tensor>>,
}

pub struct EncoderInputs<'a> {
    pub head_mask: Option<&'a Tensor>,
    pub output_attentions: bool,
    pub output_hidden_states: bool,
    pub interpolate_pos_encoding: bool,
    /// Input resolution in pixels.
    pub resolution: (usize, usize),
    pub mode: Mode,
}

impl BeitEncoder {
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
        Ok(BeitEncoder { relative_position_bias, layer })
    }

    /// CPU inference for every layer's Linear layers (see [`Linear::prepare_inference`]).
    pub fn prepare_inference(&mut self, dtype: InferenceDtype) -> Result<()> {
        use rayon::prelude::*;
        self.layer.par_iter_mut().try_for_each(|l| l.prepare_inference(dtype))
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

    pub fn forward(&self, x: &Tensor, e: &EncoderInputs, heads: usize, patch_size: usize) -> Result<BeitEncoderOutput> {
        let window = (e.resolution.0 / patch_size, e.resolution.1 / patch_size);
        let n = x.dim(1)?;
        let shared = match &self.relative_position_bias {
            Some(rpb) => Some(rpb.forward(window, e.interpolate_pos_encoding, n, e.mode)?),
            None => None,
        };
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
