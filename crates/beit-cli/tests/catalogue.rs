//! The bad-input catalogue (issue 10): every kind of broken file a user can hand `beit` gives exit code 1 and a
//! message naming the file and the problem; none panics, none runs away with memory or time. Cases already
//! covered by forward.rs (truncated/corrupted/empty model.safetensors, truncated pytorch_model.bin, config fields
//! of the wrong type, wrong tensor shape, missing tensor, NaN and wrong-rank .npy) and pipelines.rs (truncated,
//! empty, garbage and 50000x50000 PNG images) are not repeated here.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use beit::npy::write_npy_f32;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../beit/tests/fixtures")
}

fn model_fixture(name: &str) -> PathBuf {
    fixtures().join("model").join(name)
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beit-catalogue-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the `mim` fixture model (config.json only, no weights) for a test to fill.
fn model_dir(tag: &str) -> PathBuf {
    let d = temp(tag);
    std::fs::copy(model_fixture("mim").join("config.json"), d.join("config.json")).unwrap();
    d
}

/// Address-space cap for the child (via util-linux `prlimit`, when installed): far above what these tiny models
/// need, far below what the hostile headers claim (a 50000x50000 RGB image is 7.5 GB, the huge .npy 3.2 GB).
const AS_LIMIT: u64 = 2 << 30;

fn have_prlimit() -> bool {
    Command::new("prlimit").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Runs `beit args` (under the address-space cap when `bounded`) and checks the catalogue's contract: exit code 1,
/// no panic, every needle in stderr, answered within `secs` seconds. Returns stderr.
fn fails(args: &[&str], needles: &[&str], bounded: bool, secs: u64) -> String {
    let bin = env!("CARGO_BIN_EXE_beit");
    let mut cmd = if bounded && have_prlimit() {
        let mut c = Command::new("prlimit");
        c.arg(format!("--as={AS_LIMIT}")).arg("--").arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let start = Instant::now();
    let out = cmd.args(args).output().unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert_eq!(code, 1, "{args:?}: expected exit 1, got {code}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: message lacks {n:?}: {err}");
    }
    assert!(took < Duration::from_secs(secs), "{args:?}: took {took:?}");
    eprintln!("catalogue: {} -> {}", args.join(" "), err.trim());
    err
}

fn forward(model: &Path, extra: &[&str], needles: &[&str]) -> String {
    let out = model.join("out.safetensors");
    let pixels = model_fixture("mim").join("pixel_values.npy");
    let mut args = vec!["forward", "--model", model.to_str().unwrap(), "--pixel-values", pixels.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    fails(&args, needles, false, 20)
}

#[test]
fn broken_checkpoints() {
    let mim = model_fixture("mim");

    // pytorch_model.bin: empty, corrupted zip, corrupted pickle, a pickle calling os.system, a bare legacy pickle.
    let d = model_dir("bin");
    let bin = d.join("pytorch_model.bin");
    std::fs::write(&bin, b"").unwrap();
    forward(&d, &["--weights-format", "bin"], &["pytorch_model.bin", "empty"]);
    for (fixture, needle) in [
        ("corrupted.bin", "pytorch_model.bin"),
        ("corrupted_pickle.bin", "pytorch_model.bin"),
        ("malicious.bin", "system"),
        ("legacy.bin", "pytorch_model.bin"),
    ] {
        std::fs::copy(fixtures().join("pickle").join(fixture), &bin).unwrap();
        forward(&d, &["--weights-format", "bin"], &["pytorch_model.bin", needle]);
    }
    // Corrupted .bin: bytes flipped in the middle of the storage data (the zip CRC catches it).
    let mut bytes = std::fs::read(mim.join("pytorch_model.bin")).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5A;
    }
    std::fs::write(&bin, &bytes).unwrap();
    forward(&d, &["--weights-format", "bin"], &["pytorch_model.bin"]);

    // flax_model.msgpack: empty, truncated, corrupted, not msgpack at all.
    let d = model_dir("msgpack");
    let mp = d.join("flax_model.msgpack");
    let good = std::fs::read(fixtures().join("flax/cls_abspos_scale/flax_model.msgpack")).unwrap();
    std::fs::write(&mp, b"").unwrap();
    forward(&d, &["--weights-format", "msgpack"], &["flax_model.msgpack"]);
    std::fs::write(&mp, &good[..good.len() / 2]).unwrap();
    forward(&d, &["--weights-format", "msgpack"], &["flax_model.msgpack"]);
    let mut bad = good.clone();
    for b in &mut bad[..16] {
        *b = 0xC1; // the one byte msgpack never uses
    }
    std::fs::write(&mp, &bad).unwrap();
    forward(&d, &["--weights-format", "msgpack"], &["flax_model.msgpack"]);
    std::fs::write(&mp, b"{\"not\": \"msgpack\"}").unwrap();
    forward(&d, &["--weights-format", "msgpack"], &["flax_model.msgpack"]);

    // model.safetensors whose header length claims a terabyte, and one whose header is not JSON.
    let d = model_dir("st");
    let st = d.join("model.safetensors");
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&st, &b).unwrap();
    forward(&d, &[], &["model.safetensors", "safetensors"]);
    let mut b = 8u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"[1,2,3] ");
    std::fs::write(&st, &b).unwrap();
    forward(&d, &[], &["model.safetensors", "safetensors"]);

    // A tensor of a dtype beit cannot hold (int16). (Integer or half tensors of a supported dtype are cast to
    // float32 on load, as torch's `param.copy_` casts them in `load_state_dict`: not an error.)
    let name = "beit.encoder.layer.0.attention.output.dense.weight";
    let header = format!("{{\"{name}\":{{\"dtype\":\"I16\",\"shape\":[32,32],\"data_offsets\":[0,2048]}}}}");
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&[0; 2048]);
    std::fs::write(&st, &b).unwrap();
    forward(&d, &[], &["model.safetensors", name, "unsupported dtype"]);
    // A tensor whose data offsets do not match its dtype and shape.
    let header = format!("{{\"{name}\":{{\"dtype\":\"F32\",\"shape\":[32,32],\"data_offsets\":[0,2044]}}}}");
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&[0; 2044]);
    std::fs::write(&st, &b).unwrap();
    forward(&d, &[], &["model.safetensors"]);
    let mut b = std::fs::read(mim.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    b.truncate(8 + n + 10); // header intact, data cut short
    std::fs::write(&st, &b).unwrap();
    forward(&d, &[], &["model.safetensors"]);
}

