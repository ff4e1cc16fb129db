//! beit-rs: BEiT (Bao, Dong, Wei, "BEiT: BERT Pre-Training of Image Transformers") in Rust, loading the
//! checkpoints Hugging Face transformers loads and computing the same outputs.
//!
//! The names are transformers': [`BeitForImageClassification::from_pretrained`] takes a directory, a weights file or
//! a Hub repo id; [`BeitImageProcessor`] is the image processor; [`pipeline::Pipeline`] answers as transformers'
//! pipelines do. Outputs are [candle](https://github.com/huggingface/candle) tensors ([`candle_core`] is re-exported).
//! ARCHITECTURE.md in the repository shows how the pieces fit.
//!
//! # Classify an image
//! ```
//! use beit::{pipeline::Pipeline, processor::load_image, LoadOptions};
//! # fn main() -> beit::Result<()> {
//! let classifier = Pipeline::from_pretrained("../../models/beit-digits", &LoadOptions::default())?;
//! let image = load_image("../../data/digits/3/0003.png")?; // EXIF orientation applied, RGB as PIL converts
//! let best = &classifier.classify(&[image], 3)?[0];
//! println!("{} ({:.1}%)", best[0].label, 100.0 * best[0].score);
//! assert_eq!(best[0].label, "3");
//! # Ok(()) }
//! ```
//!
//! # Segment an image
//! ```
//! use beit::{pipeline::Pipeline, processor::load_image, LoadOptions};
//! # fn main() -> beit::Result<()> {
//! let segmenter = Pipeline::from_pretrained("tests/fixtures/model/seg_uper_aux1", &LoadOptions::default())?;
//! let image = load_image("tests/fixtures/processor/images/astronaut.png")?;
//! let (width, height) = image.dimensions();
//! let (class_ids, (h, w)) = &segmenter.segment(&[image])?[0]; // one class id per pixel, row-major
//! assert_eq!((*h, *w), (height as usize, width as usize));
//! assert_eq!(class_ids.len(), h * w);
//! # Ok(()) }
//! ```
//!
//! # Embed images
//! ```
//! use beit::{pipeline::Pipeline, processor::load_image, LoadOptions};
//! # fn main() -> beit::Result<()> {
//! let embedder = Pipeline::from_pretrained("../../models/beit-digits", &LoadOptions::default())?;
//! let images = [load_image("../../data/digits/3/0003.png")?, load_image("../../data/digits/7/0007.png")?];
//! let pooled = embedder.embed(&images, false)?; // (2, hidden_size): the pooler output
//! assert_eq!(pooled.dims(), &[2, embedder.pretrained.config.hidden_size]);
//! # Ok(()) }
//! ```
//!
//! # A forward pass with every layer's hidden states
//! ```
//! use beit::{processor::load_image, BeitImageProcessor, BeitModel, ForwardOptions, LoadOptions};
//! # fn main() -> beit::Result<()> {
//! let model = BeitModel::from_pretrained("../../models/beit-digits", &LoadOptions::default())?;
//! let processor = BeitImageProcessor::from_pretrained("../../models/beit-digits", None)?;
//! let pixel_values = processor.preprocess_rgb(&[load_image("../../data/digits/7/0007.png")?])?.to_tensor()?;
//! let options = ForwardOptions { output_hidden_states: true, ..Default::default() };
//! let out = model.forward(&pixel_values, &options)?;
//! let hidden_states = out.hidden_states.unwrap_or_default(); // embeddings, then each layer
//! assert_eq!(hidden_states.len(), model.config.num_hidden_layers + 1);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod heads;
pub mod hub;
pub(crate) mod kernels;
pub mod masking;
pub mod model;
pub mod nn;
pub mod npy;
pub(crate) mod ops;
pub mod pipeline;
pub mod pretrained;
pub mod processor;
pub(crate) mod rng;
pub mod tokenizer;
pub mod train;
pub mod weights;

/// For benchmarks and examples, with no stability promise: the CPU kernels and the seeded generator behind
/// the model, which are otherwise internal.
#[doc(hidden)]
pub mod internals {
    pub use crate::kernels::{attention, bf16, conv, cpu, f32, int8, math};
    pub use crate::rng::Rng;
}

/// The tensor library of every input and output (candle), so that callers use the same version.
pub use candle_core;
pub use config::BeitConfig;
pub use error::{BeitError, ErrorKind, Result};
pub use heads::{
    AnyBeitModel, Architecture, BeitBackbone, BeitForImageClassification, BeitForMaskedImageModeling,
    BeitForSemanticSegmentation, ModelInputs,
};

/// transformers' Data2VecVisionModel: BEiT's encoder under the `data2vec_vision.` prefix, without a pooler unless
/// a head asks for one. `from_pretrained` picks the family from the checkpoint's `model_type`.
pub type Data2VecVisionModel = BeitModel;
/// transformers' Data2VecVisionForImageClassification (see [`Data2VecVisionModel`]).
pub type Data2VecVisionForImageClassification = BeitForImageClassification;
/// transformers' Data2VecVisionForSemanticSegmentation (see [`Data2VecVisionModel`]).
pub type Data2VecVisionForSemanticSegmentation = BeitForSemanticSegmentation;
pub use model::{BeitModel, ForwardOptions, Inference, InferencePath};
pub use nn::InferenceDtype;
pub use pretrained::{load_pretrained, LoadOptions, Pretrained};
pub use processor::{BeitFeatureExtractor, BeitImageProcessor};
