//! The AVX-512 attention kernel (see the parent module for the layout and the API).
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
//! 2. Per row: `exp(s - max)` in place ([`math::exp512`](crate::kernels::math::exp512) on each line),
//!    and the sum; the row is *not* normalised here.
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

use std::arch::x86_64::*;
use std::cell::Cell;

use rayon::prelude::*;

use super::{AttentionShape, SendPtr};
use crate::kernels::f32::AlignedF32;
use crate::kernels::math::exp512;

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

thread_local! {
    /// One task's packed K and V, scores, row maxima and sums. Taken out for the duration of a task (and
    /// put back after), so a nested call on the same thread (rayon work stealing) allocates its own.
    static SCRATCH: Cell<AlignedF32> = Cell::new(AlignedF32::default());
}

/// The attention of checked, non-empty shapes (see [`super::attention`]); None when the scratch size
/// overflows.
///
/// # Safety
/// The CPU must support AVX-512 F.
pub(super) unsafe fn attention(qkv: &[f32], ctx: &mut [f32], shape: AttentionShape, biases: &[&[f32]]) -> Option<()> {
    let (batch, n, heads, dh) = shape.dims();
    let d = heads * dh;
    let sh = Shape::new(n, heads, dh, biases.len())?;
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
        // SAFETY: the caller checked that the CPU has AVX-512; this task alone writes columns h·dh.. of
        // rows of blocks blk0..blk1 of image b (inside ctx, whose length was checked).
        unsafe { task(&job, scratch.as_mut_slice()) };
        if scratch.capacity_bytes() <= SCRATCH_KEEP_BYTES {
            SCRATCH.with(|s| s.set(scratch));
        }
    };
    if threads == 1 || tasks == 1 {
        (0..tasks).for_each(one);
    } else {
        (0..tasks).into_par_iter().for_each(one);
    }
    Some(())
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

/// Packs head `job.h`'s K and V, then computes its query row blocks.
///
/// # Safety
/// The CPU must support AVX-512 F; `job.out` must point to `n` rows of `d` values of which columns
/// `h·dh..(h+1)·dh` of this task's rows are written by no one else meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn task(job: &Job<'_>, scratch: &mut [f32]) {
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
        // SAFETY: AVX-512 F (this function's own).
        unsafe {
            transpose_rows(
                &k_src[key0 * ld..],
                ld,
                (n - key0).min(16),
                dh,
                &mut panel[16 * c..],
                16 * w,
            )
        };
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
                // SAFETY: AVX-512 F (this function's own).
                unsafe { qk_dispatch(w, nb, tile) };
            }
        }
        for (i, inv) in inv.iter_mut().enumerate().take(rows) {
            // SAFETY: AVX-512 F (this function's own).
            *inv = unsafe { softmax_row(&mut sp[i * 16..], n, &mx[i * 16..(i + 1) * 16]) };
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
                unsafe { pv_dispatch(w, tile) };
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Hint {
    L1,
    L2,
}

/// Calls `fetch` on each cache line of the `bytes` bytes from `p` on, the last one included when `p` does
/// not start a line.
#[inline(always)]
fn each_line(p: *const i8, bytes: usize, fetch: impl Fn(*const i8)) {
    let mut o = 0;
    while o < bytes {
        fetch(p.wrapping_add(o));
        o += 64;
    }
    if bytes > 0 {
        fetch(p.wrapping_add(bytes - 1));
    }
}

/// Requests the cache lines holding `x` (prefetches never fault, and change no results).
#[inline(always)]
fn prefetch(x: &[f32], hint: Hint) {
    // SAFETY: prefetching has no architectural effect; the addresses are inside `x`.
    each_line(x.as_ptr().cast(), std::mem::size_of_val(x), |p| unsafe {
        match hint {
            Hint::L1 => _mm_prefetch::<_MM_HINT_T0>(p),
            Hint::L2 => _mm_prefetch::<_MM_HINT_T1>(p),
        }
    });
}

/// Requests the cache lines of `len` values from `p` on for writing.
#[inline(always)]
fn prefetch_write(p: *mut f32, len: usize) {
    // SAFETY: prefetching never faults; wrapping_add keeps the address computation defined.
    each_line(p.cast_const().cast(), 4 * len, |p| unsafe {
        _mm_prefetch::<_MM_HINT_ET0>(p)
    });
}

/// Transposes `rows` (≤ 16) rows of `cols` values at stride `ld` into `cols` vectors of 16 values at
/// stride `dst_ld`: `dst[c·dst_ld + i] = src[i·ld + c]`, 0 for `rows ≤ i < 16`.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn transpose_rows(src: &[f32], ld: usize, rows: usize, cols: usize, dst: &mut [f32], dst_ld: usize) {
    if cols == 0 {
        return;
    }
    // Every source row and destination vector addressed below lies inside the slices.
    assert!(
        rows <= 16 && (rows == 0 || src.len() >= (rows - 1) * ld + cols) && dst.len() >= (cols - 1) * dst_ld + 16,
        "transpose_rows: slices too short"
    );
    // SAFETY: AVX-512 F by the caller; bounds asserted above.
    unsafe { transpose_rows_avx512(src, ld, rows, cols, dst, dst_ld) };
}

