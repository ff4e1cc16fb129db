//! Differentiable CPU ops for the encoder's training pass: Linear on our f32 GEMM kernel (the forward product and
//! both backward products), LayerNorm, softmax over the last dimension and GELU (erf), each with a fused backward
//! pass.
//!
//! Why: training ran these through candle op by op: its matmul on the gemm crate, LayerNorm as a dozen composite
//! passes each way, softmax and GELU backward as chains of element-wise ops, each allocating.
//!
//! Every sum runs in one fixed order whatever the thread count (the GEMM kernel splits outputs, never k; sums over
//! rows go by fixed chunks of rows combined in order), so a run and its resume agree bit for bit. Inputs that are not
//! f32 CPU tensors take candle's own ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{cpu_f32, values, with_values, CResult};
use crate::error::Result;
use crate::kernels::bf16::PackedBf16;
use crate::kernels::conv::Precision;
use crate::kernels::f32 as kf32;
use crate::kernels::math;

/// Rows per chunk of the sums over rows (bias and LayerNorm parameter gradients): fixed, so that the order of the
/// additions does not depend on the thread count.
const SUM_ROWS: usize = 64;

fn kernel_error(e: crate::error::BeitError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The last dimension of `l` and the number of rows before it.
fn rows_of(l: &Layout, what: &str) -> CResult<(usize, usize)> {
    match l.dims().split_last() {
        Some((&d, _)) if d > 0 => Ok((l.shape().elem_count() / d, d)),
        _ => candle_core::bail!("{what}: shape {:?} has no last dimension to work on", l.dims()),
    }
}

/// `a` (rows × cols, row-major) transposed, on every thread: 16 × 16 blocks in registers where the CPU has
/// AVX-512 (a plain loop's strided stores were a tenth of bf16 training's time).
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 16;
    let mut t = vec![0f32; rows * cols];
    if rows == 0 {
        return t;
    }
    let avx512 = crate::kernels::cpu::features().avx512;
    t.par_chunks_mut(rows * BLOCK).enumerate().for_each(|(cb, dst)| {
        let (c0, nc) = (cb * BLOCK, dst.len() / rows);
        let mut r0 = 0;
        #[cfg(target_arch = "x86_64")]
        if avx512 && nc == BLOCK {
            // SAFETY: the CPU has AVX-512 F; rows r0..r0 + 16 <= rows of a hold columns c0..c0 + 16 <= cols, and
            // dst holds 16 rows of `rows` values.
            r0 = unsafe { transpose_blocks_avx512(a, rows, cols, c0, dst) };
        }
        for r in r0..rows {
            for (j, &v) in a[r * cols + c0..][..nc].iter().enumerate() {
                dst[j * rows + r] = v;
            }
        }
    });
    t
}

/// Rows `0..16k` (the whole 16-row blocks) of columns `c0..c0 + 16` of `a` transposed into `dst` (16 rows of
/// `rows`); returns `16k`, the first row left to do.
///
/// # Safety
/// The CPU must support AVX-512 F; `a` must hold `rows × cols` values with `c0 + 16 <= cols`, and `dst` `16 · rows`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_blocks_avx512(a: &[f32], rows: usize, cols: usize, c0: usize, dst: &mut [f32]) -> usize {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_setzero_ps, _mm512_storeu_ps};
    let fits = c0 + 16 <= cols && a.len() >= rows * cols && dst.len() >= 16 * rows;
    assert!(fits, "transpose: slices too short"); // ok: `transpose` passes whole blocks inside the matrix only
    let full = rows / 16 * 16;
    for r0 in (0..full).step_by(16) {
        let mut v = [_mm512_setzero_ps(); 16];
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: row r0 + i < rows, columns c0..c0 + 16 <= cols (asserted above).
            *v = unsafe { _mm512_loadu_ps(a.as_ptr().add((r0 + i) * cols + c0)) };
        }
        for (j, v) in crate::kernels::f32::transpose16(&v).iter().enumerate() {
            // SAFETY: j < 16 rows of dst, values r0..r0 + 16 <= rows of row j.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(j * rows + r0), *v) };
        }
    }
    full
}

