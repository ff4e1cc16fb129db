//! Preprocessing, as `BeitImageProcessor.preprocess`: resize (Pillow, uint8) -> center crop (uint8, zero
//! padding) -> rescale (float64 multiply, float32 cast) -> normalize (float32) to NCHW pixel values; and
//! segmentation maps to int64 labels (label reduction, resize, crop).

use std::borrow::Cow;

use image::{DynamicImage, GrayImage, RgbImage};

use super::load::{to_rgb_like_pil, PIL_MAX_IMAGE_PIXELS};
use super::{input_err, resample, BeitImageProcessor, Result};

/// Pixel values of a batch, NCHW float32 (`pixel_values` with `return_tensors="pt"`).
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    /// Row-major values.
    pub data: Vec<f32>,
    /// `[batch, 3, height, width]`.
    pub shape: [usize; 4],
}

impl PixelValues {
    /// The batch as a CPU tensor `[batch, 3, height, width]`: the models' `pixel_values` input.
    pub fn to_tensor(&self) -> crate::Result<candle_core::Tensor> {
        Ok(candle_core::Tensor::from_slice(&self.data, self.shape.as_slice(), &candle_core::Device::Cpu)?)
    }
}

/// Segmentation labels of a batch, `[batch, height, width]` int64 (transformers' `labels`).
#[derive(Clone, Debug, PartialEq)]
pub struct Labels {
    /// Row-major class ids (255: ignored).
    pub data: Vec<i64>,
    /// `[batch, height, width]`.
    pub shape: [usize; 3],
}

impl BeitImageProcessor {
    /// Preprocesses a batch of decoded images (converted to RGB like PIL's `convert("RGB")`). Decoded
    /// images carry no EXIF orientation: load files and bytes with `load_image`/`load_image_bytes`.
    pub fn preprocess(&self, images: &[DynamicImage]) -> Result<PixelValues> {
        let rgb: Vec<RgbImage> = images.iter().map(to_rgb_like_pil).collect();
        self.preprocess_rgb(&rgb)
    }

    /// Preprocesses a batch of RGB images into one NCHW tensor; all results must share a shape
    /// (always true when resizing or cropping).
    pub fn preprocess_rgb(&self, images: &[RgbImage]) -> Result<PixelValues> {
        let mut data = Vec::new();
        let mut shape: Option<[usize; 3]> = None;
        for (i, image) in images.iter().enumerate() {
            let (values, s) = self.preprocess_image(image).map_err(|e| e.for_item(&format!("image {i}")))?;
            match shape {
                Some(first) if first != s => {
                    return Err(input_err(
                        format!("image {i}"),
                        format!("shape {first:?} like image 0"),
                        format!("{s:?}"),
                    ))
                }
                _ => shape = Some(s),
            }
            data.extend(values);
        }
        let [c, h, w] = shape.unwrap_or([3, 0, 0]);
        Ok(PixelValues { data, shape: [images.len(), c, h, w] })
    }