/// [`transpose_rows`] by 16 × 16 blocks in registers, masked at the edges.
///
/// # Safety
/// The CPU must support AVX-512 F; the slices must be as long as `transpose_rows` asserts.
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
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline(always)]
unsafe fn qk_dispatch(w: usize, nb: usize, t: QkTile<'_>) {
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
    // SAFETY: AVX-512 F by the caller; bounds asserted above.
    unsafe { by_shape!(qk_tile_avx512) }
}

/// The AVX-512 q·kᵀ tile: `R · NV` zmm accumulators, `NV` loads and `R` broadcasts per feature.
///
/// # Safety
/// The CPU must support AVX-512 F; the slices must be as long as `qk_dispatch` asserts.
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

/// One row of the tile-major scores (key j at `(j / 16) · RB · 16 + j % 16`) given its 16-lane maxima:
/// `exp(s - max)` in place ([`exp512`] on whole vectors, the sum masked at the last); returns 1 / Σ.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn softmax_row(s: &mut [f32], n: usize, mx: &[f32]) -> f32 {
    let chunks = n.div_ceil(16);
    assert!(
        chunks > 0 && s.len() >= ((chunks - 1) * RB + 1) * 16 && mx.len() >= 16,
        "softmax row: slice too short"
    );
    let p = s.as_mut_ptr();
    let tail = ((1u32 << (n - 16 * (chunks - 1))) - 1) as __mmask16;
    // SAFETY: mx holds 16 values (asserted).
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(unsafe { _mm512_loadu_ps(mx.as_ptr()) }));
    let mut sum = _mm512_setzero_ps();
    for c in 0..chunks {
        // SAFETY: line c < chunks of this row (asserted); the CPU has AVX-512 F (the caller's). The padding
        // lanes (keys ≥ n) are written but never summed or read as probabilities.
        unsafe {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(c * RB * 16)), m));
            _mm512_storeu_ps(p.add(c * RB * 16), e);
            sum = _mm512_mask_add_ps(sum, if c + 1 == chunks { tail } else { 0xFFFF }, sum, e);
        }
    }
    1.0 / _mm512_reduce_add_ps(sum)
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
/// else accesses meanwhile; the CPU must support AVX-512 F.
#[inline(always)]
unsafe fn pv_dispatch(w: usize, t: PvTile<'_>) {
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
    // SAFETY: AVX-512 F and the output by the caller; bounds asserted above.
    unsafe { by_shape!(pv_tile_avx512) }
}

/// The AVX-512 p·v tile: `R · NV` zmm accumulators, `NV` loads and `R` broadcasts per key.
///
/// # Safety
/// As [`pv_dispatch`], with the CPU supporting AVX-512 F.
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

/// Timing probes for tuning (ignored by default; the comparison with the portable kernel is the
/// `attention_timing` example). `cargo test --release -p beit --lib attention::avx512::perf_probe -- --ignored --nocapture`.
#[cfg(test)]
mod perf_probe {
    use super::*;
    use std::time::Instant;
    use crate::kernels::math::exp_line;

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
        if !crate::kernels::cpu::features().avx512 {
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
                    unsafe { task(&job, s) }
                }
            }) / reps as f64;
            println!(
                "one head, {nb} biases: {:7.1} us = {:6.1} GFLOP/s",
                full * 1e6,
                flops / full / 1e9
            );
        }
        let qp = vec![0.5f32; 8 * 3 * dh];
        let kp = vec![0.25f32; dh * 16 * QK_NV];
        let mut sp = vec![0f32; QK_NV * RB * 16];
        let mut mx = vec![0f32; RB * 16];
        let reps = 500;
        // Full panels with 0-2 biases, then narrower ones with one.
        for (w, nb) in (0..3).map(|nb| (QK_NV, nb)).chain((1..QK_NV).map(|w| (w, 1))) {
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
                    unsafe { qk_dispatch(w, nb, tile) }
                }
            });
            println!(
                "qk tile {QK_R}x{}, dh {dh}, {nb} biases: {:6.1} GFLOP/s",
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
                unsafe { pv_dispatch(4, tile) }
            }
        });
        println!(
            "pv tile 6x64, n {n}: {:6.1} GFLOP/s",
            2.0 * (6 * 64 * n * reps) as f64 / t / 1e9
        );
        #[target_feature(enable = "avx512f")]
        fn softmax_rows(sp: &mut [f32], n: usize) {
            for i in 0..RB {
                unsafe { softmax_row(&mut sp[i * 16..], n, &[0f32; 16]) };
            }
        }
        let mut sp = vec![-0.5f32; chunks * RB * 16];
        let t = min_time(400, || {
            for _ in 0..10 {
                unsafe { softmax_rows(&mut sp, n) };
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
            let mut acc = [0f32; 16];
            for c in x.as_chunks_mut::<16>().0 {
                exp_line(c, 0.0, &mut acc, 16);
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
            "exp stream: {:5.2} ns per vector (incl. abs pass)",
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
                    unsafe {
                        transpose_rows(
                            &qkv[dh + key0 * 3 * dh..],
                            3 * dh,
                            (n - key0).min(16),
                            dh,
                            &mut panel[16 * c..],
                            16 * w,
                        )
                    };
                }
            }
        });
        println!("pack K: {:5.1} us per head", t / 10.0 * 1e6);
    }
}
