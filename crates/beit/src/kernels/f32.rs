//! An f32 Linear (`out[r, j] = bias[j] + Σ_k a[r, k] · w[j, k]`) on the weights exactly as PyTorch
//! stores them, `(out, in)` row-major, with no persistent packed copy of them.
//!
//! # Layout and kernels
//!
//! Per call, the activations are packed once into row panels of [`MR`] = 8 rows, `[M/8][K][8]` (rows
//! padded with zeros to a multiple of 8), in a per-thread scratch buffer reused between calls. The
//! weights are packed per task, one K block at a time, into a small per-thread buffer: a panel of
//! [`NR`] = 48 output channels times at most [`KC`] input features, `[kc][48]` (the transpose of the
//! corresponding block of W, padded with zero channels), 48 KiB, which stays in L1/L2 while every row
//! panel of the task is multiplied by it. Each weight value is thus packed once per call (once per
//! M block when M is split, see below): `N·K` moves against `2·M·N·K` flops.
//!
//! The AVX-512 microkernel computes an 8 × 48 tile in 24 zmm accumulators: per input feature it loads
//! three vectors of 16 packed weights and broadcasts the 8 activations of the row panel, 24 FMAs. The
//! accumulators start from the bias (first K block) or from the output itself (later K blocks: an exact
//! f32 round trip), so every output is `bias + a₀w₀ + a₁w₁ + …` fused-multiply-added in order of k,
//! whatever the K blocking or the task split. Results therefore do not depend on the thread count.
//!
//! Tasks are (M block, weight panel) pairs on rayon's current pool. With many panels (N ≥ 48 · 4 ·
//! threads) M is not split at all, so each panel of W is packed exactly once; for narrow outputs M is
//! split as well so that every thread has work. The output is written only at rows `< m` and columns
//! `< n` of each `ldo`-strided row, so neighbouring columns (e.g. q, k, v side by side) are untouched.
//!
//! [`F32Kernel::Portable`] runs the same packing and tiles in plain Rust: the same sums in the same
//! order, but with separate multiply and add (no FMA contraction), so it agrees up to float rounding.

use crate::error::{BeitError, Result};
use rayon::prelude::*;
use std::cell::Cell;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows per microkernel tile (and per packed activation panel).
pub const MR: usize = 8;
/// zmm registers (of 16 output channels each) per tile row.
const NV: usize = 3;
/// Output channels per microkernel tile, and per packed weight panel.
pub const NR: usize = 16 * NV;
/// Input features per K block: the packed weight panel (`KC · NR · 4` bytes = 48 KiB) stays in L1/L2
/// while all row panels of a task stream past it.
pub const KC: usize = 256;
/// Below this many multiply-adds a call runs on the calling thread: rayon's overhead would dominate.
const PARALLEL_MIN_MACS: usize = 1 << 20;
/// Packed activations above this size are swept K block by K block by all panels (see `run`).
const A_CACHED_BYTES: usize = 8 << 20;
/// Per-thread activation scratch larger than this is freed after the call instead of kept.
const SCRATCH_KEEP_BYTES: usize = 32 << 20;

/// Which f32 GEMM runs. They agree up to float rounding (the AVX-512 one uses FMA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    /// AVX-512 F: Intel Skylake-SP and later, AMD Zen 4 and later.
    Avx512,
    /// Plain Rust, any CPU.
    Portable,
}

impl F32Kernel {
    /// The fastest kernel this CPU supports (checked at run time).
    pub fn detect() -> Self {
        if F32Kernel::Avx512.is_available() {
            F32Kernel::Avx512
        } else {
            F32Kernel::Portable
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            F32Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx512 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2")
            }
            #[cfg(not(target_arch = "x86_64"))]
            F32Kernel::Avx512 => false,
        }
    }
}

/// 16 f32 on one cache line: the unit of the aligned buffers (a zmm load never straddles two lines).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A 64-byte aligned f32 buffer, reused between calls.
#[derive(Default)]
struct AlignedF32 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedF32 {
    /// Makes the buffer `len` values long; the contents are unspecified afterwards.
    fn ensure(&mut self, len: usize) {
        if self.lines.len() * 16 < len {
            self.lines = vec![Line([0.0; 16]); len.div_ceil(16)];
        }
        self.len = len;
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `lines` holds `lines.len() * 16 >= len` initialised f32; Line is plain f32s.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }

