//! Element-wise maths over f32 slices, one of each: exp, erf and torch's exact GELU, softmax, LayerNorm.
//! Written without calls and branches in their inner loops so that they vectorize; the slice functions are
//! compiled twice (AVX-512 and the target's baseline) and pick one at run time from [`cpu::features`].

use rayon::prelude::*;

use crate::kernels::cpu;

/// Compiles `$inner` (a function over `&mut [f32]`) twice, for AVX-512 and for the target's baseline, and
/// defines `$name` to run the AVX-512 one where [`cpu::features`] allows it.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident = $inner:ident) => {
        $(#[$doc])*
        $vis fn $name(x: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn wide(x: &mut [f32]) {
                    $inner(x)
                }
                if cpu::features().avx512 {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    unsafe { wide(x) };
                    return;
                }
            }
            $inner(x)
        }
    };
}

/// exp(x) to about 2 ulp (Cephes' expf): x = n ln2 + r, a degree-6 polynomial for exp(r), 2^n from the
/// exponent bits. Clamped to [-87.3, 88.7] (exp(-87.3) = 1.2e-38: nothing next to a softmax row's largest
/// term); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
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

/// [`exp`] on 16 lanes with AVX-512: the same steps, with FMA where they multiply and add (so within an ulp
/// of [`exp`], not bit-equal). The attention kernel's softmax calls it on whole vectors: LLVM's
/// auto-vectorized [`exp_line`] ran that kernel 10-20% slower.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // max(lo, x) and min(hi, x) return x when x is NaN (their second operand).
    let x = _mm512_min_ps(_mm512_set1_ps(88.7), _mm512_max_ps(_mm512_set1_ps(-87.3), x));
    let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(12_582_912.0));
    let n = _mm512_sub_ps(t, _mm512_set1_ps(12_582_912.0));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
    // 2^n: t's mantissa holds n + 0x40_0000; n + 127 shifted into the exponent field.
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127 - 0x4B40_0000)));
    _mm512_mul_ps(y, _mm512_castsi512_ps(e))
}

/// erf(x) as Eigen's fast float erf: a rational approximation on [-4, 4] (erf is 1 to float precision
/// beyond), within a few ulp of the exact value.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
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
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

multiversion! {
    /// torch's exact GELU, `x · (1 + erf(x / √2)) / 2`, in place on the calling thread.
    pub fn gelu_erf = gelu_erf_inner
}

/// [`gelu_erf`] on every thread, `x` being rows of `width` values.
pub fn gelu_erf_par(x: &mut [f32], width: usize) {
    let chunk = rows_per_task(x.len() / width.max(1), width) * width;
    x.par_chunks_mut(chunk.max(1)).for_each(gelu_erf);
}

/// `x ← exp(x - m)` on a line of 16 values, adding the first `count` of them to the lane sums `acc`: the step
/// every softmax here is made of (a row as lines of 16, the last one partly padding).
#[inline(always)]
pub fn exp_line(x: &mut [f32; 16], m: f32, acc: &mut [f32; 16], count: usize) {
    for l in 0..16 {
        let e = exp(x[l] - m);
        x[l] = e;
        acc[l] += if l < count { e } else { 0.0 };
    }
}

#[inline(always)]
fn softmax_inner(x: &mut [f32]) {
    let m = max(x);
    let mut acc = [0f32; 16];
    let (lines, rest) = x.as_chunks_mut::<16>();
    for line in lines {
        exp_line(line, m, &mut acc, 16);
    }
    if !rest.is_empty() {
        let mut line = [f32::NEG_INFINITY; 16];
        line[..rest.len()].copy_from_slice(rest);
        exp_line(&mut line, m, &mut acc, rest.len());
        rest.copy_from_slice(&line[..rest.len()]);
    }
    let inv = 1.0 / acc.iter().sum::<f32>();
    for v in x.iter_mut() {
        *v *= inv;
    }
}

multiversion! {
    /// softmax of one row, in place: `exp(x - max) / Σ exp(x - max)`.
    pub fn softmax = softmax_inner
}

/// Sum in 16 lanes (vectorizes; a serial float sum does not). Inlined so that the AVX-512 callers get wide
/// code.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (lines, rest) = x.as_chunks::<16>();
    for c in lines {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Maximum in 16 lanes, as [`sum`].
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let (lines, rest) = x.as_chunks::<16>();
    for c in lines {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    let m = acc.iter().fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m });
    rest.iter().fold(m, |m, v| if *v > m { *v } else { m })
}

