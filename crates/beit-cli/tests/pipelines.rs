//! `beit classify | segment | embed | mim | preprocess | convert` end to end on the tiny fixture models and real
//! photographs, against transformers' pipelines (scripts/gen_e2e_fixtures.py).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use beit::npy::{read_npy, NpyData};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures")
}

fn image(name: &str) -> String {
    fixtures().join("processor/images").join(name).display().to_string()
}

fn model(name: &str) -> String {
    fixtures().join("model").join(name).display().to_string()
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beit-pipe-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn beit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_beit")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn f32s(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let a = read_npy(path).unwrap();
    match a.data {
        NpyData::F32(v) => (a.shape, v),
        other => panic!("{other:?}"),
    }
}

#[test]
fn classify_matches_the_transformers_pipeline() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("e2e/expected.json")).unwrap()).unwrap();
    let names = ["astronaut.png", "chelsea.png", "coffee_q90.jpg", "camera.png", "rgba.png"];
    let mut args = vec!["classify".to_string(), "--model".into(), model("cls_single"), "--top-k".into(), "3".into(), "--json".into()];
    args.extend(names.iter().map(|n| image(n)));
    let (code, out, err) = beit(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (i, name) in names.iter().enumerate() {
        let (g, e) = (&got[i], &expected["classify"][name]);
        assert_eq!(g.as_array().unwrap().len(), 3);
        for k in 0..3 {
            assert_eq!(g[k]["label"], e[k]["label"], "{name}");
            let d = (g[k]["score"].as_f64().unwrap() - e[k]["score"].as_f64().unwrap()).abs();
            assert!(d <= 1e-4, "{name}: score differs by {d}");
        }
    }
    // One image: just the list.
    let (code, out, _) = beit(&["classify", "--model", &model("cls_single"), &image("chelsea.png"), "--json"]);
    assert_eq!(code, 0);
    let one: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(one[0]["label"].is_string() && one.as_array().unwrap().len() == 5);
}