#[test]
fn absurd_config_values() {
    for (edit, field) in [
        (("\"hidden_size\": 32", "\"hidden_size\": 0"), "hidden_size"),
        (("\"hidden_size\": 32", "\"hidden_size\": -32"), "hidden_size"),
        (("\"num_attention_heads\": 4", "\"num_attention_heads\": 0"), "num_attention_heads"),
        (("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000"), "num_hidden_layers"),
        (("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 2.5"), "num_hidden_layers"),
        (("\"patch_size\": 8", "\"patch_size\": 64"), "patch_size"),
        (("\"patch_size\": 8", "\"patch_size\": 0"), "patch_size"),
        (("\"image_size\": 32", "\"image_size\": 4000000000"), "image_size"),
        (("\"image_size\": 32", "\"image_size\": -1"), "image_size"),
        (("\"intermediate_size\": 37", "\"intermediate_size\": 1e300"), "intermediate_size"),
        (("\"layer_norm_eps\": 1e-12", "\"layer_norm_eps\": \"tiny\""), "layer_norm_eps"),
        (("\"num_channels\": 3", "\"num_channels\": 0"), "num_channels"),
    ] {
        let d = temp("config");
        let text = std::fs::read_to_string(model_fixture("mim").join("config.json")).unwrap();
        assert!(text.contains(edit.0), "{}", edit.0);
        std::fs::write(d.join("config.json"), text.replacen(edit.0, edit.1, 1)).unwrap();
        std::fs::copy(model_fixture("mim").join("model.safetensors"), d.join("model.safetensors")).unwrap();
        forward(&d, &[], &["config.json", field]);
    }
}


#[test]
fn broken_images() {
    let d = temp("img");
    let model = model_fixture("cls_single");
    let model = model.to_str().unwrap();
    let jpg = std::fs::read(fixtures().join("processor/images/chelsea_q90_444.jpg")).unwrap();
    let classify = |img: &Path, needles: &[&str], bounded: bool| {
        fails(&["classify", "--model", model, img.to_str().unwrap()], needles, bounded, 20)
    };

    // Truncated JPEG, and a JPEG with nothing after its SOI marker.
    let p = d.join("truncated.jpg");
    std::fs::write(&p, &jpg[..jpg.len() / 3]).unwrap();
    classify(&p, &["truncated.jpg"], false);
    let p = d.join("soi_only.jpg");
    std::fs::write(&p, [0xFF, 0xD8]).unwrap();
    classify(&p, &["soi_only.jpg"], false);
    // A truncated JPEG header (cut inside the frame header).
    let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline SOF0");
    let p = d.join("cut_header.jpg");
    std::fs::write(&p, &jpg[..sof + 5]).unwrap();
    classify(&p, &["cut_header.jpg"], false);

    // A JPEG whose frame header claims 50000 x 50000: refused from the header, before any allocation, within the
    // address-space cap.
    let mut huge = jpg.clone();
    huge[sof + 5..sof + 7].copy_from_slice(&50000u16.to_be_bytes());
    huge[sof + 7..sof + 9].copy_from_slice(&50000u16.to_be_bytes());
    let p = d.join("bomb.jpg");
    std::fs::write(&p, &huge).unwrap();
    classify(&p, &["bomb.jpg", "50000"], true);
    // The same PNG bomb as pipelines.rs, now under the address-space cap and through `preprocess`.
    let png = common::png_claiming(&std::fs::read(fixtures().join("processor/images/gray4.png")).unwrap(), 50000, 50000);
    let p = d.join("bomb.png");
    std::fs::write(&p, &png).unwrap();
    let out = d.join("pv.npy");
    let proc = model_fixture("cls_single").join("preprocessor_config.json");
    fails(
        &["preprocess", "--processor", proc.to_str().unwrap(), p.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &["bomb.png", "50000"],
        true,
        5,
    );
    // A PNG with its IHDR checksum broken, and an empty JPEG.
    let mut png = std::fs::read(fixtures().join("processor/images/gray4.png")).unwrap();
    png[29] ^= 0xFF;
    let p = d.join("bad_crc.png");
    std::fs::write(&p, &png).unwrap();
    classify(&p, &["bad_crc.png"], false);
    let p = d.join("empty.jpg");
    std::fs::write(&p, b"").unwrap();
    classify(&p, &["empty.jpg"], false);
}

/// A 1x1 image is a valid image: it is resized like any other, and classified (not an error, not a panic).
#[test]
fn a_one_pixel_image_is_classified() {
    let d = temp("onepx");
    let p = d.join("one.png");
    image::RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 10])).save(&p).unwrap();
    let model = model_fixture("cls_single");
    let out = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["classify", "--model", model.to_str().unwrap(), p.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("one.png"));
}

