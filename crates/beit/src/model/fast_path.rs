//! BeitLayer at inference on the CPU, over plain f32 slices. Same weights and same formulas as the autograd path
//! (layer.rs, attention.rs), but arranged so that nothing is copied or transposed: q, k and v are written side
//! by side into one buffer, each head's scores are computed from strided views of it with the relative position
//! bias added by the matmul itself, the context is written straight into its (tokens, hidden) place, and the
//! elementwise phases (LayerNorm, softmax, GELU, bias, layer scale, residual) run fused and on every thread.
//! candle's generic ops do each of these as a separate single-threaded pass with a fresh allocation; on
//! BEiT-base that was a third of the forward time (see PERFORMANCE.md).
//!
//! The fast path is taken only where it computes exactly what the generic path computes: inference, f32 on the
//! CPU, no head mask, no attention output. Everything else goes through the generic path.

use candle_core::{CpuStorage, Storage, StorageRef, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::config::HiddenAct;
use crate::kernels::attention::AttentionKernel;
use crate::error::{BeitError, Result};
use crate::model::attention::AttentionInputs;
use crate::model::layer::BeitLayer;
use crate::nn::{activation, LayerNorm, Linear};

/// A contiguous f32 CPU tensor, borrowed.
pub(crate) struct F32View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl F32View<'_> {
    pub(crate) fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            // view() only builds F32View over f32 CPU storage.
            _ => &[],
        }
    }
}

/// Borrows `t` as a slice when it is a contiguous f32 CPU tensor; None sends the caller to the generic path.
pub(crate) fn view(t: &Tensor) -> Option<F32View<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*guard {
        Storage::Cpu(CpuStorage::F32(_)) => Some(F32View { guard, start, end }),
        _ => None,
    }
}

fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

fn internal(what: &str, detail: String) -> BeitError {
    BeitError::internal(format!("fast path: {what}"), detail)
}

/// What a Linear's caller fuses into it: run on each finished run of outputs of one row, `(row, first column,
/// values)`, while the kernel has them in L1 (GELU, or the residual add), instead of one more pass over memory.
type Epilogue<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// A Linear over slices (false: the weights are not f32 CPU tensors).
fn linear(l: &Linear, a: &[f32], m: usize, k: usize, out: &mut [f32], ldo: usize, epilogue: Option<Epilogue>) -> Result<bool> {
    let bias_view = match &l.bias {
        Some(b) => match view(b) {
            Some(v) => Some(v),
            None => return Ok(false),
        },
        None => None,
    };
    let bias = bias_view.as_ref().map(|b| b.slice());
    if let Some(q) = &l.quantized {
        let n = q.out_features();
        if ldo == n {
            match epilogue {
                Some(e) => q.forward_with(a, m, out, e)?,
                None => q.forward(a, m, out)?,
            }
        } else {
            // q, k and v go side by side into the qkv buffer.
            let mut tmp = vec![0f32; m * n];
            q.forward(a, m, &mut tmp)?;
            for (o, t) in out.chunks_mut(ldo).zip(tmp.chunks_exact(n)) {
                o[..n].copy_from_slice(t);
            }
            apply_epilogue(out, m, n, ldo, epilogue);
        }
        return Ok(true);
    }
    if let Some(p) = &l.packed {
        match epilogue {
            Some(e) => crate::kernels::f32::linear_packed_with(a, k, m, p, bias, out, ldo, e)?,
            None => crate::kernels::f32::linear_packed(a, k, m, p, bias, out, ldo)?,
        }
        return Ok(true);
    }
    let w = l.weight()?;
    let Some(w) = view(&w) else { return Ok(false) };
    let n = l.out_features();
    crate::kernels::f32::linear(a, k, m, w.slice(), n, k, bias, out, ldo)?;
    apply_epilogue(out, m, n, ldo, epilogue);
    Ok(true)
}

