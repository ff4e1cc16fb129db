//! Multi-head self-attention at inference from a fused qkv buffer, with BEiT's relative position biases:
//! `ctx = softmax(bias₀ + bias₁ + … + (q·kᵀ)/√dh) · v`, per image and head.
//!
//! # Layout
//!
//! `qkv` holds `batch · n` token rows of `3d` values, `[q | k | v]`, with head `h` in columns
//! `h·dh .. (h+1)·dh` of each third (`d = heads · dh`); `ctx` receives `batch · n` rows of `d`, head `h`
//! in the same columns. Each bias tensor is `heads · n · n`, head-major.
//!
//! # Algorithm
//!
//! One task is one (image, head), or a range of its query rows when there are fewer (image, head) pairs
//! than four per thread. It packs K once into key panels `[dh][64]` (Kᵀ, zero keys past `n`) and V into
//! `[n][dh↑16]` (rows padded with zeros to whole vectors), both 64-byte aligned and L2-resident
//! (≈ 100 KiB for BEiT-base), then walks its query rows in blocks of [`RB`] rows. Per block:
//!
//! 1. `S = bias + scale · (Q·Kᵀ)` by a 6 × 64 register tile (24 zmm accumulators, 4 loads and 6
//!    broadcasts per feature, the broadcasts straight from the q rows of qkv), each row tile across all
//!    key panels. Scale and biases are applied once per score as the tile is stored, and the row maxima
//!    are updated there too (no separate max pass). Scores go to a tile-major buffer
//!    `[n↑16 / 16][RB][16]` (20 KiB at n = 197, L1): sixteen keys of one row per line.
//! 2. Per row: `exp(s - max)` in place (a table-based exp, ≈ 1.5 ulp), and the sum; the row is *not*
//!    normalised here.
//! 3. `ctx = P·V · (1/sum)` by a 6 × 64 tile (24 accumulators, 4 loads and 6 broadcasts per key): the
//!    tile-major scores put the six rows' probabilities of one key at fixed offsets of one pointer. The
//!    normalisation is one multiply per output value (dh per row) instead of one per probability (n).
//!
//! The q, k and v rows of a head are 3d apart, too far for the hardware prefetchers; the next task's
//! rows, the next block's q rows and bias values, and each p·v tile's output lines are prefetched in
//! software (at batch 8, where qkv is not in cache, that took a head from ~140 to ~115 µs).
//!
//! Rows are independent of one another throughout, and blocks always start at multiples of [`RB`], so
//! every output is computed by the same operations whatever the task split: results do not depend on
//! the thread count.
//!
//! [`AttentionKernel::Portable`] runs the same packing, blocks and tiles in plain Rust (sub-tiles of
//! 2 × 16 that fit SSE registers) with separate multiplies and adds (no FMA); it agrees with the AVX-512
//! kernel up to float rounding. It is ~5x slower than the AVX-512 kernel (≈ 20 GFLOP/s on Zen 4).

use crate::error::{BeitError, Result};
use rayon::prelude::*;
use std::cell::Cell;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Query rows per block: their scores (`RB · n↑16 · 4` bytes, 20 KiB at n = 197) stay in L1 from q·kᵀ
/// through softmax to p·v. A multiple of [`QK_R`] and [`PV_R`].
const RB: usize = 24;
/// Rows of the q·kᵀ tile.
const QK_R: usize = 6;
/// Vectors (of 16 keys) of the q·kᵀ tile, and per packed key panel.
const QK_NV: usize = 4;
/// Rows of the p·v tile.
const PV_R: usize = 6;
/// Vectors (of 16 output columns) of the p·v tile at most.
const PV_NV: usize = 4;
/// 16-key chunks of K (and V) requested ahead of their packing.
const PREFETCH_CHUNKS: usize = 2;
/// Per-thread scratch larger than this is freed after the task instead of kept.
const SCRATCH_KEEP_BYTES: usize = 32 << 20;

/// Which attention kernel runs. They agree up to float rounding (the AVX-512 one uses FMA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// AVX-512 F: Intel Skylake-SP and later, AMD Zen 4 and later.
    Avx512,
    /// Plain Rust, any CPU.
    Portable,
}

impl AttentionKernel {
    /// The fastest kernel this CPU supports (checked at run time).
    pub fn detect() -> Self {
        if AttentionKernel::Avx512.is_available() {
            AttentionKernel::Avx512
        } else {
            AttentionKernel::Portable
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            AttentionKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            AttentionKernel::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            AttentionKernel::Avx512 => false,
        }
    }
}

use crate::kernels::f32::AlignedF32;

thread_local! {
    /// One task's packed K and V, scores, row maxima and sums. Taken out for the duration of a task (and
    /// put back after), so a nested call on the same thread (rayon work stealing) allocates its own.
    static SCRATCH: Cell<AlignedF32> = Cell::new(AlignedF32::default());
}

fn shape_error(qkv: usize, ctx: usize, batch: usize, n: usize, heads: usize, dh: usize) -> BeitError {
    BeitError::internal(
        "attention kernel",
        format!("qkv {qkv} / ctx {ctx} values for batch {batch}, {n} tokens, {heads}x{dh}"),
    )
}

/// Multi-head attention from the fused qkv buffer `(batch·n, 3d)` into ctx `(batch·n, d)`, `d = heads·dh`:
/// per image `b` and head `h`, `ctx_h = softmax(Σ biases[·][h] + q_h·k_hᵀ/√dh) · v_h`, with the fastest
/// kernel this CPU has, on rayon's current thread pool.
///
/// Each bias is `heads · n · n` values, head-major (`[h][query][key]`); any number of them (0 for none)
/// is added. Fails, naming the lengths, when `qkv`, `ctx` or a bias does not have the expected length.
pub fn attention(
    qkv: &[f32],
    ctx: &mut [f32],
    batch: usize,
    n: usize,
    heads: usize,
    dh: usize,
    biases: &[&[f32]],
) -> Result<()> {
    attention_using(AttentionKernel::detect(), qkv, ctx, batch, n, heads, dh, biases)
}

