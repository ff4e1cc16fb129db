//! The few torch.nn layers BEiT is built from, loaded under PyTorch's parameter names (`weight`, `bias`).

use candle_core::{DType, Tensor, Var};

use std::sync::Arc;

use crate::config::HiddenAct;
use crate::error::{BeitError, Result};
use crate::kernels::bf16::PackedBf16;
use crate::kernels::conv::{ConvGeometry, PackedConv2d, PackedConvTranspose2d, Precision};
use crate::kernels::f32::PackedF32;
use crate::kernels::int8::QuantizedLinear;
use crate::kernels::math::gelu_erf_par;
use crate::kernels::view::{view, with_f32};
use crate::ops::heads as diff;
use crate::rng::Rng;
use crate::weights::{Init, Weights};

/// Whether a forward pass records gradients: training takes the differentiable ops of `ops::encoder` where
/// inference takes fused kernels without a backward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mode {
    /// Training: dropout and drop path active, gradients recorded.
    pub train: bool,
    /// The weights may change between calls (evaluation during training): derive nothing to keep.
    pub uncached: bool,
    /// Training: keep only each encoder layer's input and recompute its activations in the backward pass
    /// (gradient checkpointing).
    pub checkpoint: bool,
}

/// The number format a model prepared for CPU inference runs its encoder's Linear layers in (see
/// [`Linear::prepare_inference`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InferenceDtype {
    /// f32 weights packed once for the f32 kernel: transformers' outputs to 1e-4.
    #[default]
    F32,
    /// Dynamic int8 quantization, as onnxruntime's quantize_dynamic.
    Int8,
    /// bf16 weights and activations (rounded to nearest even, as torch's), f32 accumulation; LayerNorm,
    /// softmax, GELU and the residual stay f32. Fast where the CPU has AVX512_BF16.
    Bf16,
}

/// torch.nn.Linear, with optional packed (f32) or quantized (int8) copies for CPU inference.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `(out, in)`, as PyTorch stores it. `None` once [`prepare_inference`](Self::prepare_inference) has replaced
    /// it by a packed or quantized copy, so that the weights are held once.
    weight: Option<Tensor>,
    /// The bias, when the layer has one.
    pub bias: Option<Tensor>,
    /// Set by [`Linear::prepare_inference`] with int8.
    pub(crate) quantized: Option<Arc<QuantizedLinear>>,
    /// Set by [`Linear::prepare_inference`] with f32: the weight in the f32 kernel's layout, packed once.
    pub(crate) packed: Option<Arc<PackedF32>>,
    /// Set by [`Linear::prepare_inference`] with bf16: the weight rounded to bf16 and packed once.
    pub(crate) bf16: Option<Arc<PackedBf16>>,
    in_features: usize,
    out_features: usize,
    /// The products' precision when training (the weights' [`Weights::precision`]).
    precision: Precision,
}

