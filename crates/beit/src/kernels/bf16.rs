//! bf16 Linear layers: bf16 weights and activations, f32 accumulation (`vdpbf16ps`).
//!
//! - **Weights** (once, at load time): rounded to bf16 (round to nearest, ties to even, as torch's
//!   `float → bfloat16`) and packed into panels of [`NR`] = 48 output channels: `[N/48][K/2][48][2]`
//!   u16, i.e. for each pair of input features 48 channels × 2 consecutive weights (three zmm registers
//!   of 16 channels × 2 bf16, the operand `vdpbf16ps` wants). `K` is padded to even and `N` to a whole
//!   panel with zeros.
//! - **Activations** (every call): rounded to bf16 the same way as they are copied into a row-major
//!   buffer (row stride padded to 64 bytes, rows padded to [`MR`]) kept per thread between calls.
//! - **GEMM**: `out[r, c] = acc[r, c] + bias[c]`, with `acc` summed over the K pairs in order, each pair
//!   as `vdpbf16ps` does it (Intel's pseudo-code, checked against the instruction on an AMD Zen 5):
//!   `acc = ftz(acc + a[2i+1]·b[2i+1])`, then `acc = ftz(acc + a[2i]·b[2i])`, each product exact and each
//!   sum rounded once to f32 (to nearest even), a subnormal sum flushed to a zero of its sign.
//!
//! Subnormal bf16 values are stored as zeros of their sign: the instruction treats them as zero anyway,
//! and the portable code then needs no check on its inputs. A NaN input stays NaN (quieted), and an output
//! that is NaN is written as the canonical `f32::NAN`: the instruction's choice among several NaN
//! payloads is not worth emulating, and with it every output of the two kernels has the same bits.
//!
//! # Kernels
//!
//! The AVX-512 BF16 microkernel computes an [`MR`] × [`NR`] = 8 × 48 tile in 24 zmm accumulators over the
//! whole K: per pair of input features it loads three weight vectors and broadcasts one dword (2 bf16) of
//! each of the 8 rows, 24 `vdpbf16ps`. The bias (and an optional caller epilogue, e.g. GELU) is applied
//! while the tile is in registers / L1. The portable code runs the same tiles in plain Rust and gives the
//! same bits: the sum of an f32 and an exact bf16 product is computed in f64 (exact, or off by far less
//! than an f32 rounding can see) and rounded to f32 once. Both round activations with the same integer
//! arithmetic. Tasks (an M block whose activations fit in L2, times a run of weight panels) run on
//! rayon's current pool; each output is computed by one task in a fixed order, so results do not depend
//! on the thread count.

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
/// Input features per `vdpbf16ps` lane.
const KG: usize = 2;
/// Bytes of bf16 activations per M block: they stay in L2 alongside the weight panel being multiplied.
const A_BLOCK_BYTES: usize = 512 * 1024;
/// Below this many multiply-adds a call runs on the calling thread: rayon's overhead would dominate.
const PARALLEL_MIN_MACS: usize = 1 << 21;
/// Per-thread activation scratch larger than this is freed after the call instead of kept.
const SCRATCH_KEEP_BYTES: usize = 32 << 20;

/// `x` rounded to bf16 as torch rounds `float → bfloat16` (to nearest, ties to even; NaN stays a quiet
/// NaN), with a subnormal result stored as a zero of its sign (see the module documentation).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let r = if b & 0x7fff_ffff > 0x7f80_0000 { (b >> 16) | 0x40 } else { rounded };
    (if r & 0x7f80 == 0 { r & 0x8000 } else { r }) as u16
}

/// Whether `x` is NaN or infinite in bf16: NaN, ±∞, or a magnitude of at least 0x7F7F8000, the tie between the
/// largest bf16 (odd mantissa) and ∞, which rounds to ∞. `!from_bf16(to_bf16(x)).is_finite()` in one comparison.
#[inline(always)]
pub fn rounds_to_non_finite(x: f32) -> bool {
    x.to_bits() & 0x7fff_ffff >= 0x7f7f_8000
}

/// The f32 a bf16 stands for.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `acc + a · b` as one step of `vdpbf16ps`: the product exact, the sum rounded once, a subnormal sum
/// flushed to zero. `a` and `b` are never subnormal here (packing flushes them), and `acc` is a previous
/// step's result, so the instruction's treatment of subnormal inputs needs no code.
#[inline(always)]
fn dp_step(acc: f32, a: u16, b: u16) -> f32 {
    // The product of two bf16 (8 significant bits each) is exact in f64, and so is its sum with an f32
    // unless their exponents are far apart, when the f64 rounding is far below what the f32 rounding sees.
    let s = (acc as f64 + from_bf16(a) as f64 * from_bf16(b) as f64) as f32;
    if s.is_subnormal() {
        f32::from_bits(s.to_bits() & 0x8000_0000)
    } else {
        s
    }
}

/// Rounds `src` into `dst[..src.len()]` and zeroes the rest of `dst`.
#[inline(always)]
fn convert_row_generic(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
    dst[src.len()..].fill(0);
}