/// Column sums of `g` (rows × cols): each chunk of [`SUM_ROWS`] rows summed in order on some thread, the chunks'
/// sums then added in order.
fn column_sums(g: &[f32], cols: usize) -> Vec<f32> {
    let partial: Vec<Vec<f32>> = g
        .par_chunks(SUM_ROWS * cols)
        .map(|chunk| {
            let mut s = vec![0f32; cols];
            for row in chunk.chunks_exact(cols) {
                s.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            s
        })
        .collect();
    add_in_order(partial, cols)
}

fn add_in_order(partial: Vec<Vec<f32>>, cols: usize) -> Vec<f32> {
    let mut total = vec![0f32; cols];
    for p in partial {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// torch.nn.functional.linear: `x (…, in) · wᵀ + b` with `w` (out, in); with bf16, every product (forward and
/// backward) on operands rounded to bf16 (nearest even) with f32 accumulation and f32 outputs, as torch's autocast
/// computes Linear layers (which also rounds their outputs to bf16; here they stay f32).
#[derive(Debug, Clone, Copy)]
struct LinearOp(Precision);

/// `out (m × n) = a (m × k) · bᵀ` for `b` given as `n × k` row-major, in `precision`.
fn product(precision: Precision, a: &[f32], m: usize, b: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> CResult<Vec<f32>> {
    let mut out = vec![0f32; m * n];
    match precision {
        Precision::F32 => kf32::linear(a, k, m, b, n, k, bias, &mut out, n),
        Precision::Bf16 => PackedBf16::pack(b, n, k, bias).and_then(|p| p.forward(a, m, &mut out)),
    }
    .map_err(kernel_error)?;
    Ok(out)
}

impl LinearOp {
    fn forward(&self, x: &[f32], xl: &Layout, w: &[f32], wl: &Layout, b: Option<&[f32]>) -> CResult<(CpuStorage, Shape)> {
        let (rows, k) = rows_of(xl, "linear input")?;
        let (n, wk) = wl.shape().dims2()?;
        if wk != k {
            candle_core::bail!("linear: input has {k} features, weight (out {n}, in {wk}) expects {wk}");
        }
        let out = product(self.0, x, rows, w, n, k, b)?;
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    /// `dx = dy · w`, `dw = dyᵀ · x`, `db = Σ_rows dy`.
    fn backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor, bias: bool) -> CResult<[Option<Tensor>; 3]> {
        let (n, k) = w.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let (dx, dw, db) = with_values(dy, "linear output gradient", |g| {
            with_values(x, "linear input", |xv| {
                with_values(w, "linear weight", |wv| {
                    let gt = transpose(g, rows, n);
                    let (dx, dw) = match self.0 {
                        Precision::F32 => {
                            let (mut dx, mut dw) = (vec![0f32; rows * k], vec![0f32; n * k]);
                            kf32::matmul_kn(g, n, rows, wv, k, n, &mut dx, k).map_err(kernel_error)?;
                            kf32::matmul_kn(&gt, rows, n, xv, k, rows, &mut dw, k).map_err(kernel_error)?;
                            (dx, dw)
                        }
                        // The second factors packed from their transposes, w (n × k) and x (rows × k).
                        Precision::Bf16 => {
                            let (mut dx, mut dw) = (vec![0f32; rows * k], vec![0f32; n * k]);
                            let pw = PackedBf16::pack_transposed(wv, n, k).map_err(kernel_error)?;
                            pw.forward(g, rows, &mut dx).map_err(kernel_error)?;
                            let px = PackedBf16::pack_transposed(xv, rows, k).map_err(kernel_error)?;
                            px.forward(&gt, n, &mut dw).map_err(kernel_error)?;
                            (dx, dw)
                        }
                    };
                    Ok((dx, dw, bias.then(|| column_sums(g, n))))
                })
            })
        })?;
        let dev = x.device();
        Ok([
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dw, (n, k), dev)?),
            db.map(|db| Tensor::from_vec(db, n, dev)).transpose()?,
        ])
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "beit-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(values(s1, l1, "linear input")?, l1, values(s2, l2, "linear weight")?, l2, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = self.backward(x, w, dy, false)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "beit-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let b = values(s3, l3, "linear bias")?;
        let (n, _) = l2.shape().dims2()?;
        if b.len() != n {
            candle_core::bail!("linear: bias has {} values, the weight has {n} outputs", b.len());
        }
        self.forward(values(s1, l1, "linear input")?, l1, values(s2, l2, "linear weight")?, l2, Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = self.backward(x, w, dy, true)?;
        Ok((dx, dw, db))
    }
}

/// torch.nn.functional.linear(x, w, b), differentiable in all three, with `w` (out, in), its products in
/// `precision` on the CPU (f32 elsewhere).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, precision: Precision) -> Result<Tensor> {
    if !cpu_f32(&[Some(x), Some(w), b]) {
        let y = x.broadcast_matmul(&w.t()?)?;
        return Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp(precision))?,
        None => x.apply_op2(&w, LinearOp(precision))?,
    })
}