impl Linear {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool, std: f64) -> Result<Self> {
        let weight = w.get((out_dim, in_dim), "weight", Init::Normal(std))?;
        let bias = if bias { Some(w.get(out_dim, "bias", Init::Zeros)?) } else { None };
        Ok(Self::from_parts(weight, bias, in_dim, out_dim, w.precision()))
    }

    /// A head layer: initialized when the checkpoint lacks it.
    pub fn load_head(w: &Weights, in_dim: usize, out_dim: usize, std: f64) -> Result<Self> {
        let weight = w.get_or_init((out_dim, in_dim), "weight", Init::Normal(std))?;
        let bias = Some(w.get_or_init(out_dim, "bias", Init::Zeros)?);
        Ok(Self::from_parts(weight, bias, in_dim, out_dim, w.precision()))
    }

    fn from_parts(w: Tensor, bias: Option<Tensor>, in_features: usize, out_features: usize, precision: Precision) -> Self {
        let (quantized, packed, bf16) = (None, None, None);
        Linear { weight: Some(w), bias, quantized, packed, bf16, in_features, out_features, precision }
    }

    /// The precision of the layer's products when training.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The dense `(out, in)` weight. After [`prepare_inference`](Self::prepare_inference) with f32 it is unpacked
    /// from the packed copy (a new tensor each call: for inspection, not for a hot loop); after int8 it is gone.
    pub fn weight(&self) -> Result<Tensor> {
        if let Some(w) = &self.weight {
            return Ok(w.clone());
        }
        let shape = (self.out_features, self.in_features);
        match (&self.packed, &self.bf16) {
            (Some(p), _) => Ok(Tensor::from_vec(p.unpack(), shape, &candle_core::Device::Cpu)?),
            // The bf16 values it multiplies by.
            (_, Some(p)) => Ok(Tensor::from_vec(p.unpack(), shape, &candle_core::Device::Cpu)?),
            _ => Err(BeitError::invalid_input(
                "linear weight",
                format!(
                    "the dense ({}, {}) weight was released when the model was prepared for int8 inference; load \
                     the model without int8 to read, save or train it",
                    self.out_features, self.in_features
                ),
            )),
        }
    }

    /// CPU inference: the weight is packed once for the f32 kernel (f32) or quantized per channel (int8, as
    /// onnxruntime's quantize_dynamic), and the dense copy is released, so the weights are held once. Only for
    /// models that will not be trained or saved (the optimizer needs the dense tensor).
    pub fn prepare_inference(&mut self, dtype: InferenceDtype) -> Result<()> {
        let Some(w) = &self.weight else { return Ok(()) };
        if !w.device().is_cpu() {
            return Ok(());
        }
        let (n, k) = (self.out_features, self.in_features);
        // Borrowed in place when contiguous f32: no third copy of the weight while the packed one is built.
        match dtype {
            InferenceDtype::F32 => self.packed = Some(Arc::new(with_f32(w, |w| PackedF32::pack(w, n, k))?)),
            InferenceDtype::Int8 => {
                let bias = match &self.bias {
                    Some(b) => Some(with_f32(b, |b| Ok(b.to_vec()))?),
                    None => None,
                };
                self.quantized = Some(Arc::new(with_f32(w, |w| QuantizedLinear::quantize(w, n, k, bias.as_deref()))?));
            }
            InferenceDtype::Bf16 => {
                let bias = match &self.bias {
                    Some(b) => Some(with_f32(b, |b| Ok(b.to_vec()))?),
                    None => None,
                };
                self.bf16 = Some(Arc::new(with_f32(w, |w| PackedBf16::pack(w, n, k, bias.as_deref()))?));
            }
        }
        self.weight = None;
        Ok(())
    }

    /// The layer applied to `x`, as its torch.nn counterpart.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_dim.max(1);
        let y = match (&self.quantized, &self.packed, &self.bf16) {
            (_, _, Some(p)) if x.device().is_cpu() => {
                let xs = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; rows * p.out_features()];
                p.forward(&xs, rows, &mut out)?;
                Tensor::from_vec(out, (rows, p.out_features()), x.device())?
            }
            (Some(q), _, _) if x.device().is_cpu() => {
                let xs = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; rows * q.out_features()];
                q.forward(&xs, rows, &mut out)?;
                Tensor::from_vec(out, (rows, q.out_features()), x.device())?
            }
            (_, Some(p), _) if x.device().is_cpu() => {
                let xs = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let bias = match &self.bias {
                    Some(b) => Some(b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
                    None => None,
                };
                let mut out = vec![0f32; rows * p.n()];
                crate::kernels::f32::linear_packed(&xs, in_dim, rows, p, bias.as_deref(), &mut out, p.n())?;
                Tensor::from_vec(out, (rows, p.n()), x.device())?
            }
            _ => {
                let x = x.reshape((rows, in_dim))?;
                crate::ops::encoder::linear(&x, &self.weight()?, self.bias.as_ref(), self.precision)?
            }
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_features;
        }
        Ok(y.reshape(out_dims)?)
    }
}

/// torch.nn.LayerNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// The weight.
    pub weight: Tensor,
    /// The bias, when the layer has one.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: w.get(dim, "weight", Init::Const(1.0))?, bias: w.get(dim, "bias", Init::Zeros)?, eps })
    }

    /// Builds the module from `w`, initializing it (as transformers' `_init_weights`) when the checkpoint lacks it.
    pub fn load_head(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get_or_init(dim, "weight", Init::Const(1.0))?,
            bias: w.get_or_init(dim, "bias", Init::Zeros)?,
            eps,
        })
    }

    /// The layer applied to `x`, as its torch.nn counterpart.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode.train {
            // Differentiable (candle's fused kernel has no backward pass).
            return crate::ops::encoder::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)?)
    }
}

