//! `beit train --task semantic-segmentation` / `beit eval --task semantic-segmentation` end to end on a tiny
//! generated ADE20K-layout folder: checkpoints and metrics, eval agreeing with the last epoch, a stopped run
//! resumed to the same numbers, and the dataset errors naming their file.

mod common;

use std::path::{Path, PathBuf};

use common::beit;
use image::{GrayImage, Luma, Rgb, RgbImage};

/// Three vertical bands (classes 0, 1, 2), each with its own colour and a little texture.
fn pair(w: u32, h: u32, shift: u32) -> (RgbImage, GrayImage) {
    let class = |x: u32| (((x + shift) * 3 / w) % 3) as u8;
    let img = RgbImage::from_fn(w, h, |x, y| {
        let c = class(x);
        let t = ((x * 7 + y * 13) % 23) as u8;
        match c {
            0 => Rgb([200 + t, 30, 40]),
            1 => Rgb([40, 180 + t, 50]),
            _ => Rgb([30, 60, 190 + t]),
        }
    });
    let mask = GrayImage::from_fn(w, h, |x, _| Luma([class(x)]));
    (img, mask)
}

/// `root`/data with 6 training and 3 validation pairs of assorted sizes, and labels.txt.
fn dataset(root: &Path) -> PathBuf {
    let d = root.join("data");
    for (split, n) in [("training", 6u32), ("validation", 3)] {
        std::fs::create_dir_all(d.join("images").join(split)).unwrap();
        std::fs::create_dir_all(d.join("annotations").join(split)).unwrap();
        for i in 0..n {
            let (img, mask) = pair(18 + 2 * i, 14 + i, i);
            img.save(d.join(format!("images/{split}/{split}_{i}.png"))).unwrap();
            mask.save(d.join(format!("annotations/{split}/{split}_{i}.png"))).unwrap();
        }
    }
    std::fs::write(d.join("labels.txt"), "red\ngreen\nblue\n").unwrap();
    d
}

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("config.json");
    std::fs::write(
        &p,
        r#"{"hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 32,
            "image_size": 16, "patch_size": 4, "use_relative_position_bias": true, "pool_scales": [1, 2],
            "auxiliary_channels": 8}"#,
    )
    .unwrap();
    p
}

