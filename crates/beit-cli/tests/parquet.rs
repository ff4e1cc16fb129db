//! Hugging Face datasets stored as parquet (crates/beit/tests/fixtures/parquet, scripts/gen_parquet_fixtures.py)
//! through the CLI: `beit train --data DIR`, then `beit classify` and `beit embed` over the dataset's rows.

mod common;

use std::path::{Path, PathBuf};

use common::beit;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures/parquet")
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn trains_on_a_parquet_dataset_and_classifies_its_rows() {
    let dir = common::temp_dir("parquet", "train");
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
            "image_size": 8, "patch_size": 4, "use_relative_position_bias": true}"#,
    )
    .unwrap();
    let data = fixtures().join("classification");
    let out = dir.join("run");
    let (code, err) = beit(&args(&[
        "train",
        "--model",
        cfg.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "3",
    ]));
    assert_eq!(code, 0, "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
    // The classes are the dataset's ClassLabel names.
    let config = std::fs::read_to_string(out.join("best/config.json")).unwrap();
    assert!(config.contains("\"zero\"") && config.contains("\"two\""), "{config}");

    let model = out.join("best");
    // `beit eval` scores the dataset's validation split.
    let (code, err) = beit(&args(&["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    let run = |extra: &[&str]| {
        let mut a = args(&["classify", "--model", model.to_str().unwrap(), "--top-k", "1"]);
        a.extend(args(extra));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_beit")).args(&a).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success() && !err.contains("panicked"), "{err}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // Every row of every split, named by file and row.
    let stdout = run(&[data.to_str().unwrap()]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 18, "{stdout}");
    assert!(lines[0].contains("train-00000-of-00001.parquet row 0: "), "{stdout}");
    assert!(lines[17].contains("validation-00000-of-00001.parquet row 5: "), "{stdout}");
    // One file, mixed with an image file.
    let png = common::digits().join("0/0000.png");
    let stdout = run(&[fixtures().join("unnamed.parquet").to_str().unwrap(), png.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 7, "{stdout}");

    let npy = dir.join("emb.npy");
    let (code, err) = beit(&args(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--out",
        npy.to_str().unwrap(),
        fixtures().join("unnamed.parquet").to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("unnamed.parquet row 5"), "{err}");
    assert!(npy.is_file());
}

#[test]
fn parquet_dataset_errors_are_clear() {
    let dir = common::temp_dir("parquet", "errors");
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, r#"{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "image_size": 8, "patch_size": 4}"#).unwrap();
    let data = fixtures().join("bad_label");
    let (code, err) = beit(&args(&[
        "train",
        "--model",
        cfg.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.join("run").to_str().unwrap(),
        "--epochs",
        "1",
    ]));
    assert_ne!(code, 0);
    assert!(err.contains("row 1") && err.contains("label 5"), "{err}");
}
