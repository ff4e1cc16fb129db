//! Image-folder datasets (DIR/train/<class>/*, DIR/val/<class>/*, or DIR/<class>/* with a validation split)
//! and the training augmentation: RandomResizedCrop and horizontal flip, resampled as Pillow does.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{BeitError, Result};
use crate::processor::resample::{resize, Filter};
use crate::processor::loader::{load_ordered, ImageSource, LoaderOptions};
use crate::processor::BeitImageProcessor;
use crate::rng::Rng;

/// The file extensions read as images when listing folders (lower case).
pub const IMAGE_EXTENSIONS: [&str; 9] = ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif", "ppm"];

/// Decoded images with their class index.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// Decoded images.
    pub images: Vec<RgbImage>,
    /// Class index of each image.
    pub labels: Vec<usize>,
    /// File of each image.
    pub paths: Vec<PathBuf>,
}

/// An image folder (one subfolder per class) split into training and validation sets.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// Class names, sorted (the subfolders).
    pub classes: Vec<String>,
    /// Training images.
    pub train: Split,
    /// Validation images.
    pub val: Split,
    /// Files that could not be read, with the reason: skipped and reported.
    pub skipped: Vec<(PathBuf, String)>,
}

fn class_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| BeitError::io(dir, e))? {
        let p = e.map_err(|e| BeitError::io(dir, e))?.path();
        if p.is_dir() {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            out.push((name, p));
        }
    }
    out.sort();
    Ok(out)
}

fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| BeitError::io(dir, e))? {
        let p = e.map_err(|e| BeitError::io(dir, e))?.path();
        let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        if p.is_file() && IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Lists (path, class) pairs of `dir`, checking that there are at least two classes and none is empty.
fn list(dir: &Path, classes: Option<&[String]>) -> Result<(Vec<String>, Vec<(PathBuf, usize)>)> {
    let dirs = class_dirs(dir)?;
    let names: Vec<String> = dirs.iter().map(|(n, _)| n.clone()).collect();
    if let Some(expected) = classes {
        if names != expected {
            return Err(BeitError::invalid_input(
                dir.display().to_string(),
                format!("classes {names:?} differ from the training classes {expected:?}"),
            ));
        }
    }
    if names.len() < 2 {
        return Err(BeitError::invalid_input(
            dir.display().to_string(),
            format!("found {} class folder(s) {names:?}; classification needs at least 2", names.len()),
        ));
    }
    let mut items = Vec::new();
    for (i, (name, p)) in dirs.iter().enumerate() {
        let files = image_files(p)?;
        if files.is_empty() {
            return Err(BeitError::invalid_input(p.display().to_string(), format!("class {name:?} has no images")));
        }
        items.extend(files.into_iter().map(|f| (f, i)));
    }
    Ok((names, items))
}

/// Decodes on every core (the threaded loader keeps the order), skipping what cannot be read.
fn decode(items: Vec<(PathBuf, usize)>, skipped: &mut Vec<(PathBuf, String)>) -> Split {
    let mut s = Split::default();
    let sources = items.iter().map(|(p, _)| ImageSource::Path(p.clone())).collect();
    let loaded = load_ordered(sources, &LoaderOptions::default(), Ok);
    for ((p, label), (_, result)) in items.into_iter().zip(loaded) {
        match result {
            Ok(img) => {
                s.images.push(img);
                s.labels.push(label);
                s.paths.push(p);
            }
            Err(e) => skipped.push((p, e.to_string())),
        }
    }
    s
}

impl ImageFolder {
    /// `dir/train` and `dir/val` when present; otherwise `dir/<class>` split by `val_split` (seeded, per class).
    /// A Hugging Face dataset stored as parquet ([`super::parquet`]) is read as such, split by `val_split` when it
    /// has no validation (or test) split.
    pub fn load(dir: &Path, val_split: Option<f64>, seed: u64) -> Result<Self> {
        if super::parquet::is_parquet_dataset(dir) {
            let mut d = super::parquet::load_classification(dir)?;
            if d.val.images.is_empty() {
                let frac = check_fraction(val_split)?;
                let items: Vec<(usize, usize)> = d.train.labels.iter().copied().enumerate().collect();
                let (train, val) = split_per_class(items, d.classes.len(), frac, seed);
                let mut all: Vec<Option<(RgbImage, PathBuf)>> =
                    d.train.images.drain(..).zip(d.train.paths.drain(..)).map(Some).collect();
                let mut take = |items: Labeled<usize>| {
                    let mut s = Split::default();
                    for (i, label) in items {
                        if let Some((img, p)) = all[i].take() {
                            s.images.push(img);
                            s.labels.push(label);
                            s.paths.push(p);
                        }
                    }
                    s
                };
                d.train = take(train);
                d.val = take(val);
            }
            return Ok(d);
        }
        let mut skipped = Vec::new();
        let (classes, train, val) = if dir.join("train").is_dir() {
            let (classes, train) = list(&dir.join("train"), None)?;
            let val = if dir.join("val").is_dir() { list(&dir.join("val"), Some(&classes))?.1 } else { Vec::new() };
            (classes, train, val)
        } else {
            let (classes, items) = list(dir, None)?;
            let frac = check_fraction(val_split)?;
            let (train, val) = split_per_class(items, classes.len(), frac, seed);
            (classes, train, val)
        };
        let train = decode(train, &mut skipped);
        let val = decode(val, &mut skipped);
        if train.images.is_empty() {
            return Err(BeitError::invalid_input(dir.display().to_string(), "no readable training images"));
        }
        Ok(ImageFolder { classes, train, val, skipped })
    }
}

fn check_fraction(val_split: Option<f64>) -> Result<f64> {
    let frac = val_split.unwrap_or(0.0);
    if !(0.0..1.0).contains(&frac) {
        return Err(BeitError::invalid_input("validation split", format!("{frac} is not in [0, 1)")));
    }
    Ok(frac)
}

/// Items with their class index.
type Labeled<T> = Vec<(T, usize)>;

/// `frac` of each class's items (rounded, seeded) go to validation: (train, val).
fn split_per_class<T: Clone>(items: Labeled<T>, classes: usize, frac: f64, seed: u64) -> (Labeled<T>, Labeled<T>) {
    let mut rng = Rng::derive(seed, 1, 0);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let mut of_class: Labeled<T> = items.iter().filter(|(_, l)| *l == c).cloned().collect();
        rng.shuffle(&mut of_class);
        let n_val = (of_class.len() as f64 * frac).round() as usize;
        val.extend(of_class.drain(..n_val));
        train.extend(of_class);
    }
    (train, val)
}