/// torch.nn.Conv2d (square kernel), with a packed copy for the CPU kernel at inference.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `(out, in, kh, kw)`, as PyTorch stores it. `None` once [`prepare_inference`](Self::prepare_inference)
    /// has replaced it by a packed copy, so that the weights are held once.
    weight: Option<Tensor>,
    /// The bias, when the layer has one.
    pub bias: Option<Tensor>,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Dilation.
    pub dilation: usize,
    /// Set by [`Conv2d::prepare_inference`]: the weight (and bias) in the f32 kernel's layout, packed once.
    pub(crate) packed: Option<Arc<PackedConv2d>>,
}

/// Shape and placement of a convolution, as torch.nn.Conv2d's arguments.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel size (square).
    pub kernel: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Dilation.
    pub dilation: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl Conv2d {
    /// `weight` `(out, in, kh, kw)`, groups 1.
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize, dilation: usize) -> Self {
        Conv2d { weight: Some(weight), bias, stride, padding, dilation, packed: None }
    }

    /// A head convolution (initialized when the checkpoint lacks it), stride 1.
    pub fn load_head(w: &Weights, s: ConvSpec, std: f64) -> Result<Self> {
        let weight = w.get_or_init((s.out_channels, s.in_channels, s.kernel, s.kernel), "weight", Init::Normal(std))?;
        let bias = if s.bias { Some(w.get_or_init(s.out_channels, "bias", Init::Zeros)?) } else { None };
        Ok(Conv2d::new(weight, bias, 1, s.padding, s.dilation))
    }

    /// The dense `(out, in, kh, kw)` weight; after [`prepare_inference`](Self::prepare_inference) unpacked
    /// from the packed copy (a new tensor each call: for inspection, not for a hot loop).
    pub fn weight(&self) -> Result<Tensor> {
        if let Some(w) = &self.weight {
            return Ok(w.clone());
        }
        match &self.packed {
            Some(p) => {
                let g = p.geometry();
                let dims = (g.out_channels, g.in_channels, g.kernel_h, g.kernel_w);
                Ok(Tensor::from_vec(p.weight(), dims, &candle_core::Device::Cpu)?)
            }
            None => Err(BeitError::invalid_input("conv weight", "neither a dense nor a packed weight is held")),
        }
    }

    /// CPU inference: the weight is packed once for the GEMM of `precision` ([`PackedConv2d`]) and the dense
    /// copy is released. Only for models that will not be trained or saved.
    pub fn prepare_inference(&mut self, precision: Precision) -> Result<()> {
        self.prepare_inference_scaled(None, precision)
    }

    /// [`prepare_inference`](Self::prepare_inference) with a per-output-channel affine map folded in
    /// (`scale[o] · conv(x)[o] + shift[o]`, e.g. an inference BatchNorm that follows): the weight rows are
    /// scaled and the bias becomes `scale · bias + shift`. `weight()` and `bias` then describe the folded
    /// convolution.
    pub fn prepare_inference_scaled(&mut self, affine: Option<(&[f32], &[f32])>, precision: Precision) -> Result<()> {
        let Some(w) = &self.weight else { return Ok(()) };
        if !w.device().is_cpu() {
            return Ok(());
        }
        let (cout, cin, kh, kw) = w.dims4().map_err(|_| {
            BeitError::invalid_input("conv weight", format!("shape {:?}, expected (out, in, kh, kw)", w.dims()))
        })?;
        let geometry = ConvGeometry {
            in_channels: cin,
            out_channels: cout,
            kernel_h: kh,
            kernel_w: kw,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        };
        let mut bias = match &self.bias {
            Some(b) => Some(with_f32(b, |b| Ok(b.to_vec()))?),
            None => None,
        };
        let packed = match affine {
            None => with_f32(w, |wv| PackedConv2d::pack_with(wv, bias.as_deref(), geometry, precision))?,
            Some((scale, shift)) => {
                if scale.len() != cout || shift.len() != cout {
                    return Err(BeitError::invalid_input(
                        "conv folding",
                        format!("{cout} output channels, but {} scales and {} shifts", scale.len(), shift.len()),
                    ));
                }
                let mut wv = with_f32(w, |wv| Ok(wv.to_vec()))?;
                let k = cin * kh * kw;
                for (row, s) in wv.chunks_exact_mut(k.max(1)).zip(scale) {
                    row.iter_mut().for_each(|v| *v *= s);
                }
                let b: Vec<f32> =
                    (0..cout).map(|o| bias.as_ref().map_or(0.0, |b| b[o]) * scale[o] + shift[o]).collect();
                self.bias = Some(Tensor::from_slice(&b, cout, &candle_core::Device::Cpu)?);
                bias = Some(b);
                PackedConv2d::pack_with(&wv, bias.as_deref(), geometry, precision)?
            }
        };
        self.packed = Some(Arc::new(packed));
        self.weight = None;
        Ok(())
    }

    /// The layer applied to `x`, as its torch.nn counterpart.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }

    /// The convolution, then ReLU when `relu` (fused into the packed path's output pass).
    pub fn forward_act(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        self.forward_cat_act(std::slice::from_ref(x), relu)
    }

    /// The convolution of the concatenation of `xs` along the channels, then ReLU when `relu`. The packed
    /// path reads the parts in place instead of building the concatenation.
    pub fn forward_cat_act(&self, xs: &[Tensor], relu: bool) -> Result<Tensor> {
        let Some(first) = xs.first() else {
            return Err(BeitError::invalid_input("conv input", "no tensors to concatenate"));
        };
        if let (Some(p), true) = (&self.packed, xs.iter().all(|x| x.device().is_cpu())) {
            let dims = |x: &Tensor| {
                x.dims4().map_err(|_| {
                    BeitError::invalid_input(
                        "conv input",
                        format!("shape {:?}, expected (batch, channels, height, width)", x.dims()),
                    )
                })
            };
            let (b, _, h, w) = dims(first)?;
            let (mut conts, mut channels) = (Vec::with_capacity(xs.len()), Vec::with_capacity(xs.len()));
            for x in xs {
                let (xb, xc, xh, xw) = dims(x)?;
                if (xb, xh, xw) != (b, h, w) {
                    return Err(BeitError::invalid_input(
                        "conv input",
                        format!("shapes {:?} and {:?} differ outside the channels", first.dims(), x.dims()),
                    ));
                }
                conts.push(x.to_dtype(candle_core::DType::F32)?.contiguous()?);
                channels.push(xc);
            }
            // Borrowed in place (to_dtype and contiguous above make them contiguous f32 CPU tensors).
            let views: Vec<_> = conts.iter().filter_map(view).collect();
            if views.len() != conts.len() {
                return Err(BeitError::invalid_input("conv input", "expected contiguous f32 CPU tensors"));
            }
            let parts: Vec<(&[f32], usize)> = views.iter().map(|v| v.slice()).zip(channels).collect();
            let g = p.geometry();
            let (y, (ho, wo)) = p.forward_parts(&parts, b, h, w, relu)?;
            let y = Tensor::from_vec(y, (b, g.out_channels, ho, wo), first.device())?;
            return Ok(if first.dtype() == candle_core::DType::F32 { y } else { y.to_dtype(first.dtype())? });
        }
        let cat;
        let x = match xs {
            [x] => x,
            _ => {
                cat = Tensor::cat(xs, 1)?;
                &cat
            }
        };
        // im2col and GEMM both ways (candle's conv2d backward is scalar loops); candle's op off the CPU.
        let y = diff::conv2d(x, &self.weight()?, self.bias.as_ref(), self.stride, self.padding, self.dilation)?;
        Ok(if relu { y.relu()? } else { y })
    }
}