/// [`attention`] with a chosen kernel (for benchmarks and tests); fails if this CPU cannot run it.
#[allow(clippy::too_many_arguments)]
pub fn attention_using(
    kernel: AttentionKernel,
    qkv: &[f32],
    ctx: &mut [f32],
    batch: usize,
    n: usize,
    heads: usize,
    dh: usize,
    biases: &[&[f32]],
) -> Result<()> {
    if !kernel.is_available() {
        return Err(BeitError::unsupported(
            "attention",
            format!("the {kernel:?} kernel is not supported by this CPU"),
        ));
    }
    let err = || shape_error(qkv.len(), ctx.len(), batch, n, heads, dh);
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
    let sh = Shape::new(n, heads, dh, biases.len()).ok_or_else(err)?;
    let threads = rayon::current_num_threads().max(1);
    let heads_total = batch * heads;
    // At least four tasks per thread (a thread slowed by other work is made up for by the others):
    // with few (image, head) pairs, each head's row blocks are split too, at the price of packing its
    // K and V once per part.
    let parts = if heads_total < 4 * threads {
        (4 * threads).div_ceil(heads_total).min(sh.blocks)
    } else {
        1
    };
    let per_part = sh.blocks.div_ceil(parts);
    let parts = sh.blocks.div_ceil(per_part);
    let tasks = heads_total * parts;
    // Task t: image b, head h, row blocks blk0..blk1.
    let split = |t: usize| {
        let (pair, part) = (t / parts, t % parts);
        let blk0 = part * per_part;
        (pair / heads, pair % heads, blk0, (blk0 + per_part).min(sh.blocks))
    };
    let image = |b: usize| &qkv[b * n * 3 * d..(b + 1) * n * 3 * d];
    let out = SendPtr(ctx.as_mut_ptr());
    let one = |t: usize| {
        let (b, h, blk0, blk1) = split(t);
        // Rayon hands each thread a run of consecutive tasks, so t + 1 is most likely this thread's next.
        let ahead = (t + 1 < tasks).then(|| {
            let (b, h, blk0, blk1) = split(t + 1);
            Ahead {
                qkv: image(b),
                h,
                rows: blk0 * RB..(blk1 * RB).min(n),
            }
        });
        let mut scratch = SCRATCH.with(Cell::take);
        scratch.ensure(sh.scratch_len);
        let job = Job {
            sh: &sh,
            qkv: image(b),
            biases,
            h,
            blk0,
            blk1,
            out: out.get().wrapping_add(b * n * d),
            ahead,
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: is_available() checked that the CPU has AVX-512 F; this task alone writes columns
            // h·dh.. of rows of blocks blk0..blk1 of image b (inside ctx, whose length was checked).
            AttentionKernel::Avx512 => unsafe { task_avx512(&job, scratch.as_mut_slice()) },
            // SAFETY: as above.
            _ => unsafe { task_generic::<false>(&job, scratch.as_mut_slice()) },
        }
        if scratch.capacity_bytes() <= SCRATCH_KEEP_BYTES {
            SCRATCH.with(|s| s.set(scratch));
        }
    };
    if threads == 1 || tasks == 1 {
        (0..tasks).for_each(one);
    } else {
        (0..tasks).into_par_iter().for_each(one);
    }
    Ok(())
}

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

/// The sizes of one call and where each part of a task's scratch lives.
struct Shape {
    n: usize,
    dh: usize,
    d: usize,
    scale: f32,
    /// 16-key vectors covering the keys.
    chunks: usize,
    /// dh rounded up to whole vectors: the packed V row length.
    dh_pad: usize,
    /// Row blocks of [`RB`] query rows.
    blocks: usize,
    /// Offsets in the scratch, after the Kᵀ panels (`chunks·16·dh` at 0), each a whole number of
    /// lines: V `n·dh_pad`, scores `chunks·RB·16`, row maxima `RB·16`, reciprocal row sums `RB`, and
    /// the head's bias sum `n·n` when there are more than two biases (else empty).
    v: usize,
    s: usize,
    mx: usize,
    inv: usize,
    bsum: usize,
    scratch_len: usize,
}

impl Shape {
    /// None when the scratch size overflows.
    fn new(n: usize, heads: usize, dh: usize, biases: usize) -> Option<Self> {
        let chunks = n.div_ceil(16);
        let dh_pad = dh.div_ceil(16) * 16;
        let line = |v: usize| v.checked_next_multiple_of(16);
        let v = line(chunks.checked_mul(16 * dh)?)?;
        let s = v.checked_add(line(n.checked_mul(dh_pad)?)?)?;
        let mx = s.checked_add(chunks.checked_mul(RB * 16)?)?;
        let inv = mx + RB * 16;
        let bsum = inv.checked_add(line(RB)?)?;
        let bsum_len = if biases > 2 { n.checked_mul(n)? } else { 0 };
        Some(Shape {
            n,
            dh,
            d: heads * dh,
            scale: 1.0 / (dh as f32).sqrt(),
            chunks,
            dh_pad,
            blocks: n.div_ceil(RB),
            v,
            s,
            mx,
            inv,
            bsum,
            scratch_len: bsum.checked_add(bsum_len)?,
        })
    }
}

/// One task: head `h` of one image, query row blocks `blk0..blk1`.
struct Job<'a> {
    sh: &'a Shape,
    /// The image's `n · 3d` qkv values.
    qkv: &'a [f32],
    /// Whole bias tensors (`heads · n · n` each).
    biases: &'a [&'a [f32]],
    h: usize,
    blk0: usize,
    blk1: usize,
    /// The image's first ctx row; `n` rows of `d` values.
    out: *mut f32,
    /// The next task's inputs, requested into L2 during this one.
    ahead: Option<Ahead<'a>>,
}

/// What the next task reads from qkv: all of head `h`'s keys and values, and the query rows `rows`.
struct Ahead<'a> {
    qkv: &'a [f32],
    h: usize,
    rows: std::ops::Range<usize>,
}

/// [`task_generic`] compiled for AVX-512, so that its tiles and packing inline with wide registers.
///
/// # Safety
/// As [`task_generic`], and the CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn task_avx512(job: &Job<'_>, scratch: &mut [f32]) {
    // SAFETY: forwarded from the caller; AVX = true is only instantiated here, under AVX-512 F.
    unsafe { task_generic::<true>(job, scratch) }
}

