//! Differentiable CPU ops for the segmentation heads (feature pyramid, UperNet, FCN): Conv2d, ConvTranspose2d with
//! kernel = stride, and BatchNorm on the batch's statistics (ReLU optionally fused), as candle custom ops whose
//! forward and backward passes are GEMMs plus single passes over the data.
//!
//! Why: candle's CPU conv2d backward runs conv_transpose2d as scalar loops, its conv_transpose2d is a direct loop,
//! and BatchNorm from composite ops is a dozen passes each way; segmentation training spent most of its time there.
//!
//! Every sum runs in one fixed order whatever the thread count (gemm splits the output over threads, never k;
//! per-channel sums run on one thread each), so a run and its resume agree bit for bit. Inputs that are not f32
//! CPU tensors take candle's own ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, values, with_values, CResult};
use crate::error::Result;

/// im2col buffers hold at most this many values (4 MB): big maps are done a band of output rows at a time, so
/// that memory stays bounded and the band is still in cache for its GEMM.
const TILE_VALUES: usize = 1 << 20;

fn dims4(l: &Layout, what: &str) -> CResult<(usize, usize, usize, usize)> {
    match l.dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        d => candle_core::bail!("{what}: shape {d:?}, expected 4 dimensions"),
    }
}

/// A strided matrix: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// One past the last index a `rows × cols` matrix at strides `rs`, `cs` reaches.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst = a · b` (`dst += a · b` when `accumulate`) for `a` m × k, `b` k × n; dst element (i, j) at
/// `dst[i * rs + j * cs]`. On rayon's current pool; gemm splits the output over threads and runs each k in one
/// order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    rs: usize,
    cs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    m: usize,
    n: usize,
    k: usize,
) -> CResult<()> {
    if span(m, n, rs, cs) > dst.len() || span(m, k, a.rs, a.cs) > a.data.len() || span(k, n, b.rs, b.cs) > b.data.len()
    {
        candle_core::bail!("matmul: a {m}x{k} by {k}x{n} product reaches outside its buffers");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| (0..n).for_each(|j| dst[i * rs + j * cs] = 0.0));
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: every element the three strided views reach lies inside its slice (checked above), and dst is
    // borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            cs as isize,
            rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Per-output-channel sums of `g` (batch, channels, plane) in f64, channel by channel in a fixed order.
fn channel_sums(g: &[f32], channels: usize, plane: usize) -> Vec<f32> {
    let batch = g.len().checked_div(channels * plane).unwrap_or(0);
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let mut s = 0f64;
            for b in 0..batch {
                s += g[(b * channels + c) * plane..][..plane].iter().map(|&v| v as f64).sum::<f64>();
            }
            s as f32
        })
        .collect()
}