/// torch.nn.LayerNorm over the last dimension.
#[derive(Debug, Clone, Copy)]
struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "beit-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, b) = (values(s1, l1, "layer norm input")?, values(s2, l2, "layer norm weight")?, values(s3, l3, "layer norm bias")?);
        let (_, d) = rows_of(l1, "layer norm input")?;
        if w.len() != d || b.len() != d {
            candle_core::bail!("layer norm: rows of {d} values, weight {} and bias {} values", w.len(), b.len());
        }
        let mut out = vec![0f32; x.len()];
        math::layer_norm(x, w, b, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With `x̂ = (x - mean) · inv` and `g = dy · w`: `dx = inv · (g - mean(g) - x̂ · mean(g · x̂))`,
    /// `dw = Σ_rows dy · x̂`, `db = Σ_rows dy`; mean and inv recomputed from `x` as the forward pass computed them.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let eps = self.eps;
        let (dx, dw, db) = with_values(dy, "layer norm output gradient", |g| {
            with_values(x, "layer norm input", |xv| {
                with_values(w, "layer norm weight", |wv| {
                    let mut dx = vec![0f32; xv.len()];
                    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(SUM_ROWS * d)
                        .zip(xv.par_chunks(SUM_ROWS * d))
                        .zip(g.par_chunks(SUM_ROWS * d))
                        .map(|((dx, x), g)| {
                            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                            let mut xhat = vec![0f32; d];
                            for ((dx, x), g) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(g.chunks_exact(d)) {
                                let (mean, inv) = math::layer_norm_stats(x, eps);
                                let (mut sg, mut sgx) = (0f32, 0f32);
                                for j in 0..d {
                                    let xh = (x[j] - mean) * inv;
                                    xhat[j] = xh;
                                    let gw = g[j] * wv[j];
                                    sg += gw;
                                    sgx += gw * xh;
                                    dw[j] += g[j] * xh;
                                    db[j] += g[j];
                                }
                                let (mg, mgx) = (sg / d as f32, sgx / d as f32);
                                for j in 0..d {
                                    dx[j] = inv * (g[j] * wv[j] - mg - xhat[j] * mgx);
                                }
                            }
                            (dw, db)
                        })
                        .collect();
                    let (dws, dbs): (Vec<_>, Vec<_>) = partial.into_iter().unzip();
                    Ok((dx, add_in_order(dws, d), add_in_order(dbs, d)))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dw, d, dev)?),
            Some(Tensor::from_vec(db, d, dev)?),
        ))
    }
}

/// torch.nn.functional.layer_norm over the last dimension (biased variance), differentiable in all three.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if !cpu_f32(&[Some(x), Some(w), Some(b)]) {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        return Ok(xn.broadcast_mul(w)?.broadcast_add(b)?);
    }
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps: eps as f32 })?)
}

/// Softmax over the last dimension.
#[derive(Debug, Clone, Copy)]
struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "beit-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = values(s, l, "softmax input")?;
        let (rows, d) = rows_of(l, "softmax input")?;
        let mut out = x.to_vec();
        out.par_chunks_mut(math::rows_per_task(rows, d) * d).for_each(|c| c.chunks_exact_mut(d).for_each(math::softmax));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// `dx = y · (dy - Σ dy · y)` per row.
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let d = y.dims().last().copied().unwrap_or(1).max(1);
        let rows = y.elem_count() / d;
        let dx = with_values(dy, "softmax output gradient", |g| {
            with_values(y, "softmax output", |yv| {
                let mut dx = vec![0f32; yv.len()];
                let chunk = math::rows_per_task(rows, d) * d;
                dx.par_chunks_mut(chunk).zip(yv.par_chunks(chunk)).zip(g.par_chunks(chunk)).for_each(|((dx, y), g)| {
                    for ((dx, y), g) in dx.chunks_exact_mut(d).zip(y.chunks_exact(d)).zip(g.chunks_exact(d)) {
                        let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                        dx.iter_mut().zip(y).zip(g).for_each(|((dx, y), g)| *dx = y * (g - dot));
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, y.dims(), y.device())?))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[Some(x)]) {
        return Ok(candle_nn::ops::softmax(x, D::Minus1)?);
    }
    Ok(x.contiguous()?.apply_op1(SoftmaxOp)?)
}

/// torch's exact GELU, `x · Φ(x)`, with libm's erf (within an ulp): the fast erf of inference is a few ulp off
/// (5e-7 absolute), which `1 + erf` turns into a large relative error for negative x, enough to move the BatchNorm
/// statistics downstream past transformers' by more than the training parity test allows.
#[derive(Debug, Clone, Copy)]
struct GeluOp;

#[inline(always)]
fn gelu_cdf(x: f32) -> f32 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "beit-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let mut out = values(s, l, "gelu input")?.to_vec();
        out.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|x| *x *= gelu_cdf(*x)));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// `dx = dy · (Φ(x) + x · φ(x))`, torch's GeluBackward (approximate='none').
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        const INV_SQRT_2PI: f32 = 0.398_942_3; // 1 / √(2π), the normal density at 0
        let dx = with_values(dy, "gelu output gradient", |g| {
            with_values(x, "gelu input", |xv| {
                let mut dx = vec![0f32; xv.len()];
                dx.par_chunks_mut(1 << 14).zip(xv.par_chunks(1 << 14)).zip(g.par_chunks(1 << 14)).for_each(
                    |((dx, x), g)| {
                        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                            let pdf = (-0.5 * x * x).exp() * INV_SQRT_2PI;
                            *dx = g * (gelu_cdf(x) + x * pdf);
                        }
                    },
                );
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.dims(), x.device())?))
    }
}

