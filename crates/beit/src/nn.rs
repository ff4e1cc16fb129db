//! The few torch.nn layers BEiT is built from, loaded under PyTorch's parameter names (`weight`, `bias`).

use candle_core::{Tensor, D};

use std::sync::Arc;

use crate::config::HiddenAct;
use crate::kernels::int8::QuantizedLinear;
use crate::error::Result;
use crate::rng::Rng;
use crate::weights::{Init, Weights};

/// Whether a forward pass records gradients: the fused CPU kernels (LayerNorm, softmax) have no backward pass,
/// so training takes the composite path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mode {
    pub train: bool,
    /// The weights may change between calls (evaluation during training): derive nothing to keep.
    pub uncached: bool,
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Set by [`Linear::quantize_int8`] for int8 inference; the f32 weights stay (training uses them).
    pub quantized: Option<Arc<QuantizedLinear>>,
}

impl Linear {
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool, std: f64) -> Result<Self> {
        let weight = w.get((out_dim, in_dim), "weight", Init::Normal(std))?;
        let bias = if bias { Some(w.get(out_dim, "bias", Init::Zeros)?) } else { None };
        Ok(Linear { weight, bias, quantized: None })
    }

    /// A head layer: initialized when the checkpoint lacks it.
    pub fn load_head(w: &Weights, in_dim: usize, out_dim: usize, std: f64) -> Result<Self> {
        let weight = w.get_or_init((out_dim, in_dim), "weight", Init::Normal(std))?;
        let bias = Some(w.get_or_init(out_dim, "bias", Init::Zeros)?);
        Ok(Linear { weight, bias, quantized: None })
    }

    pub fn out_features(&self) -> Result<usize> {
        Ok(self.weight.dim(0)?)
    }

    /// Dynamic int8 quantization (per-channel int8 weights, per-token uint8 activations), as onnxruntime's
    /// quantize_dynamic: inference through this layer then runs on the int8 kernel.
    pub fn quantize_int8(&mut self) -> Result<()> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let weight = self.weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        self.quantized = Some(Arc::new(QuantizedLinear::quantize(&weight, out_dim, in_dim, bias.as_deref())?));
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_dim.max(1);
        let y = match &self.quantized {
            Some(q) if x.device().is_cpu() => {
                let xs = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; rows * q.out_features()];
                q.forward(&xs, rows, &mut out)?;
                Tensor::from_vec(out, (rows, q.out_features()), x.device())?
            }
            _ => {
                let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        Ok(y.reshape(out_dims)?)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: w.get(dim, "weight", Init::Const(1.0))?, bias: w.get(dim, "bias", Init::Zeros)?, eps })
    }

    pub fn load_head(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get_or_init(dim, "weight", Init::Const(1.0))?,
            bias: w.get_or_init(dim, "bias", Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode.train {
            // Composite ops, which candle can differentiate. Same formula as torch: biased variance.
            let mean = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            return Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?);
        }
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)?)
    }
}

#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

/// Shape and placement of a convolution, as torch.nn.Conv2d's arguments.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub padding: usize,
    pub dilation: usize,
    pub bias: bool,
}

impl Conv2d {
    /// A head convolution (initialized when the checkpoint lacks it), stride 1.
    pub fn load_head(w: &Weights, s: ConvSpec, std: f64) -> Result<Self> {
        let weight = w.get_or_init((s.out_channels, s.in_channels, s.kernel, s.kernel), "weight", Init::Normal(std))?;
        let bias = if s.bias { Some(w.get_or_init(s.out_channels, "bias", Init::Zeros)?) } else { None };
        Ok(Conv2d { weight, bias, stride: 1, padding: s.padding, dilation: s.dilation })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, self.dilation, 1)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
            None => y,
        })
    }
}

/// ConvTranspose2d with kernel = stride (the FPN's 2x upsampling), weight (in, out, k, k).
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
}

impl ConvTranspose2d {
    pub fn load_head(w: &Weights, channels: usize, k: usize, std: f64) -> Result<Self> {
        Ok(ConvTranspose2d {
            weight: w.get_or_init((channels, channels, k, k), "weight", Init::Normal(std))?,
            bias: w.get_or_init(channels, "bias", Init::Zeros)?,
            stride: k,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv_transpose2d(&self.weight, 0, 0, self.stride, 1)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, self.bias.elem_count(), 1, 1))?)?)
    }
}

