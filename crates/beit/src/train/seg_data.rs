//! Semantic-segmentation datasets: images with masks of class ids, from an image folder in ADE20K's layout
//! (`DIR/images/{training,validation}/X.jpg` with `DIR/annotations/{training,validation}/X.png`, or `train`/`val`)
//! or from a Hugging Face dataset stored as parquet ([`super::parquet`]). Masks are checked against their image and
//! the model's labels before training starts.

use std::path::{Path, PathBuf};

use image::{ImageBuffer, Luma, RgbImage};

use crate::error::{BeitError, Result};

/// A mask of class ids, one per pixel (16 bits, so that more than 256 classes fit; 8-bit PNGs widen losslessly).
pub type Mask = ImageBuffer<Luma<u16>, Vec<u16>>;

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

/// ADE20K's folder layout (see the module docs).
fn load_folder(dir: &Path) -> Result<SegDataset> {
    Err(BeitError::invalid_input(
        dir.display().to_string(),
        "the image-folder layout of segmentation data is not read yet",
    ))
}
