//! `beit bench` on a tiny config: the JSON report has every field, and bad arguments fail with a clear message.
//! Nothing here asserts a speed (CI machines vary); only that the numbers exist and are sane.

use std::path::PathBuf;
use std::process::{Command, Output};

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beit-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 2-layer, 32-wide classifier on 32x32 images: builds and runs in milliseconds.
fn tiny_config(tag: &str) -> PathBuf {
    let path = temp(tag).join("config.json");
    let config = serde_json::json!({
        "model_type": "beit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "image_size": 32, "patch_size": 8, "use_relative_position_bias": true,
        "use_mean_pooling": true, "architectures": ["BeitForImageClassification"],
        "id2label": {"0": "a", "1": "b", "2": "c"},
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn beit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beit")).args(args).output().unwrap()
}

#[test]
fn json_report_has_every_field() {
    let config = tiny_config("json");
    let out = beit(&[
        "bench",
        "--config",
        config.to_str().unwrap(),
        "--batch-size",
        "2",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "beit bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    for field in [
        "images_per_s",
        "images_per_s_min",
        "images_per_s_max",
        "ms_per_batch",
        "load_s",
        "gflop_per_image",
        "ceiling_share",
    ] {
        let x = v[field].as_f64().unwrap_or_else(|| panic!("{field} is not a number: {v}"));
        assert!(x.is_finite() && x >= 0.0, "{field} = {x}");
    }
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["images_per_s_min"].as_f64().unwrap() <= v["images_per_s"].as_f64().unwrap());
    assert!(v["images_per_s"].as_f64().unwrap() <= v["images_per_s_max"].as_f64().unwrap());
    assert_eq!(v["batch_size"], 2);
    assert_eq!(v["image_size"], 32);
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["path"], "fused");
    assert_eq!(v["threads"], 1);
    // VmHWM exists on Linux; elsewhere the field is null.
    if cfg!(target_os = "linux") {
        assert!(v["peak_rss_mb"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    } else {
        assert!(v.get("peak_rss_mb").is_some());
    }
    // 2 layers x (2*17*(4*32^2 + 2*32*37) + 4*17^2*32) + 2*16*(3*64)*32 + 2*32*3 FLOP.
    let expected = (2.0 * (2.0 * 17.0 * (4.0 * 1024.0 + 2.0 * 32.0 * 37.0) + 4.0 * 289.0 * 32.0)
        + 2.0 * 16.0 * 192.0 * 32.0
        + 2.0 * 32.0 * 3.0)
        / 1e9;
    let g = v["gflop_per_image"].as_f64().unwrap();
    assert!((g - expected).abs() < 1e-12, "gflop_per_image {g}, expected {expected}");
}

#[test]
fn text_report_and_other_image_size() {
    let config = tiny_config("text");
    let out =
        beit(&["bench", "--config", config.to_str().unwrap(), "--image-size", "48", "--runs", "1", "--warmup", "0"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("images/s") && stdout.contains("48x48"), "{stdout}");
}

#[test]
fn bad_arguments_fail_clearly() {
    let cases: [(&[&str], i32, &str); 6] = [
        (&["bench", "--config", "huge"], 1, "unknown preset \"huge\""),
        (&["bench", "--config", "missing/config.json"], 1, "is not a file"),
        (&["bench", "--config", "tiny", "--batch-size", "0"], 2, "--batch-size"),
        (&["bench", "--config", "tiny", "--runs", "0"], 2, "must be at least 1"),
        (&["bench", "--config", "tiny", "--dtype", "f16"], 2, "--dtype"),
        (&["bench", "--batch-size", "1"], 2, "--model"),
    ];
    for (args, code, needle) in cases {
        let out = beit(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn int8_runs_or_says_it_is_not_available() {
    let config = tiny_config("int8");
    let out = beit(&["bench", "--config", config.to_str().unwrap(), "--dtype", "int8", "--runs", "1", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        assert_eq!(v["dtype"], "int8");
        assert!(v["images_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    } else {
        // Before the model has an int8 path, the one clear error, not a panic.
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("int8 is not available yet"), "{stderr}");
    }
}

/// `--generic`: the candle op-by-op path the fused encoder is compared with.
#[test]
fn generic_path_runs() {
    let config = tiny_config("generic");
    let out = beit(&["bench", "--config", config.to_str().unwrap(), "--generic", "--runs", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["path"], "generic");
    assert!(v["images_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
}

#[test]
fn unknown_architecture_names_the_choices() {
    let config = tiny_config("arch");
    let out = beit(&["bench", "--config", config.to_str().unwrap(), "--architecture", "BeitForNothing"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("BeitForNothing") && stderr.contains("BeitForImageClassification"), "{stderr}");
}

/// `--files`: the front end alone and the whole path over image files, beside the model's own speed.
#[test]
fn files_time_the_front_end_and_the_whole_path() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let model = format!("{root}/models/beit-digits");
    let images = format!("{root}/data/digits/3");
    let out = beit(&[
        "bench",
        "--model",
        &model,
        "--batch-size",
        "4",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--files",
        &images,
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let f = &v["files"];
    assert_eq!(f["images"], 183, "{v}");
    for field in ["decode_per_core_images_per_s", "decode_prepare_per_core_images_per_s", "whole_path_images_per_s"] {
        assert!(f[field].as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "{field}: {v}");
    }
    // --files needs a checkpoint (its image processor), and names what it could not read.
    let out = beit(&["bench", "--config", "tiny", "--files", &images]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--files needs --model"));
    let out = beit(&["bench", "--model", &model, "--runs", "1", "--warmup", "0", "--files", "/nonexistent-dir"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-dir"));
}
