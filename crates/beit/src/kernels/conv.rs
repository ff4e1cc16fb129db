//! Convolutions for CPU inference on the f32 GEMM ([`super::f32`]), with the weight packed once.
//!
//! # Layout
//!
//! The output pixels are processed in stripes of bounded size ([`Stripes`]; the full im2col matrix of
//! the UperNet's fpn_bottleneck would take 2.8 GB). For each stripe, the input rows it reads are
//! transposed to NHWC (the input may be given as several channel groups, so that a concatenation along
//! the channels is never built), so that the im2col row of one output pixel is `kh` runs of `kw · Cin`
//! (or `kw` runs of `Cin`) contiguous values; the weight is packed with its K axis in the same
//! `(i, j, c)` order (not PyTorch's `(c, i, j)`), as a [`PackedF32`] with `n = Cout`. The stripe is
//! gathered into a reused buffer, multiplied by one [`linear_packed`] with the bias (the weight streamed
//! once per stripe), optionally through ReLU, and its `pixels × Cout` result transposed into the NCHW
//! output. A 1×1 convolution with stride 1 and no padding needs no gather: the NHWC pixels are the
//! GEMM's A.
//!
//! 3×3 convolutions with stride 1 and dilation 1 (all of the UperNet's and the FCN head's, ≈95% of their
//! FLOPs) use Winograd's F(2×2, 3×3) instead: each 4×4 input tile (stride 2) is transformed per channel
//! (`Bᵀ d B`, additions only), the 16 transformed positions are 16 GEMMs of `tiles × Cin` by `Cin × Cout`
//! against the weight transformed once (`G g Gᵀ`, 16 [`PackedF32`]), and each 2×2 output block is
//! `Aᵀ m A`. That is 16 instead of 36 multiply-adds per 2×2 outputs and channel pair (2.25× fewer), at
//! the price of 16/9 the weight memory. Its error stays at the direct sum's: on 3072 → 64 channels with
//! outputs up to 8.5, max 1.3e-5 against f64 (im2col: 2.8e-5); F(4×4, 3×3) would save another 1.8× but
//! measured 2.2e-4, beyond the 1e-4 parity budget.
//!
//! [`PackedConvTranspose2d`] (kernel = stride, no padding: the FPN's upsampling) is one GEMM per stripe
//! of input pixels with `n = s · s · Cout` outputs per pixel, scattered into the `s × s` blocks.
//!
//! Sums run in a different order than PyTorch's (oneDNN's), so results agree up to float rounding.

use std::cell::Cell;

use rayon::prelude::*;

use crate::error::{BeitError, Result};
use crate::kernels::cpu;
use crate::kernels::bf16::PackedBf16;
use crate::kernels::f32::{linear_packed, PackedF32, MR};

/// The arithmetic of a packed convolution, chosen at load: f32, or bf16 weights and activations with f32
/// accumulation ([`PackedBf16`]; the transforms, bias and ReLU stay in f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 GEMMs.
    Bf16,
}

/// One packed GEMM weight with the bias its GEMM adds, in either precision.
#[derive(Debug)]
enum Gemm {
    F32(PackedF32, Option<Vec<f32>>),
    Bf16(PackedBf16),
}

impl Gemm {
    /// `w`: `n × k` row-major (PyTorch's Linear layout).
    fn pack(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>, precision: Precision) -> Result<Self> {
        Ok(match precision {
            Precision::F32 => Gemm::F32(PackedF32::pack(w, n, k)?, bias.map(<[f32]>::to_vec)),
            Precision::Bf16 => Gemm::Bf16(PackedBf16::pack(w, n, k, bias)?),
        })
    }

    /// `out[r · ldo..][..n] = a[r · lda..][..k] · Wᵀ + bias` for `rows` rows.
    fn run(&self, a: &[f32], lda: usize, rows: usize, out: &mut [f32], ldo: usize) -> Result<()> {
        match self {
            Gemm::F32(w, bias) => linear_packed(a, lda, rows, w, bias.as_deref(), out, ldo),
            Gemm::Bf16(w) => w.forward_strided(a, lda, rows, out, ldo),
        }
    }

    fn unpack(&self) -> Vec<f32> {
        match self {
            Gemm::F32(w, _) => w.unpack(),
            Gemm::Bf16(w) => w.unpack(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Gemm::F32(w, _) => w.bytes(),
            Gemm::Bf16(w) => w.bytes(),
        }
    }
}

/// Bytes per stripe of the GEMM's A (or of its output, when larger), by path.
#[derive(Debug, Clone, Copy)]
struct Stripes {
    /// im2col rows. The GEMM packs its own copy (kept between calls up to 32 MB) and streams the whole
    /// weight once per stripe: larger stripes reuse the weight more, smaller ones stay in cache.
    im2col: usize,
    /// 1×1 convolutions and the transposed convolution: the stripe's NHWC pixels, GEMM output and their
    /// transpositions then stay in L2 (measured on 768 → 768 at 160×160: 1 MB 0.41 s, 16 MB 0.56 s CPU;
    /// the 2.4 MB weight is re-read from L3 per stripe).
    direct: usize,
    /// Winograd tiles, 16 values per tile and channel (and as many GEMM outputs per output channel). The
    /// 16 transformed weights are streamed once per stripe (fpn_bottleneck: 8 MB 6.6 s, 32 MB 5.6 s CPU).
    winograd: usize,
}

const STRIPES: Stripes = Stripes {
    im2col: 16 << 20,
    direct: 1 << 20,
    winograd: 32 << 20,
};

/// Output channels per block when the stripe result is transposed to NCHW: one cache line of the
/// stripe row is read, and as many output rows are written sequentially.
const CHANNEL_BLOCK: usize = 16;
/// Pixels per task of the NCHW → NHWC transposition: each channel's run of them is read sequentially
/// (8 cache lines, which the prefetchers follow; one line per channel and task was latency-bound).
const PIXEL_BLOCK: usize = 128;

/// Per-stripe buffers, reused between calls on this thread (taken out during a call, so that a nested
/// call from rayon work stealing allocates its own). All are bounded by the stripe sizes.
#[derive(Default)]
struct Scratch {
    /// The stripe's input rows (or pixels) in NHWC.
    band: Vec<f32>,
    /// The GEMM's A: im2col rows or transformed tiles.
    a: Vec<f32>,
    /// The GEMM's output.
    out: Vec<f32>,
}

thread_local! {
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

fn input_error(what: &str, message: String) -> BeitError {
    BeitError::internal(format!("conv: {what}"), message)
}

/// A convolution's shape and placement, as torch.nn.Conv2d's arguments (groups 1, square stride,
/// padding and dilation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height.
    pub kernel_h: usize,
    /// Kernel width.
    pub kernel_w: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Dilation.
    pub dilation: usize,
}

impl ConvGeometry {
    fn check(&self) -> Result<()> {
        if self.kernel_h == 0 || self.kernel_w == 0 || self.stride == 0 || self.dilation == 0 {
            return Err(input_error(
                "geometry",
                format!("kernel, stride and dilation must be at least 1, found {self:?}"),
            ));
        }
        Ok(())
    }

