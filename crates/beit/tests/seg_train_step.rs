//! One training step of BeitForSemanticSegmentation against transformers (BatchNorm in training mode): the loss,
//! the gradient of every parameter and the BatchNorms' running statistics after the forward (fixture train_seg,
//! made by scripts/gen_seg_train_fixtures.py with dropout and drop path 0).

use std::collections::HashMap;
use std::path::Path;

use beit::checkpoint::{align_prefix, read_safetensors};
use beit::heads::BeitForSemanticSegmentation;
use beit::nn::Mode;
use beit::weights::{Source, Weights};
use beit::{BeitConfig, ForwardOptions};
use candle_core::{DType, Device, Tensor};

fn load(p: &Path) -> HashMap<String, Tensor> {
    read_safetensors(p, &Device::Cpu).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn loss_gradients_and_running_statistics_match_pytorch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/train_seg");
    let config = BeitConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = align_prefix(load(&dir.join("model.safetensors")), "beit", true);
    let w = Weights::build(tensors, dir.join("model.safetensors"), Source::Checkpoint, &Device::Cpu, true, 0);
    let model = BeitForSemanticSegmentation::load(&w, &config).unwrap();
    assert!(w.report().newly_initialized.is_empty() && w.report().unused.is_empty(), "{:?}", w.report());
    let inputs = load(&dir.join("inputs.safetensors"));
    // The call the segmentation trainer makes.
    let o = ForwardOptions { mode: Mode { train: true, uncached: true, ..Mode::default() }, ..Default::default() };
    let out = model.forward(&inputs["pixel_values"], &o, Some(&inputs["labels"])).unwrap();
    let loss = out.loss.unwrap();
    let want = load(&dir.join("outputs.safetensors"));
    let loss_err = max_abs_diff(&loss.reshape(1).unwrap(), &want["loss"]);
    assert!(loss_err <= 1e-4, "loss differs by {loss_err}");

    let grads = loss.backward().unwrap();
    let expected = load(&dir.join("grads.safetensors"));
    let no_grad: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("no_grad.json")).unwrap()).unwrap();
    let vars = w.vars();
    assert_eq!(vars.len(), expected.len() + no_grad.len(), "one entry per parameter");
    let (mut worst, mut failed) = (0f32, Vec::new());
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor());
        match expected.get(&format!("grad.{name}")) {
            Some(e) => {
                let g = g.unwrap_or_else(|| panic!("no gradient for {name}"));
                let err = max_abs_diff(g, e);
                let scale = e.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                if err > 1e-4 {
                    failed.push(format!("{name}: {err:.2e} (largest |gradient| {scale:.2e})"));
                }
                worst = worst.max(err);
            }
            // torch leaves parameters outside the loss's graph without a gradient (the last encoder layer).
            None => {
                assert!(no_grad.contains(name), "{name}: neither a gradient nor listed without one");
                if let Some(g) = g {
                    let zero = g.zeros_like().unwrap();
                    assert_eq!(max_abs_diff(g, &zero), 0.0, "{name}: torch has no gradient, ours is nonzero");
                }
            }
        }
    }

    assert!(failed.is_empty(), "gradients beyond 1e-4:\n{}", failed.join("\n"));

    // The running statistics after the forward, read from what a save would write.
    let running = load(&dir.join("running.safetensors"));
    let saved: HashMap<String, Tensor> = w.params().into_iter().collect();
    let mut worst_stat = 0f32;
    for (name, want) in &running {
        let got = saved.get(name).unwrap_or_else(|| panic!("{name} is not saved"));
        if name.ends_with("num_batches_tracked") {
            let count = |t: &Tensor| t.to_dtype(DType::I64).unwrap().to_scalar::<i64>().unwrap();
            assert_eq!(count(got), count(want), "{name}");
            continue;
        }
        let err = max_abs_diff(got, want);
        assert!(err <= 1e-5, "{name} differs by {err}");
        worst_stat = worst_stat.max(err);
    }
    println!(
        "train_seg: loss err {loss_err:.2e}, worst gradient err {worst:.2e} over {} parameters, worst running \
         statistic err {worst_stat:.2e} over {} buffers",
        expected.len(),
        running.len()
    );
}
