//! Times the forward pass of a checkpoint on random pixels: the quick loop behind PERFORMANCE.md's per-change
//! measurements (`beit bench` is the user-facing benchmark).
//! `cargo run --release -p beit --example forward_timing -- DIR [BATCH] [RUNS] [f32|int8|dense] [generic]`
//! (f32 and int8: prepared for inference as the CLI loads models, on the fused encoder unless `generic` asks
//! for candle op by op; dense: as loaded, which runs the generic path).
use std::time::Instant;

use beit::{load_pretrained, InferenceDtype, InferencePath, LoadOptions, ModelInputs};
use candle_core::{Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: forward_timing DIR [BATCH] [RUNS]")?;
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let runs: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let inference = match args.get(4).map(String::as_str) {
        None | Some("f32") => Some(InferenceDtype::F32),
        Some("int8") => Some(InferenceDtype::Int8),
        Some("bf16") => Some(InferenceDtype::Bf16),
        Some("dense") => None,
        Some(other) => return Err(format!("expected f32, int8, bf16 or dense, found {other:?}").into()),
    };
    let inference_path = match args.get(5).map(String::as_str) {
        None | Some("fused") => InferencePath::Fused,
        Some("generic") => InferencePath::Generic,
        Some(other) => return Err(format!("expected fused or generic, found {other:?}").into()),
    };
    let t0 = Instant::now();
    let opts = LoadOptions { inference, inference_path, ..Default::default() };
    let loaded = load_pretrained(std::path::Path::new(dir), &opts, &Device::Cpu)?;
    println!("load {:.3} s", t0.elapsed().as_secs_f64());
    let s = loaded.config.image_size;
    let x = Tensor::randn(0f32, 1.0, (batch, loaded.config.num_channels, s.height, s.width), &Device::Cpu)?;
    let inputs = ModelInputs::default();
    loaded.model.forward_named(&x, &inputs)?;
    let cpu0 = cpu_seconds();
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        loaded.model.forward_named(&x, &inputs)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let cpu = (cpu_seconds() - cpu0) / (runs * batch) as f64;
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    println!("batch {batch}: median {:.1} ms, {:.2} images/s (min {:.1} ms, max {:.1} ms)", med * 1e3, batch as f64 / med, times[0] * 1e3, times[times.len() - 1] * 1e3);
    // CPU time per image does not change much when other processes share the cores, unlike wall time.
    println!("cpu {:.1} ms per image (user+sys, all threads)", cpu * 1e3);
    Ok(())
}

fn cpu_seconds() -> f64 {
    // /proc/self/stat fields 14 and 15: utime and stime in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