    /// Output size for an `h × w` input, as torch computes it; an error if the (dilated) kernel does not
    /// fit in the padded input.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        self.check()?;
        let one = |size: usize, kernel: usize, axis: &str| {
            let span = self.dilation * (kernel - 1) + 1;
            let padded = size + 2 * self.padding;
            if padded < span {
                return Err(input_error(
                    "input",
                    format!("{axis} {size} (padded {padded}) is smaller than the dilated {span}-wide kernel"),
                ));
            }
            Ok((padded - span) / self.stride + 1)
        };
        Ok((one(h, self.kernel_h, "height")?, one(w, self.kernel_w, "width")?))
    }
}

/// A Conv2d's weight packed once for [`linear_packed`], and its bias.
#[derive(Debug)]
pub struct PackedConv2d {
    weight: ConvWeight,
    bias: Option<Vec<f32>>,
    geometry: ConvGeometry,
}

#[derive(Debug)]
enum ConvWeight {
    /// `Cout × (kh · kw · Cin)`, K in `(i, j, c)` order, for im2col rows gathered from NHWC; with the bias.
    Im2col(Gemm),
    /// F(2×2, 3×3) ([`F2`]): for each of the 16 positions ξ = 4r + s of a transformed tile,
    /// `U_ξ = (G g Gᵀ)[r][s]` as a `Cout × Cin` matrix (the bias is added after the inverse transform).
    Winograd(Vec<Gemm>),
}

/// The matrices of F(M×M, 3×3) on input tiles of `A` = M + 2 (Lavin & Gray, "Fast Algorithms for
/// Convolutional Neural Networks"): `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, and `L` with `L G = I` to recover
/// `g`. Only F(2×2, 3×3) is used (see the module documentation for why not F(4×4, 3×3)).
struct Winograd<const A: usize, const M: usize> {
    bt: [[f32; A]; A],
    g: [[f64; 3]; A],
    at: [[f32; A]; M],
    l: [[f64; A]; 3],
}

const F2: Winograd<4, 2> = Winograd {
    bt: [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ],
    g: [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]],
    at: [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]],
    l: [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
};

/// Whether [`PackedConv2d::pack`] uses Winograd's F(2×2, 3×3) for this geometry.
pub fn winograd_applies(g: &ConvGeometry) -> bool {
    g.kernel_h == 3 && g.kernel_w == 3 && g.stride == 1 && g.dilation == 1
}

impl PackedConv2d {
    /// Packs `weight`, `(out, in, kh, kw)` row-major as PyTorch stores it, and `bias` (`out` values).
    pub fn pack(weight: &[f32], bias: Option<&[f32]>, geometry: ConvGeometry) -> Result<Self> {
        Self::pack_as(weight, bias, geometry, winograd_applies(&geometry), Precision::F32)
    }

    /// [`pack`](Self::pack) in `precision`.
    pub fn pack_with(
        weight: &[f32],
        bias: Option<&[f32]>,
        geometry: ConvGeometry,
        precision: Precision,
    ) -> Result<Self> {
        Self::pack_as(weight, bias, geometry, winograd_applies(&geometry), precision)
    }

