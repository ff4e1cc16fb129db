//! Where a BEiT-base forward pass spends its time: each candle op on one layer's shapes (batch 1, 197 tokens),
//! timed in isolation. `cargo run --release -p beit --example op_profile`
use std::time::Instant;

use candle_core::{Device, Tensor, D};

fn time(name: &str, reps: usize, mut f: impl FnMut() -> candle_core::Result<Tensor>) {
    f().unwrap();
    let t = Instant::now();
    for _ in 0..reps {
        f().unwrap();
    }
    println!("{name:32} {:8.3} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (n, d, f, h) = (197usize, 768usize, 3072usize, 12usize);
    let x = Tensor::randn(0f32, 1.0, (1, n, d), &dev)?;
    let w_qkv = Tensor::randn(0f32, 0.02, (d, d), &dev)?;
    let w1 = Tensor::randn(0f32, 0.02, (f, d), &dev)?;
    let b1 = Tensor::randn(0f32, 0.02, f, &dev)?;
    let hid = Tensor::randn(0f32, 1.0, (n, f), &dev)?;
    let g = Tensor::ones(d, candle_core::DType::F32, &dev)?;
    let scores = Tensor::randn(0f32, 1.0, (1, h, n, n), &dev)?;
    let q = Tensor::randn(0f32, 1.0, (1, h, n, 64), &dev)?;
    let x2 = x.reshape((n, d))?;
    time("matmul 197x768 @ 768x768 (x4)", 20, || x2.matmul(&w_qkv.t()?));
    time("matmul 197x768 @ 768x3072 (x2)", 20, || x2.matmul(&w1.t()?));
    time("bias add 197x3072", 20, || hid.broadcast_add(&b1));
    time("gelu_erf 197x3072", 20, || hid.gelu_erf());
    time("gelu (tanh) 197x3072", 20, || hid.gelu());
    time("layer_norm 197x768 (x2)", 20, || candle_nn::ops::layer_norm(&x, &g, &g, 1e-12));
    time("softmax 12x197x197", 20, || candle_nn::ops::softmax_last_dim(&scores));
    time("q @ k^T 12x197x64", 20, || q.matmul(&q.t()?));
    time("reshape+transpose+contiguous", 20, || x.reshape((1, n, h, 64))?.transpose(1, 2)?.contiguous());
    time("scores + bias (broadcast)", 20, || scores.broadcast_add(&scores));
    time("scores / 8", 20, || &scores / 8.0);
    time("sum last dim", 20, || scores.sum_keepdim(D::Minus1));
    Ok(())
}