/// torch's exact GELU (`nn.functional.gelu(x)`), differentiable.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[Some(x)]) {
        return Ok(x.gelu_erf()?);
    }
    Ok(x.contiguous()?.apply_op1(GeluOp)?)
}

/// BeitLayer's residual branch end, `x + keep[image] · (λ ⊙ y)`: layer scale, drop path (a scale per image, 0 or
/// 1/(1 - p), drawn by the caller) and the residual add in one pass, rounded in the order of the separate ops.
#[derive(Debug)]
struct ResidualOp {
    keep: Option<Vec<f32>>,
}

impl ResidualOp {
    /// Rows (of `d` values) per image, or an error naming the shapes.
    fn rows_per_image(&self, x: &Layout, y: &Layout, d: usize) -> CResult<usize> {
        let rows = x.shape().elem_count() / d.max(1);
        let images = self.keep.as_ref().map_or(1, Vec::len).max(1);
        if x.dims() != y.dims() || x.dims().last() != Some(&d) || rows % images != 0 {
            candle_core::bail!("residual: x {:?}, y {:?}, layer scale of {d}, {images} images", x.dims(), y.dims());
        }
        Ok(rows / images)
    }

    fn scale(&self, row: usize, per_image: usize) -> Option<f32> {
        self.keep.as_ref().map(|k| k[row / per_image.max(1)])
    }
}

