//! Hub resolution from a cache laid out as huggingface_hub lays it out (no network), and save_pretrained ->
//! load -> identical outputs.

use std::path::{Path, PathBuf};

use beit::hub::{resolve_model, HubOptions};
use beit::{load_pretrained, AnyBeitModel, InferenceDtype, LoadOptions, ModelInputs};
use candle_core::{Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model").join(name)
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beit-hub-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// models--org--name/{blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/main}.
fn build_cache(cache: &Path, repo: &str, commit: &str, src: &Path, files: &[&str]) {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snap = root.join("snapshots").join(commit);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    for (i, f) in files.iter().enumerate() {
        let blob = format!("{commit}{i:04}");
        std::fs::copy(src.join(f), root.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(f)).unwrap();
    }
    std::fs::write(root.join("refs/main"), commit).unwrap();
}

fn options(cache: &Path) -> HubOptions {
    HubOptions { revision: "main".into(), cache_dir: cache.to_path_buf(), offline: true, token: None, progress: false }
}

fn logits(dir: &Path, file: Option<PathBuf>) -> Tensor {
    let opts = LoadOptions { weights_file: file, ..Default::default() };
    let m = load_pretrained(dir, &opts, &Device::Cpu).unwrap();
    let x = Tensor::read_npy(fixture("cls_single").join("pixel_values.npy")).unwrap();
    let out = m.model.forward_named(&x, &ModelInputs::default()).unwrap();
    out.into_iter().find(|(k, _)| k == "logits").unwrap().1
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn resolves_repo_ids_from_the_python_cache_layout() {
    let cache = temp("cache");
    build_cache(&cache, "test-org/tiny-beit", "0123abcd", &fixture("cls_single"), &["config.json", "model.safetensors"]);
    let loc = resolve_model("test-org/tiny-beit", &options(&cache)).unwrap();
    assert!(loc.dir.ends_with("snapshots/0123abcd"), "{loc:?}");
    assert!(same(&logits(&loc.dir, None), &logits(&fixture("cls_single"), None)));

    // A revision given as a commit hash.
    let mut o = options(&cache);
    o.revision = "0123abcd".into();
    assert_eq!(resolve_model("test-org/tiny-beit", &o).unwrap(), loc);

    // Offline with nothing cached: the error says what was needed and where it looked.
    let e = resolve_model("test-org/absent", &options(&cache)).unwrap_err().to_string();
    assert!(e.contains("offline") && e.contains("config.json") && e.contains("model.safetensors"), "{e}");
    assert!(e.contains("models--test-org--absent"), "{e}");
    // Config but no weights.
    build_cache(&cache, "test-org/no-weights", "ffff", &fixture("cls_single"), &["config.json"]);
    assert!(resolve_model("test-org/no-weights", &options(&cache)).is_err());
    // Neither a path nor a repo id.
    assert!(resolve_model("./not/here", &options(&cache)).is_err());
}

#[test]
fn a_single_weights_file_loads_with_its_directorys_config() {
    let loc = resolve_model(fixture("cls_single").join("pytorch_model.bin").to_str().unwrap(), &options(Path::new("/nonexistent")))
        .unwrap();
    let bin = logits(&loc.dir, loc.weights_file.clone());
    assert!(same(&bin, &logits(&fixture("cls_single"), None)));
}

#[test]
fn save_then_load_gives_identical_outputs() {
    for case in ["cls_single", "mim", "seg_uper_aux1", "backbone_fpn", "relpos_shared_cls"] {
        let src = load_pretrained(&fixture(case), &LoadOptions::default(), &Device::Cpu).unwrap();
        let out = temp(&format!("save-{case}"));
        src.save(&out).unwrap();
        let back = load_pretrained(&out, &LoadOptions::default(), &Device::Cpu).unwrap();
        assert!(back.report.unused.is_empty() && back.report.newly_initialized.is_empty(), "{case}: {:?}", back.report);
        assert_eq!(back.config, src.config, "{case}");
        let x = beit::checkpoint::read_safetensors(&fixture(case).join("inputs.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .find(|(k, _)| k == "pixel_values")
            .unwrap()
            .1;
        let a = src.model.forward_named(&x, &ModelInputs::default()).unwrap();
        let b = back.model.forward_named(&x, &ModelInputs::default()).unwrap();
        for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
            assert_eq!(ka, kb);
            assert!(same(ta, tb), "{case}: {ka}");
        }
        // Every checkpoint tensor was written back under its own name, BatchNorm counters included.
        let names = |p: &Path| -> Vec<String> {
            let mut v: Vec<String> =
                beit::checkpoint::read_safetensors(p, &Device::Cpu).unwrap().into_iter().map(|(k, _)| k).collect();
            v.sort();
            v
        };
        assert_eq!(names(&out.join("model.safetensors")), names(&fixture(case).join("model.safetensors")), "{case}");
    }
}

/// A model prepared for inference holds its Linear weights once (packed or quantized): saving it is refused with a
/// message saying why, and the packed weights unpack to the checkpoint's bit for bit.
#[test]
fn models_prepared_for_inference_refuse_to_save_and_unpack_exactly() {
    let dense = load_pretrained(&fixture("cls_single"), &LoadOptions::default(), &Device::Cpu).unwrap();
    for dtype in [InferenceDtype::F32, InferenceDtype::Int8, InferenceDtype::Bf16] {
        let opts = LoadOptions { inference: Some(dtype), ..Default::default() };
        let m = load_pretrained(&fixture("cls_single"), &opts, &Device::Cpu).unwrap();
        let e = m.save(&temp("save-inference")).unwrap_err().to_string();
        assert!(e.contains("loaded for inference") && e.contains("released"), "{dtype:?}: {e}");
        let (AnyBeitModel::ImageClassification(a), AnyBeitModel::ImageClassification(b)) = (&dense.model, &m.model) else {
            panic!("cls_single is a classifier");
        };
        let (la, lb) = (&a.beit.encoder.layer[0].intermediate.dense, &b.beit.encoder.layer[0].intermediate.dense);
        match dtype {
            InferenceDtype::F32 => assert!(same(&la.weight().unwrap(), &lb.weight().unwrap())),
            InferenceDtype::Int8 => {
                let e = lb.weight().unwrap_err().to_string();
                assert!(e.contains("released") && e.contains("int8"), "{e}");
            }
            // The bf16 values it multiplies by: the checkpoint's, rounded to nearest even.
            InferenceDtype::Bf16 => {
                use beit::internals::bf16::{from_bf16, to_bf16};
                let dense = la.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want: Vec<f32> = dense.iter().map(|&v| from_bf16(to_bf16(v))).collect();
                let got = lb.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}

#[test]
fn each_class_loads_from_pretrained_by_directory_file_or_repo_id() {
    use beit::{BeitBackbone, BeitForImageClassification, BeitForMaskedImageModeling, BeitImageProcessor, BeitModel};
    let cache = temp("classes");
    build_cache(
        &cache,
        "test-org/tiny-cls",
        "c0ffee",
        &fixture("cls_single"),
        &["config.json", "model.safetensors", "preprocessor_config.json"],
    );
    let hub = LoadOptions { hub: Some(options(&cache)), ..Default::default() };
    let x = Tensor::read_npy(fixture("cls_single").join("pixel_values.npy")).unwrap();
    let want = logits(&fixture("cls_single"), None);
    let dir = fixture("cls_single");
    let file = dir.join("pytorch_model.bin");
    for spec in [dir.to_str().unwrap(), file.to_str().unwrap(), "test-org/tiny-cls"] {
        let m = BeitForImageClassification::from_pretrained(spec, &hub).unwrap();
        let got = m.forward(&x, &Default::default(), None).unwrap().logits;
        assert!(same(&got, &want), "{spec}");
    }
    // The class decides the task: the bare model from a classification checkpoint (its `beit.` prefix stripped),
    // and a head the checkpoint lacks is initialized.
    let base = BeitModel::from_pretrained("test-org/tiny-cls", &hub).unwrap();
    assert!(base.forward(&x, &Default::default()).unwrap().pooler_output.is_some());
    assert!(BeitForMaskedImageModeling::from_pretrained(dir.to_str().unwrap(), &hub).is_ok());
    assert!(BeitBackbone::from_pretrained(dir.to_str().unwrap(), &hub).is_ok());
    // Prepared for inference: the same logits to float rounding.
    let packed = LoadOptions { inference: Some(InferenceDtype::F32), ..hub.clone() };
    let m = BeitForImageClassification::from_pretrained("test-org/tiny-cls", &packed).unwrap();
    let got = m.forward(&x, &Default::default(), None).unwrap().logits;
    let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "{diff}");

    let p = BeitImageProcessor::from_pretrained("test-org/tiny-cls", Some(&options(&cache))).unwrap();
    let local = BeitImageProcessor::from_json_file(dir.join("preprocessor_config.json")).unwrap();
    assert_eq!(p, local);
    // transformers refuses a directory without preprocessor_config.json; so do we, naming the file.
    let e = BeitImageProcessor::from_pretrained(fixture("abspos_larger").to_str().unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("preprocessor_config.json"), "{e}");
    // A spec that is nothing: the error says what was expected.
    let e = BeitForImageClassification::from_pretrained("./no/such/dir", &hub).unwrap_err();
    assert_eq!(e.kind(), beit::ErrorKind::InvalidInput, "{e}");
}
