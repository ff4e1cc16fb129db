//! Semantic-segmentation datasets: images with masks of class ids, from an image folder in ADE20K's layout
//! (`DIR/images/{training,validation}/X.jpg` with `DIR/annotations/{training,validation}/X.png`, or `train`/`val`)
//! or from a Hugging Face dataset stored as parquet ([`super::parquet`]). Masks are checked against their image and
//! the model's labels before training starts.

use std::path::{Path, PathBuf};

use image::RgbImage;

use super::data::IMAGE_EXTENSIONS;
use crate::error::{BeitError, Result};
use crate::processor::decode_label_map;
use crate::processor::loader::{load_ordered, ImageSource, LoaderOptions};

/// A mask of class ids, one per pixel (16 bits, so that more than 256 classes fit; 8-bit PNGs widen losslessly).
pub type Mask = crate::processor::LabelMap;

/// Images with their masks.
#[derive(Debug, Clone, Default)]
pub struct SegSplit {
    /// Decoded images.
    pub images: Vec<RgbImage>,
    /// The mask of each image, at the image's size.
    pub masks: Vec<Mask>,
    /// What errors call each image (its file, or `file.parquet row N`).
    pub names: Vec<String>,
}

/// A segmentation dataset split into training and validation sets.
#[derive(Debug, Clone, Default)]
pub struct SegDataset {
    /// Class names when the data names them (`labels.txt`, an `id2label` JSON, the dataset's metadata); None: the
    /// model's config names them.
    pub classes: Option<Vec<String>>,
    /// Training pairs.
    pub train: SegSplit,
    /// Validation pairs (empty when the data has none).
    pub val: SegSplit,
    /// Files that could not be read, with the reason: skipped and reported.
    pub skipped: Vec<(PathBuf, String)>,
}

/// BeitImageProcessor's `do_reduce_labels`: 0 (background) becomes 255, every other id goes down by one, and 255
/// stays 255 (the arithmetic transformers does on uint8 masks).
pub fn reduce_labels(mask: &mut Mask) {
    for v in mask.iter_mut() {
        *v = match *v {
            0 | 255 => 255,
            x => x - 1,
        };
    }
}

impl SegDataset {
    /// Reads `dir` (a parquet dataset when [`super::parquet::is_parquet_dataset`] says so, otherwise ADE20K's
    /// folder layout), applying `reduce` ([`reduce_labels`]) to every mask.
    pub fn load(dir: &Path, reduce: bool) -> Result<Self> {
        let mut d = if super::parquet::is_parquet_dataset(dir) {
            super::parquet::load_segmentation(dir)?
        } else {
            load_folder(dir)?
        };
        if reduce {
            d.train.masks.iter_mut().chain(d.val.masks.iter_mut()).for_each(reduce_labels);
        }
        Ok(d)
    }

