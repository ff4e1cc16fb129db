//! Parity with transformers 4.57.6: every fixture under tests/fixtures/model (made by
//! scripts/gen_model_fixtures.py) is run and every output tensor compared, max abs error <= 1e-4.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use beit::checkpoint::{read_safetensors, WeightsFormat};
use beit::{load_pretrained, ForwardOptions, LoadOptions, ModelInputs};
use candle_core::{DType, Device, Tensor};

const TOLERANCE: f32 = 1e-4;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(kind);
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    cases.sort();
    cases
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    read_safetensors(path, &Device::Cpu).unwrap().into_iter().collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn run_case(dir: &Path, format: Option<WeightsFormat>) -> f32 {
    let case: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let call = &case["call"];
    let flag = |k: &str| call.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let inputs = read(&dir.join("inputs.safetensors"));
    let expected = read(&dir.join("outputs.safetensors"));
    let opts = LoadOptions { weights_format: format, ..Default::default() };
    let loaded = load_pretrained(dir, &opts, &Device::Cpu).unwrap();
    assert!(loaded.report.newly_initialized.is_empty(), "{:?}", loaded.report);
    assert_eq!(loaded.model.architecture().name(), case["class"].as_str().unwrap());
    let model_inputs = ModelInputs {
        options: ForwardOptions {
            bool_masked_pos: inputs.get("bool_masked_pos").cloned(),
            head_mask: inputs.get("head_mask").cloned(),
            output_hidden_states: flag("output_hidden_states"),
            output_attentions: flag("output_attentions"),
            interpolate_pos_encoding: flag("interpolate_pos_encoding"),
            ..Default::default()
        },
        labels: inputs.get("labels").cloned(),
    };
    let outputs = loaded.model.forward_named(&inputs["pixel_values"], &model_inputs).unwrap();
    let got: BTreeSet<&str> = outputs.iter().map(|(k, _)| k.as_str()).collect();
    let want: BTreeSet<&str> = expected.keys().map(|k| k.as_str()).collect();
    assert_eq!(got, want, "{}: output names", dir.display());
    let mut worst = 0f32;
    for (name, t) in &outputs {
        let err = max_abs_diff(t, &expected[name]);
        assert!(err <= TOLERANCE, "{}: {name} differs by {err}", dir.display());
        worst = worst.max(err);
    }
    worst
}

#[test]
fn every_model_fixture_matches_transformers() {
    let cases = fixtures("model");
    assert!(cases.len() >= 20, "fixtures missing: run scripts/gen_model_fixtures.py");
    for dir in &cases {
        let err = run_case(dir, Some(WeightsFormat::Safetensors));
        println!("{:40} safetensors max abs err {err:.2e}", dir.file_name().unwrap().to_string_lossy());
        if dir.join("pytorch_model.bin").exists() {
            let err = run_case(dir, Some(WeightsFormat::PytorchBin));
            println!("{:40} pytorch_model.bin max abs err {err:.2e}", dir.file_name().unwrap().to_string_lossy());
        }
    }
}

/// Flax checkpoints (flax_model.msgpack) against the Flax models' own outputs (scripts/gen_flax_fixtures.py).
#[test]
fn flax_checkpoints_match_flax_outputs() {
    let cases = fixtures("flax");
    assert!(cases.len() >= 4, "fixtures missing: run scripts/gen_flax_fixtures.py");
    for dir in &cases {
        let err = run_case(dir, Some(WeightsFormat::FlaxMsgpack));
        println!("{:40} flax_model.msgpack max abs err {err:.2e}", dir.file_name().unwrap().to_string_lossy());
    }
}