/// A convolution's sizes, as torch.nn.Conv2d (groups 1).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &Layout, w: &Layout, stride: usize, pad: usize, dil: usize) -> CResult<Self> {
        let (batch, c, h, wd) = dims4(x, "conv2d input")?;
        let (o, wc, kh, kw) = dims4(w, "conv2d weight")?;
        if wc != c {
            candle_core::bail!("conv2d: the input has {c} channels, the weight expects {wc}");
        }
        if stride == 0 || dil == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: stride {stride}, dilation {dil}, kernel {kh}x{kw} (each must be positive)");
        }
        let out = |i: usize, k: usize| -> CResult<usize> {
            let reach = dil * (k - 1) + 1;
            if i + 2 * pad < reach {
                candle_core::bail!("conv2d: a {h}x{wd} input padded by {pad} is smaller than the {kh}x{kw} kernel");
            }
            Ok((i + 2 * pad - reach) / stride + 1)
        };
        let (ho, wo) = (out(h, kh)?, out(wd, kw)?);
        Ok(Geometry { batch, c, h, w: wd, o, kh, kw, stride, pad, dil, ho, wo })
    }

    /// Rows of the im2col matrix: (c, ki, kj), the weight's order.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn out_plane(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1×1 convolution at stride 1 without padding: the input image is its own im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Output rows per band.
    fn band(&self) -> usize {
        if self.pointwise() {
            self.ho.max(1)
        } else {
            (TILE_VALUES / (self.k() * self.wo).max(1)).clamp(1, self.ho.max(1))
        }
    }

    /// The input row that output row `out` reads at kernel row `k` (None in the padding).
    fn source(&self, out: usize, k: usize, size: usize) -> Option<usize> {
        (out * self.stride + k * self.dil).checked_sub(self.pad).filter(|&i| i < size)
    }

    /// The output columns `lo..hi` whose kernel column `k` lands inside the input (not in the padding), and the
    /// input column that `lo` reads (each next one `stride` further): `(lo, hi, first)`, `lo == hi` when none.
    fn columns(&self, k: usize, out: usize, size: usize) -> (usize, usize, usize) {
        let off = k * self.dil;
        let lo = self.pad.saturating_sub(off).div_ceil(self.stride).min(out);
        let hi = if size + self.pad > off { (size + self.pad - off).div_ceil(self.stride).min(out) } else { 0 };
        let hi = hi.max(lo);
        (lo, hi, (lo * self.stride + off).saturating_sub(self.pad))
    }

    /// The im2col matrix of output rows `oy0..oy1` of one image `x` (c, h, w): row (c, ki, kj), column (oy, ox).
    fn im2col(&self, x: &[f32], oy0: usize, oy1: usize, cols: &mut [f32]) {
        let (pt, kk) = ((oy1 - oy0) * self.wo, self.kh * self.kw);
        cols[..self.k() * pt].par_chunks_mut(pt.max(1)).with_min_len(8).enumerate().for_each(|(r, row)| {
            let (c, ki, kj) = (r / kk, (r % kk) / self.kw, r % self.kw);
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            let (lo, hi, first) = self.columns(kj, self.wo, self.w);
            for (out, oy) in row.chunks_exact_mut(self.wo).zip(oy0..oy1) {
                let Some(iy) = self.source(oy, ki, self.h) else {
                    out.fill(0.0);
                    continue;
                };
                let src = &plane[iy * self.w..(iy + 1) * self.w];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                if lo == hi {
                    continue;
                }
                if self.stride == 1 {
                    out[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                } else {
                    for (v, ix) in out[lo..hi].iter_mut().zip((first..).step_by(self.stride)) {
                        *v = src[ix];
                    }
                }
            }
        });
    }

    /// Adds the im2col-shaped gradient `dcols` of output rows `oy0..oy1` into one image's input gradient `dx`.
    fn col2im(&self, dcols: &[f32], oy0: usize, oy1: usize, dx: &mut [f32]) {
        let (pt, kk) = ((oy1 - oy0) * self.wo, self.kh * self.kw);
        dx.par_chunks_mut((self.h * self.w).max(1)).enumerate().for_each(|(c, plane)| {
            for r in c * kk..(c + 1) * kk {
                let (ki, kj) = ((r % kk) / self.kw, r % self.kw);
                let (lo, hi, first) = self.columns(kj, self.wo, self.w);
                if lo == hi {
                    continue;
                }
                let row = &dcols[r * pt..(r + 1) * pt];
                for (g, oy) in row.chunks_exact(self.wo).zip(oy0..oy1) {
                    let Some(iy) = self.source(oy, ki, self.h) else { continue };
                    let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
                    if self.stride == 1 {
                        dst[first..first + hi - lo].iter_mut().zip(&g[lo..hi]).for_each(|(d, v)| *d += v);
                    } else {
                        for (v, ix) in g[lo..hi].iter().zip((first..).step_by(self.stride)) {
                            dst[ix] += v;
                        }
                    }
                }
            }
        });
    }
}

