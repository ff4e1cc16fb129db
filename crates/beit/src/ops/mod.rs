//! Tensor primitives torch has and candle lacks, written once to match torch's CPU kernels.

use candle_core::{CpuStorage, DType, Layout, Tensor};

pub(crate) mod encoder;
pub(crate) mod heads;

use crate::error::{BeitError, Result};
use crate::kernels::view::view;

/// What the custom ops' trait methods return.
pub(crate) type CResult<T> = candle_core::Result<T>;

/// The values of a contiguous f32 CPU storage.
pub(crate) fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: expected an f32 tensor") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// `f` on `t`'s values (made contiguous first: gradients may arrive with any layout).
fn with_values<T>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> CResult<T>) -> CResult<T> {
    let t = t.contiguous()?;
    let v = view(&t);
    match v {
        Some(v) => f(v.slice()),
        None => candle_core::bail!("{what}: expected an f32 CPU tensor"),
    }
}

/// Whether the tensors can take the custom ops: f32 on the CPU.
fn cpu_f32(ts: &[Option<&Tensor>]) -> bool {
    ts.iter().flatten().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// torch's cubic convolution weights (A = -0.75) for a fractional offset `t`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// Source indices (clamped) and weights of each output position, as torch's bicubic with align_corners=False.
fn cubic_taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|o| {
            let real = scale * (o as f32 + 0.5) - 0.5;
            let base = real.floor();
            let t = real - base;
            let base = base as i64;
            let idx = [0i64, 1, 2, 3].map(|k| (base - 1 + k).clamp(0, in_size as i64 - 1) as usize);
            (idx, cubic_weights(t))
        })
        .collect()
}

/// `torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)` for an
/// (N, C, H, W) float tensor. Forward only (used on position tables at inference).
pub fn interpolate_bicubic(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(BeitError::invalid_input(
            "bicubic interpolation",
            format!("empty size {h}x{w} -> {out_h}x{out_w}"),
        ));
    }
    let src = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (ty, tx) = (cubic_taps(h, out_h), cubic_taps(w, out_w));
    let mut out = vec![0f32; n * c * out_h * out_w];
    for (plane, dst) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(out_h * out_w)) {
        for (oy, (iy, wy)) in ty.iter().enumerate() {
            for (ox, (ix, wx)) in tx.iter().enumerate() {
                let mut acc = 0f32;
                for (j, &yy) in iy.iter().enumerate() {
                    let row = &plane[yy * w..(yy + 1) * w];
                    let mut r = 0f32;
                    for (i, &xx) in ix.iter().enumerate() {
                        r += row[xx] * wx[i];
                    }
                    acc += r * wy[j];
                }
                dst[oy * out_w + ox] = acc;
            }
        }
    }
    Ok(Tensor::from_vec(out, (n, c, out_h, out_w), x.device())?)
}

/// `interpolate(x, size, mode="bilinear", align_corners)`; candle's kernel follows torch's index arithmetic.
/// It returns its input unchanged for an identity resize, so the input is made contiguous first.
pub fn interpolate_bilinear(x: &Tensor, out_h: usize, out_w: usize, align_corners: bool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    Ok(x.contiguous()?.upsample_bilinear2d(out_h, out_w, align_corners)?)
}

/// torch's bilinear weights as an `(out, in)` matrix: row i holds `1 - l` at `i0` and `l` at `i1`
/// (upsample_bilinear2d's source index, clamped as its CPU kernel does).
fn bilinear_matrix(in_size: usize, out_size: usize, align_corners: bool) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    let scale = if align_corners {
        if out_size > 1 {
            (in_size as f32 - 1.0) / (out_size as f32 - 1.0)
        } else {
            0.0
        }
    } else {
        in_size as f32 / out_size as f32
    };
    for i in 0..out_size {
        let src = if align_corners { scale * i as f32 } else { (scale * (i as f32 + 0.5) - 0.5).max(0.0) };
        let i0 = (src as usize).min(in_size - 1);
        let i1 = if i0 + 1 < in_size { i0 + 1 } else { i0 };
        let l = src - i0 as f32;
        m[i * in_size + i0] += 1.0 - l;
        m[i * in_size + i1] += l;
    }
    m
}

/// [`interpolate_bilinear`] as two matrix products (rows, then columns), which candle can differentiate: its
/// `upsample_bilinear2d` has no backward pass. Equal to torch's kernel up to float rounding; for training.
pub fn interpolate_bilinear_differentiable(
    x: &Tensor,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(BeitError::invalid_input("interpolate", format!("{h}x{w} to {out_h}x{out_w}: an empty size")));
    }
    let mh = Tensor::from_vec(bilinear_matrix(h, out_h, align_corners), (out_h, h), x.device())?.to_dtype(x.dtype())?;
    let mw = Tensor::from_vec(bilinear_matrix(w, out_w, align_corners), (out_w, w), x.device())?.to_dtype(x.dtype())?;
    // (.., h, w) · (w, out_w), then (out_h, h) · (.., h, out_w).
    let y = x.contiguous()?.broadcast_matmul(&mw.t()?)?;
    Ok(mh.broadcast_matmul(&y)?)
}