/// An epilogue as a pass of its own, for the kernels that take none.
fn apply_epilogue(out: &mut [f32], m: usize, n: usize, ldo: usize, epilogue: Option<Epilogue>) {
    let Some(e) = epilogue else { return };
    out.par_chunks_mut(ldo).take(m).enumerate().for_each(|(r, row)| e(r, 0, &mut row[..n]));
}

/// Rows per parallel task: enough work per task that rayon's overhead does not show.
fn rows_per_task(rows: usize, width: usize) -> usize {
    let per_thread = rows.div_ceil(threads() * 4).max(1);
    per_thread.max(4096 / width.max(1)).max(1)
}

/// torch.nn.LayerNorm over the last dimension (biased variance, two passes in f32).
fn layer_norm(x: &[f32], d: usize, ln: &LayerNorm, out: &mut [f32]) -> Option<()> {
    let (w, b) = (view(&ln.weight)?, view(&ln.bias)?);
    let (w, b) = (w.slice(), b.slice());
    let eps = ln.eps as f32;
    let rows = rows_per_task(x.len() / d.max(1), d);
    out.par_chunks_mut(rows * d).zip(x.par_chunks(rows * d)).for_each(|(o, x)| {
        for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let mean = sum(x) / d as f32;
            let mut var_acc = [0f32; 16];
            let mut chunks = x.chunks_exact(16);
            for c in &mut chunks {
                for (acc, v) in var_acc.iter_mut().zip(c) {
                    *acc += (v - mean) * (v - mean);
                }
            }
            let var = (var_acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum::<f32>())
                / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                o[i] = (x[i] - mean) * inv * w[i] + b[i];
            }
        }
    });
    Some(())
}

/// Sum in 16 lanes (vectorizes; a serial float sum does not). Inlined so the AVX-512 callers get wide code.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    let m = acc.iter().fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m });
    chunks.remainder().iter().fold(m, |m, v| if *v > m { *v } else { m })
}

/// Compiles `$body` (a function over `&mut [f32]`) twice: for AVX-512 and for the baseline x86-64/other targets,
/// chosen at run time, so the binary runs everywhere and uses the wide registers where they exist.
macro_rules! multiversion {
    ($name:ident, $inner:ident) => {
        fn $name(x: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn wide(x: &mut [f32]) {
                    $inner(x)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    unsafe { wide(x) };
                    return;
                }
            }
            $inner(x)
        }
    };
}

/// exp(x) to about 2 ulp (Cephes' expf): x = n ln2 + r, a degree-6 polynomial for exp(r), 2^n from the exponent
/// bits. Written without calls and branches so that it vectorizes.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Rounds to nearest by the float adder (1.5 * 2^23).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer straight from t's mantissa bits: a float-to-int cast would not vectorize (Rust's `as`
    // saturates).
    let ni = t.to_bits() as i32 - 0x4B40_0000;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((ni + 127) as u32) << 23)
}

/// erf(x) as Eigen's fast float erf: a rational approximation on [-4, 4] (erf is 1 to float precision beyond),
/// within a few ulp of the exact value.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_0e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_473_9e-2;
    x * p / q
}

#[inline(always)]
fn gelu_erf_inner(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}
multiversion!(gelu_erf_slice, gelu_erf_inner);

#[inline(always)]
fn exp_sub_max_inner(x: &mut [f32]) {
    let m = max(x);
    for v in x.iter_mut() {
        *v = exp_f32(*v - m);
    }
}
multiversion!(exp_sub_max_slice, exp_sub_max_inner);