/// ConvTranspose2d with kernel = stride (the FPN's 2x upsampling), weight (in, out, k, k).
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    /// `None` once [`prepare_inference`](Self::prepare_inference) has packed it.
    weight: Option<Tensor>,
    /// The bias, when the layer has one.
    pub bias: Tensor,
    /// Stride.
    pub stride: usize,
    /// Set by [`ConvTranspose2d::prepare_inference`].
    pub(crate) packed: Option<Arc<PackedConvTranspose2d>>,
}

impl ConvTranspose2d {
    /// `weight` `(in, out, stride, stride)`.
    pub fn new(weight: Tensor, bias: Tensor, stride: usize) -> Self {
        ConvTranspose2d { weight: Some(weight), bias, stride, packed: None }
    }

    /// Builds the module from `w`, initializing it (as transformers' `_init_weights`) when the checkpoint lacks it.
    pub fn load_head(w: &Weights, channels: usize, k: usize, std: f64) -> Result<Self> {
        Ok(ConvTranspose2d::new(
            w.get_or_init((channels, channels, k, k), "weight", Init::Normal(std))?,
            w.get_or_init(channels, "bias", Init::Zeros)?,
            k,
        ))
    }

    /// The dense `(in, out, k, k)` weight, unpacked after [`prepare_inference`](Self::prepare_inference).
    pub fn weight(&self) -> Result<Tensor> {
        if let Some(w) = &self.weight {
            return Ok(w.clone());
        }
        match &self.packed {
            Some(p) => {
                let (cin, cout, s) = (p.in_channels(), p.out_channels(), self.stride);
                Ok(Tensor::from_vec(p.weight(), (cin, cout, s, s), &candle_core::Device::Cpu)?)
            }
            None => {
                Err(BeitError::invalid_input("conv transpose weight", "neither a dense nor a packed weight is held"))
            }
        }
    }

