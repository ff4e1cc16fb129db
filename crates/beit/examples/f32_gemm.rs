//! `beit::internals::f32::linear` (weights packed per call) and `linear_packed` (weights packed once, as
//! the model does at load) against candle's f32 matmul (`x.matmul(&w.t())`, i.e. the gemm crate with its
//! AVX-512 kernels) on BEiT-base's Linear shapes, at 197 rows (one 224×224 image) and 1576 rows (a
//! batch of 8), on 1 and 2 threads.
//!
//! `cargo run --release -p beit --example f32_gemm [-- --quick]`
//!
//! Ours includes the bias (and, for `linear`, all packing); candle's has no bias. All three run in the
//! same process, in alternating short batches, and each number is the best batch, so that a
//! neighbour's load on the machine (other builds on a shared 2-core box) affects them alike. GFLOP/s is
//! `2·M·N·K / time`; speedup is candle's time over `linear_packed`'s.
use beit::internals::f32::{linear_packed_using, linear_using, PackedF32};
use beit::internals::{cpu, Rng};
use candle_core::{Device, Tensor};
use common::{batch, SHAPES};

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let kernel = cpu::features();
    println!("ours: kernels for {kernel:?}; reference: candle matmul (gemm crate)");
    let mut rng = Rng::new(0x5eed);
    println!(
        "{:<22} {:>5} {:>3} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9} | {:>7} | {:>9}",
        "layer",
        "M",
        "thr",
        "ours ms",
        "ours G/s",
        "packed ms",
        "pack G/s",
        "gemm ms",
        "gemm G/s",
        "speedup",
        "max err"
    );
    for &rows in &[197usize, 1576] {
        for &(name, k, n) in &SHAPES {
            let w = rng.symmetric_f32(n * k, 0.05);
            let b = rng.symmetric_f32(n, 0.02);
            let x = rng.symmetric_f32(rows * k, 1.0);
            let packed = PackedF32::pack(&w, n, k)?;
            let xt = Tensor::from_slice(&x, (rows, k), &Device::Cpu)?;
            let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu)?;
            let wtt = wt.t()?;
            let mut out = vec![0f32; rows * n];
            // Agreement with candle (+ bias), relative to the largest output; packed must match bit for bit.
            linear_using(kernel, &x, k, rows, &w, n, k, Some(&b), &mut out, n)?;
            let mut out_packed = vec![0f32; rows * n];
            linear_packed_using(kernel, &x, k, rows, &packed, Some(&b), &mut out_packed, n)?;
            if out
                .iter()
                .zip(&out_packed)
                .any(|(p, q)| p.to_bits() != q.to_bits())
            {
                return Err("linear_packed differs from linear".into());
            }
            let reference: Vec<f32> = xt.matmul(&wtt)?.flatten_all()?.to_vec1()?;
            let (mut err, mut big) = (0f32, 0f32);
            for (i, (&o, &r)) in out.iter().zip(&reference).enumerate() {
                err = err.max((o - (r + b[i % n])).abs());
                big = big.max(o.abs());
            }
            let ops = 2.0 * (rows * n * k) as f64;
            for threads in [1usize, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                let rounds = if quick { 4 } else { 12 };
                let (mut ours, mut ours_packed, mut theirs) =
                    (f64::INFINITY, f64::INFINITY, f64::INFINITY);
                let res: Result<(), Box<dyn std::error::Error + Send + Sync>> =
                    pool.install(|| {
                        // Warm up all (scratch buffers, page faults, gemm's packing buffers).
                        linear_using(kernel, &x, k, rows, &w, n, k, Some(&b), &mut out, n)?;
                        linear_packed_using(kernel, &x, k, rows, &packed, Some(&b), &mut out, n)?;
                        xt.matmul(&wtt)?;
                        // Alternate short batches of each and keep each one's best: a neighbour's burst of
                        // load then costs all sides alike instead of whichever happened to run under it.
                        let mut failed = None;
                        let mut run = |f: &mut dyn FnMut() -> beit::Result<()>| {
                            batch(0.03, || {
                                if let Err(e) = f() {
                                    failed = Some(e.to_string());
                                }
                            })
                        };
                        for _ in 0..rounds {
                            ours = ours.min(run(&mut || linear_using(kernel, &x, k, rows, &w, n, k, Some(&b), &mut out, n)));
                            ours_packed = ours_packed
                                .min(run(&mut || linear_packed_using(kernel, &x, k, rows, &packed, Some(&b), &mut out, n)));
                            theirs = theirs.min(run(&mut || xt.matmul(&wtt).map(|_| ()).map_err(Into::into)));
                        }
                        match failed {
                            Some(e) => Err(e.into()),
                            None => Ok(()),
                        }
                    });
                res.map_err(|e| e.to_string())?;
                println!(
                    "{:<22} {:>5} {:>3} | {:>9.3} {:>9.1} | {:>9.3} {:>9.1} | {:>9.3} {:>9.1} | {:>7.2} | {:>9.1e}",
                    name,
                    rows,
                    threads,
                    ours * 1e3,
                    ops / ours / 1e9,
                    ours_packed * 1e3,
                    ops / ours_packed / 1e9,
                    theirs * 1e3,
                    ops / theirs / 1e9,
                    theirs / ours_packed,
                    err / big
                );
            }
        }
    }
    Ok(())
}
