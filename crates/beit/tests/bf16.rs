//! bf16 inference (the encoder's Linear layers in bf16 with f32 accumulation) against our f32: top-1 agreement
//! on models/beit-digits' held-out digits (those `beit eval --val-split 0.2 --seed 0` uses), a bound on the
//! logits of the parity fixtures, and the same bits from the AVX512_BF16 kernel and the portable one.
//!
//! The portable kernel is checked in a child process of this test binary run with `BEIT_CPU=avx512_vnni`
//! (every feature but AVX512_BF16, so that only the bf16 GEMM changes); where the CPU has no AVX512_BF16 the
//! tests run the portable kernel directly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use beit::checkpoint::read_safetensors;
use beit::internals::cpu;
use beit::train::data::ImageFolder;
use beit::train::eval_processor;
use beit::{load_pretrained, Architecture, ForwardOptions, InferenceDtype, LoadOptions, ModelInputs};
use candle_core::{DType, Device, Tensor};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Top-1 agreement with f32 on the held-out digits (issue 16: at least 99%).
const MIN_AGREEMENT: f64 = 0.99;
/// Largest |bf16 - f32| logit on the held-out digits: measured 0.0104 (2026-12-03, both kernels), asserted
/// with margin.
const MAX_LOGIT_DRIFT_DIGITS: f32 = 0.03;
/// Largest |bf16 - transformers f32| over the logits of every parity fixture that has logits but the
/// segmentation ones: measured 0.0585 (mim_abspos_nolabels; the others 0.007-0.037; 2026-12-03, both
/// kernels), asserted with margin.
const MAX_LOGIT_ERR_FIXTURES: f32 = 0.08;
/// The same for the segmentation fixtures, whose UperNet/FCN convolutions run in bf16 too (4-5 GEMMs deep
/// after the encoder): measured 0.146 (seg_noaux_scales, logits up to 13.5; seg_uper_aux1 0.076,
/// seg_aux2_concat 0.056; 2026-12-03, both kernels). torch's bf16 on the same fixtures: 0.231 / 0.084 / 0.091
/// with the model cast, 0.205 / 0.109 / 0.069 under autocast.
const MAX_LOGIT_ERR_SEG_FIXTURES: f32 = 0.2;

fn bf16() -> LoadOptions {
    LoadOptions { inference: Some(InferenceDtype::Bf16), ..Default::default() }
}

fn logits(m: &beit::Pretrained, x: &Tensor) -> Vec<Vec<f32>> {
    let out = m.model.forward_named(x, &ModelInputs::default()).unwrap();
    out.into_iter().find(|(n, _)| n == "logits").unwrap().1.to_vec2::<f32>().unwrap()
}

