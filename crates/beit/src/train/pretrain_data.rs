//! BEiT pre-training inputs (unilm's `DataAugmentationForBEiT`): one RandomResizedCrop and one horizontal flip
//! give two views of the same region, the patches the transformer sees (224, bicubic, normalized) and the pixels
//! the DALL-E tokenizer sees (112, Lanczos, in [0, 1]; `tokenizer::map_pixels` is applied by the encoder), plus a
//! blockwise mask from [`MaskingGenerator`]. unilm's colour jitter is not applied here.

use image::RgbImage;

use crate::error::{BeitError, Result};
use crate::masking::MaskingGenerator;
use crate::processor::resample::{resize, Filter};
use crate::processor::BeitImageProcessor;
use crate::rng::Rng;
use crate::train::data::{normalize, random_resized_crop};

/// unilm's defaults: `--input_size 224 --second_input_size 112 --second_interpolation lanczos`, crop scale
/// (0.08, 1) and ratio (3/4, 4/3) as torchvision's RandomResizedCrop.
#[derive(Debug, Clone)]
pub struct TwoViewOptions {
    /// Side of the first view (the model's input).
    pub size: usize,
    /// Side of the second view (the tokenizer's input).
    pub second_size: usize,
    /// Resampling of the first view.
    pub interpolation: Filter,
    /// Resampling of the second view.
    pub second_interpolation: Filter,
    /// Crop area range, as a fraction of the image.
    pub scale: (f64, f64),
    /// Crop aspect-ratio range.
    pub ratio: (f64, f64),
    /// Flip horizontally with probability 0.5.
    pub hflip: bool,
}

impl Default for TwoViewOptions {
    fn default() -> Self {
        TwoViewOptions {
            size: 224,
            second_size: 112,
            interpolation: Filter::Bicubic,
            second_interpolation: Filter::Lanczos,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
        }
    }
}

/// Both views as uint8 HWC, from one crop and one flip decision: (size x size, second_size x second_size).
pub fn two_views_hwc(img: &RgbImage, o: &TwoViewOptions, rng: &mut Rng) -> Result<(Vec<u8>, Vec<u8>)> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 || o.size == 0 || o.second_size == 0 {
        return Err(BeitError::invalid_input("pre-training views", format!("image {w}x{h} or view size 0")));
    }
    let (top, left, ch, cw) = random_resized_crop(rng, h, w, o.scale, o.ratio);
    let mut crop = Vec::with_capacity(ch * cw * 3);
    for y in top..top + ch {
        crop.extend_from_slice(&img.as_raw()[(y * w + left) * 3..(y * w + left + cw) * 3]);
    }
    let err = |e: crate::processor::resample::ResampleError| BeitError::invalid_input("pre-training views", e.to_string());
    // RandomResizedCropAndInterpolationWithTwoPic resizes the same crop twice.
    let mut first = resize(&crop, cw, ch, 3, o.size, o.size, o.interpolation).map_err(err)?;
    let mut second = resize(&crop, cw, ch, 3, o.second_size, o.second_size, o.second_interpolation).map_err(err)?;
    // unilm flips the image before cropping; flipping both views after the crop is the same distribution and
    // keeps them aligned.
    if o.hflip && rng.uniform() < 0.5 {
        flip(&mut first, o.size);
        flip(&mut second, o.second_size);
    }
    Ok((first, second))
}

fn flip(hwc: &mut [u8], size: usize) {
    for row in hwc.chunks_exact_mut(size * 3) {
        for x in 0..size / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (size - 1 - x) * 3 + c);
            }
        }
    }
}

/// One pre-training sample.
#[derive(Debug, Clone)]
pub struct PretrainSample {
    /// CHW float32, normalized with the processor's mean and std: the transformer's input.
    pub patches: Vec<f32>,
    /// CHW float32 in [0, 1]: the DALL-E encoder's input (it applies map_pixels itself).
    pub tokenizer_pixels: Vec<f32>,
    /// Row-major patch mask from the MaskingGenerator, true = masked.
    pub mask: Vec<bool>,
}

/// One pre-training sample of `img`: the two views of one random crop and a blockwise mask.
pub fn pretrain_sample(
    img: &RgbImage,
    o: &TwoViewOptions,
    processor: &BeitImageProcessor,
    masking: &MaskingGenerator,
    rng: &mut Rng,
) -> Result<PretrainSample> {
    let (first, second) = two_views_hwc(img, o, rng)?;
    let patches = normalize(&first, o.size, o.size, processor);
    let s = o.second_size;
    let mut tokenizer_pixels = vec![0f32; 3 * s * s];
    for i in 0..s * s {
        for c in 0..3 {
            tokenizer_pixels[c * s * s + i] = second[i * 3 + c] as f32 / 255.0;
        }
    }
    Ok(PretrainSample { patches, tokenizer_pixels, mask: masking.generate(rng) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth, asymmetric test image: any misaligned crop, scale or flip changes the pixels a lot.
    fn image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f64 / w as f64, y as f64 / h as f64);
            image::Rgb([
                (255.0 * fx) as u8,
                (255.0 * fy) as u8,
                (127.5 + 127.5 * (6.0 * fx + 3.0 * fy * fy).sin()) as u8,
            ])
        })
    }

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn both_views_show_the_same_region() {
        let img = image(320, 240);
        let o = TwoViewOptions::default();
        let mut flipped_seen = 0;
        let (mut worst, mut best_other) = (0f64, f64::MAX);
        for seed in 0..20 {
            let (first, second) = two_views_hwc(&img, &o, &mut Rng::new(seed)).unwrap();
            assert_eq!((first.len(), second.len()), (224 * 224 * 3, 112 * 112 * 3));
            // The 224 view brought down to 112 must match the 112 view up to resampling differences...
            let down = resize(&first, 224, 224, 3, 112, 112, Filter::Lanczos).unwrap();
            let same = mean_abs_diff(&down, &second);
            assert!(same < 3.0, "seed {seed}: views differ by {same}");
            // ...and far better than the same view flipped (which a mismatched flip would give).
            let mut mirrored = second.clone();
            flip(&mut mirrored, 112);
            let other = mean_abs_diff(&down, &mirrored);
            assert!(other > 4.0 * same.max(0.5), "seed {seed}: flipped {other} vs aligned {same}");
            worst = worst.max(same);
            best_other = best_other.min(other);
            // Seeds with and without the flip both occur.
            let unflipped = TwoViewOptions { hflip: false, ..o.clone() };
            let (again, _) = two_views_hwc(&img, &unflipped, &mut Rng::new(seed)).unwrap();
            flipped_seen += usize::from(again != first);
        }
        assert!(flipped_seen > 0 && flipped_seen < 20, "{flipped_seen}");
        eprintln!("aligned views differ by at most {worst:.3} (mean |u8 diff|), mirrored by at least {best_other:.3}");
    }

    #[test]
    fn sample_shapes_and_ranges() {
        let img = image(64, 48);
        let p = BeitImageProcessor::default();
        let masking = MaskingGenerator::beit_default();
        let s = pretrain_sample(&img, &TwoViewOptions::default(), &p, &masking, &mut Rng::new(3)).unwrap();
        assert_eq!(s.patches.len(), 3 * 224 * 224);
        assert_eq!(s.tokenizer_pixels.len(), 3 * 112 * 112);
        assert!(s.tokenizer_pixels.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(s.mask.len(), 196);
    }
}