    /// [`pack`](Self::pack), with or without Winograd (tests compare both).
    fn pack_as(
        weight: &[f32],
        bias: Option<&[f32]>,
        geometry: ConvGeometry,
        winograd: bool,
        precision: Precision,
    ) -> Result<Self> {
        geometry.check()?;
        let g = geometry;
        let taps = g.kernel_h * g.kernel_w;
        let k = g.in_channels * taps;
        let want = g.out_channels * k;
        if weight.len() != want {
            return Err(input_error(
                "weight",
                format!(
                    "expected {want} values ({} x {} x {} x {}), found {}",
                    g.out_channels,
                    g.in_channels,
                    g.kernel_h,
                    g.kernel_w,
                    weight.len()
                ),
            ));
        }
        if let Some(b) = bias {
            if b.len() != g.out_channels {
                return Err(input_error(
                    "bias",
                    format!("expected {} values, found {}", g.out_channels, b.len()),
                ));
            }
        }
        let bias = bias.map(<[f32]>::to_vec);
        if winograd && winograd_applies(&g) {
            let u = winograd_weights(&F2, weight, g.out_channels, g.in_channels);
            let packed = u
                .chunks_exact((g.out_channels * g.in_channels).max(1))
                .map(|ux| Gemm::pack(ux, g.out_channels, g.in_channels, None, precision))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Self {
                weight: ConvWeight::Winograd(packed),
                bias,
                geometry,
            });
        }
        // (c, t) → (t, c) within each output channel, t = i · kw + j; a 1×1 kernel is already in order.
        let packed = if taps == 1 {
            Gemm::pack(weight, g.out_channels, k, bias.as_deref(), precision)?
        } else {
            let mut w = vec![0f32; want];
            for (src, dst) in weight.chunks_exact(k).zip(w.chunks_exact_mut(k)) {
                for c in 0..g.in_channels {
                    for t in 0..taps {
                        dst[t * g.in_channels + c] = src[c * taps + t];
                    }
                }
            }
            Gemm::pack(&w, g.out_channels, k, bias.as_deref(), precision)?
        };
        Ok(Self {
            weight: ConvWeight::Im2col(packed),
            bias,
            geometry,
        })
    }

    /// The convolution's shape and placement.
    pub fn geometry(&self) -> ConvGeometry {
        self.geometry
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The weight back as `(out, in, kh, kw)` row-major: bit for bit, except from the Winograd form,
    /// where it is recovered from the transformed copy up to float rounding.
    pub fn weight(&self) -> Vec<f32> {
        let g = self.geometry;
        let taps = g.kernel_h * g.kernel_w;
        let w = match &self.weight {
            ConvWeight::Im2col(p) => p.unpack(),
            ConvWeight::Winograd(u) => {
                let u: Vec<Vec<f32>> = u.iter().map(Gemm::unpack).collect();
                return winograd_weights_back(&F2, &u, g.out_channels, g.in_channels);
            }
        };
        if taps == 1 {
            return w;
        }
        let k = g.in_channels * taps;
        let mut out = vec![0f32; w.len()];
        for (src, dst) in w.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
            for c in 0..g.in_channels {
                for t in 0..taps {
                    dst[c * taps + t] = src[t * g.in_channels + c];
                }
            }
        }
        out
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        let w = match &self.weight {
            ConvWeight::Im2col(p) => p.bytes(),
            ConvWeight::Winograd(u) => u.iter().map(Gemm::bytes).sum(),
        };
        w + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// The convolution of `x`, `(batch, in, h, w)` contiguous NCHW, into a `(batch, out, ho, wo)` NCHW
    /// vector (with `(ho, wo)`), ReLU applied when `relu`.
    pub fn forward(
        &self,
        x: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        relu: bool,
    ) -> Result<(Vec<f32>, (usize, usize))> {
        self.forward_parts(&[(x, self.geometry.in_channels)], batch, h, w, relu)
    }

    /// [`forward`](Self::forward) of the concatenation along the channels of `parts`, each
    /// `(values, channels)` with values `(batch, channels, h, w)` NCHW, without building it.
    pub fn forward_parts(
        &self,
        parts: &[(&[f32], usize)],
        batch: usize,
        h: usize,
        w: usize,
        relu: bool,
    ) -> Result<(Vec<f32>, (usize, usize))> {
        self.forward_striped(parts, batch, h, w, relu, STRIPES)
    }

    /// [`forward_parts`](Self::forward_parts) with stripes of at most `stripes` bytes (tests use small
    /// ones).
    fn forward_striped(
        &self,
        parts: &[(&[f32], usize)],
        batch: usize,
        h: usize,
        w: usize,
        relu: bool,
        stripes: Stripes,
    ) -> Result<(Vec<f32>, (usize, usize))> {
        let g = self.geometry;
        let cin = g.in_channels;
        let hw = h * w;
        check_parts(parts, cin, batch, h, w)?;
        if cin == 0 || hw == 0 {
            return Err(input_error(
                "input",
                format!("empty input ({batch} x {cin} x {h} x {w})"),
            ));
        }
        let (ho, wo) = g.output_size(h, w)?;
        let (cout, hwo) = (g.out_channels, ho * wo);
        let mut out = vec![0f32; batch * cout * hwo];
        if hwo == 0 || cout == 0 {
            return Ok((out, (ho, wo)));
        }
        let weight = match &self.weight {
            ConvWeight::Winograd(u) => {
                self.winograd(&F2, u, parts, ((h, w), (ho, wo)), relu, &mut out, stripes.winograd)?;
                return Ok((out, (ho, wo)));
            }
            ConvWeight::Im2col(p) => p,
        };
        let k = cin * g.kernel_h * g.kernel_w;
        let direct = g.kernel_h == 1 && g.kernel_w == 1 && g.stride == 1 && g.padding == 0;
        let stripe = stripe_rows(k.max(cout), hwo, if direct { stripes.direct } else { stripes.im2col });
        let mut sc = SCRATCH.with(Cell::take);
        for (img, out_img) in out.chunks_exact_mut(cout * hwo).enumerate() {
            for p0 in (0..hwo).step_by(stripe) {
                let rows = stripe.min(hwo - p0);
                let a: &[f32] = if direct {
                    // Output pixel = input pixel: the stripe's pixels in NHWC are the GEMM's A.
                    to_nhwc(parts, img, hw, p0..p0 + rows, &mut sc.band);
                    &sc.band
                } else {
                    // The input rows the stripe's output rows read, then the im2col rows from them.
                    let (oy0, oy1) = (p0 / wo, (p0 + rows - 1) / wo);
                    let lo = (oy0 * g.stride) as isize - g.padding as isize;
                    let hi = (oy1 * g.stride + (g.kernel_h - 1) * g.dilation + 1) as isize - g.padding as isize;
                    let (y0, y1) = (lo.clamp(0, h as isize) as usize, hi.clamp(0, h as isize) as usize);
                    to_nhwc(parts, img, hw, y0 * w..y1 * w, &mut sc.band);
                    let band = Band {
                        data: &sc.band,
                        y0,
                        y1,
                        w,
                        c: cin,
                    };
                    sc.a.resize(rows * k, 0.0);
                    let cols = &mut sc.a[..rows * k];
                    cols.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
                        let p = p0 + r;
                        gather(&band, &g, (p / wo, p % wo), row);
                    });
                    cols
                };
                sc.out.resize(rows * cout, 0.0);
                let res = &mut sc.out[..rows * cout];
                weight.run(a, k, rows, res, cout)?;
                if relu {
                    res.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                scatter_channels(res, cout, out_img, hwo, Positions::<fn(usize) -> usize>::Contiguous(p0));
            }
        }
        SCRATCH.with(|s| s.set(sc));
        Ok((out, (ho, wo)))
    }

    /// The F(m×m, 3×3) convolution into `out` (NCHW, zeroed), in stripes of m×m output tiles.
    #[allow(clippy::too_many_arguments)]
    fn winograd<const A: usize, const M: usize>(
        &self,
        f: &Winograd<A, M>,
        u: &[Gemm],
        parts: &[(&[f32], usize)],
        ((h, w), (ho, wo)): ((usize, usize), (usize, usize)),
        relu: bool,
        out: &mut [f32],
        stripe_bytes: usize,
    ) -> Result<()> {
        let g = self.geometry;
        let (cin, cout, pad) = (g.in_channels, g.out_channels, g.padding as isize);
        let (hw, hwo) = (h * w, ho * wo);
        let (aa, m) = (A * A, M as isize);
        let tw = wo.div_ceil(M);
        let tiles = ho.div_ceil(M) * tw;
        let mut stripe = stripe_rows(aa * cin.max(cout), tiles, stripe_bytes);
        if stripe >= tw {
            // Whole rows of tiles: the stripes' input bands then overlap by only two rows.
            stripe = stripe / tw * tw;
        }
        let mut sc = SCRATCH.with(Cell::take);
        let zeros = vec![0f32; cin];
        for (img, out_img) in out.chunks_exact_mut(cout * hwo).enumerate() {
            for t0 in (0..tiles).step_by(stripe) {
                let rows = stripe.min(tiles - t0);
                // The input rows of the stripe's tiles (A rows from m · tile row - padding), in NHWC.
                let lo = m * (t0 / tw) as isize - pad;
                let hi = m * ((t0 + rows - 1) / tw) as isize + A as isize - pad;
                let (y0, y1) = (lo.clamp(0, h as isize) as usize, hi.clamp(0, h as isize) as usize);
                to_nhwc(parts, img, hw, y0 * w..y1 * w, &mut sc.band);
                let band = Band {
                    data: &sc.band,
                    y0,
                    y1,
                    w,
                    c: cin,
                };
                // Per tile, the A² transformed positions side by side: V_ξ is rows at stride A² · Cin.
                sc.a.resize(rows * aa * cin, 0.0);
                sc.a[..rows * aa * cin]
                    .par_chunks_mut(aa * cin)
                    .enumerate()
                    .for_each(|(r, dst)| {
                        let t = t0 + r;
                        let origin = (m * (t / tw) as isize - pad, m * (t % tw) as isize - pad);
                        input_tile(f, &band, origin, &zeros, dst);
                    });
                sc.out.resize(rows * aa * cout, 0.0);
                for (xi, ux) in u.iter().enumerate() {
                    ux.run(&sc.a[xi * cin..], aa * cin, rows, &mut sc.out[xi * cout..], aa * cout)?;
                }
                output_tiles(
                    f,
                    &sc.out[..rows * aa * cout],
                    out_img,
                    (ho, wo),
                    t0,
                    self.bias.as_deref(),
                    relu,
                );
            }
        }
        SCRATCH.with(|s| s.set(sc));
        Ok(())
    }
}