/// Packs head `job.h`'s K and V, then computes its query row blocks.
///
/// # Safety
/// `job.out` must point to `n` rows of `d` values of which columns `h·dh..(h+1)·dh` of this task's rows
/// are written by no one else meanwhile; with `AVX`, the CPU must support AVX-512 F.
#[inline(always)]
unsafe fn task_generic<const AVX: bool>(job: &Job<'_>, scratch: &mut [f32]) {
    let sh = job.sh;
    let (n, dh, d) = (sh.n, sh.dh, sh.d);
    let ld = 3 * d;
    let (kt, rest) = scratch.split_at_mut(sh.v);
    let (vp, rest) = rest.split_at_mut(sh.s - sh.v);
    let (sp, rest) = rest.split_at_mut(sh.mx - sh.s);
    let (mx, rest) = rest.split_at_mut(sh.inv - sh.mx);
    let (inv, bsum) = rest.split_at_mut(sh.bsum - sh.inv);
    let k_src = &job.qkv[d + job.h * dh..];
    let q_src = &job.qkv[job.h * dh..];
    let v_src = &job.qkv[2 * d + job.h * dh..];
    let head = job.h * n * n..(job.h + 1) * n * n;
    // The head's biases as one or two tensors: more are summed first (in order, as one would).
    let (nb, b0, b1): (usize, &[f32], &[f32]) = match job.biases {
        [] => (0, &[], &[]),
        [a] => (1, &a[head], &[]),
        [a, b] => (2, &a[head.clone()], &b[head]),
        [first, rest @ ..] => {
            bsum.copy_from_slice(&first[head.clone()]);
            for b in rest {
                for (s, v) in bsum.iter_mut().zip(&b[head.clone()]) {
                    *s += v;
                }
            }
            (1, &*bsum, &[])
        }
    };

    // The rows of q, k and v are 3d apart, a page or more: the hardware prefetchers do not follow them
    // (at batch 8, where qkv is not in L2, a head waited ~15% of its time on them). So each is requested
    // a little ahead of its use, in software.
    let row_lines = |src: &[f32], rows: std::ops::Range<usize>, hint: Hint| {
        for r in rows.start..rows.end.min(n) {
            prefetch(&src[r * ld..r * ld + dh], hint);
        }
    };
    row_lines(q_src, job.blk0 * RB..(job.blk0 + 1) * RB, Hint::L2);
    // The next task's k, v and q rows (in the order it reads them), a few per q·kᵀ tile of this one:
    // its packing then reads from L2 instead of waiting on L3 or memory row by row.
    let panels = sh.chunks.div_ceil(QK_NV);
    let ahead_rows = job.ahead.as_ref().map_or(0, |a| 2 * n + a.rows.len());
    let ahead_per_tile = ahead_rows.div_ceil(((job.blk1 - job.blk0) * panels * RB.div_ceil(QK_R)).max(1));
    let mut ahead_next = 0;
    let mut ahead_step = || {
        let Some(a) = &job.ahead else { return };
        for r in ahead_next..(ahead_next + ahead_per_tile).min(ahead_rows) {
            let (part, row) = match r {
                r if r < n => (1, r),
                r if r < 2 * n => (2, r - n),
                r => (0, a.rows.start + r - 2 * n),
            };
            let at = row * ld + part * d + a.h * dh;
            prefetch(&a.qkv[at..at + dh], Hint::L2);
        }
        ahead_next += ahead_per_tile;
    };

    row_lines(k_src, 0..16 * PREFETCH_CHUNKS, Hint::L1);
    // Kᵀ panels: panel p (keys 64p..) is `[dh][w·16]` at offset 64p·dh, w = its vectors (QK_NV, or fewer
    // for the last panel), so every panel is contiguous and the tile reads it at unit stride.
    for gc in 0..sh.chunks {
        let (c0, c) = (gc / QK_NV * QK_NV, gc % QK_NV);
        let w = (sh.chunks - c0).min(QK_NV);
        let key0 = 16 * gc;
        row_lines(
            k_src,
            key0 + 16 * PREFETCH_CHUNKS..key0 + 16 * (PREFETCH_CHUNKS + 1),
            Hint::L1,
        );
        row_lines(v_src, key0..key0 + 16, Hint::L1);
        let panel = &mut kt[c0 * 16 * dh..(c0 + w) * 16 * dh];
        transpose_rows::<AVX>(
            &k_src[key0 * ld..],
            ld,
            (n - key0).min(16),
            dh,
            &mut panel[16 * c..],
            16 * w,
        );
    }
    // V rows, zero-padded to whole vectors (the p·v tile loads full vectors, stores only dh columns).
    for (j, row) in vp.chunks_exact_mut(sh.dh_pad).take(n).enumerate() {
        row[..dh].copy_from_slice(&v_src[j * ld..j * ld + dh]);
        row[dh..].fill(0.0);
    }

    for blk in job.blk0..job.blk1 {
        let row0 = blk * RB;
        let rows = (n - row0).min(RB);
        mx.fill(f32::NEG_INFINITY);
        // Scores, row tile by row tile across all key panels (the tile's q rows stay in L1, the panels
        // stream from L2; panel-major order measured the same).
        for r0 in (0..rows).step_by(QK_R) {
            // The next block's q rows, in L2 by the time it starts.
            let next = row0 + RB + r0;
            row_lines(q_src, next..next + QK_R, Hint::L2);
            for p in 0..panels {
                let c0 = p * QK_NV;
                let w = (sh.chunks - c0).min(QK_NV);
                ahead_step();
                // The bias values the same tile of the next block will read.
                for b in [b0, b1].iter().take(nb) {
                    for r in next..(next + QK_R).min(n) {
                        prefetch(&b[r * n + 16 * c0..r * n + (16 * (c0 + w)).min(n)], Hint::L2);
                    }
                }
                let at = (row0 + r0) * n + 16 * c0;
                let tile = QkTile {
                    q: &q_src[(row0 + r0) * ld..],
                    ldq: ld,
                    kp: &kt[c0 * 16 * dh..(c0 + w) * 16 * dh],
                    dh,
                    scale: sh.scale,
                    bias: [b0.get(at..).unwrap_or(&[]), b1.get(at..).unwrap_or(&[])],
                    ldb: n,
                    rows: (rows - r0).min(QK_R),
                    cols: n - 16 * c0,
                    s: &mut sp[(c0 * RB + r0) * 16..],
                    mx: &mut mx[r0 * 16..],
                };
                qk_dispatch::<AVX>(w, nb, tile);
            }
        }
        for (i, inv) in inv.iter_mut().enumerate().take(rows) {
            *inv = softmax_row::<AVX>(&mut sp[i * 16..], n, &mx[i * 16..(i + 1) * 16]);
        }
        // ctx rows, head columns, one group of up to 64 columns at a time.
        for r0 in (0..rows).step_by(PV_R) {
            for col0 in (0..sh.dh_pad).step_by(16 * PV_NV) {
                let w = (sh.dh_pad - col0).div_ceil(16).min(PV_NV);
                let tile_rows = (rows - r0).min(PV_R);
                // The tile's output lines, requested for writing while it computes (ctx is not in
                // cache at large batches, and the stores would wait for it).
                for i in 0..tile_rows {
                    let at = (row0 + r0 + i) * d + job.h * dh + col0;
                    prefetch_write(job.out.wrapping_add(at), (dh - col0).min(16 * w));
                }
                let tile = PvTile {
                    sp: &sp[r0 * 16..],
                    n,
                    vp: &vp[col0..],
                    ldv: sh.dh_pad,
                    inv: &inv[r0..],
                    // Row row0 + r0 of the image, column h·dh + col0: inside the n × d block as long as
                    // only rows < tile_rows and columns < dh of the tile are written.
                    out: job.out.wrapping_add((row0 + r0) * d + job.h * dh + col0),
                    ldo: d,
                    rows: tile_rows,
                    cols: dh - col0,
                };
                // SAFETY: the caller gave this task these rows and columns of ctx alone.
                unsafe { pv_dispatch::<AVX>(w, tile) };
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Hint {
    L1,
    L2,
}

/// Requests the cache lines holding `x` (prefetches never fault, and change no results).
#[inline(always)]
fn prefetch(x: &[f32], hint: Hint) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = x.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(x);
        let mut o = 0;
        while o < bytes {
            // SAFETY: prefetching has no architectural effect; the address is inside `x`.
            unsafe {
                match hint {
                    Hint::L1 => _mm_prefetch::<_MM_HINT_T0>(p.add(o)),
                    Hint::L2 => _mm_prefetch::<_MM_HINT_T1>(p.add(o)),
                }
            }
            o += 64;
        }
        if bytes > 0 {
            // SAFETY: as above; the last value's line, when x does not start on a line.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.add(bytes - 1)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, hint);
}

/// Requests the cache lines of `len` values from `p` on for writing.
#[inline(always)]
fn prefetch_write(p: *mut f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = p.cast::<i8>();
        let bytes = 4 * len;
        let mut o = 0;
        while o < bytes {
            // SAFETY: prefetching never faults; wrapping_add keeps the address computation defined.
            unsafe { _mm_prefetch::<_MM_HINT_ET0>(p.wrapping_add(o)) };
            o += 64;
        }
        if bytes > 0 {
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_ET0>(p.wrapping_add(bytes - 1)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Transposes `rows` (≤ 16) rows of `cols` values at stride `ld` into `cols` vectors of 16 values at
/// stride `dst_ld`: `dst[c·dst_ld + i] = src[i·ld + c]`, 0 for `rows ≤ i < 16`.
#[inline(always)]
fn transpose_rows<const AVX: bool>(src: &[f32], ld: usize, rows: usize, cols: usize, dst: &mut [f32], dst_ld: usize) {
    if cols == 0 {
        return;
    }
    // Every source row and destination vector addressed below lies inside the slices.
    assert!(
        rows <= 16 && (rows == 0 || src.len() >= (rows - 1) * ld + cols) && dst.len() >= (cols - 1) * dst_ld + 16,
        "transpose_rows: slices too short"
    );
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: AVX is only true under AVX-512 F; bounds asserted above.
        unsafe { transpose_rows_avx512(src, ld, rows, cols, dst, dst_ld) };
        return;
    }
    for c in 0..cols {
        let d = &mut dst[c * dst_ld..c * dst_ld + 16];
        for (i, v) in d.iter_mut().enumerate() {
            *v = if i < rows { src[i * ld + c] } else { 0.0 };
        }
    }
}

/// [`transpose_rows`] by 16 × 16 blocks in registers, masked at the edges.
///
/// # Safety
/// The CPU must support AVX-512 F; the slices must be as long as `transpose_rows` asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_rows_avx512(src: &[f32], ld: usize, rows: usize, cols: usize, dst: &mut [f32], dst_ld: usize) {
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut c0 = 0;
    while c0 < cols {
        let width = (cols - c0).min(16);
        let col_mask = ((1u32 << width) - 1) as __mmask16;
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate().take(rows) {
            // SAFETY: row i < rows, columns c0.. < cols (masked): inside src.
            *v = unsafe { _mm512_maskz_loadu_ps(col_mask, s.add(i * ld + c0)) };
        }
        let t = crate::kernels::f32::transpose16(&r);
        for (c, v) in t.iter().enumerate().take(width) {
            // SAFETY: vector c0 + c < cols: inside dst.
            unsafe { _mm512_storeu_ps(d.add((c0 + c) * dst_ld), *v) };
        }
        c0 += 16;
    }
}


/// A q·kᵀ tile: rows `r0..r0 + QK_R` of the block against the key vectors of one panel.
struct QkTile<'a> {
    /// The tile's query rows, straight from qkv: row i's feature kk at `i · ldq + kk`, for i < rows.
    q: &'a [f32],
    ldq: usize,
    /// The key panel `[dh][NV · 16]`.
    kp: &'a [f32],
    dh: usize,
    scale: f32,
    /// The head's bias tensors from the tile's first (row, key) on: (row i, key c) at `i · ldb + c`.
    bias: [&'a [f32]; 2],
    ldb: usize,
    /// Rows of the tile below n (≥ 1; the others repeat the last, and are never used).
    rows: usize,
    /// Keys of the panel below n (may exceed the panel: then all are).
    cols: usize,
    /// Scores from (panel's first vector, row r0) on: (row i, vector v) at `(v · RB + i) · 16`.
    s: &'a mut [f32],
    /// Running maxima of the rows, 16 lanes per row, from row r0 on.
    mx: &'a mut [f32],
}

/// Runs the q·kᵀ tile with `w` (1..=QK_NV) key vectors and `nb` (0..=2) biases.
#[inline(always)]
fn qk_dispatch<const AVX: bool>(w: usize, nb: usize, t: QkTile<'_>) {
    let bias_len = (t.rows.max(1) - 1) * t.ldb + t.cols.min(16 * w);
    assert!(
        (1..=QK_NV).contains(&w)
            && nb <= 2
            && t.rows > 0
            && t.q.len() >= (t.rows - 1) * t.ldq + t.dh
            && t.kp.len() >= t.dh * w * 16
            && t.s.len() >= ((w - 1) * RB + QK_R) * 16
            && t.mx.len() >= QK_R * 16
            && t.bias.iter().take(nb).all(|b| b.len() >= bias_len),
        "qk tile: slices too short"
    );
    macro_rules! by_shape {
        ($f:ident) => {
            match (w, nb) {
                (1, 0) => $f::<QK_R, 1, 0>(t),
                (1, 1) => $f::<QK_R, 1, 1>(t),
                (1, _) => $f::<QK_R, 1, 2>(t),
                (2, 0) => $f::<QK_R, 2, 0>(t),
                (2, 1) => $f::<QK_R, 2, 1>(t),
                (2, _) => $f::<QK_R, 2, 2>(t),
                (3, 0) => $f::<QK_R, 3, 0>(t),
                (3, 1) => $f::<QK_R, 3, 1>(t),
                (3, _) => $f::<QK_R, 3, 2>(t),
                (_, 0) => $f::<QK_R, QK_NV, 0>(t),
                (_, 1) => $f::<QK_R, QK_NV, 1>(t),
                (_, _) => $f::<QK_R, QK_NV, 2>(t),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: AVX is only true under AVX-512 F; bounds asserted above.
        unsafe { by_shape!(qk_tile_avx512) };
        return;
    }
    by_shape!(qk_tile_portable)
}

/// Rows of the portable tiles' sub-tiles: 2 rows × 16 lanes of accumulators, and the 16 lanes they
/// multiply, fit the 16 SSE registers of baseline x86-64.
const SUB_R: usize = 2;
const _: () = assert!(QK_R.is_multiple_of(SUB_R) && PV_R.is_multiple_of(SUB_R));

/// `Σ_k x_i(k) · b(k)` for 2 rows i and 16 lanes, in order of k, `(b(k), [x_0(k), x_1(k)])` given by
/// `at`. One 16-lane array and loop per row: written so, the lane loops vectorize (as one 2-d array
/// they were left scalar).
#[inline(always)]
fn sub_tile<'a>(len: usize, at: impl Fn(usize) -> (&'a [f32; 16], [f32; SUB_R])) -> [[f32; 16]; SUB_R] {
    let (mut a0, mut a1) = ([0f32; 16], [0f32; 16]);
    for k in 0..len {
        let (b, [x0, x1]) = at(k);
        for l in 0..16 {
            a0[l] += x0 * b[l];
        }
        for l in 0..16 {
            a1[l] += x1 * b[l];
        }
    }
    [a0, a1]
}

/// The q·kᵀ tile in plain Rust, by sub-tiles of 2 rows × 16 keys; each score is the same sum in the
/// same order as in the AVX-512 tile. Kept out of line: inlined into the task, its lane loops were
/// vectorized worse (registers spilled).
#[inline(never)]
fn qk_tile_portable<const R: usize, const NV: usize, const NB: usize>(t: QkTile<'_>) {
    let row = |i: usize| {
        // Rows past n repeat the last one (computed, never used).
        let r = i.min(t.rows - 1);
        &t.q[r * t.ldq..r * t.ldq + t.dh]
    };
    for i0 in (0..R).step_by(SUB_R) {
        let (q0, q1) = (row(i0), row(i0 + 1));
        // Whole 16-lane arrays, so that the lane loops vectorize.
        let (keys, _) = t.kp.as_chunks::<16>();
        for v in 0..NV {
            let acc = sub_tile(t.dh, |kk| (&keys[kk * NV + v], [q0[kk], q1[kk]]));
            for (di, a) in acc.iter().enumerate() {
                let i = i0 + di;
                for (l, &a) in a.iter().enumerate() {
                    let col = 16 * v + l;
                    let valid = i < t.rows && col < t.cols;
                    let mut bias = 0f32;
                    if valid {
                        for b in t.bias.iter().take(NB) {
                            bias += b[i * t.ldb + col];
                        }
                    }
                    let s = bias + t.scale * a;
                    t.s[(v * RB + i) * 16 + l] = s;
                    if valid && s > t.mx[i * 16 + l] {
                        t.mx[i * 16 + l] = s;
                    }
                }
            }
        }
    }
}

/// The AVX-512 q·kᵀ tile: `R · NV` zmm accumulators, `NV` loads and `R` broadcasts per feature.
///
/// # Safety
/// The CPU must support AVX-512 F; the slices must be as long as `qk_dispatch` asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // indices with constant bounds keep the accumulators in registers
unsafe fn qk_tile_avx512<const R: usize, const NV: usize, const NB: usize>(t: QkTile<'_>) {
    // Row pointers; rows past n repeat the last one (computed, never used).
    let mut q = [t.q.as_ptr(); R];
    for (i, q) in q.iter_mut().enumerate() {
        *q = q.wrapping_add(i.min(t.rows - 1) * t.ldq);
    }
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    let mut k = t.kp.as_ptr();
    for kk in 0..t.dh {
        let mut kv = [_mm512_setzero_ps(); NV];
        for (v, x) in kv.iter_mut().enumerate() {
            // SAFETY: `k` steps NV · 16 values per feature through the dh · NV · 16 of the panel.
            *x = unsafe { _mm512_loadu_ps(k.add(16 * v)) };
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: feature kk < dh of a row < rows (asserted).
            let x = _mm512_set1_ps(unsafe { *q[i].add(kk) });
            for v in 0..NV {
                acc_row[v] = _mm512_fmadd_ps(x, kv[v], acc_row[v]);
            }
        }
        // SAFETY: at most one past the end of the values read above.
        k = unsafe { k.add(NV * 16) };
    }
    let mut masks = [0 as __mmask16; NV];
    for (v, m) in masks.iter_mut().enumerate() {
        *m = ((1u32 << t.cols.saturating_sub(16 * v).min(16)) - 1) as __mmask16;
    }
    let scale = _mm512_set1_ps(t.scale);
    let (s, mx) = (t.s.as_mut_ptr(), t.mx.as_mut_ptr());
    // Constant trip counts throughout, so that the accumulators stay in registers.
    for i in 0..R {
        let valid = i < t.rows;
        // SAFETY: row i < R of the maxima (asserted).
        let mut m = unsafe { _mm512_loadu_ps(mx.add(16 * i)) };
        for v in 0..NV {
            let mut bias = _mm512_setzero_ps();
            for b in 0..NB {
                if valid {
                    // SAFETY: masked to keys < n of row i < rows: inside the bias (asserted).
                    let x = unsafe { _mm512_maskz_loadu_ps(masks[v], t.bias[b].as_ptr().add(i * t.ldb + 16 * v)) };
                    bias = _mm512_add_ps(bias, x);
                }
            }
            let x = _mm512_fmadd_ps(acc[i][v], scale, bias);
            // SAFETY: (v · RB + i) · 16 + 16 ≤ ((NV - 1) · RB + R) · 16 ≤ s.len() (asserted).
            unsafe { _mm512_storeu_ps(s.add((v * RB + i) * 16), x) };
            m = _mm512_mask_max_ps(m, if valid { masks[v] } else { 0 }, m, x);
        }
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(mx.add(16 * i), m) };
    }
}

/// exp(x) for x ≤ 0 to about 1.5 ulp: x = (16m + k) ln2/16 + r with |r| ≤ ln2/32, exp(r) by its cubic
/// Taylor polynomial (truncation error 1e-8), 2^(k/16) from a table, m added to the exponent. Fewer
/// operations than a degree-6 polynomial on the whole ln2 interval: on Zen 4 the AVX-512 version takes
/// 3.3 instead of 4.4 ns per 16 values, and softmax is ~8% of attention.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // Clamped below (exp(-87.3) = 1.2e-38 is nothing next to the row's largest term, exp(0) = 1, and
    // 2^m stays a normal float); NaN passes through.
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    // N = round(16 x / ln2) by the float adder: it sits in t's low mantissa bits (1.5 · 2^23).
    let t = x * EXP_16_LOG2E + EXP_ROUND;
    let n = t - EXP_ROUND;
    let r = x - n * EXP_LN2_16_HI - n * EXP_LN2_16_LO;
    let p = ((EXP_C3 * r + 0.5) * r + 1.0) * r + 1.0;
    let bits = t.to_bits();
    // t's low 13 bits are N (two's complement, |N| < 2^12): shifted to the exponent field with k's
    // bits cleared they are m · 2^23, added to 2^(k/16)'s exponent.
    let scale = EXP_TABLE[(bits & 15) as usize]
        .to_bits()
        .wrapping_add((bits << 19) & 0xFF80_0000);
    p * f32::from_bits(scale)
}

const EXP_MIN: f32 = -87.3;
const EXP_ROUND: f32 = 12_582_912.0;
const EXP_16_LOG2E: f32 = 23.083_12;
/// ln2/16 in two parts; the high part has 12 significant bits, so N · hi is exact for |N| < 2^12.
const EXP_LN2_16_HI: f32 = 0.043_319_702;
const EXP_LN2_16_LO: f32 = 1.996_636_5e-6;
const EXP_C3: f32 = 1.0 / 6.0;
/// 2^(k/16), k = 0..16, rounded to f32.
const EXP_TABLE: [f32; 16] = [
    1.0,
    1.044_273_7,
    1.090_507_7,
    1.138_788_6,
    1.189_207_1,
    1.241_857_8,
    1.296_839_6,
    1.354_255_6,
    std::f32::consts::SQRT_2,
    1.476_826_2,
    1.542_210_8,
    1.610_490_3,
    1.681_792_9,
    1.756_252_2,
    1.834_008_1,
    1.915_206_6,
];

/// One row of the tile-major scores (key j at `(j / 16) · RB · 16 + j % 16`) given its 16-lane maxima:
/// `exp(s - max)` in place; returns 1 / Σ.
#[inline(always)]
fn softmax_row<const AVX: bool>(s: &mut [f32], n: usize, mx: &[f32]) -> f32 {
    let chunks = n.div_ceil(16);
    assert!(
        chunks > 0 && s.len() >= ((chunks - 1) * RB + 1) * 16 && mx.len() >= 16,
        "softmax row: slice too short"
    );
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: AVX is only true under AVX-512 F; bounds asserted above.
        return unsafe { softmax_row_avx512(s, n, mx) };
    }
    let m = mx[..16]
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    // Whole 16-lane lines, summed in 16 lanes as the AVX-512 kernel does, so that it vectorizes.
    let (lines, _) = s.as_chunks_mut::<16>();
    let mut acc = [0f32; 16];
    for c in 0..chunks {
        let line = &mut lines[c * RB];
        let valid = n - 16 * c;
        for l in 0..16 {
            let e = exp_f32(line[l] - m);
            line[l] = e;
            acc[l] += if l < valid { e } else { 0.0 };
        }
    }
    1.0 / acc.iter().sum::<f32>()
}

/// [`softmax_row`] on whole vectors, the sum masked at the last.
///
/// # Safety
/// The CPU must support AVX-512 F; the slices must be as long as `softmax_row` asserts, with n > 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(s: &mut [f32], n: usize, mx: &[f32]) -> f32 {
    let chunks = n.div_ceil(16);
    let p = s.as_mut_ptr();
    let tail = ((1u32 << (n - 16 * (chunks - 1))) - 1) as __mmask16;
    // SAFETY: mx holds 16 values (asserted).
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(unsafe { _mm512_loadu_ps(mx.as_ptr()) }));
    let mut sum = _mm512_setzero_ps();
    for c in 0..chunks {
        // SAFETY: chunk c < chunks of this row (asserted); the padding lanes (keys ≥ n) are written but
        // never read as probabilities.
        unsafe {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(c * RB * 16)), m));
            _mm512_storeu_ps(p.add(c * RB * 16), e);
            sum = _mm512_mask_add_ps(sum, if c + 1 == chunks { tail } else { 0xFFFF }, sum, e);
        }
    }
    1.0 / _mm512_reduce_add_ps(sum)
}