/// The bf16 model's logits for every held-out digit, flattened; with the agreement checks when `check`.
fn digits(check: bool) -> Vec<f32> {
    let dir = root().join("models/beit-digits");
    let bf16_model = load_pretrained(&dir, &bf16(), &Device::Cpu).unwrap();
    let f32_model = check.then(|| load_pretrained(&dir, &LoadOptions::default(), &Device::Cpu).unwrap());
    let folder = ImageFolder::load(&root().join("data/digits"), Some(0.2), 0).unwrap();
    let val = &folder.val;
    assert!(val.images.len() > 300, "{} validation images", val.images.len());
    let processor = eval_processor(bf16_model.config.image_size.height);
    let (mut agree, mut total, mut drift, mut correct_f32, mut correct_bf16) = (0usize, 0usize, 0f32, 0usize, 0usize);
    let mut all = Vec::new();
    for (imgs, labels) in val.images.chunks(64).zip(val.labels.chunks(64)) {
        let pv = processor.preprocess_rgb(imgs).unwrap();
        let x = Tensor::from_vec(pv.data, pv.shape.to_vec(), &Device::Cpu).unwrap();
        let b = logits(&bf16_model, &x);
        all.extend(b.iter().flatten().copied());
        let Some(f32_model) = &f32_model else { continue };
        let a = logits(f32_model, &x);
        for ((ra, rb), &label) in a.iter().zip(&b).zip(labels) {
            let argmax = |r: &[f32]| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap();
            agree += (argmax(ra) == argmax(rb)) as usize;
            correct_f32 += (argmax(ra) == label) as usize;
            correct_bf16 += (argmax(rb) == label) as usize;
            total += 1;
            drift = ra.iter().zip(rb).fold(drift, |d, (p, q)| d.max((p - q).abs()));
        }
    }
    if check {
        let agreement = agree as f64 / total as f64;
        println!(
            "bf16 vs f32 on {total} held-out digits (CPU features {:?}): top-1 agreement {:.2}%, max logit drift \
             {drift:.4}, top-1 f32 {:.2}% bf16 {:.2}%",
            cpu::features(),
            agreement * 100.0,
            correct_f32 as f64 * 100.0 / total as f64,
            correct_bf16 as f64 * 100.0 / total as f64
        );
        assert!(agreement >= MIN_AGREEMENT, "agreement {agreement}");
        assert!(drift <= MAX_LOGIT_DRIFT_DIGITS, "logit drift {drift}");
    }
    all
}

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model");
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("case.json").exists()).collect();
    cases.sort();
    cases
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    read_safetensors(path, &Device::Cpu).unwrap().into_iter().collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every parity fixture's logits (where it has them) in bf16, flattened in fixture order; with the bound
/// against transformers' f32 logits when `check`.
fn fixture_logits(check: bool) -> Vec<f32> {
    let (mut worst, mut worst_seg, mut cases, mut all) = (0f32, 0f32, 0usize, Vec::new());
    for dir in fixtures() {
        let inputs = read(&dir.join("inputs.safetensors"));
        let expected = read(&dir.join("outputs.safetensors"));
        let Some(want) = expected.get("logits") else { continue };
        let loaded = load_pretrained(&dir, &bf16(), &Device::Cpu).unwrap();
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let flag = |k: &str| case["call"].get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let model_inputs = ModelInputs {
            options: ForwardOptions {
                bool_masked_pos: inputs.get("bool_masked_pos").cloned(),
                head_mask: inputs.get("head_mask").cloned(),
                interpolate_pos_encoding: flag("interpolate_pos_encoding"),
                ..Default::default()
            },
            labels: None,
        };
        let out = loaded.model.forward_named(&inputs["pixel_values"], &model_inputs).unwrap();
        let got = &out.iter().find(|(n, _)| n == "logits").unwrap().1;
        let (g, w) = (flat(got), flat(want));
        assert_eq!(g.len(), w.len(), "{}", dir.display());
        let err = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if check {
            println!("{:40} bf16 logits max abs err {err:.2e}", dir.file_name().unwrap().to_string_lossy());
        }
        if loaded.model.architecture() == Architecture::BeitForSemanticSegmentation {
            worst_seg = worst_seg.max(err);
        } else {
            worst = worst.max(err);
        }
        cases += 1;
        all.extend(g);
    }
    if check {
        assert!(cases >= 10, "only {cases} fixtures with logits");
        println!(
            "bf16 logits of {cases} parity fixtures: max abs err {worst:.3e}, segmentation {worst_seg:.3e} \
             (CPU features {:?})",
            cpu::features()
        );
        assert!(worst <= MAX_LOGIT_ERR_FIXTURES, "bf16 logits differ from transformers' by {worst}");
        assert!(
            worst_seg <= MAX_LOGIT_ERR_SEG_FIXTURES,
            "bf16 segmentation logits differ from transformers' by {worst_seg}"
        );
    }
    all
}

/// What the child process writes: the bf16 outputs of both tests with the portable bf16 kernel.
const CHILD_OUT: &str = "BEIT_BF16_TEST_OUT";

/// When this CPU has AVX512_BF16 and this process uses it: the same outputs from a child process whose bf16
/// GEMM is the portable one, which must have the same bits.
fn portable_outputs(test: &str) -> Option<Vec<f32>> {
    if !cpu::features().avx512_bf16 {
        println!("this process runs the portable bf16 kernel (CPU features {:?})", cpu::features());
        return None;
    }
    let out = std::env::temp_dir().join(format!("beit-bf16-{test}-{}.bin", std::process::id()));
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env("BEIT_CPU", "avx512_vnni")
        .env(CHILD_OUT, &out)
        .status()
        .unwrap();
    assert!(status.success(), "child with BEIT_CPU=avx512_vnni failed");
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// In the child: write `values` for the parent and report whether this is the child.
fn child_writes(values: &[f32]) -> bool {
    let Some(path) = std::env::var_os(CHILD_OUT) else { return false };
    assert!(!cpu::features().avx512_bf16, "the child must run the portable bf16 kernel");
    std::fs::write(path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    true
}

fn assert_same_bits(fast: &[f32], portable: &[f32]) {
    assert_eq!(fast.len(), portable.len());
    let differ = fast.iter().zip(portable).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} outputs differ between the AVX512_BF16 and the portable kernel", fast.len());
    println!("AVX512_BF16 and portable kernels: {} outputs, identical bits", fast.len());
}

#[test]
fn bf16_agrees_with_f32_on_held_out_digits() {
    let child = std::env::var_os(CHILD_OUT).is_some();
    let values = digits(!child);
    if child_writes(&values) {
        return;
    }
    if let Some(portable) = portable_outputs("bf16_agrees_with_f32_on_held_out_digits") {
        assert_same_bits(&values, &portable);
    }
}

#[test]
fn bf16_logits_of_parity_fixtures_are_within_the_bound() {
    let child = std::env::var_os(CHILD_OUT).is_some();
    let values = fixture_logits(!child);
    if child_writes(&values) {
        return;
    }
    if let Some(portable) = portable_outputs("bf16_logits_of_parity_fixtures_are_within_the_bound") {
        assert_same_bits(&values, &portable);
    }
}