/// softmax of one row, in place.
#[inline(always)]
fn softmax_row(x: &mut [f32]) {
    exp_sub_max_slice(x);
    let inv = 1.0 / sum(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// torch's exact GELU (erf), every thread.
pub(crate) fn gelu_erf_par(x: &mut [f32], width: usize) {
    let chunk = rows_per_task(x.len() / width.max(1), width) * width;
    x.par_chunks_mut(chunk.max(1)).for_each(gelu_erf_slice);
}

/// The activation in place: GELU (erf) fused here, the other ACT2FN functions through candle.
fn activation_in_place(act: HiddenAct, x: &mut [f32], width: usize) -> Result<bool> {
    match act {
        HiddenAct::Gelu | HiddenAct::GeluPython => gelu_erf_par(x, width),
        other => {
            let t = Tensor::from_slice(x, x.len(), &candle_core::Device::Cpu)?;
            let y = activation(other, &t)?;
            let Some(v) = view(&y) else { return Ok(false) };
            x.copy_from_slice(v.slice());
        }
    }
    Ok(true)
}

/// `y = residual + scale * y` on a run of outputs of one row (scale per column: the layer scale, or 1).
fn add_residual(residual: &[f32], scale: Option<&[f32]>, d: usize, row: usize, col: usize, y: &mut [f32]) {
    let r = &residual[row * d + col..][..y.len()];
    match scale {
        Some(s) => {
            for ((y, r), s) in y.iter_mut().zip(r).zip(&s[col..]) {
                *y = r + s * *y;
            }
        }
        None => {
            for (y, r) in y.iter_mut().zip(r) {
                *y += r;
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every task writes a disjoint column block of the buffer behind the pointer (see attention()).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Multi-head attention from the fused qkv buffer (batch*n, 3d) into ctx (batch*n, d), on the gemm crate: for CPUs
/// without AVX-512 (kernels::attention has the AVX-512 one).
#[allow(clippy::too_many_arguments)]
fn attention(
    qkv: &[f32],
    ctx: &mut [f32],
    batch: usize,
    n: usize,
    heads: usize,
    dh: usize,
    biases: &[&[f32]],
) -> Result<()> {
    let d = heads * dh;
    if qkv.len() != batch * n * 3 * d || ctx.len() != batch * n * d || biases.iter().any(|b| b.len() != heads * n * n) {
        return Err(internal(
            "attention",
            format!("qkv {} / ctx {} values for batch {batch}, {n} tokens, {heads}x{dh}", qkv.len(), ctx.len()),
        ));
    }
    let scale = 1.0 / (dh as f32).sqrt();
    let out = SendPtr(ctx.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each_init(
        || vec![0f32; n * n],
        |scores, task| {
            let out = out;
            let (b, h) = (task / heads, task % heads);
            let base = b * n * 3 * d;
            let q = &qkv[base + h * dh..];
            let k = &qkv[base + d + h * dh..];
            let v = &qkv[base + 2 * d + h * dh..];
            // The bias goes in first and the matmul adds scale * q.k to it: (q.k)/sqrt(dh) + bias in one pass.
            match biases {
                [] => scores.fill(0.0),
                [first, rest @ ..] => {
                    scores.copy_from_slice(&first[h * n * n..(h + 1) * n * n]);
                    for r in rest {
                        for (s, v) in scores.iter_mut().zip(&r[h * n * n..(h + 1) * n * n]) {
                            *s += v;
                        }
                    }
                }
            }
            // SAFETY: q and k rows are n x dh at row stride 3d inside qkv (checked length); scores is n x n.
            unsafe {
                gemm::gemm(
                    n,
                    n,
                    dh,
                    scores.as_mut_ptr(),
                    1,
                    n as isize,
                    true,
                    q.as_ptr(),
                    1,
                    3 * d as isize,
                    k.as_ptr(),
                    3 * d as isize,
                    1,
                    1.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for row in scores.chunks_exact_mut(n) {
                softmax_row(row);
            }
            // SAFETY: this task alone writes columns h*dh..(h+1)*dh of rows b*n..(b+1)*n of ctx (length checked);
            // v is n x dh at row stride 3d inside qkv.
            unsafe {
                gemm::gemm(
                    n,
                    dh,
                    n,
                    out.0.add(b * n * d + h * dh),
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n as isize,
                    v.as_ptr(),
                    1,
                    3 * d as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
    Ok(())
}

/// BeitLayer::forward at inference, or None when this layer or input needs the generic path.
pub(crate) fn layer_forward(layer: &BeitLayer, x: &Tensor, a: &AttentionInputs) -> Result<Option<Tensor>> {
    // BEIT_GENERIC=1 forces candle's op-by-op path: the baseline of PERFORMANCE.md's comparisons. Read once.
    static GENERIC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let generic = *GENERIC.get_or_init(|| std::env::var_os("BEIT_GENERIC").is_some());
    if a.mode.train || a.head_mask.is_some() || a.output_attentions || generic {
        return Ok(None);
    }
    let (batch, n, d) = x.dims3()?;
    let sa = &layer.attention.attention;
    let (heads, dh) = (sa.num_attention_heads(), sa.attention_head_size());
    if heads * dh != d {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let Some(xv) = view(&x) else { return Ok(None) };
    let xs = xv.slice();

    let mut bias_tensors = Vec::new();
    if let Some(rpb) = &sa.relative_position_bias {
        bias_tensors.push(rpb.forward(a.window, a.interpolate_pos_encoding, n, a.mode)?);
    }
    if let Some(shared) = a.shared_relative_position_bias {
        bias_tensors.push(shared.contiguous()?);
    }
    let bias_views: Option<Vec<F32View>> = bias_tensors.iter().map(view).collect();
    let Some(bias_views) = bias_views else { return Ok(None) };
    let biases: Vec<&[f32]> = bias_views.iter().map(|v| v.slice()).collect();
    let lambda_1 = layer.lambda_1.as_ref().map(view);
    let lambda_2 = layer.lambda_2.as_ref().map(view);
    if matches!(lambda_1, Some(None)) || matches!(lambda_2, Some(None)) {
        return Ok(None);
    }

    let lambdas = (
        lambda_1.as_ref().and_then(|l| l.as_ref()).map(|v| v.slice()),
        lambda_2.as_ref().and_then(|l| l.as_ref()).map(|v| v.slice()),
    );
    let shape = Shape { batch, n, d, heads, dh };
    // The buffers live across layers and calls (taken out here, put back after): no allocation, page faults or
    // zeroing per layer. A nested call on this thread would find them taken and allocate its own.
    let mut scratch = SCRATCH.with(|s| s.take());
    let y = layer_compute(layer, xs, &biases, lambdas, shape, &mut scratch);
    // Kept for the next call unless a very large batch grew it: a server should not hold that much forever.
    if scratch.bytes() <= SCRATCH_KEEP_BYTES {
        SCRATCH.with(|s| s.set(scratch));
    }
    match y? {
        Some(y) => Ok(Some(Tensor::from_vec(y, (batch, n, d), x.device())?)),
        None => Ok(None),
    }
}

#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    n: usize,
    d: usize,
    heads: usize,
    dh: usize,
}

/// Per-thread buffers of the fast path, grown to the largest input seen.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    x1: Vec<f32>,
    hidden: Vec<f32>,
}

impl Scratch {
    fn bytes(&self) -> usize {
        let values = [&self.normed, &self.qkv, &self.ctx, &self.x1, &self.hidden].iter().map(|v| v.capacity()).sum::<usize>();
        values * std::mem::size_of::<f32>()
    }
}

/// Scratch larger than this (BEiT-base beyond batch ~40 at 224) is freed after each call.
const SCRATCH_KEEP_BYTES: usize = 256 << 20;

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// The first `len` values of `v`, grown if needed. Old contents are left: every user overwrites all of them.
fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

fn layer_compute(
    layer: &BeitLayer,
    xs: &[f32],
    biases: &[&[f32]],
    (lambda_1, lambda_2): (Option<&[f32]>, Option<&[f32]>),
    Shape { batch, n, d, heads, dh }: Shape,
    s: &mut Scratch,
) -> Result<Option<Vec<f32>>> {
    let sa = &layer.attention.attention;
    let rows = batch * n;
    let normed = sized(&mut s.normed, rows * d);
    if layer_norm(xs, d, &layer.layernorm_before, normed).is_none() {
        return Ok(None);
    }
    let qkv = sized(&mut s.qkv, rows * 3 * d);
    if let Some(fused) = &sa.fused_qkv_int8 {
        fused.forward(normed, rows, qkv)?;
    } else {
        for (i, l) in [&sa.query, &sa.key, &sa.value].into_iter().enumerate() {
            if !linear(l, normed, rows, d, &mut qkv[i * d..], 3 * d, None)? {
                return Ok(None);
            }
        }
    }
    let ctx = sized(&mut s.ctx, rows * d);
    // Our AVX-512 attention kernel where the CPU has it; elsewhere the gemm crate's AVX2 kernels beat its portable
    // fallback (19 against ~70 GFLOP/s), so the gemm-based version below stays.
    if AttentionKernel::Avx512.is_available() {
        crate::kernels::attention::attention(qkv, ctx, batch, n, heads, dh, biases)?;
    } else {
        attention(qkv, ctx, batch, n, heads, dh, biases)?;
    }
    let x1 = sized(&mut s.x1, rows * d);
    let residual_1 = |r: usize, c: usize, v: &mut [f32]| add_residual(xs, lambda_1, d, r, c, v);
    if !linear(&layer.attention.output.dense, ctx, rows, d, x1, d, Some(&residual_1))? {
        return Ok(None);
    }

    if layer_norm(x1, d, &layer.layernorm_after, normed).is_none() {
        return Ok(None);
    }
    let inter = layer.intermediate.dense.out_features();
    let hidden = sized(&mut s.hidden, rows * inter);
    let act = layer.intermediate.act();
    if matches!(act, HiddenAct::Gelu | HiddenAct::GeluPython) {
        // GELU on each tile while it is still in L1.
        let gelu = |_: usize, _: usize, v: &mut [f32]| gelu_erf_slice(v);
        if !linear(&layer.intermediate.dense, normed, rows, d, hidden, inter, Some(&gelu))? {
            return Ok(None);
        }
    } else if !linear(&layer.intermediate.dense, normed, rows, d, hidden, inter, None)?
        || !activation_in_place(act, hidden, inter)?
    {
        return Ok(None);
    }
    let mut y = vec![0f32; rows * d];
    let x1 = &*x1;
    let residual_2 = |r: usize, c: usize, v: &mut [f32]| add_residual(x1, lambda_2, d, r, c, v);
    if !linear(&layer.output.dense, hidden, rows, inter, &mut y, d, Some(&residual_2))? {
        return Ok(None);
    }
    Ok(Some(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_within_a_few_ulp() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -20000..=20000 {
            let x = i as f32 * 0.004;
            let e = exp_f32(x) as f64;
            let exact = (x as f64).exp();
            worst_exp = worst_exp.max((e - exact).abs() / exact);
            let erf = erf_f32(x) as f64;
            worst_erf = worst_erf.max((erf - libm_erf(x as f64)).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf}");
    }

    /// erf by its series / continued fraction, in f64, as the reference.
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz-Stegun 7.1.5 series is exact enough for |x| <= 3; beyond, erf is 1 - tiny.
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut term = x;
        let mut sum = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn softmax_row_sums_to_one_and_matches_naive() {
        let mut row: Vec<f32> = (0..197).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1).collect();
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let naive: Vec<f64> = row.iter().map(|v| ((*v - m) as f64).exp()).collect();
        let total: f64 = naive.iter().sum();
        softmax_row(&mut row);
        for (a, b) in row.iter().zip(&naive) {
            assert!((*a as f64 - b / total).abs() < 1e-7);
        }
    }
}