    /// CPU inference: the weight packed once for the GEMM of `precision`, the dense copy released.
    pub fn prepare_inference(&mut self, precision: Precision) -> Result<()> {
        self.prepare_inference_scaled(None, precision)
    }

    /// [`prepare_inference`](Self::prepare_inference) with a per-output-channel affine map folded in, as
    /// [`Conv2d::prepare_inference_scaled`].
    pub fn prepare_inference_scaled(&mut self, affine: Option<(&[f32], &[f32])>, precision: Precision) -> Result<()> {
        let Some(w) = &self.weight else { return Ok(()) };
        if !w.device().is_cpu() {
            return Ok(());
        }
        let (cin, cout, kh, kw) = w.dims4().map_err(|_| {
            BeitError::invalid_input("conv transpose weight", format!("shape {:?}, expected (in, out, k, k)", w.dims()))
        })?;
        if kh != self.stride || kw != self.stride {
            return Err(BeitError::invalid_input(
                "conv transpose weight",
                format!("kernel {kh}x{kw}, expected {0}x{0} (kernel = stride)", self.stride),
            ));
        }
        let mut bias = with_f32(&self.bias, |b| Ok(b.to_vec()))?;
        let packed = match affine {
            None => with_f32(w, |wv| PackedConvTranspose2d::pack_with(wv, &bias, cin, cout, self.stride, precision))?,
            Some((scale, shift)) => {
                if scale.len() != cout || shift.len() != cout || bias.len() != cout {
                    return Err(BeitError::invalid_input(
                        "conv transpose folding",
                        format!(
                            "{cout} output channels, but {} biases, {} scales and {} shifts",
                            bias.len(),
                            scale.len(),
                            shift.len()
                        ),
                    ));
                }
                let mut wv = with_f32(w, |wv| Ok(wv.to_vec()))?;
                // (in, out, k, k): each run of k·k values belongs to one output channel, in order.
                for (i, run) in wv.chunks_exact_mut(kh * kw).enumerate() {
                    run.iter_mut().for_each(|v| *v *= scale[i % cout]);
                }
                for ((b, s), t) in bias.iter_mut().zip(scale).zip(shift) {
                    *b = *b * s + t;
                }
                self.bias = Tensor::from_slice(&bias, cout, &candle_core::Device::Cpu)?;
                PackedConvTranspose2d::pack_with(&wv, &bias, cin, cout, self.stride, precision)?
            }
        };
        self.packed = Some(Arc::new(packed));
        self.weight = None;
        Ok(())
    }

    /// The layer applied to `x`, as its torch.nn counterpart.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }

    /// The transposed convolution, then torch's exact GELU when `gelu` (in place on the packed path's
    /// output, on every thread).
    pub fn forward_act(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        if let (Some(p), true) = (&self.packed, x.device().is_cpu()) {
            let (b, c, h, w) = x.dims4().map_err(|_| {
                BeitError::invalid_input(
                    "conv transpose input",
                    format!("shape {:?}, expected (batch, channels, height, width)", x.dims()),
                )
            })?;
            if c != p.in_channels() {
                return Err(BeitError::invalid_input(
                    "conv transpose input",
                    format!("{c} channels, expected {} (shape {:?})", p.in_channels(), x.dims()),
                ));
            }
            let xc = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
            let mut y = with_f32(&xc, |xs| p.forward(xs, b, h, w))?;
            let s = self.stride;
            if gelu {
                gelu_erf_par(&mut y, w * s);
            }
            let y = Tensor::from_vec(y, (b, p.out_channels(), h * s, w * s), x.device())?;
            return Ok(if x.dtype() == candle_core::DType::F32 { y } else { y.to_dtype(x.dtype())? });
        }
        // One GEMM each way (candle's conv_transpose2d is a direct loop); candle's op off the CPU.
        let y = diff::conv_transpose2d(x, &self.weight()?, &self.bias, self.stride)?;
        Ok(if gelu { y.gelu_erf()? } else { y })
    }
}

