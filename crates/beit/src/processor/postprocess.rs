//! Post-processing: `post_process_semantic_segmentation` (logits to per-pixel class ids) and torch's
//! bilinear `interpolate`, following ATen's CPU kernel.

use super::load::PIL_MAX_IMAGE_PIXELS;
use super::{input_err, BeitImageProcessor, Result};

/// Semantic map per image: class ids row-major and `(height, width)`.
pub type SegmentationMap = (Vec<u32>, (usize, usize));

impl BeitImageProcessor {
    /// `post_process_semantic_segmentation`: logits `[batch, classes, h, w]` (row-major) to class
    /// maps, upsampled per image to `target_sizes[i] = (height, width)` with torch's bilinear
    /// `interpolate(align_corners=False)` before the argmax (first maximum wins, as `torch.argmax`).
    pub fn post_process_semantic_segmentation(
        &self,
        logits: &[f32],
        shape: [usize; 4],
        target_sizes: Option<&[(usize, usize)]>,
    ) -> Result<Vec<SegmentationMap>> {
        let [b, c, h, w] = shape;
        let per = c.checked_mul(h).and_then(|x| x.checked_mul(w));
        if per.and_then(|p| p.checked_mul(b)) != Some(logits.len()) {
            return Err(input_err(
                "logits",
                format!("{b}*{c}*{h}*{w} values for shape {shape:?}"),
                format!("{} values", logits.len()),
            ));
        }
        if c == 0 {
            return Err(input_err("logits", "at least one class", "0 classes"));
        }
        if let Some(t) = target_sizes {
            if t.len() != b {
                return Err(input_err(
                    "target_sizes",
                    format!("{b} sizes (one per image in the batch)"),
                    format!("{}", t.len()),
                ));
            }
        }
        let per = c * h * w;
        let mut out = Vec::with_capacity(b);
        for i in 0..b {
            let image = &logits[i * per..(i + 1) * per];
            match target_sizes {
                // Upsample and argmax pixel by pixel: same arithmetic as `interpolate_bilinear`,
                // without materializing `classes x height x width` values.
                Some(t) => {
                    let (oh, ow) = t[i];
                    check_interpolate(image.len(), c, h, w, oh, ow)?;
                    if oh.checked_mul(ow).is_none_or(|n| n > PIL_MAX_IMAGE_PIXELS as usize) {
                        return Err(input_err(
                            format!("target_sizes[{i}]"),
                            format!("at most {PIL_MAX_IMAGE_PIXELS} pixels"),
                            format!("{oh}x{ow}"),
                        ));
                    }
                    let (ys, xs) = (bilinear_taps(h, oh, false), bilinear_taps(w, ow, false));
                    let mut ids = Vec::with_capacity(oh * ow);
                    let mut vals = vec![0f32; c];
                    for &yt in &ys {
                        for &xt in &xs {
                            for (k, v) in vals.iter_mut().enumerate() {
                                *v = bilinear_at(&image[k * h * w..][..h * w], w, yt, xt);
                            }
                            ids.push(argmax_at(&vals, c, 1, 0));
                        }
                    }
                    out.push((ids, (oh, ow)));
                }
                None => out.push((argmax_channels(image, c, h * w), (h, w))),
            }
        }
        Ok(out)
    }
}

/// Argmax over `c` planes of `plane` values each, at position `p`: the first maximum wins and NaN
/// counts as the maximum, as in `torch.argmax`.
pub(crate) fn argmax_at(data: &[f32], c: usize, plane: usize, p: usize) -> u32 {
    let mut best = 0usize;
    for k in 1..c {
        let (v, b) = (data[k * plane + p], data[best * plane + p]);
        if !b.is_nan() && (v.is_nan() || v > b) {
            best = k;
        }
    }
    best as u32
}

fn argmax_channels(data: &[f32], c: usize, plane: usize) -> Vec<u32> {
    (0..plane).map(|p| argmax_at(data, c, plane, p)).collect()
}

/// Per output index `(i0, i1, lambda0, lambda1)` as ATen's CPU `compute_source_index_and_lambda`:
/// the scale is `in / out` (or `(in - 1) / (out - 1)` with `align_corners`) in float32, the source
/// index `scale * (dst + 0.5) - 0.5` clamped at 0; equal sizes copy.
pub(crate) fn bilinear_taps(input: usize, output: usize, align_corners: bool) -> Vec<(usize, usize, f32, f32)> {
    let scale: f32 = match (align_corners, output > 1) {
        (true, true) => (input - 1) as f32 / (output - 1) as f32,
        (true, false) => 0.0,
        (false, _) => input as f32 / output as f32,
    };
    (0..output)
        .map(|i| {
            if input == output {
                return (i, i, 1.0, 0.0);
            }
            let real = if align_corners { scale * i as f32 } else { (scale * (i as f32 + 0.5) - 0.5).max(0.0) };
            let i0 = (real.floor() as usize).min(input - 1);
            let l1 = (real - i0 as f32).clamp(0.0, 1.0);
            (i0, if i0 < input - 1 { i0 + 1 } else { i0 }, 1.0 - l1, l1)
        })
        .collect()
}

