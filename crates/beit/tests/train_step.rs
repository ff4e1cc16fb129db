//! One training step against transformers: the loss and the gradient of every parameter
//! (fixtures train_cls and train_cls_shared, made by scripts/gen_model_fixtures.py with dropout and drop path 0).

use std::collections::HashMap;
use std::path::Path;

use beit::checkpoint::{align_prefix, read_safetensors};
use beit::heads::BeitForImageClassification;
use beit::nn::Mode;
use beit::weights::{Source, Weights};
use beit::{BeitConfig, ForwardOptions};
use candle_core::{Device, Tensor};

fn load(p: &Path) -> HashMap<String, Tensor> {
    read_safetensors(p, &Device::Cpu).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn loss_and_every_gradient_match_pytorch() {
    for case in ["train_cls", "train_cls_shared"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model").join(case);
        let config = BeitConfig::from_file(&dir.join("config.json")).unwrap();
        let tensors = align_prefix(load(&dir.join("model.safetensors")), "beit", true);
        let w = Weights::build(tensors, dir.join("model.safetensors"), Source::Checkpoint, &Device::Cpu, true, 0);
        let model = BeitForImageClassification::load(&w, &config).unwrap();
        let inputs = load(&dir.join("inputs.safetensors"));
        let o = ForwardOptions { mode: Mode { train: true, uncached: true, ..Mode::default() }, ..Default::default() };
        let out = model.forward(&inputs["pixel_values"], &o, Some(&inputs["labels"])).unwrap();
        let loss = out.loss.unwrap();
        let want = load(&dir.join("outputs.safetensors"));
        let err = max_abs_diff(&loss.reshape(1).unwrap(), &want["loss"]);
        assert!(err <= 1e-4, "{case}: loss differs by {err}");
        let grads = loss.backward().unwrap();
        let expected = load(&dir.join("grads.safetensors"));
        let mut worst = 0f32;
        let vars = w.vars();
        assert_eq!(vars.len(), expected.len(), "{case}: one gradient per parameter");
        for (name, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
            let e = &expected[&format!("grad.{name}")];
            let err = max_abs_diff(g, e);
            assert!(err <= 1e-4, "{case}: gradient of {name} differs by {err}");
            worst = worst.max(err);
        }
        println!("{case}: loss err {:.2e}, worst gradient err {worst:.2e} over {} parameters", err, vars.len());
    }
}

/// Largest difference relative to the largest magnitude of `want`.
fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max_abs_diff(got, want) / scale.max(f32::MIN_POSITIVE)
}

/// `--precision bf16` against torch.autocast("cpu", bfloat16) on train_cls (scripts/gen_autocast_fixtures.py). The
/// two round differently (autocast also rounds each Linear's output and the attention products to bf16; ours keeps
/// them f32), so the bound is a share of each tensor's largest value, set from what autocast itself moves from f32.
#[test]
fn bf16_step_matches_torch_autocast() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/train_cls");
    let config = BeitConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = align_prefix(load(&dir.join("model.safetensors")), "beit", true);
    let w = Weights::build(tensors, dir.join("model.safetensors"), Source::Checkpoint, &Device::Cpu, true, 0)
        .with_precision(beit::train::Precision::Bf16);
    let model = BeitForImageClassification::load(&w, &config).unwrap();
    let inputs = load(&dir.join("inputs.safetensors"));
    let o = ForwardOptions { mode: Mode { train: true, uncached: true, ..Mode::default() }, ..Default::default() };
    let loss = model.forward(&inputs["pixel_values"], &o, Some(&inputs["labels"])).unwrap().loss.unwrap();
    let (autocast, f32_grads) = (load(&dir.join("autocast.safetensors")), load(&dir.join("grads.safetensors")));
    let loss_err = max_abs_diff(&loss.reshape(1).unwrap(), &autocast["loss"]);
    let grads = loss.backward().unwrap();
    let (mut worst, mut worst_f32, mut worst_torch) = (0f32, 0f32, 0f32);
    for (name, var) in &w.vars() {
        let key = format!("grad.{name}");
        let (g, a, f) = (grads.get(var.as_tensor()).unwrap(), &autocast[&key], &f32_grads[&key]);
        let err = rel_diff(g, a);
        assert!(err <= 3e-2, "{name}: {err:.2e} of its largest autocast gradient");
        worst = worst.max(err);
        worst_f32 = worst_f32.max(rel_diff(g, f));
        worst_torch = worst_torch.max(rel_diff(a, f));
    }
    assert!(loss_err <= 1e-3, "loss differs from autocast's by {loss_err}");
    // Ours keeps more in f32 than autocast does: no further from the f32 step than autocast is.
    assert!(worst_f32 <= worst_torch, "bf16 against f32 {worst_f32:.2e}, autocast against f32 {worst_torch:.2e}");
    println!(
        "train_cls bf16: loss against autocast {loss_err:.2e}; worst gradient against autocast {worst:.2e}, against \
         f32 {worst_f32:.2e} (autocast against f32: {worst_torch:.2e})"
    );
}

/// Gradient checkpointing recomputes each layer in the backward pass from the same dropout and drop-path draws: every
/// gradient equals the one without it, bit for bit (here with dropout and drop path on).
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/train_cls");
    let mut config = BeitConfig::from_file(&dir.join("config.json")).unwrap();
    (config.drop_path_rate, config.hidden_dropout_prob) = (0.3, 0.1);
    let inputs = load(&dir.join("inputs.safetensors"));
    let run = |checkpoint: bool| {
        let tensors = align_prefix(load(&dir.join("model.safetensors")), "beit", true);
        let w = Weights::build(tensors, dir.join("model.safetensors"), Source::Checkpoint, &Device::Cpu, true, 0);
        let model = BeitForImageClassification::load(&w, &config).unwrap();
        beit::nn::seed_training_rng(5);
        let o = ForwardOptions { mode: Mode { train: true, uncached: true, checkpoint }, ..Default::default() };
        let loss = model.forward(&inputs["pixel_values"], &o, Some(&inputs["labels"])).unwrap().loss.unwrap();
        let mut store = loss.backward().unwrap();
        beit::model::checkpoint::merge_parameter_grads(&mut store).unwrap();
        let grads: Vec<(String, Vec<f32>)> = w
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), store.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let (plain, checkpointed) = (run(false), run(true));
    assert_eq!(plain.0, checkpointed.0, "loss");
    for ((name, a), (_, b)) in plain.1.iter().zip(&checkpointed.1) {
        assert_eq!(a, b, "{name}");
    }
}