    fn capacity_bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

thread_local! {
    /// Packed activations of the current call on this thread. Taken out for the duration of a call (and
    /// put back after), so a nested call on the same thread (rayon work stealing) allocates its own.
    static A_SCRATCH: Cell<AlignedF32> = Cell::new(AlignedF32::default());
    /// One packed weight block (`KC × NR`), taken for the duration of one task for the same reason.
    static B_SCRATCH: Cell<AlignedF32> = Cell::new(AlignedF32::default());
}

fn shape_error(what: &str, message: String) -> BeitError {
    BeitError::input(format!("f32 linear: {what}"), message)
}

/// `out[r, j] = bias[j] + Σ_k a[r, k] · w[j, k]` for `r < m`, `j < n`, with the fastest kernel this CPU
/// has, on rayon's current thread pool.
///
/// `a` holds `m` rows of `k` values at stride `lda ≥ k`; `w` is `n × k` row-major (PyTorch's
/// `(out, in)`); `out` receives `m` rows of `n` values at stride `ldo ≥ n` (values between `n` and `ldo`
/// are left untouched). Fails, naming the expected and found lengths, on inconsistent sizes.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) -> Result<()> {
    linear_using(F32Kernel::detect(), a, lda, m, w, n, k, bias, out, ldo)
}

/// [`linear`] with a chosen kernel (for benchmarks and tests); fails if this CPU cannot run it.
#[allow(clippy::too_many_arguments)]
pub fn linear_using(
    kernel: F32Kernel,
    a: &[f32],
    lda: usize,
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) -> Result<()> {
    if !kernel.is_available() {
        return Err(shape_error(
            "kernel",
            format!("the {kernel:?} kernel is not supported by this CPU"),
        ));
    }
    check_shapes(
        a.len(),
        lda,
        m,
        w.len(),
        n,
        k,
        bias.map(<[f32]>::len),
        out.len(),
        ldo,
    )?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: the output is the bias (or zeros).
        for r in 0..m {
            let row = &mut out[r * ldo..r * ldo + n];
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return Ok(());
    }
    let mut scratch = A_SCRATCH.with(Cell::take);
    pack_a(kernel, a, lda, m, k, &mut scratch);
    let job = Job {
        ap: scratch.as_slice(),
        w,
        n,
        k,
        bias,
        m,
        out: out.as_mut_ptr(),
        ldo,
    };
    run(kernel, &job);
    if scratch.capacity_bytes() <= SCRATCH_KEEP_BYTES {
        A_SCRATCH.with(|s| s.set(scratch));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_shapes(
    a_len: usize,
    lda: usize,
    m: usize,
    w_len: usize,
    n: usize,
    k: usize,
    bias_len: Option<usize>,
    out_len: usize,
    ldo: usize,
) -> Result<()> {
    let overflow = |what: &str| {
        shape_error(
            what,
            format!("m {m}, n {n}, k {k}, lda {lda}, ldo {ldo} overflow usize"),
        )
    };
    if lda < k {
        return Err(shape_error(
            "input",
            format!("row stride lda must be at least k = {k}, found {lda}"),
        ));
    }
    if ldo < n {
        return Err(shape_error(
            "output",
            format!("row stride ldo must be at least n = {n}, found {ldo}"),
        ));
    }
    let want_w = n.checked_mul(k).ok_or_else(|| overflow("weight"))?;
    if w_len != want_w {
        return Err(shape_error(
            "weight",
            format!("expected {want_w} values ({n} x {k}), found {w_len}"),
        ));
    }
    if let Some(b) = bias_len {
        if b != n {
            return Err(shape_error(
                "bias",
                format!("expected {n} values, found {b}"),
            ));
        }
    }
    if m == 0 {
        return Ok(());
    }
    let want_a = (m - 1)
        .checked_mul(lda)
        .and_then(|v| v.checked_add(k))
        .ok_or_else(|| overflow("input"))?;
    if a_len < want_a {
        return Err(shape_error(
            "input",
            format!("expected at least {want_a} values ({m} rows of {k} at stride {lda}), found {a_len}"),
        ));
    }
    let want_o = (m - 1)
        .checked_mul(ldo)
        .and_then(|v| v.checked_add(n))
        .ok_or_else(|| overflow("output"))?;
    if out_len < want_o {
        return Err(shape_error(
            "output",
            format!("expected at least {want_o} values ({m} rows of {n} at stride {ldo}), found {out_len}"),
        ));
    }
    // The packed activations must be addressable too.
    m.div_ceil(MR)
        .checked_mul(MR * k)
        .ok_or_else(|| overflow("input"))?;
    Ok(())
}

/// Everything a task needs; the output is a raw pointer because tasks write disjoint parts concurrently.
struct Job<'a> {
    /// Packed activations `[m.div_ceil(MR)][k][MR]`.
    ap: &'a [f32],
    w: &'a [f32],
    n: usize,
    k: usize,
    bias: Option<&'a [f32]>,
    m: usize,
    /// `(m - 1) · ldo + n` writable values (checked by `check_shapes`).
    out: *mut f32,
    ldo: usize,
}

// SAFETY: `out` is only written through by tiles, and `run` gives each (row, column) to exactly one task;
// everything else is shared read-only.
unsafe impl Sync for Job<'_> {}

/// Packs the activations into `[m.div_ceil(MR)][k][MR]`, padding rows with zeros.
fn pack_a(kernel: F32Kernel, a: &[f32], lda: usize, m: usize, k: usize, s: &mut AlignedF32) {
    let panels = m.div_ceil(MR);
    s.ensure(panels * k * MR);
    let one = |(p, dst): (usize, &mut [f32])| {
        let rows = (m - p * MR).min(MR);
        let src = &a[p * MR * lda..];
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked (F32Kernel::is_available) that the CPU has AVX-512 F and AVX2.
            F32Kernel::Avx512 if rows == MR => unsafe { pack_a_panel_avx(src, lda, k, dst) },
            _ => pack_a_panel_portable(src, lda, rows, k, dst),
        }
    };
    let dst = s.as_mut_slice();
    if m * k >= 1 << 16 && rayon::current_num_threads() > 1 {
        dst.par_chunks_mut(k * MR).enumerate().for_each(one);
    } else {
        dst.chunks_mut(k * MR).enumerate().for_each(one);
    }
}

