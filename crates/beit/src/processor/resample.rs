//! Pillow-exact `Image.resize` for 8-bit images (any number of independent bands, interleaved).
//!
//! Ported from Pillow's `libImaging/Resample.c` (convolution filters) and `Geometry.c`
//! (`ImagingScaleAffine`, which `Image.resize` uses for NEAREST). Every float step is done in the
//! same precision and order as the C code so the uint8 output is bit-identical.

/// Pillow's resampling filters, numbered as `PIL.Image.Resampling` (the `resample` config key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `NEAREST` (0): the nearest source pixel (Pillow's affine scaler).
    Nearest = 0,
    /// `LANCZOS` (1): windowed sinc, support 3.
    Lanczos = 1,
    /// `BILINEAR` (2): triangle, support 1.
    Bilinear = 2,
    /// `BICUBIC` (3): Keys cubic with a = -0.5, support 2.
    Bicubic = 3,
    /// `BOX` (4): box, support 0.5.
    Box = 4,
    /// `HAMMING` (5): Hamming-windowed sinc, support 1.
    Hamming = 5,
}

impl Filter {
    /// Maps a `PIL.Image.Resampling` value; `None` for anything else (Pillow 13's MKS2013/MKS2021 are not ported).
    pub fn from_pil(value: i64) -> Option<Filter> {
        Some(match value {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    /// Kernel support radius before scaling by the downscale factor.
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming | Filter::Nearest => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear | Filter::Nearest => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    return 1.0;
                }
                if x >= 1.0 {
                    return 0.0;
                }
                let x = x * std::f64::consts::PI;
                // C writes `0.54f + 0.46f * cos(x)`: float literals promoted to double.
                x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::simd::{simd_variants, Level};

/// 8 bits of result, 2 bits of headroom for negative lobes: Pillow's `PRECISION_BITS`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Errors for inconsistent buffer geometry (the only way `resize` can fail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResampleError(pub String);

impl std::fmt::Display for ResampleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ResampleError {}

/// Per-output-pixel taps: `(first source index, fixed-point weights)`, as `precompute_coeffs` +
/// `normalize_coeffs_8bpc` build them for a box of `(0, in_size)`.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    // in0/in1 are C floats; their difference is taken in float, then widened.
    let scale = (in_size as f32 - 0.0f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    let mut taps = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero; `as i64` does too.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let mut w: Vec<f64> = (0..xmax.max(0)).map(|x| filter.eval(((x + xmin) as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = w.iter().sum();
        if ww != 0.0 {
            w.iter_mut().for_each(|k| *k /= ww);
        }
        let one = (1u32 << PRECISION_BITS) as f64;
        let fixed = w.iter().map(|&k| if k < 0.0 { (-0.5 + k * one) as i32 } else { (0.5 + k * one) as i32 }).collect();
        taps.push((xmin as usize, fixed));
    }
    taps
}

/// The taps of one axis, built once per (input size, output size, filter) and shared through [`taps`].
struct Taps {
    /// `(first source index, fixed-point weights)` per output pixel.
    taps: Vec<(usize, Vec<i32>)>,
    /// Whether `255 * sum |weight|` plus the rounding fits i32, as Pillow's `int` accumulators assume; the
    /// i32 kernels are exact then (any order of additions), otherwise the i64 code runs.
    fits_i32: bool,
}

/// Cached [`Taps`]: a folder of photos of a few sizes resized to one model input builds them once.
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Arc<Taps> {
    type Cache = VecDeque<((usize, usize, Filter), Arc<Taps>)>;
    static CACHE: Mutex<Cache> = Mutex::new(VecDeque::new());
    const CAPACITY: usize = 16;
    let key = (in_size, out_size, filter);
    if let Some((_, t)) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(k, _)| *k == key) {
        return t.clone();
    }
    let taps = coefficients(in_size, out_size, filter);
    let worst = taps.iter().map(|(_, k)| k.iter().map(|&w| (w as i64).abs()).sum::<i64>()).max().unwrap_or(0);
    let fits_i32 = 255 * worst + (1 << PRECISION_BITS) < i32::MAX as i64;
    let t = Arc::new(Taps { taps, fits_i32 });
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= CAPACITY {
        cache.pop_front();
    }
    cache.push_back((key, t.clone()));
    t
}

/// `clip8` for the i32 kernels.
#[inline(always)]
fn clip8_i32(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Source rows per block of the horizontal pass.
const HROWS: usize = 16;

/// The horizontal pass over source rows `rows` for `CH` interleaved channels, `L = HROWS * CH` lanes, in
/// i32 (exact when [`Taps::fits_i32`]). Blocks of [`HROWS`] rows are transposed so that a source column's
/// `L` values lie together; each output column is then `L` independent sums, one broadcast weight per tap,
/// which vectorizes without any horizontal reduction. The result is transposed back into `out`.
#[inline(always)]
fn horizontal_blocks_i32<const CH: usize, const L: usize>(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    taps: &[(usize, Vec<i32>)],
    out: &mut [u8],
) {
    debug_assert!(L == HROWS * CH && L % 16 == 0);
    let out_w = taps.len();
    let (row_bytes, out_row_bytes) = (width * CH, out_w * CH);
    // The source columns the taps read.
    let x_lo = taps.iter().map(|t| t.0).min().unwrap_or(0);
    let x_hi = taps.iter().map(|t| t.0 + t.1.len()).max().unwrap_or(0).max(x_lo);
    // Lanes of rows past the end of a short last block hold stale values; their sums are dropped.
    let mut cols = vec![0u8; (x_hi - x_lo) * L];
    let mut sums = vec![0u8; out_w * L];
    let mut y = rows.start;
    while y < rows.end {
        let n = HROWS.min(rows.end - y);
        let block: [&[u8]; HROWS] =
            std::array::from_fn(|i| &src[(y + i.min(n - 1)) * row_bytes..][x_lo * CH..x_hi * CH]);
        if n == HROWS {
            for (x, col) in cols.chunks_exact_mut(L).enumerate() {
                for (i, r) in block.iter().enumerate() {
                    col[i * CH..][..CH].copy_from_slice(&r[x * CH..][..CH]);
                }
            }
        } else {
            for (x, col) in cols.chunks_exact_mut(L).enumerate() {
                for (i, r) in block.iter().enumerate().take(n) {
                    col[i * CH..][..CH].copy_from_slice(&r[x * CH..][..CH]);
                }
            }
        }
        for ((xmin, k), o) in taps.iter().zip(sums.chunks_exact_mut(L)) {
            let first = &cols[(xmin - x_lo) * L..][..k.len() * L];
            // 16 lanes at a time: few enough for the sums to stay in registers over the taps.
            for (g, o) in o.chunks_exact_mut(16).enumerate() {
                let mut acc = [1i32 << (PRECISION_BITS - 1); 16];
                for (col, &w) in first.chunks_exact(L).zip(k) {
                    let col: &[u8; 16] = col[g * 16..][..16].try_into().unwrap(); // ok: exactly 16 long
                    for j in 0..16 {
                        acc[j] = acc[j].wrapping_add((col[j] as i32).wrapping_mul(w));
                    }
                }
                for j in 0..16 {
                    o[j] = clip8_i32(acc[j]);
                }
            }
        }
        let first_out = (y - rows.start) * out_row_bytes;
        for (i, orow) in out[first_out..].chunks_exact_mut(out_row_bytes).take(n).enumerate() {
            for (px, o) in orow.chunks_exact_mut(CH).zip(sums.chunks_exact(L)) {
                px.copy_from_slice(&o[i * CH..][..CH]);
            }
        }
        y += n;
    }
}

#[inline(always)]
fn horizontal_rgb_generic(src: &[u8], width: usize, rows: std::ops::Range<usize>, t: &Taps, out: &mut [u8]) {
    horizontal_blocks_i32::<3, { 3 * HROWS }>(src, width, rows, &t.taps, out)
}

#[inline(always)]
fn horizontal_gray_generic(src: &[u8], width: usize, rows: std::ops::Range<usize>, t: &Taps, out: &mut [u8]) {
    horizontal_blocks_i32::<1, HROWS>(src, width, rows, &t.taps, out)
}

/// Output columns per block of the vertical pass: the sums stay in registers over all taps.
const VCOLS: usize = 64;

/// The vertical pass in i32 (see [`vertical`]), [`VCOLS`] columns at a time.
#[inline(always)]
fn vertical_generic(src: &[u8], stride: usize, t: &Taps, y0: usize, out: &mut [u8]) {
    for (out_row, (ymin, k)) in out.chunks_exact_mut(stride).zip(&t.taps) {
        let first = &src[(ymin - y0) * stride..];
        let mut x = 0;
        while x < stride {
            let n = VCOLS.min(stride - x);
            let mut acc = [1i32 << (PRECISION_BITS - 1); VCOLS];
            if n == VCOLS {
                for (y, &ky) in k.iter().enumerate() {
                    let row = &first[y * stride + x..][..VCOLS];
                    for j in 0..VCOLS {
                        acc[j] = acc[j].wrapping_add((row[j] as i32).wrapping_mul(ky));
                    }
                }
            } else {
                for (y, &ky) in k.iter().enumerate() {
                    let row = &first[y * stride + x..][..n];
                    for (a, &p) in acc.iter_mut().zip(row) {
                        *a = a.wrapping_add((p as i32).wrapping_mul(ky));
                    }
                }
            }
            for (o, &a) in out_row[x..x + n].iter_mut().zip(&acc) {
                *o = clip8_i32(a);
            }
            x += n;
        }
    }
}

simd_variants! { fn horizontal_rgb(src: &[u8], width: usize, rows: std::ops::Range<usize>, t: &Taps, out: &mut [u8]) = horizontal_rgb_generic; }
simd_variants! { fn horizontal_gray(src: &[u8], width: usize, rows: std::ops::Range<usize>, t: &Taps, out: &mut [u8]) = horizontal_gray_generic; }
simd_variants! { fn vertical_i32(src: &[u8], stride: usize, t: &Taps, y0: usize, out: &mut [u8]) = vertical_generic; }

/// `clip8`: Pillow looks up `ss >> PRECISION_BITS` in a table that clamps to 0..=255.
#[inline]
fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an interleaved 8-bit image (`channels` bands per pixel, each band independent, as for
/// Pillow's "L" and "RGB" modes) exactly like `PIL.Image.resize((out_w, out_h), filter)`.
pub fn resize(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Result<Vec<u8>, ResampleError> {
    resize_with(Some(Level::current()), src, width, height, channels, out_w, out_h, filter)
}

/// [`resize`] with the kernels compiled for `level`, or (`None`) the reference i64 code they must equal.
#[allow(clippy::too_many_arguments)]
pub(crate) fn resize_with(
    level: Option<Level>,
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Result<Vec<u8>, ResampleError> {
    let expected = width.checked_mul(height).and_then(|p| p.checked_mul(channels));
    if expected != Some(src.len()) || channels == 0 {
        return Err(ResampleError(format!(
            "resize: buffer of {} bytes does not hold a {width}x{height} image with {channels} channels",
            src.len()
        )));
    }
    if width == 0 || height == 0 || out_w == 0 || out_h == 0 {
        return Err(ResampleError(format!("resize: sizes must be positive, got {width}x{height} -> {out_w}x{out_h}")));
    }
    if out_w.checked_mul(out_h).and_then(|p| p.checked_mul(channels)).is_none_or(|n| n > isize::MAX as usize) {
        return Err(ResampleError(format!("resize: output {out_w}x{out_h} is too large")));
    }
    if width == out_w && height == out_h {
        return Ok(src.to_vec()); // Image.resize returns a copy for an unchanged size.
    }
    if filter == Filter::Nearest {
        return Ok(nearest(src, width, height, channels, out_w, out_h));
    }
    let vert = taps(height, out_h, filter);
    if out_w == width {
        return Ok(vertical(level, src, width, channels, &vert, 0));
    }
    let horiz = taps(width, out_w, filter);
    if out_h == height {
        return Ok(horizontal(level, src, width, channels, 0..height, &horiz));
    }
    // Pillow >= 13 (PR #9549) runs the vertical pass first when the height shrinks by more than
    // twice as many pixels as the width: `in_h - out_h > 2 * (in_w - out_w)`. The order changes the
    // result because each pass rounds to uint8.
    let (dh, dw) = (height as i64 - out_h as i64, width as i64 - out_w as i64);
    if dh > 0 && dh > 2 * dw {
        let tmp = vertical(level, src, width, channels, &vert, 0);
        return Ok(horizontal(level, &tmp, width, channels, 0..out_h, &horiz));
    }
    // Horizontal first, only over the source rows the vertical pass reads (`ybox_first..ybox_last`).
    let y_first = vert.taps.first().map_or(0, |t| t.0);
    let y_last = vert.taps.last().map_or(0, |t| t.0 + t.1.len());
    let tmp = horizontal(level, src, width, channels, y_first..y_last, &horiz);
    Ok(vertical(level, &tmp, out_w, channels, &vert, y_first))
}

/// `ImagingResampleHorizontal_8bpc` over source rows `rows`: the i32 kernels for RGB and gray when exact
/// (`level` given), else the reference.
fn horizontal(
    level: Option<Level>,
    src: &[u8],
    width: usize,
    ch: usize,
    rows: std::ops::Range<usize>,
    t: &Taps,
) -> Vec<u8> {
    let out_w = t.taps.len();
    let mut out = vec![0u8; out_w * rows.len() * ch];
    match (level, ch) {
        (Some(level), 3) if t.fits_i32 => horizontal_rgb(level, src, width, rows, t, &mut out),
        (Some(level), 1) if t.fits_i32 => horizontal_gray(level, src, width, rows, t, &mut out),
        _ => horizontal_reference(src, width, ch, rows, &t.taps, &mut out),
    }
    out
}

/// The i64 horizontal pass, output pixel by output pixel.
fn horizontal_reference(
    src: &[u8],
    width: usize,
    ch: usize,
    rows: std::ops::Range<usize>,
    taps: &[(usize, Vec<i32>)],
    out: &mut [u8],
) {
    let out_w = taps.len();
    for (out_row, y) in out.chunks_exact_mut(out_w * ch).zip(rows) {
        let in_row = &src[y * width * ch..][..width * ch];
        for (xx, (xmin, k)) in taps.iter().enumerate() {
            for c in 0..ch {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (x, &kx) in k.iter().enumerate() {
                    ss += in_row[(x + xmin) * ch + c] as i64 * kx as i64;
                }
                out_row[xx * ch + c] = clip8(ss);
            }
        }
    }
}

/// `ImagingResampleVertical_8bpc`; `src` starts at source row `y0` (the horizontal pass's first row).
fn vertical(level: Option<Level>, src: &[u8], width: usize, ch: usize, t: &Taps, y0: usize) -> Vec<u8> {
    let stride = width * ch;
    if let (Some(level), true) = (level, t.fits_i32) {
        let mut out = vec![0u8; t.taps.len() * stride];
        vertical_i32(level, src, stride, t, y0, &mut out);
        return out;
    }
    let taps = &t.taps;
    let mut out = vec![0u8; taps.len() * stride];
    let mut acc = vec![0i64; stride];
    for (out_row, (ymin, k)) in out.chunks_exact_mut(stride).zip(taps) {
        acc.iter_mut().for_each(|a| *a = 1 << (PRECISION_BITS - 1));
        for (y, &ky) in k.iter().enumerate() {
            let row = &src[(y + ymin - y0) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i64 * ky as i64;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// `ImagingScaleAffine`: source coordinates accumulate `scale` in double from `scale * 0.5`
/// (the accumulation, not `(x + 0.5) * scale`, decides ties), truncated toward zero.
fn nearest(src: &[u8], width: usize, height: usize, ch: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let table = |in_size: usize, out_size: usize| -> Vec<Option<usize>> {
        let a = (in_size as f32 - 0.0f32) as f64 / out_size as f64;
        let mut o = a * 0.5;
        (0..out_size)
            .map(|_| {
                let i = if o < 0.0 { None } else { Some(o as usize).filter(|&i| i < in_size) };
                o += a;
                i
            })
            .collect()
    };
    let (xs, ys) = (table(width, out_w), table(height, out_h));
    let mut out = vec![0u8; out_w * out_h * ch]; // Pillow fills out-of-range pixels with 0
    for (yy, yi) in ys.iter().enumerate() {
        let Some(yi) = *yi else { continue };
        for (xx, xi) in xs.iter().enumerate() {
            if let Some(xi) = *xi {
                let s = (yi * width + xi) * ch;
                out[(yy * out_w + xx) * ch..][..ch].copy_from_slice(&src[s..s + ch]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/processor/");

    /// Raw bytes and channel count of a fixture PNG (8-bit L or RGB).
    fn load(rel: &str) -> (Vec<u8>, usize, usize, usize) {
        let img = image::open(format!("{FIXTURES}{rel}")).unwrap();
        let (w, h) = (img.width() as usize, img.height() as usize);
        match img {
            image::DynamicImage::ImageLuma8(i) => (i.into_raw(), w, h, 1),
            image::DynamicImage::ImageRgb8(i) => (i.into_raw(), w, h, 3),
            other => panic!("{rel}: unexpected {:?}", other.color()),
        }
    }

    /// Every filter at down/up/one-axis/both-orders sizes against Pillow 13: bit-identical.
    #[test]
    fn resize_matches_pillow_exactly() {
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}manifest.json")).unwrap()).unwrap();
        let cases = manifest["resize_cases"].as_array().unwrap();
        let (mut values, mut differing) = (0usize, 0usize);
        for case in cases {
            let (src, w, _, ch) = load(case["image"].as_str().unwrap());
            let c: Vec<usize> = case["crop"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let crop: Vec<u8> =
                (0..c[3]).flat_map(|y| src[((c[1] + y) * w + c[0]) * ch..][..c[2] * ch].to_vec()).collect();
            let size: Vec<usize> =
                case["size"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let filter = Filter::from_pil(case["filter"].as_i64().unwrap()).unwrap();
            let got = resize(&crop, c[2], c[3], ch, size[0], size[1], filter).unwrap();
            for level in Level::available().into_iter().map(Some).chain([None]) {
                let other = resize_with(level, &crop, c[2], c[3], ch, size[0], size[1], filter).unwrap();
                assert!(other == got, "{case}: {level:?}");
            }
            let (want, ww, wh, wch) = load(case["expected"].as_str().unwrap());
            assert_eq!((ww, wh, wch), (size[0], size[1], ch));
            let d = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            values += want.len();
            differing += d;
            assert_eq!(d, 0, "{case}: {d} of {} values differ", want.len());
        }
        println!("resize: {} cases, {values} values, {differing} differ", cases.len());
    }

    /// The i32 kernels at every level against the i64 reference on random images: RGB and gray, down and
    /// up, both pass orders, every filter, including a photo-sized downscale to a small input.
    #[test]
    fn kernels_match_reference_on_random_images() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut byte = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        };
        let cases = [
            (97, 61, 3, 31, 17),
            (64, 48, 1, 150, 90),
            (1024, 768, 3, 16, 16),
            (300, 500, 3, 224, 224),
            (33, 200, 3, 40, 20),
            (200, 30, 1, 7, 60),
            // Fewer rows than a block of the horizontal pass, and a short last block.
            (50, 5, 3, 20, 3),
            (41, 9, 1, 13, 7),
            (640, 37, 3, 100, 35),
        ];
        for (w, h, ch, ow, oh) in cases {
            let src: Vec<u8> = (0..w * h * ch).map(|_| byte()).collect();
            for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos, Filter::Box, Filter::Hamming] {
                let want = resize_with(None, &src, w, h, ch, ow, oh, filter).unwrap();
                for level in Level::available() {
                    let got = resize_with(Some(level), &src, w, h, ch, ow, oh, filter).unwrap();
                    assert!(got == want, "{w}x{h}x{ch} -> {ow}x{oh} {filter:?} {level:?}");
                }
            }
        }
    }

    #[test]
    fn resize_rejects_bad_geometry() {
        assert!(resize(&[0; 5], 2, 2, 1, 3, 3, Filter::Bilinear).is_err());
        assert!(resize(&[], 0, 0, 3, 3, 3, Filter::Bicubic).is_err());
        assert!(resize(&[1; 12], 2, 2, 3, 0, 5, Filter::Lanczos).is_err());
        assert!(resize(&[1; 12], 2, 2, 3, usize::MAX, 5, Filter::Lanczos).is_err());
        assert_eq!(resize(&[7; 12], 2, 2, 3, 2, 2, Filter::Box).unwrap(), vec![7; 12]);
        assert_eq!(Filter::from_pil(6), None);
    }
}
