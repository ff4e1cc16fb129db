//! `beit train` / `beit eval` end to end on a small slice of the committed digits: checkpoints, metrics, plots,
//! a SIGKILLed run resumed to the same result, and the dataset errors.

mod common;

use std::path::{Path, PathBuf};

use common::beit;

fn temp(tag: &str) -> PathBuf {
    common::temp_dir("train", tag)
}

/// An image folder with the first `per_class` digits of `classes`.
fn slice(tag: &str, classes: &[&str], per_class: usize) -> PathBuf {
    common::digits_slice(&temp(tag), classes, per_class)
}

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("config.json");
    std::fs::write(
        &p,
        r#"{"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
            "image_size": 8, "patch_size": 4, "use_relative_position_bias": true, "drop_path_rate": 0.1,
            "hidden_dropout_prob": 0.1}"#,
    )
    .unwrap();
    p
}

fn train_args(data: &Path, cfg: &Path, out: &Path, epochs: &str) -> Vec<String> {
    [
        "train", "--model", cfg.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--epochs", epochs, "--batch-size", "8", "--lr", "3e-3", "--layer-decay", "1.0", "--warmup-epochs", "1",
        "--val-split", "0.25", "--no-hflip", "--crop-scale-min", "0.6", "--seed", "7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn last_metrics(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn trains_writes_checkpoints_and_resumes_after_sigkill() {
    let data = slice("run", &["0", "1", "2"], 60);
    let cfg = config(data.parent().unwrap());
    let whole = data.parent().unwrap().join("whole");
    let (code, err) = beit(&train_args(&data, &cfg, &whole, "4"));
    assert_eq!(code, 0, "{err}");
    for f in ["best/model.safetensors", "best/config.json", "best/preprocessor_config.json", "last/optimizer.safetensors",
              "last/trainer_state.json", "metrics.png"] {
        assert!(whole.join(f).is_file(), "{f}");
    }
    let m = last_metrics(&whole);
    assert_eq!(m["epoch"], 4);
    assert!(m["top1"].as_f64().unwrap() > 0.5, "{m}");

    // The same run, killed with SIGKILL during epoch 3 and resumed.
    let killed = data.parent().unwrap().join("killed");
    common::kill_and_resume(&train_args(&data, &cfg, &killed, "4"), &killed, 4);
    let resumed = last_metrics(&killed);
    assert_eq!(resumed["epoch"], 4);
    for k in ["train_loss", "val_loss", "top1", "top5"] {
        assert_eq!(resumed[k], m[k], "{k}: resumed {resumed} vs uninterrupted {m}");
    }

    // beit eval on the best checkpoint and the same held-out split.
    let (code, _) = beit(&[
        "eval".into(), "--model".into(), whole.join("best").display().to_string(), "--data".into(), data.display().to_string(),
        "--val-split".into(), "0.25".into(), "--seed".into(), "7".into(), "--plot".into(), whole.join("confusion.png").display().to_string(),
    ]);
    assert_eq!(code, 0);
    assert!(whole.join("confusion.png").is_file());
}

#[test]
fn dataset_problems_are_clear() {
    let data = slice("bad", &["0", "1"], 6);
    let cfg = config(data.parent().unwrap());
    let out = data.parent().unwrap().join("out");
    // An unreadable image is skipped and reported; training goes on.
    std::fs::write(data.join("1/broken.png"), b"not a png").unwrap();
    let (code, err) = beit(&train_args(&data, &cfg, &out, "1"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipped") && err.contains("broken.png"), "{err}");
    // An empty class is an error.
    std::fs::create_dir_all(data.join("2")).unwrap();
    let (code, err) = beit(&train_args(&data, &cfg, &out, "1"));
    assert_eq!(code, 1);
    assert!(err.contains("\"2\" has no images"), "{err}");
    // A single class is an error.
    let one = slice("one", &["0"], 5);
    let (code, err) = beit(&train_args(&one, &cfg, &out, "1"));
    assert_eq!(code, 1);
    assert!(err.contains("at least 2"), "{err}");
}

#[test]
fn fine_tuning_a_mim_checkpoint_unshares_its_relative_bias() {
    let data = slice("ft", &["0", "1"], 8);
    let mim = Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures/model/mim");
    let out = data.parent().unwrap().join("out");
    // lr 0: the weights stay as loaded, so the copies can be compared with the shared table.
    let args: Vec<String> = [
        "train", "--model", mim.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--epochs", "1", "--batch-size", "4", "--lr", "0", "--val-split", "0.25",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (code, err) = beit(&args);
    assert_eq!(code, 0, "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("last/config.json")).unwrap()).unwrap();
    assert_eq!(config["use_shared_relative_position_bias"], false);
    assert_eq!(config["use_relative_position_bias"], true);
    assert_eq!(config["id2label"]["1"], "1");
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let before = load(&mim.join("model.safetensors"));
    let after = load(&out.join("last/model.safetensors"));
    let shared = before["beit.encoder.relative_position_bias.relative_position_bias_table"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in 0..2 {
        let t = &after[&format!("beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table")];
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), shared, "layer {i}");
    }
    assert_eq!(after["classifier.weight"].dims(), &[2, 32], "a fresh two-class head");
}

/// `--precision bf16`: learns as f32 does, and a SIGKILLed run resumed without the flag keeps its own precision and
/// ends bit for bit where the uninterrupted run did.
#[test]
fn bf16_training_learns_and_resumes_bit_for_bit() {
    let data = slice("bf16", &["0", "1", "2"], 60);
    let cfg = config(data.parent().unwrap());
    let with_bf16 = |out: &Path| {
        let mut a = train_args(&data, &cfg, out, "4");
        a.extend(["--precision".to_string(), "bf16".to_string()]);
        a
    };
    let whole = data.parent().unwrap().join("whole");
    let (code, err) = beit(&with_bf16(&whole));
    assert_eq!(code, 0, "{err}");
    let m = last_metrics(&whole);
    assert!(m["top1"].as_f64().unwrap() > 0.5, "{m}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("last/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["options"]["precision"], "bf16", "{state}");

    let killed = data.parent().unwrap().join("killed");
    let done = common::run_and_kill_after_epochs(&with_bf16(&killed), &killed, 2);
    assert!(done < 4, "the run finished before it could be killed");
    let mut resume = train_args(&data, &cfg, &killed, "4");
    resume.push("--resume".into());
    let (code, err) = beit(&resume);
    assert_eq!(code, 0, "{err}");
    let resumed = last_metrics(&killed);
    for k in ["train_loss", "val_loss", "top1", "top5"] {
        assert_eq!(resumed[k], m[k], "{k}: resumed {resumed} vs uninterrupted {m}");
    }
}
