//! Dynamically quantized Linear layers: int8 weights, uint8 activations, i32 accumulation.
//!
//! The scheme is onnxruntime's `quantize_dynamic` with `QInt8` per-channel weights:
//!
//! - **Weights** (once, at load time): symmetric per output channel, `scale_w[c] = max_k |w[c, k]| / 127`,
//!   `wq[c, k] = round(w[c, k] / scale_w[c])` in `[-127, 127]` (round half to even). A channel whose
//!   weights are all zero (or whose scale would underflow to 0) gets scale 0 and all-zero codes.
//! - **Activations** (every call): asymmetric uint8 *per row* (per token), like onnxruntime's
//!   `DynamicQuantizeLinear` but with one scale per row instead of one per tensor. With the row's range
//!   widened to include 0, `[min, max] ∋ 0`: `scale_x = max/255 - min/255` (that is `(max - min)/255`,
//!   written so that it cannot overflow), `zp = round(-min / scale_x)` in `[0, 255]`,
//!   `xq[k] = clamp(round(x[k] / scale_x) + zp, 0, 255)` (round half to even).
//! - **GEMM**: `acc[r, c] = Σ_k xq[r, k] · wq[c, k]` in i32 (`vpdpbusd`: u8 × i8, four products per lane),
//!   then `out[r, c] = (acc[r, c] - zp[r] · colsum[c]) as f32 · (scale_x[r] · scale_w[c]) + bias[c]`
//!   with `colsum[c] = Σ_k wq[c, k]`. The integer part is exact: `|xq - zp| ≤ 255` and `|wq| ≤ 127`, so
//!   the sum fits an i32 for `in_features ≤` [`MAX_IN_FEATURES`] (65 793), which `quantize` enforces.
//!
//! Special rows: a row of `x` that is all zeros (or whose range is below `255 · f32::MIN_POSITIVE`)
//! quantizes to all-zero codes with scale 0, so its output is exactly `bias` (0 without bias). A row
//! holding any NaN or ±inf gets scale NaN, so its whole output row is NaN, whatever the weights and the
//! bias; other rows are unaffected. (An f32 matmul would give NaN or ±inf in such a row, depending on the
//! weights' signs; NaN everywhere is the deterministic choice.)
//!
//! # Layout and kernels
//!
//! Weights are packed once into panels of [`NR`] = 48 output channels: `[N/48][K/4][48][4]` bytes, i.e.
//! for each group of four input features, 48 channels × 4 consecutive weights (192 bytes = three zmm
//! registers, each holding 16 channels × 4 features, the operand `vpdpbusd` wants). `K` is padded to a
//! multiple of 4 and `N` to a multiple of 48 with zero weights (which contribute nothing).
//!
//! Activations are quantized once per call into a row-major u8 buffer (row stride padded to 64 bytes,
//! rows padded to a multiple of [`MR`] with zeros), kept in a per-thread scratch buffer between calls.
//! The AVX-512 VNNI microkernel computes an [`MR`] × [`NR`] = 8 × 48 tile in 24 zmm accumulators: per
//! group of four input features it loads three weight vectors and broadcasts one dword (4 activations)
//! of each of the 8 rows, 24 `vpdpbusd`. The dequantization (and an optional caller epilogue, e.g. GELU)
//! runs on the tile while it is still in registers / L1. Tasks (an M block whose activations fit in L2,
//! times a run of weight panels) run on rayon's current pool; every output element is computed by one
//! task in a fixed order, so results do not depend on the thread count.
//!
//! The kernel runs its AVX-512 VNNI code where [`cpu::features`] has `avx512_vnni`. The portable code
//! runs the same tiles in plain Rust (no intrinsics) and gives bit-identical results: identical integers, and the same f32 operations in the same order (no FMA contraction).
//! Both quantize the activations identically too (IEEE division and round-half-to-even in both).

use crate::error::{BeitError, Result};
use crate::kernels::aligned::Aligned;
use crate::kernels::cpu::{self, CpuFeatures};
use rayon::prelude::*;
use std::cell::Cell;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows per microkernel tile.
pub const MR: usize = 8;
/// zmm registers (of 16 output channels each) per tile row.
const NV: usize = 3;
/// Output channels per microkernel tile, and per packed weight panel.
pub const NR: usize = 16 * NV;
/// Input features per `vpdpbusd` lane.
const KG: usize = 4;
/// The largest `in_features` whose i32 accumulators cannot overflow: `K · 255 · 127 ≤ i32::MAX`.
pub const MAX_IN_FEATURES: usize = (i32::MAX as usize) / (255 * 127);
/// Bytes of quantized activations per M block: they stay in L2 (1 MiB on the machine this was tuned on)
/// alongside the weight panel being multiplied.
const A_BLOCK_BYTES: usize = 384 * 1024;
/// Below this many multiply-adds a call runs on the calling thread: rayon's overhead would dominate.
const PARALLEL_MIN_MACS: usize = 1 << 21;
/// Per-thread activation scratch larger than this is freed after the call instead of kept.
const SCRATCH_KEEP_BYTES: usize = 32 << 20;

type AlignedBytes = Aligned<u8>;

/// A Linear layer (`y = x Wᵀ + b`, W of shape (out, in) as in PyTorch) with int8 weights, run on
/// dynamically quantized uint8 activations. See the module documentation for the arithmetic.
#[derive(Clone)]
pub struct QuantizedLinear {
    out_features: usize,
    in_features: usize,
    /// `in_features.div_ceil(4)`: groups of four input features.
    k_groups: usize,
    /// `[out.div_ceil(NR)][k_groups][NR][4]` int8 codes (stored as their two's-complement bytes).
    packed: AlignedBytes,
    /// Per output channel, padded with zeros to a whole panel.
    scales: Vec<f32>,
    /// `Σ_k wq[c, k]` per output channel (for the activations' zero point), padded with zeros.
    col_sums: Vec<i32>,
    bias: Option<Vec<f32>>,
    /// `bias` (or zeros), padded to a whole panel.
    bias_padded: Vec<f32>,
}

impl std::fmt::Debug for QuantizedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedLinear")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("bias", &self.bias.is_some())
            .finish_non_exhaustive()
    }
}