/// torch.nn.BatchNorm2d (momentum 0.1, running statistics tracked): the running statistics at inference, the
/// batch's in training, which then also update the running ones in place (so that what is saved follows).
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    /// The weight.
    pub weight: Tensor,
    /// The bias, when the layer has one.
    pub bias: Tensor,
    /// Running mean (inference statistics); a Var only to be updated in place, never trained.
    pub running_mean: Var,
    /// Running variance (unbiased, as torch keeps it).
    pub running_var: Var,
    /// How many training batches updated the statistics (kept in the checkpoint's dtype).
    pub num_batches_tracked: Var,
    /// Added to the variance.
    pub eps: f64,
    /// Weight of the batch's statistics in the running ones (torch's default 0.1).
    pub momentum: f64,
}

impl BatchNorm2d {
    /// Builds the module from `w`, initializing it (as transformers' `_init_weights`) when the checkpoint lacks it.
    pub fn load_head(w: &Weights, channels: usize, eps: f64) -> Result<Self> {
        Ok(BatchNorm2d {
            weight: w.get_or_init(channels, "weight", Init::Const(1.0))?,
            bias: w.get_or_init(channels, "bias", Init::Zeros)?,
            running_mean: w.buffer(channels, "running_mean", Init::Zeros)?,
            running_var: w.buffer(channels, "running_var", Init::Const(1.0))?,
            num_batches_tracked: w.passthrough_counter("num_batches_tracked")?,
            eps,
            momentum: 0.1,
        })
    }

    /// The running statistics `(mean, var)`, detached: reading them records nothing for backprop.
    pub fn running_stats(&self) -> (Tensor, Tensor) {
        (self.running_mean.as_tensor().detach(), self.running_var.as_tensor().detach())
    }

    /// The layer applied to `x` `(batch, channels, height, width)`, as its torch.nn counterpart in `mode`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_act(x, mode, false)
    }

    /// [`forward`](Self::forward), then ReLU when `relu` (fused into the training op on the CPU).
    pub fn forward_act(&self, x: &Tensor, mode: Mode, relu: bool) -> Result<Tensor> {
        let c = self.weight.elem_count();
        let shape = (1, c, 1, 1);
        if mode.train {
            return self.forward_train(x, relu);
        }
        let (mean, var) = self.running_stats();
        // Folded into one scale and shift per channel: (x - mean) / sqrt(var + eps) * w + b.
        let scale = (self.weight.clone() / (var + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (&mean * &scale)?)?;
        let y = x.broadcast_mul(&scale.reshape(shape)?)?.broadcast_add(&shift.reshape(shape)?)?;
        Ok(if relu { y.relu()? } else { y })
    }

    /// Training: normalized by the batch's mean and biased variance over (N, H, W); the running statistics move
    /// by `momentum` towards the batch's (variance unbiased). On the CPU one op with its own backward pass (the
    /// composite form is a dozen passes each way); elsewhere composite ops that candle differentiates.
    fn forward_train(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let c = self.weight.elem_count();
        let (b, xc, h, w) = x.dims4().map_err(|_| {
            BeitError::invalid_input(
                "batch norm input",
                format!("shape {:?}, expected (batch, channels, height, width)", x.dims()),
            )
        })?;
        if xc != c {
            return Err(BeitError::invalid_input("batch norm input", format!("{xc} channels, expected {c}")));
        }
        let n = b * h * w;
        // torch raises here too: one value per channel has no variance (its unbiased estimate would be NaN).
        if n < 2 {
            return Err(BeitError::invalid_input(
                "batch norm input",
                format!(
                    "expected more than 1 value per channel when training, got input size {:?} (a batch of one \
                     image cannot train this head: use a batch of at least 2)",
                    x.dims()
                ),
            ));
        }
        if let Some((y, mean, var)) = diff::batch_norm_train(x, &self.weight, &self.bias, self.eps, relu)? {
            self.update_running(&mean, &var, n)?;
            return Ok(y);
        }
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
        let normalized = centered.broadcast_div(&(&var + self.eps)?.sqrt()?)?;
        let shape = (1, c, 1, 1);
        let y = normalized.broadcast_mul(&self.weight.reshape(shape)?)?.broadcast_add(&self.bias.reshape(shape)?)?;
        self.update_running(&mean, &var, n)?;
        Ok(if relu { y.relu()? } else { y })
    }

    /// torch's update, in f64 as its CPU kernel computes it: `running = (1 - m) · running + m · batch`, the
    /// variance unbiased (· n / (n - 1)); `num_batches_tracked += 1`.
    fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        let m = self.momentum;
        let mix = |running: &Var, batch: &Tensor, factor: f64| -> Result<()> {
            let batch = batch.detach().flatten_all()?.to_dtype(DType::F64)?;
            let old = running.as_tensor().detach().to_dtype(DType::F64)?;
            let new = ((old * (1.0 - m))? + (batch * (m * factor))?)?.to_dtype(running.dtype())?;
            Ok(running.set(&new)?)
        };
        mix(&self.running_mean, mean, 1.0)?;
        mix(&self.running_var, var, n as f64 / (n as f64 - 1.0))?;
        let count = self.num_batches_tracked.as_tensor().detach().to_dtype(DType::F64)?;
        self.num_batches_tracked.set(&(count + 1.0)?.to_dtype(self.num_batches_tracked.dtype())?)?;
        Ok(())
    }
}

