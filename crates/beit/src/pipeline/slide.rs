//! Semantic segmentation of an image of any size by mmseg's sliding window (`slide_inference` of
//! mmseg's `EncoderDecoder`): the image, normalized at its own size (or first rescaled as mmseg's keep-ratio
//! `Resize`), is covered by overlapping crops; each crop's logits are resized to the crop bilinearly and summed,
//! divided by how many crops cover each pixel, resized back to the image's size and argmaxed.
//!
//! The windows run one grid row at a time and the sums live in a band of one crop's height: a row is final once
//! the windows below it start lower, and is then handed on (to the argmax, or to the bilinear resize back to the
//! image's size, which needs two rows at a time). Memory is bounded by the crop's height times the width, not
//! by the image's area; the sums are the same, in the same order, as over a full-size map.

use std::borrow::Cow;
use std::collections::VecDeque;

use candle_core::Tensor;
use image::RgbImage;

use super::Pipeline;
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::AnyBeitModel;
use crate::model::ForwardOptions;
use crate::processor::postprocess::{argmax_at, bilinear_taps};
use crate::processor::resample::{resize, Filter};
use crate::processor::SegmentationMap;

/// Largest `classes × crop height × width` band of sums a slide keeps (2 GiB of f32): an image that needs more
/// is refused before any work.
const MAX_BAND_VALUES: usize = 1 << 29;

/// Largest image a slide resizes to or returns (Pillow's decompression-bomb limit, twice).
const MAX_PIXELS: usize = 2 * 89_478_485;

/// Crops run through the model together.
const CROPS_PER_BATCH: usize = 4;

/// How mmseg's sliding window runs (`test_cfg=dict(mode='slide', crop_size=..., stride=...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlideOptions {
    /// Window (height, width); a crop larger than the image shrinks to it and runs with interpolated position
    /// encodings.
    pub crop: (usize, usize),
    /// Step between windows (height, width).
    pub stride: (usize, usize),
    /// mmseg's keep-ratio `Resize` before the windows: the longest and shortest edge the image may have, as
    /// ADE20K's `img_scale=(2048, 512)` (larger or smaller images are scaled to fit, as mmcv's `rescale_size`);
    /// the logits are resized back to the image's size (bilinear) before the argmax. None: the image's own size.
    pub scale: Option<(usize, usize)>,
}

impl SlideOptions {
    /// mmseg's BEiT settings for a model: windows of its image_size every two thirds of it (512 / 341), at the
    /// image's own size.
    pub fn for_config(c: &BeitConfig) -> Self {
        let crop = (c.image_size.height, c.image_size.width);
        SlideOptions { crop, stride: (crop.0 * 2 / 3, crop.1 * 2 / 3), scale: None }
    }

    fn check(&self) -> Result<()> {
        let (c, s) = (self.crop, self.stride);
        if c.0 == 0 || c.1 == 0 || s.0 == 0 || s.1 == 0 || self.scale.is_some_and(|(a, b)| a == 0 || b == 0) {
            return Err(BeitError::invalid_input(
                "sliding window",
                format!(
                    "a crop, stride and scale of at least 1 pixel, found crop {c:?}, stride {s:?} and scale {:?}",
                    self.scale
                ),
            ));
        }
        // mmseg asserts that every pixel is covered; a stride past the crop leaves gaps.
        if s.0 > c.0 || s.1 > c.1 {
            return Err(BeitError::invalid_input(
                "sliding window",
                format!("a stride of at most the crop, so that windows cover every pixel; found crop {c:?} and stride {s:?}"),
            ));
        }
        Ok(())
    }
}

/// mmcv's `rescale_size((w, h), scale)`: the (width, height) that fits `scale`'s longest and shortest edge
/// bounds, keeping the aspect ratio (`int(x * factor + 0.5)`).
pub fn rescaled_size(width: usize, height: usize, scale: (usize, usize)) -> (usize, usize) {
    let (long, short) = (scale.0.max(scale.1) as f64, scale.0.min(scale.1) as f64);
    let f = (long / width.max(height) as f64).min(short / width.min(height) as f64);
    (((width as f64 * f + 0.5) as usize).max(1), ((height as f64 * f + 0.5) as usize).max(1))
}