/// `x.round_ties_even()` for |x| < 2^22, by the float adder (default rounding is to nearest, ties to even):
/// the same value without the libm call that made quantizing BEiT-base's weights take a second.
#[inline(always)]
fn round_ties_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (x + MAGIC) - MAGIC
}

fn shape_error(what: &str, message: String) -> BeitError {
    BeitError::internal(format!("QuantizedLinear: {what}"), message)
}

/// Quantized activations of one call: `rows_padded × lda` codes and per-row scale and zero point.
#[derive(Default)]
struct Scratch {
    codes: AlignedBytes,
    scale: Vec<f32>,
    zp: Vec<i32>,
}

thread_local! {
    /// Reused between calls on the same thread. Taken out for the duration of a call (and put back
    /// after), so a nested call on the same thread (rayon work stealing) just allocates its own.
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// One row to quantize: its codes, scale and zero point (outputs), and its values.
type RowJob<'a> = ((&'a mut [u8], (&'a mut f32, &'a mut i32)), &'a [f32]);

/// Everything a tile needs; outputs are raw pointers because tasks write disjoint parts concurrently.
struct Gemm<'a> {
    k_groups: usize,
    lda: usize,
    /// Quantized activations, `rows` rounded up to MR, times `lda`.
    a: &'a [u8],
    /// Packed weights.
    b: &'a [u8],
    row_scale: &'a [f32],
    row_zp: &'a [i32],
    col_scale: &'a [f32],
    col_sum: &'a [i32],
    bias: &'a [f32],
    rows: usize,
    n: usize,
    /// `rows × n` f32 outputs (dequantizing mode).
    out: *mut f32,
    /// `rows × n` raw i32 accumulators (RAW mode, for tests).
    raw: *mut i32,
}

// SAFETY: the raw pointers are only written through by tiles, and the driver gives each (row, column)
// to exactly one tile; everything else is shared read-only.
unsafe impl Sync for Gemm<'_> {}

