//! Gradient checkpointing (transformers' `gradient_checkpointing_enable()`): a BeitLayer run inside one custom op
//! whose backward pass runs the layer's forward pass again, so that only each layer's input is kept between the two
//! passes instead of all of its activations.
//!
//! The recomputation draws dropout and drop path from the generator state the first pass started from, so it
//! computes exactly what the first pass did and the gradients equal those without checkpointing. Its parameter
//! gradients are not inputs of the op, so the outer backward pass cannot return them: they are collected on the
//! calling thread and added to the outer pass's store by [`merge_parameter_grads`].

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, TensorId, Var};

use crate::error::Result;
use crate::model::attention::AttentionInputs;
use crate::model::layer::BeitLayer;
use crate::nn::{swap_training_rng, training_rng, Mode};
use crate::ops::{values, CResult};
use crate::rng::Rng;


thread_local! {
    /// Parameter gradients from recomputed layers, by parameter, until the trainer merges them.
    static PARAMETER_GRADS: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

/// Adds the parameter gradients that checkpointed layers computed during `store`'s backward pass (on this thread)
/// into it.
pub fn merge_parameter_grads(store: &mut GradStore) -> Result<()> {
    let grads = PARAMETER_GRADS.with(|g| std::mem::take(&mut *g.borrow_mut()));
    for (id, g) in grads {
        let sum = match store.get_id(id) {
            Some(existing) => (existing + g)?,
            None => g,
        };
        store.insert_id(id, sum);
    }
    Ok(())
}

/// One layer, its call options, and the training generator's state before its first pass.
struct CheckpointOp {
    layer: BeitLayer,
    window: (usize, usize),
    interpolate_pos_encoding: bool,
    mode: Mode,
    rng: Rng,
}

impl CheckpointOp {
    fn run(&self, x: &Tensor, shared: Option<&Tensor>) -> Result<Tensor> {
        let a = AttentionInputs {
            head_mask: None,
            output_attentions: false,
            shared_relative_position_bias: shared,
            interpolate_pos_encoding: self.interpolate_pos_encoding,
            window: self.window,
            mode: self.mode,
        };
        Ok(self.layer.forward(x, &a)?.0)
    }

    /// The first pass, on a copy of the input (the op's output keeps no graph of its own).
    fn forward(&self, inputs: &[(&CpuStorage, &Layout)]) -> CResult<(CpuStorage, Shape)> {
        let tensors = inputs
            .iter()
            .map(|(s, l)| {
                let v = values(s, l, "checkpointed layer input")?;
                Tensor::from_vec(v.to_vec(), l.shape(), &candle_core::Device::Cpu)
            })
            .collect::<CResult<Vec<_>>>()?;
        let y = self.run(&tensors[0], tensors.get(1)).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    /// The second pass from the same generator state, differentiated; its parameter gradients are set aside for
    /// [`merge_parameter_grads`].
    fn backward(&self, x: &Tensor, shared: Option<&Tensor>, grad: &Tensor) -> CResult<(Tensor, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let sv = shared.map(|s| Var::from_tensor(&s.detach())).transpose()?;
        let saved = swap_training_rng(self.rng.clone());
        let y = self.run(xv.as_tensor(), sv.as_ref().map(Var::as_tensor));
        swap_training_rng(saved);
        let y = y.map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let store = (y * grad.detach())?.sum_all()?.backward()?;
        PARAMETER_GRADS.with(|acc| -> CResult<()> {
            let mut acc = acc.borrow_mut();
            for p in self.layer.parameters() {
                if let Some(g) = store.get(&p) {
                    let sum = match acc.remove(&p.id()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    acc.insert(p.id(), sum);
                }
            }
            Ok(())
        })?;
        let dx = store.get(xv.as_tensor()).cloned().map_or_else(|| x.zeros_like(), Ok)?;
        let ds = sv.and_then(|s| store.get(s.as_tensor()).cloned());
        Ok((dx, ds))
    }
}

impl CustomOp1 for CheckpointOp {
    fn name(&self) -> &'static str {
        "beit-checkpointed-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(&[(s, l)])
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(self.backward(x, None, grad)?.0))
    }
}

impl CustomOp2 for CheckpointOp {
    fn name(&self) -> &'static str {
        "beit-checkpointed-layer-shared-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(&[(s1, l1), (s2, l2)])
    }

    fn bwd(&self, x: &Tensor, shared: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dx, ds) = self.backward(x, Some(shared), grad)?;
        Ok((Some(dx), ds))
    }
}

/// `layer` on `x` as [`BeitLayer::forward`] with `a` (no head mask, no attention outputs), keeping only `x` for
/// the backward pass, which recomputes the layer.
pub fn checkpointed(layer: &BeitLayer, x: &Tensor, a: &AttentionInputs) -> Result<Tensor> {
    let op = CheckpointOp {
        layer: layer.clone(),
        window: a.window,
        interpolate_pos_encoding: a.interpolate_pos_encoding,
        mode: a.mode,
        rng: training_rng(),
    };
    let x = x.contiguous()?;
    Ok(match a.shared_relative_position_bias {
        Some(s) => x.apply_op2(&s.contiguous()?, op)?,
        None => x.apply_op1(op)?,
    })
}
