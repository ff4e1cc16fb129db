//! BeitForSemanticSegmentation: four intermediate layers through the multi-scale FPN, then UperNet
//! (BeitUperHead) and the FCN auxiliary head (BeitFCNHead), as transformers (and mmseg before it) builds them.

use candle_core::{DType, Tensor};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::loss::cross_entropy;
use crate::model::{BeitModel, BeitModelOutput, ForwardOptions};
use crate::kernels::conv::Precision;
use crate::nn::{BatchNorm2d, Conv2d, ConvSpec, ConvTranspose2d, InferenceDtype, Mode};
use crate::ops::{
    adaptive_avg_pool2d, interpolate_bilinear, interpolate_bilinear_differentiable, max_pool2d_differentiable,
};
use crate::weights::Weights;

/// `interpolate(x, (h, w), mode="bilinear", align_corners=False)`: candle's kernel at inference, the
/// differentiable form in training (candle's has no backward pass).
fn resize(x: &Tensor, h: usize, w: usize, mode: Mode) -> Result<Tensor> {
    if mode.train {
        interpolate_bilinear_differentiable(x, h, w, false)
    } else {
        interpolate_bilinear(x, h, w, false)
    }
}

/// A model prepared for inference has its BatchNorms folded into the convolutions: it cannot normalize by a
/// batch's statistics.
fn refuse_training_when_fused(fused: bool, mode: Mode) -> Result<()> {
    if fused && mode.train {
        return Err(BeitError::unsupported(
            "training",
            "this model was prepared for inference (its BatchNorms are folded into the convolutions); load it \
             without preparing it to train it",
        ));
    }
    Ok(())
}

/// fpn1 (4x up: ConvTranspose2d, BatchNorm, GELU, ConvTranspose2d), fpn2 (2x up), fpn3 (identity),
/// fpn4 (2x down: MaxPool2d), applied to the four feature maps in order.
#[derive(Debug, Clone)]
pub struct BeitFeaturePyramid {
    /// fpn1.0: first 2x up-convolution of the 4x branch.
    pub fpn1_0: ConvTranspose2d,
    /// fpn1.1: its BatchNorm.
    pub fpn1_1: BatchNorm2d,
    /// fpn1.3: second 2x up-convolution of the 4x branch.
    pub fpn1_3: ConvTranspose2d,
    /// fpn2.0: the 2x up-convolution.
    pub fpn2_0: ConvTranspose2d,
    /// Set by [`prepare_inference`](Self::prepare_inference): `fpn1_1` is folded into `fpn1_0`.
    fused: bool,
}

impl BeitFeaturePyramid {
    /// Builds fpn1 and fpn2 from `w`.
    pub fn load(w: &Weights, c: &BeitConfig, batch_norm_eps: f64) -> Result<Self> {
        let (d, std) = (c.hidden_size, c.initializer_range);
        Ok(BeitFeaturePyramid {
            fpn1_0: ConvTranspose2d::load_head(&w.pp("fpn1.0"), d, 2, std)?,
            fpn1_1: BatchNorm2d::load_head(&w.pp("fpn1.1"), d, batch_norm_eps)?,
            fpn1_3: ConvTranspose2d::load_head(&w.pp("fpn1.3"), d, 2, std)?,
            fpn2_0: ConvTranspose2d::load_head(&w.pp("fpn2.0"), d, 2, std)?,
            fused: false,
        })
    }

    /// The four maps at 4x, 2x, 1x and 1/2x the patch grid; `mode` decides fpn1.1's statistics.
    pub fn forward(&self, features: &[Tensor], mode: Mode) -> Result<Vec<Tensor>> {
        refuse_training_when_fused(self.fused, mode)?;
        let [f1, f2, f3, f4] = features else {
            return Err(BeitError::invalid_input("features", format!("{} feature maps, expected 4", features.len())));
        };
        let (_, _, h, w) = f4.dims4()?;
        if h < 2 || w < 2 {
            return Err(BeitError::invalid_input(
                "fpn4",
                format!("a {h}x{w} feature map is too small for 2x2 max pooling"),
            ));
        }
        let up2 = if self.fused {
            self.fpn1_0.forward_act(f1, true)?
        } else {
            self.fpn1_1.forward(&self.fpn1_0.forward(f1)?, mode)?.gelu_erf()?
        };
        let up4 = self.fpn1_3.forward(&up2)?;
        let down = if mode.train { max_pool2d_differentiable(f4, 2)? } else { f4.max_pool2d_with_stride(2, 2)? };
        Ok(vec![up4, self.fpn2_0.forward(f2)?, f3.clone(), down])
    }

