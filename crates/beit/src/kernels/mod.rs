//! Hand-written CPU kernels for what candle does not offer.
//!
//! - [`int8`]: dynamically quantized Linear layers (int8 per-output-channel weights, uint8 per-row
//!   activations quantized on the fly), the scheme of onnxruntime's `quantize_dynamic`, with an AVX-512
//!   VNNI GEMM selected at run time and a portable fallback that gives the same integers.
//! - [`f32`]: an f32 Linear on PyTorch-layout weights (no packed copy kept), AVX-512 or portable.
//!
//! Every kernel here is selected at run time (`is_x86_feature_detected!`), never through global
//! `target-cpu` flags, so one binary runs on any x86-64 (and non-x86) CPU.

pub mod attention;
pub mod cpu;
pub mod conv;
pub mod f32;
pub mod int8;

pub use int8::{Int8Kernel, QuantizedLinear};