    /// Preprocesses one RGB image: CHW float32 values and `[3, height, width]`.
    pub fn preprocess_image(&self, image: &RgbImage) -> Result<(Vec<f32>, [usize; 3])> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (pixels, h, w) = self.resize_and_crop(Cow::Borrowed(image.as_raw()), h, w, 3)?;
        let scale = if self.do_rescale {
            Some(
                self.rescale_factor
                    .ok_or_else(|| input_err("`rescale_factor`", "a number when `do_rescale` is true", "null"))?,
            )
        } else {
            None
        };
        // normalize: `np.array(mean, dtype=float32)`, one value per channel or one for all.
        let per_channel = |v: &[f64], field: &str| -> Result<[f32; 3]> {
            match v {
                [x] => Ok([*x as f32; 3]),
                [a, b, c] => Ok([*a as f32, *b as f32, *c as f32]),
                _ => Err(input_err(
                    format!("`{field}`"),
                    "1 or 3 values (one per RGB channel)",
                    format!("{} values", v.len()),
                )),
            }
        };
        let norm = if self.do_normalize {
            Some((per_channel(&self.image_mean, "image_mean")?, per_channel(&self.image_std, "image_std")?))
        } else {
            None
        };
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in pixels.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                // rescale: `image.astype(float64) * scale` then `.astype(float32)`.
                let mut x = match scale {
                    Some(s) => (v as f64 * s) as f32,
                    None => v as f32,
                };
                // normalize: `(image - mean) / std` in float32.
                if let Some((mean, std)) = &norm {
                    x = (x - mean[c]) / std[c];
                }
                out[c * h * w + i] = x;
            }
        }
        Ok((out, [3, h, w]))
    }

    /// Resize (Pillow, uint8) then center crop, as `_preprocess` does before rescaling.
    /// `pixels` is HWC with `ch` channels (borrowed: a resize reads it and copies nothing); returns the new
    /// buffer, height and width.
    fn resize_and_crop<'a>(
        &self,
        pixels: Cow<'a, [u8]>,
        h: usize,
        w: usize,
        ch: usize,
    ) -> Result<(Cow<'a, [u8]>, usize, usize)> {
        let (mut pixels, mut h, mut w) = (pixels, h, w);
        if self.do_resize {
            let (oh, ow) = self.size.height_width("size")?;
            let filter =
                self.resample.ok_or_else(|| input_err("`resample`", "a filter when `do_resize` is true", "null"))?;
            if h == 0 || w == 0 {
                return Err(input_err("resize", "a non-empty image", format!("{w}x{h}")));
            }
            check_area("size", oh, ow)?;
            pixels = Cow::Owned(
                resample::resize(&pixels, w, h, ch, ow, oh, filter)
                    .map_err(|e| input_err("resize", "a consistent image buffer", e.to_string()))?,
            );
            (h, w) = (oh, ow);
        }
        if self.do_center_crop {
            let (ch_h, ch_w) = self.crop_size.height_width("crop_size")?;
            check_area("crop_size", ch_h, ch_w)?;
            pixels = Cow::Owned(center_crop(&pixels, h, w, ch, ch_h, ch_w));
            (h, w) = (ch_h, ch_w);
        }
        Ok((pixels, h, w))
    }

    /// transformers' `reduce_label` on uint8: 0 -> 255, k -> k - 1, and 255 stays 255.
    pub fn reduce_labels(labels: &mut [u8]) {
        for l in labels {
            *l = match *l {
                0 | 255 => 255,
                k => k - 1,
            };
        }
    }

    /// Preprocesses segmentation maps (`labels` of `preprocess(images, segmentation_maps)`):
    /// optional label reduction, then resize with the *configured* `resample` (transformers 4.57.6
    /// passes the image filter, not NEAREST) and center crop, as int64.
    pub fn preprocess_segmentation_maps(&self, maps: &[GrayImage]) -> Result<Labels> {
        let mut data = Vec::new();
        let mut shape: Option<[usize; 2]> = None;
        for (i, map) in maps.iter().enumerate() {
            let mut px = map.as_raw().clone();
            if self.do_reduce_labels {
                Self::reduce_labels(&mut px);
            }
            let (px, h, w) = self
                .resize_and_crop(Cow::Owned(px), map.height() as usize, map.width() as usize, 1)
                .map_err(|e| e.for_item(&format!("segmentation map {i}")))?;
            match shape {
                Some(first) if first != [h, w] => {
                    return Err(input_err(
                        format!("segmentation map {i}"),
                        format!("shape {first:?} like map 0"),
                        format!("{:?}", [h, w]),
                    ))
                }
                _ => shape = Some([h, w]),
            }
            data.extend(px.iter().map(|&v| v as i64));
        }
        let [h, w] = shape.unwrap_or([0, 0]);
        Ok(Labels { data, shape: [maps.len(), h, w] })
    }
}

/// Resize/crop targets come from untrusted configs: refuse ones above Pillow's pixel limit rather
/// than trying to allocate them.
fn check_area(field: &str, h: usize, w: usize) -> Result<()> {
    match h.checked_mul(w) {
        Some(n) if n > 0 && n as u64 <= PIL_MAX_IMAGE_PIXELS => Ok(()),
        _ => Err(input_err(format!("`{field}`"), format!("1 to {PIL_MAX_IMAGE_PIXELS} pixels"), format!("{h}x{w}"))),
    }
}