/// The same integer operations as [`convert_row_generic`], compiled for 512-bit vectors.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_row_avx512(src: &[f32], dst: &mut [u16]) {
    convert_row_generic(src, dst)
}

fn convert_row(kernel: CpuFeatures, src: &[f32], dst: &mut [u16]) {
    match kernel.avx512 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked (CpuFeatures::check) that the CPU has AVX-512 F and BW.
        true => unsafe { convert_row_avx512(src, dst) },
        _ => convert_row_generic(src, dst),
    }
}

type AlignedU16 = Aligned<u16>;

fn shape_error(what: &str, message: String) -> BeitError {
    BeitError::internal(format!("bf16 linear: {what}"), message)
}

/// A Linear layer (`y = x Wᵀ + b`, W of shape (out, in) as in PyTorch) with bf16 weights, run on
/// activations rounded to bf16, f32 accumulation. See the module documentation for the arithmetic.
#[derive(Clone)]
pub struct PackedBf16 {
    out_features: usize,
    in_features: usize,
    /// `in_features.div_ceil(2)`: pairs of input features.
    k_pairs: usize,
    /// `[out.div_ceil(NR)][k_pairs][NR][2]` bf16.
    packed: AlignedU16,
    bias: Option<Vec<f32>>,
    /// `bias` (or zeros), padded to a whole panel.
    bias_padded: Vec<f32>,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedBf16")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("bias", &self.bias.is_some())
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// Activations of one call, reused between calls on the same thread. Taken out for the duration of a
    /// call, so a nested call on the same thread (rayon work stealing) just allocates its own.
    static SCRATCH: Cell<AlignedU16> = Cell::new(AlignedU16::default());
}

/// Everything a tile needs; the output is a raw pointer because tasks write disjoint parts concurrently.
struct Gemm<'a> {
    k_pairs: usize,
    /// Row stride of `a`, in u16.
    lda: usize,
    /// bf16 activations, `rows` rounded up to MR, times `lda`.
    a: &'a [u16],
    /// Packed weights.
    b: &'a [u16],
    bias: &'a [f32],
    rows: usize,
    n: usize,
    /// `rows` rows of `n` outputs at row stride `ldo`.
    out: *mut f32,
    ldo: usize,
}

// SAFETY: the raw pointer is only written through by tiles, and the driver gives each (row, column) to
// exactly one tile; everything else is shared read-only.
unsafe impl Sync for Gemm<'_> {}