/// `dst[kk][i] = src[i · lda + kk]` for `i < rows`, 0 for the padding rows.
fn pack_a_panel_portable(src: &[f32], lda: usize, rows: usize, k: usize, dst: &mut [f32]) {
    for (kk, d) in dst.chunks_exact_mut(MR).enumerate().take(k) {
        for (i, v) in d.iter_mut().enumerate() {
            *v = if i < rows { src[i * lda + kk] } else { 0.0 };
        }
    }
}

/// [`pack_a_panel_portable`] for a full panel, eight features at a time through an 8 × 8 transpose.
///
/// # Safety
/// The CPU must support AVX2; `src` must hold `7 · lda + k` values and `dst` `k · MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f")]
#[deny(unsafe_op_in_unsafe_fn)]
unsafe fn pack_a_panel_avx(src: &[f32], lda: usize, k: usize, dst: &mut [f32]) {
    assert!(
        src.len() >= 7 * lda + k && dst.len() >= k * MR,
        "pack_a_panel_avx: slices too short"
    );
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut kk = 0;
    while kk + 8 <= k {
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, v) in r.iter_mut().enumerate() {
            // SAFETY: rows i < 8 at features kk..kk + 8 <= k lie in src (asserted above).
            *v = unsafe { _mm256_loadu_ps(s.add(i * lda + kk)) };
        }
        let t = transpose8(r);
        for (j, v) in t.iter().enumerate() {
            // SAFETY: (kk + j) · MR + 8 <= k · MR <= dst.len().
            unsafe { _mm256_storeu_ps(d.add((kk + j) * MR), *v) };
        }
        kk += 8;
    }
    for kk in kk..k {
        for i in 0..MR {
            dst[kk * MR + i] = src[i * lda + kk];
        }
    }
}

/// Transposes 8 rows of 8 f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Transposes 16 rows of 16 f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved, then quadruples: u[4q + c] holds rows 4q..4q+4 at columns c, c+4, c+8,
    // c+12 (one per 128-bit lane).
    let mut u = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let t0 = _mm512_unpacklo_ps(r[4 * q], r[4 * q + 1]);
        let t1 = _mm512_unpackhi_ps(r[4 * q], r[4 * q + 1]);
        let t2 = _mm512_unpacklo_ps(r[4 * q + 2], r[4 * q + 3]);
        let t3 = _mm512_unpackhi_ps(r[4 * q + 2], r[4 * q + 3]);
        u[4 * q] = _mm512_shuffle_ps::<0x44>(t0, t2);
        u[4 * q + 1] = _mm512_shuffle_ps::<0xEE>(t0, t2);
        u[4 * q + 2] = _mm512_shuffle_ps::<0x44>(t1, t3);
        u[4 * q + 3] = _mm512_shuffle_ps::<0xEE>(t1, t3);
    }
    let mut o = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        // Lanes (rows 0-3, rows 4-7) at columns c and c + 8, then c + 4 and c + 12; likewise rows 8-15.
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let v3 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
        o[c] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        o[c + 8] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
        o[c + 4] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        o[c + 12] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
    }
    o
}