/// `U = G g Gᵀ` for every `(o, c)`, as A² consecutive `Cout × Cin` matrices (position ξ = A·r + s);
/// computed in f64 and rounded once. In parallel over positions.
fn winograd_weights<const A: usize, const M: usize>(
    f: &Winograd<A, M>,
    weight: &[f32],
    cout: usize,
    cin: usize,
) -> Vec<f32> {
    let plane = cout * cin;
    let mut u = vec![0f32; A * A * plane];
    u.par_chunks_mut(plane.max(1)).enumerate().for_each(|(xi, ux)| {
        let (gr, gs) = (f.g[xi / A], f.g[xi % A]);
        for (v, g) in ux.iter_mut().zip(weight.chunks_exact(9)) {
            let mut acc = 0f64;
            for a in 0..3 {
                for b in 0..3 {
                    acc += gr[a] * gs[b] * f64::from(g[3 * a + b]);
                }
            }
            *v = acc as f32;
        }
    });
    u
}

/// The inverse of [`winograd_weights`] up to float rounding: `g = L U Lᵀ`.
fn winograd_weights_back<const A: usize, const M: usize>(
    f: &Winograd<A, M>,
    u: &[Vec<f32>],
    cout: usize,
    cin: usize,
) -> Vec<f32> {
    let mut w = vec![0f32; cout * cin * 9];
    for (oc, g) in w.chunks_exact_mut(9).enumerate() {
        for (ab, v) in g.iter_mut().enumerate() {
            let (lr, ls) = (f.l[ab / 3], f.l[ab % 3]);
            let mut acc = 0f64;
            for r in 0..A {
                for s in 0..A {
                    acc += lr[r] * ls[s] * f64::from(u[A * r + s][oc]);
                }
            }
            *v = acc as f32;
        }
    }
    w
}

/// Channels per block of the tile transforms: fixed-size arrays the compiler vectorizes.
const LANES: usize = 16;

/// `dst[..n] = src[..n]`; a whole block as one fixed-size move (a run-time length would call memcpy for
/// every 64 bytes).
#[inline(always)]
fn load_lanes(dst: &mut [f32; LANES], src: &[f32], n: usize) {
    if n == LANES {
        dst.copy_from_slice(&src[..LANES]);
    } else {
        dst[..n].copy_from_slice(&src[..n]);
    }
}

/// `dst[..n] = src[..n]`, as [`load_lanes`].
#[inline(always)]
fn store_lanes(dst: &mut [f32], src: &[f32; LANES], n: usize) {
    if n == LANES {
        dst[..LANES].copy_from_slice(src);
    } else {
        dst[..n].copy_from_slice(&src[..n]);
    }
}

/// `acc += c · x` lane by lane, skipping zero coefficients (after unrolling over the constant matrices,
/// the test and any multiplication by ±1 fold away). `acc` starts at -0.0, the exact additive identity.
#[inline(always)]
fn axpy(acc: &mut [f32; LANES], c: f32, x: &[f32; LANES]) {
    if c != 0.0 {
        for (a, v) in acc.iter_mut().zip(x) {
            *a += c * v;
        }
    }
}

/// `Bᵀ d B` of the A×A input tile whose top-left input pixel is `origin` (may lie in the padding), for
/// every channel, into `dst[ξ · c + channel]`.
#[allow(clippy::needless_range_loop)] // matrix products: the indices are the math
fn input_tile<const A: usize, const M: usize>(
    f: &Winograd<A, M>,
    band: &Band<'_>,
    (y0, x0): (isize, isize),
    zeros: &[f32],
    dst: &mut [f32],
) {
    let c = band.c;
    let d: [[&[f32]; A]; A] = std::array::from_fn(|a| {
        std::array::from_fn(|b| band.pixel(y0 + a as isize, x0 + b as isize).unwrap_or(&zeros[..c]))
    });
    for k0 in (0..c).step_by(LANES) {
        let n = LANES.min(c - k0);
        let mut t = [[[0f32; LANES]; A]; A];
        for (ta, da) in t.iter_mut().zip(&d) {
            for (tab, dab) in ta.iter_mut().zip(da) {
                load_lanes(tab, &dab[k0..], n);
            }
        }
        // Bᵀ d, then (Bᵀ d) B.
        let mut q = [[[-0.0f32; LANES]; A]; A];
        for r in 0..A {
            for b in 0..A {
                for a in 0..A {
                    axpy(&mut q[r][b], f.bt[r][a], &t[a][b]);
                }
            }
        }
        let mut v = [[[-0.0f32; LANES]; A]; A];
        for r in 0..A {
            for s in 0..A {
                for b in 0..A {
                    axpy(&mut v[r][s], f.bt[s][b], &q[r][b]);
                }
            }
        }
        for r in 0..A {
            for s in 0..A {
                store_lanes(&mut dst[(A * r + s) * c + k0..], &v[r][s], n);
            }
        }
    }
}

/// `Aᵀ m A + bias` (ReLU when `relu`) of each tile of the stripe starting at tile `t0`, into the NCHW
/// image `out` (`(ho, wo)` planes), skipping the outputs of edge tiles past the image. `m` holds per tile
/// the A² positions' `Cout` values side by side. In parallel over blocks of output channels.
#[allow(clippy::needless_range_loop)] // matrix products: the indices are the math
fn output_tiles<const A: usize, const M: usize>(
    f: &Winograd<A, M>,
    m: &[f32],
    out: &mut [f32],
    (ho, wo): (usize, usize),
    t0: usize,
    bias: Option<&[f32]>,
    relu: bool,
) {
    let plane = ho * wo;
    let cout = out.len() / plane;
    let tw = wo.div_ceil(M);
    let rows = m.len() / (A * A * cout);
    out.par_chunks_mut(LANES * plane).enumerate().for_each(|(blk, planes)| {
        let c0 = blk * LANES;
        let n = planes.len() / plane;
        let mut bias_l = [0f32; LANES];
        if let Some(bias) = bias {
            bias_l[..n].copy_from_slice(&bias[c0..c0 + n]);
        }
        for r in 0..rows {
            let mut t = [[[0f32; LANES]; A]; A];
            for (a, ta) in t.iter_mut().enumerate() {
                for (b, tab) in ta.iter_mut().enumerate() {
                    load_lanes(tab, &m[(A * A * r + A * a + b) * cout + c0..], n);
                }
            }
            // Aᵀ m, then (Aᵀ m) A.
            let mut q = [[[-0.0f32; LANES]; A]; M];
            for i in 0..M {
                for b in 0..A {
                    for a in 0..A {
                        axpy(&mut q[i][b], f.at[i][a], &t[a][b]);
                    }
                }
            }
            let tile = t0 + r;
            let (oy, ox) = (M * (tile / tw), M * (tile % tw));
            for i in 0..M {
                for j in 0..M {
                    let (py, px) = (oy + i, ox + j);
                    if py >= ho || px >= wo {
                        continue;
                    }
                    let mut y = bias_l;
                    for b in 0..A {
                        axpy(&mut y, f.at[j][b], &q[i][b]);
                    }
                    for (cc, v) in y[..n].iter().enumerate() {
                        planes[cc * plane + py * wo + px] = if relu { v.max(0.0) } else { *v };
                    }
                }
            }
        }
    });
}