/// A LayerNorm row's mean and `1 / sqrt(var + eps)` (biased variance, two passes in f32), as [`layer_norm`]
/// computes them (also for its backward pass, which recomputes them).
#[inline(always)]
pub fn layer_norm_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len().max(1) as f32;
    let mean = sum(x) / d;
    let mut var_acc = [0f32; 16];
    let (lines, rest) = x.as_chunks::<16>();
    for c in lines {
        for (acc, v) in var_acc.iter_mut().zip(c) {
            *acc += (v - mean) * (v - mean);
        }
    }
    let var = (var_acc.iter().sum::<f32>() + rest.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// torch.nn.LayerNorm over rows of `weight.len()` values (biased variance, two passes in f32), `x` into
/// `out`, on every thread. `bias` and `out` are as long as `weight` and `x`.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len().max(1);
    let rows = rows_per_task(x.len() / d, d);
    out.par_chunks_mut(rows * d)
        .zip(x.par_chunks(rows * d))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (mean, inv) = layer_norm_stats(x, eps);
                for (((o, x), w), b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
                    *o = (x - mean) * inv * w + b;
                }
            }
        });
}

/// Rows per parallel task: enough work per task that rayon's overhead does not show.
pub fn rows_per_task(rows: usize, width: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per_thread = rows.div_ceil(threads * 4).max(1);
    per_thread.max(4096 / width.max(1)).max(1)
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
            let e = exp(x) as f64;
            let exact = (x as f64).exp();
            worst_exp = worst_exp.max((e - exact).abs() / exact);
            worst_erf = worst_erf.max((erf(x) as f64 - erf_f64(x as f64)).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf}");
        // The whole range softmax feeds it (x - max ≤ 0).
        let worst = (0..=200_000)
            .map(|i| -87.0 * i as f32 / 200_000.0)
            .map(|x| (exp(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp())
            .fold(0f64, f64::max);
        assert!(worst < 5e-7, "exp relative error {worst} on [-87, 0]");
        // Far below the clamp: tiny and finite; NaN stays NaN.
        assert!(exp(-1e30) < 1.3e-38 && exp(f32::NEG_INFINITY) >= 0.0 && exp(f32::NAN).is_nan());
    }

    /// The AVX-512 form follows the scalar one to within an ulp (it fuses multiply-adds), clamps and keeps
    /// NaN alike.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp512_follows_exp() {
        if !cpu::hardware().avx512 {
            eprintln!("note: no AVX-512 on this CPU; exp512 not tested");
            return;
        }
        let xs: Vec<f32> = (-40000..=40000)
            .map(|i| i as f32 * 0.0022)
            .chain([-1e30, f32::NEG_INFINITY, f32::NAN, 1e30, -87.3, 88.7])
            .collect();
        let mut lanes = xs.clone();
        lanes.resize(xs.len().next_multiple_of(16), 0.0);
        for line in lanes.chunks_exact_mut(16) {
            // SAFETY: the CPU has AVX-512 F (checked above); the line holds 16 values.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(line.as_mut_ptr(), exp512(_mm512_loadu_ps(line.as_ptr())));
            }
        }
        for (x, v) in xs.iter().zip(&lanes) {
            let s = exp(*x);
            if s.is_nan() {
                assert!(v.is_nan(), "exp512({x}) = {v}, expected NaN");
            } else {
                let close = *v == s || (v - s).abs() <= 2.0 * f32::EPSILON * s.abs() + f32::MIN_POSITIVE;
                assert!(close, "exp512({x}) = {v}, exp = {s}");
            }
        }
    }

    /// erf by its series, in f64, as the reference.
    fn erf_f64(x: f64) -> f64 {
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
    fn softmax_sums_to_one_and_matches_naive() {
        for len in [1usize, 5, 16, 17, 197] {
            let mut row: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1).collect();
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let naive: Vec<f64> = row.iter().map(|v| ((*v - m) as f64).exp()).collect();
            let total: f64 = naive.iter().sum();
            softmax(&mut row);
            for (a, b) in row.iter().zip(&naive) {
                assert!((*a as f64 - b / total).abs() < 1e-7, "length {len}");
            }
        }
    }

    #[test]
    fn gelu_and_layer_norm_match_their_definitions() {
        let x: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) * 0.037).collect();
        let mut g = x.clone();
        gelu_erf_par(&mut g, 30);
        for (g, &x) in g.iter().zip(&x) {
            let want = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
            assert!((*g as f64 - want).abs() < 1e-6, "gelu({x}) = {g}, expected {want}");
        }
        let (w, b): (Vec<f32>, Vec<f32>) = (0..30).map(|i| (1.0 + i as f32 * 0.1, i as f32 * -0.05)).unzip();
        let mut out = vec![0f32; x.len()];
        layer_norm(&x, &w, &b, 1e-5, &mut out);
        for (row, o) in x.chunks(30).zip(out.chunks(30)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 30.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 30.0;
            for i in 0..30 {
                let want = (row[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64;
                assert!((o[i] as f64 - want).abs() < 1e-5, "{} vs {want}", o[i]);
            }
        }
    }
}
