//! BEiT's optimizer (unilm's run_class_finetuning.py and run_beit_pretraining.py): AdamW with layer-wise
//! learning-rate decay, no weight decay on biases, norms, position tables, layer scale and the CLS token, a
//! cosine schedule with linear warmup, and global gradient-norm clipping.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::error::{BeitError, Result};

/// unilm's get_layer_id_for_vit, on transformers' names: embeddings 0, layer i -> i + 1, everything after the
/// encoder (head, pooler, shared relative bias) num_layers + 1.
pub fn layer_id(name: &str, num_layers: usize) -> usize {
    let name = name.strip_prefix("beit.").unwrap_or(name);
    if name.starts_with("embeddings.") {
        return 0;
    }
    if let Some(rest) = name.strip_prefix("encoder.layer.") {
        if let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
            return i + 1;
        }
    }
    num_layers + 1
}

/// unilm skips weight decay for 1-D parameters (biases, norms, layer scale) and the tables in its skip list.
pub fn no_weight_decay(name: &str, rank: usize) -> bool {
    rank <= 1
        || name.ends_with(".bias")
        || name.contains("position_embeddings")
        || name.contains("cls_token")
        || name.contains("mask_token")
        || name.contains("relative_position_bias_table")
}

/// Linear warmup from 0 to `base` over `warmup` steps, then cosine down to `min_lr` at `total`.
pub fn cosine_lr(step: usize, total: usize, warmup: usize, base: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let t = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

/// Elements per work item of the parallel passes. The step's result does not depend on it (each element's
/// arithmetic is independent of the others); the norm's does (it fixes the order of the sum), which is why it
/// is a constant and not a function of the thread count.
const CHUNK: usize = 1 << 16;

/// torch's clip_grad_norm_ (L2 over all gradients together): scales them down to `max_norm` when above it.
/// Returns the norm before clipping. [`AdamW::step`] does the same with the scaling folded into its pass; this
/// stand-alone form (a pass for the norm, then one tensor multiply per gradient) is for gradients that go
/// elsewhere. Every gradient must be f32 on the CPU.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let present = grads
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.as_ref().map(|g| (i, g)))
        .map(|(i, g)| {
            if g.dtype() != DType::F32 || !g.device().is_cpu() {
                let found = format!("{:?} on {:?}, expected f32 on the CPU", g.dtype(), g.device().location());
                return Err(BeitError::invalid_input(format!("gradient {i}"), found));
            }
            Ok(g.contiguous()?)
        })
        .collect::<Result<Vec<_>>>()?;
    let norm = grad_norm(&present)?;
    let coef = clip_coef(max_norm, norm);
    if coef != 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * f64::from(coef))?;
        }
    }
    Ok(norm)
}

/// clip_grad_norm_'s factor, `max_norm / (norm + 1e-6)` in f64, applied (as f32, the gradients' dtype) only
/// when below 1; 1 otherwise, which leaves every gradient as it is.
fn clip_coef(max_norm: f64, norm: f64) -> f32 {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        coef as f32
    } else {
        1.0
    }
}

/// The global L2 norm of `grads` (contiguous f32 CPU tensors), in f64: see [`sum_squares`] for the order.
fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    let slices = guards.iter().map(|(s, l)| f32_slice(s, l, "gradient")).collect::<Result<Vec<_>>>()?;
    Ok(sum_squares(&slices).sqrt())
}

/// The sum of the squares of every element, in f64 and in a fixed order whatever the thread count: each slice
/// cut into [`CHUNK`]-element pieces from its start, each piece summed in 8 interleaved lanes (lane i takes
/// elements i, i + 8, ...; the lanes then added 0 to 7), the pieces' sums added in order.
fn sum_squares(slices: &[&[f32]]) -> f64 {
    let pieces: Vec<&[f32]> = slices.iter().flat_map(|s| s.chunks(CHUNK)).collect();
    let sums: Vec<f64> = pieces.par_iter().map(|p| piece_sum_squares(p)).collect();
    sums.iter().fold(0.0, |a, b| a + b)
}

fn piece_sum_squares(piece: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut eights = piece.chunks_exact(8);
    for c in &mut eights {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f64::from(x) * f64::from(x);
        }
    }
    for (l, &x) in lanes.iter_mut().zip(eights.remainder()) {
        *l += f64::from(x) * f64::from(x);
    }
    lanes.iter().fold(0.0, |a, b| a + b)
}

/// The elements of a contiguous f32 CPU tensor's storage (callers have checked all three).
fn f32_slice<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(BeitError::internal("AdamW", format!("{what} is not on the CPU")));
    };
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| BeitError::internal("AdamW", format!("{what} is not contiguous")))?;
    cpu.as_slice::<f32>()?
        .get(start..end)
        .ok_or_else(|| BeitError::internal("AdamW", format!("{what}'s layout runs past its storage")))
}

