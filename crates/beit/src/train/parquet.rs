//! Hugging Face datasets stored as parquet, as the Hub stores them (`data/train-*.parquet`, `validation-*`):
//! image columns are structs of `bytes` and `path`; classification has a `label` column whose ClassLabel names
//! come from the dataset's metadata, segmentation an `image` and an `annotation` column.

use std::path::Path;

use super::seg_data::SegDataset;
use crate::error::{BeitError, Result};

/// Whether `dir` holds a parquet dataset (rather than an image folder).
pub fn is_parquet_dataset(dir: &Path) -> bool {
    let _ = dir;
    false
}

/// A segmentation dataset (`image` and `annotation` columns) from `dir`.
pub fn load_segmentation(dir: &Path) -> Result<SegDataset> {
    Err(BeitError::invalid_input(dir.display().to_string(), "parquet datasets are not read yet"))
}
