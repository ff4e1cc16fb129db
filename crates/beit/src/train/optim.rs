//! BEiT's optimizer (unilm's run_class_finetuning.py and run_beit_pretraining.py): AdamW with layer-wise
//! learning-rate decay, no weight decay on biases, norms, position tables, layer scale and the CLS token, a
//! cosine schedule with linear warmup, and global gradient-norm clipping.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Tensor, Var};

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

/// torch's clip_grad_norm_ (L2 over all gradients together): scales them down to `max_norm` when above it.
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
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

struct Param {
    name: String,
    var: Var,
    lr_scale: f64,
    weight_decay: f64,
    m: Tensor,
    v: Tensor,
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
                let zeros = var.zeros_like()?;
                Ok(Param { name, lr_scale, weight_decay: wd, m: zeros.clone(), v: zeros, var })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { params, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8 })
    }

    /// One update with `grads` (in parameter order) at learning rate `lr`, scaled per parameter. Parameters
    /// without a gradient (unused heads) are left alone, as torch leaves them.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            // Detached: a gradient can still reference the forward pass's tensors, and the moments outlive the
            // step (each step's graph would otherwise stay alive through them).
            let g = g.detach();
            let lr = lr * p.lr_scale;
            p.m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?.detach();
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let update = ((&p.m / bc1)? / ((&p.v / bc2)?.sqrt()? + self.eps)?)?;
            let mut w = p.var.as_tensor().detach();
            if p.weight_decay > 0.0 {
                w = (&w * (1.0 - lr * p.weight_decay))?;
            }
            p.var.set(&(w - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Gradients of every parameter from one backward pass, in parameter order.
    pub fn grads(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.params.iter().map(|p| store.get(p.var.as_tensor()).cloned()).collect()
    }

    /// The parameters' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Moments by parameter name (`exp_avg.NAME`, `exp_avg_sq.NAME`), for --resume.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut s = HashMap::new();
        for p in &self.params {
            s.insert(format!("exp_avg.{}", p.name), p.m.clone());
            s.insert(format!("exp_avg_sq.{}", p.name), p.v.clone());
        }
        s
    }

    /// Restores [`AdamW::state`]'s moments and the step count; every parameter's moments must be there, in
    /// its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for p in &mut self.params {
            for (key, slot) in [(format!("exp_avg.{}", p.name), &mut p.m), (format!("exp_avg_sq.{}", p.name), &mut p.v)] {
                let t = state.get(&key).ok_or_else(|| BeitError::invalid_input("optimizer state", format!("missing `{key}`")))?;
                if t.dims() != slot.dims() {
                    return Err(BeitError::invalid_input("optimizer state", format!("`{key}` has shape {:?}, expected {:?}", t.dims(), slot.dims())));
                }
                *slot = t.clone();
            }
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
        opt.step(&[Some(g)], 0.1).unwrap();
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
}