    /// CPU inference: the upsampling weights packed once (see [`ConvTranspose2d::prepare_inference`]),
    /// the BatchNorm folded into the transposed convolution before it.
    pub fn prepare_inference(&mut self, precision: Precision) -> Result<()> {
        if !self.fused && self.fpn1_0.packed.is_none() {
            let (scale, shift) = batch_norm_affine(&self.fpn1_1)?;
            self.fpn1_0.prepare_inference_scaled(Some((&scale, &shift)), precision)?;
            self.fused = self.fpn1_0.packed.is_some();
        }
        self.fpn1_3.prepare_inference(precision)?;
        self.fpn2_0.prepare_inference(precision)
    }
}

/// An inference BatchNorm as `x · scale + shift` per channel, computed as BatchNorm2d::forward does:
/// `scale = w / sqrt(var + eps)`, `shift = b - mean · scale`.
fn batch_norm_affine(bn: &BatchNorm2d) -> Result<(Vec<f32>, Vec<f32>)> {
    let f32s = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let (w, b) = (f32s(&bn.weight)?, f32s(&bn.bias)?);
    let (mean, var) = bn.running_stats();
    let (mean, var) = (f32s(&mean)?, f32s(&var)?);
    let eps = bn.eps as f32;
    let scale: Vec<f32> = w.iter().zip(&var).map(|(w, v)| w / (v + eps).sqrt()).collect();
    let shift: Vec<f32> = b.iter().zip(&mean).zip(&scale).map(|((b, m), s)| b - m * s).collect();
    Ok((scale, shift))
}

/// BeitConvModule: Conv2d (no bias), BatchNorm2d, ReLU.
#[derive(Debug, Clone)]
pub struct BeitConvModule {
    /// The convolution (no bias).
    pub conv: Conv2d,
    /// Its BatchNorm.
    pub bn: BatchNorm2d,
    /// Set by [`prepare_inference`](Self::prepare_inference): `bn` is folded into `conv`, and the ReLU is
    /// applied in the convolution's output pass.
    fused: bool,
}

impl BeitConvModule {
    /// Builds the module from `w` (`conv.weight`, `bn.*`).
    pub fn load(
        w: &Weights,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        std: f64,
    ) -> Result<Self> {
        let spec = ConvSpec { in_channels, out_channels, kernel, padding, dilation: 1, bias: false };
        Ok(BeitConvModule {
            conv: Conv2d::load_head(&w.pp("conv"), spec, std)?,
            bn: BatchNorm2d::load_head(&w.pp("bn"), out_channels, 1e-5)?,
            fused: false,
        })
    }

    /// Conv, BatchNorm (on the batch's statistics when `mode.train`), ReLU.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_cat(std::slice::from_ref(x), mode)
    }

    /// [`forward`](Self::forward) on the concatenation of `xs` along the channels; once prepared, the
    /// convolution reads the parts in place (for fpn_bottleneck, 4 · 768 channels at 160×160: 314 MB not
    /// built).
    pub fn forward_cat(&self, xs: &[Tensor], mode: Mode) -> Result<Tensor> {
        refuse_training_when_fused(self.fused, mode)?;
        if self.fused {
            return self.conv.forward_cat_act(xs, true);
        }
        self.bn.forward_act(&self.conv.forward_cat_act(xs, false)?, mode, true)
    }

    /// CPU inference: the BatchNorm (running statistics) folded into the convolution's weight and bias,
    /// packed once; saves two passes over each output map. `conv` then holds the folded convolution.
    pub fn prepare_inference(&mut self, precision: Precision) -> Result<()> {
        if self.fused || self.conv.packed.is_some() {
            return Ok(());
        }
        let (scale, shift) = batch_norm_affine(&self.bn)?;
        self.conv.prepare_inference_scaled(Some((&scale, &shift)), precision)?;
        self.fused = self.conv.packed.is_some();
        Ok(())
    }
}