/// The scalars of one parameter's update, as torch's CPU kernels see them. `_single_tensor_adamw` computes them
/// as Python floats (f64); each kernel converts its scalar to the tensors' dtype (`Scalar::to<float>()` for
/// lerp_, addcmul_ and addcdiv_'s `value`, a wrapped-number operand cast to the common dtype f32 for mul_, `/`
/// and add_) before any arithmetic, so every one is an f64 rounded once to f32, and the element arithmetic is
/// f32 throughout.
#[derive(Clone, Copy)]
struct Coeffs {
    /// clip_grad_norm_'s factor (1 when not clipping: `g * 1.0` is `g`).
    grad_scale: f32,
    /// `1 - lr * weight_decay` (1 without weight decay).
    decay: f32,
    /// `1 - beta1`, lerp_'s weight.
    lerp_weight: f32,
    beta2: f32,
    /// `1 - beta2`, addcmul_'s value.
    one_minus_beta2: f32,
    /// `sqrt(1 - beta2^step)`.
    bc2_sqrt: f32,
    eps: f32,
    /// `-(lr / (1 - beta1^step))`, addcdiv_'s value.
    neg_step_size: f32,
}

impl Coeffs {
    /// One pass over a range of a parameter: the gradient scaled as read, then torch's `_single_tensor_adamw`
    /// line by line.
    fn update(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            // clip_grad_norm_: grad.mul_(clip_coef).
            let g = g * self.grad_scale;
            // param.mul_(1 - lr * weight_decay)
            let p = *w * self.decay;
            // exp_avg.lerp_(grad, 1 - beta1): for a weight below 0.5 torch's vectorised CPU kernel (lerp_vec,
            // what every AVX2, AVX-512 and NEON build runs on all but a short tail of each contiguous range) is
            // vec::fmadd(weight, end - self, self), one fused multiply-add; mul_add is the same single rounding.
            let m_new = self.lerp_weight.mul_add(g - *m, *m);
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): self + value * t1 * t2, unfused.
            let v_new = *v * self.beta2 + self.one_minus_beta2 * g * g;
            // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            let denom = v_new.sqrt() / self.bc2_sqrt + self.eps;
            // param.addcdiv_(exp_avg, denom, value=-step_size): self + value * t1 / t2.
            *w = p + self.neg_step_size * m_new / denom;
            *m = m_new;
            *v = v_new;
        }
    }

    /// [`Coeffs::update`] over a whole parameter, in [`CHUNK`]-element pieces across rayon's current pool.
    fn update_par(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        if w.len() <= CHUNK {
            return self.update(w, g, m, v);
        }
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| self.update(w, g, m, v));
    }
}

/// One parameter's update as a candle in-place op: candle hands it the weight's storage under its write lock
/// (and the gradient's under a read lock, refusing a gradient that shares the weight's storage), so the new
/// weight is written where the old one was read, with no copy and no unsafe code. The write lock is held while
/// the pass runs across the pool; nothing else touches the model's weights during a step.
struct Update<'a> {
    name: &'a str,
    coeffs: Coeffs,
    /// The moments, borrowed for the one call candle makes (`cpu_fwd` takes `&self`).
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, wl: &Layout, g: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let name = self.name;
        let fail = |what: &str| candle_core::Error::Msg(format!("AdamW update of `{name}`: {what}"));
        let CpuStorage::F32(w) = w else { return Err(fail("the weight is not f32")) };
        let w = wl.contiguous_offsets().and_then(|(a, b)| w.get_mut(a..b)).ok_or_else(|| fail("weight layout"))?;
        let g = gl.contiguous_offsets().and_then(|(a, b)| g.as_slice::<f32>().ok()?.get(a..b));
        let g = g.ok_or_else(|| fail("gradient layout"))?;
        let mut moments = self.moments.try_borrow_mut().map_err(|_| fail("moments already borrowed"))?;
        let (m, v) = &mut *moments;
        if g.len() != w.len() || m.len() != w.len() || v.len() != w.len() {
            return Err(fail("element counts differ"));
        }
        self.coeffs.update_par(w, g, m, v);
        Ok(())
    }
}