/// BatchNorm2d at inference: the running statistics, never the batch's.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub eps: f64,
}

impl BatchNorm2d {
    pub fn load_head(w: &Weights, channels: usize, eps: f64) -> Result<Self> {
        w.passthrough_counter("num_batches_tracked")?;
        Ok(BatchNorm2d {
            weight: w.get_or_init(channels, "weight", Init::Const(1.0))?,
            bias: w.get_or_init(channels, "bias", Init::Zeros)?,
            running_mean: w.get_or_init(channels, "running_mean", Init::Zeros)?,
            running_var: w.get_or_init(channels, "running_var", Init::Const(1.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.weight.elem_count();
        let shape = (1, c, 1, 1);
        // Folded into one scale and shift per channel: (x - mean) / sqrt(var + eps) * w + b.
        let scale = (self.weight.clone() / (self.running_var.clone() + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (&self.running_mean * &scale)?)?;
        Ok(x.broadcast_mul(&scale.reshape(shape)?)?.broadcast_add(&shift.reshape(shape)?)?)
    }
}

pub fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode.train {
        return Ok(candle_nn::ops::softmax(x, D::Minus1)?);
    }
    Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
}

/// transformers' ACT2FN, formula for formula.
pub fn activation(act: HiddenAct, x: &Tensor) -> Result<Tensor> {
    use HiddenAct::*;
    Ok(match act {
        Gelu | GeluPython => x.gelu_erf()?,
        // The tanh approximations differ from each other only by rounding (< 1e-7).
        GeluNew | GeluPytorchTanh | GeluPythonTanh | GeluAccurate | GeluFast => x.gelu()?,
        Gelu10 => x.gelu_erf()?.clamp(-10f32, 10f32)?,
        Laplace => {
            // transformers' LaplaceActivation defaults, rounded as it writes them (not 1/sqrt(2)).
            #[allow(clippy::approx_constant)]
            let (mu, sigma) = (0.707107f64, 0.282095f64);
            (((x - mu)? / (sigma * std::f64::consts::SQRT_2))?.erf()? + 1.0)?.affine(0.5, 0.0)?
        }
        LeakyRelu => candle_nn::ops::leaky_relu(x, 0.01)?,
        Linear => x.clone(),
        Mish => {
            // softplus with torch's threshold: x itself above 20.
            let sp = x.exp()?.affine(1.0, 1.0)?.log()?;
            let sp = x.gt(20f64)?.where_cond(x, &sp)?;
            (x * sp.tanh()?)?
        }
        QuickGelu => (x * candle_nn::ops::sigmoid(&x.affine(1.702, 0.0)?)?)?,
        Relu => x.relu()?,
        Relu2 => x.relu()?.sqr()?,
        Relu6 => x.clamp(0f32, 6f32)?,
        Sigmoid => candle_nn::ops::sigmoid(x)?,
        Silu | Swish => x.silu()?,
        Tanh => x.tanh()?,
    })
}

/// The generator behind dropout and drop path. candle's CPU generator cannot be seeded, so training draws its
/// masks here; the trainer reseeds it per epoch so that a resumed run repeats an uninterrupted one.
static TRAIN_RNG: std::sync::Mutex<Rng> = std::sync::Mutex::new(Rng(0));

pub fn seed_training_rng(seed: u64) {
    *TRAIN_RNG.lock().unwrap_or_else(|e| e.into_inner()) = Rng::new(seed);
}

/// A (shape) tensor of 0 or 1/keep, 1 with probability keep.
fn keep_mask(shape: &[usize], keep: f64, device: &candle_core::Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = TRAIN_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let v: Vec<f32> = (0..n).map(|_| if rng.uniform() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Dropout as torch applies it in training (scaled by 1/(1-p)); identity at inference.
pub fn dropout(x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
    if !mode.train || p <= 0.0 {
        return Ok(x.clone());
    }
    Ok(x.mul(&keep_mask(x.dims(), 1.0 - p, x.device())?)?)
}

/// Stochastic depth per sample (transformers' drop_path); identity at inference.
pub fn drop_path(x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
    if !mode.train || p <= 0.0 {
        return Ok(x.clone());
    }
    let mut shape = vec![1usize; x.rank()];
    shape[0] = x.dim(0)?;
    Ok(x.broadcast_mul(&keep_mask(&shape, 1.0 - p, x.device())?)?)
}

