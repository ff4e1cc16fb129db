//! The int8 (dynamically quantized) Linear against candle's f32 matmul on BEiT-base's Linear shapes, at
//! 197 rows (one 224×224 image) and 1576 rows (a batch of 8), on 1 and 2 threads.
//!
//! `cargo run --release -p beit --example int8_gemm [-- --quick]`
//!
//! The int8 time includes quantizing the activations; the f32 time is `x.matmul(&w.t())` (candle → gemm,
//! AVX-512 where available), bias not included. Both run in the same process, in alternating short
//! batches, and each number is the best batch, so that a neighbour's load on the machine (other builds
//! on a shared 2-core box) affects both alike.
//! G-ops/s is `2·M·N·K / time` for both.
use beit::internals::int8::QuantizedLinear;
use beit::internals::{cpu, Rng};
use candle_core::{Device, Tensor};
use common::{batch, SHAPES};

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let kernel = cpu::features();
    println!("int8 kernel for {kernel:?}; f32: candle {} matmul", env!("CARGO_PKG_NAME"));
    let mut rng = Rng::new(0x5eed);
    println!(
        "{:<22} {:>5} {:>3} | {:>9} {:>9} | {:>9} {:>9} | {:>6} | {:>9}",
        "layer", "M", "thr", "int8 ms", "int8 G/s", "f32 ms", "f32 G/s", "x f32", "rel err"
    );
    for &rows in &[197usize, 1576] {
        for &(name, k, n) in &SHAPES {
            let w = rng.symmetric_f32(n * k, 0.05);
            let b = rng.symmetric_f32(n, 0.02);
            let x = rng.symmetric_f32(rows * k, 1.0);
            let q = QuantizedLinear::quantize(&w, n, k, Some(&b))?;
            let xt = Tensor::from_slice(&x, (rows, k), &Device::Cpu)?;
            let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu)?;
            let wtt = wt.t()?;
            let mut out = vec![0f32; rows * n];
            // Accuracy against the f32 product (+ bias), relative to its RMS.
            q.forward(&x, rows, &mut out)?;
            let reference: Vec<f32> = xt.matmul(&wtt)?.flatten_all()?.to_vec1()?;
            let (mut err2, mut ref2) = (0f64, 0f64);
            for (i, (&o, &r)) in out.iter().zip(&reference).enumerate() {
                let r = r + b[i % n];
                err2 += ((o - r) as f64).powi(2);
                ref2 += (r as f64).powi(2);
            }
            let rel = (err2 / ref2).sqrt();
            let ops = 2.0 * (rows * n * k) as f64;
            for threads in [1usize, 2] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
                let rounds = if quick { 4 } else { 12 };
                let (mut t8, mut t32) = (f64::INFINITY, f64::INFINITY);
                pool.install(|| {
                    // Warm up both (scratch buffers, page faults, gemm's packing buffers).
                    q.forward_using(kernel, &x, rows, &mut out).unwrap();
                    xt.matmul(&wtt).unwrap();
                    // Alternate short batches of each and keep each one's best: a neighbour's burst of
                    // load then costs both sides alike instead of whichever happened to run under it.
                    for _ in 0..rounds {
                        t8 = t8.min(batch(0.02, || q.forward_using(kernel, &x, rows, &mut out).unwrap()));
                        t32 = t32.min(batch(0.02, || {
                            xt.matmul(&wtt).unwrap();
                        }));
                    }
                });
                println!(
                    "{:<22} {:>5} {:>3} | {:>9.3} {:>9.1} | {:>9.3} {:>9.1} | {:>6.2} | {:>9.2e}",
                    name,
                    rows,
                    threads,
                    t8 * 1e3,
                    ops / t8 / 1e9,
                    t32 * 1e3,
                    ops / t32 / 1e9,
                    t32 / t8,
                    rel
                );
            }
        }
    }
    Ok(())
}
