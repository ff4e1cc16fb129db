//! BeitSelfAttention, BeitSelfOutput and BeitAttention: multi-head attention with query and value biases and
//! no key bias (as in the checkpoints), plus the relative position bias.

use candle_core::{DType, Tensor};

use crate::config::BeitConfig;
use crate::error::Result;
use crate::model::relative_position::BeitRelativePositionBias;
use crate::nn::{dropout, softmax_last_dim, InferenceDtype, Linear, Mode};
use crate::weights::Weights;

/// What one attention call needs besides the hidden states.
pub struct AttentionInputs<'a> {
    /// [heads] or [layers, heads]: 1 keeps a head, 0 masks it.
    pub head_mask: Option<&'a Tensor>,
    /// Return every layer's attention probabilities.
    pub output_attentions: bool,
    /// The encoder's shared relative position bias, when the config uses one.
    pub shared_relative_position_bias: Option<&'a Tensor>,
    /// Interpolate the position embeddings and relative position tables to the input's patch grid.
    pub interpolate_pos_encoding: bool,
    /// Patch grid of the current input.
    pub window: (usize, usize),
    /// Training or inference.
    pub mode: Mode,
}

/// BeitSelfAttention: multi-head attention with the optional relative position bias.
#[derive(Debug, Clone)]
pub struct BeitSelfAttention {
    /// `query`
    pub query: Linear,
    /// `key` (no bias, as in BEiT)
    pub key: Linear,
    /// `value`
    pub value: Linear,
    /// This layer's own relative position bias (`use_relative_position_bias`).
    pub relative_position_bias: Option<BeitRelativePositionBias>,
    num_attention_heads: usize,
    attention_head_size: usize,
    attention_probs_dropout_prob: f64,
}

impl BeitSelfAttention {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig, window_size: Option<(usize, usize)>) -> Result<Self> {
        let d = c.hidden_size;
        let std = c.initializer_range;
        Ok(BeitSelfAttention {
            query: Linear::load(&w.pp("query"), d, d, true, std)?,
            key: Linear::load(&w.pp("key"), d, d, false, std)?,
            value: Linear::load(&w.pp("value"), d, d, true, std)?,
            relative_position_bias: match window_size {
                Some(ws) => Some(BeitRelativePositionBias::load(&w.pp("relative_position_bias"), c, ws)?),
                None => None,
            },
            num_attention_heads: c.num_attention_heads,
            attention_head_size: c.head_dim(),
            attention_probs_dropout_prob: c.attention_probs_dropout_prob,
        })
    }

    /// CPU inference for query, key and value (see [`Linear::prepare_inference`]).
    pub fn prepare_inference(&mut self, dtype: InferenceDtype) -> Result<()> {
        for l in [&mut self.query, &mut self.key, &mut self.value] {
            l.prepare_inference(dtype)?;
        }
        Ok(())
    }

    /// Number of heads.
    pub fn num_attention_heads(&self) -> usize {
        self.num_attention_heads
    }

    /// Width of one head.
    pub fn attention_head_size(&self) -> usize {
        self.attention_head_size
    }

    /// Training on the CPU without dropout, head mask or returned probabilities, with a position bias: one
    /// projection for query, key and value, and the attention core as one op (`ops::encoder::attention`).
    fn forward_train_fused(&self, x: &Tensor, a: &AttentionInputs) -> Result<Option<Tensor>> {
        let plain = a.head_mask.is_none() && !a.output_attentions && self.attention_probs_dropout_prob == 0.0;
        if !a.mode.train || !plain || !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let n = x.dim(1)?;
        let own = match &self.relative_position_bias {
            Some(rpb) => Some(rpb.forward(a.window, a.interpolate_pos_encoding, n, a.mode)?),
            None => None,
        };
        let bias = match (own, a.shared_relative_position_bias) {
            (Some(o), Some(s)) => (o + s)?,
            (Some(o), None) => o,
            (None, Some(s)) => s.clone(),
            (None, None) => return Ok(None),
        };
        let layers = [&self.query, &self.key, &self.value];
        let weight = Tensor::cat(&layers.map(|l| l.weight()).into_iter().collect::<Result<Vec<_>>>()?, 0)?;
        let biases = layers
            .map(|l| match &l.bias {
                Some(b) => Ok(b.clone()),
                None => Ok(Tensor::zeros(l.out_features(), DType::F32, x.device())?),
            })
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let qkv = crate::ops::encoder::linear(x, &weight, Some(&Tensor::cat(&biases, 0)?), self.query.precision())?;
        Ok(Some(crate::ops::encoder::attention(&qkv, &bias, self.num_attention_heads)?))
    }

    /// The context (batch, seq, hidden) and, when asked, the attention probabilities (batch, heads, seq, seq).
    pub fn forward(&self, x: &Tensor, a: &AttentionInputs) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(context) = self.forward_train_fused(x, a)? {
            return Ok((context, None));
        }
        let (b, n, _) = x.dims3()?;
        let (h, dh) = (self.num_attention_heads, self.attention_head_size);
        let heads = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, n, h, dh))?.transpose(1, 2)?.contiguous()?) };
        let q = heads(self.query.forward(x)?)?;
        let k = heads(self.key.forward(x)?)?;
        let v = heads(self.value.forward(x)?)?;
        let mut scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
        if let Some(rpb) = &self.relative_position_bias {
            scores = scores.broadcast_add(&rpb.forward(a.window, a.interpolate_pos_encoding, n, a.mode)?)?;
        }
        if let Some(shared) = a.shared_relative_position_bias {
            scores = scores.broadcast_add(shared)?;
        }
        let probs = softmax_last_dim(&scores, a.mode)?;
        let mut probs = dropout(&probs, self.attention_probs_dropout_prob, a.mode)?;
        if let Some(m) = a.head_mask {
            probs = probs.broadcast_mul(m)?;
        }
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h * dh))?;
        Ok((context, a.output_attentions.then_some(probs)))
    }
}

/// BeitSelfOutput: the attention's output projection (dropout after it).
#[derive(Debug, Clone)]
pub struct BeitSelfOutput {
    /// The Linear layer (`dense`).
    pub dense: Linear,
    hidden_dropout_prob: f64,
}

impl BeitSelfOutput {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        Ok(BeitSelfOutput {
            dense: Linear::load(&w.pp("dense"), c.hidden_size, c.hidden_size, true, c.initializer_range)?,
            hidden_dropout_prob: c.hidden_dropout_prob,
        })
    }

    /// The module's forward pass.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        dropout(&self.dense.forward(x)?, self.hidden_dropout_prob, mode)
    }
}

/// BeitAttention: self-attention and its output projection.
#[derive(Debug, Clone)]
pub struct BeitAttention {
    /// `attention`
    pub attention: BeitSelfAttention,
    /// `output`
    pub output: BeitSelfOutput,
}

impl BeitAttention {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig, window_size: Option<(usize, usize)>) -> Result<Self> {
        Ok(BeitAttention {
            attention: BeitSelfAttention::load(&w.pp("attention"), c, window_size)?,
            output: BeitSelfOutput::load(&w.pp("output"), c)?,
        })
    }

    /// The module's forward pass.
    pub fn forward(&self, x: &Tensor, a: &AttentionInputs) -> Result<(Tensor, Option<Tensor>)> {
        let (context, probs) = self.attention.forward(x, a)?;
        Ok((self.output.forward(&context, a.mode)?, probs))
    }
}