/// `max_pool2d(x, k, stride=k)` (floor mode) from reductions candle differentiates as torch does: its own
/// max_pool2d backward scales the gradient by the maxima's share of the window (1/k² for one maximum) where torch
/// passes it whole to the maximum. For training.
pub fn max_pool2d_differentiable(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / k.max(1), w / k.max(1));
    if k == 0 || oh == 0 || ow == 0 {
        return Err(BeitError::invalid_input("max_pool2d", format!("a {h}x{w} map is too small for {k}x{k} pooling")));
    }
    let x = x.narrow(2, 0, oh * k)?.narrow(3, 0, ow * k)?.contiguous()?;
    Ok(x.reshape((b, c, oh, k, ow, k))?.max(5)?.max(3)?)
}

/// `adaptive_avg_pool2d(x, out)` as torch: output cell i covers [floor(i*in/out), ceil((i+1)*in/out)). Built from
/// differentiable ops; works for outputs larger than the input too, as torch's does.
pub fn adaptive_avg_pool2d(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 {
        return Err(BeitError::invalid_input("adaptive_avg_pool2d", format!("output size {out_h}x{out_w} is empty")));
    }
    let range = |i: usize, inp: usize, out: usize| (i * inp / out, ((i + 1) * inp).div_ceil(out));
    let mut rows = Vec::with_capacity(out_h);
    for i in 0..out_h {
        let (y0, y1) = range(i, h, out_h);
        let band = x.narrow(2, y0, y1 - y0)?;
        let mut cells = Vec::with_capacity(out_w);
        for j in 0..out_w {
            let (x0, x1) = range(j, w, out_w);
            cells.push(band.narrow(3, x0, x1 - x0)?.mean_keepdim(2)?.mean_keepdim(3)?);
        }
        rows.push(Tensor::cat(&cells, 3)?);
    }
    Ok(Tensor::cat(&rows, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bicubic_identity_and_constant() {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((1, 1, 3, 4)).unwrap();
        let y = interpolate_bicubic(&x, 3, 4).unwrap();
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let c = Tensor::ones((1, 2, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = interpolate_bicubic(&c, 7, 5).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(y.iter().all(|v| (v - 1.0).abs() < 1e-6));
    }

    /// Every primitive against torch's output on the same input (scripts/gen_ops_fixtures.py).
    #[test]
    fn primitives_match_torch() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops.safetensors");
        let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let x = &t["x"];
        let check = |name: &str, got: Tensor| {
            let want = &t[name];
            assert_eq!(got.dims(), want.dims(), "{name}");
            let err =
                (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(err <= 1e-5, "{name}: {err}");
        };
        for (h, w) in [(14, 20), (3, 4), (7, 10), (11, 5), (1, 1)] {
            for ac in [false, true] {
                check(&format!("bilinear_{h}x{w}_{}", ac as u8), interpolate_bilinear(x, h, w, ac).unwrap());
                let diff = interpolate_bilinear_differentiable(x, h, w, ac).unwrap();
                check(&format!("bilinear_{h}x{w}_{}", ac as u8), diff);
            }
            check(&format!("bicubic_{h}x{w}"), interpolate_bicubic(x, h, w).unwrap());
        }
        for (h, w) in [(1, 1), (2, 3), (3, 3), (6, 6), (7, 10), (9, 13)] {
            check(&format!("adaptive_avg_{h}x{w}"), adaptive_avg_pool2d(x, h, w).unwrap());
        }
        check("max_pool_2", x.max_pool2d_with_stride(2, 2).unwrap());
        check("max_pool_2", max_pool2d_differentiable(x, 2).unwrap());
        let ct = crate::nn::ConvTranspose2d::new(t["conv_transpose_w"].clone(), t["conv_transpose_b"].clone(), 2);
        check("conv_transpose", ct.forward(x).unwrap());
    }

    #[test]
    fn adaptive_pool_matches_torch() {
        // torch.nn.functional.adaptive_avg_pool2d(torch.arange(20.).reshape(1, 1, 4, 5), (3, 2)) and (6, 7)
        let x = Tensor::arange(0f32, 20.0, &Device::Cpu).unwrap().reshape((1, 1, 4, 5)).unwrap();
        let y = adaptive_avg_pool2d(&x, 3, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y, vec![3.5, 5.5, 8.5, 10.5, 13.5, 15.5]);
        let y = adaptive_avg_pool2d(&x, 6, 7).unwrap();
        assert_eq!(y.dims(), &[1, 1, 6, 7]);
        let first_row = y.get(0).unwrap().get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(first_row, vec![0.0, 0.5, 1.5, 2.0, 2.5, 3.5, 4.0]);
    }
}