/// One output value: columns blended in each row, then the two rows (ATen's `Interpolate` order).
#[inline]
fn bilinear_at(
    plane: &[f32],
    w: usize,
    (y0, y1, ly0, ly1): (usize, usize, f32, f32),
    (x0, x1, lx0, lx1): (usize, usize, f32, f32),
) -> f32 {
    let t0 = plane[y0 * w + x0] * lx0 + plane[y0 * w + x1] * lx1;
    let t1 = plane[y1 * w + x0] * lx0 + plane[y1 * w + x1] * lx1;
    t0 * ly0 + t1 * ly1
}

/// Largest output `interpolate_bilinear` builds (values); larger requests are refused, not allocated.
pub const MAX_INTERPOLATE_VALUES: usize = 1 << 32;

/// `torch.nn.functional.interpolate(x[None], size=(out_h, out_w), mode="bilinear",
/// align_corners=...)[0]` for a contiguous float32 `[c, h, w]` tensor, following ATen's CPU kernel
/// (float32 scale, indices and weights). Returns `[c, out_h, out_w]`.
pub fn interpolate_bilinear(
    src: &[f32],
    c: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> Result<Vec<f32>> {
    check_interpolate(src.len(), c, h, w, out_h, out_w)?;
    if c.checked_mul(out_h).and_then(|x| x.checked_mul(out_w)).is_none_or(|n| n > MAX_INTERPOLATE_VALUES) {
        return Err(input_err(
            "interpolate_bilinear output",
            format!("at most {MAX_INTERPOLATE_VALUES} values"),
            format!("{c}x{out_h}x{out_w}"),
        ));
    }
    let (ys, xs) = (bilinear_taps(h, out_h, align_corners), bilinear_taps(w, out_w, align_corners));
    let mut out = Vec::with_capacity(c * out_h * out_w);
    for plane in src.chunks_exact(h * w) {
        for &yt in &ys {
            out.extend(xs.iter().map(|&xt| bilinear_at(plane, w, yt, xt)));
        }
    }
    Ok(out)
}

fn check_interpolate(len: usize, c: usize, h: usize, w: usize, out_h: usize, out_w: usize) -> Result<()> {
    if c.checked_mul(h).and_then(|x| x.checked_mul(w)) != Some(len) {
        return Err(input_err("interpolate_bilinear input", format!("{c}*{h}*{w} values"), format!("{len}")));
    }
    if c == 0 || h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(input_err(
            "interpolate_bilinear sizes",
            "non-empty input and output",
            format!("{c}x{h}x{w} -> {out_h}x{out_w}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_fixtures::{manifest, npy_f32, npy_i64, strs};
    use super::*;

    #[test]
    fn post_process_and_interpolate_match_torch() {
        let m = manifest();
        let t = &m["torch"];
        let proc = BeitImageProcessor::default();
        let (s, logits) = npy_f32(t["logits"].as_str().unwrap());
        let shape = [s[0], s[1], s[2], s[3]];
        let sizes: Vec<(usize, usize)> = t["target_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize))
            .collect();
        let ours = proc.post_process_semantic_segmentation(&logits, shape, Some(&sizes)).unwrap();
        for (i, want) in strs(&t["seg_target"]).iter().enumerate() {
            let (ws, want) = npy_i64(want);
            assert_eq!((ours[i].1 .0, ours[i].1 .1), (ws[0], ws[1]));
            assert!(ours[i].0.iter().zip(&want).all(|(a, b)| *a as i64 == *b), "image {i}");
        }
        let none = proc.post_process_semantic_segmentation(&logits, shape, None).unwrap();
        let (_, want) = npy_i64(t["seg_none"].as_str().unwrap());
        assert_eq!(none.iter().flat_map(|m| m.0.iter().map(|&v| v as i64)).collect::<Vec<_>>(), want);
        let (s, ties) = npy_f32(t["logits_ties"].as_str().unwrap());
        let got = proc.post_process_semantic_segmentation(&ties, [s[0], s[1], s[2], s[3]], None).unwrap();
        let (_, want) = npy_i64(t["seg_ties"].as_str().unwrap());
        assert_eq!(got[0].0.iter().map(|&v| v as i64).collect::<Vec<_>>(), want);
        assert!(proc.post_process_semantic_segmentation(&logits, shape, Some(&sizes[..1])).is_err());
        assert!(proc.post_process_semantic_segmentation(&logits[1..], shape, None).is_err());

        let (s, src) = npy_f32(t["interp_src"].as_str().unwrap());
        let mut worst = 0f32;
        for case in t["interp"].as_array().unwrap() {
            let (oh, ow) = (case["size"][0].as_u64().unwrap() as usize, case["size"][1].as_u64().unwrap() as usize);
            let ac = case["align_corners"].as_bool().unwrap();
            let got = interpolate_bilinear(&src, s[0], s[1], s[2], oh, ow, ac).unwrap();
            let (_, want) = npy_f32(case["expected"].as_str().unwrap());
            assert_eq!(got.len(), want.len());
            let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-5, "{case}: max diff {d}");
            worst = worst.max(d);
        }
        println!("interpolate_bilinear: max |ours - torch| = {worst:e}");
    }
}