impl QuantizedLinear {
    /// Quantizes a PyTorch-layout weight (`out_features × in_features`, row-major) per output channel
    /// and packs it for the GEMM. Fails on a length mismatch, a zero dimension, `in_features` above
    /// [`MAX_IN_FEATURES`], or a non-finite weight.
    pub fn quantize(weight: &[f32], out_features: usize, in_features: usize, bias: Option<&[f32]>) -> Result<Self> {
        if out_features == 0 || in_features == 0 {
            return Err(shape_error(
                "weight",
                format!("out_features and in_features must be positive, found {out_features} x {in_features}"),
            ));
        }
        if in_features > MAX_IN_FEATURES {
            return Err(shape_error(
                "weight",
                format!(
                    "in_features {in_features} exceeds {MAX_IN_FEATURES}, beyond which i32 accumulators could overflow"
                ),
            ));
        }
        let expected = out_features
            .checked_mul(in_features)
            .ok_or_else(|| shape_error("weight", format!("{out_features} x {in_features} overflows usize")))?;
        if weight.len() != expected {
            return Err(shape_error(
                "weight",
                format!("expected {expected} values ({out_features} x {in_features}), found {}", weight.len()),
            ));
        }
        if let Some(b) = bias {
            if b.len() != out_features {
                return Err(shape_error("bias", format!("expected {out_features} values, found {}", b.len())));
            }
        }
        if let Some(i) = weight.iter().position(|v| !v.is_finite()) {
            return Err(shape_error(
                "weight",
                format!(
                    "value at ({}, {}) is {}: only finite weights can be quantized",
                    i / in_features,
                    i % in_features,
                    weight[i]
                ),
            ));
        }

        let k_groups = in_features.div_ceil(KG);
        let n_panels = out_features.div_ceil(NR);
        let n_padded = n_panels * NR;
        let mut packed = AlignedBytes::zeroed(n_panels * k_groups * NR * KG);
        let mut scales = vec![0f32; n_padded];
        let mut col_sums = vec![0i32; n_padded];
        let mut bias_padded = vec![0f32; n_padded];
        if let Some(b) = bias {
            bias_padded[..out_features].copy_from_slice(b);
        }
        let bytes = packed.as_mut_slice();
        for (c, row) in weight.chunks_exact(in_features).enumerate() {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            if scale <= 0.0 {
                // All zeros (or so small that the scale underflows): codes 0, scale 0.
                continue;
            }
            scales[c] = scale;
            let (panel, j) = (c / NR, c % NR);
            let mut sum = 0i32;
            for (k, &v) in row.iter().enumerate() {
                let q = round_ties_even_small((v / scale).clamp(-127.0, 127.0)) as i32;
                sum += q;
                let (g, t) = (k / KG, k % KG);
                bytes[((panel * k_groups + g) * NR + j) * KG + t] = q as i8 as u8;
            }
            col_sums[c] = sum;
        }
        Ok(QuantizedLinear {
            out_features,
            in_features,
            k_groups,
            packed,
            scales,
            col_sums,
            bias: bias.map(<[f32]>::to_vec),
            bias_padded,
        })
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Per-output-channel weight scales (`max |w| / 127`; 0 for an all-zero channel).
    pub fn scales(&self) -> &[f32] {
        &self.scales[..self.out_features]
    }

    /// `Σ_k wq[c, k]` per output channel.
    pub fn col_sums(&self) -> &[i32] {
        &self.col_sums[..self.out_features]
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The int8 weight codes, unpacked to PyTorch's (out, in) row-major layout.
    pub fn quantized_weight(&self) -> Vec<i8> {
        let (n, k) = (self.out_features, self.in_features);
        let bytes = self.packed.as_slice();
        let mut w = vec![0i8; n * k];
        for c in 0..n {
            for kk in 0..k {
                let idx = (((c / NR) * self.k_groups + kk / KG) * NR + c % NR) * KG + kk % KG;
                w[c * k + kk] = bytes[idx] as i8;
            }
        }
        w
    }

    /// The weight the layer effectively multiplies by, `wq · scale_w`, (out, in) row-major.
    pub fn dequantized_weight(&self) -> Vec<f32> {
        let k = self.in_features;
        self.quantized_weight().iter().enumerate().map(|(i, &q)| q as f32 * self.scales[i / k]).collect()
    }

    /// `out = x Wᵀ + b` for `x` of `rows × in_features` (row-major) into `out` of `rows × out_features`,
    /// with the fastest kernel this CPU has, on rayon's current thread pool.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        self.forward_impl(cpu::features(), x, rows, out, &|_, _, _| {})
    }

    /// Like [`forward`](Self::forward), then `epilogue(row, first_column, values)` on each freshly
    /// written run of (at most [`NR`]) outputs of one row, while it is hot in L1: e.g. a fused GELU.
    /// Each output is passed exactly once; calls come from several threads in no particular order.
    pub fn forward_with<F>(&self, x: &[f32], rows: usize, out: &mut [f32], epilogue: F) -> Result<()>
    where
        F: Fn(usize, usize, &mut [f32]) + Sync,
    {
        self.forward_impl(cpu::features(), x, rows, out, &epilogue)
    }

    /// [`forward`](Self::forward) with the code `kernel` selects (AVX-512 VNNI where it has `avx512_vnni`;
    /// for benchmarks and tests); fails if this CPU lacks one of its features.
    pub fn forward_using(&self, kernel: CpuFeatures, x: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        kernel.check("QuantizedLinear")?;
        self.forward_impl(kernel, x, rows, out, &|_, _, _| {})
    }

    fn check_shapes(&self, x_len: usize, rows: usize, out_len: usize) -> Result<()> {
        let (k, n) = (self.in_features, self.out_features);
        let want_x =
            rows.checked_mul(k).ok_or_else(|| shape_error("input", format!("{rows} rows x {k} overflows usize")))?;
        if x_len != want_x {
            return Err(shape_error(
                "input",
                format!("expected {want_x} values ({rows} rows x {k} in_features), found {x_len}"),
            ));
        }
        let want_out =
            rows.checked_mul(n).ok_or_else(|| shape_error("output", format!("{rows} rows x {n} overflows usize")))?;
        if out_len != want_out {
            return Err(shape_error(
                "output",
                format!("expected {want_out} values ({rows} rows x {n} out_features), found {out_len}"),
            ));
        }
        Ok(())
    }

    fn forward_impl<F>(&self, kernel: CpuFeatures, x: &[f32], rows: usize, out: &mut [f32], epilogue: &F) -> Result<()>
    where
        F: Fn(usize, usize, &mut [f32]) + Sync,
    {
        self.check_shapes(x.len(), rows, out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let mut scratch = SCRATCH.with(Cell::take);
        self.quantize_activations(kernel, x, rows, &mut scratch);
        let g = self.gemm_args(&scratch, rows, out.as_mut_ptr(), std::ptr::null_mut());
        self.run::<false, F>(kernel, &g, epilogue);
        if scratch.codes.capacity_bytes() <= SCRATCH_KEEP_BYTES {
            SCRATCH.with(|s| s.set(scratch));
        }
        Ok(())
    }

    /// Row stride of the quantized activations: `in_features` rounded up to a cache line.
    fn lda(&self) -> usize {
        self.in_features.next_multiple_of(64)
    }

    fn quantize_activations(&self, kernel: CpuFeatures, x: &[f32], rows: usize, s: &mut Scratch) {
        let (k, lda) = (self.in_features, self.lda());
        let rows_padded = rows.next_multiple_of(MR);
        s.codes.ensure(rows_padded * lda);
        s.scale.clear();
        s.scale.resize(rows_padded, 0.0);
        s.zp.clear();
        s.zp.resize(rows_padded, 0);
        let codes = s.codes.as_mut_slice();
        codes[rows * lda..].fill(0);
        let (codes, scale, zp) = (&mut codes[..rows * lda], &mut s.scale[..rows], &mut s.zp[..rows]);
        let one_row = |((dst, (sc, z)), src): RowJob<'_>| {
            (*sc, *z) = quantize_row(kernel, src, dst);
        };
        if rows * k >= 1 << 18 && rayon::current_num_threads() > 1 {
            codes
                .par_chunks_mut(lda)
                .zip(scale.par_iter_mut().zip(zp.par_iter_mut()))
                .zip(x.par_chunks(k))
                .with_min_len((16384 / k).max(1))
                .for_each(one_row);
        } else {
            codes.chunks_mut(lda).zip(scale.iter_mut().zip(zp.iter_mut())).zip(x.chunks(k)).for_each(one_row);
        }
    }

    fn gemm_args<'a>(&'a self, s: &'a Scratch, rows: usize, out: *mut f32, raw: *mut i32) -> Gemm<'a> {
        Gemm {
            k_groups: self.k_groups,
            lda: self.lda(),
            a: s.codes.as_slice(),
            b: self.packed.as_slice(),
            row_scale: &s.scale,
            row_zp: &s.zp,
            col_scale: &self.scales,
            col_sum: &self.col_sums,
            bias: &self.bias_padded,
            rows,
            n: self.out_features,
            out,
            raw,
        }
    }

    /// Runs every (row panel, weight panel) tile, in parallel on rayon's current pool when worthwhile.
    fn run<const RAW: bool, F>(&self, kernel: CpuFeatures, g: &Gemm<'_>, epilogue: &F)
    where
        F: Fn(usize, usize, &mut [f32]) + Sync,
    {
        let m_panels = g.rows.div_ceil(MR);
        let n_panels = self.out_features.div_ceil(NR);
        // Row panels per M block: the block's activations stay in L2 while the weight panels stream by.
        // Blocks of (nearly) equal size, so that no task is a sliver.
        let m_blocks = m_panels.div_ceil((A_BLOCK_BYTES / (MR * g.lda)).clamp(1, m_panels));
        let mc = m_panels.div_ceil(m_blocks);
        let task = |mb: usize, p0: usize, p1: usize| {
            for panel in p0..p1 {
                for mp in mb * mc..((mb + 1) * mc).min(m_panels) {
                    tile::<RAW>(kernel, g, mp * MR, panel);
                    if !RAW {
                        let (c0, c1) = (panel * NR, ((panel + 1) * NR).min(g.n));
                        for r in mp * MR..((mp + 1) * MR).min(g.rows) {
                            // SAFETY: row r, columns c0..c1 lie inside the rows × n output and belong to
                            // this tile alone, which has just written them; no other reference exists.
                            let values = unsafe { std::slice::from_raw_parts_mut(g.out.add(r * g.n + c0), c1 - c0) };
                            epilogue(r, c0, values);
                        }
                    }
                }
            }
        };
        let parallel = g.rows * g.n * g.k_groups * KG >= PARALLEL_MIN_MACS;
        crate::kernels::for_each_panel_run(m_blocks, n_panels, parallel, task);
    }

    /// The quantized activations and the raw i32 accumulators `Σ_k xq[r, k] · wq[c, k]` (rows × out,
    /// row-major) with the given kernel, plus the per-row scales and zero points: for tests.
    #[cfg(test)]
    fn accumulators(&self, kernel: CpuFeatures, x: &[f32], rows: usize) -> (Vec<u8>, Vec<i32>, Vec<f32>, Vec<i32>) {
        let mut s = Scratch::default();
        self.quantize_activations(kernel, x, rows, &mut s);
        let mut acc = vec![0i32; rows * self.out_features];
        let g = self.gemm_args(&s, rows, std::ptr::null_mut(), acc.as_mut_ptr());
        self.run::<true, _>(kernel, &g, &|_, _, _| {});
        let lda = self.lda();
        let codes = (0..rows).flat_map(|r| s.codes.as_slice()[r * lda..r * lda + self.in_features].to_vec()).collect();
        (codes, acc, s.scale[..rows].to_vec(), s.zp[..rows].to_vec())
    }
}

/// Scale and zero point for a finite row whose values lie in `[min, max]` (with `min ≤ 0 ≤ max`), or None
/// when the range is too small to quantize (all zeros, or a scale that would be subnormal).
fn row_params(min: f32, max: f32) -> Option<(f32, i32)> {
    let scale = max / 255.0 - min / 255.0;
    // Finite min and max give a finite, non-negative scale.
    if scale < f32::MIN_POSITIVE {
        return None;
    }
    let zp = (-min / scale).round_ties_even().clamp(0.0, 255.0) as i32;
    Some((scale, zp))
}

/// Quantizes one row of `x` into `dst` (`dst.len() >= x.len()`, the rest is zeroed); returns its scale
/// (0 for an all-zero row, NaN for a row with a non-finite value) and zero point.
fn quantize_row(kernel: CpuFeatures, x: &[f32], dst: &mut [u8]) -> (f32, i32) {
    match kernel.avx512_vnni {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked (CpuFeatures::check) that the CPU has AVX-512 with VNNI.
        true => unsafe { quantize_row_avx512(x, dst) },
        _ => quantize_row_portable(x, dst),
    }
}

fn quantize_value(v: f32, scale: f32, zp: i32) -> u8 {
    ((v / scale).round_ties_even() as i32 + zp).clamp(0, 255) as u8
}

fn quantize_row_portable(x: &[f32], dst: &mut [u8]) -> (f32, i32) {
    let (mut min, mut max, mut finite) = (0f32, 0f32, true);
    for &v in x {
        finite &= v.is_finite();
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    let params = if finite { row_params(min, max) } else { None };
    let Some((scale, zp)) = params else {
        dst.fill(0);
        return (if finite { 0.0 } else { f32::NAN }, 0);
    };
    for (d, &v) in dst.iter_mut().zip(x) {
        *d = quantize_value(v, scale, zp);
    }
    dst[x.len()..].fill(0);
    (scale, zp)
}

/// # Safety
/// The CPU must support AVX-512 F and BW, and `dst.len() >= x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[deny(unsafe_op_in_unsafe_fn)]
unsafe fn quantize_row_avx512(x: &[f32], dst: &mut [u8]) -> (f32, i32) {
    let n = x.len();
    assert!(dst.len() >= n, "quantize_row_avx512: destination shorter than the row");
    let p = x.as_ptr();
    let zero = _mm512_setzero_ps();
    let (mut vmin, mut vmax) = (zero, zero);
    let mut finite: __mmask16 = 0xFFFF;
    let mut i = 0;
    while i < n {
        let mask = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: the mask covers only lanes i..n of x; masked-off lanes read as 0, which is in range.
        let v = unsafe { _mm512_maskz_loadu_ps(mask, p.add(i)) };
        // v - v is 0 for finite v and NaN for ±inf or NaN.
        finite &= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(v, v), zero);
        vmin = _mm512_min_ps(vmin, v);
        vmax = _mm512_max_ps(vmax, v);
        i += 16;
    }
    let params =
        if finite == 0xFFFF { row_params(_mm512_reduce_min_ps(vmin), _mm512_reduce_max_ps(vmax)) } else { None };
    let Some((scale, zp)) = params else {
        dst.fill(0);
        return (if finite == 0xFFFF { 0.0 } else { f32::NAN }, 0);
    };
    let (vs, vzp) = (_mm512_set1_ps(scale), _mm512_set1_epi32(zp));
    let (lo, hi) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
    let d = dst.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let mask = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: masked to lanes i..n of x.
        let v = unsafe { _mm512_maskz_loadu_ps(mask, p.add(i)) };
        let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_div_ps(v, vs));
        let q = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, vzp), lo), hi);
        // SAFETY: masked to bytes i..n of dst, and dst.len() >= n.
        unsafe { _mm512_mask_cvtepi32_storeu_epi8(d.add(i).cast(), mask, q) };
        i += 16;
    }
    dst[n..].fill(0);
    (scale, zp)
}

