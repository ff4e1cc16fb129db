//! BeitIntermediate, BeitOutput and BeitLayer (timm's Block): pre-norm attention and MLP with layer scale.

use candle_core::Tensor;

use crate::config::{BeitConfig, HiddenAct};
use crate::error::Result;
use crate::model::attention::{AttentionInputs, BeitAttention};
use crate::nn::{activation, dropout, scaled_residual, InferenceDtype, LayerNorm, Linear, Mode};
use crate::weights::{Init, Weights};

/// BeitIntermediate: Linear to `intermediate_size`, then the activation.
#[derive(Debug, Clone)]
pub struct BeitIntermediate {
    /// The Linear layer (`dense`).
    pub dense: Linear,
    act: HiddenAct,
}

impl BeitIntermediate {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        Ok(BeitIntermediate {
            dense: Linear::load(&w.pp("dense"), c.hidden_size, c.intermediate_size, true, c.initializer_range)?,
            act: c.hidden_act,
        })
    }

    /// The activation function.
    pub fn act(&self) -> HiddenAct {
        self.act
    }

    /// The module's forward pass.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        activation(self.act, &self.dense.forward(x)?)
    }
}

/// BeitOutput: Linear back to `hidden_size` (dropout after it).
#[derive(Debug, Clone)]
pub struct BeitOutput {
    /// The Linear layer (`dense`).
    pub dense: Linear,
    hidden_dropout_prob: f64,
}

impl BeitOutput {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        Ok(BeitOutput {
            dense: Linear::load(&w.pp("dense"), c.intermediate_size, c.hidden_size, true, c.initializer_range)?,
            hidden_dropout_prob: c.hidden_dropout_prob,
        })
    }

    /// The module's forward pass.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        dropout(&self.dense.forward(x)?, self.hidden_dropout_prob, mode)
    }
}

/// BeitLayer: pre-norm attention and MLP blocks with layer scale and drop path.
#[derive(Debug, Clone)]
pub struct BeitLayer {
    /// `attention`
    pub attention: BeitAttention,
    /// `intermediate`
    pub intermediate: BeitIntermediate,
    /// `output`
    pub output: BeitOutput,
    /// LayerNorm before attention.
    pub layernorm_before: LayerNorm,
    /// LayerNorm before the MLP.
    pub layernorm_after: LayerNorm,
    /// Layer scale; absent when layer_scale_init_value is 0.
    pub lambda_1: Option<Tensor>,
    /// Layer scale of the MLP block (`layer_scale_init_value` > 0).
    pub lambda_2: Option<Tensor>,
    /// Stochastic depth rate of this layer.
    pub drop_path_rate: f64,
}

impl BeitLayer {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig, window_size: Option<(usize, usize)>, drop_path_rate: f64) -> Result<Self> {
        let d = c.hidden_size;
        let (lambda_1, lambda_2) = if c.layer_scale_init_value > 0.0 {
            let init = Init::Const(c.layer_scale_init_value);
            (Some(w.get(d, "lambda_1", init)?), Some(w.get(d, "lambda_2", init)?))
        } else {
            (None, None)
        };
        Ok(BeitLayer {
            attention: BeitAttention::load(&w.pp("attention"), c, window_size)?,
            intermediate: BeitIntermediate::load(&w.pp("intermediate"), c)?,
            output: BeitOutput::load(&w.pp("output"), c)?,
            layernorm_before: LayerNorm::load(&w.pp("layernorm_before"), d, c.layer_norm_eps)?,
            layernorm_after: LayerNorm::load(&w.pp("layernorm_after"), d, c.layer_norm_eps)?,
            lambda_1,
            lambda_2,
            drop_path_rate,
        })
    }

    /// CPU inference for every Linear of the layer (see [`Linear::prepare_inference`]).
    pub fn prepare_inference(&mut self, dtype: InferenceDtype) -> Result<()> {
        self.attention.attention.prepare_inference(dtype)?;
        self.attention.output.dense.prepare_inference(dtype)?;
        self.intermediate.dense.prepare_inference(dtype)?;
        self.output.dense.prepare_inference(dtype)
    }

    /// Every parameter tensor of the layer (the weights a gradient reaches), in no particular order.
    pub fn parameters(&self) -> Vec<Tensor> {
        let sa = &self.attention.attention;
        let linears = [&sa.query, &sa.key, &sa.value, &self.attention.output.dense, &self.intermediate.dense, &self.output.dense];
        let mut p: Vec<Tensor> = linears.iter().flat_map(|l| l.weight().ok().into_iter().chain(l.bias.clone())).collect();
        for n in [&self.layernorm_before, &self.layernorm_after] {
            p.extend([n.weight.clone(), n.bias.clone()]);
        }
        p.extend(self.lambda_1.iter().chain(&self.lambda_2).cloned());
        p.extend(sa.relative_position_bias.as_ref().map(|r| r.relative_position_bias_table.clone()));
        p
    }

    /// The module's forward pass.
    pub fn forward(&self, x: &Tensor, a: &AttentionInputs) -> Result<(Tensor, Option<Tensor>)> {
        let (attn, probs) = self.attention.forward(&self.layernorm_before.forward(x, a.mode)?, a)?;
        let x = scaled_residual(x, &attn, self.lambda_1.as_ref(), self.drop_path_rate, a.mode)?;
        let y = self.intermediate.forward(&self.layernorm_after.forward(&x, a.mode)?)?;
        let y = self.output.forward(&y, a.mode)?;
        Ok((scaled_residual(&x, &y, self.lambda_2.as_ref(), self.drop_path_rate, a.mode)?, probs))
    }
}
