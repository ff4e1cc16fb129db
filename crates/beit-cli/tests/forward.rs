//! `beit forward` end to end: outputs match the fixtures, and bad input gives exit code 1 with a message that
//! names the file and the problem (never a panic).

use std::path::{Path, PathBuf};
use std::process::Command;

use beit::npy::{write_npy_f32, write_npy_i64};
use candle_core::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures/model").join(name)
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beit-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of a fixture model directory that a test may damage.
fn copy_model(name: &str, tag: &str) -> PathBuf {
    let dst = temp_dir(tag).join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "pytorch_model.bin"] {
        let src = fixture(name).join(f);
        if src.exists() {
            std::fs::copy(src, dst.join(f)).unwrap();
        }
    }
    dst
}

fn beit(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_beit")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn forward(model: &Path, pixels: &Path, extra: &[&str], out: &Path) -> (i32, String) {
    let mut args = vec!["forward", "--model", model.to_str().unwrap(), "--pixel-values", pixels.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    beit(&args)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn load(p: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

#[test]
fn forward_writes_every_output_under_transformers_names() {
    let dir = temp_dir("ok");
    for (case, extra) in [
        ("cls_single", vec!["--output-hidden-states", "--output-attentions", "--labels"]),
        ("mim", vec!["--output-hidden-states", "--output-attentions", "--labels"]),
    ] {
        let m = fixture(case);
        let out = dir.join(format!("{case}.safetensors"));
        let labels = m.join("labels.npy");
        let mut extra: Vec<&str> = extra;
        extra.push(labels.to_str().unwrap());
        let mask = m.join("bool_masked_pos.npy");
        if mask.exists() {
            extra.extend_from_slice(&["--bool-masked-pos", mask.to_str().unwrap()]);
        }
        let (code, err) = forward(&m, &m.join("pixel_values.npy"), &extra, &out);
        assert_eq!(code, 0, "{err}");
        let got = load(&out);
        let want = load(&m.join("outputs.safetensors"));
        let mut names: Vec<_> = got.keys().cloned().collect();
        let mut want_names: Vec<_> = want.keys().cloned().collect();
        names.sort();
        want_names.sort();
        assert_eq!(names, want_names);
        for (k, v) in &want {
            assert!(max_abs_diff(&got[k], v) <= 1e-4, "{case}: {k}");
        }
    }
    // --head BeitModel runs the backbone of a classification checkpoint.
    let m = fixture("cls_single");
    let out = dir.join("base.safetensors");
    let (code, err) = forward(&m, &m.join("pixel_values.npy"), &["--head", "BeitModel"], &out);
    assert_eq!(code, 0, "{err}");
    assert!(load(&out).contains_key("pooler_output"));
}

/// Exit code 1 and a message containing every `needle`.
fn assert_fails(result: (i32, String), needles: &[&str]) {
    let (code, err) = result;
    assert_eq!(code, 1, "expected exit 1, got {code}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "message lacks {n:?}: {err}");
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = temp_dir("bad");
    let out = dir.join("out.safetensors");
    let good = fixture("mim");
    let pixels = good.join("pixel_values.npy");

    // Truncated and corrupted safetensors.
    let m = copy_model("mim", "trunc");
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(forward(&m, &pixels, &["--weights-format", "safetensors"], &out), &["model.safetensors"]);
    let mut corrupt = bytes.clone();
    for b in corrupt.iter_mut().skip(8).take(40) {
        *b = b'#';
    }
    std::fs::write(m.join("model.safetensors"), &corrupt).unwrap();
    assert_fails(forward(&m, &pixels, &["--weights-format", "safetensors"], &out), &["model.safetensors", "safetensors"]);
    std::fs::write(m.join("model.safetensors"), b"").unwrap();
    assert_fails(forward(&m, &pixels, &["--weights-format", "safetensors"], &out), &["model.safetensors"]);

    // Truncated pytorch_model.bin.
    let bin = std::fs::read(m.join("pytorch_model.bin")).unwrap();
    std::fs::write(m.join("pytorch_model.bin"), &bin[..bin.len() / 3]).unwrap();
    assert_fails(forward(&m, &pixels, &["--weights-format", "bin"], &out), &["pytorch_model.bin"]);

    // No weights at all.
    let m = copy_model("mim", "noweights");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    std::fs::remove_file(m.join("pytorch_model.bin")).unwrap();
    assert_fails(forward(&m, &pixels, &[], &out), &["no weights found", "model.safetensors"]);

    // config.json with wrong types, unknown activation, impossible sizes, broken JSON.
    for (edit, field) in [
        (("\"hidden_size\": 32", "\"hidden_size\": \"32\""), "hidden_size"),
        (("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"gelu_magic\""), "hidden_act"),
        (("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"), "hidden_size"),
        (("\"use_mask_token\": true", "\"use_mask_token\": 1"), "use_mask_token"),
        (("{", "{{"), "config.json"),
    ] {
        let m = copy_model("mim", "config");
        let text = std::fs::read_to_string(m.join("config.json")).unwrap();
        assert!(text.contains(edit.0), "{}", edit.0);
        std::fs::write(m.join("config.json"), text.replacen(edit.0, edit.1, 1)).unwrap();
        assert_fails(forward(&m, &pixels, &[], &out), &["config.json", field]);
    }

    // A checkpoint tensor of the wrong shape, and a missing one.
    let m = copy_model("mim", "shape");
    let mut tensors = load(&m.join("model.safetensors"));
    tensors.insert("lm_head.weight".into(), Tensor::zeros((10, 32), DType::F32, &Device::Cpu).unwrap());
    tensors.remove("beit.encoder.layer.1.output.dense.weight");
    candle_core::safetensors::save(&tensors, m.join("model.safetensors")).unwrap();
    assert_fails(
        forward(&m, &pixels, &["--weights-format", "safetensors"], &out),
        &["beit.encoder.layer.1.output.dense.weight", "missing"],
    );
    tensors.insert("beit.encoder.layer.1.output.dense.weight".into(), Tensor::zeros((32, 37), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, m.join("model.safetensors")).unwrap();
    assert_fails(
        forward(&m, &pixels, &["--weights-format", "safetensors"], &out),
        &["lm_head.weight", "[10, 32]", "[64, 32]"],
    );

    // .npy inputs of the wrong rank, dtype, channel count, values; masks of the wrong length or values.
    let p = dir.join("rank3.npy");
    write_npy_f32(&p, &[3, 32, 32], &vec![0.0; 3 * 32 * 32]).unwrap();
    assert_fails(forward(&good, &p, &[], &out), &["rank3.npy", "4 dimensions"]);
    let p = dir.join("ints.npy");
    write_npy_i64(&p, &[1, 3, 32, 32], &vec![0; 3 * 32 * 32]).unwrap();
    assert_fails(forward(&good, &p, &[], &out), &["ints.npy", "float"]);
    let p = dir.join("channels.npy");
    write_npy_f32(&p, &[1, 1, 32, 32], &vec![0.0; 32 * 32]).unwrap();
    assert_fails(forward(&good, &p, &[], &out), &["channels.npy", "num_channels"]);
    let p = dir.join("nan.npy");
    let mut v = vec![0.0f32; 3 * 32 * 32];
    v[5] = f32::NAN;
    write_npy_f32(&p, &[1, 3, 32, 32], &v).unwrap();
    assert_fails(forward(&good, &p, &[], &out), &["nan.npy", "not finite"]);
    let p = dir.join("garbage.npy");
    std::fs::write(&p, b"not numpy at all").unwrap();
    assert_fails(forward(&good, &p, &[], &out), &["garbage.npy"]);
    let mask = dir.join("mask.npy");
    write_npy_i64(&mask, &[2, 15], &vec![0; 30]).unwrap();
    assert_fails(forward(&good, &pixels, &["--bool-masked-pos", mask.to_str().unwrap()], &out), &["mask.npy", "(2, 16)"]);
    write_npy_i64(&mask, &[2, 16], &vec![3; 32]).unwrap();
    assert_fails(forward(&good, &pixels, &["--bool-masked-pos", mask.to_str().unwrap()], &out), &["mask.npy", "0 or 1"]);
    // A mask for a model without a mask token.
    write_npy_i64(&mask, &[3, 16], &vec![0; 48]).unwrap();
    let cls = fixture("cls_single");
    assert_fails(
        forward(&cls, &cls.join("pixel_values.npy"), &["--bool-masked-pos", mask.to_str().unwrap()], &out),
        &["mask token"],
    );
    // Missing files and a model path that is not a directory.
    assert_fails(forward(&good, &dir.join("nope.npy"), &[], &out), &["nope.npy"]);
    assert_fails(forward(&dir.join("nomodel"), &pixels, &[], &out), &["nomodel"]);
    assert_fails(forward(&good, &pixels, &["--head", "BeitForMagic"], &out), &["BeitForMagic"]);
}
