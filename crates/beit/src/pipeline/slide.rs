//! Semantic segmentation of an image of any size by mmseg's sliding window (`slide_inference` of
//! mmseg's `EncoderDecoder`): the image, normalized at its own size, is covered by overlapping crops; each
//! crop's logits are resized to the crop bilinearly and summed into a full-size map, which is divided by
//! how many crops cover each pixel before the argmax.

use candle_core::Tensor;
use image::RgbImage;

use super::Pipeline;
use crate::error::{BeitError, Result};
use crate::heads::AnyBeitModel;
use crate::model::ForwardOptions;
use crate::processor::{interpolate_bilinear, SegmentationMap};

/// Largest `classes × height × width` logit map a slide keeps (2 GiB of f32): an image that needs more is
/// refused before any work.
const MAX_SLIDE_VALUES: usize = 1 << 29;

/// Crops run through the model together.
const CROPS_PER_BATCH: usize = 4;

/// mmseg's window grid on one axis: the start of each window of `crop` (≤ `size`) every `stride`, the last
/// shifted back to end at the image's edge.
fn window_starts(size: usize, crop: usize, stride: usize) -> Vec<usize> {
    let grids = (size + stride).saturating_sub(crop + 1) / stride + 1;
    (0..grids).map(|i| (i * stride + crop).min(size).saturating_sub(crop)).collect()
}

impl Pipeline {
    /// The mean logits `[classes, height, width]` of mmseg's sliding window over `image` at its own size:
    /// windows of `crop` = (height, width) every `stride` = (height, width) pixels (a crop larger than the
    /// image shrinks to it, and then runs with interpolated position encodings).
    pub fn slide_logits(
        &self,
        image: &RgbImage,
        crop: (usize, usize),
        stride: (usize, usize),
    ) -> Result<(Vec<f32>, [usize; 3])> {
        let AnyBeitModel::SemanticSegmentation(m) = &self.pretrained.model else {
            return Err(self.wrong_class("semantic segmentation", "a semantic-segmentation"));
        };
        if crop.0 == 0 || crop.1 == 0 || stride.0 == 0 || stride.1 == 0 {
            return Err(BeitError::invalid_input(
                "sliding window",
                format!("a crop and a stride of at least 1 pixel, found crop {crop:?} and stride {stride:?}"),
            ));
        }
        // The processor's rescale and normalize, at the image's own size.
        let mut processor = self.processor.clone();
        processor.do_resize = false;
        processor.do_center_crop = false;
        let (pixels, [_, h, w]) = processor.preprocess_image(image)?;
        let classes = self.pretrained.config.num_labels();
        if classes.checked_mul(h).and_then(|v| v.checked_mul(w)).is_none_or(|v| v > MAX_SLIDE_VALUES) {
            return Err(BeitError::invalid_input(
                "sliding window",
                format!("at most {MAX_SLIDE_VALUES} logits (classes x height x width), found {classes} x {h} x {w}"),
            ));
        }
        let (ch, cw) = (crop.0.min(h), crop.1.min(w));
        let image_size = self.pretrained.config.image_size;
        let options = ForwardOptions {
            interpolate_pos_encoding: (ch, cw) != (image_size.height, image_size.width),
            ..ForwardOptions::default()
        };
        let windows: Vec<(usize, usize)> = window_starts(h, ch, stride.0)
            .into_iter()
            .flat_map(|y| window_starts(w, cw, stride.1).into_iter().map(move |x| (y, x)))
            .collect();
        let mut sum = vec![0f32; classes * h * w];
        let mut count = vec![0u32; h * w];
        for batch in windows.chunks(CROPS_PER_BATCH) {
            let mut input = Vec::with_capacity(batch.len() * 3 * ch * cw);
            for &(y0, x0) in batch {
                for c in 0..3 {
                    for y in y0..y0 + ch {
                        input.extend_from_slice(&pixels[(c * h + y) * w + x0..][..cw]);
                    }
                }
            }
            let input = Tensor::from_vec(input, (batch.len(), 3, ch, cw), &self.device)?;
            let logits = m.forward(&input, &options, None)?.logits;
            let (_, lc, lh, lw) = logits.dims4()?;
            let logits = logits.flatten_all()?.to_vec1::<f32>()?;
            for (i, &(y0, x0)) in batch.iter().enumerate() {
                // As mmseg: each crop's logits to the crop's size (bilinear, align_corners=False).
                let up = interpolate_bilinear(&logits[i * lc * lh * lw..][..lc * lh * lw], lc, lh, lw, ch, cw, false)?;
                for c in 0..classes.min(lc) {
                    for y in 0..ch {
                        let dst = &mut sum[(c * h + y0 + y) * w + x0..][..cw];
                        for (d, s) in dst.iter_mut().zip(&up[(c * ch + y) * cw..][..cw]) {
                            *d += s;
                        }
                    }
                }
                for y in y0..y0 + ch {
                    count[y * w + x0..][..cw].iter_mut().for_each(|n| *n += 1);
                }
            }
        }
        for c in 0..classes {
            for (v, n) in sum[c * h * w..][..h * w].iter_mut().zip(&count) {
                *v /= *n as f32;
            }
        }
        Ok((sum, [classes, h, w]))
    }

    /// Class ids per pixel of `image` at its own size, by [`slide_logits`](Self::slide_logits) and an argmax
    /// (first maximum wins, as `torch.argmax`).
    pub fn segment_slide(
        &self,
        image: &RgbImage,
        crop: (usize, usize),
        stride: (usize, usize),
    ) -> Result<SegmentationMap> {
        let (logits, [classes, h, w]) = self.slide_logits(image, crop, stride)?;
        Ok(self.processor.post_process_semantic_segmentation(&logits, [1, classes, h, w], None)?.remove(0))
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
}
