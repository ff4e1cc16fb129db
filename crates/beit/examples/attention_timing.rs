//! The attention kernel this CPU runs (`beit::internals::attention`, AVX-512 where available) against the
//! portable one (the gemm crate for q·kᵀ and p·v, softmax between them: what CPUs without AVX-512 run), at
//! BEiT-base's shape (197 tokens, 12 heads of 64) for 1 and 8 images, on 1 and 2 threads.
//!
//! `cargo run --release -p beit --example attention_timing [-- --quick] [--threads N]`
//!
//! Both run in the same process, in alternating short batches, and each number is the best batch, so
//! that a neighbour's load on the machine affects both alike. GFLOP/s counts the two matmuls only:
//! `4 · batch · heads · n² · dh`.
use beit::internals::attention::{attention_using, AttentionShape};
use beit::internals::cpu::{self, CpuFeatures};
use beit::internals::Rng;
use common::batch as time_batch;

#[allow(dead_code)]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--threads N` times N threads only (default: 1 and 2).
    let thread_counts: Vec<usize> = match args.iter().position(|a| a == "--threads") {
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).into_iter().collect(),
        None => vec![1, 2],
    };
    let kernel = cpu::features();
    let portable = CpuFeatures::PORTABLE;
    let (n, heads, dh) = (197usize, 12usize, 64usize);
    println!("ours: the kernel for {kernel:?}; baseline: the portable kernel");
    accuracy(kernel, n, heads, dh)?;
    println!(
        "{:>5} {:>3} {:>6} | {:>9} {:>9} | {:>9} {:>9} | {:>7} | {:>9}",
        "batch", "thr", "biases", "ours ms", "ours G/s", "base ms", "base G/s", "speedup", "max diff"
    );
    let mut rng = Rng::new(0xa77e);
    for &batch in &[1usize, 8] {
        let d = heads * dh;
        let qkv: Vec<f32> = (0..batch * n * 3 * d).map(|_| rng.normal() as f32).collect();
        let biases: Vec<Vec<f32>> = (0..2)
            .map(|_| (0..heads * n * n).map(|_| (rng.normal() * 0.5) as f32).collect())
            .collect();
        for &threads in &thread_counts {
            for nb in [1usize, 2] {
                let b: Vec<&[f32]> = biases[..nb].iter().map(|b| &b[..]).collect();
                let shape = AttentionShape { batch, tokens: n, heads, head_size: dh };
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
                let mut ours = vec![0f32; batch * n * d];
                let mut base = vec![0f32; batch * n * d];
                let (mut t_ours, mut t_base) = (f64::INFINITY, f64::INFINITY);
                pool.install(|| -> beit::error::Result<()> {
                    attention_using(kernel, &qkv, &mut ours, shape, &b)?;
                    attention_using(portable, &qkv, &mut base, shape, &b)?;
                    // Short batches, many rounds: the best one is the least disturbed by a neighbour on the machine.
                    let rounds = if quick { 10 } else { 150 };
                    for _ in 0..rounds {
                        t_ours = t_ours.min(time_batch(0.004, || {
                            let _ = attention_using(kernel, &qkv, &mut ours, shape, &b);
                        }));
                        t_base = t_base.min(time_batch(0.004, || {
                            let _ = attention_using(portable, &qkv, &mut base, shape, &b);
                        }));
                    }
                    Ok(())
                })?;
                let diff = ours.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let flops = 4.0 * (batch * heads * n * n * dh) as f64;
                println!(
                    "{batch:>5} {threads:>3} {nb:>6} | {:>9.3} {:>9.1} | {:>9.3} {:>9.1} | {:>6.2}x | {:>9.2e}",
                    t_ours * 1e3,
                    flops / t_ours / 1e9,
                    t_base * 1e3,
                    flops / t_base / 1e9,
                    t_base / t_ours,
                    diff
                );
            }
        }
    }
    Ok(())
}

/// Both against an f64 reference on one image (q, k, v ~ N(0, 1), one bias ~ N(0, 0.5)): the largest
/// error relative to the largest output.
fn accuracy(kernel: CpuFeatures, n: usize, heads: usize, dh: usize) -> Result<(), Box<dyn std::error::Error>> {
    let d = heads * dh;
    let mut rng = Rng::new(0xacc);
    let qkv: Vec<f32> = (0..n * 3 * d).map(|_| rng.normal() as f32).collect();
    let bias: Vec<f32> = (0..heads * n * n).map(|_| (rng.normal() * 0.5) as f32).collect();
    let mut want = vec![0f64; n * d];
    let scale = 1.0 / (dh as f64).sqrt();
    for h in 0..heads {
        for i in 0..n {
            let mut s: Vec<f64> = (0..n)
                .map(|j| {
                    let dot: f64 = (0..dh)
                        .map(|c| qkv[i * 3 * d + h * dh + c] as f64 * qkv[j * 3 * d + d + h * dh + c] as f64)
                        .sum();
                    bias[(h * n + i) * n + j] as f64 + dot * scale
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            s.iter_mut().for_each(|v| *v = (*v - m).exp());
            let total: f64 = s.iter().sum();
            for c in 0..dh {
                want[i * d + h * dh + c] = s
                    .iter()
                    .enumerate()
                    .map(|(j, p)| p / total * qkv[j * 3 * d + 2 * d + h * dh + c] as f64)
                    .sum();
            }
        }
    }
    let big = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = |got: &[f32]| {
        got.iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max)
            / big
    };
    let (mut ours, mut base) = (vec![0f32; n * d], vec![0f32; n * d]);
    let shape = AttentionShape { batch: 1, tokens: n, heads, head_size: dh };
    attention_using(kernel, &qkv, &mut ours, shape, &[&bias])?;
    attention_using(CpuFeatures::PORTABLE, &qkv, &mut base, shape, &[&bias])?;
    println!(
        "vs f64, max |error| / max |output|: ours {:.2e}, portable {:.2e}",
        err(&ours),
        err(&base)
    );
    Ok(())
}