#[inline]
fn tile<const RAW: bool>(kernel: CpuFeatures, g: &Gemm<'_>, row0: usize, panel: usize) {
    match kernel.avx512_vnni {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU has AVX-512 F, BW and VNNI; row0 and panel are in range.
        true => unsafe { tile_vnni::<RAW>(g, row0, panel) },
        _ => tile_portable::<RAW>(g, row0, panel),
    }
}

/// One output from its accumulator: the portable kernel's epilogue (the VNNI kernel does the same f32
/// operations, in the same order, on vectors).
#[inline(always)]
fn dequantize(g: &Gemm<'_>, r: usize, c: usize, acc: i32) -> f32 {
    let corr = acc.wrapping_sub(g.row_zp[r].wrapping_mul(g.col_sum[c]));
    corr as f32 * (g.row_scale[r] * g.col_scale[c]) + g.bias[c]
}

fn tile_portable<const RAW: bool>(g: &Gemm<'_>, row0: usize, panel: usize) {
    let mut acc = [[0i32; NR]; MR];
    let panel_bytes = g.k_groups * NR * KG;
    let b = &g.b[panel * panel_bytes..][..panel_bytes];
    for (kg, bk) in b.chunks_exact(NR * KG).enumerate() {
        for (i, acc_row) in acc.iter_mut().enumerate() {
            let a4 = &g.a[(row0 + i) * g.lda + kg * KG..][..KG];
            for (acc, w4) in acc_row.iter_mut().zip(bk.chunks_exact(KG)) {
                let mut s = 0i32;
                for t in 0..KG {
                    s += a4[t] as i32 * w4[t] as i8 as i32;
                }
                *acc += s;
            }
        }
    }
    let c0 = panel * NR;
    let cols = NR.min(g.n - c0);
    for (i, acc_row) in acc.iter().enumerate().take(g.rows.saturating_sub(row0).min(MR)) {
        let r = row0 + i;
        for (j, &a) in acc_row[..cols].iter().enumerate() {
            // SAFETY: r < rows and c0 + j < n, inside the rows × n buffer; only this tile writes there.
            unsafe {
                if RAW {
                    *g.raw.add(r * g.n + c0 + j) = a;
                } else {
                    *g.out.add(r * g.n + c0 + j) = dequantize(g, r, c0 + j, a);
                }
            }
        }
    }
}