/// A ConvTranspose2d with kernel = stride and no padding (each input pixel becomes one `s × s` output
/// block), packed once as a GEMM with `n = s · s · Cout` outputs per input pixel, in `(i, j, co)` order.
#[derive(Debug)]
pub struct PackedConvTranspose2d {
    /// With the bias per GEMM column: the `Cout` biases repeated for each of the `s · s` positions.
    weight: Gemm,
    bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
    stride: usize,
}

impl PackedConvTranspose2d {
    /// Packs `weight`, `(in, out, s, s)` row-major as PyTorch stores a ConvTranspose2d's, and `bias`.
    pub fn pack(weight: &[f32], bias: &[f32], in_channels: usize, out_channels: usize, stride: usize) -> Result<Self> {
        Self::pack_with(weight, bias, in_channels, out_channels, stride, Precision::F32)
    }

    /// [`pack`](Self::pack) in `precision`.
    pub fn pack_with(
        weight: &[f32],
        bias: &[f32],
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        precision: Precision,
    ) -> Result<Self> {
        if stride == 0 {
            return Err(input_error(
                "geometry",
                "stride must be at least 1, found 0".to_string(),
            ));
        }
        let (cin, cout, s) = (in_channels, out_channels, stride);
        let want = cin * cout * s * s;
        if weight.len() != want {
            return Err(input_error(
                "transposed weight",
                format!(
                    "expected {want} values ({cin} x {cout} x {s} x {s}), found {}",
                    weight.len()
                ),
            ));
        }
        if bias.len() != cout {
            return Err(input_error(
                "transposed bias",
                format!("expected {cout} values, found {}", bias.len()),
            ));
        }
        let n = s * s * cout;
        // Row (i, j, co) of the GEMM weight is w[:, co, i, j].
        let mut w = vec![0f32; n * cin];
        for c in 0..cin {
            for co in 0..cout {
                for t in 0..s * s {
                    w[(t * cout + co) * cin + c] = weight[(c * cout + co) * s * s + t];
                }
            }
        }
        let bias: Vec<f32> = (0..s * s).flat_map(|_| bias.iter().copied()).collect();
        Ok(Self {
            weight: Gemm::pack(&w, n, cin, Some(&bias), precision)?,
            bias,
            in_channels,
            out_channels,
            stride,
        })
    }

    /// The weight back as `(in, out, s, s)` row-major, bit for bit.
    pub fn weight(&self) -> Vec<f32> {
        let (cin, cout, s) = (self.in_channels, self.out_channels, self.stride);
        let w = self.weight.unpack();
        let mut out = vec![0f32; w.len()];
        for c in 0..cin {
            for co in 0..cout {
                for t in 0..s * s {
                    out[(c * cout + co) * s * s + t] = w[(t * cout + co) * cin + c];
                }
            }
        }
        out
    }