/// BeitUperHead: pyramid pooling on the last map, lateral 1x1 convs, top-down fusion, FPN convs, classifier.
#[derive(Debug, Clone)]
pub struct BeitUperHead {
    /// Output sizes of the pyramid pooling (1, 2, 3, 6 in transformers).
    pub pool_scales: Vec<usize>,
    /// psp_modules.{i}.1 (index 0 is the parameterless adaptive pooling).
    pub psp_modules: Vec<BeitConvModule>,
    /// Fuses the pooled maps with the last feature map.
    pub bottleneck: BeitConvModule,
    /// 1x1 convs on the first three feature maps.
    pub lateral_convs: Vec<BeitConvModule>,
    /// 3x3 convs after the top-down fusion.
    pub fpn_convs: Vec<BeitConvModule>,
    /// Fuses the four upsampled levels.
    pub fpn_bottleneck: BeitConvModule,
    /// 1x1 conv to num_labels.
    pub classifier: Conv2d,
}

impl BeitUperHead {
    /// Builds the module from `w`; heads missing from the checkpoint are initialized (and reported).
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        let (d, std) = (c.hidden_size, c.initializer_range);
        let psp = w.pp("psp_modules");
        let spec =
            ConvSpec { in_channels: d, out_channels: c.num_labels(), kernel: 1, padding: 0, dilation: 1, bias: true };
        Ok(BeitUperHead {
            pool_scales: c.pool_scales.clone(),
            psp_modules: (0..c.pool_scales.len())
                .map(|i| BeitConvModule::load(&psp.pp(format!("{i}.1")), d, d, 1, 0, std))
                .collect::<Result<_>>()?,
            bottleneck: BeitConvModule::load(&w.pp("bottleneck"), d + c.pool_scales.len() * d, d, 3, 1, std)?,
            lateral_convs: (0..3)
                .map(|i| BeitConvModule::load(&w.pp(format!("lateral_convs.{i}")), d, d, 1, 0, std))
                .collect::<Result<_>>()?,
            fpn_convs: (0..3)
                .map(|i| BeitConvModule::load(&w.pp(format!("fpn_convs.{i}")), d, d, 3, 1, std))
                .collect::<Result<_>>()?,
            fpn_bottleneck: BeitConvModule::load(&w.pp("fpn_bottleneck"), 4 * d, d, 3, 1, std)?,
            classifier: Conv2d::load_head(&w.pp("classifier"), spec, std)?,
        })
    }

    fn psp_forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut outs = vec![x.clone()];
        for (scale, conv) in self.pool_scales.iter().zip(&self.psp_modules) {
            let pooled = conv.forward(&adaptive_avg_pool2d(x, *scale, *scale)?, mode)?;
            outs.push(resize(&pooled, h, w, mode)?);
        }
        self.bottleneck.forward_cat(&outs, mode)
    }

    /// Logits from the feature maps, at the resolution of the first; `mode` decides the BatchNorms' statistics.
    pub fn forward(&self, features: &[Tensor], mode: Mode) -> Result<Tensor> {
        let mut laterals: Vec<Tensor> =
            self.lateral_convs.iter().zip(features).map(|(conv, f)| conv.forward(f, mode)).collect::<Result<_>>()?;
        let last = features.last().ok_or_else(|| BeitError::invalid_input("features", "no feature maps"))?;
        laterals.push(self.psp_forward(last, mode)?);
        for i in (1..laterals.len()).rev() {
            let (_, _, h, w) = laterals[i - 1].dims4()?;
            laterals[i - 1] = (&laterals[i - 1] + resize(&laterals[i], h, w, mode)?)?;
        }
        let n = laterals.len();
        let mut outs: Vec<Tensor> =
            self.fpn_convs.iter().zip(&laterals).map(|(conv, l)| conv.forward(l, mode)).collect::<Result<_>>()?;
        outs.push(laterals[n - 1].clone());
        let (_, _, h, w) = outs[0].dims4()?;
        for o in outs.iter_mut().skip(1) {
            *o = resize(o, h, w, mode)?;
        }
        self.classifier.forward(&self.fpn_bottleneck.forward_cat(&outs, mode)?)
    }

    /// CPU inference: every convolution packed once, BatchNorms folded (see
    /// [`BeitConvModule::prepare_inference`]).
    pub fn prepare_inference(&mut self, precision: Precision) -> Result<()> {
        for m in self.psp_modules.iter_mut().chain(&mut self.lateral_convs).chain(&mut self.fpn_convs) {
            m.prepare_inference(precision)?;
        }
        self.bottleneck.prepare_inference(precision)?;
        self.fpn_bottleneck.prepare_inference(precision)?;
        self.classifier.prepare_inference(precision)
    }
}