/// mmseg's window grid on one axis: the start of each window of `crop` (≤ `size`) every `stride`, the last
/// shifted back to end at the image's edge.
fn window_starts(size: usize, crop: usize, stride: usize) -> Vec<usize> {
    let grids = (size + stride).saturating_sub(crop + 1) / stride + 1;
    (0..grids).map(|i| (i * stride + crop).min(size).saturating_sub(crop)).collect()
}

/// Bilinear resize (align_corners=False, as ATen) of rows arriving top to bottom, each `classes × w` values
/// (class-major), into rows of `classes × out_w`: columns are blended as each row arrives, then each output row
/// from the two source rows it needs, the arithmetic of `interpolate_bilinear`.
struct RowResize {
    classes: usize,
    w: usize,
    out_w: usize,
    ys: Vec<(usize, usize, f32, f32)>,
    xs: Vec<(usize, usize, f32, f32)>,
    /// The last two column-blended source rows, with their index.
    rows: VecDeque<(usize, Vec<f32>)>,
    next: usize,
    out: Vec<f32>,
}

impl RowResize {
    fn new(classes: usize, (h, w): (usize, usize), (out_h, out_w): (usize, usize)) -> Self {
        RowResize {
            classes,
            w,
            out_w,
            ys: bilinear_taps(h, out_h, false),
            xs: bilinear_taps(w, out_w, false),
            rows: VecDeque::with_capacity(3),
            next: 0,
            out: vec![0f32; classes * out_w],
        }
    }

    /// Takes source row `y` (rows come in order) and hands on every output row it completes.
    fn push(&mut self, y: usize, row: &[f32], emit: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let mut blended = Vec::with_capacity(self.classes * self.out_w);
        for plane in row.chunks_exact(self.w) {
            blended.extend(self.xs.iter().map(|&(x0, x1, l0, l1)| plane[x0] * l0 + plane[x1] * l1));
        }
        if self.rows.len() == 2 {
            self.rows.pop_front();
        }
        self.rows.push_back((y, blended));
        // Output rows in order; the next one's lower source row is at most `y` once `y` arrived.
        while let Some(&(y0, y1, l0, l1)) = self.ys.get(self.next) {
            if y1 > y {
                break;
            }
            let row_of = |i: usize| self.rows.iter().find(|(r, _)| *r == i).map(|(_, v)| v);
            let (Some(t0), Some(t1)) = (row_of(y0), row_of(y1)) else {
                return Err(BeitError::internal("sliding window", format!("source rows {y0} and {y1} of a resize")));
            };
            for ((o, a), b) in self.out.iter_mut().zip(t0).zip(t1) {
                *o = a * l0 + b * l1;
            }
            emit(&self.out)?;
            self.next += 1;
        }
        Ok(())
    }
}

impl Pipeline {
    /// The mean logits `[classes, height, width]` of mmseg's sliding window over `image`, at the image's own size.
    /// Holds the whole map; [`segment_slide`](Self::segment_slide) does not.
    pub fn slide_logits(&self, image: &RgbImage, opts: &SlideOptions) -> Result<(Vec<f32>, [usize; 3])> {
        let (h, w) = (image.height() as usize, image.width() as usize);
        let mut rows: Vec<Vec<f32>> = Vec::with_capacity(h);
        let classes = self.slide_rows(image, opts, &mut |row| {
            rows.push(row.to_vec());
            Ok(())
        })?;
        let mut out = vec![0f32; classes * h * w];
        for (y, row) in rows.iter().enumerate() {
            for (k, plane) in row.chunks_exact(w).enumerate() {
                out[(k * h + y) * w..][..w].copy_from_slice(plane);
            }
        }
        Ok((out, [classes, h, w]))
    }

    /// Class ids per pixel of `image` at its own size, by the sliding window and an argmax (first maximum wins,
    /// as `torch.argmax`), each row as soon as it is final.
    pub fn segment_slide(&self, image: &RgbImage, opts: &SlideOptions) -> Result<SegmentationMap> {
        let (h, w) = (image.height() as usize, image.width() as usize);
        let mut ids = Vec::with_capacity(h * w);
        let classes = self.pretrained.config.num_labels();
        self.slide_rows(image, opts, &mut |row| {
            ids.extend((0..w).map(|p| argmax_at(row, classes, w, p)));
            Ok(())
        })?;
        Ok((ids, (h, w)))
    }