/// torchvision's RandomResizedCrop parameters: (top, left, height, width).
pub fn random_resized_crop(rng: &mut Rng, h: usize, w: usize, scale: (f64, f64), ratio: (f64, f64)) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * (scale.0 + (scale.1 - scale.0) * rng.uniform());
        let aspect = (lr0 + (lr1 - lr0) * rng.uniform()).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            return (rng.below(h - ch + 1), rng.below(w - cw + 1), ch, cw);
        }
    }
    // Fallback: the central crop with the closest allowed aspect ratio.
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, (w as f64 / ratio.0).round() as usize)
    } else if in_ratio > ratio.1 {
        ((h as f64 * ratio.1).round() as usize, h)
    } else {
        (w, h)
    };
    let (cw, ch) = (cw.clamp(1, w), ch.clamp(1, h));
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// One training view: random resized crop to `size`, bicubic, flipped half the time; then the processor's
/// rescale and normalization. CHW float32.
pub fn augment(img: &RgbImage, size: usize, scale_min: f64, hflip: bool, rng: &mut Rng, p: &BeitImageProcessor) -> Result<Vec<f32>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (top, left, ch, cw) = random_resized_crop(rng, h, w, (scale_min, 1.0), (3.0 / 4.0, 4.0 / 3.0));
    let mut crop = Vec::with_capacity(ch * cw * 3);
    for y in top..top + ch {
        let row = &img.as_raw()[(y * w + left) * 3..(y * w + left + cw) * 3];
        crop.extend_from_slice(row);
    }
    let mut out = resize(&crop, cw, ch, 3, size, size, Filter::Bicubic)
        .map_err(|e| BeitError::invalid_input("augmentation", e.to_string()))?;
    if hflip && rng.uniform() < 0.5 {
        for row in out.chunks_exact_mut(size * 3) {
            for x in 0..size / 2 {
                for c in 0..3 {
                    row.swap(x * 3 + c, (size - 1 - x) * 3 + c);
                }
            }
        }
    }
    Ok(normalize(&out, size, size, p))
}

/// uint8 HWC -> normalized float32 CHW with the processor's rescale factor, mean and std.
pub fn normalize(hwc: &[u8], h: usize, w: usize, p: &BeitImageProcessor) -> Vec<f32> {
    let scale = p.rescale_factor.unwrap_or(1.0 / 255.0);
    let mut out = vec![0f32; 3 * h * w];
    for c in 0..3 {
        let mean = p.image_mean.get(c).copied().unwrap_or(0.5);
        let std = p.image_std.get(c).copied().unwrap_or(0.5);
        for i in 0..h * w {
            let v = (hwc[i * 3 + c] as f64 * scale) as f32;
            out[c * h * w + i] = if p.do_normalize { (v - mean as f32) / std as f32 } else { v };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_stay_inside_the_image() {
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let (t, l, h, w) = random_resized_crop(&mut rng, 8, 11, (0.08, 1.0), (0.75, 4.0 / 3.0));
            assert!(h >= 1 && w >= 1 && t + h <= 8 && l + w <= 11);
        }
    }
}