fn args(data: &Path, cfg: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--task",
        "semantic-segmentation",
        "--model",
        cfg.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--lr",
        "2e-3",
        "--warmup-epochs",
        "0.5",
        "--seed",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// [`args`] for a run of one epoch.
/// `a` with its `--epochs` value set to `n`.
fn with_epochs(mut a: Vec<String>, n: &str) -> Vec<String> {
    let epochs = a.iter().position(|s| s == "--epochs").unwrap() + 1;
    a[epochs] = n.into();
    a
}

fn one_epoch(data: &Path, cfg: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    with_epochs(args(data, cfg, out, extra), "1")
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `beit eval --task semantic-segmentation` of `model` on `data` (with `extra`), its JSON numbers written to `json`;
/// returns them and what it printed.
fn eval_printed(model: &Path, data: &Path, json: &Path, extra: &[&str]) -> (serde_json::Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["eval", "--task", "semantic-segmentation", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--json")
        .arg(json)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (json_file(json), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`eval_printed`]'s numbers.
fn eval(model: &Path, data: &Path, json: &Path, extra: &[&str]) -> serde_json::Value {
    eval_printed(model, data, json, extra).0
}

const FIELDS: [&str; 6] = ["train_loss", "val_loss", "mean_iou", "mean_accuracy", "overall_accuracy", "lr"];

#[test]
fn trains_evaluates_and_resumes_bit_for_bit() {
    let root = common::temp_dir("segtrain", "run");
    let data = dataset(&root);
    let cfg = config(&root);
    let whole = root.join("whole");
    let (code, err) = beit(&args(&data, &cfg, &whole, &[]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("3 classes, 6 training and 3 validation images") && err.contains("mIoU"), "{err}");
    for f in [
        "best/model.safetensors",
        "best/config.json",
        "last/optimizer.safetensors",
        "last/trainer_state.json",
        "metrics.png",
    ] {
        assert!(whole.join(f).is_file(), "{f}");
    }
    let m = metrics(&whole);
    assert_eq!(m.len(), 3);
    let last = &m[2];
    assert!(last["mean_iou"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{last}");
    assert!(last["train_loss"].as_f64().unwrap().is_finite());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("last/config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BeitForSemanticSegmentation");
    assert_eq!(config["id2label"]["2"], "blue");
    assert_eq!(json_file(&whole.join("last/preprocessor_config.json"))["do_reduce_labels"], false);

    // beit eval on the last checkpoint: the last epoch's numbers, to the last digit.
    let (e, stdout) = eval_printed(&whole.join("last"), &data, &root.join("eval.json"), &[]);
    assert!(stdout.contains("green") && stdout.contains("mIoU"), "{stdout}");
    for k in ["mean_iou", "mean_accuracy", "overall_accuracy"] {
        assert_eq!(e[k], last[k], "{k}: eval {e} vs metrics.jsonl {last}");
    }
    assert_eq!(e["loss"], last["val_loss"]);
    assert_eq!(e["per_category_iou"].as_array().unwrap().len(), 3);
    assert_eq!(e["count"], 3);

    // The same run stopped after its first epoch and resumed: the same numbers every epoch.
    let stopped = root.join("stopped");
    let (code, err) = beit(&args(&data, &cfg, &stopped, &["--stop-after", "1"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(metrics(&stopped).len(), 1);
    let (code, err) = beit(&args(&data, &cfg, &stopped, &["--resume"]));
    assert_eq!(code, 0, "{err}");
    let resumed = metrics(&stopped);
    assert_eq!(resumed.len(), 3);
    for (a, b) in resumed.iter().zip(&m) {
        for k in FIELDS {
            assert_eq!(a[k], b[k], "{k}: resumed {a} vs uninterrupted {b}");
        }
    }
}

#[test]
fn dataset_errors_name_the_file() {
    let root = common::temp_dir("segtrain", "bad");
    let data = dataset(&root);
    let cfg = config(&root);
    let out = root.join("out");
    let mask = |name: &str| data.join(format!("annotations/training/{name}.png"));

    // A class id the model does not have (labels.txt names 3 classes).
    GrayImage::from_pixel(18, 14, Luma([7])).save(mask("training_0")).unwrap();
    let (code, err) = beit(&args(&data, &cfg, &out, &[]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("training_0.png") && err.contains("class id 7"), "{err}");

    // A mask whose size differs from its image's.
    GrayImage::from_pixel(5, 5, Luma([1])).save(mask("training_0")).unwrap();
    let (code, err) = beit(&args(&data, &cfg, &out, &[]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("training_0.png") && err.contains("mask is 5x5"), "{err}");

    // A colour mask.
    RgbImage::new(18, 14).save(mask("training_0")).unwrap();
    let (code, err) = beit(&args(&data, &cfg, &out, &[]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("training_0.png") && err.contains("one channel of class ids"), "{err}");

    // An image without a mask.
    std::fs::remove_file(mask("training_0")).unwrap();
    let (code, err) = beit(&args(&data, &cfg, &out, &[]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("training_0.png") && err.contains("no mask"), "{err}");
    assert!(!out.join("metrics.jsonl").exists(), "nothing trains before the data is checked");
}

/// The same on a Hugging Face dataset stored as parquet (scripts/gen_parquet_fixtures.py's segmentation_train:
/// data/train-* and data/validation-*, class names in id2label.json): training, and eval agreeing with it.
#[test]
fn trains_and_evaluates_on_a_parquet_dataset() {
    let root = common::temp_dir("segtrain", "parquet");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures/parquet/segmentation_train");
    let cfg = config(&root);
    let out = root.join("out");
    let (code, err) = beit(&with_epochs(args(&data, &cfg, &out, &[]), "2"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("3 classes, 6 training and 3 validation images"), "{err}");
    let last = metrics(&out).pop().unwrap();
    let e = eval(&out.join("last"), &data, &root.join("eval.json"), &[]);
    assert_eq!(e["mean_iou"], last["mean_iou"], "eval {e} vs metrics.jsonl {last}");
    assert_eq!(e["count"], 3);
}

/// BEiT's ADE20K recipe fine-tunes a 224 checkpoint at 640: --image-size on a checkpoint resizes its position
/// tables once (a shared relative bias and absolute position embeddings here, 4x4 -> 6x6 patches), and the run's
/// checkpoint is saved at the new size, which `beit eval` then reads back to the run's own numbers.
#[test]
fn a_checkpoint_trains_at_another_image_size() {
    let root = common::temp_dir("segtrain", "resize");
    let data = dataset(&root);
    let cfg = root.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 32,
            "image_size": 16, "patch_size": 4, "use_shared_relative_position_bias": true,
            "use_absolute_position_embeddings": true, "pool_scales": [1, 2], "auxiliary_channels": 8}"#,
    )
    .unwrap();
    let base = root.join("base");
    let (code, err) = beit(&one_epoch(&data, &cfg, &base, &[]));
    assert_eq!(code, 0, "{err}");
    let checkpoint = base.join("last");
    assert_eq!(json_file(&checkpoint.join("config.json"))["image_size"], 16);

    let tuned = root.join("tuned");
    let (code, err) = beit(&one_epoch(&data, &checkpoint, &tuned, &["--image-size", "24"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("crops 24x24"), "{err}");
    let last = tuned.join("last");
    let config = json_file(&last.join("config.json"));
    assert_eq!(config["image_size"], 24);
    assert_eq!(json_file(&last.join("preprocessor_config.json"))["size"]["height"], 24);
    // The shared table was resized, then copied into every layer.
    assert_eq!(config["use_shared_relative_position_bias"], false);
    let tensors =
        beit::checkpoint::read_safetensors(&last.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let shape = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.dims().to_vec());
    assert_eq!(shape("beit.embeddings.position_embeddings"), Some(vec![1, 6 * 6 + 1, 16]));
    for i in 0..4 {
        let table =
            format!("beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table");
        assert_eq!(shape(&table), Some(vec![11 * 11 + 3, 2]), "{table}");
    }
    assert_eq!(shape("beit.encoder.relative_position_bias.relative_position_bias_table"), None);
    let m = metrics(&tuned).pop().unwrap();
    let e = eval(&last, &data, &root.join("eval.json"), &[]);
    for k in ["mean_iou", "mean_accuracy", "overall_accuracy"] {
        assert_eq!(e[k], m[k], "{k}: eval {e} vs metrics.jsonl {m}");
    }

    // The patch embedding cannot be resized: another patch size is refused, naming the field.
    let (code, err) = beit(&one_epoch(&data, &checkpoint, &root.join("patch"), &["--patch-size", "8"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("patch_size") && err.contains("4x4"), "{err}");
}

/// A run with --reduce-labels saves do_reduce_labels, and `beit eval` applies it without the flag, as
/// BeitImageProcessor.from_pretrained would; the flag still turns it on for a model whose config lacks it.
#[test]
fn reduce_labels_is_saved_and_evaluation_applies_it() {
    let root = common::temp_dir("segtrain", "reduce");
    let data = dataset(&root);
    let cfg = config(&root);
    let out = root.join("out");
    let (code, err) = beit(&one_epoch(&data, &cfg, &out, &["--reduce-labels"]));
    assert_eq!(code, 0, "{err}");
    let last = out.join("last");
    assert_eq!(json_file(&last.join("preprocessor_config.json"))["do_reduce_labels"], true);
    assert_eq!(json_file(&out.join("best/preprocessor_config.json"))["do_reduce_labels"], true);
    let m = metrics(&out).pop().unwrap();
    let same = |e: &serde_json::Value| ["mean_iou", "mean_accuracy", "overall_accuracy"].iter().all(|k| e[*k] == m[*k]);
    let e = eval(&last, &data, &root.join("eval.json"), &[]);
    assert!(same(&e), "eval {e} vs metrics.jsonl {m}");

    // The same model without the key: unreduced masks give other numbers, unless --reduce-labels is given.
    let bare = root.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(last.join(f), bare.join(f)).unwrap();
    }
    let mut p = json_file(&bare.join("preprocessor_config.json"));
    p.as_object_mut().unwrap().remove("do_reduce_labels");
    std::fs::write(bare.join("preprocessor_config.json"), p.to_string()).unwrap();
    let e = eval(&bare, &data, &root.join("bare.json"), &[]);
    assert!(!same(&e), "eval without reduce_labels {e} vs metrics.jsonl {m}");
    let e = eval(&bare, &data, &root.join("flag.json"), &["--reduce-labels"]);
    assert!(same(&e), "eval --reduce-labels {e} vs metrics.jsonl {m}");
}