/// Conv2d (groups 1) as im2col and GEMM, both ways.
#[derive(Debug, Clone, Copy)]
struct Conv2dOp {
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Conv2dOp {
    fn geometry(&self, x: &Layout, w: &Layout) -> CResult<Geometry> {
        Geometry::new(x, w, self.stride, self.padding, self.dilation)
    }

    fn forward(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geometry) -> CResult<(CpuStorage, Shape)> {
        let (k, p, band) = (g.k(), g.out_plane(), g.band());
        let mut y = vec![0f32; g.batch * g.o * p];
        let mut cols = if g.pointwise() { Vec::new() } else { vec![0f32; k * band * g.wo] };
        let weight = Mat { data: w, rs: k, cs: 1 };
        for (xb, yb) in x.chunks_exact((g.c * g.h * g.w).max(1)).zip(y.chunks_exact_mut(g.o * p)) {
            for oy0 in (0..g.ho).step_by(band) {
                let oy1 = (oy0 + band).min(g.ho);
                let pt = (oy1 - oy0) * g.wo;
                let rhs = if g.pointwise() {
                    Mat { data: &xb[oy0 * g.wo..], rs: p, cs: 1 }
                } else {
                    g.im2col(xb, oy0, oy1, &mut cols);
                    Mat { data: &cols, rs: pt, cs: 1 }
                };
                matmul(&mut yb[oy0 * g.wo..], p, 1, false, weight, rhs, g.o, pt, k)?;
            }
            if let Some(bias) = bias {
                for (plane, b) in yb.chunks_exact_mut(p.max(1)).zip(bias) {
                    plane.iter_mut().for_each(|v| *v += b);
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((g.batch, g.o, g.ho, g.wo))))
    }

    /// `(dx, dw, dbias)` from the output gradient `dy`; dx only when `x` is part of the graph.
    fn backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor, bias: bool) -> CResult<[Option<Tensor>; 3]> {
        let g = self.geometry(x.layout(), w.layout())?;
        let (k, p, band) = (g.k(), g.out_plane(), g.band());
        let want_dx = x.track_op();
        let mut dw = vec![0f32; g.o * k];
        let mut dx = if want_dx { vec![0f32; g.batch * g.c * g.h * g.w] } else { Vec::new() };
        let mut cols = if g.pointwise() { Vec::new() } else { vec![0f32; k * band * g.wo] };
        let mut dcols = if g.pointwise() || !want_dx { Vec::new() } else { vec![0f32; k * band * g.wo] };
        let db = with_values(x, "conv2d input", |xv| {
            with_values(w, "conv2d weight", |wv| {
                with_values(dy, "conv2d gradient", |gv| {
                    let weight_t = Mat { data: wv, rs: 1, cs: k };
                    let image = (g.c * g.h * g.w).max(1);
                    for (i, (xb, gb)) in xv.chunks_exact(image).zip(gv.chunks_exact((g.o * p).max(1))).enumerate() {
                        for oy0 in (0..g.ho).step_by(band) {
                            let oy1 = (oy0 + band).min(g.ho);
                            let pt = (oy1 - oy0) * g.wo;
                            let cols_m = if g.pointwise() {
                                Mat { data: &xb[oy0 * g.wo..], rs: p, cs: 1 }
                            } else {
                                g.im2col(xb, oy0, oy1, &mut cols);
                                Mat { data: &cols, rs: pt, cs: 1 }
                            };
                            let dy_m = Mat { data: &gb[oy0 * g.wo..], rs: p, cs: 1 };
                            // dW (o × k) += dY (o × pt) · colsᵀ (pt × k), images and bands in order.
                            let cols_t = Mat { data: cols_m.data, rs: 1, cs: cols_m.rs };
                            matmul(&mut dw, k, 1, i > 0 || oy0 > 0, dy_m, cols_t, g.o, k, pt)?;
                            if !want_dx {
                                continue;
                            }
                            let dxb = &mut dx[i * image..(i + 1) * image];
                            if g.pointwise() {
                                matmul(&mut dxb[oy0 * g.wo..], p, 1, false, weight_t, dy_m, k, pt, g.o)?;
                            } else {
                                // dcols (k × pt) = Wᵀ · dY, scattered back onto the input.
                                matmul(&mut dcols, pt, 1, false, weight_t, dy_m, k, pt, g.o)?;
                                g.col2im(&dcols, oy0, oy1, dxb);
                            }
                        }
                    }
                    Ok(if bias { Some(channel_sums(gv, g.o, p)) } else { None })
                })
            })
        })?;
        let dev = x.device();
        let dx = if want_dx { Some(Tensor::from_vec(dx, (g.batch, g.c, g.h, g.w), dev)?) } else { None };
        let dw = Tensor::from_vec(dw, w.dims(), dev)?;
        let db = db.map(|b| Tensor::from_vec(b, g.o, dev)).transpose()?;
        Ok([dx, Some(dw), db])
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "beit-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = self.geometry(l1, l2)?;
        self.forward(values(s1, l1, "conv2d input")?, values(s2, l2, "conv2d weight")?, None, &g)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = self.backward(x, w, dy, false)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "beit-conv2d-bias"
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
        let g = self.geometry(l1, l2)?;
        let bias = values(s3, l3, "conv2d bias")?;
        if bias.len() != g.o {
            candle_core::bail!("conv2d: {} biases for {} output channels", bias.len(), g.o);
        }
        self.forward(values(s1, l1, "conv2d input")?, values(s2, l2, "conv2d weight")?, Some(bias), &g)
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

/// torch's `conv2d(x, w, bias, stride, padding, dilation)` (groups 1), differentiable in `x`, `w` and `bias`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    if !cpu_f32(&[Some(x), Some(w), bias]) {
        let y = x.conv2d(w, padding, stride, dilation, 1)?;
        return Ok(match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
            None => y,
        });
    }
    let op = Conv2dOp { stride, padding, dilation };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op)?,
        None => x.apply_op2(&w, op)?,
    })
}