impl CustomOp3 for ResidualOp {
    fn name(&self) -> &'static str {
        "beit-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, y, lambda) = (values(s1, l1, "residual x")?, values(s2, l2, "residual y")?, values(s3, l3, "layer scale")?);
        let d = lambda.len();
        let per_image = self.rows_per_image(l1, l2, d)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d).zip(y.par_chunks(d))).enumerate().for_each(|(r, (o, (x, y)))| {
            match self.scale(r, per_image) {
                Some(s) => o.iter_mut().zip(x.iter().zip(y).zip(lambda)).for_each(|(o, ((x, y), l))| *o = x + y * l * s),
                None => o.iter_mut().zip(x.iter().zip(y).zip(lambda)).for_each(|(o, ((x, y), l))| *o = x + y * l),
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// `dx = g`, `dy = g · keep · λ`, `dλ = Σ_rows (g · keep) · y`.
    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        lambda: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = lambda.elem_count();
        let per_image = self.rows_per_image(x.layout(), y.layout(), d)?;
        let (dy, dl) = with_values(g, "residual gradient", |g| {
            with_values(y, "residual y", |yv| {
                with_values(lambda, "layer scale", |l| {
                    let mut dy = vec![0f32; yv.len()];
                    let partial: Vec<Vec<f32>> = dy
                        .par_chunks_mut(SUM_ROWS * d)
                        .zip(g.par_chunks(SUM_ROWS * d).zip(yv.par_chunks(SUM_ROWS * d)))
                        .enumerate()
                        .map(|(c, (dy, (g, y)))| {
                            let mut dl = vec![0f32; d];
                            for (i, (dy, (g, y))) in dy.chunks_exact_mut(d).zip(g.chunks_exact(d).zip(y.chunks_exact(d))).enumerate() {
                                let s = self.scale(c * SUM_ROWS + i, per_image);
                                for j in 0..d {
                                    let gs = s.map_or(g[j], |s| g[j] * s);
                                    dy[j] = gs * l[j];
                                    dl[j] += gs * y[j];
                                }
                            }
                            dl
                        })
                        .collect();
                    Ok((dy, add_in_order(partial, d)))
                })
            })
        })?;
        let dev = x.device();
        Ok((Some(g.clone()), Some(Tensor::from_vec(dy, y.dims(), dev)?), Some(Tensor::from_vec(dl, d, dev)?)))
    }
}

/// `x + keep[image] · (λ ⊙ y)` for `x`, `y` (images, …, d) and the layer scale `λ` (d), differentiable in all three;
/// `keep` holds one drop-path scale per image (None: no drop path).
pub fn scaled_residual(x: &Tensor, y: &Tensor, lambda: &Tensor, keep: Option<Vec<f32>>) -> Result<Tensor> {
    if !cpu_f32(&[Some(x), Some(y), Some(lambda)]) {
        let mut t = y.broadcast_mul(lambda)?;
        if let Some(k) = keep {
            let mut shape = vec![1usize; t.rank()];
            shape[0] = k.len();
            t = t.broadcast_mul(&Tensor::from_vec(k, shape, t.device())?)?;
        }
        return Ok((t + x)?);
    }
    Ok(x.contiguous()?.apply_op3(&y.contiguous()?, &lambda.contiguous()?, ResidualOp { keep })?)
}

/// Multi-head self-attention's core on the fused query/key/value projection `qkv` (batch, n, 3d) and the position
/// bias (heads, n, n): per head, `softmax(q·kᵀ / √dh + bias) · v`, as transformers' BeitSelfAttention computes it
/// (eager, dropout 0), into the context (batch, n, d). The probabilities are kept from the forward pass for the
/// backward one, as autograd would keep them.
///
/// Why one op: as separate candle ops this was head splits and merges (copies), two batched matmuls each way on the
/// gemm crate, the scale and the bias add as passes of their own, and candle's gradient bookkeeping (a zero tensor and
/// an add) for every intermediate.
#[derive(Debug)]
struct AttentionOp {
    heads: usize,
    /// √dh, divided by as transformers divides.
    norm: f32,
    probs: std::sync::Mutex<Vec<f32>>,
}

/// Sizes of one attention call: batch, tokens, width, heads, head width.
#[derive(Debug, Clone, Copy)]
struct AttnDims {
    b: usize,
    n: usize,
    d: usize,
    h: usize,
    dh: usize,
}

impl AttentionOp {
    fn dims(&self, qkv: &[usize], bias: &[usize]) -> CResult<AttnDims> {
        let (&[b, n, d3], &[h, bn, bm]) = (qkv, bias) else {
            candle_core::bail!("attention: qkv {qkv:?} and bias {bias:?}, expected (batch, n, 3d) and (heads, n, n)")
        };
        let d = d3 / 3;
        if d3 % 3 != 0 || h != self.heads || d % h != 0 || (bn, bm) != (n, n) {
            candle_core::bail!(
                "attention: qkv {qkv:?} and bias {bias:?} do not fit {} heads: expected (batch, n, 3d) with d a multiple \
                 of the heads and a bias of (heads, n, n)",
                self.heads
            );
        }
        Ok(AttnDims { b, n, d, h, dh: d / h })
    }
}

/// Copies `rows` rows of `width` values at stride `ld` (from `src`'s start) into `dst`, packed.
fn gather_rows(src: &[f32], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
    for (r, d) in dst.chunks_exact_mut(width).take(rows).enumerate() {
        d.copy_from_slice(&src[r * ld..][..width]);
    }
}

impl CustomOp2 for AttentionOp {
    fn name(&self) -> &'static str {
        "beit-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (qkv, bias) = (values(s1, l1, "attention qkv")?, values(s2, l2, "attention bias")?);
        let AttnDims { b, n, d, h, dh } = self.dims(l1.dims(), l2.dims())?;
        let (mut ctx, mut probs) = (vec![0f32; b * n * d], vec![0f32; b * h * n * n]);
        ctx.par_chunks_mut(n * d)
            .zip(probs.par_chunks_mut(h * n * n))
            .zip(qkv.par_chunks(n * 3 * d))
            .try_for_each(|((ctx, probs), qkv)| -> CResult<()> {
                let (mut kb, mut vb) = (vec![0f32; n * dh], vec![0f32; n * dh]);
                for (head, s) in probs.chunks_exact_mut(n * n).enumerate() {
                    let o = head * dh;
                    gather_rows(&qkv[d + o..], 3 * d, n, dh, &mut kb);
                    gather_rows(&qkv[2 * d + o..], 3 * d, n, dh, &mut vb);
                    kf32::linear(&qkv[o..], 3 * d, n, &kb, n, dh, None, s, n).map_err(kernel_error)?;
                    for (row, brow) in s.chunks_exact_mut(n).zip(bias[head * n * n..].chunks_exact(n)) {
                        row.iter_mut().zip(brow).for_each(|(v, bv)| *v = *v / self.norm + bv);
                        math::softmax(row);
                    }
                    kf32::matmul_kn(s, n, n, &vb, dh, n, &mut ctx[o..], d).map_err(kernel_error)?;
                }
                Ok(())
            })?;
        *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = probs;
        Ok((CpuStorage::F32(ctx), Shape::from((b, n, d))))
    }

    /// With `P` the probabilities and `dO` the context's gradient, per head: `dv = Pᵀ·dO`, `dP = dO·vᵀ`,
    /// `dS = P ⊙ (dP - rowsum(dP ⊙ P))`, `dq = dS·k / √dh`, `dk = dSᵀ·q / √dh`; the bias's gradient is `dS` summed
    /// over the batch in order.
    fn bwd(&self, qkv: &Tensor, bias: &Tensor, _res: &Tensor, dctx: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let AttnDims { b, n, d, h, dh } = self.dims(qkv.dims(), bias.dims())?;
        let probs = std::mem::take(&mut *self.probs.lock().unwrap_or_else(|e| e.into_inner()));
        if probs.len() != b * h * n * n {
            candle_core::bail!("attention: backward pass without the forward pass's probabilities");
        }
        let (dqkv, ds) = with_values(dctx, "attention context gradient", |g| {
            with_values(qkv, "attention qkv", |qkv| {
                let (mut dqkv, mut ds) = (vec![0f32; b * n * 3 * d], vec![0f32; b * h * n * n]);
                dqkv.par_chunks_mut(n * 3 * d)
                    .zip(ds.par_chunks_mut(h * n * n))
                    .zip(probs.par_chunks(h * n * n))
                    .zip(qkv.par_chunks(n * 3 * d).zip(g.par_chunks(n * d)))
                    .try_for_each(|(((dqkv, ds), probs), (qkv, g))| -> CResult<()> {
                        let mut bufs = vec![0f32; 4 * n * dh];
                        let (qb, rest) = bufs.split_at_mut(n * dh);
                        let (kb, rest) = rest.split_at_mut(n * dh);
                        let (vb, gb) = rest.split_at_mut(n * dh);
                        let mut dp = vec![0f32; n * n];
                        for (head, (p, ds)) in probs.chunks_exact(n * n).zip(ds.chunks_exact_mut(n * n)).enumerate() {
                            let o = head * dh;
                            gather_rows(&qkv[o..], 3 * d, n, dh, qb);
                            gather_rows(&qkv[d + o..], 3 * d, n, dh, kb);
                            gather_rows(&qkv[2 * d + o..], 3 * d, n, dh, vb);
                            gather_rows(&g[o..], d, n, dh, gb);
                            let pt = transpose(p, n, n);
                            kf32::matmul_kn(&pt, n, n, gb, dh, n, &mut dqkv[2 * d + o..], 3 * d).map_err(kernel_error)?;
                            kf32::linear(&g[o..], d, n, vb, n, dh, None, &mut dp, n).map_err(kernel_error)?;
                            for ((ds, dp), p) in ds.chunks_exact_mut(n).zip(dp.chunks_exact(n)).zip(p.chunks_exact(n)) {
                                let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
                                ds.iter_mut().zip(dp).zip(p).for_each(|((s, dp), p)| *s = p * (dp - dot));
                            }
                            let scaled: Vec<f32> = ds.iter().map(|v| v / self.norm).collect();
                            kf32::matmul_kn(&scaled, n, n, kb, dh, n, &mut dqkv[o..], 3 * d).map_err(kernel_error)?;
                            let st = transpose(&scaled, n, n);
                            kf32::matmul_kn(&st, n, n, qb, dh, n, &mut dqkv[d + o..], 3 * d).map_err(kernel_error)?;
                        }
                        Ok(())
                    })?;
                Ok((dqkv, ds))
            })
        })?;
        // The bias is shared by the batch: its gradient sums the batch's, image by image.
        let mut dbias = vec![0f32; h * n * n];
        for img in ds.chunks_exact(h * n * n) {
            dbias.iter_mut().zip(img).for_each(|(t, v)| *t += v);
        }
        let dev = qkv.device();
        Ok((Some(Tensor::from_vec(dqkv, qkv.dims(), dev)?), Some(Tensor::from_vec(dbias, (h, n, n), dev)?)))
    }
}