/// BeitFCNHead: convs on the third feature map (in_index 2), optionally concatenated with its input.
#[derive(Debug, Clone)]
pub struct BeitFCNHead {
    /// `auxiliary_num_convs` 3x3 convs.
    pub convs: Vec<BeitConvModule>,
    /// When `auxiliary_concat_input`: fuses the convs' output with their input.
    pub conv_cat: Option<BeitConvModule>,
    /// 1x1 conv to num_labels.
    pub classifier: Conv2d,
}

impl BeitFCNHead {
    const IN_INDEX: usize = 2;

    /// Builds the module from `w`; heads missing from the checkpoint are initialized (and reported).
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        let (d, ch, std) = (c.hidden_size, c.auxiliary_channels, c.initializer_range);
        let convs = (0..c.auxiliary_num_convs)
            .map(|i| BeitConvModule::load(&w.pp(format!("convs.{i}")), if i == 0 { d } else { ch }, ch, 3, 1, std))
            .collect::<Result<_>>()?;
        let spec =
            ConvSpec { in_channels: ch, out_channels: c.num_labels(), kernel: 1, padding: 0, dilation: 1, bias: true };
        Ok(BeitFCNHead {
            convs,
            conv_cat: if c.auxiliary_concat_input {
                Some(BeitConvModule::load(&w.pp("conv_cat"), d + ch, ch, 3, 1, std)?)
            } else {
                None
            },
            classifier: Conv2d::load_head(&w.pp("classifier"), spec, std)?,
        })
    }

    /// Logits from the feature maps, at the resolution of the first; `mode` decides the BatchNorms' statistics.
    pub fn forward(&self, features: &[Tensor], mode: Mode) -> Result<Tensor> {
        let x = features
            .get(Self::IN_INDEX)
            .ok_or_else(|| BeitError::invalid_input("features", "fewer than 3 feature maps"))?;
        let mut y = x.clone();
        for conv in &self.convs {
            y = conv.forward(&y, mode)?;
        }
        if let Some(cat) = &self.conv_cat {
            y = cat.forward_cat(&[x.clone(), y], mode)?;
        }
        self.classifier.forward(&y)
    }

    /// CPU inference: as [`BeitUperHead::prepare_inference`].
    pub fn prepare_inference(&mut self, precision: Precision) -> Result<()> {
        for m in self.convs.iter_mut().chain(&mut self.conv_cat) {
            m.prepare_inference(precision)?;
        }
        self.classifier.prepare_inference(precision)
    }
}

/// transformers' BeitForSemanticSegmentation.
#[derive(Debug, Clone)]
pub struct BeitForSemanticSegmentation {
    /// The encoder (no pooler).
    pub beit: BeitModel,
    /// fpn1..fpn4 over four intermediate layers.
    pub pyramid: BeitFeaturePyramid,
    /// UperNet.
    pub decode_head: BeitUperHead,
    /// The FCN auxiliary head when `use_auxiliary_head`.
    pub auxiliary_head: Option<BeitFCNHead>,
    /// Hidden-state indices whose maps feed the FPN: transformers takes hidden_states[i] where i + 1 is in
    /// out_indices.
    feature_indices: Vec<usize>,
    auxiliary_loss_weight: f64,
    ignore_index: i64,
    num_labels: usize,
}

/// SemanticSegmenterOutput: logits at a quarter of the input resolution.
#[derive(Debug, Clone)]
pub struct SemanticSegmentationOutput {
    /// Cross entropy (ignoring `semantic_loss_ignore_index`) plus the weighted auxiliary loss, when labels were given.
    pub loss: Option<Tensor>,
    /// (batch, num_labels, height / 4, width / 4)
    pub logits: Tensor,
    /// The auxiliary head's logits, at the same size.
    pub auxiliary_logits: Option<Tensor>,
    /// The encoder's output.
    pub base: BeitModelOutput,
}