/// ConvTranspose2d with kernel = stride (no overlap, no padding): one GEMM per image, then a scatter.
#[derive(Debug, Clone, Copy)]
struct ConvTransposeOp {
    stride: usize,
}

/// Sizes of a transposed convolution: input (batch, c, h, w), weight (c, o, s, s).
#[derive(Debug, Clone, Copy)]
struct TransposeGeometry {
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    s: usize,
}

impl TransposeGeometry {
    fn new(x: &Layout, w: &Layout, b: &Layout, s: usize) -> CResult<Self> {
        let (batch, c, h, wd) = dims4(x, "conv_transpose2d input")?;
        let (wc, o, kh, kw) = dims4(w, "conv_transpose2d weight")?;
        if wc != c || kh != s || kw != s || b.dims() != [o] {
            candle_core::bail!(
                "conv_transpose2d: input {:?}, weight {:?}, bias {:?}, stride {s} (expected weight ({c}, out, {s}, \
                 {s}) and bias (out))",
                x.dims(),
                w.dims(),
                b.dims()
            );
        }
        Ok(TransposeGeometry { batch, c, h, w: wd, o, s })
    }

    /// GEMM rows (o, di, dj): the weight's columns.
    fn r(&self) -> usize {
        self.o * self.s * self.s
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.plane() * self.s * self.s
    }

    /// `t[(o, di, dj), (i, j)]` to `y[o, i·s + di, j·s + dj]` plus `bias[o]`: one image.
    fn scatter(&self, t: &[f32], y: &mut [f32], bias: &[f32]) {
        let (s, p, ws) = (self.s, self.plane(), self.w * self.s);
        let rows = (s * s * p).max(1);
        y.par_chunks_mut(self.out_plane().max(1)).zip(t.par_chunks(rows)).zip(bias).for_each(|((plane, t), b)| {
            for (d, row) in t.chunks_exact(p.max(1)).enumerate() {
                let (di, dj) = (d / s, d % s);
                for (i, src) in row.chunks_exact(self.w.max(1)).enumerate() {
                    let dst = &mut plane[(i * s + di) * ws..];
                    for (j, v) in src.iter().enumerate() {
                        dst[j * s + dj] = v + b;
                    }
                }
            }
        });
    }

    /// The inverse of [`scatter`](Self::scatter) without the bias: `y` (one image's gradient) to `t`.
    fn gather(&self, y: &[f32], t: &mut [f32]) {
        let (s, p, ws) = (self.s, self.plane(), self.w * self.s);
        let rows = (s * s * p).max(1);
        y.par_chunks(self.out_plane().max(1)).zip(t.par_chunks_mut(rows)).for_each(|(plane, t)| {
            for (d, row) in t.chunks_exact_mut(p.max(1)).enumerate() {
                let (di, dj) = (d / s, d % s);
                for (i, dst) in row.chunks_exact_mut(self.w.max(1)).enumerate() {
                    let src = &plane[(i * s + di) * ws..];
                    for (j, v) in dst.iter_mut().enumerate() {
                        *v = src[j * s + dj];
                    }
                }
            }
        });
    }
}