/// Softmax over the last dimension: fused kernel at inference, composite ops when training.
pub fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode.train {
        return crate::ops::encoder::softmax_last_dim(x);
    }
    Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
}

/// transformers' ACT2FN, formula for formula.
pub fn activation(act: HiddenAct, x: &Tensor) -> Result<Tensor> {
    use HiddenAct::*;
    Ok(match act {
        Gelu | GeluPython => crate::ops::encoder::gelu_erf(x)?,
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

/// Seeds the generator behind dropout and drop path on this thread (training reproducible bit for bit).
pub fn seed_training_rng(seed: u64) {
    *TRAIN_RNG.lock().unwrap_or_else(|e| e.into_inner()) = Rng::new(seed);
}

/// The training generator's current state (for gradient checkpointing's second pass).
pub(crate) fn training_rng() -> Rng {
    TRAIN_RNG.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Makes `rng` the training generator, returning the one it replaces.
pub(crate) fn swap_training_rng(rng: Rng) -> Rng {
    std::mem::replace(&mut *TRAIN_RNG.lock().unwrap_or_else(|e| e.into_inner()), rng)
}

/// `n` draws of 0 or 1/keep, 1/keep with probability keep.
fn keep_values(n: usize, keep: f64) -> Vec<f32> {
    let mut rng = TRAIN_RNG.lock().unwrap_or_else(|e| e.into_inner());
    (0..n).map(|_| if rng.uniform() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect()
}

/// A (shape) tensor of 0 or 1/keep, 1 with probability keep.
fn keep_mask(shape: &[usize], keep: f64, device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(keep_values(shape.iter().product(), keep), shape, device)?)
}

/// Dropout as torch applies it in training (scaled by 1/(1-p)); identity at inference.
pub fn dropout(x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
    if !mode.train || p <= 0.0 {
        return Ok(x.clone());
    }
    Ok(x.mul(&keep_mask(x.dims(), 1.0 - p, x.device())?)?)
}

/// `x + drop_path(λ ⊙ y)` (no layer scale without `lambda`): the end of BeitLayer's two branches, one op when
/// training with a layer scale on the CPU, with drop path's draws as [`drop_path`] makes them.
pub fn scaled_residual(x: &Tensor, y: &Tensor, lambda: Option<&Tensor>, p: f64, mode: Mode) -> Result<Tensor> {
    match lambda {
        Some(l) if mode.train => {
            let keep = (p > 0.0).then(|| keep_values(y.dim(0).unwrap_or(0), 1.0 - p));
            crate::ops::encoder::scaled_residual(x, y, l, keep)
        }
        _ => {
            let y = match lambda {
                Some(l) => y.broadcast_mul(l)?,
                None => y.clone(),
            };
            Ok((drop_path(&y, p, mode)? + x)?)
        }
    }
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
