//! Parity with transformers 4.57.6: every fixture under tests/fixtures/model (made by
//! scripts/gen_model_fixtures.py) is run and every output tensor compared, max abs error <= 1e-4. The BEiT family
//! (tests/fixtures/family, scripts/gen_family_fixtures.py): Data2VecVision against transformers, timm's beit and
//! beitv2 checkpoints against timm 1.0.31.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use beit::checkpoint::timm::TimmArgs;
use beit::checkpoint::{read_safetensors, WeightsFormat};
use beit::{load_pretrained, Architecture, ForwardOptions, InferenceDtype, LoadOptions, ModelInputs};
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
    run_case_with(dir, &LoadOptions { weights_format: format, ..Default::default() })
}

fn run_case_with(dir: &Path, opts: &LoadOptions) -> f32 {
    let case: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let call = &case["call"];
    let flag = |k: &str| call.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let inputs = read(&dir.join("inputs.safetensors"));
    let expected = read(&dir.join("outputs.safetensors"));
    let loaded = load_pretrained(dir, opts, &Device::Cpu).unwrap();
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
        // As the CLI loads models: prepared for inference, weights packed once for the f32 kernel.
        let packed = LoadOptions { inference: Some(InferenceDtype::F32), ..Default::default() };
        let err = run_case_with(dir, &packed);
        println!("{:40} packed for inference max abs err {err:.2e}", dir.file_name().unwrap().to_string_lossy());
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

fn family(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/family").join(name)
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beit-family-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy(src: &Path, dst: &Path, files: &[&str]) {
    for f in files {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

fn pixel_values(dir: &Path) -> Tensor {
    read(&dir.join("inputs.safetensors"))["pixel_values"].clone()
}

fn output(loaded: &beit::Pretrained, x: &Tensor, name: &str) -> Tensor {
    let out = loaded.model.forward_named(x, &ModelInputs::default()).unwrap();
    out.into_iter().find(|(k, _)| k == name).unwrap().1
}

/// Data2VecVision against transformers, timm's beit/beitv2 against timm itself.
#[test]
fn every_family_fixture_matches_its_library() {
    let cases = fixtures("family");
    assert!(cases.len() >= 8, "fixtures missing: run scripts/gen_family_fixtures.py");
    for dir in &cases {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let err = run_case(dir, Some(WeightsFormat::Safetensors));
        println!("{name:40} safetensors max abs err {err:.2e}");
        if dir.join("pytorch_model.bin").exists() {
            let err = run_case(dir, Some(WeightsFormat::PytorchBin));
            println!("{name:40} pytorch_model.bin max abs err {err:.2e}");
        }
    }
    // timm's config.json and --timm-model together: the name from the option, model_args from the file.
    let opts = LoadOptions {
        timm_model: Some("timm/beit_base_patch16_224.in22k_ft_in22k_in1k".into()),
        ..Default::default()
    };
    let err = run_case_with(&family("timm_hub_beit"), &opts);
    println!("{:40} --timm-model max abs err {err:.2e}", "timm_hub_beit");
}

/// The BeitConfig derived from each timm name equals what timm.create_model(name) builds (timm_names.json).
#[test]
fn timm_names_derive_timms_hyperparameters() {
    let text = std::fs::read_to_string(family("timm_names.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let archs = v["architectures"].as_array().unwrap();
    assert_eq!(archs.len(), 7);
    let avg: HashMap<String, Tensor> =
        [("fc_norm.weight".to_string(), Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap())].into_iter().collect();
    let usize_of = |e: &serde_json::Value, k: &str| e[k].as_u64().unwrap() as usize;
    for e in archs {
        let name = e["name"].as_str().unwrap();
        let args = TimmArgs::for_name(name).unwrap();
        let mean = args.use_mean_pooling(&avg).unwrap();
        let c = args.beit_config(mean, usize_of(e, "num_labels"), None).unwrap();
        let pair = |k: &str| -> (usize, usize) {
            let a = e[k].as_array().unwrap();
            (a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize)
        };
        assert_eq!(c.hidden_size, usize_of(e, "hidden_size"), "{name}");
        assert_eq!(c.num_hidden_layers, usize_of(e, "num_hidden_layers"), "{name}");
        assert_eq!(c.num_attention_heads, usize_of(e, "num_attention_heads"), "{name}");
        assert_eq!(c.intermediate_size, usize_of(e, "intermediate_size"), "{name}");
        assert_eq!(c.num_channels, usize_of(e, "num_channels"), "{name}");
        assert_eq!((c.patch_size.height, c.patch_size.width), pair("patch_size"), "{name}");
        assert_eq!((c.image_size.height, c.image_size.width), pair("image_size"), "{name}");
        assert_eq!(c.use_absolute_position_embeddings, e["use_absolute_position_embeddings"].as_bool().unwrap(), "{name}");
        assert_eq!(c.use_relative_position_bias, e["use_relative_position_bias"].as_bool().unwrap(), "{name}");
        assert_eq!(
            c.use_shared_relative_position_bias,
            e["use_shared_relative_position_bias"].as_bool().unwrap(),
            "{name}"
        );
        let init = e["layer_scale_init_value"].as_f64().unwrap(); // stored as float32 by timm
        assert!((c.layer_scale_init_value - init).abs() <= 1e-7 * init.max(1e-3), "{name}: {}", c.layer_scale_init_value);
        assert_eq!(c.layer_norm_eps, e["layer_norm_eps"].as_f64().unwrap(), "{name}");
        assert_eq!(c.layer_norm_eps, 1e-6, "{name}");
        assert_eq!(c.use_mean_pooling, e["use_mean_pooling"].as_bool().unwrap(), "{name}");
        assert!(e["qkv_bias"].as_bool().unwrap(), "{name}: timm without q/v biases");
        assert_eq!((c.hidden_act.name(), e["hidden_act"].as_str().unwrap()), ("gelu", "GELU"), "{name}");
        assert_eq!(c.num_labels(), usize_of(e, "num_labels"), "{name}");
        assert_eq!(c.architectures.as_deref(), Some(&["BeitForImageClassification".to_string()][..]), "{name}");
    }
    // Every pretrained tag names one of them, with its head's class count.
    for t in v["pretrained"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let args = TimmArgs::for_name(name).unwrap();
        assert_eq!(args.architecture, t["architecture"].as_str().unwrap());
        let c = args.beit_config(true, usize_of(t, "num_labels"), None).unwrap();
        assert_eq!(c.num_labels(), usize_of(t, "num_labels"), "{name}");
    }
}

#[test]
fn family_errors_name_what_is_wrong() {
    // An unknown model_type.
    let d = temp("model-type");
    copy(&family("d2v_cls"), &d, &["model.safetensors"]);
    let text = std::fs::read_to_string(family("d2v_cls").join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), text.replace("\"data2vec-vision\"", "\"vit\"")).unwrap();
    let e = load_pretrained(&d, &LoadOptions::default(), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model_type") && e.contains("\"vit\"") && e.contains("config.json"), "{e}");

    // A timm name that is not beit/beitv2.
    let opts = LoadOptions { timm_model: Some("vit_base_patch16_224.augreg_in21k".into()), ..Default::default() };
    let e = load_pretrained(&family("timm_relpos_mean"), &opts, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("vit_base_patch16_224.augreg_in21k") && e.contains("timm model name"), "{e}");
    assert!(e.contains("beit_large_patch16_512") && e.contains("beitv2_base_patch16_224"), "{e}");

    // A timm state dict missing blocks.1.attn.qkv.weight: the error names timm's tensor and the file.
    let d = temp("no-qkv");
    copy(&family("timm_hub_beit"), &d, &["config.json"]);
    let tensors: HashMap<String, Tensor> = read(&family("timm_hub_beit").join("model.safetensors"))
        .into_iter()
        .filter(|(k, _)| k != "blocks.1.attn.qkv.weight")
        .collect();
    candle_core::safetensors::save(&tensors, d.join("model.safetensors")).unwrap();
    let e = load_pretrained(&d, &LoadOptions::default(), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("`blocks.1.attn.qkv.weight`") && e.contains("missing") && e.contains("model.safetensors"), "{e}");

    // The wrong timm name for the weights: shapes named in timm's terms.
    let d = temp("wrong-name");
    copy(&family("timm_relpos_mean"), &d, &["model.safetensors"]);
    let opts = LoadOptions { timm_model: Some("beit_base_patch16_224".into()), ..Default::default() };
    let e = load_pretrained(&d, &opts, &Device::Cpu).err().unwrap().to_string();
    // (whichever tensor is checked first: qkv while converting, else the patch embedding while building)
    assert!(e.contains("has shape") && e.contains("768") && !e.contains("beit."), "{e}");

    // A transformers config that says CLS pooling beside mean-pooled ("avg", fc_norm) timm weights.
    let d = temp("pooling");
    copy(&family("timm_relpos_mean"), &d, &["model.safetensors"]);
    let text = std::fs::read_to_string(family("timm_relpos_mean").join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), text.replace("\"use_mean_pooling\": true", "\"use_mean_pooling\": false"))
        .unwrap();
    let e = load_pretrained(&d, &LoadOptions::default(), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("fc_norm.weight") && e.contains("use_mean_pooling"), "{e}");

    // Data2VecVision has no masked-image-modeling head.
    let opts = LoadOptions { architecture: Some(Architecture::BeitForMaskedImageModeling), ..Default::default() };
    let e = load_pretrained(&family("d2v_cls"), &opts, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("BeitForMaskedImageModeling") && e.contains("Data2VecVisionModel"), "{e}");
}

/// save_pretrained writes Data2VecVision back under its own prefix and class, and timm checkpoints as transformers
/// BEiT ones; both load again to the same outputs.
#[test]
fn family_checkpoints_save_in_transformers_layout() {
    for (case, class, prefix) in [
        ("d2v_cls", "Data2VecVisionForImageClassification", "data2vec_vision."),
        ("d2v_seg", "Data2VecVisionForSemanticSegmentation", "data2vec_vision."),
        ("timm_relpos_mean", "BeitForImageClassification", "beit."),
        ("timm_hub_beit", "BeitForImageClassification", "beit."),
    ] {
        let src = load_pretrained(&family(case), &LoadOptions::default(), &Device::Cpu).unwrap();
        let out = temp(&format!("save-{case}"));
        src.save(&out).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], class, "{case}");
        let names: Vec<String> = read(&out.join("model.safetensors")).into_keys().collect();
        assert!(names.iter().any(|n| n.starts_with(prefix)), "{case}: {names:?}");
        assert!(!names.iter().any(|n| n.starts_with("beit.") && prefix != "beit."), "{case}: {names:?}");
        let back = load_pretrained(&out, &LoadOptions::default(), &Device::Cpu).unwrap();
        assert!(back.report.unused.is_empty() && back.report.newly_initialized.is_empty(), "{case}: {:?}", back.report);
        assert_eq!(back.config, src.config, "{case}");
        let x = pixel_values(&family(case));
        assert_eq!(max_abs_diff(&output(&src, &x, "logits"), &output(&back, &x, "logits")), 0.0, "{case}");
        if case.starts_with("timm") {
            assert_eq!(config["layer_norm_eps"], 1e-6, "{case}");
        }
    }
    // timm's label names (save_for_hf's label_names) become id2label.
    let hub = load_pretrained(&family("timm_hub_beit"), &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(hub.config.id2label.values().cloned().collect::<Vec<_>>(), ["cat", "dog", "bird"]);
}