impl PackedBf16 {
    /// Rounds a PyTorch-layout weight (`out_features × in_features`, row-major) to bf16 and packs it for
    /// the GEMM. Fails on a length mismatch, a zero dimension, or a weight that is not finite in bf16.
    pub fn pack(weight: &[f32], out_features: usize, in_features: usize, bias: Option<&[f32]>) -> Result<Self> {
        if out_features == 0 || in_features == 0 {
            return Err(shape_error(
                "weight",
                format!("out_features and in_features must be positive, found {out_features} x {in_features}"),
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
        // By chunks, then within the first bad one: a search element by element does not vectorize, and this runs
        // on every training step.
        const CHUNK: usize = 1 << 16;
        let bad = weight.par_chunks(CHUNK).position_first(|c| c.iter().any(|&v| rounds_to_non_finite(v)));
        if let Some(i) = bad.and_then(|c| weight[c * CHUNK..].iter().position(|&v| rounds_to_non_finite(v)).map(|i| c * CHUNK + i)) {
            return Err(shape_error(
                "weight",
                format!(
                    "value at ({}, {}) is {}, which is not finite in bf16",
                    i / in_features,
                    i % in_features,
                    weight[i]
                ),
            ));
        }
        let kernel = cpu::features();
        Ok(Self::pack_with(out_features, in_features, bias, |panel, dst| {
            // Each channel's row rounded in vectors, then its pairs spread to their places in the panel.
            let mut row16 = vec![0u16; in_features.div_ceil(KG) * KG];
            for (j, row) in weight.chunks_exact(in_features).skip(panel * NR).take(NR).enumerate() {
                convert_row(kernel, row, &mut row16);
                for (kp, pair) in row16.chunks_exact(KG).enumerate() {
                    dst[(kp * NR + j) * KG..][..KG].copy_from_slice(pair);
                }
            }
        }))
    }

    /// [`pack`](Self::pack) of the transpose of `b`, given `in_features × out_features` row-major (e.g. the
    /// activations of a weight gradient's product), without the check for values not finite in bf16: a caller
    /// training on them sees those in its loss. Fails on a length mismatch or a zero dimension.
    pub fn pack_transposed(b: &[f32], in_features: usize, out_features: usize) -> Result<Self> {
        if out_features == 0 || in_features == 0 || in_features.checked_mul(out_features) != Some(b.len()) {
            return Err(shape_error(
                "weight",
                format!("expected {in_features} x {out_features} positive sizes and values, found {}", b.len()),
            ));
        }
        let kernel = cpu::features();
        Ok(Self::pack_with(out_features, in_features, None, |panel, dst| {
            // Two rows' runs of the panel's channels rounded in vectors, then interleaved into pairs.
            let (c0, cols) = (panel * NR, (out_features - panel * NR).min(NR));
            let (mut even, mut odd) = ([0u16; NR], [0u16; NR]);
            for (kp, rows) in b.chunks(KG * out_features).enumerate() {
                convert_row(kernel, &rows[c0..c0 + cols], &mut even);
                match rows.get(out_features + c0..out_features + c0 + cols) {
                    Some(r) => convert_row(kernel, r, &mut odd),
                    None => odd.fill(0),
                }
                for (j, d) in dst[kp * NR * KG..][..NR * KG].chunks_exact_mut(KG).enumerate() {
                    d.copy_from_slice(&[even[j], odd[j]]);
                }
            }
        }))
    }

    /// The packed layout, each panel of [`NR`] output channels (zeros beyond the last) filled by `fill(panel,
    /// values)` on some thread of rayon's pool.
    fn pack_with(
        out_features: usize,
        in_features: usize,
        bias: Option<&[f32]>,
        fill: impl Fn(usize, &mut [u16]) + Sync,
    ) -> Self {
        let k_pairs = in_features.div_ceil(KG);
        let n_panels = out_features.div_ceil(NR);
        let mut packed = AlignedU16::zeroed(n_panels * k_pairs * NR * KG);
        let mut bias_padded = vec![0f32; n_panels * NR];
        if let Some(b) = bias {
            bias_padded[..out_features].copy_from_slice(b);
        }
        packed.as_mut_slice().par_chunks_mut(k_pairs * NR * KG).enumerate().for_each(|(panel, dst)| fill(panel, dst));
        PackedBf16 { out_features, in_features, k_pairs, packed, bias: bias.map(<[f32]>::to_vec), bias_padded }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Bytes held by the packed weights.
    pub fn bytes(&self) -> usize {
        self.packed.capacity_bytes()
    }

    /// The weight the layer multiplies by (the bf16 values as f32), PyTorch's (out, in) row-major layout.
    pub fn unpack(&self) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        let values = self.packed.as_slice();
        let mut w = vec![0f32; n * k];
        for c in 0..n {
            for kk in 0..k {
                let idx = (((c / NR) * self.k_pairs + kk / KG) * NR + c % NR) * KG + kk % KG;
                w[c * k + kk] = from_bf16(values[idx]);
            }
        }
        w
    }

    /// `out = x Wᵀ + b` for `x` of `rows × in_features` (row-major) into `out` of `rows × out_features`,
    /// with the fastest kernel this CPU has, on rayon's current thread pool.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        self.forward_impl(cpu::features(), x, None, rows, out, self.out_features, &|_, _, _| {})
    }

    /// [`forward`](Self::forward) of the rows of `x` at stride `ldx` (`≥ in_features`; only the first
    /// `in_features` of each row are read) into rows of `out` at stride `ldo`: a GEMM on part of a wider
    /// buffer, as the convolutions' Winograd positions are.
    pub fn forward_strided(&self, x: &[f32], ldx: usize, rows: usize, out: &mut [f32], ldo: usize) -> Result<()> {
        self.forward_impl(cpu::features(), x, Some(ldx), rows, out, ldo, &|_, _, _| {})
    }

    /// Like [`forward`](Self::forward), but row `r` of the output goes to `out[r · ldo..]` (`ldo ≥
    /// out_features`; the rest of each row is left alone), then `epilogue(row, first_column, values)` runs
    /// on each freshly written run of (at most [`NR`]) outputs of one row, while it is hot in L1: e.g. a
    /// fused GELU. Each output is passed exactly once; calls come from several threads in no particular
    /// order.
    pub fn forward_with<F>(&self, x: &[f32], rows: usize, out: &mut [f32], ldo: usize, epilogue: F) -> Result<()>
    where
        F: Fn(usize, usize, &mut [f32]) + Sync,
    {
        self.forward_impl(cpu::features(), x, None, rows, out, ldo, &epilogue)
    }

    /// [`forward`](Self::forward) with the code `kernel` selects (AVX-512 BF16 where it has `avx512_bf16`;
    /// for benchmarks and tests); fails if this CPU lacks one of its features.
    pub fn forward_using(&self, kernel: CpuFeatures, x: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        kernel.check("PackedBf16")?;
        self.forward_impl(kernel, x, None, rows, out, self.out_features, &|_, _, _| {})
    }

    /// `ldx`: None for rows packed end to end (exactly `rows · in_features` values), else their stride.
    fn check_shapes(&self, x_len: usize, ldx: Option<usize>, rows: usize, out_len: usize, ldo: usize) -> Result<()> {
        let (k, n) = (self.in_features, self.out_features);
        match ldx {
            None => {
                let want_x = rows
                    .checked_mul(k)
                    .ok_or_else(|| shape_error("input", format!("{rows} rows x {k} overflows usize")))?;
                if x_len != want_x {
                    return Err(shape_error(
                        "input",
                        format!("expected {want_x} values ({rows} rows x {k} in_features), found {x_len}"),
                    ));
                }
            }
            Some(ldx) => {
                let want_x = match rows {
                    0 => Some(0),
                    _ => (rows - 1).checked_mul(ldx).and_then(|v| v.checked_add(k)),
                };
                if ldx < k || want_x.is_none_or(|w| x_len < w) {
                    return Err(shape_error(
                        "input",
                        format!("{rows} rows of {k} in_features at stride {ldx} do not fit in {x_len} values"),
                    ));
                }
            }
        }
        if ldo < n {
            return Err(shape_error("output", format!("row stride {ldo} is below out_features {n}")));
        }
        let want_out = match rows {
            0 => 0,
            _ => (rows - 1)
                .checked_mul(ldo)
                .and_then(|v| v.checked_add(n))
                .ok_or_else(|| shape_error("output", format!("{rows} rows x stride {ldo} overflows usize")))?,
        };
        if out_len < want_out {
            return Err(shape_error(
                "output",
                format!(
                    "expected at least {want_out} values ({rows} rows of {n} out_features at stride {ldo}), found {out_len}"
                ),
            ));
        }
        Ok(())
    }

    fn forward_impl<F>(
        &self,
        kernel: CpuFeatures,
        x: &[f32],
        ldx: Option<usize>,
        rows: usize,
        out: &mut [f32],
        ldo: usize,
        epilogue: &F,
    ) -> Result<()>
    where
        F: Fn(usize, usize, &mut [f32]) + Sync,
    {
        self.check_shapes(x.len(), ldx, rows, out.len(), ldo)?;
        if rows == 0 {
            return Ok(());
        }
        let mut scratch = SCRATCH.with(Cell::take);
        self.convert_activations(kernel, x, ldx.unwrap_or(self.in_features), rows, &mut scratch);
        let g = Gemm {
            k_pairs: self.k_pairs,
            lda: self.lda(),
            a: scratch.as_slice(),
            b: self.packed.as_slice(),
            bias: &self.bias_padded,
            rows,
            n: self.out_features,
            out: out.as_mut_ptr(),
            ldo,
        };
        self.run(kernel, &g, epilogue);
        if scratch.capacity_bytes() <= SCRATCH_KEEP_BYTES {
            SCRATCH.with(|s| s.set(scratch));
        }
        Ok(())
    }

    /// Row stride of the bf16 activations: `in_features` rounded up to a cache line.
    fn lda(&self) -> usize {
        self.in_features.next_multiple_of(32)
    }

    fn convert_activations(&self, kernel: CpuFeatures, x: &[f32], ldx: usize, rows: usize, s: &mut AlignedU16) {
        let (k, lda) = (self.in_features, self.lda());
        s.ensure(rows.next_multiple_of(MR) * lda);
        let values = s.as_mut_slice();
        let (head, tail) = values.split_at_mut(rows * lda);
        tail.fill(0);
        if rows * k >= 1 << 17 && rayon::current_num_threads() > 1 {
            head.par_chunks_mut(lda)
                .zip(x.par_chunks(ldx))
                .with_min_len((16384 / k).max(1))
                .for_each(|(d, s)| convert_row(kernel, &s[..k], d));
        } else {
            head.chunks_mut(lda).zip(x.chunks(ldx)).for_each(|(d, s)| convert_row(kernel, &s[..k], d));
        }
    }

    /// Runs every (row panel, weight panel) tile, in parallel on rayon's current pool when worthwhile.
    fn run<F>(&self, kernel: CpuFeatures, g: &Gemm<'_>, epilogue: &F)
    where
        F: Fn(usize, usize, &mut [f32]) + Sync,
    {
        let m_panels = g.rows.div_ceil(MR);
        let n_panels = self.out_features.div_ceil(NR);
        // Row panels per M block: the block's activations stay in L2 while the weight panels stream by.
        // Blocks of (nearly) equal size, so that no task is a sliver.
        let m_blocks = m_panels.div_ceil((A_BLOCK_BYTES / (2 * MR * g.lda)).clamp(1, m_panels));
        let mc = m_panels.div_ceil(m_blocks);
        let task = |mb: usize, p0: usize, p1: usize| {
            for panel in p0..p1 {
                for mp in mb * mc..((mb + 1) * mc).min(m_panels) {
                    tile(kernel, g, mp * MR, panel);
                    let (c0, c1) = (panel * NR, ((panel + 1) * NR).min(g.n));
                    for r in mp * MR..((mp + 1) * MR).min(g.rows) {
                        // SAFETY: row r, columns c0..c1 lie inside the output (checked against rows, n and
                        // ldo) and belong to this tile alone, which has just written them.
                        let values = unsafe { std::slice::from_raw_parts_mut(g.out.add(r * g.ldo + c0), c1 - c0) };
                        epilogue(r, c0, values);
                    }
                }
            }
        };
        let parallel = g.rows * g.n * g.k_pairs * KG >= PARALLEL_MIN_MACS;
        crate::kernels::for_each_panel_run(m_blocks, n_panels, parallel, task);
    }
}

#[inline]
fn tile(kernel: CpuFeatures, g: &Gemm<'_>, row0: usize, panel: usize) {
    match kernel.avx512_bf16 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU has AVX-512 F, BW and BF16; row0 and panel are in range.
        true => unsafe { tile_avx512bf16(g, row0, panel) },
        _ => tile_portable(g, row0, panel),
    }
}

/// An output from its accumulator, as both kernels write it.
#[inline(always)]
fn finish(acc: f32, bias: f32) -> f32 {
    let y = acc + bias;
    if y.is_nan() {
        f32::NAN
    } else {
        y
    }
}

fn tile_portable(g: &Gemm<'_>, row0: usize, panel: usize) {
    let mut acc = [[0f32; NR]; MR];
    let panel_len = g.k_pairs * NR * KG;
    let b = &g.b[panel * panel_len..][..panel_len];
    for (kp, bk) in b.chunks_exact(NR * KG).enumerate() {
        for (i, acc_row) in acc.iter_mut().enumerate() {
            let a2 = &g.a[(row0 + i) * g.lda + kp * KG..][..KG];
            for (acc, w2) in acc_row.iter_mut().zip(bk.chunks_exact(KG)) {
                // The odd element first, as the instruction does.
                *acc = dp_step(dp_step(*acc, a2[1], w2[1]), a2[0], w2[0]);
            }
        }
    }
    let c0 = panel * NR;
    let cols = NR.min(g.n - c0);
    for (i, acc_row) in acc.iter().enumerate().take(g.rows.saturating_sub(row0).min(MR)) {
        let r = row0 + i;
        for (j, &a) in acc_row[..cols].iter().enumerate() {
            // SAFETY: r < rows and c0 + j < n: inside the output; only this tile writes there.
            unsafe { *g.out.add(r * g.ldo + c0 + j) = finish(a, g.bias[c0 + j]) };
        }
    }
}

/// The AVX-512 BF16 microkernel: one MR × NR tile over the whole K, then the bias.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and BF16; `row0 + MR` rows of `g.a` and panel `panel` of `g.b` must
/// exist (the driver only passes tiles of the padded buffers), and `g.out` must hold `rows` rows of `n`
/// writable values at stride `ldo` that no one else accesses in this tile's rows and columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[deny(unsafe_op_in_unsafe_fn)]
unsafe fn tile_avx512bf16(g: &Gemm<'_>, row0: usize, panel: usize) {
    let lda = g.lda;
    let panel_len = g.k_pairs * NR * KG;
    let a_tile = &g.a[row0 * lda..][..MR * lda];
    let b_panel = &g.b[panel * panel_len..][..panel_len];
    let (mut a, mut b) = (a_tile.as_ptr(), b_panel.as_ptr());
    let c0 = panel * NR;
    let rows_here = g.rows.saturating_sub(row0).min(MR);
    // The tile's output lines are requested for writing during the K loop, one every 4 pairs, so that
    // the stores at the end do not wait on memory and the requests never crowd out the loads of A and B.
    let prefetches = rows_here * NV;
    let last_col = g.n - 1;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for kp in 0..g.k_pairs {
        if kp % 4 == 0 && kp / 4 < prefetches {
            let (i, j) = (kp / 4 / NV, kp / 4 % NV);
            let at = (row0 + i) * g.ldo + (c0 + 16 * j).min(last_col);
            // Prefetching never faults; wrapping_add keeps the address computation itself defined.
            _mm_prefetch::<_MM_HINT_ET0>(g.out.wrapping_add(at).cast::<i8>());
        }
        let mut w = [_mm512_setzero_si512(); NV];
        for (j, wj) in w.iter_mut().enumerate() {
            // SAFETY: `b` steps through b_panel, NR·2 = 32·NV values per pair of input features.
            *wj = unsafe { _mm512_loadu_si512(b.add(32 * j).cast()) };
        }
        // SAFETY: __m512i and __m512bh are both 64 bytes of plain data.
        let w: [__m512bh; NV] = unsafe { std::mem::transmute(w) };
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: `a` steps 2 values per pair through the first 2·k_pairs <= lda values of a_tile's rows.
            let x2 = _mm512_set1_epi32(unsafe { a.add(i * lda).cast::<i32>().read_unaligned() });
            // SAFETY: as above.
            let x2: __m512bh = unsafe { std::mem::transmute(x2) };
            for j in 0..NV {
                acc_row[j] = _mm512_dpbf16_ps(acc_row[j], x2, w[j]);
            }
        }
        // SAFETY: at most one past the end of the values read above.
        (a, b) = unsafe { (a.add(KG), b.add(NR * KG)) };
    }

    let nan = _mm512_set1_ps(f32::NAN);
    for (i, acc_row) in acc.iter().enumerate() {
        if i >= rows_here {
            break;
        }
        let r = row0 + i;
        for (j, &acc) in acc_row.iter().enumerate() {
            let c = c0 + 16 * j;
            if c >= g.n {
                break;
            }
            let mask: __mmask16 = if g.n - c >= 16 { 0xFFFF } else { ((1u32 << (g.n - c)) - 1) as __mmask16 };
            // The bias is padded to whole panels, so these 16 lanes from c exist.
            let bias = &g.bias[c..c + 16];
            // SAFETY: the slice holds exactly 16 values.
            let y = _mm512_add_ps(acc, unsafe { _mm512_loadu_ps(bias.as_ptr()) });
            let y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y), y, nan);
            // SAFETY: masked to columns c..min(c + 16, n) of row r < rows, which the caller reserves to this tile.
            unsafe {
                let at = g.out.add(r * g.ldo + c);
                if mask == 0xFFFF {
                    _mm512_storeu_ps(at, y);
                } else {
                    _mm512_mask_storeu_ps(at, mask, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_a_transpose_equals_packing_the_weight() {
        for (n, k) in [(50usize, 7usize), (48, 64), (3, 1), (97, 33)] {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 7.0 - 70.0).collect();
            let t: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let (a, b) = (PackedBf16::pack(&w, n, k, None).unwrap(), PackedBf16::pack_transposed(&t, k, n).unwrap());
            assert_eq!(a.packed.as_slice(), b.packed.as_slice(), "{n} x {k}");
            assert_eq!(a.unpack(), w.iter().map(|&v| from_bf16(to_bf16(v))).collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_non_finite_test_is_rounding_to_a_non_finite_bf16() {
        let around = [0x7f7f_7fffu32, 0x7f7f_8000, 0x7f7f_8001, 0x7f7f_0000, 0x7f80_0000, 0x7f80_0001, 0x7fc0_0000, 0x3f80_0000, 0];
        for bits in around.into_iter().flat_map(|b| [b, b | 0x8000_0000]).chain((0..1u32 << 16).map(|i| i.wrapping_mul(0x9e37_79b9))) {
            let x = f32::from_bits(bits);
            assert_eq!(rounds_to_non_finite(x), !from_bf16(to_bf16(x)).is_finite(), "{bits:#x}");
        }
    }

    fn run(p: &PackedBf16, kernel: CpuFeatures, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * p.out_features()];
        p.forward_using(kernel, x, rows, &mut out).unwrap();
        out
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// torch's float → bfloat16 (c10::round_to_nearest_even), written out independently.
    fn torch_bf16(x: f32) -> u16 {
        if x.is_nan() {
            return 0x7fc0;
        }
        let u = x.to_bits();
        let bias = 0x7fff + ((u >> 16) & 1);
        ((u as u64 + bias as u64) >> 16) as u16
    }

    #[test]
    fn rounding_is_torchs_round_to_nearest_even() {
        let mut rng = crate::rng::Rng::new(11);
        let mut values = rng.symmetric_f32(10_000, 1000.0);
        values.extend([0.0, -0.0, 1.0, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE]);
        // Ties: 1 + 2^-8 is halfway between two bf16 and goes to the even one (1.0); 1 + 3·2^-8 goes up.
        values.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -(1.0 + 1.0 / 256.0)]);
        for &v in &values {
            assert_eq!(to_bf16(v), torch_bf16(v), "{v:e}");
        }
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(f32::MAX), 0x7f80); // rounds up to +inf, as in torch
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert!(from_bf16(to_bf16(f32::from_bits(0xff80_0001))).is_nan()); // a signalling NaN stays NaN
                                                                           // Subnormal results are stored as signed zeros.
        assert_eq!(to_bf16(1e-39), 0);
        assert_eq!(to_bf16(-1e-39), 0x8000);
    }

    /// The portable step against the instruction itself, on values from everywhere in the f32 range
    /// (including sums that underflow, overflow or cancel), one lane at a time.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_step_equals_vdpbf16ps() {
        if !cpu::hardware().avx512_bf16 {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn hw(acc: &[f32; 16], a: &[u16; 32], b: &[u16; 32]) -> [f32; 16] {
            let mut o = [0f32; 16];
            unsafe {
                let av: __m512bh = std::mem::transmute(_mm512_loadu_si512(a.as_ptr().cast()));
                let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.as_ptr().cast()));
                _mm512_storeu_ps(o.as_mut_ptr(), _mm512_dpbf16_ps(_mm512_loadu_ps(acc.as_ptr()), av, bv));
            }
            o
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut checked = 0;
        for it in 0..20_000 {
            let mode = it % 3;
            let bf = |next: &mut dyn FnMut() -> u64| -> u16 {
                let r = next();
                let exp = match mode {
                    0 => (r >> 20) as u16 % 255,      // anywhere but inf / NaN
                    1 => 1 + (r >> 20) as u16 % 40,   // products underflow
                    _ => 110 + (r >> 20) as u16 % 30, // ordinary magnitudes
                };
                // Packing never stores subnormals: a zero exponent means a signed zero.
                let mant = if exp == 0 { 0 } else { r as u16 & 0x7f };
                ((r >> 40) as u16 & 0x8000) | (exp << 7) | mant
            };
            let (mut a, mut b, mut acc) = ([0u16; 32], [0u16; 32], [0f32; 16]);
            for i in 0..32 {
                a[i] = bf(&mut next);
                b[i] = bf(&mut next);
            }
            for (i, v) in acc.iter_mut().enumerate() {
                // Earlier steps' results: f32 values that are not subnormal.
                let x = f32::from_bits(next() as u32 & 0xbfff_ffff) * if i % 2 == 0 { 1.0 } else { 1e-30 };
                *v = dp_step(x, 0, 0);
            }
            // SAFETY: the CPU has AVX-512 BF16 (checked above).
            let want = unsafe { hw(&acc, &a, &b) };
            for i in 0..16 {
                let got = dp_step(dp_step(acc[i], a[2 * i + 1], b[2 * i + 1]), a[2 * i], b[2 * i]);
                let same = got.to_bits() == want[i].to_bits() || (got.is_nan() && want[i].is_nan());
                assert!(same, "acc {:e}, a {:?}, b {:?}: instruction {:e}, portable {got:e}", acc[i], a, b, want[i]);
                checked += 1;
            }
        }
        assert_eq!(checked, 320_000);
    }

    /// The f64 reference: the same bf16 values, summed exactly (to within f64), plus the bias.
    fn reference(p: &PackedBf16, x: &[f32], rows: usize) -> Vec<f64> {
        let (n, k) = (p.out_features(), p.in_features());
        let w = p.unpack();
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let s: f64 = (0..k).map(|i| from_bf16(to_bf16(x[r * k + i])) as f64 * w[c * k + i] as f64).sum();
                out[r * n + c] = s + p.bias().map_or(0.0, |b| b[c] as f64);
            }
        }
        out
    }