/// [`exp_f32`] on 16 lanes (with FMA where it has a multiply and an add, the table by `vpermps`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp512(x: __m512) -> __m512 {
    // max(min, x) returns x when x is NaN.
    let x = _mm512_max_ps(_mm512_set1_ps(EXP_MIN), x);
    let t = _mm512_fmadd_ps(x, _mm512_set1_ps(EXP_16_LOG2E), _mm512_set1_ps(EXP_ROUND));
    let n = _mm512_sub_ps(t, _mm512_set1_ps(EXP_ROUND));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_16_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_16_LO), r);
    let p = _mm512_fmadd_ps(_mm512_set1_ps(EXP_C3), r, _mm512_set1_ps(0.5));
    let p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    let p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    // SAFETY: EXP_TABLE is 16 f32.
    let table = unsafe { _mm512_loadu_ps(EXP_TABLE.as_ptr()) };
    let bits = _mm512_castps_si512(t);
    // vpermps reads the low 4 bits of each index: k = N mod 16.
    let tk = _mm512_castps_si512(_mm512_permutexvar_ps(bits, table));
    let m = _mm512_and_si512(_mm512_slli_epi32::<19>(bits), _mm512_set1_epi32(0xFF80_0000u32 as i32));
    _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_add_epi32(tk, m)))
}