struct Param {
    name: String,
    var: Var,
    lr_scale: f64,
    weight_decay: f64,
    /// exp_avg and exp_avg_sq, flat in the weight's element order.
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    /// `g` checked against the parameter (f32, its shape, on the CPU) and contiguous: a transposed view, as a
    /// linear layer's weight gradient can be, is copied once. The weight itself must be a contiguous f32 CPU
    /// tensor.
    fn checked_grad(&self, g: &Tensor) -> Result<Tensor> {
        let name = &self.name;
        let w = self.var.as_tensor();
        if w.dtype() != DType::F32 || !w.device().is_cpu() || !w.is_contiguous() {
            let found = format!("{:?} on {:?}", w.dtype(), w.device().location());
            return Err(BeitError::unsupported(
                format!("AdamW parameter `{name}`"),
                format!("{found}; the optimizer updates contiguous f32 CPU tensors"),
            ));
        }
        if g.dtype() != DType::F32 || !g.device().is_cpu() {
            let found = format!("{:?} on {:?}, expected f32 on the CPU", g.dtype(), g.device().location());
            return Err(BeitError::invalid_input(format!("gradient of `{name}`"), found));
        }
        if g.dims() != w.dims() {
            let found = format!("shape {:?}, expected the parameter's {:?}", g.dims(), w.dims());
            return Err(BeitError::invalid_input(format!("gradient of `{name}`"), found));
        }
        Ok(g.contiguous()?)
    }
}

