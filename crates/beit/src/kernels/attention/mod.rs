//! Multi-head self-attention at inference from a fused qkv buffer, with BEiT's relative position biases:
//! `ctx = softmax(bias₀ + bias₁ + … + (q·kᵀ)/√dh) · v`, per image and head.
//!
//! # Layout
//!
//! `qkv` holds `batch · n` token rows of `3d` values, `[q | k | v]`, with head `h` in columns
//! `h·dh .. (h+1)·dh` of each third (`d = heads · dh`); `ctx` receives `batch · n` rows of `d`, head `h`
//! in the same columns. Each bias tensor is `heads · n · n`, head-major.
//!
//! # Kernels
//!
//! - AVX-512 ([`avx512`]): K and V packed once per head, 6 × 64 register tiles for q·kᵀ and p·v, the
//!   softmax normalised after p·v; 1.2–1.3× the portable one on a CPU that has AVX-512.
//! - Portable (here): per (image, head), `scores = bias + scale · q·kᵀ` and `ctx = softmax(scores) · v` as
//!   two matmuls of the `gemm` crate on strided views of qkv (no copies), softmax in place between them.
//!   `gemm` picks its own SIMD at run time (AVX2/FMA, NEON, …): on AVX2 CPUs that is ~3.5× what plain Rust
//!   tiles reach, so this is what runs on every CPU without AVX-512.
//!
//! Both compute each (image, head) as one task on rayon's current pool, by the same operations whatever
//! the task split: results do not depend on the thread count. They agree up to float rounding.

#[cfg(target_arch = "x86_64")]
mod avx512;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::error::{BeitError, Result};
use crate::kernels::cpu::{self, CpuFeatures};
use crate::kernels::math::softmax;

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Images.
    pub batch: usize,
    /// Tokens per image (`n`).
    pub tokens: usize,
    /// Attention heads.
    pub heads: usize,
    /// Features per head (`dh`).
    pub head_size: usize,
}

impl AttentionShape {
    /// `(batch, tokens, heads, head_size)`.
    fn dims(self) -> (usize, usize, usize, usize) {
        (self.batch, self.tokens, self.heads, self.head_size)
    }
}

/// Multi-head attention from the fused qkv buffer `(batch·n, 3d)` into ctx `(batch·n, d)`, `d = heads·dh`:
/// per image `b` and head `h`, `ctx_h = softmax(Σ biases[·][h] + q_h·k_hᵀ/√dh) · v_h`, with the fastest
/// kernel [`cpu::features`] allows, on rayon's current thread pool.
///
/// Each bias is `heads · n · n` values, head-major (`[h][query][key]`); any number of them (0 for none)
/// is added. Fails, naming the lengths, when `qkv`, `ctx` or a bias does not have the expected length.
pub fn attention(qkv: &[f32], ctx: &mut [f32], shape: AttentionShape, biases: &[&[f32]]) -> Result<()> {
    attention_using(cpu::features(), qkv, ctx, shape, biases)
}

/// [`attention`] with the kernel `cpu` selects (AVX-512 when it has `avx512`, the portable one otherwise;
/// for benchmarks and tests); fails if this CPU lacks one of `cpu`'s features.
pub fn attention_using(
    cpu: CpuFeatures,
    qkv: &[f32],
    ctx: &mut [f32],
    shape: AttentionShape,
    biases: &[&[f32]],
) -> Result<()> {
    let (batch, n, heads, dh) = shape.dims();
    cpu.check("attention")?;
    let ctx_len = ctx.len();
    let err = || shape_error(qkv.len(), ctx_len, batch, n, heads, dh);
    // Checked products: absurd sizes are an error, not an overflow.
    let d = heads.checked_mul(dh).ok_or_else(err)?;
    let rows = batch.checked_mul(n).ok_or_else(err)?;
    let want_ctx = rows.checked_mul(d).ok_or_else(err)?;
    let want_qkv = want_ctx.checked_mul(3).ok_or_else(err)?;
    let want_bias = n.checked_mul(n).and_then(|v| v.checked_mul(heads)).ok_or_else(err)?;
    if qkv.len() != want_qkv || ctx.len() != want_ctx || biases.iter().any(|b| b.len() != want_bias) {
        return Err(err());
    }
    if want_ctx == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if cpu.avx512 {
        // SAFETY: `cpu` is within this CPU's features (checked above).
        return unsafe { avx512::attention(qkv, ctx, shape, biases) }.ok_or_else(err);
    }
    portable(qkv, ctx, shape, biases);
    Ok(())
}

fn shape_error(qkv: usize, ctx: usize, batch: usize, n: usize, heads: usize, dh: usize) -> BeitError {
    BeitError::internal(
        "attention kernel",
        format!("qkv {qkv} / ctx {ctx} values for batch {batch}, {n} tokens, {heads}x{dh}"),
    )
}

