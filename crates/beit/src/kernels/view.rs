//! A candle tensor's values borrowed as an f32 slice, for the kernels that work on slices.

use candle_core::{CpuStorage, Storage, StorageRef, Tensor};

/// A contiguous f32 CPU tensor, borrowed (its storage stays read-locked while this lives).
pub struct F32View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl F32View<'_> {
    /// The tensor's values in order.
    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            // ok: view() only builds F32View over f32 CPU storage.
            _ => &[],
        }
    }
}

/// Borrows `t` as a slice when it is a contiguous f32 CPU tensor.
pub fn view(t: &Tensor) -> Option<F32View<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*guard {
        Storage::Cpu(CpuStorage::F32(_)) => Some(F32View { guard, start, end }),
        _ => None,
    }
}

/// `t`'s values as f32, borrowed when it is a contiguous f32 CPU tensor, converted otherwise.
pub fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> crate::Result<T>) -> crate::Result<T> {
    if let Some(v) = view(t) {
        return f(v.slice());
    }
    f(&t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}
