//! BeitModel: embeddings, encoder, the final LayerNorm (CLS pooling) and the pooler, as transformers builds it.

pub mod attention;
pub mod checkpoint;
pub mod embeddings;
pub mod encoder;
pub(crate) mod fused;
pub mod layer;
pub mod relative_position;

use candle_core::{DType, Tensor};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::nn::{InferenceDtype, LayerNorm, Mode};
use crate::weights::Weights;
use embeddings::BeitEmbeddings;
use encoder::{BeitEncoder, EncoderInputs};

/// How a model prepared for CPU inference runs its encoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InferencePath {
    /// The fused CPU encoder (model/fused.rs), built once when the model is prepared: every call without a
    /// head mask or attention outputs runs it.
    #[default]
    Fused,
    /// candle op by op, as training runs it: the baseline of performance comparisons.
    Generic,
}

/// What preparing a model for CPU inference does: the number format of the encoder's Linear layers, and the
/// path its forward takes. An [`InferenceDtype`] alone means the fused path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inference {
    /// The Linear layers' number format.
    pub dtype: InferenceDtype,
    /// Fused or generic.
    pub path: InferencePath,
}

impl From<InferenceDtype> for Inference {
    fn from(dtype: InferenceDtype) -> Self {
        Inference { dtype, path: InferencePath::Fused }
    }
}

/// The inputs of a forward pass besides pixel values, with transformers' argument names.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// (batch, patches), bool/u8/integer: which patches the mask token replaces.
    pub bool_masked_pos: Option<Tensor>,
    /// [heads] or [layers, heads]: 1 keeps a head, 0 masks it.
    pub head_mask: Option<Tensor>,
    /// Return the embeddings' output and every layer's output.
    pub output_hidden_states: bool,
    /// Return every layer's attention probabilities.
    pub output_attentions: bool,
    /// Interpolate the position embeddings and relative position tables to the input's patch grid.
    pub interpolate_pos_encoding: bool,
    /// Training (dropout, drop path, gradients) or inference.
    pub mode: Mode,
}

/// BeitModelOutputWithPooling.
#[derive(Debug, Clone)]
pub struct BeitModelOutput {
    /// (batch, tokens, hidden): the last layer's output (after the final LayerNorm unless mean pooling).
    pub last_hidden_state: Tensor,
    /// (batch, hidden): the pooler's output, when the model has a pooler.
    pub pooler_output: Option<Tensor>,
    /// The embeddings' output and every layer's output, when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's attention probabilities (batch, heads, tokens, tokens), when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

/// BeitPooler: the mean of the patch tokens through a LayerNorm, or the CLS token.
#[derive(Debug, Clone)]
pub struct BeitPooler {
    /// Present with use_mean_pooling: LayerNorm of the mean patch token; otherwise the CLS token is the output.
    pub layernorm: Option<LayerNorm>,
}

impl BeitPooler {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        Ok(BeitPooler {
            layernorm: if c.use_mean_pooling {
                Some(LayerNorm::load_head(&w.pp("layernorm"), c.hidden_size, c.layer_norm_eps)?)
            } else {
                None
            },
        })
    }

    /// The pooled output of the last hidden state.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match &self.layernorm {
            Some(ln) => {
                let n = x.dim(1)?;
                ln.forward(&x.narrow(1, 1, n - 1)?.mean(1)?, mode)
            }
            None => Ok(x.narrow(1, 0, 1)?.squeeze(1)?),
        }
    }
}

/// transformers' BeitModel: embeddings, encoder, final LayerNorm (unless mean pooling) and an optional pooler.
#[derive(Debug, Clone)]
pub struct BeitModel {
    /// The configuration it was built from.
    pub config: BeitConfig,
    /// `embeddings`
    pub embeddings: BeitEmbeddings,
    /// `encoder`
    pub encoder: BeitEncoder,
    /// Identity with mean pooling.
    pub layernorm: Option<LayerNorm>,
    /// `pooler`, when built with one.
    pub pooler: Option<BeitPooler>,
}

impl BeitModel {
    /// CPU inference for the encoder's Linear layers: packed f32 or int8 (what onnxruntime's quantize_dynamic
    /// quantizes, less the small head), and the fused encoder unless `inference` asks for the generic path
    /// (see [`BeitEncoder::prepare_inference`]); the patch embedding and the heads stay as loaded.
    pub fn prepare_inference(&mut self, inference: impl Into<Inference>) -> Result<()> {
        self.encoder.prepare_inference(inference)
    }

    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig, add_pooling_layer: bool) -> Result<Self> {
        c.validate()?;
        Ok(BeitModel {
            config: c.clone(),
            embeddings: BeitEmbeddings::load(&w.pp("embeddings"), c)?,
            encoder: BeitEncoder::load(&w.pp("encoder"), c)?,
            layernorm: if c.use_mean_pooling {
                None
            } else {
                Some(LayerNorm::load(&w.pp("layernorm"), c.hidden_size, c.layer_norm_eps)?)
            },
            pooler: if add_pooling_layer { Some(BeitPooler::load(&w.pp("pooler"), c)?) } else { None },
        })
    }

    /// The hidden states of `pixel_values` (batch, channels, height, width); `o` says what else to return.
    pub fn forward(&self, pixel_values: &Tensor, o: &ForwardOptions) -> Result<BeitModelOutput> {
        let pixel_values = check_pixel_values(pixel_values)?;
        let (_, _, h, w) = pixel_values.dims4()?;
        let (x, _) = self.embeddings.forward(&pixel_values, o.bool_masked_pos.as_ref(), o.mode)?;
        let e = EncoderInputs {
            head_mask: o.head_mask.as_ref(),
            output_attentions: o.output_attentions,
            output_hidden_states: o.output_hidden_states,
            interpolate_pos_encoding: o.interpolate_pos_encoding,
            resolution: (h, w),
            mode: o.mode,
        };
        let out = self.encoder.forward(&x, &e, self.config.num_attention_heads, self.config.patch_size.height)?;
        let seq = match &self.layernorm {
            Some(ln) => ln.forward(&out.last_hidden_state, o.mode)?,
            None => out.last_hidden_state,
        };
        let pooler_output = match &self.pooler {
            Some(p) => Some(p.forward(&seq, o.mode)?),
            None => None,
        };
        Ok(BeitModelOutput {
            last_hidden_state: seq,
            pooler_output,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}

/// Pixel values must be a float (batch, channels, height, width) tensor with at least one image.
pub fn check_pixel_values(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() != 4 {
        return Err(BeitError::invalid_input(
            "pixel_values",
            format!("shape {dims:?}, expected 4 dimensions (batch, channels, height, width)"),
        ));
    }
    if dims.iter().any(|&d| d == 0) {
        return Err(BeitError::invalid_input("pixel_values", format!("shape {dims:?} has an empty dimension")));
    }
    Ok(x.to_dtype(DType::F32)?)
}