/// An .npy header followed by `body`.
fn npy(path: &Path, descr: &str, shape: &str, body: &[u8]) {
    npy_with_header(path, format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"), body);
}

/// An .npy file with this header dictionary, padded as numpy pads it, followed by `body`.
fn npy_with_header(path: &Path, mut header: String, body: &[u8]) {
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(body);
    std::fs::write(path, b).unwrap();
}

#[test]
fn broken_npy_inputs() {
    let d = temp("npy");
    let model = model_fixture("mim");
    let m = model.to_str().unwrap();
    let out = d.join("out.safetensors");
    let out = out.to_str().unwrap();
    let run = |p: &Path, needles: &[&str], bounded: bool| {
        fails(&["forward", "--model", m, "--pixel-values", p.to_str().unwrap(), "--out", out], needles, bounded, 20)
    };

    // +Inf and -Inf among the pixel values.
    for (name, x) in [("inf.npy", f32::INFINITY), ("neginf.npy", f32::NEG_INFINITY)] {
        let p = d.join(name);
        let mut v = vec![0.0f32; 2 * 3 * 32 * 32];
        v[100] = x;
        write_npy_f32(&p, &[2, 3, 32, 32], &v).unwrap();
        run(&p, &[name, "not finite"], false);
    }
    // Wrong ranks not in forward.rs: a scalar, rank 5.
    let p = d.join("scalar.npy");
    write_npy_f32(&p, &[], &[1.0]).unwrap();
    run(&p, &["scalar.npy", "4 dimensions"], false);
    let p = d.join("rank5.npy");
    write_npy_f32(&p, &[1, 1, 3, 32, 32], &vec![0.0; 3 * 32 * 32]).unwrap();
    run(&p, &["rank5.npy", "4 dimensions"], false);
    // An empty batch and a zero-sized image.
    let p = d.join("zero.npy");
    write_npy_f32(&p, &[0, 3, 32, 32], &[]).unwrap();
    run(&p, &["zero.npy", "empty dimension"], false);

    // Headers claiming huge arrays over a tiny body: refused before allocating, under the address-space cap.
    let p = d.join("huge.npy");
    npy(&p, "<f4", "(1, 3, 16384, 16384)", &[0; 16]); // 3.2 GB claimed: under the 4 GiB cap, over the body
    run(&p, &["huge.npy", "needs 3221225472"], true);
    let p = d.join("overflow.npy");
    npy(&p, "<f4", "(4294967296, 4294967296, 4294967296)", &[0; 16]);
    run(&p, &["overflow.npy"], true);
    let p = d.join("toolarge.npy");
    npy(&p, "<f8", "(1, 3, 65536, 65536)", &[0; 16]);
    run(&p, &["toolarge.npy", "too large"], true);
    // Empty, truncated header, unsupported dtype, Fortran order.
    let p = d.join("empty.npy");
    std::fs::write(&p, b"").unwrap();
    run(&p, &["empty.npy"], false);
    let p = d.join("cut.npy");
    std::fs::write(&p, b"\x93NUMPY\x01\x00\xff\x00{'descr'").unwrap();
    run(&p, &["cut.npy", "truncated"], false);
    let p = d.join("complex.npy");
    npy(&p, "<c8", "(1, 3, 32, 32)", &vec![0; 8 * 3 * 32 * 32]);
    run(&p, &["complex.npy", "dtype"], false);
    let p = d.join("fortran.npy");
    let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 3, 32, 32), }".to_string();
    npy_with_header(&p, header, &vec![0; 4 * 3 * 32 * 32]);
    run(&p, &["fortran.npy", "Fortran"], false);
}