/// The output buffer, shared by tasks that each write their own part of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every task writes a disjoint (rows, head columns) part of the buffer behind the pointer.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// By value, so that closures capture the whole (Sync) wrapper rather than the raw pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The portable kernel (see the module doc) on checked, non-empty shapes.
fn portable(qkv: &[f32], ctx: &mut [f32], shape: AttentionShape, biases: &[&[f32]]) {
    let (batch, n, heads, dh) = shape.dims();
    let d = heads * dh;
    let scale = 1.0 / (dh as f32).sqrt();
    let out = SendPtr(ctx.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each_init(
        || vec![0f32; n * n],
        |scores, task| {
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
            // SAFETY: q and k rows are n x dh at row stride 3d inside qkv (length checked); scores is n x n.
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
            scores.chunks_exact_mut(n).for_each(softmax);
            // SAFETY: this task alone writes columns h*dh..(h+1)*dh of rows b*n..(b+1)*n of ctx (length
            // checked); v is n x dh at row stride 3d inside qkv.
            unsafe {
                gemm::gemm(
                    n,
                    dh,
                    n,
                    out.get().add(b * n * d + h * dh),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernels() -> Vec<CpuFeatures> {
        let k = cpu::variants();
        if !k.iter().any(|c| c.avx512) {
            static NOTE: std::sync::Once = std::sync::Once::new();
            NOTE.call_once(|| eprintln!("note: no AVX-512 here; only the portable attention is tested"));
        }
        k
    }

    fn normal(rng: &mut crate::rng::Rng, len: usize, sd: f64) -> Vec<f32> {
        (0..len).map(|_| (rng.normal() * sd) as f32).collect()
    }

    /// qkv ~ N(0, 1) and `nb` biases ~ N(0, bias_sd), as in a trained BEiT.
    fn inputs(
        seed: u64,
        batch: usize,
        n: usize,
        heads: usize,
        dh: usize,
        nb: usize,
        bias_sd: f64,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = crate::rng::Rng::new(seed);
        let qkv = normal(&mut rng, batch * n * 3 * heads * dh, 1.0);
        let biases = (0..nb).map(|_| normal(&mut rng, heads * n * n, bias_sd)).collect();
        (qkv, biases)
    }

    /// (batch, tokens, heads, head size).
    type Dims = (usize, usize, usize, usize);

    fn run(kernel: CpuFeatures, qkv: &[f32], (batch, n, heads, dh): Dims, biases: &[Vec<f32>]) -> Vec<f32> {
        let b: Vec<&[f32]> = biases.iter().map(|b| &b[..]).collect();
        // NaN everywhere first: every output must be written.
        let mut ctx = vec![f32::NAN; batch * n * heads * dh];
        let shape = AttentionShape {
            batch,
            tokens: n,
            heads,
            head_size: dh,
        };
        attention_using(kernel, qkv, &mut ctx, shape, &b).unwrap();
        ctx
    }

    /// The f64 reference, and per output Σ_j p_j |v_j| (the scale its rounding error is relative to).
    fn reference(qkv: &[f32], (batch, n, heads, dh): Dims, biases: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
        let d = heads * dh;
        let mut out = vec![0f64; batch * n * d];
        let mut mag = vec![0f64; batch * n * d];
        let scale = 1.0 / (dh as f64).sqrt();
        let at = |b: usize, t: usize, part: usize, h: usize, c: usize| {
            qkv[(b * n + t) * 3 * d + part * d + h * dh + c] as f64
        };
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..n {
                    let mut s: Vec<f64> = (0..n)
                        .map(|j| {
                            let dot: f64 = (0..dh).map(|c| at(b, i, 0, h, c) * at(b, j, 1, h, c)).sum();
                            biases.iter().map(|bias| bias[(h * n + i) * n + j] as f64).sum::<f64>() + dot * scale
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    s.iter_mut().for_each(|v| *v = (*v - m).exp());
                    let total: f64 = s.iter().sum();
                    for c in 0..dh {
                        let o = (b * n + i) * d + h * dh + c;
                        for (j, p) in s.iter().enumerate() {
                            out[o] += p / total * at(b, j, 2, h, c);
                            mag[o] += p / total * at(b, j, 2, h, c).abs();
                        }
                    }
                }
            }
        }
        (out, mag)
    }

    /// Worst |got - want| / Σ p|v| over all outputs.
    fn worst_error(got: &[f32], want: &[f64], mag: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .zip(mag)
            .map(|((&g, &w), &m)| (g as f64 - w).abs() / m.max(1e-30))
            .fold(0.0, f64::max)
    }

    /// Odd token counts (a partial 16-key vector, a partial 64-key panel, a partial 24-row block, a
    /// single token), head sizes below, at and above one 64-column p·v tile, 1-12 heads, 1-3 images and
    /// 0-2 bias tensors, against f64: within 1e-5 of Σ_j p_j |v_j| for every output.
    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let mut worst = [0f64; 2];
        for (idx, &n) in [1usize, 5, 197, 50, 16, 17, 64, 65, 24, 25].iter().enumerate() {
            for (jdx, &dh) in [8usize, 32, 64, 80].iter().enumerate() {
                let heads = 1 + (idx * 5 + jdx * 7) % 12;
                let batch = 1 + (idx + jdx) % 3;
                let nb = (idx + 2 * jdx) % 3;
                let sd = if jdx % 2 == 0 { 0.02 } else { 2.0 };
                let (qkv, biases) = inputs((idx * 10 + jdx) as u64, batch, n, heads, dh, nb, sd);
                let (want, mag) = reference(&qkv, (batch, n, heads, dh), &biases);
                for (k, kernel) in kernels().into_iter().enumerate() {
                    let got = run(kernel, &qkv, (batch, n, heads, dh), &biases);
                    let err = worst_error(&got, &want, &mag);
                    assert!(
                        err < 1e-5,
                        "{kernel:?} batch {batch}, n {n}, {heads}x{dh}, {nb} biases: error {err:e}"
                    );
                    worst[k] = worst[k].max(err);
                }
            }
        }
        eprintln!(
            "worst error relative to sum p|v|: portable {:e}, native {:e}",
            worst[0], worst[1]
        );
    }

    /// BEiT-base's shape (197 tokens, 12 x 64), two relative position biases.
    #[test]
    fn matches_f64_reference_on_beit_base() {
        let (qkv, biases) = inputs(7, 2, 197, 12, 64, 2, 0.5);
        let (want, mag) = reference(&qkv, (2, 197, 12, 64), &biases);
        let big = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for kernel in kernels() {
            let got = run(kernel, &qkv, (2, 197, 12, 64), &biases);
            let err = worst_error(&got, &want, &mag);
            let abs = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs())
                .fold(0.0, f64::max);
            eprintln!(
                "{kernel:?}: worst error {err:e} of sum p|v|, {:e} of the largest output",
                abs / big
            );
            assert!(err < 1e-5 && abs < 1e-5 * big, "{kernel:?}: {err:e}, {abs:e}");
        }
    }

    /// The AVX-512 kernel agrees with the portable one up to rounding (FMA, the order of the sums).
    #[test]
    fn kernels_agree_with_the_portable_one() {
        for &(batch, n, heads, dh, nb) in &[
            (2usize, 197usize, 12usize, 64usize, 2usize),
            (1, 33, 3, 80, 1),
            (3, 7, 2, 8, 0),
        ] {
            let (qkv, biases) = inputs(11, batch, n, heads, dh, nb, 1.0);
            let a = run(CpuFeatures::PORTABLE, &qkv, (batch, n, heads, dh), &biases);
            let big = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            for kernel in kernels().into_iter().skip(1) {
                let b = run(kernel, &qkv, (batch, n, heads, dh), &biases);
                let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(
                    diff <= 2e-6 * big,
                    "{kernel:?} batch {batch}, n {n}, {heads}x{dh}: {diff} of {big}"
                );
            }
        }
    }

    /// Rows are computed by the same operations whatever the task split (heads split into row ranges
    /// or not), so 1, 2, 3 and 7 threads agree bit for bit.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        for &(batch, n, heads, dh) in &[(1usize, 197usize, 3usize, 64usize), (2, 197, 12, 64), (1, 61, 1, 32)] {
            let (qkv, biases) = inputs(5, batch, n, heads, dh, 2, 0.5);
            for kernel in kernels() {
                let at = |threads: usize| {
                    crate::kernels::on_threads(threads, || run(kernel, &qkv, (batch, n, heads, dh), &biases))
                };
                let one = at(1);
                for threads in [2, 3, 7] {
                    let other = at(threads);
                    assert!(
                        one.iter().zip(&other).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{kernel:?} batch {batch}, n {n}, {heads}x{dh}: 1 vs {threads} threads"
                    );
                }
            }
        }
    }

    /// Calls from inside rayon tasks (each fanning out on the same pool, scratch taken per task) agree
    /// with serial ones.
    #[test]
    fn concurrent_and_nested_calls_agree() {
        let cases: Vec<_> = (0..6)
            .map(|s| inputs(20 + s, 1, 50 + 7 * s as usize, 4, 32, 1, 0.5))
            .collect();
        for kernel in kernels() {
            let serial: Vec<Vec<f32>> = cases
                .iter()
                .enumerate()
                .map(|(s, (q, b))| run(kernel, q, (1, 50 + 7 * s, 4, 32), b))
                .collect();
            let parallel: Vec<Vec<f32>> = cases
                .par_iter()
                .enumerate()
                .map(|(s, (q, b))| run(kernel, q, (1, 50 + 7 * s, 4, 32), b))
                .collect();
            for (s, p) in serial.iter().zip(&parallel) {
                assert!(s.iter().zip(p).all(|(a, b)| a.to_bits() == b.to_bits()), "{kernel:?}");
            }
        }
    }

    /// One token attends only to itself: ctx = v exactly; uniform scores average v.
    #[test]
    fn degenerate_inputs_give_exact_answers() {
        for kernel in kernels() {
            let (qkv, _) = inputs(3, 2, 1, 3, 16, 0, 0.0);
            let ctx = run(kernel, &qkv, (2, 1, 3, 16), &[]);
            for b in 0..2 {
                assert_eq!(
                    ctx[b * 48..(b + 1) * 48],
                    qkv[b * 144 + 96..b * 144 + 144],
                    "{kernel:?}"
                );
            }
            // q = 0: every key weighs 1/4, so ctx is the mean of the four v rows.
            let (n, dh) = (4, 8);
            let mut qkv = vec![0f32; n * 3 * dh];
            for j in 0..n {
                for c in 0..dh {
                    qkv[j * 3 * dh + dh + c] = (j * c) as f32;
                    qkv[j * 3 * dh + 2 * dh + c] = (j + c) as f32;
                }
            }
            let ctx = run(kernel, &qkv, (1, n, 1, dh), &[]);
            for i in 0..n {
                for c in 0..dh {
                    assert_eq!(ctx[i * dh + c], 1.5 + c as f32, "{kernel:?}");
                }
            }
        }
    }

    #[test]
    fn bad_lengths_are_errors_that_name_the_lengths() {
        let (batch, n, heads, dh) = (2, 5, 3, 4);
        let (qkv, biases) = inputs(1, batch, n, heads, dh, 1, 0.5);
        let mut ctx = vec![0f32; batch * n * heads * dh];
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        let attention = |qkv: &[f32], ctx: &mut [f32], batch, tokens, heads, head_size, biases: &[&[f32]]| {
            attention(
                qkv,
                ctx,
                AttentionShape {
                    batch,
                    tokens,
                    heads,
                    head_size,
                },
                biases,
            )
        };
        let bias = [&biases[0][..]];
        assert!(attention(&qkv, &mut ctx, batch, n, heads, dh, &bias).is_ok());
        assert_eq!(
            msg(attention(&qkv[1..], &mut ctx, batch, n, heads, dh, &bias)),
            "internal error in attention kernel: qkv 359 / ctx 120 values for batch 2, 5 tokens, 3x4 (this is a bug in beit-rs)"
        );
        assert!(msg(attention(&qkv, &mut ctx[1..], batch, n, heads, dh, &bias)).contains("ctx 119 values"));
        assert!(attention(&qkv, &mut ctx, batch, n, heads, dh, &[&biases[0][1..]]).is_err());
        assert!(attention(&qkv, &mut ctx, batch, n, heads, dh, &[bias[0], &[]]).is_err());
        assert!(attention(&qkv, &mut ctx, batch, n + 1, heads, dh, &bias).is_err());
        assert!(attention(&qkv, &mut ctx, usize::MAX, n, heads, dh, &bias).is_err());
        assert!(attention(&qkv, &mut ctx, batch, n, usize::MAX, 2, &bias).is_err());
        assert!(attention(&qkv, &mut ctx, batch, usize::MAX / 2, heads, dh, &bias).is_err());
        // Empty problems are fine and write nothing.
        assert!(attention(&[], &mut [], 0, n, heads, dh, &[]).is_ok());
        assert!(attention(&[], &mut [], batch, 0, heads, dh, &[&[]]).is_ok());
        assert!(attention(&[], &mut [], batch, n, heads, 0, &[]).is_ok());
    }

    /// More than two bias tensors are summed per head first; the result is the same attention.
    #[test]
    fn three_biases_match_the_reference() {
        let (qkv, biases) = inputs(9, 2, 30, 3, 16, 3, 1.0);
        let (want, mag) = reference(&qkv, (2, 30, 3, 16), &biases);
        for kernel in kernels() {
            let got = run(kernel, &qkv, (2, 30, 3, 16), &biases);
            let err = worst_error(&got, &want, &mag);
            assert!(err < 1e-5, "{kernel:?}: {err:e}");
        }
    }
}