/// transformers' `center_crop` on an HWC buffer: `top = (h - crop_h) // 2` (floor), and when the
/// crop is larger than the image, zero padding of `ceil((new - old) / 2)` before cropping.
fn center_crop(src: &[u8], h: usize, w: usize, ch: usize, crop_h: usize, crop_w: usize) -> Vec<u8> {
    let offsets = |size: usize, crop: usize| -> (i64, i64) {
        let start = (size as i64 - crop as i64).div_euclid(2);
        let pad = (crop.max(size) - size).div_ceil(2) as i64;
        (start + pad, pad) // start in padded coordinates, and where the image begins there
    };
    let ((top, top_pad), (left, left_pad)) = (offsets(h, crop_h), offsets(w, crop_w));
    let mut out = vec![0u8; crop_h * crop_w * ch];
    for y in 0..crop_h {
        let sy = top + y as i64 - top_pad;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..crop_w {
            let sx = left + x as i64 - left_pad;
            if sx < 0 || sx >= w as i64 {
                continue;
            }
            let s = (sy as usize * w + sx as usize) * ch;
            out[(y * crop_w + x) * ch..][..ch].copy_from_slice(&src[s..s + ch]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::load::{load_image, load_segmentation_map};
    use super::super::test_fixtures::{manifest, npy_f32, npy_i64, strs, FIXTURES};
    use super::*;

    /// transformers' pixel_values for every fixture case: identical for PNG inputs, within one
    /// uint8 level (>= 99% of values) for JPEG inputs, whose decoders differ slightly.
    #[test]
    fn pixel_values_match_transformers() {
        for case in manifest()["processor_cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let proc =
                BeitImageProcessor::from_json_file(format!("{FIXTURES}{}", case["config"].as_str().unwrap())).unwrap();
            let images: Vec<RgbImage> =
                strs(&case["images"]).iter().map(|p| load_image(format!("{FIXTURES}{p}")).unwrap()).collect();
            let ours = proc.preprocess_rgb(&images).unwrap();
            let (shape, theirs) = if let Some(npy) = case["pixel_values"].as_str() {
                npy_f32(npy)
            } else {
                // uint8 levels before rescale/normalize; the generator checked that this formula
                // (transformers': float64 multiply, float32 cast, float32 normalize) reproduces its output.
                let lv = image::open(format!("{FIXTURES}{}", case["levels"].as_str().unwrap())).unwrap().to_rgb8();
                let (w, h) = (lv.width() as usize, lv.height() as usize);
                let mut v = vec![0f32; 3 * h * w];
                for (i, p) in lv.pixels().enumerate() {
                    for c in 0..3 {
                        let x = (p.0[c] as f64 * proc.rescale_factor.unwrap()) as f32;
                        v[c * h * w + i] = (x - proc.image_mean[c] as f32) / proc.image_std[c] as f32;
                    }
                }
                (vec![1, 3, h, w], v)
            };
            assert_eq!(ours.shape.to_vec(), shape, "{name}");
            // |ours - theirs| in uint8 levels: one level is rescale_factor / std.
            let scale = case["rescale_factor"].as_f64().unwrap_or(1.0);
            let std: Vec<f64> =
                case["std"].as_array().map_or(vec![1.0; 3], |a| a.iter().map(|v| v.as_f64().unwrap()).collect());
            let plane = shape[2] * shape[3];
            let (mut same, mut within1, mut max_lv) = (0usize, 0usize, 0f64);
            for (i, (a, b)) in ours.data.iter().zip(&theirs).enumerate() {
                let lv = ((a - b).abs() as f64) * std[(i / plane) % 3] / scale;
                same += (a.to_bits() == b.to_bits()) as usize;
                within1 += (lv <= 1.0 + 1e-3) as usize;
                max_lv = max_lv.max(lv);
            }
            let n = theirs.len() as f64;
            println!(
                "{name}: {:.4}% identical, {:.4}% within 1 level, max {max_lv:.3} levels ({} values)",
                100.0 * same as f64 / n,
                100.0 * within1 as f64 / n,
                theirs.len()
            );
            // Targets: PNG identical; JPEG >= 99% within one level. The JPEG decoder is bit-exact
            // with PIL's libjpeg-turbo, so JPEG inputs are held to identity too.
            if case["jpeg"].as_bool().unwrap() {
                assert!(within1 as f64 >= 0.99 * n, "{name}: only {within1} of {n} within one level");
            }
            assert_eq!(same, theirs.len(), "{name}: max {max_lv} levels");
        }
    }

    #[test]
    fn labels_match_transformers() {
        for case in manifest()["label_cases"].as_array().unwrap() {
            let proc =
                BeitImageProcessor::from_json_file(format!("{FIXTURES}{}", case["config"].as_str().unwrap())).unwrap();
            let map = load_segmentation_map(format!("{FIXTURES}{}", case["map"].as_str().unwrap())).unwrap();
            let ours = proc.preprocess_segmentation_maps(&[map]).unwrap();
            let (shape, theirs) = npy_i64(case["labels"].as_str().unwrap());
            assert_eq!(ours.shape.to_vec(), shape, "{case}");
            let same = ours.data.iter().zip(&theirs).filter(|(a, b)| a == b).count();
            println!("labels {}: {same} of {} identical", case["config"], theirs.len());
            assert_eq!(ours.data, theirs, "{case}");
        }
    }

    #[test]
    fn center_crop_pads_like_transformers() {
        // 1x3 image, crop 2x4: top = (1-2)//2 = -1, pad ceil(1/2) = 1 -> rows [pad, image]
        let src = [1u8, 2, 3];
        assert_eq!(center_crop(&src, 1, 3, 1, 2, 4), vec![0, 0, 0, 0, 0, 1, 2, 3]);
        assert_eq!(center_crop(&[1, 2, 3, 4, 5], 1, 5, 1, 1, 2), vec![2, 3]);
        let mut l = [0u8, 1, 2, 254, 255];
        BeitImageProcessor::reduce_labels(&mut l);
        assert_eq!(l, [255, 0, 1, 253, 255]);
    }
}
