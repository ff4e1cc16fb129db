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
        let o = ForwardOptions { mode: Mode { train: true, uncached: true }, ..Default::default() };
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