impl CustomOp3 for ConvTransposeOp {
    fn name(&self) -> &'static str {
        "beit-conv-transpose2d"
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
        let g = TransposeGeometry::new(l1, l2, l3, self.stride)?;
        let x = values(s1, l1, "conv_transpose2d input")?;
        let w = values(s2, l2, "conv_transpose2d weight")?;
        let bias = values(s3, l3, "conv_transpose2d bias")?;
        let (p, r) = (g.plane(), g.r());
        let mut y = vec![0f32; g.batch * g.o * g.out_plane()];
        let mut t = vec![0f32; r * p];
        for (xb, yb) in x.chunks_exact((g.c * p).max(1)).zip(y.chunks_exact_mut((g.o * g.out_plane()).max(1))) {
            // t (r × p) = Wᵀ (r × c) · x (c × p).
            matmul(&mut t, p, 1, false, Mat { data: w, rs: 1, cs: r }, Mat { data: xb, rs: p, cs: 1 }, r, p, g.c)?;
            g.scatter(&t, yb, bias);
        }
        Ok((CpuStorage::F32(y), Shape::from((g.batch, g.o, g.h * g.s, g.w * g.s))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = TransposeGeometry::new(x.layout(), w.layout(), b.layout(), self.stride)?;
        let (p, r) = (g.plane(), g.r());
        let want_dx = x.track_op();
        let mut dx = if want_dx { vec![0f32; g.batch * g.c * p] } else { Vec::new() };
        let mut dw = vec![0f32; g.c * r];
        let mut t = vec![0f32; r * p];
        let db = with_values(x, "conv_transpose2d input", |xv| {
            with_values(w, "conv_transpose2d weight", |wv| {
                with_values(dy, "conv_transpose2d gradient", |gv| {
                    let image = (g.c * p).max(1);
                    for (i, (xb, gb)) in
                        xv.chunks_exact(image).zip(gv.chunks_exact((g.o * g.out_plane()).max(1))).enumerate()
                    {
                        g.gather(gb, &mut t);
                        let dy_m = Mat { data: &t, rs: p, cs: 1 };
                        // dW (c × r) += x (c × p) · tᵀ (p × r), images in order.
                        let t_t = Mat { data: &t, rs: 1, cs: p };
                        matmul(&mut dw, r, 1, i > 0, Mat { data: xb, rs: p, cs: 1 }, t_t, g.c, r, p)?;
                        if want_dx {
                            // dx (c × p) = W (c × r) · t (r × p).
                            let dxb = &mut dx[i * image..(i + 1) * image];
                            matmul(dxb, p, 1, false, Mat { data: wv, rs: r, cs: 1 }, dy_m, g.c, p, r)?;
                        }
                    }
                    Ok(channel_sums(gv, g.o, g.out_plane()))
                })
            })
        })?;
        let dev = x.device();
        let dx = if want_dx { Some(Tensor::from_vec(dx, x.dims(), dev)?) } else { None };
        Ok((dx, Some(Tensor::from_vec(dw, w.dims(), dev)?), Some(Tensor::from_vec(db, g.o, dev)?)))
    }
}

/// torch's `conv_transpose2d(x, w, bias, stride)` for a `(in, out, stride, stride)` weight (kernel = stride, no
/// padding), differentiable in all three. Other kernels take candle's op.
pub fn conv_transpose2d(x: &Tensor, w: &Tensor, bias: &Tensor, stride: usize) -> Result<Tensor> {
    let kernel_is_stride = matches!(w.dims(), &[_, _, kh, kw] if kh == stride && kw == stride);
    if !kernel_is_stride || stride == 0 || !cpu_f32(&[Some(x), Some(w), Some(bias)]) {
        let y = x.conv_transpose2d(w, 0, 0, stride, 1)?;
        return Ok(y.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?)?);
    }
    let op = ConvTransposeOp { stride };
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &bias.contiguous()?, op)?)
}

/// BatchNorm2d on given batch statistics, then ReLU when `relu`: `y = x · α + β` per channel with
/// `α = weight · invstd`, `β = bias − mean · α`, as torch's CPU kernel computes it.
#[derive(Debug, Clone)]
struct BatchNormOp {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    relu: bool,
}