/// Packs `w[c0 + j, k0 + kk]` for `j < cols`, `kk < kc` into `dst[kk · NR + j]`, zeros for `j ≥ cols`.
#[allow(clippy::too_many_arguments)]
fn pack_b(
    kernel: F32Kernel,
    w: &[f32],
    k: usize,
    c0: usize,
    cols: usize,
    k0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked (F32Kernel::is_available) that the CPU has AVX-512 F.
        F32Kernel::Avx512 => unsafe { pack_b_avx512(w, k, c0, cols, k0, kc, dst) },
        _ => pack_b_portable(w, k, c0, cols, k0, kc, dst, 0),
    }
}

/// The scalar packing of channels `j_from..NR` of the panel (all of it with `j_from = 0`).
#[allow(clippy::too_many_arguments)]
fn pack_b_portable(
    w: &[f32],
    k: usize,
    c0: usize,
    cols: usize,
    k0: usize,
    kc: usize,
    dst: &mut [f32],
    j_from: usize,
) {
    for j in j_from..NR {
        if j < cols {
            let row = &w[(c0 + j) * k + k0..][..kc];
            for (kk, &v) in row.iter().enumerate() {
                dst[kk * NR + j] = v;
            }
        } else {
            for kk in 0..kc {
                dst[kk * NR + j] = 0.0;
            }
        }
    }
}

/// [`pack_b_portable`] with whole groups of 16 channels moved by 16 × 16 transposes.
///
/// # Safety
/// The CPU must support AVX-512 F; `w` must hold `(c0 + cols) · k` values with `k0 + kc <= k`, and `dst`
/// `kc · NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[deny(unsafe_op_in_unsafe_fn)]
unsafe fn pack_b_avx512(
    w: &[f32],
    k: usize,
    c0: usize,
    cols: usize,
    k0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    assert!(
        k0 + kc <= k && w.len() >= (c0 + cols) * k && dst.len() >= kc * NR,
        "pack_b_avx512: slices too short"
    );
    let full_groups = (cols / 16).min(NV);
    let (s, d) = (w.as_ptr(), dst.as_mut_ptr());
    for g in 0..full_groups {
        let base = (c0 + 16 * g) * k + k0;
        let mut kk = 0;
        while kk + 16 <= kc {
            // Plain loops, not closures, so that the intrinsics inline under this function's features.
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, v) in r.iter_mut().enumerate() {
                // SAFETY: channels c0 + 16g + j < c0 + cols at features k0 + kk .. + 16 <= k0 + kc <= k.
                *v = unsafe { _mm512_loadu_ps(s.add(base + j * k + kk)) };
            }
            let t = transpose16(&r);
            for (i, v) in t.iter().enumerate() {
                // SAFETY: (kk + i) · NR + 16g + 16 <= kc · NR <= dst.len().
                unsafe { _mm512_storeu_ps(d.add((kk + i) * NR + 16 * g), *v) };
            }
            kk += 16;
        }
        for kk in kk..kc {
            for j in 0..16 {
                dst[kk * NR + 16 * g + j] = w[base + j * k + kk];
            }
        }
    }
    pack_b_portable(w, k, c0, cols, k0, kc, dst, 16 * full_groups);
}

/// Runs every (M block, weight panel) task, in parallel on rayon's current pool when worthwhile.
fn run(kernel: F32Kernel, job: &Job<'_>) {
    let m_panels = job.m.div_ceil(MR);
    let n_panels = job.n.div_ceil(NR);
    let blocks = job.k.div_ceil(KC);
    // Packed activations larger than this do not stay in L3 while each weight panel sweeps them: then
    // K blocks go outermost instead, so one K block of them (M · KC · 4 bytes) is reused by every panel,
    // at the price of one pass over the output per K block.
    let k_outer = job.ap.len() * 4 > A_CACHED_BYTES;
    let threads = rayon::current_num_threads();
    let serial = threads <= 1 || job.m * job.n * job.k < PARALLEL_MIN_MACS;
    // At least four tasks per thread, so that a thread slowed by other work is made up for by the
    // others; M is split only when there are too few weight panels (each M block packs W again).
    let m_blocks = if serial {
        1
    } else {
        (4 * threads).div_ceil(n_panels).clamp(1, m_panels)
    };
    let mc = m_panels.div_ceil(m_blocks);
    let m_blocks = m_panels.div_ceil(mc);
    let for_all = |kbs: std::ops::Range<usize>| {
        let one = |t: usize| {
            let (panel, mb) = (t / m_blocks, t % m_blocks);
            task(
                kernel,
                job,
                mb * mc,
                ((mb + 1) * mc).min(m_panels),
                panel,
                kbs.clone(),
            );
        };
        if serial {
            (0..n_panels * m_blocks).for_each(one);
        } else {
            (0..n_panels * m_blocks).into_par_iter().for_each(one);
        }
    };
    if k_outer {
        for kb in 0..blocks {
            for_all(kb..kb + 1);
        }
    } else {
        for_all(0..blocks);
    }
}