    #[test]
    fn kernels_agree_bit_for_bit_and_with_the_reference_on_odd_shapes() {
        let mut rng = crate::rng::Rng::new(1);
        for &n in &[1usize, 17, 48, 100] {
            for &k in &[1usize, 2, 7, 64, 129] {
                let w = rng.symmetric_f32(n * k, 0.5);
                let bias = rng.symmetric_f32(n, 0.5);
                let p = PackedBf16::pack(&w, n, k, Some(&bias)).unwrap();
                for &rows in &[1usize, 3, 9, 20] {
                    let x = rng.symmetric_f32(rows * k, 2.0);
                    let want = reference(&p, &x, rows);
                    let outputs: Vec<Vec<f32>> = cpu::variants().into_iter().map(|kr| run(&p, kr, &x, rows)).collect();
                    assert!(
                        outputs.windows(2).all(|w| same_bits(&w[0], &w[1])),
                        "kernels differ at rows {rows}, K {k}, N {n}"
                    );
                    // f32 accumulation of exact products: within K rounding steps of the sum's magnitude.
                    for (i, (&got, &want)) in outputs[0].iter().zip(&want).enumerate() {
                        let (r, c) = (i / n, i % n);
                        let mag: f64 = (0..k)
                            .map(|kk| (from_bf16(to_bf16(x[r * k + kk])) as f64 * w[c * k + kk] as f64).abs())
                            .sum::<f64>()
                            + bias[c].abs() as f64;
                        let tol = (k as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                        assert!((got as f64 - want).abs() <= tol, "({rows}, {k}, {n}) [{r}, {c}]: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// The bf16 rounding of inputs and weights dominates: relative to Σ|x·w| the error is about 2^-8.
    #[test]
    fn output_is_close_to_the_f32_product() {
        let mut rng = crate::rng::Rng::new(2);
        let (rows, k, n) = (30usize, 768usize, 96usize);
        let w = rng.symmetric_f32(n * k, 0.05);
        let x = rng.symmetric_f32(rows * k, 3.0);
        let p = PackedBf16::pack(&w, n, k, None).unwrap();
        for kernel in cpu::variants() {
            let out = run(&p, kernel, &x, rows);
            for r in 0..rows {
                for c in 0..n {
                    let (mut exact, mut mag) = (0f64, 0f64);
                    for kk in 0..k {
                        let v = x[r * k + kk] as f64 * w[c * k + kk] as f64;
                        exact += v;
                        mag += v.abs();
                    }
                    // Each of x and w is within 2^-9 relative of its bf16, so each product within ~2^-8.
                    let err = (out[r * n + c] as f64 - exact).abs();
                    assert!(err <= mag / 256.0, "{kernel:?} [{r}, {c}]: error {err} vs Σ|xw| {mag}");
                }
            }
        }
    }

    /// Large shapes through the parallel driver, with strided output and an epilogue.
    #[test]
    fn large_strided_and_threaded_calls_agree() {
        let mut rng = crate::rng::Rng::new(3);
        let (rows, k, n) = (70usize, 200usize, 150usize);
        let w = rng.symmetric_f32(n * k, 0.1);
        let bias = rng.symmetric_f32(n, 0.1);
        let p = PackedBf16::pack(&w, n, k, Some(&bias)).unwrap();
        let x = rng.symmetric_f32(rows * k, 1.0);
        let mut first: Option<Vec<f32>> = None;
        for kernel in cpu::variants() {
            let one = crate::kernels::on_threads(1, || run(&p, kernel, &x, rows));
            let three = crate::kernels::on_threads(3, || run(&p, kernel, &x, rows));
            assert!(same_bits(&one, &three));
            match &first {
                None => first = Some(one),
                Some(f) => assert!(same_bits(f, &one), "{kernel:?} differs from the portable kernel"),
            }
        }
        let plain = run(&p, cpu::features(), &x, rows);
        let ldo = n + 5;
        let mut strided = vec![-7f32; rows * ldo];
        let seen = std::sync::Mutex::new(vec![0u8; rows * n]);
        p.forward_with(&x, rows, &mut strided, ldo, |r, c0, values| {
            let mut s = seen.lock().unwrap();
            for (j, v) in values.iter_mut().enumerate() {
                s[r * n + c0 + j] += 1;
                *v *= 2.0;
            }
        })
        .unwrap();
        assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1));
        for r in 0..rows {
            let want: Vec<f32> = plain[r * n..][..n].iter().map(|v| v * 2.0).collect();
            assert!(same_bits(&strided[r * ldo..][..n], &want));
            assert!(strided[r * ldo + n..][..5].iter().all(|&v| v == -7.0));
        }
    }

    #[test]
    fn nan_inputs_give_canonical_nan_in_both_kernels() {
        let mut rng = crate::rng::Rng::new(4);
        let (rows, k, n) = (4usize, 33usize, 20usize);
        let p = PackedBf16::pack(&rng.symmetric_f32(n * k, 1.0), n, k, Some(&rng.symmetric_f32(n, 1.0))).unwrap();
        let mut x = rng.symmetric_f32(rows * k, 1.0);
        x[k + 3] = f32::from_bits(0xffd1_2345);
        x[2 * k + 5] = f32::INFINITY;
        let outs: Vec<Vec<f32>> = cpu::variants().into_iter().map(|kr| run(&p, kr, &x, rows)).collect();
        assert!(outs.windows(2).all(|w| same_bits(&w[0], &w[1])));
        assert!(outs[0][n..2 * n].iter().all(|v| v.to_bits() == f32::NAN.to_bits()));
        assert!(outs[0][..n].iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bad_shapes_are_errors_that_name_the_lengths() {
        let msg = |r: Result<PackedBf16>| r.unwrap_err().to_string();
        let w = vec![0.5f32; 12];
        assert!(msg(PackedBf16::pack(&w, 3, 5, None)).contains("expected 15 values (3 x 5), found 12"));
        assert!(msg(PackedBf16::pack(&w, 3, 4, Some(&[1.0; 2]))).contains("expected 3 values, found 2"));
        assert!(msg(PackedBf16::pack(&[], 0, 4, None)).contains("positive"));
        let mut big = w.clone();
        big[6] = f32::MAX;
        assert!(msg(PackedBf16::pack(&big, 3, 4, None)).contains("(1, 2)"));
        let p = PackedBf16::pack(&w, 3, 4, None).unwrap();
        let mut out = vec![0f32; 6];
        let e = p.forward(&[0.0; 7], 2, &mut out).unwrap_err().to_string();
        assert!(e.contains("expected 8 values (2 rows x 4 in_features), found 7"), "{e}");
        let e = p.forward(&[0.0; 8], 2, &mut out[..5]).unwrap_err().to_string();
        assert!(e.contains("found 5"), "{e}");
        assert!(p.forward_with(&[0.0; 8], 2, &mut out, 2, |_, _, _| {}).is_err());
        p.forward(&[], 0, &mut []).unwrap();
    }
}

/// Timing probe (ignored by default): `cargo test --release -p beit --lib bf16_probe -- --ignored
/// --nocapture`, `PROBE_THREADS=2` for two threads.
#[cfg(test)]
mod perf_probe {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn bf16_probe() {
        let threads: usize = std::env::var("PROBE_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            for &(rows, k, n) in
                &[(197usize, 768usize, 2304usize), (197, 768, 3072), (197, 3072, 768), (1576, 768, 3072)]
            {
                let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
                let x: Vec<f32> = (0..rows * k).map(|i| ((i * 104729 % 2000) as f32 - 900.0) * 1e-3).collect();
                let p = PackedBf16::pack(&w, n, k, None).unwrap();
                let mut out = vec![0f32; rows * n];
                p.forward(&x, rows, &mut out).unwrap();
                let mut best = f64::INFINITY;
                for _ in 0..20 {
                    let t = Instant::now();
                    p.forward(&x, rows, &mut out).unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "{rows:5} x {k:5} x {n:5}: {:7.3} ms = {:6.1} G/s",
                    best * 1e3,
                    2.0 * (rows * n * k) as f64 / best / 1e9
                );
            }
        });
    }
}