impl BatchNormOp {
    fn check(&self, x: &Layout, w: &Layout, b: &Layout) -> CResult<(usize, usize, usize)> {
        let (n, c, h, wd) = dims4(x, "batch norm input")?;
        if c != self.mean.len() || w.dims() != [c] || b.dims() != [c] {
            candle_core::bail!("batch norm: input {:?}, weight {:?}, bias {:?}", x.dims(), w.dims(), b.dims());
        }
        Ok((n, c, h * wd))
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "beit-batch-norm"
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
        let (_, c, plane) = self.check(l1, l2, l3)?;
        let x = values(s1, l1, "batch norm input")?;
        let (w, b) = (values(s2, l2, "batch norm weight")?, values(s3, l3, "batch norm bias")?);
        let alpha: Vec<f32> = w.iter().zip(&self.invstd).map(|(w, s)| w * s).collect();
        let beta: Vec<f32> = b.iter().zip(&self.mean).zip(&alpha).map(|((b, m), a)| b - m * a).collect();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(plane.max(1)).zip(x.par_chunks(plane.max(1))).enumerate().for_each(|(i, (yp, xp))| {
            let (a, b) = (alpha[i % c], beta[i % c]);
            for (y, x) in yp.iter_mut().zip(xp) {
                let v = x * a + b;
                // `v < 0` rather than max: NaN passes through, as torch's relu.
                *y = if self.relu && v < 0.0 { 0.0 } else { v };
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// torch's batch_norm_backward (training): with `g` the output gradient (zero where the ReLU cut),
    /// `dbias = Σg`, `dweight = Σg·(x − mean)·invstd`,
    /// `dx = (g − Σg/n − (x − mean)·invstd²·Σg(x − mean)/n) · invstd · weight`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, c, plane) = self.check(x.layout(), w.layout(), b.layout())?;
        let n = (batch * plane) as f64;
        let relu = self.relu;
        let (dx, dw, db) = with_values(x, "batch norm input", |xv| {
            with_values(dy, "batch norm gradient", |gv| {
                with_values(res, "batch norm output", |yv| {
                    with_values(w, "batch norm weight", |wv| {
                        let grad = |at: usize| if relu && yv[at] <= 0.0 { 0.0 } else { gv[at] as f64 };
                        // Per channel, over the batch in order: Σg and Σg·(x − mean).
                        let sums: Vec<(f64, f64)> = (0..c)
                            .into_par_iter()
                            .map(|ch| {
                                let (mut s, mut d) = (0f64, 0f64);
                                let m = self.mean[ch] as f64;
                                for i in 0..batch {
                                    let base = (i * c + ch) * plane;
                                    for (at, &x) in xv.iter().enumerate().skip(base).take(plane) {
                                        let g = grad(at);
                                        s += g;
                                        d += g * (x as f64 - m);
                                    }
                                }
                                (s, d)
                            })
                            .collect();
                        let mut dx = vec![0f32; xv.len()];
                        dx.par_chunks_mut(plane.max(1)).enumerate().for_each(|(i, out)| {
                            let ch = i % c;
                            let (s, d) = sums[ch];
                            let (m, is) = (self.mean[ch] as f64, self.invstd[ch] as f64);
                            let (mean_g, k, scale) = (s / n, d * is * is / n, is * wv[ch] as f64);
                            for (j, v) in out.iter_mut().enumerate() {
                                let at = i * plane + j;
                                *v = ((grad(at) - mean_g - (xv[at] as f64 - m) * k) * scale) as f32;
                            }
                        });
                        let dw: Vec<f32> =
                            sums.iter().zip(&self.invstd).map(|(s, is)| (s.1 * *is as f64) as f32).collect();
                        let db: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
                        Ok((dx, dw, db))
                    })
                })
            })
        })?;
        let dev = x.device();
        let dx = if x.track_op() { Some(Tensor::from_vec(dx, x.dims(), dev)?) } else { None };
        Ok((dx, Some(Tensor::from_vec(dw, c, dev)?), Some(Tensor::from_vec(db, c, dev)?)))
    }
}

/// Training BatchNorm2d on an f32 CPU `x` (batch, channels, h, w): normalized by the batch's mean and biased
/// variance (in f64), then ReLU when `relu`. Returns the output and the batch's `(mean, biased variance)` per
/// channel (detached), or None when `x` is not an f32 CPU tensor.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !cpu_f32(&[Some(x), Some(weight), Some(bias)]) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (batch, c, h, w) = x.dims4()?;
    let plane = h * w;
    let n = (batch * plane) as f64;
    let stats: Vec<(f64, f64)> = with_values(&x, "batch norm input", |xv| {
        Ok((0..c)
            .into_par_iter()
            .map(|ch| {
                let planes = || (0..batch).map(move |i| &xv[(i * c + ch) * plane..][..plane]);
                let mean = planes().map(|p| p.iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>() / n;
                let var = planes().map(|p| p.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>()).sum::<f64>() / n;
                (mean, var)
            })
            .collect())
    })?;
    let mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
    let var: Vec<f32> = stats.iter().map(|s| s.1 as f32).collect();
    let invstd: Vec<f32> = stats.iter().map(|s| (1.0 / (s.1 + eps).sqrt()) as f32).collect();
    let op = BatchNormOp { mean: mean.clone(), invstd, relu };
    let y = x.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let dev = x.device();
    Ok(Some((y, Tensor::from_vec(mean, c, dev)?, Tensor::from_vec(var, c, dev)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        diff / scale.max(f32::MIN_POSITIVE)
    }

    fn randn(shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// The output and the gradients of `Σ y·r` (r random, so that every output position weighs differently).
    fn run(y: &Tensor, r: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
        let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y.clone()];
        out.extend(vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()));
        out
    }

    /// `conv2d` in f64 loops, and the gradients of `Σ y·r`: `(y, dx, dw, db)`.
    #[allow(clippy::too_many_arguments)]
    fn naive_conv2d(x: &Tensor, w: &Tensor, bias: &Tensor, r: &Tensor, s: usize, p: usize, d: usize) -> [Vec<f64>; 4] {
        let f64s = |t: &Tensor| -> Vec<f64> {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
        };
        let (xv, wv, bv, rv) = (f64s(x), f64s(w), f64s(bias), f64s(r));
        let ((n, c, h, wd), (o, _, kh, kw), (_, _, ho, wo)) =
            (x.dims4().unwrap(), w.dims4().unwrap(), r.dims4().unwrap());
        let (mut y, mut dx, mut dw, mut db) =
            (vec![0f64; rv.len()], vec![0f64; xv.len()], vec![0f64; wv.len()], vec![0f64; o]);
        for (b, oc, oy, ox) in itertools_4(n, o, ho, wo) {
            let at = ((b * o + oc) * ho + oy) * wo + ox;
            y[at] = bv[oc];
            db[oc] += rv[at];
            for (ci, ki, kj) in (0..c).flat_map(|ci| (0..kh).flat_map(move |ki| (0..kw).map(move |kj| (ci, ki, kj)))) {
                let (iy, ix) = ((oy * s + ki * d) as isize - p as isize, (ox * s + kj * d) as isize - p as isize);
                if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= wd {
                    continue;
                }
                let xi = ((b * c + ci) * h + iy as usize) * wd + ix as usize;
                let wi = ((oc * c + ci) * kh + ki) * kw + kj;
                y[at] += xv[xi] * wv[wi];
                dx[xi] += rv[at] * wv[wi];
                dw[wi] += rv[at] * xv[xi];
            }
        }
        [y, dx, dw, db]
    }

    fn itertools_4(a: usize, b: usize, c: usize, d: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).flat_map(move |k| (0..d).map(move |l| (i, j, k, l)))))
    }

    #[test]
    fn conv2d_matches_candle_and_loops_forward_and_gradients() {
        // (batch, in, out, h, w, kernel, stride, padding, dilation, bias): the heads' 3×3 and 1×1 convolutions,
        // then stride, dilation, even kernels and odd sizes.
        let cases = [
            (2, 5, 7, 9, 9, 3, 1, 1, 1, false),
            (2, 5, 7, 9, 11, 3, 1, 1, 1, true),
            (3, 6, 4, 8, 8, 1, 1, 0, 1, true),
            (3, 6, 4, 5, 7, 1, 1, 0, 1, false),
            (2, 3, 5, 10, 10, 3, 2, 1, 1, true),
            (2, 3, 5, 10, 7, 3, 2, 1, 1, true),
            (1, 4, 3, 9, 9, 3, 1, 2, 2, false),
            (2, 3, 2, 7, 6, 2, 3, 0, 1, true),
            (2, 4, 6, 6, 5, 1, 2, 1, 1, false),
        ];
        for (b, cin, cout, h, w, k, s, p, d, bias) in cases {
            let case = (b, cin, cout, h, w, k, s, p, d, bias);
            let x = randn(&[b, cin, h, w]);
            let wt = randn(&[cout, cin, k, k]);
            let bv = randn(&[cout]);
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), bias.then(|| bv.as_tensor()), s, p, d).unwrap();
            let mut want = x.as_tensor().conv2d(wt.as_tensor(), p, s, d, 1).unwrap();
            if bias {
                want = want.broadcast_add(&bv.as_tensor().reshape((1, cout, 1, 1)).unwrap()).unwrap();
            }
            let r = Tensor::randn(0f32, 1.0, want.dims(), &Device::Cpu).unwrap();
            let vars = if bias { vec![&x, &wt, &bv] } else { vec![&x, &wt] };
            let got = run(&ours, &r, &vars);
            // candle's conv2d backward fails on non-square maps whose rows and columns need different output
            // paddings (it reads the padding off the rows); the f64 loops cover those.
            if h == w {
                for (i, (g, w)) in got.iter().zip(&run(&want, &r, &vars)).enumerate() {
                    let e = rel_err(g, w);
                    assert!(e <= 1e-5, "case {case:?}, candle, output/gradient {i}: relative error {e}");
                }
            } else {
                assert!(rel_err(&got[0], &want) <= 1e-5, "case {case:?}: output against candle");
            }
            let zero = bv.as_tensor().zeros_like().unwrap();
            let naive =
                naive_conv2d(x.as_tensor(), wt.as_tensor(), if bias { bv.as_tensor() } else { &zero }, &r, s, p, d);
            for (i, (g, w)) in got.iter().zip(naive).enumerate() {
                let w = Tensor::from_vec(w.into_iter().map(|v| v as f32).collect(), g.dims(), &Device::Cpu).unwrap();
                let e = rel_err(g, &w);
                assert!(e <= 1e-5, "case {case:?}, loops, output/gradient {i}: relative error {e}");
            }
        }
    }

    #[test]
    fn conv2d_bands_cover_big_maps() {
        // K · wo above the band budget: several bands per image, each a partial im2col.
        let x = randn(&[1, 64, 40, 300]);
        let wt = randn(&[3, 64, 3, 3]);
        let g = Geometry::new(x.as_tensor().layout(), wt.as_tensor().layout(), 1, 1, 1).unwrap();
        assert!(g.band() < g.ho, "one band: {}", g.band());
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), None, 1, 1, 1).unwrap();
        let want = x.as_tensor().conv2d(wt.as_tensor(), 1, 1, 1, 1).unwrap();
        let r = Tensor::randn(0f32, 1.0, want.dims(), &Device::Cpu).unwrap();
        for (g, w) in run(&ours, &r, &[&x, &wt]).iter().zip(&run(&want, &r, &[&x, &wt])) {
            assert!(rel_err(g, w) <= 1e-5, "{}", rel_err(g, w));
        }
    }

    #[test]
    fn conv_transpose2d_matches_candle_forward_and_gradients() {
        for (b, cin, cout, h, w, s) in [(2, 5, 3, 4, 6, 2), (3, 4, 4, 3, 3, 3), (1, 2, 3, 5, 2, 1)] {
            let x = randn(&[b, cin, h, w]);
            let wt = randn(&[cin, cout, s, s]);
            let bv = randn(&[cout]);
            let ours = conv_transpose2d(x.as_tensor(), wt.as_tensor(), bv.as_tensor(), s).unwrap();
            let want = x
                .as_tensor()
                .conv_transpose2d(wt.as_tensor(), 0, 0, s, 1)
                .unwrap()
                .broadcast_add(&bv.as_tensor().reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let r = Tensor::randn(0f32, 1.0, want.dims(), &Device::Cpu).unwrap();
            let vars = [&x, &wt, &bv];
            for (i, (g, w)) in run(&ours, &r, &vars).iter().zip(&run(&want, &r, &vars)).enumerate() {
                let e = rel_err(g, w);
                assert!(e <= 1e-5, "case {:?}, output/gradient {i}: relative error {e}", (b, cin, cout, h, w, s));
            }
        }
    }

    /// The composite BatchNorm (candle differentiates it), then ReLU.
    fn composite_batch_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, relu: bool) -> Tensor {
        let c = w.elem_count();
        let mean = x.mean_keepdim((0, 2, 3)).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
        let y = xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
        let y = y.broadcast_mul(&w.reshape((1, c, 1, 1)).unwrap()).unwrap();
        let y = y.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    }

    #[test]
    fn batch_norm_matches_the_composite_form() {
        for relu in [false, true] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (4, 3, 5, 6), &Device::Cpu).unwrap() + 0.7).unwrap())
                .unwrap();
            let (w, b) = (randn(&[3]), randn(&[3]));
            let (ours, mean, var) =
                batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, relu).unwrap().unwrap();
            let want = composite_batch_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, relu);
            let want_mean = x.as_tensor().mean_keepdim((0, 2, 3)).unwrap().flatten_all().unwrap();
            assert!(rel_err(&mean, &want_mean) <= 1e-5);
            let want_var = x.as_tensor().broadcast_sub(&want_mean.reshape((1, 3, 1, 1)).unwrap()).unwrap();
            let want_var = want_var.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap().flatten_all().unwrap();
            assert!(rel_err(&var, &want_var) <= 1e-5);
            let r = Tensor::randn(0f32, 1.0, want.dims(), &Device::Cpu).unwrap();
            let vars = [&x, &w, &b];
            for (i, (g, w)) in run(&ours, &r, &vars).iter().zip(&run(&want, &r, &vars)).enumerate() {
                let e = rel_err(g, w);
                assert!(e <= 1e-5, "relu {relu}, output/gradient {i}: relative error {e}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let x = randn(&[3, 16, 20, 20]);
        let wt = randn(&[24, 16, 3, 3]);
        let r = Tensor::randn(0f32, 1.0, (3, 24, 20, 20), &Device::Cpu).unwrap();
        let bits = |threads: usize| {
            crate::kernels::on_threads(threads, || {
                let y = conv2d(x.as_tensor(), wt.as_tensor(), None, 1, 1, 1).unwrap();
                run(&y, &r, &[&x, &wt])
                    .iter()
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect::<Vec<_>>()
            })
        };
        assert!(bits(1) == bits(2) && bits(1) == bits(3));
    }
}