/// Row panels `mp0..mp1` times weight panel `panel`, over K blocks `kbs` (of `k.div_ceil(KC)`).
fn task(
    kernel: F32Kernel,
    job: &Job<'_>,
    mp0: usize,
    mp1: usize,
    panel: usize,
    kbs: std::ops::Range<usize>,
) {
    let mut bbuf = B_SCRATCH.with(Cell::take);
    bbuf.ensure(KC * NR);
    let c0 = panel * NR;
    let cols = (job.n - c0).min(NR);
    let bias = job.bias.map(|b| &b[c0..c0 + cols]);
    let k = job.k;
    // Blocks of (nearly) equal size: K = 768 gives 3 × 256, K = 3072 12 × 256.
    let blocks = k.div_ceil(KC);
    let kcb = k.div_ceil(blocks);
    for kb in kbs {
        let k0 = kb * kcb;
        let kc = kcb.min(k - k0);
        let bp = &mut bbuf.as_mut_slice()[..kc * NR];
        pack_b(kernel, job.w, k, c0, cols, k0, kc, bp);
        let bp = &*bp;
        for mp in mp0..mp1 {
            let row0 = mp * MR;
            let rows = (job.m - row0).min(MR);
            let ap = &job.ap[(mp * k + k0) * MR..][..kc * MR];
            // Row row0, column c0 of the output; rows < m and columns < n keep it inside the checked
            // `(m - 1) · ldo + n` values, so the offset is in bounds.
            let out = job.out.wrapping_add(row0 * job.ldo + c0);
            let t = Tile {
                ap,
                bp,
                kc,
                out,
                ldo: job.ldo,
                rows,
                cols,
                first: kb == 0,
                bias,
            };
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller checked that the CPU has AVX-512 F; `t` describes rows < m and
                // columns < n of the output, which belong to this task alone.
                F32Kernel::Avx512 => unsafe { tile_avx512(&t) },
                _ => tile_portable(&t),
            }
        }
    }
    B_SCRATCH.with(|s| s.set(bbuf));
}

/// One MR × NR tile over one K block.
struct Tile<'a> {
    /// `[kc][MR]` packed activations.
    ap: &'a [f32],
    /// `[kc][NR]` packed weights.
    bp: &'a [f32],
    kc: usize,
    /// The tile's top-left output value; rows `< rows` at stride `ldo`, columns `< cols`, are its own.
    out: *mut f32,
    ldo: usize,
    rows: usize,
    cols: usize,
    /// The first K block: start from the bias (or 0) instead of the output's current value.
    first: bool,
    /// `cols` values.
    bias: Option<&'a [f32]>,
}

fn tile_portable(t: &Tile<'_>) {
    let mut acc = [[0f32; NR]; MR];
    for (i, acc_row) in acc.iter_mut().enumerate().take(t.rows) {
        for (j, v) in acc_row.iter_mut().enumerate().take(t.cols) {
            *v = if t.first {
                t.bias.map_or(0.0, |b| b[j])
            } else {
                // SAFETY: row i < rows, column j < cols of this tile (see Tile::out).
                unsafe { *t.out.add(i * t.ldo + j) }
            };
        }
    }
    for (a, b) in t.ap.chunks_exact(MR).zip(t.bp.chunks_exact(NR)).take(t.kc) {
        for (acc_row, &av) in acc.iter_mut().zip(a) {
            for (v, &bv) in acc_row.iter_mut().zip(b) {
                *v += av * bv;
            }
        }
    }
    for (i, acc_row) in acc.iter().enumerate().take(t.rows) {
        for (j, &v) in acc_row.iter().enumerate().take(t.cols) {
            // SAFETY: as above; no other reference to these values exists during the tile.
            unsafe { *t.out.add(i * t.ldo + j) = v };
        }
    }
}