/// A p·v tile: rows `r0..r0 + PV_R` of the block against `NV` vectors of output columns.
struct PvTile<'a> {
    /// Tile-major probabilities from row r0 on: (row i, key j) at `(j / 16) · RB · 16 + i · 16 + j % 16`.
    sp: &'a [f32],
    n: usize,
    /// Packed V from the tile's first column on: key j at `j · ldv`.
    vp: &'a [f32],
    ldv: usize,
    /// 1 / row sum, from row r0 on.
    inv: &'a [f32],
    /// ctx at (row r0, first column of the tile); rows at stride `ldo`.
    out: *mut f32,
    ldo: usize,
    /// Rows below n, and columns below dh (may exceed the tile: then all are).
    rows: usize,
    cols: usize,
}

/// Runs the p·v tile with `w` (1..=4) vectors of columns.
///
/// # Safety
/// `t.out` must point to `rows` rows (stride `ldo`) of `min(cols, 16 w)` writable values that no one
/// else accesses meanwhile; with `AVX`, the CPU must support AVX-512 F.
#[inline(always)]
unsafe fn pv_dispatch<const AVX: bool>(w: usize, t: PvTile<'_>) {
    let chunks = t.n.div_ceil(16);
    assert!(
        (1..=PV_NV).contains(&w)
            && t.n > 0
            && t.rows <= PV_R
            && t.sp.len() >= ((chunks - 1) * RB + PV_R) * 16
            && t.vp.len() >= (t.n - 1) * t.ldv + 16 * w
            && t.inv.len() >= t.rows,
        "pv tile: slices too short"
    );
    macro_rules! by_shape {
        ($f:ident) => {
            match w {
                1 => $f::<PV_R, 1>(t),
                2 => $f::<PV_R, 2>(t),
                3 => $f::<PV_R, 3>(t),
                _ => $f::<PV_R, PV_NV>(t),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: AVX is only true under AVX-512 F; bounds asserted above, output by the caller.
        unsafe { by_shape!(pv_tile_avx512) };
        return;
    }
    // SAFETY: as above.
    unsafe { by_shape!(pv_tile_portable) }
}

/// The p·v tile in plain Rust, by sub-tiles of 2 rows × 16 columns; each output is the same sum in the
/// same order as in the AVX-512 tile. Kept out of line, as qk_tile_portable.
///
/// # Safety
/// As [`pv_dispatch`].
#[inline(never)]
unsafe fn pv_tile_portable<const R: usize, const NV: usize>(t: PvTile<'_>) {
    for i0 in (0..R).step_by(SUB_R) {
        for c in 0..NV {
            // Key j's values at j · ldv / 16 + c, its probabilities of row i in line (j / 16) · RB + i,
            // lane j % 16.
            let (vs, _) = t.vp.as_chunks::<16>();
            let (lines, _) = t.sp.as_chunks::<16>();
            let acc = sub_tile(t.n, |j| {
                let line = (j / 16) * RB + i0;
                (
                    &vs[j * (t.ldv / 16) + c],
                    [lines[line][j % 16], lines[line + 1][j % 16]],
                )
            });
            for (di, a) in acc.iter().enumerate() {
                let i = i0 + di;
                if i >= t.rows {
                    continue;
                }
                for (l, &a) in a.iter().enumerate().take(t.cols.saturating_sub(16 * c)) {
                    // SAFETY: row i < rows, column 16c + l < cols of this tile (see pv_dispatch).
                    unsafe { *t.out.add(i * t.ldo + 16 * c + l) = a * t.inv[i] };
                }
            }
        }
    }
}

/// The AVX-512 p·v tile: `R · NV` zmm accumulators, `NV` loads and `R` broadcasts per key.
///
/// # Safety
/// As [`pv_dispatch`], with the CPU supporting AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // as in qk_tile_avx512
unsafe fn pv_tile_avx512<const R: usize, const NV: usize>(t: PvTile<'_>) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    let (mut p, mut v) = (t.sp.as_ptr(), t.vp.as_ptr());
    let mut j = 0;
    while j < t.n {
        for jj in 0..(t.n - j).min(16) {
            let mut vv = [_mm512_setzero_ps(); NV];
            for (c, x) in vv.iter_mut().enumerate() {
                // SAFETY: key j + jj < n of the packed V, columns < 16 · NV (asserted).
                *x = unsafe { _mm512_loadu_ps(v.add(16 * c)) };
            }
            for (i, acc_row) in acc.iter_mut().enumerate() {
                // SAFETY: row i < R of this key's line in the tile-major scores (asserted).
                let x = _mm512_set1_ps(unsafe { *p.add(i * 16 + jj) });
                for c in 0..NV {
                    acc_row[c] = _mm512_fmadd_ps(x, vv[c], acc_row[c]);
                }
            }
            // SAFETY: at most one row past the packed V.
            v = unsafe { v.add(t.ldv) };
        }
        // The next 16 keys' lines; wrapping: past the end after the last chunk, never read.
        p = p.wrapping_add(RB * 16);
        j += 16;
    }
    let mut masks = [0 as __mmask16; NV];
    for (c, m) in masks.iter_mut().enumerate() {
        *m = ((1u32 << t.cols.saturating_sub(16 * c).min(16)) - 1) as __mmask16;
    }
    // Constant trip counts, so that the accumulators stay in registers.
    for i in 0..R {
        if i < t.rows {
            let inv = _mm512_set1_ps(t.inv[i]);
            for c in 0..NV {
                // SAFETY: masked to columns < cols of row i < rows (see pv_dispatch).
                unsafe {
                    _mm512_mask_storeu_ps(
                        t.out.wrapping_add(i * t.ldo + 16 * c),
                        masks[c],
                        _mm512_mul_ps(acc[i][c], inv),
                    )
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU runs, the portable one first.
    fn kernels() -> Vec<AttentionKernel> {
        let all = [AttentionKernel::Portable, AttentionKernel::Avx512];
        let k: Vec<_> = all.into_iter().filter(|k| k.is_available()).collect();
        if k.len() < all.len() {
            static NOTE: std::sync::Once = std::sync::Once::new();
            NOTE.call_once(|| eprintln!("note: only {k:?} run on this CPU and are tested"));
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

    fn run(
        kernel: AttentionKernel,
        qkv: &[f32],
        batch: usize,
        n: usize,
        heads: usize,
        dh: usize,
        biases: &[Vec<f32>],
    ) -> Vec<f32> {
        let b: Vec<&[f32]> = biases.iter().map(|b| &b[..]).collect();
        // NaN everywhere first: every output must be written.
        let mut ctx = vec![f32::NAN; batch * n * heads * dh];
        attention_using(kernel, qkv, &mut ctx, batch, n, heads, dh, &b).unwrap();
        ctx
    }

    /// The f64 reference, and per output Σ_j p_j |v_j| (the scale its rounding error is relative to).
    fn reference(
        qkv: &[f32],
        batch: usize,
        n: usize,
        heads: usize,
        dh: usize,
        biases: &[Vec<f32>],
    ) -> (Vec<f64>, Vec<f64>) {
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
                let (want, mag) = reference(&qkv, batch, n, heads, dh, &biases);
                for kernel in kernels() {
                    let got = run(kernel, &qkv, batch, n, heads, dh, &biases);
                    let err = worst_error(&got, &want, &mag);
                    assert!(
                        err < 1e-5,
                        "{kernel:?} batch {batch}, n {n}, {heads}x{dh}, {nb} biases: error {err:e}"
                    );
                    let k = (kernel == AttentionKernel::Avx512) as usize;
                    worst[k] = worst[k].max(err);
                }
            }
        }
        eprintln!("worst error relative to sum p|v|: portable {:e}, avx512 {:e}", worst[0], worst[1]);
    }

    /// BEiT-base's shape (197 tokens, 12 x 64), two relative position biases.
    #[test]
    fn matches_f64_reference_on_beit_base() {
        let (qkv, biases) = inputs(7, 2, 197, 12, 64, 2, 0.5);
        let (want, mag) = reference(&qkv, 2, 197, 12, 64, &biases);
        let big = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for kernel in kernels() {
            let got = run(kernel, &qkv, 2, 197, 12, 64, &biases);
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

    /// The AVX-512 kernel agrees with the portable one up to rounding (FMA, the order of the final lane
    /// sums).
    #[test]
    fn kernels_agree_with_the_portable_one() {
        for &(batch, n, heads, dh, nb) in &[
            (2usize, 197usize, 12usize, 64usize, 2usize),
            (1, 33, 3, 80, 1),
            (3, 7, 2, 8, 0),
        ] {
            let (qkv, biases) = inputs(11, batch, n, heads, dh, nb, 1.0);
            let a = run(AttentionKernel::Portable, &qkv, batch, n, heads, dh, &biases);
            let big = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            for kernel in kernels().into_iter().skip(1) {
                let b = run(kernel, &qkv, batch, n, heads, dh, &biases);
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
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap()
                        .install(|| run(kernel, &qkv, batch, n, heads, dh, &biases))
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
        let kernel = AttentionKernel::detect();
        let serial: Vec<Vec<f32>> = cases
            .iter()
            .enumerate()
            .map(|(s, (q, b))| run(kernel, q, 1, 50 + 7 * s, 4, 32, b))
            .collect();
        let parallel: Vec<Vec<f32>> = cases
            .par_iter()
            .enumerate()
            .map(|(s, (q, b))| run(kernel, q, 1, 50 + 7 * s, 4, 32, b))
            .collect();
        for (s, p) in serial.iter().zip(&parallel) {
            assert!(s.iter().zip(p).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    /// One token attends only to itself: ctx = v exactly; uniform scores average v.
    #[test]
    fn degenerate_inputs_give_exact_answers() {
        for kernel in kernels() {
            let (qkv, _) = inputs(3, 2, 1, 3, 16, 0, 0.0);
            let ctx = run(kernel, &qkv, 2, 1, 3, 16, &[]);
            for b in 0..2 {
                assert_eq!(ctx[b * 48..(b + 1) * 48], qkv[b * 144 + 96..b * 144 + 144]);
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
            let ctx = run(kernel, &qkv, 1, n, 1, dh, &[]);
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

    /// exp against f64 over the whole range softmax feeds it (x - max ≤ 0), portable and AVX-512.
    #[test]
    fn exp_is_within_two_ulp() {
        let xs: Vec<f32> = (0..=200_000)
            .map(|i| -87.0 * i as f32 / 200_000.0)
            .chain([0.0, -1e-30, -1e-7])
            .collect();
        let mut worst = [0f64; 2];
        for &x in &xs {
            let exact = (x as f64).exp();
            worst[0] = worst[0].max((exp_f32(x) as f64 - exact).abs() / exact);
            #[cfg(target_arch = "x86_64")]
            if AttentionKernel::Avx512.is_available() {
                // SAFETY: the CPU has AVX-512 F.
                let y = unsafe { exp512_lane0(x) };
                worst[1] = worst[1].max((y as f64 - exact).abs() / exact);
            }
        }
        // One ulp of a float in [1, 2) is 1.19e-7 relative.
        assert!(worst[0] < 2.4e-7 && worst[1] < 2.4e-7, "relative errors {worst:?}");
        eprintln!("exp relative error: portable {:e}, avx512 {:e}", worst[0], worst[1]);
        // Far below the clamp: tiny and finite; NaN stays NaN.
        assert!(exp_f32(-1e30) < 1.3e-38 && exp_f32(f32::NEG_INFINITY) >= 0.0 && exp_f32(f32::NAN).is_nan());
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn exp512_lane0(x: f32) -> f32 {
        _mm512_cvtss_f32(exp512(_mm512_set1_ps(x)))
    }

    /// More than two bias tensors are summed per head first; the result is the same attention.
    #[test]
    fn three_biases_match_the_reference() {
        let (qkv, biases) = inputs(9, 2, 30, 3, 16, 3, 1.0);
        let (want, mag) = reference(&qkv, 2, 30, 3, 16, &biases);
        for kernel in kernels() {
            let got = run(kernel, &qkv, 2, 30, 3, 16, &biases);
            let err = worst_error(&got, &want, &mag);
            assert!(err < 1e-5, "{kernel:?}: {err:e}");
        }
    }
}

/// Timing probes for tuning (ignored by default; the comparison with the previous attention is the
/// `attention_timing` example). `cargo test --release -p beit --lib attention::perf_probe -- --ignored --nocapture`.
#[cfg(all(test, target_arch = "x86_64"))]
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

    /// One head (n = 197, dh = 64) with its data in cache, and its phases alone.
    #[test]
    #[ignore]
    fn phases() {
        if !AttentionKernel::Avx512.is_available() {
            return;
        }
        let (n, dh) = (197usize, 64usize);
        let mut rng = crate::rng::Rng::new(1);
        let qkv = rng.symmetric_f32(n * 3 * dh, 1.0);
        let bias = rng.symmetric_f32(n * n, 0.1);
        let biases = [&bias[..], &bias[..]];
        let mut ctx = vec![0f32; n * dh];
        let flops = 4.0 * (n * n * dh) as f64;
        for nb in 0..3 {
            let sh = Shape::new(n, 1, dh, nb).unwrap();
            let mut scratch = AlignedF32::default();
            scratch.ensure(sh.scratch_len);
            let s = scratch.as_mut_slice();
            let job = Job {
                sh: &sh,
                qkv: &qkv,
                biases: &biases[..nb],
                h: 0,
                blk0: 0,
                blk1: sh.blocks,
                out: ctx.as_mut_ptr(),
                ahead: None,
            };
            let reps = 5;
            let full = min_time(400, || {
                for _ in 0..reps {
                    unsafe { task_avx512(&job, s) }
                }
            }) / reps as f64;
            println!(
                "one head, {nb} biases: {:7.1} us = {:6.1} GFLOP/s",
                full * 1e6,
                flops / full / 1e9
            );
        }
        {
            let sh = Shape::new(n, 1, dh, 1).unwrap();
            let mut scratch = AlignedF32::default();
            scratch.ensure(sh.scratch_len);
            let s = scratch.as_mut_slice();
            let job = Job {
                sh: &sh,
                qkv: &qkv,
                biases: &biases[..1],
                h: 0,
                blk0: 0,
                blk1: sh.blocks,
                out: ctx.as_mut_ptr(),
                ahead: None,
            };
            let full = min_time(20, || unsafe { task_generic::<false>(&job, s) });
            println!(
                "one head, portable: {:7.1} us = {:6.1} GFLOP/s",
                full * 1e6,
                flops / full / 1e9
            );
        }
        let qp = vec![0.5f32; 8 * 3 * dh];
        let kp = vec![0.25f32; dh * 16 * QK_NV];
        let mut sp = vec![0f32; QK_NV * RB * 16];
        let mut mx = vec![0f32; RB * 16];
        let reps = 500;
        for nb in 0..3 {
            let t = min_time(400, || {
                for _ in 0..reps {
                    let tile = QkTile {
                        q: &qp,
                        ldq: 3 * dh,
                        kp: &kp,
                        dh,
                        scale: 0.125,
                        bias: [&bias, &bias],
                        ldb: n,
                        rows: QK_R,
                        cols: 16 * QK_NV,
                        s: &mut sp,
                        mx: &mut mx,
                    };
                    qk_dispatch::<true>(QK_NV, nb, tile)
                }
            });
            println!(
                "qk tile {QK_R}x{}, dh {dh}, {nb} biases: {:6.1} GFLOP/s",
                16 * QK_NV,
                2.0 * (QK_R * 16 * QK_NV * dh * reps) as f64 / t / 1e9
            );
        }
        for w in 1..QK_NV {
            let t = min_time(400, || {
                for _ in 0..reps {
                    let tile = QkTile {
                        q: &qp,
                        ldq: 3 * dh,
                        kp: &kp,
                        dh,
                        scale: 0.125,
                        bias: [&bias, &bias],
                        ldb: n,
                        rows: QK_R,
                        cols: 16 * w,
                        s: &mut sp,
                        mx: &mut mx,
                    };
                    qk_dispatch::<true>(w, 1, tile)
                }
            });
            println!(
                "qk tile {QK_R}x{}, dh {dh}, 1 bias: {:6.1} GFLOP/s",
                16 * w,
                2.0 * (QK_R * 16 * w * dh * reps) as f64 / t / 1e9
            );
        }
        let chunks = n.div_ceil(16);
        let sp = vec![0.01f32; chunks * RB * 16];
        let vp = vec![0.5f32; n * 64];
        let inv = [1f32; RB];
        let reps = 100;
        let t = min_time(400, || {
            for _ in 0..reps {
                let tile = PvTile {
                    sp: &sp,
                    n,
                    vp: &vp,
                    ldv: 64,
                    inv: &inv,
                    out: ctx.as_mut_ptr(),
                    ldo: 64,
                    rows: 6,
                    cols: 64,
                };
                unsafe { pv_dispatch::<true>(4, tile) }
            }
        });
        println!(
            "pv tile 6x64, n {n}: {:6.1} GFLOP/s",
            2.0 * (6 * 64 * n * reps) as f64 / t / 1e9
        );
        let mut sp = vec![-0.5f32; chunks * RB * 16];
        let t = min_time(400, || {
            for _ in 0..10 {
                for i in 0..RB {
                    let m = [0f32; 16];
                    softmax_row::<true>(&mut sp[i * 16..], n, &m);
                }
            }
        });
        let row = t / (10 * RB) as f64;
        println!(
            "softmax: {:6.1} ns per row, {:5.1} us per head",
            row * 1e9,
            row * n as f64 * 1e6
        );
        #[target_feature(enable = "avx512f")]
        fn exp_stream(x: &mut [f32]) {
            for c in x.chunks_exact_mut(16) {
                unsafe { _mm512_storeu_ps(c.as_mut_ptr(), exp512(_mm512_loadu_ps(c.as_ptr()))) };
            }
        }
        let mut xs = vec![-0.5f32; 4096];
        let t = min_time(400, || {
            for _ in 0..10 {
                xs.iter_mut().for_each(|v| *v = -v.abs());
                unsafe { exp_stream(&mut xs) };
            }
        });
        println!(
            "exp512 stream: {:5.2} ns per vector (incl. abs pass)",
            t / 10.0 / 256.0 * 1e9
        );
        let mut kt = vec![0f32; chunks * 16 * dh];
        let t = min_time(400, || {
            for _ in 0..10 {
                for gc in 0..chunks {
                    let (c0, c) = (gc / QK_NV * QK_NV, gc % QK_NV);
                    let w = (chunks - c0).min(QK_NV);
                    let key0 = 16 * gc;
                    let panel = &mut kt[c0 * 16 * dh..(c0 + w) * 16 * dh];
                    transpose_rows::<true>(
                        &qkv[dh + key0 * 3 * dh..],
                        3 * dh,
                        (n - key0).min(16),
                        dh,
                        &mut panel[16 * c..],
                        16 * w,
                    );
                }
            }
        });
        println!("pack K: {:5.1} us per head", t / 10.0 * 1e6);
    }
}
