//! `BeitImageProcessor`: output-identical port of Hugging Face transformers 4.57.6's slow (PIL-based)
//! `BeitImageProcessor`: resize (Pillow, uint8) -> center crop (uint8, zero padding) -> rescale
//! (float64 multiply, cast to float32) -> normalize (float32), NCHW output; segmentation-map labels;
//! and `post_process_semantic_segmentation` (torch bilinear interpolate + argmax).
//!
//! Split by concern: `config` (the processor's fields and `preprocessor_config.json`), `preprocess` (images
//! and segmentation maps to tensors), `postprocess` (logits to class maps), `load` (files and bytes to images
//! as PIL and transformers' `load_image` see them) with `exif` (the orientation tag), and the Pillow-exact
//! `jpeg` decoder and [`resample`] filters. Everything a caller needs is re-exported here.

mod config;
mod exif;
mod jpeg;
mod load;
pub mod loader;
pub(crate) mod postprocess;
mod preprocess;
pub mod resample;
mod simd;
#[cfg(test)]
mod test_fixtures;

pub use config::{BeitFeatureExtractor, BeitImageProcessor, SizeDict, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD};
pub use load::{
    decode_image, decode_image_bytes, decode_label_map, load_image, load_image_bytes, load_image_with_limit,
    load_segmentation_map, load_segmentation_map_bytes, to_rgb_like_pil, LabelMap, PIL_MAX_IMAGE_PIXELS,
};
pub use postprocess::{interpolate_bilinear, SegmentationMap, MAX_INTERPOLATE_VALUES};
pub use preprocess::{Labels, PixelValues};

/// Why the processor could not load, configure or process something; every variant names its source.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// Bytes that are not a decodable image (unknown format, corrupt or truncated data).
    #[error("{path}: cannot decode image: {message}")]
    Decode {
        /// The file, or the name given for bytes (e.g. "request body").
        path: String,
        /// What the decoder said.
        message: String,
    },
    /// An image whose header declares more pixels than allowed; refused before decoding.
    #[error(
        "{path}: image is {width}x{height} = {pixels} pixels, expected at most {limit} (decompression-bomb limit)"
    )]
    TooManyPixels {
        /// The file, or the name given for bytes.
        path: String,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// The limit that was exceeded.
        limit: u64,
    },
    /// A config file that is not valid JSON.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A config field of the wrong type or value.
    #[error("{file}: field `{field}`: expected {expected}, found {found}")]
    Config {
        /// The file.
        file: String,
        /// The field, as in `preprocessor_config.json`.
        field: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// An input (an image, a map, logits, a setting used at run time) that cannot be processed.
    #[error("{what}: expected {expected}, found {found}")]
    Input {
        /// Which input, e.g. "image 2: resize".
        what: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
}

/// The processor's result type.
pub type Result<T> = std::result::Result<T, ProcessorError>;

impl ProcessorError {
    /// What the caller can do about it (see [`crate::error::ErrorKind`]).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            ProcessorError::Io { .. } => ErrorKind::Io,
            ProcessorError::Decode { .. } | ProcessorError::Json { .. } | ProcessorError::Config { .. } => {
                ErrorKind::Format
            }
            ProcessorError::TooManyPixels { .. } | ProcessorError::Input { .. } => ErrorKind::InvalidInput,
        }
    }

    /// The same error with `prefix: ` before an [`ProcessorError::Input`]'s `what` (which image of a batch).
    pub(crate) fn for_item(self, prefix: &str) -> ProcessorError {
        match self {
            ProcessorError::Input { what, expected, found } => input_err(format!("{prefix}: {what}"), expected, found),
            other => other,
        }
    }
}

fn input_err(what: impl Into<String>, expected: impl Into<String>, found: impl Into<String>) -> ProcessorError {
    ProcessorError::Input { what: what.into(), expected: expected.into(), found: found.into() }
}
