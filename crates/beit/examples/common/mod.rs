//! What the GEMM benchmark examples share.
use std::time::Instant;

/// BEiT-base's Linear layers: (name, in features K, out features N).
pub const SHAPES: [(&str, usize, usize); 4] = [
    ("q/k/v/out 768->768", 768, 768),
    ("fused qkv 768->2304", 768, 2304),
    ("fc1 768->3072", 768, 3072),
    ("fc2 3072->768", 3072, 768),
];

/// Seconds per call of one batch of calls lasting at least `min_s` (at least one call).
pub fn batch(min_s: f64, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    let mut calls = 0;
    while calls == 0 || t.elapsed().as_secs_f64() < min_s {
        f();
        calls += 1;
    }
    t.elapsed().as_secs_f64() / calls as f64
}
