//! Hand-written CPU kernels for what candle does not offer, and the element-wise maths the fused encoder
//! (model/fused.rs) and the layers in nn.rs run on slices.
//!
//! - [`aligned`]: 64-byte aligned buffers of plain values, the packed weights' and scratch's storage.
//! - [`cpu`]: the CPU's features, detected once (`BEIT_CPU` caps them); every kernel picks its code from
//!   [`cpu::features`], and the `*_using` functions take chosen features for tests and benchmarks.
//! - [`math`]: exp, erf and torch's exact GELU, softmax, LayerNorm over f32 slices, one of each.
//! - [`view`]: a candle tensor borrowed as an f32 slice.
//! - [`f32`]: an f32 Linear on PyTorch-layout weights, packed once ([`f32::PackedF32`]) or per call;
//!   AVX-512 or portable.
//! - [`int8`]: dynamically quantized Linear layers (int8 per-output-channel weights, uint8 per-row
//!   activations quantized on the fly), the scheme of onnxruntime's `quantize_dynamic`, with an AVX-512
//!   VNNI GEMM and a portable one that gives the same integers.
//! - [`bf16`]: a bf16 Linear (weights packed once, activations rounded as they are packed, f32
//!   accumulation) with an AVX-512 BF16 GEMM and a portable one that gives the same bits.
//! - [`attention`]: multi-head attention from a fused qkv buffer with relative position biases; AVX-512
//!   tiles, or the `gemm` crate's matmuls on CPUs without AVX-512.
//! - [`conv`]: the segmentation head's convolutions at inference (packed weights, Winograd 3×3, 1×1 as
//!   GEMM, ConvTranspose2d with kernel = stride).
//!
//! Every kernel is selected at run time, never through global `target-cpu` flags, so one binary runs on
//! any x86-64 (and non-x86) CPU.

pub(crate) mod aligned;
pub mod attention;
pub mod bf16;
pub mod conv;
pub mod cpu;
pub mod f32;
pub mod int8;
pub mod math;
pub mod view;

/// Runs `task(block, first_panel, end_panel)` so that every weight panel of every row block is run once: on
/// the calling thread when `parallel` is false or there is one thread, else as at least eight tasks per thread
/// on rayon's current pool, so that the split is even and a thread slowed by other work is made up for by the
/// others. The GEMM kernels' task split.
pub(crate) fn for_each_panel_run(
    m_blocks: usize,
    n_panels: usize,
    parallel: bool,
    task: impl Fn(usize, usize, usize) + Sync,
) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    if threads <= 1 || !parallel || n_panels == 0 {
        for mb in 0..m_blocks {
            task(mb, 0, n_panels);
        }
        return;
    }
    let per_chunk = n_panels.div_ceil((8 * threads).div_ceil(m_blocks.max(1)).clamp(1, n_panels));
    let n_chunks = n_panels.div_ceil(per_chunk);
    (0..m_blocks * n_chunks).into_par_iter().for_each(|t| {
        let (mb, chunk) = (t / n_chunks, t % n_chunks);
        task(mb, chunk * per_chunk, ((chunk + 1) * per_chunk).min(n_panels));
    });
}

/// `f` on a rayon pool of `threads` threads: the kernels' results must not depend on the count.
#[cfg(test)]
pub(crate) fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}