impl BeitForSemanticSegmentation {
    /// Builds the module from `w`; heads missing from the checkpoint are initialized (and reported).
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        if c.out_indices.len() != 4 {
            return Err(BeitError::config(
                "out_indices",
                format!(
                    "BeitForSemanticSegmentation needs 4 out_indices (e.g. [3, 5, 7, 11] for base), found {:?}",
                    c.out_indices
                ),
            ));
        }
        let feature_indices: Vec<usize> =
            (0..=c.num_hidden_layers).filter(|&i| c.out_indices.contains(&(i as i64 + 1))).collect();
        if feature_indices.len() != 4 {
            return Err(BeitError::config(
                "out_indices",
                format!(
                    "{:?} selects {} of the {} hidden states (index i takes hidden state i - 1; use 1..={})",
                    c.out_indices,
                    feature_indices.len(),
                    c.num_hidden_layers + 1,
                    c.num_hidden_layers
                ),
            ));
        }
        if c.num_labels() == 0 {
            return Err(BeitError::config("id2label", "semantic segmentation needs at least one class"));
        }
        Ok(BeitForSemanticSegmentation {
            beit: BeitModel::load(&w.pp("beit"), c, false)?,
            pyramid: BeitFeaturePyramid::load(w, c, 1e-5)?,
            decode_head: BeitUperHead::load(&w.pp("decode_head"), c)?,
            auxiliary_head: if c.use_auxiliary_head {
                Some(BeitFCNHead::load(&w.pp("auxiliary_head"), c)?)
            } else {
                None
            },
            feature_indices,
            auxiliary_loss_weight: c.auxiliary_loss_weight,
            ignore_index: c.semantic_loss_ignore_index,
            num_labels: c.num_labels(),
        })
    }

    /// CPU inference: the encoder as `inference` asks (see [`BeitModel::prepare_inference`]), and
    /// the pyramid's and heads' convolutions packed once, with their BatchNorms folded in: bf16 GEMMs under
    /// bf16, f32 otherwise (int8 has no convolution kernel; the heads stay f32 there). The model can then no
    /// longer be trained or saved.
    pub fn prepare_inference(&mut self, inference: impl Into<crate::model::Inference>) -> Result<()> {
        let inference = inference.into();
        let precision = if inference.dtype == InferenceDtype::Bf16 { Precision::Bf16 } else { Precision::F32 };
        self.beit.prepare_inference(inference)?;
        self.pyramid.prepare_inference(precision)?;
        self.decode_head.prepare_inference(precision)?;
        if let Some(aux) = &mut self.auxiliary_head {
            aux.prepare_inference(precision)?;
        }
        Ok(())
    }

    /// `labels`: (batch, height, width) class ids at any resolution (semantic_loss_ignore_index is skipped).
    /// With `o.mode.train` the BatchNorms normalize by the batch's statistics and update their running ones, as
    /// torch's `model.train()`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        o: &ForwardOptions,
        labels: Option<&Tensor>,
    ) -> Result<SemanticSegmentationOutput> {
        if labels.is_some() && self.num_labels == 1 {
            // transformers' check: a single class has no cross-entropy to train.
            return Err(BeitError::config(
                "num_labels",
                "the number of labels should be greater than one to compute a loss",
            ));
        }
        let keep_hidden = o.output_hidden_states;
        let o = ForwardOptions { output_hidden_states: true, ..o.clone() };
        let mut base = self.beit.forward(pixel_values, &o)?;
        let hidden = base.hidden_states.as_ref().ok_or_else(|| BeitError::internal("hidden_states", "not returned"))?;
        let (b, _, h, w) = pixel_values.dims4()?;
        // The actual patch grid (transformers assumes config.image_size; the two agree at that size).
        let p = self.beit.config.patch_size.height;
        let (gh, gw) = (h / p, w / p);
        let features = self
            .feature_indices
            .iter()
            .map(|&i| {
                let x = &hidden[i];
                let n = x.dim(1)?;
                Ok(x.narrow(1, 1, n - 1)?.transpose(1, 2)?.reshape((b, (), gh, gw))?)
            })
            .collect::<Result<Vec<_>>>()?;
        let features = self.pyramid.forward(&features, o.mode)?;
        let logits = self.decode_head.forward(&features, o.mode)?;
        let auxiliary_logits = match &self.auxiliary_head {
            Some(head) => Some(head.forward(&features, o.mode)?),
            None => None,
        };
        let loss = match labels {
            Some(l) => Some(self.loss(&logits, auxiliary_logits.as_ref(), l, o.mode)?),
            None => None,
        };
        if !keep_hidden {
            base.hidden_states = None;
        }
        Ok(SemanticSegmentationOutput { loss, logits, auxiliary_logits, base })
    }

    /// transformers' `compute_loss`: cross-entropy (ignoring `semantic_loss_ignore_index`) on logits upsampled
    /// (bilinear, align_corners=False) to the labels' size, plus `auxiliary_loss_weight` times the auxiliary
    /// head's. In training mode the upsampling is the differentiable form.
    pub fn loss(&self, logits: &Tensor, auxiliary: Option<&Tensor>, labels: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, h, w) = labels.dims3().map_err(|_| {
            BeitError::invalid_input("labels", format!("shape {:?}, expected (batch, height, width)", labels.dims()))
        })?;
        if b != logits.dim(0)? {
            return Err(BeitError::invalid_input("labels", format!("{b} label maps for {} images", logits.dim(0)?)));
        }
        let labels = labels.to_dtype(DType::I64)?.flatten_all()?;
        let ce = |l: &Tensor| -> Result<Tensor> {
            let up = resize(l, h, w, mode)?;
            let c = up.dim(1)?;
            cross_entropy(&up.permute((0, 2, 3, 1))?.reshape(((), c))?, &labels, self.ignore_index)
        };
        let mut loss = ce(logits)?;
        if let Some(aux) = auxiliary {
            loss = (loss + (ce(aux)? * self.auxiliary_loss_weight)?)?;
        }
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(extra: &str) -> Result<BeitConfig> {
        BeitConfig::from_json_str(&format!(
            r#"{{"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 8, "num_hidden_layers": 4,
                "image_size": 32, "patch_size": 8, "auxiliary_channels": 4, "num_labels": 3 {extra}}}"#
        ))
    }

    #[test]
    fn bad_configurations_are_errors() {
        let e = config(r#", "out_indices": [1, 2, 3, 9]"#).unwrap_err().to_string();
        assert!(e.contains("out_indices") && e.contains('9'), "{e}");
        let w = Weights::fresh(&Device::Cpu, 0);
        let e = BeitForSemanticSegmentation::load(&w, &config(r#", "out_indices": [1, 2, 3]"#).unwrap()).unwrap_err();
        assert!(e.to_string().contains("4 out_indices"), "{e}");
        // Index 0 would take hidden state -1: transformers silently builds three features and then fails.
        let e =
            BeitForSemanticSegmentation::load(&w, &config(r#", "out_indices": [0, 1, 2, 3]"#).unwrap()).unwrap_err();
        assert!(e.to_string().contains("selects 3"), "{e}");
        let e = config(r#", "out_indices": [1, 2, 3, 4], "pool_scales": [1, 0]"#).unwrap_err().to_string();
        assert!(e.contains("pool_scales"), "{e}");
    }

    #[test]
    fn prepared_inference_matches_the_loaded_model() {
        // conv_cat and two auxiliary convs: every conv path (Winograd 3x3, 1x1, concatenated input).
        let c = config(r#", "out_indices": [1, 2, 3, 4], "auxiliary_num_convs": 2, "auxiliary_concat_input": true"#)
            .unwrap();
        let m = BeitForSemanticSegmentation::load(&Weights::fresh(&Device::Cpu, 3), &c).unwrap();
        let mut p = m.clone();
        p.prepare_inference(crate::nn::InferenceDtype::F32).unwrap();
        assert!(p.decode_head.fpn_bottleneck.conv.packed.is_some() && p.pyramid.fpn1_3.packed.is_some());
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 48), &Device::Cpu).unwrap();
        let (a, b) = (
            m.forward(&x, &ForwardOptions::default(), None).unwrap(),
            p.forward(&x, &ForwardOptions::default(), None).unwrap(),
        );
        let diff = |x: &Tensor, y: &Tensor| {
            (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&a.logits, &b.logits) < 1e-5, "logits {}", diff(&a.logits, &b.logits));
        let (aa, ba) = (a.auxiliary_logits.unwrap(), b.auxiliary_logits.unwrap());
        assert!(diff(&aa, &ba) < 1e-5, "auxiliary logits {}", diff(&aa, &ba));
        // The folded weight is still readable.
        assert_eq!(p.decode_head.fpn_bottleneck.conv.weight().unwrap().dims(), &[16, 64, 3, 3]);
    }

    fn train() -> ForwardOptions {
        ForwardOptions { mode: Mode { train: true, uncached: true, ..Mode::default() }, ..Default::default() }
    }

    #[test]
    fn training_updates_the_running_statistics_that_are_saved() {
        let c = config(r#", "out_indices": [1, 2, 3, 4], "use_auxiliary_head": true"#).unwrap();
        let w =
            Weights::build(Default::default(), "<fresh>".into(), crate::weights::Source::Fresh, &Device::Cpu, true, 5);
        let m = BeitForSemanticSegmentation::load(&w, &c).unwrap();
        // Running statistics are saved but never handed to the optimizer.
        assert!(w.vars().iter().all(|(n, _)| !n.contains("running_") && !n.contains("num_batches")));
        let saved = |name: &str| w.params().into_iter().find(|(n, _)| n == name).unwrap().1;
        let before = saved("fpn1.1.running_mean").to_vec1::<f32>().unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let labels = Tensor::zeros((2, 32, 32), DType::I64, &Device::Cpu).unwrap();
        let eval = m.forward(&x, &ForwardOptions::default(), None).unwrap().logits;
        let out = m.forward(&x, &train(), Some(&labels)).unwrap();
        assert!(out.loss.unwrap().backward().is_ok());
        let after = saved("fpn1.1.running_mean").to_vec1::<f32>().unwrap();
        assert!(before.iter().zip(&after).any(|(a, b)| a != b), "fpn1.1.running_mean did not move");
        assert_eq!(saved("decode_head.bottleneck.bn.num_batches_tracked").to_scalar::<i64>().unwrap(), 1);
        // Evaluation reads the updated statistics.
        let eval2 = m.forward(&x, &ForwardOptions::default(), None).unwrap().logits;
        let d = (eval - eval2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0);
    }

    #[test]
    fn training_refuses_one_value_per_channel_and_prepared_models() {
        let c = config(r#", "out_indices": [1, 2, 3, 4]"#).unwrap();
        let m = BeitForSemanticSegmentation::load(&Weights::fresh(&Device::Cpu, 0), &c).unwrap();
        // One image: pool scale 1 gives psp_modules.0 a 1x1 map, one value per channel (torch raises too).
        let x = Tensor::randn(0f32, 1.0, (1, 3, 32, 32), &Device::Cpu).unwrap();
        let e = m.forward(&x, &train(), None).unwrap_err();
        assert!(
            matches!(e, BeitError::InvalidInput { .. }) && e.to_string().contains("more than 1 value per channel"),
            "{e}"
        );
        let mut p = m.clone();
        p.prepare_inference(crate::nn::InferenceDtype::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let e = p.forward(&x, &train(), None).unwrap_err();
        assert!(matches!(e, BeitError::Unsupported { .. }), "{e}");
        let bn = &m.pyramid.fpn1_1;
        let e = bn.forward(
            &Tensor::zeros((1, 16, 1, 1), DType::F32, &Device::Cpu).unwrap(),
            Mode { train: true, uncached: true, ..Mode::default() },
        );
        assert!(e.unwrap_err().to_string().contains("[1, 16, 1, 1]"));
    }

    #[test]
    fn small_inputs_are_errors_not_panics() {
        let c = config(r#", "out_indices": [1, 2, 3, 4]"#).unwrap();
        let m = BeitForSemanticSegmentation::load(&Weights::fresh(&Device::Cpu, 0), &c).unwrap();
        let mut prepared = m.clone();
        prepared.prepare_inference(crate::nn::InferenceDtype::F32).unwrap();
        for m in [m, prepared] {
            // One patch: the 1x1 map cannot be max-pooled by fpn4.
            let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
            let e = m.forward(&x, &ForwardOptions::default(), None).unwrap_err().to_string();
            assert!(e.contains("too small"), "{e}");
            let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
            assert!(m.forward(&x, &ForwardOptions::default(), None).is_err());
            // Pool scales larger than the map are computed as torch does (cells repeat), not refused.
            let x = Tensor::zeros((1, 3, 32, 48), DType::F32, &Device::Cpu).unwrap();
            let out = m.forward(&x, &ForwardOptions::default(), None).unwrap();
            assert_eq!(out.logits.dims(), &[1, 3, 16, 24]); // 4x the 4x6 patch grid
                                                            // The smallest map fpn4 takes: 2x2 patches, pooled to 1x1.
            let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(m.forward(&x, &ForwardOptions::default(), None).unwrap().logits.dims(), &[1, 3, 8, 8]);
        }
    }
}
