//! The losses transformers' BEiT heads compute, with torch's reductions (mean over the counted elements).

use candle_core::{DType, Tensor, D};

use crate::error::{BeitError, Result};

/// torch's CrossEntropyLoss(ignore_index) on (N, C) logits and (N,) integer labels, mean over kept rows.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    let labels = labels.flatten_all()?.to_dtype(DType::I64)?;
    if labels.dim(0)? != n {
        return Err(BeitError::invalid_input("labels", format!("{} labels for {n} predictions", labels.dim(0)?)));
    }
    let values = labels.to_vec1::<i64>()?;
    if let Some(bad) = values.iter().find(|&&v| v != ignore_index && (v < 0 || v >= c as i64)) {
        return Err(BeitError::invalid_input("labels", format!("label {bad} is outside the {c} classes")));
    }
    let keep: Vec<f32> = values.iter().map(|&v| if v == ignore_index { 0.0 } else { 1.0 }).collect();
    let count: f32 = keep.iter().sum();
    let safe: Vec<u32> = values.iter().map(|&v| if v == ignore_index { 0 } else { v as u32 }).collect();
    let safe = Tensor::from_vec(safe, (n, 1), logits.device())?;
    let keep = Tensor::from_vec(keep, n, logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&safe, 1)?.squeeze(1)?;
    // torch returns nan when every label is ignored (0/0); so do we.
    Ok((picked.mul(&keep)?.sum_all()?.neg()? / count as f64)?)
}

/// Cross-entropy with label smoothing (torch's `label_smoothing`): (1 - e) * nll + e * mean over classes of
/// -log p. No ignored labels.
pub fn cross_entropy_smoothed(logits: &Tensor, labels: &[u32], smoothing: f64) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    if labels.len() != n || labels.iter().any(|&l| l as usize >= c) {
        return Err(BeitError::invalid_input("labels", format!("{} labels for {n} predictions of {c} classes", labels.len())));
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::from_vec(labels.to_vec(), (n, 1), logits.device())?;
    let nll = logp.gather(&idx, 1)?.neg()?.mean_all()?;
    if smoothing <= 0.0 {
        return Ok(nll);
    }
    let uniform = logp.neg()?.mean_all()?;
    Ok(((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?)
}

/// BCEWithLogitsLoss: mean of max(x, 0) - x*y + log(1 + exp(-|x|)).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let y = targets.to_dtype(DType::F32)?;
    if y.dims() != logits.dims() {
        return Err(BeitError::invalid_input(
            "labels",
            format!("shape {:?}, expected the logits' shape {:?}", y.dims(), logits.dims()),
        ));
    }
    let l = (logits.relu()? - logits.mul(&y)?)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(l?.mean_all()?)
}

/// MSELoss, mean over all elements.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let target = target.to_dtype(DType::F32)?;
    if pred.elem_count() != target.elem_count() {
        return Err(BeitError::invalid_input(
            "labels",
            format!("shape {:?} does not match the predictions' {:?}", target.dims(), pred.dims()),
        ));
    }
    Ok(pred.flatten_all()?.sub(&target.flatten_all()?)?.sqr()?.mean_all()?)
}