/// The AVX-512 microkernel: 24 zmm accumulators, 3 weight loads and 8 broadcasts per input feature.
///
/// # Safety
/// The CPU must support AVX-512 F; `t.ap` must hold `kc · MR` and `t.bp` `kc · NR` values, and `t.out`
/// must point to `rows` rows (stride `ldo`) of `cols` writable values that no one else accesses meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[deny(unsafe_op_in_unsafe_fn)]
unsafe fn tile_avx512(t: &Tile<'_>) {
    assert!(
        t.ap.len() >= t.kc * MR && t.bp.len() >= t.kc * NR,
        "tile_avx512: packed blocks too short"
    );
    let masks: [__mmask16; NV] = std::array::from_fn(|j| {
        let c = t.cols.saturating_sub(16 * j).min(16);
        ((1u32 << c) - 1) as __mmask16
    });
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if t.first {
        if let Some(b) = t.bias {
            for (j, &mask) in masks.iter().enumerate() {
                // SAFETY: masked to columns 16j.. < cols of the `cols`-long bias slice.
                let v = unsafe { _mm512_maskz_loadu_ps(mask, b.as_ptr().wrapping_add(16 * j)) };
                acc.iter_mut().for_each(|row| row[j] = v);
            }
        }
    } else {
        for (i, row) in acc.iter_mut().enumerate().take(t.rows) {
            for (j, v) in row.iter_mut().enumerate() {
                // SAFETY: masked to columns < cols of row i < rows of the tile (see Tile::out).
                *v = unsafe {
                    _mm512_maskz_loadu_ps(masks[j], t.out.wrapping_add(i * t.ldo + 16 * j))
                };
            }
        }
    }
    // On the first block the output lines are requested for writing during the K loop (one every 4
    // features), so that the final stores do not wait on memory for a large output not in cache.
    let prefetches = if t.first { t.rows * NV } else { 0 };
    let (mut a, mut b) = (t.ap.as_ptr(), t.bp.as_ptr());
    for kk in 0..t.kc {
        if kk % 4 == 0 && kk / 4 < prefetches {
            let (i, j) = (kk / 4 / NV, kk / 4 % NV);
            if masks[j] != 0 {
                // Prefetching never faults; wrapping_add keeps the address computation itself defined.
                _mm_prefetch::<_MM_HINT_ET0>(t.out.wrapping_add(i * t.ldo + 16 * j).cast::<i8>());
            }
        }
        let mut w = [_mm512_setzero_ps(); NV];
        for (j, v) in w.iter_mut().enumerate() {
            // SAFETY: `b` steps NR values per feature through the kc · NR of bp, `a` MR through ap.
            *v = unsafe { _mm512_loadu_ps(b.add(16 * j)) };
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let x = _mm512_set1_ps(unsafe { *a.add(i) });
            for j in 0..NV {
                acc_row[j] = _mm512_fmadd_ps(x, w[j], acc_row[j]);
            }
        }
        // SAFETY: at most one past the end of the values read above.
        (a, b) = unsafe { (a.add(MR), b.add(NR)) };
    }
    for (i, acc_row) in acc.iter().enumerate().take(t.rows) {
        for (j, &v) in acc_row.iter().enumerate() {
            // SAFETY: masked to columns < cols of row i < rows (a zero mask stores nothing).
            unsafe { _mm512_mask_storeu_ps(t.out.wrapping_add(i * t.ldo + 16 * j), masks[j], v) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;


    fn kernels() -> Vec<F32Kernel> {
        let mut k = vec![F32Kernel::Portable];
        if F32Kernel::Avx512.is_available() {
            k.push(F32Kernel::Avx512);
        } else {
            static NOTE: std::sync::Once = std::sync::Once::new();
            NOTE.call_once(|| {
                eprintln!("note: this CPU has no AVX-512; only the portable kernel is tested")
            });
        }
        k
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// `m × n` outputs at stride `ldo` (the rest a sentinel), for `m × k` inputs at stride `lda`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        kernel: F32Kernel,
        a: &[f32],
        lda: usize,
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
        ldo: usize,
    ) -> Vec<f32> {
        let mut out = vec![f32::from_bits(0x7fc0_1234); m * ldo];
        linear_using(kernel, a, lda, m, w, n, k, bias, &mut out, ldo).unwrap();
        out
    }

    /// Every (M, K, N) of the odd-shape lists, with and without bias and with padded strides in turn,
    /// against an f64 reference: |error| ≤ 1e-5 · (Σ_k |a·w| + |bias|) per output, and every value
    /// outside the m × n block (row padding up to ldo) left as it was.
    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let mut rng = crate::rng::Rng::new(1);
        let mut case = 0usize;
        for &k in &[1usize, 7, 768, 3072] {
            for &n in &[1usize, 17, 768, 2304] {
                let w = rng.symmetric_f32(n * k, 0.05);
                let bias = rng.symmetric_f32(n, 0.5);
                for &m in &[1usize, 3, 197, 200] {
                    case += 1;
                    let (lda, ldo) = if case.is_multiple_of(2) {
                        (k + 5, n + 3)
                    } else {
                        (k, n)
                    };
                    let with_bias = !case.is_multiple_of(3);
                    let b = with_bias.then_some(&bias[..]);
                    let a = rng.symmetric_f32(m * lda, 2.0);
                    let mut want = vec![0f64; m * n];
                    let mut mag = vec![0f64; m * n];
                    for r in 0..m {
                        let ar = &a[r * lda..][..k];
                        for c in 0..n {
                            let wc = &w[c * k..][..k];
                            let b0 = if with_bias { bias[c] as f64 } else { 0.0 };
                            let (mut s, mut s_abs) = (b0, b0.abs());
                            for (&x, &y) in ar.iter().zip(wc) {
                                let p = x as f64 * y as f64;
                                s += p;
                                s_abs += p.abs();
                            }
                            want[r * n + c] = s;
                            mag[r * n + c] = s_abs;
                        }
                    }
                    for kernel in kernels() {
                        let out = run(kernel, &a, lda, m, &w, n, k, b, ldo);
                        for r in 0..m {
                            for c in 0..ldo {
                                let got = out[r * ldo + c];
                                if c >= n {
                                    assert_eq!(
                                        got.to_bits(),
                                        0x7fc0_1234,
                                        "{kernel:?} wrote outside n"
                                    );
                                    continue;
                                }
                                let err = (got as f64 - want[r * n + c]).abs();
                                assert!(
                                    err <= 1e-5 * mag[r * n + c],
                                    "{kernel:?} (m {m}, k {k}, n {n}, bias {with_bias}, lda {lda}, ldo {ldo}) at \
                                     [{r}, {c}]: {got} vs {}",
                                    want[r * n + c]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Each output is the same chain of FMAs whatever the split, so 1 and 3 threads agree bit for bit,
    /// both when M is split (few weight panels) and when it is not.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = crate::rng::Rng::new(2);
        for &(m, k, n) in &[(197usize, 600usize, 60usize), (203, 300, 1000)] {
            let a = rng.symmetric_f32(m * k, 1.0);
            let w = rng.symmetric_f32(n * k, 1.0);
            let bias = rng.symmetric_f32(n, 1.0);
            for kernel in kernels() {
                let at = |threads: usize| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap()
                        .install(|| run(kernel, &a, k, m, &w, n, k, Some(&bias), n))
                };
                assert!(same_bits(&at(1), &at(3)), "{kernel:?} ({m}, {k}, {n})");
            }
        }
    }

    #[test]
    fn concurrent_and_nested_calls_agree() {
        let mut rng = crate::rng::Rng::new(3);
        let (m, k, n) = (64, 300, 300);
        let w = rng.symmetric_f32(n * k, 1.0);
        let inputs: Vec<Vec<f32>> = (0..6).map(|_| rng.symmetric_f32(m * k, 1.0)).collect();
        let kernel = F32Kernel::detect();
        let serial: Vec<Vec<f32>> = inputs
            .iter()
            .map(|a| run(kernel, a, k, m, &w, n, k, None, n))
            .collect();
        // Each call runs inside a rayon task and itself fans out on the same pool.
        let parallel: Vec<Vec<f32>> = inputs
            .par_iter()
            .map(|a| run(kernel, a, k, m, &w, n, k, None, n))
            .collect();
        for (s, p) in serial.iter().zip(&parallel) {
            assert!(same_bits(s, p));
        }
    }

    #[test]
    fn writes_a_column_block_of_a_wider_output() {
        // 2x3 input, weight 2x3 (n=2, k=3), into columns 1..3 of a 2x4 output.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [1.0, 0.0, -1.0, 0.5, 0.5, 0.5];
        for kernel in kernels() {
            let mut out = [9.0f32; 8];
            linear_using(
                kernel,
                &a,
                3,
                2,
                &w,
                2,
                3,
                Some(&[10.0, 20.0]),
                &mut out[1..],
                4,
            )
            .unwrap();
            assert_eq!(out, [9.0, 8.0, 23.0, 9.0, 9.0, 8.0, 27.5, 9.0]);
        }
    }

    #[test]
    fn empty_sums_give_the_bias_and_empty_outputs_are_no_ops() {
        let mut out = [7.0f32; 6];
        linear(&[], 0, 2, &[], 3, 0, Some(&[1.0, 2.0, 3.0]), &mut out, 3).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        linear(&[], 0, 2, &[], 3, 0, None, &mut out, 3).unwrap();
        assert_eq!(out, [0.0; 6]);
        linear(&[], 4, 0, &[0.0; 8], 2, 4, None, &mut [], 2).unwrap();
        linear(&[0.0; 4], 4, 1, &[], 0, 4, None, &mut [], 0).unwrap();
    }

    #[test]
    fn bad_shapes_are_errors_that_name_the_lengths() {
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        let (a, w) = (vec![0.5f32; 12], vec![0.5f32; 12]);
        let mut out = vec![0f32; 9];
        assert!(msg(linear(&a, 4, 3, &w[..11], 3, 4, None, &mut out, 3))
            .contains("expected 12 values (3 x 4), found 11"));
        assert!(msg(linear(&a[..11], 4, 3, &w, 3, 4, None, &mut out, 3))
            .contains("expected at least 12 values"));
        assert!(msg(linear(&a, 4, 3, &w, 3, 4, None, &mut out[..8], 3))
            .contains("expected at least 9 values"));
        assert!(
            msg(linear(&a, 4, 3, &w, 3, 4, Some(&[0.0; 2]), &mut out, 3))
                .contains("expected 3 values, found 2")
        );
        assert!(
            msg(linear(&a, 3, 3, &w, 3, 4, None, &mut out, 3)).contains("at least k = 4, found 3")
        );
        assert!(
            msg(linear(&a, 4, 3, &w, 3, 4, None, &mut out, 2)).contains("at least n = 3, found 2")
        );
        assert!(linear(&a, usize::MAX, 3, &w, 3, 4, None, &mut out, 3).is_err());
    }
}

/// Timing probes for tuning (ignored by default; the comparison with the gemm crate is the `f32_gemm`
/// example). `cargo test --release -p beit --lib f32::perf_probe -- --ignored --nocapture`.
#[cfg(test)]
mod perf_probe {
    use super::*;
    use std::time::Instant;

    fn min_time(batches: usize, mut f: impl FnMut()) -> f64 {
        f();
        (0..batches)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// One tile over one K block, repeated: the microkernel's own ceiling with its data in L1/L2.
    #[test]
    #[ignore]
    fn tile_probe() {
        for &kc in &[64usize, 128, 256] {
            let ap = vec![0.5f32; kc * MR];
            let mut bbuf = AlignedF32::default();
            bbuf.ensure(kc * NR);
            bbuf.as_mut_slice().fill(0.25);
            let mut out = vec![0f32; MR * NR];
            let t = Tile {
                ap: &ap,
                bp: bbuf.as_slice(),
                kc,
                out: out.as_mut_ptr(),
                ldo: NR,
                rows: MR,
                cols: NR,
                first: false,
                bias: None,
            };
            let reps = 20000;
            let s = min_time(20, || {
                for _ in 0..reps {
                    unsafe { tile_avx512(&t) }
                }
            });
            println!(
                "tile kc={kc}: {:6.1} G/s",
                2.0 * (MR * NR * kc * reps) as f64 / s / 1e9
            );
        }
    }

    #[test]
    #[ignore]
    fn perf_probe() {
        let threads: usize = std::env::var("PROBE_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for &(m, k, n) in
                &[(197usize, 768usize, 768usize), (197, 768, 3072), (197, 3072, 768), (1576, 768, 3072), (1576, 3072, 768)]
            {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 104729 % 2000) as f32 - 900.0) * 1e-3).collect();
                let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
                let mut out = vec![0f32; m * n];
                let mut s = AlignedF32::default();
                let kernel = F32Kernel::detect();
                let ta = min_time(20, || pack_a(kernel, &a, k, m, k, &mut s));
                let mut bb = vec![0f32; KC * NR];
                let tb = min_time(20, || {
                    for p in 0..n / NR {
                        for k0 in (0..k).step_by(KC) {
                            pack_b(kernel, &w, k, p * NR, NR, k0, KC.min(k - k0), &mut bb);
                        }
                    }
                });
                // Weights cycled through 5 copies (> L3), as in the model where each layer's come from memory.
                let ws: Vec<Vec<f32>> = (0..5).map(|c| w.iter().map(|v| v + c as f32 * 1e-3).collect()).collect();
                let mut ci = 0;
                let tc = min_time(20, || {
                    ci = (ci + 1) % 5;
                    linear(&a, k, m, &ws[ci], n, k, None, &mut out, n).unwrap()
                });
                let tf = min_time(20, || linear(&a, k, m, &w, n, k, None, &mut out, n).unwrap());
                let ops = 2.0 * (m * n * k) as f64;
                println!(
                    "{m:5} x {k:5} x {n:5}: pack A {:6.3} ms  pack W {:6.3} ms  total {:7.3} ms = {:6.1} G/s  \
                     (W from memory {:6.1} G/s)",
                    ta * 1e3,
                    tb * 1e3,
                    tf * 1e3,
                    ops / tf / 1e9,
                    ops / tc / 1e9
                );
            }
        });
    }
}