    /// Checks every pair before training starts: a mask at its image's size, and every id below `num_labels`
    /// or equal to `ignore_index`. The error names the image and what was found.
    pub fn check(&self, num_labels: usize, ignore_index: i64) -> Result<()> {
        for split in [&self.train, &self.val] {
            for ((img, mask), name) in split.images.iter().zip(&split.masks).zip(&split.names) {
                if img.dimensions() != mask.dimensions() {
                    return Err(BeitError::invalid_input(
                        name.clone(),
                        format!(
                            "mask is {}x{} but the image is {}x{}",
                            mask.width(),
                            mask.height(),
                            img.width(),
                            img.height()
                        ),
                    ));
                }
                if let Some(bad) = mask.iter().find(|&&v| v as usize >= num_labels && v as i64 != ignore_index) {
                    return Err(BeitError::invalid_input(
                        name.clone(),
                        format!("mask has class id {bad}; the model has {num_labels} labels (ids 0..{num_labels}, {ignore_index} ignored)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The (training, validation) split folder names, in the order they are looked for: ADE20K's, then the short ones.
const SPLIT_NAMES: [(&str, &str); 2] = [("training", "validation"), ("train", "val")];

/// The (images, annotations) folders of `split`: `DIR/images/SPLIT` + `DIR/annotations/SPLIT`, or
/// `DIR/SPLIT/images` + `DIR/SPLIT/annotations`.
fn split_dirs(dir: &Path, split: &str) -> Option<(PathBuf, PathBuf)> {
    let ade = (dir.join("images").join(split), dir.join("annotations").join(split));
    let nested = (dir.join(split).join("images"), dir.join(split).join("annotations"));
    [ade, nested].into_iter().find(|(i, _)| i.is_dir())
}

/// Every image of `images` with its mask (same stem, `.png`) from `annotations`; an image without one is an error
/// naming both.
fn pairs(images: &Path, annotations: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(images).map_err(|e| BeitError::io(images, e))? {
        let p = e.map_err(|e| BeitError::io(images, e))?.path();
        let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        if p.is_file() && IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            files.push(p);
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|img| {
            let stem = img.file_stem().unwrap_or_default();
            let mask = annotations.join(stem).with_extension("png");
            if mask.is_file() {
                Ok((img, mask))
            } else {
                Err(BeitError::invalid_input(
                    img.display().to_string(),
                    format!("image has no mask: expected {}", mask.display()),
                ))
            }
        })
        .collect()
}

/// A mask file of class ids, as `np.array(PIL.Image.open(path))` gives it ([`decode_label_map`]: 8- or 16-bit gray,
/// or a palette PNG's indices). A colour image is refused: its colours are not ids.
pub fn read_mask(path: &Path) -> Result<Mask> {
    let bytes = std::fs::read(path).map_err(|e| BeitError::io(path, e))?;
    Ok(decode_label_map(&bytes, &path.display().to_string())?)
}

/// Decodes `pairs`: images on the threaded loader (an unreadable image is skipped and reported), then their masks
/// on every core (an unreadable mask is an error naming it).
fn decode_pairs(pairs: Vec<(PathBuf, PathBuf)>, skipped: &mut Vec<(PathBuf, String)>) -> Result<SegSplit> {
    use rayon::prelude::*;
    let sources = pairs.iter().map(|(p, _)| ImageSource::Path(p.clone())).collect();
    let mut kept = Vec::new();
    for ((img_path, mask_path), (_, result)) in
        pairs.into_iter().zip(load_ordered(sources, &LoaderOptions::default(), Ok))
    {
        match result {
            Ok(img) => kept.push((img, img_path, mask_path)),
            Err(e) => skipped.push((img_path, e.to_string())),
        }
    }
    let masks: Vec<Mask> = kept.par_iter().map(|(_, _, m)| read_mask(m)).collect::<Result<_>>()?;
    let mut s = SegSplit::default();
    for ((img, path, _), mask) in kept.into_iter().zip(masks) {
        s.images.push(img);
        s.masks.push(mask);
        s.names.push(path.display().to_string());
    }
    Ok(s)
}

/// Class names from `DIR/labels.txt` (one per line) or `DIR/id2label.json` (`{"0": "wall", …}`, ids 0..n).
fn class_names(dir: &Path) -> Result<Option<Vec<String>>> {
    let txt = dir.join("labels.txt");
    if txt.is_file() {
        let text = std::fs::read_to_string(&txt).map_err(|e| BeitError::io(&txt, e))?;
        let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
        let end = names.iter().rposition(|n| !n.is_empty()).map_or(0, |i| i + 1);
        return Ok(Some(names[..end].to_vec()));
    }
    let json = dir.join("id2label.json");
    if json.is_file() {
        let text = std::fs::read_to_string(&json).map_err(|e| BeitError::io(&json, e))?;
        let bad = |m: String| BeitError::Json { path: json.clone(), message: m };
        let map: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut by_id = std::collections::BTreeMap::new();
        for (k, v) in map {
            let id: usize = k.parse().map_err(|_| bad(format!("key {k:?} is not a class id")))?;
            by_id.insert(id, v);
        }
        if by_id.keys().copied().ne(0..by_id.len()) {
            return Err(bad(format!("ids {:?} are not 0..{}", by_id.keys().collect::<Vec<_>>(), by_id.len())));
        }
        return Ok(Some(by_id.into_values().collect()));
    }
    Ok(None)
}

/// ADE20K's folder layout (see the module docs).
fn load_folder(dir: &Path) -> Result<SegDataset> {
    let Some((train_dirs, val_dirs)) =
        SPLIT_NAMES.iter().find_map(|(t, v)| split_dirs(dir, t).map(|td| (td, split_dirs(dir, v))))
    else {
        return Err(BeitError::invalid_input(
            dir.display().to_string(),
            "expected images/training + annotations/training (ADE20K's layout), images/train + annotations/train, \
             or train/images + train/annotations",
        ));
    };
    let mut skipped = Vec::new();
    let train = decode_pairs(pairs(&train_dirs.0, &train_dirs.1)?, &mut skipped)?;
    let val = match val_dirs {
        Some((i, a)) => decode_pairs(pairs(&i, &a)?, &mut skipped)?,
        None => SegSplit::default(),
    };
    if train.images.is_empty() {
        return Err(BeitError::invalid_input(train_dirs.0.display().to_string(), "no readable training images"));
    }
    Ok(SegDataset { classes: class_names(dir)?, train, val, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("beit-segdata-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write_pair(dir: &Path, split: &str, stem: &str, mask: &image::DynamicImage) {
        let (i, a) = (dir.join("images").join(split), dir.join("annotations").join(split));
        std::fs::create_dir_all(&i).unwrap();
        std::fs::create_dir_all(&a).unwrap();
        RgbImage::from_pixel(mask.width(), mask.height(), image::Rgb([10, 20, 30]))
            .save(i.join(format!("{stem}.jpg")))
            .unwrap();
        mask.save(a.join(format!("{stem}.png"))).unwrap();
    }

    fn gray8(w: u32, h: u32, v: u8) -> image::DynamicImage {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(w, h, Luma([v])))
    }

    #[test]
    fn reads_ade20k_layout_with_8_and_16_bit_masks_and_labels() {
        let d = temp("ok");
        write_pair(&d, "training", "a", &gray8(4, 3, 2));
        let m16 = image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(5, 2, Luma([300]));
        write_pair(&d, "training", "b", &image::DynamicImage::ImageLuma16(m16));
        write_pair(&d, "validation", "c", &gray8(2, 2, 1));
        std::fs::write(d.join("labels.txt"), "wall\nfloor\n\n").unwrap();
        let s = SegDataset::load(&d, false).unwrap();
        assert_eq!(s.classes, Some(vec!["wall".to_string(), "floor".to_string()]));
        assert_eq!((s.train.images.len(), s.val.images.len()), (2, 1));
        assert_eq!(s.train.masks[0].get_pixel(0, 0)[0], 2);
        assert_eq!(s.train.masks[1].get_pixel(4, 1)[0], 300);
        assert!(s.train.names[0].ends_with("a.jpg"));
        // reduce_labels: 1 -> 0.
        assert_eq!(SegDataset::load(&d, true).unwrap().val.masks[0].get_pixel(0, 0)[0], 0);
        // id2label.json when there is no labels.txt.
        std::fs::remove_file(d.join("labels.txt")).unwrap();
        std::fs::write(d.join("id2label.json"), r#"{"1": "b", "0": "a"}"#).unwrap();
        assert_eq!(SegDataset::load(&d, false).unwrap().classes, Some(vec!["a".to_string(), "b".to_string()]));
        std::fs::remove_file(d.join("id2label.json")).unwrap();
        assert_eq!(SegDataset::load(&d, false).unwrap().classes, None);
    }

    /// A palette PNG's mask is its indices, as `np.array` of Pillow's "P" image (Pascal VOC's masks), not its colours.
    #[test]
    fn palette_masks_give_their_indices() {
        let d = temp("palette");
        write_pair(&d, "training", "a", &gray8(3, 2, 0));
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 3, 2);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette((0..=255u8).flat_map(|c| [c.wrapping_mul(40), c.wrapping_mul(90), 7]).collect::<Vec<u8>>());
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0, 1, 2, 255, 4, 5]).unwrap();
        }
        std::fs::write(d.join("annotations/training/a.png"), bytes).unwrap();
        let s = SegDataset::load(&d, false).unwrap();
        assert_eq!(s.train.masks[0].as_raw(), &vec![0u16, 1, 2, 255, 4, 5]);
    }

    #[test]
    fn short_split_names_are_read_too() {
        let d = temp("short");
        write_pair(&d, "train", "a", &gray8(2, 2, 0));
        let s = SegDataset::load(&d, false).unwrap();
        assert_eq!((s.train.images.len(), s.val.images.len()), (1, 0));
    }

    #[test]
    fn a_missing_or_colour_mask_is_an_error_naming_the_file() {
        let d = temp("bad");
        write_pair(&d, "training", "a", &gray8(2, 2, 0));
        std::fs::remove_file(d.join("annotations/training/a.png")).unwrap();
        let e = SegDataset::load(&d, false).unwrap_err().to_string();
        assert!(e.contains("a.jpg") && e.contains("no mask"), "{e}");
        let rgb = image::DynamicImage::ImageRgb8(RgbImage::new(2, 2));
        write_pair(&d, "training", "a", &rgb);
        let e = SegDataset::load(&d, false).unwrap_err().to_string();
        assert!(e.contains("a.png") && e.contains("one channel of class ids"), "{e}");
        let e = SegDataset::load(&temp("none"), false).unwrap_err().to_string();
        assert!(e.contains("annotations"), "{e}");
    }
}