/// The AVX-512 VNNI microkernel: one MR × NR tile over the whole K, then its dequantization.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI; `row0 + MR` rows of `g.a` and panel `panel` of `g.b` must
/// exist (the driver only passes tiles of the padded buffers), and `g.out` (or `g.raw` when RAW) must
/// point to `rows × n` writable values that no one else accesses in this tile's rows and columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[deny(unsafe_op_in_unsafe_fn)]
unsafe fn tile_vnni<const RAW: bool>(g: &Gemm<'_>, row0: usize, panel: usize) {
    let lda = g.lda;
    let panel_bytes = g.k_groups * NR * KG;
    let a_tile = &g.a[row0 * lda..][..MR * lda];
    let b_panel = &g.b[panel * panel_bytes..][..panel_bytes];
    let (mut a, mut b) = (a_tile.as_ptr(), b_panel.as_ptr());
    let c0 = panel * NR;
    let rows_here = g.rows.saturating_sub(row0).min(MR);
    // The tile's output lines are requested for writing during the K loop, one every 4 groups, so that
    // the stores at the end do not wait on memory (a large output, e.g. 1576 × 3072 f32, does not stay
    // in cache between calls) and the requests never crowd out the loads of A and B.
    let prefetches = if RAW { 0 } else { rows_here * NV };
    let last_col = g.n - 1;
    let mut acc = [[_mm512_setzero_si512(); NV]; MR];
    for kg in 0..g.k_groups {
        if kg % 4 == 0 && kg / 4 < prefetches {
            let (i, j) = (kg / 4 / NV, kg / 4 % NV);
            let at = (row0 + i) * g.n + (c0 + 16 * j).min(last_col);
            // Prefetching never faults; wrapping_add keeps the address computation itself defined.
            _mm_prefetch::<_MM_HINT_ET0>(g.out.wrapping_add(at).cast::<i8>());
        }
        let mut w = [_mm512_setzero_si512(); NV];
        for (j, wj) in w.iter_mut().enumerate() {
            // SAFETY: `b` steps through b_panel, NR·4 = 64·NV bytes per group of four input features.
            *wj = unsafe { _mm512_loadu_si512(b.add(64 * j).cast()) };
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: `a` steps 4 bytes per group through the first 4·k_groups <= lda bytes of a_tile's rows.
            let x4 = _mm512_set1_epi32(unsafe { a.add(i * lda).cast::<i32>().read_unaligned() });
            for j in 0..NV {
                acc_row[j] = _mm512_dpbusd_epi32(acc_row[j], x4, w[j]);
            }
        }
        // SAFETY: at most one past the end of the bytes read above (wrapping_add would do as well).
        (a, b) = unsafe { (a.add(KG), b.add(NR * KG)) };
    }

    for (i, acc_row) in acc.iter().enumerate() {
        if i >= rows_here {
            break;
        }
        let r = row0 + i;
        let (sx, zp) = (_mm512_set1_ps(g.row_scale[r]), _mm512_set1_epi32(g.row_zp[r]));
        for (j, &acc) in acc_row.iter().enumerate() {
            let c = c0 + 16 * j;
            if c >= g.n {
                break;
            }
            let mask: __mmask16 = if g.n - c >= 16 { 0xFFFF } else { ((1u32 << (g.n - c)) - 1) as __mmask16 };
            let out_at = r * g.n + c;
            if RAW {
                // SAFETY: masked to columns c..min(c + 16, n) of row r < rows of the rows × n buffer,
                // which the caller reserves to this tile.
                unsafe { _mm512_mask_storeu_epi32(g.raw.add(out_at), mask, acc) };
                continue;
            }
            // Column data is padded to whole panels, so these 16 lanes from c exist.
            let cs = &g.col_sum[c..c + 16];
            let (sw, bias) = (&g.col_scale[c..c + 16], &g.bias[c..c + 16]);
            // SAFETY: each slice above holds exactly 16 values.
            let (cs, sw, bias) = unsafe {
                (_mm512_loadu_si512(cs.as_ptr().cast()), _mm512_loadu_ps(sw.as_ptr()), _mm512_loadu_ps(bias.as_ptr()))
            };
            let corr = _mm512_sub_epi32(acc, _mm512_mullo_epi32(zp, cs));
            let f = _mm512_cvt_roundepi32_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(corr);
            let y = _mm512_add_ps(_mm512_mul_ps(f, _mm512_mul_ps(sx, sw)), bias);
            // SAFETY: as for the RAW store (a full mask writes exactly the 16 masked lanes).
            unsafe {
                if mask == 0xFFFF {
                    _mm512_storeu_ps(g.out.add(out_at), y);
                } else {
                    _mm512_mask_storeu_ps(g.out.add(out_at), mask, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;


    fn kernels() -> Vec<CpuFeatures> {
        cpu::variants()
    }

    /// Σ_k codes[r, k] · wq[c, k], straight from the definition (no packing, no tiles).
    fn reference_acc(codes: &[u8], wq: &[i8], rows: usize, k: usize, n: usize) -> Vec<i32> {
        let mut acc = vec![0i32; rows * n];
        for r in 0..rows {
            let a = &codes[r * k..][..k];
            for c in 0..n {
                let w = &wq[c * k..][..k];
                acc[r * n + c] = a.iter().zip(w).map(|(&a, &w)| a as i32 * w as i32).sum();
            }
        }
        acc
    }

    fn run(q: &QuantizedLinear, kernel: CpuFeatures, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * q.out_features()];
        q.forward_using(kernel, x, rows, &mut out).unwrap();
        out
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn vnni_accumulators_equal_scalar_reference_on_odd_shapes() {
        let mut rng = crate::rng::Rng::new(1);
        for &n in &[1usize, 17, 768, 2304] {
            for &k in &[4usize, 12, 768, 770] {
                let w = rng.symmetric_f32(n * k, 0.1);
                let bias = rng.symmetric_f32(n, 0.1);
                let q = QuantizedLinear::quantize(&w, n, k, Some(&bias)).unwrap();
                let wq = q.quantized_weight();
                for &rows in &[1usize, 3, 197, 200] {
                    // Shifted so that rows have different minima, maxima and zero points.
                    let x: Vec<f32> = rng
                        .symmetric_f32(rows * k, 2.0)
                        .iter()
                        .enumerate()
                        .map(|(i, v)| v + ((i / k) % 5) as f32 * 0.3)
                        .collect();
                    let mut outputs = Vec::new();
                    let mut portable_codes = None;
                    for kernel in kernels() {
                        let (codes, acc, _, _) = q.accumulators(kernel, &x, rows);
                        let want = reference_acc(&codes, &wq, rows, k, n);
                        assert!(
                            acc == want,
                            "{kernel:?}: accumulators differ from the reference at rows {rows}, K {k}, N {n}"
                        );
                        // Both kernels quantize the activations identically.
                        match &portable_codes {
                            None => portable_codes = Some(codes),
                            Some(p) => assert!(p == &codes, "activation codes differ at rows {rows}, K {k}, N {n}"),
                        }
                        outputs.push(run(&q, kernel, &x, rows));
                    }
                    // And dequantize to bit-identical f32.
                    assert!(
                        outputs.windows(2).all(|w| same_bits(&w[0], &w[1])),
                        "outputs differ at rows {rows}, K {k}, N {n}"
                    );
                }
            }
        }
    }

    /// Derivation: with x̂ = scale_x·(xq - zp) and ŵ = scale_w·wq the values the GEMM multiplies,
    /// round-to-nearest gives |x - x̂| ≤ scale_x/2 and |w - ŵ| ≤ scale_w/2 (clamping never moves a
    /// value inside [min, max] further than half a step). Since x·w - x̂·ŵ = (x - x̂)·w + x̂·(w - ŵ),
    ///     |y - ŷ| ≤ Σ_k (scale_x/2·|w_k| + |x̂_k|·scale_w/2),
    /// the integer part is exact, and the remaining f32 roundings (i32→f32, the scale products, the
    /// bias add, the division in the quantizer) are a few ulp: covered by a 1e-3 relative margin on the
    /// bound plus 1e-6·(Σ_k |x_k·w_k| + |b|). The reference is computed in f64.
    #[test]
    fn output_is_within_the_quantization_error_bound() {
        let mut rng = crate::rng::Rng::new(2);
        for &(rows, k, n) in &[(197usize, 768usize, 768usize), (3, 770, 17), (200, 12, 2304), (9, 3072, 50)] {
            let w = rng.symmetric_f32(n * k, 0.05);
            let bias = rng.symmetric_f32(n, 0.5);
            let mut x = rng.symmetric_f32(rows * k, 3.0);
            // A row of only positive values (zero point 0) and one of only negative values (zero point 255).
            x[..k].iter_mut().for_each(|v| *v = v.abs() + 0.5);
            if rows > 1 {
                x[k..2 * k].iter_mut().for_each(|v| *v = -v.abs() - 0.5);
            }
            let q = QuantizedLinear::quantize(&w, n, k, Some(&bias)).unwrap();
            let (sw, wq) = (q.scales(), q.quantized_weight());
            for kernel in kernels() {
                let (codes, _, sx, zp) = q.accumulators(kernel, &x, rows);
                let out = run(&q, kernel, &x, rows);
                let (mut err_sum, mut bound_sum) = (0f64, 0f64);
                for r in 0..rows {
                    for c in 0..n {
                        let (mut exact, mut bound, mut mag) = (bias[c] as f64, 0f64, bias[c].abs() as f64);
                        for kk in 0..k {
                            let (xv, wv) = (x[r * k + kk] as f64, w[c * k + kk] as f64);
                            let xh = sx[r] as f64 * (codes[r * k + kk] as f64 - zp[r] as f64);
                            assert!((xv - xh).abs() <= sx[r] as f64 * 0.5001, "activation error above half a step");
                            let wh = sw[c] as f64 * wq[c * k + kk] as f64;
                            assert!((wv - wh).abs() <= sw[c] as f64 * 0.5001, "weight error above half a step");
                            exact += xv * wv;
                            bound += sx[r] as f64 / 2.0 * wv.abs() + xh.abs() * sw[c] as f64 / 2.0;
                            mag += (xv * wv).abs();
                        }
                        let err = (out[r * n + c] as f64 - exact).abs();
                        let tol = bound * 1.001 + 1e-6 * mag;
                        assert!(err <= tol, "{kernel:?} ({rows}, {k}, {n}) at [{r}, {c}]: error {err} > bound {tol}");
                        err_sum += err;
                        bound_sum += bound;
                    }
                }
                // The bound is a worst case; the typical error is far below it (the errors are not
                // correlated), so a kernel that lost half its precision would still be caught here.
                assert!(err_sum < 0.25 * bound_sum, "mean error {err_sum} vs mean bound {bound_sum}");
            }
        }
    }

    #[test]
    fn weight_codes_are_symmetric_per_channel() {
        let mut rng = crate::rng::Rng::new(3);
        let (n, k) = (37, 50);
        let w = rng.symmetric_f32(n * k, 1.0);
        let q = QuantizedLinear::quantize(&w, n, k, None).unwrap();
        let wq = q.quantized_weight();
        for c in 0..n {
            let amax = w[c * k..][..k].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.scales()[c], amax / 127.0);
            let codes = &wq[c * k..][..k];
            assert!(codes.iter().all(|&v| (-127..=127).contains(&v)));
            assert_eq!(codes.iter().map(|v| v.unsigned_abs()).max(), Some(127));
            assert_eq!(q.col_sums()[c], codes.iter().map(|&v| v as i32).sum::<i32>());
        }
        assert!(q.bias().is_none());
    }

    #[test]
    fn all_zero_weight_row_has_scale_zero_and_outputs_the_bias() {
        let mut rng = crate::rng::Rng::new(4);
        let (rows, n, k) = (5, 20, 33);
        let mut w = rng.symmetric_f32(n * k, 1.0);
        w[7 * k..8 * k].fill(0.0);
        // So small that max/127 underflows to 0 as well.
        w[9 * k..10 * k].fill(0.0);
        w[9 * k + 3] = f32::from_bits(1);
        let bias = rng.symmetric_f32(n, 1.0);
        let q = QuantizedLinear::quantize(&w, n, k, Some(&bias)).unwrap();
        assert_eq!(q.scales()[7], 0.0);
        assert_eq!(q.scales()[9], 0.0);
        let x = rng.symmetric_f32(rows * k, 1.0);
        for kernel in kernels() {
            let out = run(&q, kernel, &x, rows);
            assert!(out.iter().all(|v| v.is_finite()));
            for r in 0..rows {
                assert_eq!(out[r * n + 7], bias[7]);
                assert_eq!(out[r * n + 9], bias[9]);
            }
        }
    }

    #[test]
    fn all_zero_input_row_outputs_the_bias() {
        let mut rng = crate::rng::Rng::new(5);
        let (rows, n, k) = (3, 50, 40);
        let q = QuantizedLinear::quantize(&rng.symmetric_f32(n * k, 1.0), n, k, Some(&rng.symmetric_f32(n, 1.0))).unwrap();
        let mut x = rng.symmetric_f32(rows * k, 1.0);
        x[k..2 * k].fill(0.0);
        for kernel in kernels() {
            let out = run(&q, kernel, &x, rows);
            assert_eq!(&out[n..2 * n], q.bias().unwrap());
            let (_, _, sx, zp) = q.accumulators(kernel, &x, rows);
            assert_eq!((sx[1], zp[1]), (0.0, 0));
        }
    }

    /// A row holding NaN, +inf or -inf comes out as a row of NaN (scale NaN), whatever the weights;
    /// the other rows are exactly what they are without it.
    #[test]
    fn non_finite_input_rows_become_nan_rows() {
        let mut rng = crate::rng::Rng::new(6);
        let (rows, n, k) = (6, 70, 45);
        let q = QuantizedLinear::quantize(&rng.symmetric_f32(n * k, 1.0), n, k, Some(&rng.symmetric_f32(n, 1.0))).unwrap();
        let x = rng.symmetric_f32(rows * k, 1.0);
        let mut bad = x.clone();
        bad[k + 3] = f32::NAN;
        bad[3 * k + 44] = f32::INFINITY;
        bad[4 * k] = f32::NEG_INFINITY;
        for kernel in kernels() {
            let clean = run(&q, kernel, &x, rows);
            let out = run(&q, kernel, &bad, rows);
            for r in 0..rows {
                let (got, want) = (&out[r * n..][..n], &clean[r * n..][..n]);
                if [1, 3, 4].contains(&r) {
                    assert!(got.iter().all(|v| v.is_nan()), "{kernel:?}: row {r} should be NaN");
                } else {
                    assert!(same_bits(got, want), "{kernel:?}: row {r} changed");
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = crate::rng::Rng::new(7);
        let (rows, n, k) = (197, 800, 200);
        let q = QuantizedLinear::quantize(&rng.symmetric_f32(n * k, 1.0), n, k, Some(&rng.symmetric_f32(n, 1.0))).unwrap();
        let x = rng.symmetric_f32(rows * k, 1.0);
        for kernel in kernels() {
            let one =
                crate::kernels::on_threads(1, || run(&q, kernel, &x, rows));
            let three =
                crate::kernels::on_threads(3, || run(&q, kernel, &x, rows));
            assert!(same_bits(&one, &three));
        }
    }

    #[test]
    fn concurrent_and_nested_calls_agree() {
        let mut rng = crate::rng::Rng::new(8);
        let (rows, n, k) = (64, 300, 256);
        let q = QuantizedLinear::quantize(&rng.symmetric_f32(n * k, 1.0), n, k, None).unwrap();
        let inputs: Vec<Vec<f32>> = (0..6).map(|_| rng.symmetric_f32(rows * k, 1.0)).collect();
        let serial: Vec<Vec<f32>> = inputs.iter().map(|x| run(&q, cpu::features(), x, rows)).collect();
        // Each call runs inside a rayon task and itself fans out on the same pool.
        let parallel: Vec<Vec<f32>> = inputs.par_iter().map(|x| run(&q, cpu::features(), x, rows)).collect();
        for (a, b) in serial.iter().zip(&parallel) {
            assert!(same_bits(a, b));
        }
    }

    #[test]
    fn epilogue_sees_every_output_once() {
        let mut rng = crate::rng::Rng::new(9);
        let (rows, n, k) = (203, 1000, 64);
        let q = QuantizedLinear::quantize(&rng.symmetric_f32(n * k, 1.0), n, k, Some(&rng.symmetric_f32(n, 1.0))).unwrap();
        let x = rng.symmetric_f32(rows * k, 1.0);
        let mut plain = vec![0f32; rows * n];
        q.forward(&x, rows, &mut plain).unwrap();
        let seen = std::sync::Mutex::new(vec![0u8; rows * n]);
        let mut fused = vec![0f32; rows * n];
        q.forward_with(&x, rows, &mut fused, |r, c0, values| {
            assert!(values.len() <= NR && c0 + values.len() <= n);
            let mut s = seen.lock().unwrap();
            for (j, v) in values.iter_mut().enumerate() {
                s[r * n + c0 + j] += 1;
                *v = v.max(0.0) * 2.0;
            }
        })
        .unwrap();
        assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1));
        let want: Vec<f32> = plain.iter().map(|v| v.max(0.0) * 2.0).collect();
        assert!(same_bits(&fused, &want));
    }

    #[test]
    fn bad_shapes_are_errors_that_name_the_lengths() {
        let msg = |r: Result<QuantizedLinear>| r.unwrap_err().to_string();
        let w = vec![0.5f32; 12];
        assert!(msg(QuantizedLinear::quantize(&w, 3, 5, None)).contains("expected 15 values (3 x 5), found 12"));
        assert!(msg(QuantizedLinear::quantize(&w, 3, 4, Some(&[1.0; 2]))).contains("expected 3 values, found 2"));
        assert!(msg(QuantizedLinear::quantize(&[], 0, 4, None)).contains("positive"));
        assert!(msg(QuantizedLinear::quantize(&w, 1, MAX_IN_FEATURES + 1, None)).contains("exceeds"));
        let mut nan = w.clone();
        nan[6] = f32::NAN;
        assert!(msg(QuantizedLinear::quantize(&nan, 3, 4, None)).contains("(1, 2) is NaN"));

        let q = QuantizedLinear::quantize(&w, 3, 4, None).unwrap();
        let mut out = vec![0f32; 6];
        let e = q.forward(&[0.0; 7], 2, &mut out).unwrap_err().to_string();
        assert!(e.contains("expected 8 values (2 rows x 4 in_features), found 7"), "{e}");
        let e = q.forward(&[0.0; 8], 2, &mut out[..5]).unwrap_err().to_string();
        assert!(e.contains("expected 6 values (2 rows x 3 out_features), found 5"), "{e}");
        assert!(q.forward(&[0.0; 4], usize::MAX, &mut out).is_err());
        // Zero rows is a no-op.
        q.forward(&[], 0, &mut []).unwrap();
    }
}

/// Timing probes for tuning the kernel (ignored by default; the comparison with f32 is the `int8_gemm`
/// example). `cargo test --release -p beit --lib probe -- --ignored --nocapture --test-threads 1`, with
/// `PROBE_THREADS=2` for the GEMM on two threads. Each number is the best ~1 ms batch, to see through a
/// busy neighbour.
#[cfg(test)]
mod perf_probe {
    use super::*;
    use std::time::Instant;

    /// Seconds per call of f: the minimum over `batches` batches of calls lasting about 1 ms each.
    fn min_time(batches: usize, mut f: impl FnMut()) -> f64 {
        let t = Instant::now();
        f();
        let one = t.elapsed().as_secs_f64().max(1e-7);
        let per = ((1e-3 / one) as usize).max(1);
        (0..batches)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..per {
                    f();
                }
                t.elapsed().as_secs_f64() / per as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// One microkernel tile on the same data over and over: the kernel's own ceiling, including its
    /// epilogue, with the data in L1 (K = 256) or streaming from L2 (K = 768, 3072).
    #[test]
    #[ignore]
    fn tile_probe() {
        // One tile, repeated: data in L1 (K=256: A 2 KB + B 12 KB) or not (K=768: B 36 KB; K=3072: 147 KB).
        for &k in &[256usize, 768, 3072] {
            let (rows, n) = (8usize, 48usize);
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 104729 % 2000) as f32 - 900.0) * 1e-3).collect();
            let q = QuantizedLinear::quantize(&w, n, k, None).unwrap();
            let mut s = Scratch::default();
            let mut out = vec![0f32; rows * n];
            q.quantize_activations(cpu::hardware(), &x, rows, &mut s);
            let g = q.gemm_args(&s, rows, out.as_mut_ptr(), std::ptr::null_mut());
            let t = min_time(300, || unsafe { tile_vnni::<false>(&g, 0, 0) });
            println!("tile K={k:5}: {:6.1} G/s", 2.0 * (rows * n * k) as f64 / t / 1e9);
        }
    }

    const PROBE_SHAPES: [(usize, usize, usize); 8] = [
        (197, 768, 768),
        (197, 768, 3072),
        (197, 3072, 768),
        (1576, 768, 768),
        (1576, 768, 3072),
        (1576, 3072, 768),
        (800, 768, 3072),
        (400, 768, 3072),
    ];

    /// Activation quantization, the GEMM alone, and the whole forward, on BEiT-base shapes.
    #[test]
    #[ignore]
    fn perf_probe() {
        let kernel = cpu::features();
        let threads: usize = std::env::var("PROBE_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            for &(rows, k, n) in &PROBE_SHAPES {
                let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
                let x: Vec<f32> = (0..rows * k).map(|i| ((i * 104729 % 2000) as f32 - 900.0) * 1e-3).collect();
                let q = QuantizedLinear::quantize(&w, n, k, None).unwrap();
                let mut s = Scratch::default();
                let mut out = vec![0f32; rows * n];
                q.quantize_activations(kernel, &x, rows, &mut s);
                let batches = if rows > 1000 { 30 } else { 100 };
                let tq = min_time(batches, || q.quantize_activations(kernel, &x, rows, &mut s));
                let tf = min_time(batches, || q.forward(&x, rows, &mut out).unwrap());
                let tg = min_time(batches, || {
                    let g = q.gemm_args(&s, rows, out.as_mut_ptr(), std::ptr::null_mut());
                    q.run::<false, _>(kernel, &g, &|_, _, _| {});
                });
                let ops = 2.0 * (rows * n * k) as f64;
                println!(
                    "{rows:5} x {k:5} x {n:5}: quantize {:7.3} ms  gemm {:7.3} ms = {:6.1} G/s  forward {:7.3} ms = {:6.1} G/s",
                    tq * 1e3,
                    tg * 1e3,
                    ops / tg / 1e9,
                    tf * 1e3,
                    ops / tf / 1e9
                );
            }
        });
    }
}