/// Multi-head attention's core, differentiable in `qkv` (batch, n, 3d: query, key and value side by side) and `bias`
/// (heads, n, n, or 1, heads, n, n): the context (batch, n, d).
pub fn attention(qkv: &Tensor, bias: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, _, d3) = qkv.dims3()?;
    let bias = match bias.dims() {
        &[1, h, n, m] => bias.reshape((h, n, m))?,
        _ => bias.clone(),
    };
    let dh = d3 / 3 / heads.max(1);
    let op = AttentionOp { heads, norm: (dh as f64).sqrt() as f32, probs: std::sync::Mutex::new(Vec::new()) };
    Ok(qkv.contiguous()?.apply_op2(&bias.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Largest difference relative to the largest magnitude of `want`.
    fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        diff / scale.max(f32::MIN_POSITIVE)
    }

    /// The output of `f` and the gradients of `Σ f(vars)·r` with respect to `vars`.
    fn output_and_grads(vars: &[&Var], r: &Tensor, f: &dyn Fn(&[Tensor]) -> Tensor) -> Vec<Tensor> {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y];
        out.extend(vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()));
        out
    }

    /// The op against candle's autograd of the composite formula, each output weighted by the same random `r` (so
    /// that every output position weighs differently in the gradients).
    fn check(vars: &[&Var], ours: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor, bound: f32) {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let r = Tensor::randn(0f32, 1.0, reference(&ts).dims(), &Device::Cpu).unwrap();
        let (got, want) = (output_and_grads(vars, &r, &ours), output_and_grads(vars, &r, &reference));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(g, w);
            assert!(e < bound, "output/gradient {i}: relative error {e:e} >= {bound:e}");
        }
    }

    #[test]
    fn transpose_moves_every_value() {
        for (rows, cols) in [(1usize, 1usize), (16, 16), (37, 53), (64, 48), (3, 100), (200, 5)] {
            let a: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&a, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], a[r * cols + c], "{rows} x {cols} at ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn linear_matches_autograd_with_and_without_bias() {
        // Sizes off the kernel's tiles (8 rows, 48 columns) and K blocks.
        for (rows, k, n) in [(13usize, 37usize, 50usize), (2 * 197, 64, 3 * 64), (3, 1, 1)] {
            let (x, w, b) = (randn(&[rows, k]), randn(&[n, k]), randn(&[n]));
            let reference = |t: &[Tensor]| {
                let y = t[0].matmul(&t[1].t().unwrap()).unwrap();
                if t.len() > 2 { y.broadcast_add(&t[2]).unwrap() } else { y }
            };
            check(&[&x, &w, &b], |t| linear(&t[0], &t[1], Some(&t[2]), Precision::F32).unwrap(), reference, 1e-5);
            check(&[&x, &w], |t| linear(&t[0], &t[1], None, Precision::F32).unwrap(), reference, 1e-5);
        }
        // Leading dimensions are kept.
        let (x, w) = (randn(&[2, 5, 8]), randn(&[3, 8]));
        assert_eq!(linear(x.as_tensor(), w.as_tensor(), None, Precision::F32).unwrap().dims(), &[2, 5, 3]);
    }

    /// bf16: every product (forward, dx, dw) is the exact sum of products of operands rounded to bf16, accumulated
    /// in f32; the bias gradient (a sum, no product) stays f32.
    #[test]
    fn bf16_linear_multiplies_rounded_operands() {
        use crate::kernels::bf16::{from_bf16, to_bf16};
        let (rows, k, n) = (37usize, 70usize, 53usize);
        let (x, w, b) = (randn(&[rows, k]), randn(&[n, k]), randn(&[n]));
        let r = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu).unwrap();
        let f = |t: &[Tensor]| linear(&t[0], &t[1], Some(&t[2]), Precision::Bf16).unwrap();
        let got = output_and_grads(&[&x, &w, &b], &r, &f);
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rounded = |t: &Tensor| v(t).into_iter().map(|a| from_bf16(to_bf16(a)) as f64).collect::<Vec<f64>>();
        let (xr, wr, rr) = (rounded(x.as_tensor()), rounded(w.as_tensor()), rounded(&r));
        let bv = v(b.as_tensor());
        // y = x·wᵀ + b; with L = Σ y·r: dx = r·w, dw = rᵀ·x, db = Σ_rows r.
        let y: Vec<f64> = (0..rows * n)
            .map(|i| (0..k).map(|j| xr[i / n * k + j] * wr[i % n * k + j]).sum::<f64>() + bv[i % n] as f64)
            .collect();
        let dx: Vec<f64> = (0..rows * k).map(|i| (0..n).map(|j| rr[i / k * n + j] * wr[j * k + i % k]).sum()).collect();
        let dw: Vec<f64> = (0..n * k).map(|i| (0..rows).map(|q| rr[q * n + i / k] * xr[q * k + i % k]).sum()).collect();
        for (name, got, want) in [("y", &got[0], y), ("dx", &got[1], dx), ("dw", &got[2], dw)] {
            let g = v(got);
            let scale = want.iter().fold(0f64, |m, a| m.max(a.abs()));
            let err = g.iter().zip(&want).fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs())) / scale;
            assert!(err < 1e-6, "{name}: relative error {err:e} against the rounded operands' exact products");
        }
        // Against f32 products: bf16 keeps 8 bits of mantissa.
        let exact = output_and_grads(&[&x, &w, &b], &r, &|t: &[Tensor]| linear(&t[0], &t[1], Some(&t[2]), Precision::F32).unwrap());
        for (i, (g, e)) in got.iter().zip(&exact).enumerate() {
            let err = rel_err(g, e);
            assert!(err < 2e-2, "{i}: bf16 against f32 relative error {err:e}");
        }
    }

    #[test]
    fn layer_norm_matches_autograd() {
        for (rows, d) in [(200usize, 48usize), (3, 768), (70, 5)] {
            let (x, w, b) = (randn(&[rows, d]), randn(&[d]), randn(&[d]));
            let shifted = Var::from_tensor(&(x.as_tensor() * 3.0).unwrap().affine(1.0, 2.0).unwrap()).unwrap();
            let reference = |t: &[Tensor]| {
                let mean = t[0].mean_keepdim(D::Minus1).unwrap();
                let xc = t[0].broadcast_sub(&mean).unwrap();
                let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let xn = xc.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap()).unwrap();
                xn.broadcast_mul(&t[1]).unwrap().broadcast_add(&t[2]).unwrap()
            };
            check(&[&shifted, &w, &b], |t| layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap(), reference, 1e-5);
        }
    }

    #[test]
    fn softmax_and_gelu_match_autograd() {
        for shape in [[2usize, 3, 197, 197], [1, 1, 4, 5]] {
            let x = randn(&shape);
            check(
                &[&x],
                |t| softmax_last_dim(&(&t[0] * 4.0).unwrap()).unwrap(),
                |t| candle_nn::ops::softmax(&(&t[0] * 4.0).unwrap(), D::Minus1).unwrap(),
                1e-5,
            );
            check(&[&x], |t| gelu_erf(&(&t[0] * 3.0).unwrap()).unwrap(), |t| (&t[0] * 3.0).unwrap().gelu_erf().unwrap(), 1e-5);
        }
    }

    /// Bit for bit the separate ops (same roundings in the same order), gradients to float rounding.
    #[test]
    fn scaled_residual_matches_autograd() {
        let (x, y, l) = (randn(&[3, 70, 24]), randn(&[3, 70, 24]), randn(&[24]));
        for keep in [None, Some(vec![2.0f32, 0.0, 2.0])] {
            let reference = |t: &[Tensor]| {
                let mut s = t[1].broadcast_mul(&t[2]).unwrap();
                if let Some(k) = &keep {
                    s = s.broadcast_mul(&Tensor::from_vec(k.clone(), (3, 1, 1), &Device::Cpu).unwrap()).unwrap();
                }
                (s + &t[0]).unwrap()
            };
            let ours = |t: &[Tensor]| scaled_residual(&t[0], &t[1], &t[2], keep.clone()).unwrap();
            check(&[&x, &y, &l], ours, reference, 1e-6);
            let ts = [x.as_tensor().clone(), y.as_tensor().clone(), l.as_tensor().clone()];
            assert_eq!(rel_err(&ours(&ts), &reference(&ts)), 0.0);
        }
    }

    #[test]
    fn attention_matches_autograd() {
        for (b, n, h, dh) in [(2usize, 197usize, 3usize, 64usize), (3, 5, 2, 3)] {
            let d = h * dh;
            let (qkv, bias) = (randn(&[b, n, 3 * d]), randn(&[h, n, n]));
            let reference = |t: &[Tensor]| {
                let part = |i: usize| {
                    t[0].narrow(2, i * d, d).unwrap().reshape((b, n, h, dh)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
                };
                let (q, k, v) = (part(0), part(1), part(2));
                let s = (q.matmul(&k.t().unwrap()).unwrap() / (dh as f64).sqrt()).unwrap().broadcast_add(&t[1]).unwrap();
                let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
                p.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, n, d)).unwrap()
            };
            check(&[&qkv, &bias], |t| attention(&t[0], &t[1], h).unwrap(), reference, 1e-5);
        }
    }

    /// The gradients do not depend on the thread count (a run and its resume agree bit for bit).
    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        let (x, w, b) = (randn(&[300, 96]), randn(&[200, 96]), randn(&[200]));
        let (lw, lb) = (randn(&[200]), randn(&[200]));
        let r = Tensor::randn(0f32, 1.0, (300, 200), &Device::Cpu).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let y = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), Precision::F32).unwrap();
                let y = layer_norm(&gelu_erf(&y).unwrap(), lw.as_tensor(), lb.as_tensor(), 1e-12).unwrap();
                let y = softmax_last_dim(&y).unwrap();
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                [&x, &w, &b, &lw, &lb].map(|v| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
        };
        assert_eq!(run(1), run(3));
    }
}
