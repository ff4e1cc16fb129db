//! beit-rs: BEiT (Bao, Dong, Wei, "BEiT: BERT Pre-Training of Image Transformers") in Rust, loading the
//! checkpoints Hugging Face transformers loads and computing the same outputs.
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
    pub use crate::kernels::{attention, conv, cpu, f32, int8, math};
    pub use crate::rng::Rng;
}

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
