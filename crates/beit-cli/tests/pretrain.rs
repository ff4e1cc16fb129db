//! `beit pretrain` end to end on a small slice of the committed digits with the fixture DALL-E encoder: the
//! checkpoint loads as BeitForMaskedImageModeling, `beit train` fine-tunes from it, a SIGKILLed run resumes to
//! the same result, and bad inputs give clear errors.

mod common;

use std::path::{Path, PathBuf};

use beit::{load_pretrained, AnyBeitModel, LoadOptions};
use common::beit;

fn tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures/tokenizer/encoder.safetensors")
}

fn temp(tag: &str) -> PathBuf {
    common::temp_dir("pretrain", tag)
}

/// An image folder with the first `per_class` digits of `classes`.
fn slice(tag: &str, classes: &[&str], per_class: usize) -> PathBuf {
    common::digits_slice(&temp(tag), classes, per_class)
}

/// A tiny model: 16x16 images in 4x4 patches (a 4x4 grid, so the tokenizer sees 32x32); no vocab_size, so the
/// tokenizer's 64 is used.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("config.json");
    std::fs::write(
        &p,
        format!(
            r#"{{"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                "image_size": 16, "patch_size": 4, "hidden_dropout_prob": 0.1{extra}}}"#
        ),
    )
    .unwrap();
    p
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn pretrain_args(data: &Path, cfg: &Path, out: &Path, epochs: &str) -> Vec<String> {
    args(&[
        "pretrain", "--data", data.to_str().unwrap(), "--tokenizer", tokenizer().to_str().unwrap(), "--config",
        cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--epochs", epochs, "--batch-size", "8", "--lr", "2e-3",
        "--warmup-epochs", "1", "--crop-scale-min", "0.6", "--no-hflip", "--seed", "3",
    ])
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn pretrains_fine_tunes_and_resumes_after_sigkill() {
    let data = slice("run", &["0", "1", "7"], 24);
    let root = data.parent().unwrap().to_path_buf();
    let cfg = config(&root, "");
    let whole = root.join("whole");
    let (code, err) = beit(&pretrain_args(&data, &cfg, &whole, "5"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("4x4 patches") && err.contains("6 masked") && err.contains("tokenizer view 32x32"), "{err}");
    for f in ["last/model.safetensors", "last/config.json", "last/optimizer.safetensors", "last/trainer_state.json",
              "best/model.safetensors", "best/config.json", "model.safetensors", "config.json",
              "preprocessor_config.json", "pretrain.png"] {
        assert!(whole.join(f).is_file(), "{f}");
    }
    let history = metrics(&whole);
    assert_eq!(history.len(), 5);
    for m in &history {
        let acc = m["masked_accuracy"].as_f64().unwrap();
        let chance = m["majority_token_share"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc) && (0.0..=1.0).contains(&chance) && m["loss"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["masked_tokens"].as_u64().unwrap() > 0);
    }
    // The pre-training architecture, in transformers' names.
    let c = json(&whole.join("last/config.json"));
    assert_eq!(c["architectures"], serde_json::json!(["BeitForMaskedImageModeling"]));
    assert_eq!(c["vocab_size"], 64);
    assert_eq!(c["use_mask_token"], true);
    assert_eq!(c["use_shared_relative_position_bias"], true);
    assert_eq!(c["use_relative_position_bias"], false);
    assert_eq!(c["drop_path_rate"], 0.1);
    // It loads as BeitForMaskedImageModeling with nothing missing or left over.
    for dir in ["last", "best", "."] {
        let p = load_pretrained(&whole.join(dir), &LoadOptions::default(), &candle_core::Device::Cpu).unwrap();
        assert!(matches!(p.model, AnyBeitModel::MaskedImageModeling(_)), "{dir}");
        assert!(p.report.newly_initialized.is_empty() && p.report.unused.is_empty(), "{dir}: {:?}", p.report);
    }

    // beit train fine-tunes from the final model and from best/.
    for (tag, model) in [("ft-final", whole.clone()), ("ft-best", whole.join("best"))] {
        let ft = root.join(tag);
        let (code, err) = beit(&args(&[
            "train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", ft.to_str().unwrap(),
            "--epochs", "1", "--batch-size", "8", "--val-split", "0.25", "--seed", "3",
        ]));
        assert_eq!(code, 0, "{tag}: {err}");
        let c = json(&ft.join("last/config.json"));
        assert_eq!(c["architectures"], serde_json::json!(["BeitForImageClassification"]), "{tag}");
        assert_eq!(c["id2label"]["2"], "7", "{tag}");
        assert!(metrics(&ft)[0]["top1"].as_f64().is_some(), "{tag}");
    }

    // The same run, killed with SIGKILL during epoch 3 or 4 and resumed: the same final metrics, bit for bit.
    let killed = root.join("killed");
    let (done, err) = common::kill_and_resume(&pretrain_args(&data, &cfg, &killed, "5"), &killed, 5);
    // A kill between writing last/ and metrics.jsonl leaves last/ one epoch ahead.
    let from = |k: usize| err.contains(&format!("resuming after epoch {k};")) || err.contains(&format!("resuming after epoch {k}\n"));
    assert!(from(done) || from(done + 1), "{err}");
    let resumed = metrics(&killed);
    assert_eq!(resumed.len(), 5);
    for (a, b) in resumed.iter().zip(&history) {
        for k in ["epoch", "loss", "masked_accuracy", "majority_token_share", "masked_tokens", "lr"] {
            assert_eq!(a[k], b[k], "{k}: resumed {a} vs uninterrupted {b}");
        }
    }
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    assert!(bytes(&killed.join("model.safetensors")) == bytes(&whole.join("model.safetensors")), "final weights differ");
}

#[test]
fn problems_are_clear() {
    let data = slice("bad", &["0", "1"], 4);
    let root = data.parent().unwrap().to_path_buf();
    let cfg = config(&root, "");
    let out = root.join("out");
    let with = |mut a: Vec<String>, extra: &[&str]| {
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // A missing tokenizer file.
    let mut a = pretrain_args(&data, &cfg, &out, "1");
    let i = a.iter().position(|s| s == "--tokenizer").unwrap();
    a[i + 1] = root.join("encoder.pkl").display().to_string();
    let (code, err) = beit(&a);
    assert_eq!(code, 1);
    assert!(err.contains("--tokenizer") && err.contains("encoder.pkl") && err.contains("no such file"), "{err}");

    // An empty data folder, and one that does not exist.
    let empty = root.join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    let (code, err) = beit(&pretrain_args(&empty, &cfg, &out, "1"));
    assert_eq!(code, 1);
    assert!(err.contains("no images found") && err.contains("empty"), "{err}");
    let (code, err) = beit(&pretrain_args(&root.join("nowhere"), &cfg, &out, "1"));
    assert_eq!(code, 1);
    assert!(err.contains("nowhere") && err.contains("not a directory"), "{err}");

    // A config whose vocabulary is not the tokenizer's.
    let wrong = root.join("vocab");
    std::fs::create_dir_all(&wrong).unwrap();
    let wrong = config(&wrong, r#", "vocab_size": 8192"#);
    let (code, err) = beit(&pretrain_args(&data, &wrong, &out, "1"));
    assert_eq!(code, 1);
    assert!(err.contains("vocab_size 8192") && err.contains("64 tokens"), "{err}");

    // An image size the patches do not tile.
    let (code, err) = beit(&with(pretrain_args(&data, &cfg, &out, "1"), &["--image-size", "18"]));
    assert_eq!(code, 1);
    assert!(err.contains("18 is not a multiple of patch_size 4"), "{err}");

    // Too many masked patches for the grid.
    let (code, err) = beit(&with(pretrain_args(&data, &cfg, &out, "1"), &["--num-masking-patches", "16"]));
    assert_eq!(code, 1);
    assert!(err.contains("--num-masking-patches") && err.contains("expected 1 to 15"), "{err}");

    // An unreadable image is skipped and reported; pre-training goes on.
    std::fs::write(data.join("1/broken.png"), b"not a png").unwrap();
    let (code, err) = beit(&pretrain_args(&data, &cfg, &out, "1"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipped") && err.contains("broken.png"), "{err}");
}

#[test]
fn val_split_leaves_out_exactly_beit_train_s_validation_images() {
    let data = slice("split", &["0", "1"], 10);
    let root = data.parent().unwrap().to_path_buf();
    let cfg = config(&root, "");
    let out = root.join("out");
    let mut a = pretrain_args(&data, &cfg, &out, "1");
    a.extend(args(&["--val-split", "0.2", "--split-seed", "5"]));
    let (code, err) = beit(&a);
    assert_eq!(code, 0, "{err}");
    // 2 of 10 per class held out.
    assert!(err.contains("16 images;"), "{err}");
    let pre = beit::train::pretrain::PretrainData::load(&data, Some(0.2), 5).unwrap();
    let folder = beit::train::data::ImageFolder::load(&data, Some(0.2), 5).unwrap();
    assert_eq!(pre.paths, folder.train.paths);
    assert!(folder.val.paths.iter().all(|p| !pre.paths.contains(p)));
    assert_eq!(folder.val.paths.len(), 4);
}