#[test]
fn segment_matches_post_processed_transformers_maps() {
    let out = temp("seg");
    let names = ["astronaut.png", "chelsea.png", "coffee_q90.jpg"];
    let mut args = vec!["segment".to_string(), "--model".into(), model("seg_uper_aux1"), "--out".into(), out.display().to_string()];
    args.extend(names.iter().map(|n| image(n)));
    let (code, _, err) = beit(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    for name in names {
        let stem = Path::new(name).file_stem().unwrap().to_str().unwrap();
        let got = image::open(out.join(format!("{stem}.png"))).unwrap().to_luma8();
        let want = image::open(fixtures().join(format!("e2e/seg_{stem}.png"))).unwrap().to_luma8();
        assert_eq!(got.dimensions(), want.dimensions(), "{name}: the map is at the image's own size");
        let same = got.pixels().zip(want.pixels()).filter(|(a, b)| a == b).count();
        let share = same as f64 / (got.width() * got.height()) as f64;
        assert!(share >= 0.999, "{name}: {:.4}% of pixels agree", share * 100.0);
        assert!(out.join(format!("{stem}_overlay.png")).is_file());
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(format!("{stem}.json"))).unwrap()).unwrap();
        let total: f64 = summary["classes"].as_array().unwrap().iter().map(|c| c["share"].as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}

/// `--mode slide`: the map is the argmax of mmseg's averaged window logits (scripts/gen_slide_fixtures.py), at
/// the image's own size and with mmseg's keep-ratio rescale first (`--scale`).
#[test]
fn segment_slide_is_the_argmax_of_mmseg_logits() {
    let img = fixtures().join("slide/image.png");
    for (case, scale) in [("crop32_stride16", None), ("scale48x34_crop32_stride16", Some(["48", "34"]))] {
        let out = temp(&format!("slide_{case}"));
        let args = ["segment", "--model", &model("seg_uper_aux1"), "--mode", "slide", "--crop", "32", "32", "--stride"];
        let mut args: Vec<&str> = args.to_vec();
        args.extend(["16", "16", img.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        if let Some(s) = &scale {
            args.extend(["--scale", s[0], s[1]]);
        }
        let (code, _, err) = beit(&args);
        assert_eq!(code, 0, "{err}");
        let got = image::open(out.join("image.png")).unwrap().to_luma8();
        let (shape, logits) = f32s(&fixtures().join(format!("slide/{case}.npy")));
        let (c, h, w) = (shape[0], shape[1], shape[2]);
        assert_eq!(got.dimensions(), (w as u32, h as u32));
        for (i, p) in got.pixels().enumerate() {
            let best = (0..c).fold(0, |b, k| if logits[k * h * w + i] > logits[b * h * w + i] { k } else { b });
            assert_eq!(p.0[0] as usize, best, "{case}: pixel {i}");
        }
    }
    let out = temp("slide_whole");
    let (code, _, err) = beit(&["segment", "--model", &model("seg_uper_aux1"), "--stride", "8", "8", img.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("--mode slide"), "{err}");
}

#[test]
fn embed_tokens_match_the_backbone() {
    let out = temp("embed").join("tokens.npy");
    let (code, _, err) =
        beit(&["embed", "--model", &model("mim"), &image("chelsea.png"), "--tokens", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (shape, got) = f32s(&out);
    let (wshape, want) = f32s(&fixtures().join("e2e/embed_tokens_chelsea.npy"));
    assert_eq!(shape, wshape);
    let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= 1e-4, "{err}");
    let pooled = out.with_file_name("pooled.safetensors");
    let (code, _, err) = beit(&["embed", "--model", &model("cls_single"), &image("chelsea.png"), &image("camera.png"), "--out", pooled.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let t = candle_core::safetensors::load(&pooled, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["embeddings"].dims(), &[2, 32]);
}

#[test]
fn preprocess_writes_what_transformers_produces() {
    let out = temp("pre").join("x.npy");
    let config = fixtures().join("processor/configs/imagenet_lanczos.json");
    let (code, _, err) = beit(&["preprocess", "--processor", config.to_str().unwrap(), &image("camera.png"), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (shape, got) = f32s(&out);
    let (wshape, want) = f32s(&fixtures().join("processor/pixel_values/imagenet_lanczos_camera.npy"));
    assert_eq!(shape, wshape);
    assert_eq!(got, want);
}

/// Files stored sideways with an EXIF orientation tag reach the processor and the model upright, as through
/// transformers' `load_image` (scripts/gen_exif_fixtures.py).
#[test]
fn oriented_images_are_loaded_upright() {
    let dir = temp("exif");
    let exif = fixtures().join("processor/exif");
    let config = exif.join("config.json");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exif.join("manifest.json")).unwrap()).unwrap();
    for name in ["jpeg_o6.jpg", "jpeg_o7.jpg", "png_o8.png", "webp_o6.webp"] {
        let case = manifest["cases"].as_array().unwrap().iter().find(|c| c["image"] == format!("exif/{name}")).unwrap();
        let out = dir.join(format!("{name}.npy"));
        let img = exif.join(name);
        let (code, _, err) = beit(&["preprocess", "--processor", config.to_str().unwrap(), img.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let (shape, got) = f32s(&out);
        let (wshape, want) = f32s(&fixtures().join("processor").join(case["pixel_values"].as_str().unwrap()));
        assert_eq!(shape, wshape, "{name}");
        assert!(got == want, "{name}: pixel values differ from transformers'");
    }
    // The upright file and the same picture stored sideways classify the same.
    let classify = |name: &str| {
        let (code, out, err) = beit(&["classify", "--model", &model("cls_single"), exif.join(name).to_str().unwrap(), "--json"]);
        assert_eq!(code, 0, "{err}");
        out
    };
    assert_eq!(classify("png_o1.png"), classify("png_o6.png"));
}

#[test]
fn mim_predicts_tokens_for_masked_patches() {
    let (code, out, err) = beit(&["mim", "--model", &model("mim"), &image("chelsea.png"), "--mask-ratio", "0.5", "--seed", "3", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["masked"].as_array().unwrap().len(), 8);
    assert!(v["tokens"].as_array().unwrap().iter().all(|t| t.as_u64().unwrap() < 64));
    // A classification checkpoint is not a MIM one.
    let (code, _, err) = beit(&["mim", "--model", &model("cls_single"), &image("chelsea.png")]);
    assert_eq!(code, 1);
    assert!(err.contains("BeitForImageClassification"), "{err}");
}

#[test]
fn a_bad_image_fails_alone() {
    let dir = temp("bad");
    let bytes = std::fs::read(image("chelsea.png")).unwrap();
    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let garbage = dir.join("garbage.jpg");
    std::fs::write(&garbage, b"definitely not a jpeg").unwrap();
    // A PNG whose header claims 50000 x 50000 pixels: refused before decoding.
    let huge = common::png_claiming(&bytes, 50000, 50000);
    let bomb = dir.join("bomb.png");
    std::fs::write(&bomb, &huge).unwrap();
    let empty = dir.join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let args = [
        "classify", "--model", &model("cls_single"), "--json", "--batch-size", "2",
        &image("astronaut.png"), truncated.to_str().unwrap(), garbage.to_str().unwrap(),
        bomb.to_str().unwrap(), empty.to_str().unwrap(), &image("chelsea.png"),
    ];
    let (code, out, err) = beit(&args);
    assert_eq!(code, 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "the two good images are answered");
    for f in ["truncated.png", "garbage.jpg", "bomb.png", "empty.png", "4 of 6 images failed"] {
        assert!(err.contains(f), "{f}: {err}");
    }
    assert!(err.contains("50000"), "{err}");
}

#[test]
fn convert_writes_safetensors_that_load_identically() {
    let out = temp("convert");
    let bin = fixtures().join("model/cls_single/pytorch_model.bin");
    let (code, _, err) = beit(&["convert", "--model", bin.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("model.safetensors").is_file() && out.join("preprocessor_config.json").is_file());
    let (_, a, _) = beit(&["classify", "--model", out.to_str().unwrap(), &image("chelsea.png"), "--json"]);
    let (_, b, _) = beit(&["classify", "--model", &model("cls_single"), &image("chelsea.png"), "--json"]);
    assert_eq!(a, b);
}