/// AdamW (torch's, β 0.9 and 0.999, ε 1e-8) with a learning-rate scale and a weight decay per parameter.
pub struct AdamW {
    params: Vec<Param>,
    /// Optimizer steps taken (the schedule's position).
    pub step: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    /// Over `vars` (by transformers' names): layer i's learning rate scaled by `layer_decay` to the power of its
    /// depth from the top, `weight_decay` on all but [`no_weight_decay`]'s parameters.
    pub fn new(vars: Vec<(String, Var)>, num_layers: usize, layer_decay: f64, weight_decay: f64) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let depth = num_layers + 1 - layer_id(&name, num_layers);
                let lr_scale = layer_decay.powi(depth as i32);
                let wd = if no_weight_decay(&name, var.rank()) { 0.0 } else { weight_decay };
                let n = var.elem_count();
                Param { name, lr_scale, weight_decay: wd, m: vec![0.0; n], v: vec![0.0; n], var }
            })
            .collect();
        Ok(AdamW { params, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8 })
    }

    /// One update with `grads` (one per parameter, in parameter order) at learning rate `lr`, scaled per
    /// parameter, as torch.optim.AdamW's single-tensor path computes it. With `clip`, the gradients are first
    /// scaled as torch's clip_grad_norm_ would (global L2 norm; factor `clip / (norm + 1e-6)` when below 1),
    /// the scaling folded into the update's pass, and the norm before clipping is returned. Parameters without
    /// a gradient (unused heads) are left alone, as torch leaves them. Each parameter is one pass over (weight,
    /// gradient, moments) across rayon's current pool; the result does not depend on the thread count.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, clip: Option<f64>) -> Result<Option<f64>> {
        if grads.len() != self.params.len() {
            let found = format!("{} gradients for {} parameters", grads.len(), self.params.len());
            return Err(BeitError::invalid_input("AdamW step", found));
        }
        let grads = self
            .params
            .iter()
            .zip(grads)
            .map(|(p, g)| g.as_ref().map(|g| p.checked_grad(g)).transpose())
            .collect::<Result<Vec<_>>>()?;
        let norm = match clip {
            Some(_) => Some(grad_norm(&grads.iter().flatten().cloned().collect::<Vec<_>>())?),
            None => None,
        };
        let grad_scale = match (clip, norm) {
            (Some(max), Some(norm)) => clip_coef(max, norm),
            _ => 1.0,
        };
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        // torch keeps the step as a float tensor and takes `.item()`: `beta ** step` is Python's float power,
        // C's pow, which f64::powf also calls (powi would multiply and can differ in the last bit).
        let t = self.step as f64;
        let bias_correction1 = 1.0 - b1.powf(t);
        let bias_correction2_sqrt = (1.0 - b2.powf(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(&grads) {
            let Some(g) = g else { continue };
            let lr = lr * p.lr_scale;
            let coeffs = Coeffs {
                grad_scale,
                decay: (1.0 - lr * p.weight_decay) as f32,
                lerp_weight: (1.0 - b1) as f32,
                beta2: b2 as f32,
                one_minus_beta2: (1.0 - b2) as f32,
                bc2_sqrt: bias_correction2_sqrt as f32,
                eps: self.eps as f32,
                neg_step_size: (-(lr / bias_correction1)) as f32,
            };
            let op = Update { name: &p.name, coeffs, moments: RefCell::new((&mut p.m, &mut p.v)) };
            let what = || format!("AdamW update of `{}`", op.name);
            p.var.as_tensor().inplace_op2(g, &op).map_err(|e| BeitError::internal(what(), e.to_string()))?;
        }
        Ok(norm)
    }

    /// Gradients of every parameter from one backward pass, in parameter order.
    pub fn grads(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.params.iter().map(|p| store.get(p.var.as_tensor()).cloned()).collect()
    }

    /// The parameters' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Moments by parameter name (`exp_avg.NAME`, `exp_avg_sq.NAME`, f32 tensors of the parameter's shape), for
    /// --resume.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut s = HashMap::new();
        for p in &self.params {
            let (shape, device) = (p.var.shape(), p.var.device());
            s.insert(format!("exp_avg.{}", p.name), Tensor::from_slice(&p.m, shape, device)?);
            s.insert(format!("exp_avg_sq.{}", p.name), Tensor::from_slice(&p.v, shape, device)?);
        }
        Ok(s)
    }

    /// Restores [`AdamW::state`]'s moments and the step count; every parameter's moments must be there, f32 in
    /// its shape. Nothing changes unless all of them are.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let read = |key: String, p: &Param| -> Result<Vec<f32>> {
            let t = state
                .get(&key)
                .ok_or_else(|| BeitError::invalid_input("optimizer state", format!("missing `{key}`")))?;
            if t.dims() != p.var.dims() {
                let found = format!("`{key}` has shape {:?}, expected {:?}", t.dims(), p.var.dims());
                return Err(BeitError::invalid_input("optimizer state", found));
            }
            if t.dtype() != DType::F32 {
                let found = format!("`{key}` is {:?}, expected f32", t.dtype());
                return Err(BeitError::invalid_input("optimizer state", found));
            }
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let loaded = self
            .params
            .iter()
            .map(|p| Ok((read(format!("exp_avg.{}", p.name), p)?, read(format!("exp_avg_sq.{}", p.name), p)?)))
            .collect::<Result<Vec<_>>>()?;
        for (p, (m, v)) in self.params.iter_mut().zip(loaded) {
            p.m = m;
            p.v = v;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_and_decay_groups() {
        assert_eq!(layer_id("beit.embeddings.cls_token", 12), 0);
        assert_eq!(layer_id("beit.encoder.layer.0.attention.attention.query.weight", 12), 1);
        assert_eq!(layer_id("beit.encoder.layer.11.lambda_1", 12), 12);
        assert_eq!(layer_id("classifier.weight", 12), 13);
        assert_eq!(layer_id("beit.encoder.relative_position_bias.relative_position_bias_table", 12), 13);
        assert!(no_weight_decay("beit.encoder.layer.0.lambda_1", 1));
        assert!(no_weight_decay("beit.embeddings.position_embeddings", 3));
        assert!(!no_weight_decay("classifier.weight", 2));
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        assert_eq!(cosine_lr(0, 100, 10, 1.0, 0.0), 0.0);
        assert!((cosine_lr(5, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((cosine_lr(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(100, 100, 10, 1.0, 1e-6) - 1e-6).abs() < 1e-12);
    }

    /// One AdamW step against torch.optim.AdamW(lr=0.1, weight_decay=0.5) on w=[1,-2], grad=[0.5, 0.25]:
    /// w* = w * (1 - 0.05) - 0.1 * m_hat / sqrt(v_hat) = [0.95 - 0.1, -1.9 - 0.1].
    #[test]
    fn adamw_step_matches_torch() {
        let var = Var::new(&[1f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], 0, 1.0, 0.5).unwrap();
        // A 1-D tensor would skip decay; give it its own group for the test.
        opt.params[0].weight_decay = 0.5;
        let g = Tensor::new(&[0.5f32, 0.25], &candle_core::Device::Cpu).unwrap();
        opt.step(&[Some(g)], 0.1, None).unwrap();
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((w[0] - 0.85).abs() < 1e-5 && (w[1] + 2.0).abs() < 1e-5, "{w:?}");
    }

    #[test]
    fn clipping_scales_the_global_norm() {
        let d = candle_core::Device::Cpu;
        let mut g = vec![Some(Tensor::new(&[3f32, 0.0], &d).unwrap()), None, Some(Tensor::new(&[4f32], &d).unwrap())];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let a = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        let b = g[2].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.8).abs() < 1e-6, "{a:?} {b:?}");
        // Below the limit: untouched.
        let mut g = vec![Some(Tensor::new(&[0.3f32], &d).unwrap())];
        clip_grad_norm(&mut g, 1.0).unwrap();
        assert_eq!(g[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), vec![0.3]);
    }

    /// The optimizer as it was before the fused pass: candle tensor ops per parameter, clipping a pass of its
    /// own. Kept as the reference the fused step is held to (and timed against).
    mod old {
        use candle_core::{DType, Tensor, Var};

        pub struct Param {
            pub var: Var,
            pub lr_scale: f64,
            pub weight_decay: f64,
            pub m: Tensor,
            pub v: Tensor,
        }

        pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> candle_core::Result<f64> {
            let mut sq = 0f64;
            for g in grads.iter().flatten() {
                sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
            let norm = sq.sqrt();
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                for g in grads.iter_mut().flatten() {
                    *g = (&*g * coef)?;
                }
            }
            Ok(norm)
        }

        pub fn step(params: &mut [Param], step: usize, grads: &[Option<Tensor>], lr: f64) -> candle_core::Result<()> {
            let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
            let bc1 = 1.0 - b1.powi(step as i32);
            let bc2 = 1.0 - b2.powi(step as i32);
            for (p, g) in params.iter_mut().zip(grads) {
                let Some(g) = g else { continue };
                let g = g.detach();
                let lr = lr * p.lr_scale;
                p.m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?.detach();
                p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
                let update = ((&p.m / bc1)? / ((&p.v / bc2)?.sqrt()? + eps)?)?;
                let mut w = p.var.as_tensor().detach();
                if p.weight_decay > 0.0 {
                    w = (&w * (1.0 - lr * p.weight_decay))?;
                }
                p.var.set(&(w - (update * lr)?)?)?;
            }
            Ok(())
        }
    }

    /// Deterministic pseudo-random values in [-scale, scale) (splitmix64).
    fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// A small model's worth of parameters: decayed matrices in two layers and the head, undecayed biases and
    /// layer scales, one matrix above [`CHUNK`] elements so the parallel pieces are exercised.
    fn shapes() -> Vec<(&'static str, Vec<usize>)> {
        vec![
            ("beit.embeddings.cls_token", vec![1, 1, 8]),
            ("beit.encoder.layer.0.intermediate.dense.weight", vec![37, 29]),
            ("beit.encoder.layer.0.intermediate.dense.bias", vec![37]),
            ("beit.encoder.layer.1.lambda_1", vec![8]),
            ("beit.encoder.layer.1.output.dense.weight", vec![3 * CHUNK / 256 + 1, 256]),
            ("classifier.weight", vec![3, 17]),
            ("classifier.bias", vec![3]),
        ]
    }

    fn vars(seed: u64) -> Vec<(String, Var)> {
        let d = candle_core::Device::Cpu;
        shapes()
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n = shape.iter().product();
                let t = Tensor::from_vec(noise(n, seed + i as u64, 1.0), shape, &d).unwrap();
                (name.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect()
    }

    /// Step `s`'s gradients: one parameter without any (an unused head), the others noise of `scale`.
    fn grads(s: u64, scale: f32) -> Vec<Option<Tensor>> {
        let d = candle_core::Device::Cpu;
        shapes()
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n = shape.iter().product();
                (name != "classifier.bias")
                    .then(|| Tensor::from_vec(noise(n, 1000 * s + i as u64, scale), shape, &d).unwrap())
            })
            .collect()
    }

    fn bits(opt: &AdamW) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        for p in &opt.params {
            let w = p.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for xs in [&w, &p.m, &p.v] {
                out.push(xs.iter().map(|x| x.to_bits()).collect());
            }
        }
        out
    }

    /// |a - b| in units of f32's epsilon relative to max(|a|, |b|, floor): ulps for values above `floor`, and
    /// for values that cancelled to near zero (a moment whose sign flips, a weight crossing zero), ulps of the
    /// magnitude `floor` that the cancelling terms had.
    fn rel_eps(a: f32, b: f32, floor: f32) -> f32 {
        (a - b).abs() / a.abs().max(b.abs()).max(floor) / f32::EPSILON
    }

    /// The fused step against the old tensor-op formulation, five steps each from the same state, with weight
    /// decay, layer decay (so lr_scale != 1) and an absent gradient. The two are not the same arithmetic (the old one: m * b1 + g * (1 -
    /// b1), sqrt(v / bc2), m / bc1 * lr in separate roundings; the new one torch's: lerp as one fused
    /// multiply-add, sqrt(v) / sqrt(bc2), lr / bc1 in f64), so they agree to rounding: asserted within 4 f32
    /// epsilons relative to each value, or, for values that cancel to near zero, to the magnitude of the terms
    /// that cancelled (the step size lr for a weight, 1e-3 = (1 - b1) * |g| for m, 1e-7 = (1 - b2) * g² for v);
    /// see [`rel_eps`]. Measured worst: weight 2.6, m 1.95, v 1.76 (printed by the test).
    #[test]
    fn fused_step_matches_the_tensor_formulation() {
        let vs = vars(7);
        let mut opt = AdamW::new(vs.clone(), 2, 0.75, 0.05).unwrap();
        let mut reference: Vec<old::Param> = opt
            .params
            .iter()
            .map(|p| {
                let var = Var::from_tensor(&p.var.as_tensor().copy().unwrap()).unwrap();
                let zeros = var.zeros_like().unwrap();
                old::Param { var, lr_scale: p.lr_scale, weight_decay: p.weight_decay, m: zeros.clone(), v: zeros }
            })
            .collect();
        assert!(opt.params.iter().any(|p| p.lr_scale != 1.0) && opt.params.iter().any(|p| p.weight_decay > 0.0));
        let mut worst = [0f32; 3];
        for s in 1..=5 {
            // Each step from the same state: the reference takes the fused weights and moments first, so what
            // is compared is one step's arithmetic, not rounding carried over from the steps before.
            let d = candle_core::Device::Cpu;
            for (p, r) in opt.params.iter().zip(reference.iter_mut()) {
                r.var.set(&p.var.as_tensor().copy().unwrap()).unwrap();
                r.m = Tensor::from_slice(&p.m, p.var.shape(), &d).unwrap();
                r.v = Tensor::from_slice(&p.v, p.var.shape(), &d).unwrap();
            }
            let g = grads(s, 0.01);
            let lr = 1e-3 * s as f64;
            opt.step(&g, lr, None).unwrap();
            old::step(&mut reference, s as usize, &g, lr).unwrap();
            for (p, r) in opt.params.iter().zip(&reference) {
                let w = p.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let rw = r.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let rm = r.m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let rv = r.v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let floors = [(lr * p.lr_scale) as f32, 1e-3, 1e-7];
                for (k, (a, b)) in [(&w, &rw), (&p.m, &rm), (&p.v, &rv)].into_iter().enumerate() {
                    for (&x, &y) in a.iter().zip(b.iter()) {
                        worst[k] = worst[k].max(rel_eps(x, y, floors[k]));
                    }
                }
            }
        }
        let [w, m, v] = worst;
        eprintln!("worst against the tensor formulation, in f32 epsilons: weight {w}, m {m}, v {v}");
        assert!(worst.iter().all(|&u| u <= 4.0), "{worst:?}");
        // The parameter without a gradient did not move.
        let head = opt.params.iter().position(|p| p.name == "classifier.bias").unwrap();
        let before = vs[head].1.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(opt.params[head].var.as_tensor().to_vec1::<f32>().unwrap(), before);
        assert!(opt.params[head].m.iter().all(|&x| x == 0.0));
    }

    /// The fused step, element by element, is torch's `_single_tensor_adamw` sequence in f32 with each scalar
    /// computed in f64 and rounded once: bit for bit against that sequence written out plainly.
    #[test]
    fn fused_step_is_torch_single_tensor_arithmetic() {
        let d = candle_core::Device::Cpu;
        let n = 3 * (CHUNK * 2 / 3 + 1);
        let w0 = noise(n, 1, 1.0);
        let var = Var::from_tensor(&Tensor::from_vec(w0.clone(), (n / 3, 3), &d).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("classifier.weight".into(), var.clone())], 0, 1.0, 0.05).unwrap();
        let (mut w, mut m, mut v) = (w0, vec![0f32; n], vec![0f32; n]);
        for step in 1..=4u64 {
            let g = noise(n, 100 + step, 0.02);
            let lr = 2e-3;
            opt.step(&[Some(Tensor::from_vec(g.clone(), (n / 3, 3), &d).unwrap())], lr, None).unwrap();
            let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
            let bc1 = 1.0 - b1.powf(step as f64);
            let bc2_sqrt = (1.0 - b2.powf(step as f64)).sqrt();
            let step_size = lr / bc1;
            for i in 0..n {
                w[i] *= (1.0 - lr * 0.05) as f32;
                m[i] = ((1.0 - b1) as f32).mul_add(g[i] - m[i], m[i]);
                v[i] *= b2 as f32;
                v[i] += ((1.0 - b2) as f32) * g[i] * g[i];
                let denom = v[i].sqrt() / bc2_sqrt as f32 + eps as f32;
                w[i] += (-step_size) as f32 * m[i] / denom;
            }
        }
        let got = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(got.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(opt.params[0].m.iter().zip(&m).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(opt.params[0].v.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// Three clipped steps on a pool of one thread and on a pool of two: the same bits in the weights, the
    /// moments and the norms.
    #[test]
    fn one_and_two_threads_agree_bit_for_bit() {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut opt = AdamW::new(vars(3), 2, 0.75, 0.05).unwrap();
                let norms: Vec<u64> =
                    (1..=3).map(|s| opt.step(&grads(s, 0.05), 1e-3, Some(1.0)).unwrap().unwrap().to_bits()).collect();
                (bits(&opt), norms)
            })
        };
        let (one, two) = (run(1), run(2));
        // The gradients' norm is well above 1, so the clipping scaled them.
        assert!(f64::from_bits(one.1[0]) > 1.0, "{}", f64::from_bits(one.1[0]));
        assert_eq!(one.1, two.1);
        assert!(one.0 == two.0, "1 and 2 threads differ");
    }

    /// Clipping folded into the step equals clip_grad_norm, then a step without clipping, bit for bit, above the
    /// limit (scaled) and below it (untouched).
    #[test]
    fn clipping_folded_in_equals_clip_then_step() {
        for (scale, max) in [(0.05f32, 1.0), (0.05, 1e3)] {
            let mut fused = AdamW::new(vars(5), 2, 0.75, 0.05).unwrap();
            let mut apart = AdamW::new(vars(5), 2, 0.75, 0.05).unwrap();
            for s in 1..=3 {
                let g = grads(s, scale);
                let norm = fused.step(&g, 1e-3, Some(max)).unwrap().unwrap();
                let mut clipped = g.clone();
                let norm_apart = clip_grad_norm(&mut clipped, max).unwrap();
                assert_eq!(apart.step(&clipped, 1e-3, None).unwrap(), None);
                assert_eq!(norm.to_bits(), norm_apart.to_bits());
                assert_eq!((norm > max), (max == 1.0), "{norm}");
            }
            assert!(bits(&fused) == bits(&apart), "clip at {max}: folded and separate differ");
        }
    }

    /// The new norm agrees with the old per-tensor one (f32 sums) to f32 rounding.
    #[test]
    fn norm_matches_the_tensor_formulation() {
        let g = grads(9, 0.3);
        let mut a = g.clone();
        let mut b = g;
        let na = clip_grad_norm(&mut a, 0.5).unwrap();
        let nb = old::clip_grad_norm(&mut b, 0.5).unwrap();
        assert!((na - nb).abs() <= 1e-5 * nb, "{na} vs {nb}");
    }

    #[test]
    fn bad_gradients_name_their_parameter() {
        let d = candle_core::Device::Cpu;
        let mut opt = AdamW::new(vars(1), 2, 0.75, 0.05).unwrap();
        let mut g = grads(1, 0.1);
        g[1] = Some(Tensor::zeros((29, 37), DType::F32, &d).unwrap());
        let e = opt.step(&g, 1e-3, None).unwrap_err().to_string();
        assert!(e.contains("beit.encoder.layer.0.intermediate.dense.weight") && e.contains("shape"), "{e}");
        g[1] = Some(Tensor::zeros((37, 29), DType::F64, &d).unwrap());
        let e = opt.step(&g, 1e-3, None).unwrap_err().to_string();
        assert!(e.contains("beit.encoder.layer.0.intermediate.dense.weight") && e.contains("F64"), "{e}");
        let e = opt.step(&g[..2], 1e-3, None).unwrap_err().to_string();
        assert!(e.contains("2 gradients"), "{e}");
        // Nothing moved, the step count included.
        assert_eq!(opt.step, 0);
        assert!(opt.params.iter().all(|p| p.m.iter().all(|&x| x == 0.0)));
    }

    /// A transposed gradient (what a linear layer's weight gets through `w.t()`) is read in the weight's order.
    #[test]
    fn transposed_gradients_are_read_in_order() {
        let d = candle_core::Device::Cpu;
        let mk = || Var::from_tensor(&Tensor::from_vec(noise(12, 2, 1.0), (3, 4), &d).unwrap()).unwrap();
        let (a, b) = (mk(), mk());
        let g = Tensor::from_vec(noise(12, 3, 0.1), (4, 3), &d).unwrap().t().unwrap();
        assert!(!g.is_contiguous());
        AdamW::new(vec![("w".into(), a.clone())], 0, 1.0, 0.0).unwrap().step(&[Some(g.clone())], 0.1, None).unwrap();
        let g = g.contiguous().unwrap();
        AdamW::new(vec![("w".into(), b.clone())], 0, 1.0, 0.0).unwrap().step(&[Some(g)], 0.1, None).unwrap();
        assert_eq!(a.as_tensor().to_vec2::<f32>().unwrap(), b.as_tensor().to_vec2::<f32>().unwrap());
    }

    /// state() writes the moments as tensors of the parameters' shapes under the old names, and load_state reads
    /// them back to the same bits; a misshapen or missing entry is refused without changing anything.
    #[test]
    fn state_round_trips_under_the_old_names() {
        let mut opt = AdamW::new(vars(4), 2, 0.75, 0.05).unwrap();
        opt.step(&grads(1, 0.1), 1e-3, None).unwrap();
        let state = opt.state().unwrap();
        assert_eq!(state.len(), 2 * opt.params.len());
        for (name, shape) in shapes() {
            assert_eq!(state[&format!("exp_avg.{name}")].dims(), shape.as_slice());
            assert_eq!(state[&format!("exp_avg_sq.{name}")].dims(), shape.as_slice());
        }
        let mut back = AdamW::new(vars(4), 2, 0.75, 0.05).unwrap();
        let mut bad = state.clone();
        let key = "exp_avg_sq.classifier.weight".to_string();
        bad.insert(key.clone(), Tensor::zeros((17, 3), DType::F32, &candle_core::Device::Cpu).unwrap());
        assert!(back.load_state(&bad, 1).unwrap_err().to_string().contains("shape"));
        bad.remove(&key);
        assert!(back.load_state(&bad, 1).unwrap_err().to_string().contains("missing"));
        assert_eq!(back.step, 0);
        back.load_state(&state, 1).unwrap();
        assert_eq!(back.step, 1);
        for (p, q) in opt.params.iter().zip(&back.params) {
            assert!(p.m.iter().zip(&q.m).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(p.v.iter().zip(&q.v).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    /// Not a test: one clipped AdamW step over BEiT-base's 86M parameters in its ~200 tensors, the old tensor
    /// ops against the fused pass, on a pool of `BEIT_BENCH_THREADS` (default 2) threads. Run with
    /// `cargo test -p beit --release --lib bench_adamw_step -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_adamw_step() {
        let threads = std::env::var("BEIT_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
        let d = candle_core::Device::Cpu;
        let (h, f) = (768usize, 3072usize);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("beit.embeddings.cls_token".into(), vec![1, 1, h]),
            ("beit.embeddings.patch_embeddings.projection.weight".into(), vec![h, 3, 16, 16]),
            ("beit.embeddings.patch_embeddings.projection.bias".into(), vec![h]),
        ];
        for l in 0..12 {
            let p = format!("beit.encoder.layer.{l}");
            for (n, s) in [
                ("lambda_1", vec![h]),
                ("lambda_2", vec![h]),
                ("attention.attention.query.weight", vec![h, h]),
                ("attention.attention.query.bias", vec![h]),
                ("attention.attention.key.weight", vec![h, h]),
                ("attention.attention.value.weight", vec![h, h]),
                ("attention.attention.value.bias", vec![h]),
                ("attention.attention.relative_position_bias.relative_position_bias_table", vec![732, 12]),
                ("attention.output.dense.weight", vec![h, h]),
                ("attention.output.dense.bias", vec![h]),
                ("layernorm_before.weight", vec![h]),
                ("layernorm_before.bias", vec![h]),
                ("intermediate.dense.weight", vec![f, h]),
                ("intermediate.dense.bias", vec![f]),
                ("output.dense.weight", vec![h, f]),
                ("output.dense.bias", vec![h]),
                ("layernorm_after.weight", vec![h]),
                ("layernorm_after.bias", vec![h]),
            ] {
                shapes.push((format!("{p}.{n}"), s));
            }
        }
        shapes.push(("beit.pooler.layernorm.weight".into(), vec![h]));
        shapes.push(("beit.pooler.layernorm.bias".into(), vec![h]));
        shapes.push(("classifier.weight".into(), vec![1000, h]));
        shapes.push(("classifier.bias".into(), vec![1000]));
        let total: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        let make_vars = || -> Vec<(String, Var)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, (n, s))| {
                    let t = Tensor::from_vec(noise(s.iter().product(), i as u64, 0.02), s.as_slice(), &d).unwrap();
                    (n.clone(), Var::from_tensor(&t).unwrap())
                })
                .collect()
        };
        let grads: Vec<Option<Tensor>> = shapes
            .iter()
            .enumerate()
            .map(|(i, (_, s))| {
                Some(Tensor::from_vec(noise(s.iter().product(), 500 + i as u64, 0.01), s.as_slice(), &d).unwrap())
            })
            .collect();
        eprintln!("{} tensors, {total} parameters, {threads} threads", shapes.len());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut opt = AdamW::new(make_vars(), 12, 0.65, 0.05).unwrap();
            for s in 0..3 {
                let t = std::time::Instant::now();
                opt.step(&grads, 1e-3, Some(1.0)).unwrap();
                eprintln!("new, step {s}: {:.3} s (clipped, fused)", t.elapsed().as_secs_f64());
            }
            drop(opt);
            let opt = AdamW::new(make_vars(), 12, 0.65, 0.05).unwrap();
            let mut reference: Vec<old::Param> = opt
                .params
                .iter()
                .map(|p| {
                    let zeros = p.var.zeros_like().unwrap();
                    old::Param {
                        var: p.var.clone(),
                        lr_scale: p.lr_scale,
                        weight_decay: p.weight_decay,
                        m: zeros.clone(),
                        v: zeros,
                    }
                })
                .collect();
            for s in 1..=3 {
                let t = std::time::Instant::now();
                let mut g = grads.clone();
                old::clip_grad_norm(&mut g, 1.0).unwrap();
                let clipped = t.elapsed().as_secs_f64();
                old::step(&mut reference, s, &g, 1e-3).unwrap();
                let all = t.elapsed().as_secs_f64();
                eprintln!("old, step {s}: {all:.3} s (clip {clipped:.3} s + step {:.3} s)", all - clipped);
            }
        });
    }
}
