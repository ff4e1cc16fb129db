//! beit-rs: BEiT (Bao, Dong, Wei, "BEiT: BERT Pre-Training of Image Transformers") in Rust, loading the
//! checkpoints Hugging Face transformers loads and computing the same outputs.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod heads;
pub mod hub;
pub mod kernels;
pub mod masking;
pub mod model;
pub mod nn;
pub mod npy;
pub mod ops;
pub mod pipeline;
pub mod pretrained;
pub mod processor;
pub mod rng;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use config::BeitConfig;
pub use error::{BeitError, ErrorKind, Result};
pub use heads::{AnyBeitModel, Architecture, BeitForImageClassification, BeitForMaskedImageModeling, ModelInputs};
pub use model::{BeitModel, ForwardOptions};
pub use nn::InferenceDtype;
pub use pretrained::{load_pretrained, LoadOptions, Pretrained};
pub use processor::{BeitFeatureExtractor, BeitImageProcessor};