    /// The bias, if any.
    pub fn bias(&self) -> &[f32] {
        &self.bias[..self.out_channels]
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// `x`, `(batch, in, h, w)` contiguous NCHW, into `(batch, out, s·h, s·w)` NCHW.
    pub fn forward(&self, x: &[f32], batch: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        self.forward_striped(x, batch, h, w, STRIPES.direct)
    }

    fn forward_striped(&self, x: &[f32], batch: usize, h: usize, w: usize, stripe_bytes: usize) -> Result<Vec<f32>> {
        let (cin, cout, s) = (self.in_channels, self.out_channels, self.stride);
        let hw = h * w;
        let parts = [(x, cin)];
        check_parts(&parts, cin, batch, h, w)?;
        if cin == 0 || hw == 0 {
            return Err(input_error(
                "input",
                format!("empty input ({batch} x {cin} x {h} x {w})"),
            ));
        }
        let (ho, wo) = (h * s, w * s);
        let hwo = ho * wo;
        let mut out = vec![0f32; batch * cout * hwo];
        if cout == 0 {
            return Ok(out);
        }
        let n = s * s * cout;
        let stripe = stripe_rows(cin.max(n), hw, stripe_bytes);
        let mut sc = SCRATCH.with(Cell::take);
        for (img, out_img) in out.chunks_exact_mut(cout * hwo).enumerate() {
            for p0 in (0..hw).step_by(stripe) {
                let rows = stripe.min(hw - p0);
                to_nhwc(&parts, img, hw, p0..p0 + rows, &mut sc.band);
                sc.out.resize(rows * n, 0.0);
                self.weight.run(&sc.band, cin, rows, &mut sc.out, n)?;
                // Each (i, j) is a `rows × Cout` matrix at column offset (i·s + j)·Cout, row stride n.
                for t in 0..s * s {
                    let (i, j) = (t / s, t % s);
                    let at = |r: usize| {
                        let p = p0 + r;
                        (p / w * s + i) * wo + p % w * s + j
                    };
                    scatter_channels(
                        &sc.out[t * cout..(rows - 1) * n + (t + 1) * cout],
                        n,
                        out_img,
                        hwo,
                        Positions::Map(at),
                    );
                }
            }
        }
        SCRATCH.with(|s| s.set(sc));
        Ok(out)
    }
}

/// Pixels per stripe: as many as fit in `bytes` of `k` values each, a multiple of the GEMM's row panel,
/// at least one panel and at most `pixels`.
fn stripe_rows(k: usize, pixels: usize, bytes: usize) -> usize {
    let rows = (bytes / (4 * k.max(1))) / MR * MR;
    rows.max(MR).min(pixels).max(1)
}

/// Checks that `parts` hold `batch` images of `h × w` pixels and `cin` channels in all.
fn check_parts(parts: &[(&[f32], usize)], cin: usize, batch: usize, h: usize, w: usize) -> Result<()> {
    let channels: usize = parts.iter().map(|p| p.1).sum();
    if channels != cin {
        return Err(input_error(
            "input",
            format!("{channels} channels in all, expected {cin}"),
        ));
    }
    for (i, (x, c)) in parts.iter().enumerate() {
        let want = batch * c * h * w;
        if x.len() != want {
            return Err(input_error(
                "input",
                format!(
                    "part {i}: expected {want} values ({batch} x {c} x {h} x {w}), found {}",
                    x.len()
                ),
            ));
        }
    }
    Ok(())
}

/// `dst[(p - pixels.start) · C + ch] = x[img, ch, p]` for `p` in `pixels`, where `x` is the concatenation
/// of `parts` along the channels (`C` in all): part of one image from CHW to HWC, in parallel over pixel
/// blocks.
fn to_nhwc(parts: &[(&[f32], usize)], img: usize, hw: usize, pixels: std::ops::Range<usize>, dst: &mut Vec<f32>) {
    let c: usize = parts.iter().map(|p| p.1).sum();
    let (p0, np) = (pixels.start, pixels.len());
    dst.resize(c * np, 0.0);
    if let [(x, 1)] = parts {
        dst.copy_from_slice(&x[img * hw..][p0..p0 + np]);
        return;
    }
    let avx = avx512();
    dst.par_chunks_mut(PIXEL_BLOCK * c).enumerate().for_each(|(b, block)| {
        let q0 = p0 + b * PIXEL_BLOCK;
        let nq = block.len() / c;
        let mut at = 0;
        for &(x, cp) in parts {
            let src = &x[img * cp * hw..][..cp * hw];
            let mut ch = 0;
            // 16 channels × 16 pixels at a time through a register transpose.
            while avx && ch + 16 <= cp {
                let mut q = 0;
                while q + 16 <= nq {
                    transpose16(&src[ch * hw + q0 + q..], hw, &mut block[q * c + at + ch..], c);
                    q += 16;
                }
                for q in q..nq {
                    for i in 0..16 {
                        block[q * c + at + ch + i] = src[(ch + i) * hw + q0 + q];
                    }
                }
                ch += 16;
            }
            for ch in ch..cp {
                for (q, &v) in src[ch * hw + q0..][..nq].iter().enumerate() {
                    block[q * c + at + ch] = v;
                }
            }
            at += cp;
        }
    });
}

/// Whether the AVX-512 code may run ([`cpu::features`]).
fn avx512() -> bool {
    cpu::features().avx512
}

/// `dst[j · ldd + i] = src[i · lds + j]` for `i, j < 16`. Only called where [`avx512`] holds; elsewhere
/// (never reached) a plain loop.
fn transpose16(src: &[f32], lds: usize, dst: &mut [f32], ldd: usize) {
    assert!(
        src.len() >= 15 * lds + 16 && dst.len() >= 15 * ldd + 16,
        "transpose16: {} source values at stride {lds}, {} destination values at stride {ldd}",
        src.len(),
        dst.len()
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512 F (checked above); the slices hold every row read or written.
        unsafe { avx::transpose16(src, lds, dst, ldd) };
        return;
    }
    for i in 0..16 {
        for j in 0..16 {
            dst[j * ldd + i] = src[i * lds + j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// [`super::transpose16`] in zmm registers: 16 row loads, kernels::f32's register transpose, 16 row stores.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `src` must hold `15 · lds + 16` values and `dst` `15 · ldd + 16`.
    #[target_feature(enable = "avx512f")]
    #[deny(unsafe_op_in_unsafe_fn)]
    pub(super) unsafe fn transpose16(src: &[f32], lds: usize, dst: &mut [f32], ldd: usize) {
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate() {
            // SAFETY: i · lds + 16 <= 15 · lds + 16 <= src.len() (the caller's contract).
            *v = unsafe { _mm512_loadu_ps(s.add(i * lds)) };
        }
        let t = crate::kernels::f32::transpose16(&r);
        for (j, v) in t.iter().enumerate() {
            // SAFETY: j · ldd + 16 <= 15 · ldd + 16 <= dst.len() (the caller's contract).
            unsafe { _mm512_storeu_ps(d.add(j * ldd), *v) };
        }
    }
}

/// Input rows `y0..y1` of an image in NHWC (`w` pixels of `c` channels per row).
struct Band<'a> {
    data: &'a [f32],
    y0: usize,
    y1: usize,
    w: usize,
    c: usize,
}

impl Band<'_> {
    /// The channels of pixel `(y, x)`, or `None` outside the image (in the padding). Rows of the image
    /// outside the band are never asked for.
    fn pixel(&self, y: isize, x: isize) -> Option<&[f32]> {
        if y < self.y0 as isize || y >= self.y1 as isize || x < 0 || x >= self.w as isize {
            return None;
        }
        let at = ((y as usize - self.y0) * self.w + x as usize) * self.c;
        Some(&self.data[at..at + self.c])
    }

    /// `n` consecutive pixels of row `y` from `x`, all inside the image.
    fn run(&self, y: usize, x: usize, n: usize) -> &[f32] {
        let at = ((y - self.y0) * self.w + x) * self.c;
        &self.data[at..at + n * self.c]
    }
}

/// The im2col row of output pixel `(oy, ox)`: for each tap `(i, j)`, the `Cin` channels of the input
/// pixel it reads, or zeros where that falls in the padding.
fn gather(band: &Band<'_>, g: &ConvGeometry, (oy, ox): (usize, usize), row: &mut [f32]) {
    let c = g.in_channels;
    let run = g.kernel_w * c;
    let (pad, x0) = (g.padding as isize, (ox * g.stride) as isize);
    for (i, dst) in row.chunks_exact_mut(run).enumerate() {
        let iy = (oy * g.stride + i * g.dilation) as isize - pad;
        if iy < band.y0 as isize || iy >= band.y1 as isize {
            dst.fill(0.0);
            continue;
        }
        if g.dilation == 1 && x0 >= pad && x0 - pad + g.kernel_w as isize <= band.w as isize {
            // The whole row of taps lies inside: one contiguous run of kw · Cin values.
            dst.copy_from_slice(band.run(iy as usize, (x0 - pad) as usize, g.kernel_w));
            continue;
        }
        for (j, d) in dst.chunks_exact_mut(c).enumerate() {
            match band.pixel(iy, x0 + (j * g.dilation) as isize - pad) {
                Some(p) => d.copy_from_slice(p),
                None => d.fill(0.0),
            }
        }
    }
}

/// Writes a stripe result (`rows` rows of `cout` values at stride `ld`) into the NCHW image `out`
/// (`cout` planes of `plane` values): row `r` goes to position `pos(r)` of every plane. In parallel over
/// blocks of output channels, each block written plane row by plane row.
fn scatter_channels(
    res: &[f32],
    ld: usize,
    out: &mut [f32],
    plane: usize,
    pos: Positions<impl Fn(usize) -> usize + Sync>,
) {
    let cout = out.len() / plane;
    // `res` ends right after the last row's `cout` values.
    let rows = (res.len() + ld - cout) / ld;
    let avx = avx512();
    out.par_chunks_mut(CHANNEL_BLOCK * plane)
        .enumerate()
        .for_each(|(b, planes)| {
            let c0 = b * CHANNEL_BLOCK;
            let nc = planes.len() / plane;
            let mut r0 = 0;
            if let (Positions::Contiguous(p0), true, 16) = (&pos, avx, nc) {
                // 16 rows × 16 channels at a time: 16 runs of 16 consecutive outputs per transpose.
                while r0 + 16 <= rows {
                    transpose16(&res[r0 * ld + c0..], ld, &mut planes[p0 + r0..], plane);
                    r0 += 16;
                }
            }
            for r in r0..rows {
                let src = &res[r * ld + c0..][..nc];
                let at = match &pos {
                    Positions::Contiguous(p0) => p0 + r,
                    Positions::Map(f) => f(r),
                };
                for (cc, &v) in src.iter().enumerate() {
                    planes[cc * plane + at] = v;
                }
            }
        });
}

/// Where [`scatter_channels`] puts each stripe row.
enum Positions<F> {
    /// Row `r` at `p0 + r`.
    Contiguous(usize),
    Map(F),
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// candle's conv2d (plus bias, ReLU) as the reference.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        dims: (usize, usize, usize, usize),
        w: &[f32],
        b: Option<&[f32]>,
        g: &ConvGeometry,
        relu: bool,
    ) -> Vec<f32> {
        let dev = Device::Cpu;
        let xt = Tensor::from_slice(x, dims, &dev).unwrap();
        let wt = Tensor::from_slice(w, (g.out_channels, g.in_channels, g.kernel_h, g.kernel_w), &dev).unwrap();
        let mut y = xt.conv2d(&wt, g.padding, g.stride, g.dilation, 1).unwrap();
        if let Some(b) = b {
            y = y
                .broadcast_add(&Tensor::from_slice(b, (1, g.out_channels, 1, 1), &dev).unwrap())
                .unwrap();
        }
        if relu {
            y = y.relu().unwrap();
        }
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn conv2d_matches_candle_on_odd_shapes() {
        // (batch, cin, cout, h, w, kernel, stride, padding, dilation, bias, relu)
        let cases = [
            (2, 5, 7, 9, 11, 3, 1, 1, 1, true, false),
            (2, 13, 50, 8, 6, 3, 1, 0, 1, false, true),
            (1, 3, 97, 10, 13, 3, 2, 1, 1, true, false),
            (2, 6, 9, 11, 9, 3, 1, 2, 2, true, true),
            (1, 17, 49, 7, 12, 3, 2, 0, 2, false, false),
            (2, 33, 20, 5, 7, 1, 1, 0, 1, true, false),
            (1, 9, 55, 9, 8, 1, 2, 0, 1, true, true),
            (2, 4, 3, 6, 5, 1, 1, 1, 1, true, false),
            (1, 1, 1, 4, 4, 3, 1, 1, 1, false, false),
            (1, 7, 8, 2, 3, 3, 1, 1, 1, true, false),
            (1, 70, 100, 12, 12, 3, 1, 1, 1, true, true),
            // Winograd: odd output sizes (edge tiles cut), padding 0 and 2, channel counts off the
            // 16-lane blocks.
            (2, 19, 33, 7, 9, 3, 1, 1, 1, true, true),
            (1, 21, 17, 8, 11, 3, 1, 0, 1, true, false),
            (2, 5, 3, 5, 6, 3, 1, 2, 1, false, false),
            (1, 40, 50, 3, 3, 3, 1, 1, 1, true, false),
            (1, 3, 4, 1, 1, 3, 1, 1, 1, true, false),
        ];
        for (i, &(batch, cin, cout, h, w, kernel, stride, padding, dilation, bias, relu)) in cases.iter().enumerate() {
            let g = ConvGeometry {
                in_channels: cin,
                out_channels: cout,
                kernel_h: kernel,
                kernel_w: kernel,
                stride,
                padding,
                dilation,
            };
            let wt = random(cout * cin * kernel * kernel, 1 + i as u64);
            let b = bias.then(|| random(cout, 100 + i as u64));
            let x = random(batch * cin * h * w, 200 + i as u64);
            let want = reference(&x, (batch, cin, h, w), &wt, b.as_deref(), &g, relu);
            for winograd in [false, true] {
                let p = PackedConv2d::pack_as(&wt, b.as_deref(), g, winograd, Precision::F32).unwrap();
                let back = p.weight();
                if winograd && winograd_applies(&g) {
                    assert!(matches!(p.weight, ConvWeight::Winograd(_)));
                    assert!(max_diff(&back, &wt) < 1e-6, "case {i}: weight from the Winograd form");
                } else {
                    assert_eq!(back, wt, "case {i}: unpacked weight");
                }
                // One stripe per image, and stripes of one row panel (not aligned with image rows).
                let tiny = Stripes {
                    im2col: 1,
                    direct: 1,
                    winograd: 1,
                };
                for bytes in [STRIPES, tiny] {
                    let (got, (ho, wo)) = p.forward_striped(&[(&x, cin)], batch, h, w, relu, bytes).unwrap();
                    assert_eq!(got.len(), batch * cout * ho * wo, "case {i}");
                    let err = max_diff(&got, &want);
                    assert!(
                        err < 1e-5 * (cin * kernel * kernel) as f32,
                        "case {i}, winograd {winograd}, {bytes:?}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn channel_parts_match_their_concatenation() {
        let dev = Device::Cpu;
        let (batch, h, w, cout) = (2, 7, 6, 11);
        let chans = [3, 1, 18];
        let cin: usize = chans.iter().sum();
        let xs: Vec<Vec<f32>> = chans
            .iter()
            .enumerate()
            .map(|(i, c)| random(batch * c * h * w, 40 + i as u64))
            .collect();
        let cat = Tensor::cat(
            &xs.iter()
                .zip(chans)
                .map(|(x, c)| Tensor::from_slice(x, (batch, c, h, w), &dev).unwrap())
                .collect::<Vec<_>>(),
            1,
        )
        .unwrap();
        let x = cat.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let parts: Vec<(&[f32], usize)> = xs.iter().map(|x| x.as_slice()).zip(chans).collect();
        for kernel in [1, 3] {
            let g = ConvGeometry {
                in_channels: cin,
                out_channels: cout,
                kernel_h: kernel,
                kernel_w: kernel,
                stride: 1,
                padding: kernel / 2,
                dilation: 1,
            };
            let wt = random(cout * cin * kernel * kernel, 50);
            let b = random(cout, 51);
            let p = PackedConv2d::pack(&wt, Some(&b), g).unwrap();
            let (want, _) = p.forward(&x, batch, h, w, true).unwrap();
            let (got, _) = p.forward_parts(&parts, batch, h, w, true).unwrap();
            assert_eq!(got, want, "kernel {kernel}");
        }
        let g = ConvGeometry {
            in_channels: cin,
            out_channels: cout,
            kernel_h: 1,
            kernel_w: 1,
            stride: 1,
            padding: 0,
            dilation: 1,
        };
        let p = PackedConv2d::pack(&random(cout * cin, 52), None, g).unwrap();
        let e = p
            .forward_parts(&parts[..2], batch, h, w, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 channels in all, expected 22"), "{e}");
    }

    /// Winograd's transforms cost accuracy (cancellations): F(2×2, 3×3) must stay within the rounding of
    /// the direct sum, against an f64 reference, on a deep conv with post-ReLU inputs.
    #[test]
    fn winograd_error_stays_within_direct_rounding() {
        let (cin, cout, h, w) = (384, 8, 6, 7);
        let g = ConvGeometry {
            in_channels: cin,
            out_channels: cout,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
            dilation: 1,
        };
        let mut rng = crate::rng::Rng::new(5);
        let wt: Vec<f32> = (0..cout * cin * 9).map(|_| (rng.normal() * 0.05) as f32).collect();
        let x: Vec<f32> = (0..cin * h * w).map(|_| rng.normal().max(0.0) as f32).collect();
        let mut want = vec![0f64; cout * h * w];
        for (i, v) in want.iter_mut().enumerate() {
            let (o, y, xx) = (i / (h * w), i / w % h, i % w);
            for c in 0..cin {
                for (t, wv) in wt[(o * cin + c) * 9..][..9].iter().enumerate() {
                    let (iy, ix) = ((y + t / 3) as isize - 1, (xx + t % 3) as isize - 1);
                    if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                        *v += f64::from(*wv) * f64::from(x[(c * h + iy as usize) * w + ix as usize]);
                    }
                }
            }
        }
        let err = |winograd: bool| {
            let (got, _) = PackedConv2d::pack_as(&wt, None, g, winograd, Precision::F32)
                .unwrap()
                .forward(&x, 1, h, w, false)
                .unwrap();
            got.iter()
                .zip(&want)
                .map(|(a, b)| (f64::from(*a) - b).abs())
                .fold(0.0, f64::max)
        };
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let (direct, winograd) = (err(false), err(true));
        assert!(
            winograd <= 3.0 * direct.max(scale * 1e-7),
            "winograd {winograd:e}, direct {direct:e}, |y| <= {scale}"
        );
        assert!(winograd <= scale * 3e-6, "winograd {winograd:e}, |y| <= {scale}");
    }

    /// bf16 GEMMs in both paths and in the transposed convolution: within bf16's rounding of the f32 result
    /// (8 bits of mantissa on weights and inputs; Winograd's transformed inputs are rounded, not the pixels).
    /// Measured relative to the largest output: Winograd 2.6e-3, im2col 1.4e-3 and 1.8e-3, transposed 2.3e-3.
    #[test]
    fn bf16_convolutions_stay_near_f32() {
        let (cin, cout, h, w) = (96, 24, 9, 11);
        let mut rng = crate::rng::Rng::new(9);
        let wt: Vec<f32> = (0..cout * cin * 9).map(|_| (rng.normal() * 0.05) as f32).collect();
        let x: Vec<f32> = (0..2 * cin * h * w).map(|_| rng.normal() as f32).collect();
        let rel = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max) / scale
        };
        for (stride, winograd) in [(1, true), (1, false), (2, false)] {
            let g = ConvGeometry {
                in_channels: cin,
                out_channels: cout,
                kernel_h: 3,
                kernel_w: 3,
                stride,
                padding: 1,
                dilation: 1,
            };
            let bias: Vec<f32> = (0..cout).map(|o| o as f32 * 0.1).collect();
            let run = |p: Precision| {
                PackedConv2d::pack_as(&wt, Some(&bias), g, winograd, p).unwrap().forward(&x, 2, h, w, true).unwrap().0
            };
            let err = rel(&run(Precision::Bf16), &run(Precision::F32));
            assert!(err > 0.0 && err < 5e-3, "stride {stride}, winograd {winograd}: relative error {err:e}");
        }
        let wt: Vec<f32> = (0..cin * cout * 4).map(|_| (rng.normal() * 0.05) as f32).collect();
        let bias = vec![0.5f32; cout];
        let run = |p: Precision| {
            PackedConvTranspose2d::pack_with(&wt, &bias, cin, cout, 2, p).unwrap().forward(&x, 2, h, w).unwrap()
        };
        let err = rel(&run(Precision::Bf16), &run(Precision::F32));
        assert!(err > 0.0 && err < 5e-3, "transposed: relative error {err:e}");
    }

    #[test]
    fn stripes_hold_whole_row_panels() {
        assert_eq!(stripe_rows(27648, 25600, STRIPES.im2col), 144);
        assert_eq!(stripe_rows(27648, 25600, 1), MR);
        assert_eq!(stripe_rows(768, 100, STRIPES.im2col), 100);
        assert_eq!(stripe_rows(768, 3, 1), 3);
    }

    #[test]
    fn conv_transpose_matches_candle() {
        let dev = Device::Cpu;
        for (i, &(batch, cin, cout, h, w, s)) in [(2, 5, 7, 3, 4, 2), (1, 50, 49, 5, 6, 2), (1, 3, 4, 2, 3, 3)]
            .iter()
            .enumerate()
        {
            let wt = random(cin * cout * s * s, 10 + i as u64);
            let b = random(cout, 20 + i as u64);
            let x = random(batch * cin * h * w, 30 + i as u64);
            let p = PackedConvTranspose2d::pack(&wt, &b, cin, cout, s).unwrap();
            assert_eq!(p.weight(), wt);
            assert_eq!(p.bias(), &b[..]);
            let got = p.forward(&x, batch, h, w).unwrap();
            assert_eq!(got, p.forward_striped(&x, batch, h, w, 1).unwrap(), "case {i}: striped");
            let xt = Tensor::from_slice(&x, (batch, cin, h, w), &dev).unwrap();
            let want = xt
                .conv_transpose2d(&Tensor::from_slice(&wt, (cin, cout, s, s), &dev).unwrap(), 0, 0, s, 1)
                .unwrap()
                .broadcast_add(&Tensor::from_slice(&b, (1, cout, 1, 1), &dev).unwrap())
                .unwrap();
            let err = max_diff(&got, &want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert!(err < 1e-5 * cin as f32, "case {i}: {err}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let g = ConvGeometry {
            in_channels: 2,
            out_channels: 3,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 0,
            dilation: 1,
        };
        let e = PackedConv2d::pack(&[0.0; 10], None, g).unwrap_err().to_string();
        assert!(e.contains("expected 54 values") && e.contains("found 10"), "{e}");
        let e = PackedConv2d::pack(&[0.0; 54], Some(&[0.0; 2]), g)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias") && e.contains("found 2"), "{e}");
        let p = PackedConv2d::pack(&[0.0; 54], None, g).unwrap();
        let e = p.forward(&[0.0; 7], 1, 2, 2, false).unwrap_err().to_string();
        assert!(e.contains("expected 8 values"), "{e}");
        // A 2x2 input cannot hold the 3x3 kernel without padding.
        let e = p.forward(&[0.0; 8], 1, 2, 2, false).unwrap_err().to_string();
        assert!(e.contains("smaller than"), "{e}");
        let bad = ConvGeometry { stride: 0, ..g };
        assert!(PackedConv2d::pack(&[0.0; 54], None, bad).is_err());
        assert!(PackedConvTranspose2d::pack(&[0.0; 5], &[0.0; 3], 2, 3, 2).is_err());
    }
}