    /// Runs the windows and hands `emit` each final row of mean logits at the image's own size, top to bottom,
    /// as `classes × width` values (class-major). Returns the number of classes.
    fn slide_rows(
        &self,
        image: &RgbImage,
        opts: &SlideOptions,
        emit: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<usize> {
        let AnyBeitModel::SemanticSegmentation(m) = &self.pretrained.model else {
            return Err(self.wrong_class("semantic segmentation", "a semantic-segmentation"));
        };
        opts.check()?;
        let (h0, w0) = (image.height() as usize, image.width() as usize);
        if h0 == 0 || w0 == 0 {
            return Err(BeitError::invalid_input("sliding window", format!("a non-empty image, found {w0}x{h0}")));
        }
        // mmseg's Resize, with the processor's resampling filter (mmseg's cv2 bilinear where it has none).
        let scaled: Cow<RgbImage> = match opts.scale {
            Some(scale) if rescaled_size(w0, h0, scale) != (w0, h0) => {
                let (sw, sh) = rescaled_size(w0, h0, scale);
                if sw * sh > MAX_PIXELS {
                    return Err(BeitError::invalid_input(
                        "sliding window scale",
                        format!("at most {MAX_PIXELS} pixels after rescaling, found {sw}x{sh} for scale {scale:?}"),
                    ));
                }
                let filter = self.processor.resample.unwrap_or(Filter::Bilinear);
                let px = resize(image.as_raw(), w0, h0, 3, sw, sh, filter)
                    .map_err(|e| BeitError::invalid_input("sliding window scale", e.to_string()))?;
                let img = RgbImage::from_raw(sw as u32, sh as u32, px)
                    .ok_or_else(|| BeitError::internal("sliding window scale", format!("a {sw}x{sh} RGB buffer")))?;
                Cow::Owned(img)
            }
            _ => Cow::Borrowed(image),
        };
        let (h, w) = (scaled.height() as usize, scaled.width() as usize);
        let classes = self.pretrained.config.num_labels();
        let (ch, cw) = (opts.crop.0.min(h), opts.crop.1.min(w));
        if classes.checked_mul(ch).and_then(|v| v.checked_mul(w)).is_none_or(|v| v > MAX_BAND_VALUES) {
            return Err(BeitError::invalid_input(
                "sliding window",
                format!("at most {MAX_BAND_VALUES} logits in a band (classes x crop height x width), found {classes} x {ch} x {w}"),
            ));
        }
        // The processor's rescale and normalize, window by window (they are per pixel).
        let mut processor = self.processor.clone();
        processor.do_resize = false;
        processor.do_center_crop = false;
        let image_size = self.pretrained.config.image_size;
        let options = ForwardOptions {
            interpolate_pos_encoding: (ch, cw) != (image_size.height, image_size.width),
            ..ForwardOptions::default()
        };
        let mut back = (scaled.dimensions() != image.dimensions()).then(|| RowResize::new(classes, (h, w), (h0, w0)));
        let mut emitted = 0usize;
        let mut hand_on = |row: &[f32]| -> Result<()> {
            let y = emitted;
            emitted += 1;
            match back.as_mut() {
                Some(r) => r.push(y, row, emit),
                None => emit(row),
            }
        };
        // The band: rows top.. of `classes × w` sums and their window counts.
        let mut band: VecDeque<(Vec<f32>, Vec<u32>)> = VecDeque::with_capacity(ch);
        let mut top = 0usize;
        let mut finish_row = |(mut sum, count): (Vec<f32>, Vec<u32>)| -> Result<()> {
            for plane in sum.chunks_exact_mut(w) {
                for (v, n) in plane.iter_mut().zip(&count) {
                    *v /= *n as f32;
                }
            }
            hand_on(&sum)
        };
        let xs = window_starts(w, cw, opts.stride.1);
        for y0 in window_starts(h, ch, opts.stride.0) {
            // Rows above this grid row's windows are covered by no later window.
            while top < y0 {
                if let Some(row) = band.pop_front() {
                    finish_row(row)?;
                }
                top += 1;
            }
            while band.len() < ch {
                band.push_back((vec![0f32; classes * w], vec![0u32; w]));
            }
            for batch in xs.chunks(CROPS_PER_BATCH) {
                let mut input = Vec::with_capacity(batch.len() * 3 * ch * cw);
                for &x0 in batch {
                    let crop = image::imageops::crop_imm(scaled.as_ref(), x0 as u32, y0 as u32, cw as u32, ch as u32);
                    input.extend(processor.preprocess_image(&crop.to_image())?.0);
                }
                let input = Tensor::from_vec(input, (batch.len(), 3, ch, cw), &self.device)?;
                let logits = m.forward(&input, &options, None)?.logits;
                let (_, lc, lh, lw) = logits.dims4()?;
                let logits = logits.flatten_all()?.to_vec1::<f32>()?;
                for (i, &x0) in batch.iter().enumerate() {
                    // As mmseg: each crop's logits to the crop's size (bilinear, align_corners=False).
                    let up = crate::processor::interpolate_bilinear(
                        &logits[i * lc * lh * lw..][..lc * lh * lw],
                        lc,
                        lh,
                        lw,
                        ch,
                        cw,
                        false,
                    )?;
                    for (y, (sum, count)) in band.iter_mut().enumerate() {
                        for c in 0..classes.min(lc) {
                            let dst = &mut sum[c * w + x0..][..cw];
                            for (d, s) in dst.iter_mut().zip(&up[(c * ch + y) * cw..][..cw]) {
                                *d += s;
                            }
                        }
                        count[x0..][..cw].iter_mut().for_each(|n| *n += 1);
                    }
                }
            }
        }
        while let Some(row) = band.pop_front() {
            finish_row(row)?;
        }
        Ok(classes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_mmseg() {
        // h_grids = max(h - crop + stride - 1, 0) // stride + 1; y1 = min(i*stride + crop, h) - crop.
        assert_eq!(window_starts(512, 512, 341), vec![0]);
        assert_eq!(window_starts(640, 512, 341), vec![0, 128]);
        assert_eq!(window_starts(1024, 512, 341), vec![0, 341, 512]);
        assert_eq!(window_starts(40, 32, 16), vec![0, 8]);
        assert_eq!(window_starts(56, 32, 16), vec![0, 16, 24]);
        assert_eq!(window_starts(20, 20, 16), vec![0]);
    }

    #[test]
    fn rescale_follows_mmcv() {
        // mmcv.rescale_size((w, h), (2048, 512)): ADE20K's test scale.
        assert_eq!(rescaled_size(683, 512, (2048, 512)), (683, 512));
        assert_eq!(rescaled_size(1024, 768, (2048, 512)), (683, 512));
        assert_eq!(rescaled_size(256, 171, (2048, 512)), (767, 512));
        assert_eq!(rescaled_size(4000, 600, (2048, 512)), (2048, 307));
    }

    #[test]
    fn row_resize_matches_interpolate_bilinear() {
        let (c, h, w, oh, ow) = (3, 5, 7, 11, 4);
        let src: Vec<f32> = (0..c * h * w).map(|i| ((i * 37 % 101) as f32).sin()).collect();
        let want = crate::processor::interpolate_bilinear(&src, c, h, w, oh, ow, false).unwrap();
        let mut r = RowResize::new(c, (h, w), (oh, ow));
        let mut got: Vec<Vec<f32>> = Vec::new();
        for y in 0..h {
            let row: Vec<f32> = (0..c).flat_map(|k| src[(k * h + y) * w..][..w].to_vec()).collect();
            r.push(y, &row, &mut |o| {
                got.push(o.to_vec());
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(got.len(), oh);
        for (y, row) in got.iter().enumerate() {
            for k in 0..c {
                assert_eq!(&row[k * ow..][..ow], &want[(k * oh + y) * ow..][..ow], "row {y} class {k}");
            }
        }
    }
}
