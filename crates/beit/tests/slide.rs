//! mmseg's sliding-window segmentation against scripts/gen_slide_fixtures.py: the same windows over a 40x56
//! photo crop with the tiny UperNet fixture model, logits summed and averaged in numpy over transformers'
//! outputs per crop.

use std::path::{Path, PathBuf};

use beit::npy::{read_npy, NpyData};
use beit::pipeline::{Pipeline, SlideOptions};
use beit::processor::load_image;
use beit::LoadOptions;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn slide_logits_match_mmseg_over_transformers() {
    let model = fixtures().join("model/seg_uper_aux1");
    let pipeline = Pipeline::from_pretrained(model.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let dir = fixtures().join("slide");
    let image = load_image(dir.join("image.png")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for (name, case) in cases.as_object().unwrap() {
        let pair = |k: &str| {
            let v = case[k].as_array().unwrap();
            (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize)
        };
        let scale =
            case["scale"].as_array().map(|v| (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize));
        let opts = SlideOptions { crop: pair("crop"), stride: pair("stride"), scale };
        let (logits, shape) = pipeline.slide_logits(&image, &opts).unwrap();
        let want = read_npy(&dir.join(format!("{name}.npy"))).unwrap();
        assert_eq!(want.shape, shape.to_vec(), "{name}");
        let NpyData::F32(want) = want.data else { panic!("{name}: expected f32 logits") };
        let err = logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= 1e-4, "{name}: max abs error {err:e}");
        eprintln!("{name}: max abs error {err:e}");
        // The class map is the argmax of these logits at the image's own size.
        let (ids, (h, w)) = pipeline.segment_slide(&image, &opts).unwrap();
        assert_eq!((h, w), (image.height() as usize, image.width() as usize));
        let argmax: Vec<u32> = (0..h * w)
            .map(|p| {
                (1..shape[0]).fold(0, |b, k| if logits[k * h * w + p] > logits[b * h * w + p] { k } else { b }) as u32
            })
            .collect();
        assert_eq!(ids, argmax, "{name}: the streamed argmax differs from the argmax of the full map");
    }
}

#[test]
fn slide_refuses_empty_windows_and_other_heads() {
    let seg =
        Pipeline::from_pretrained(fixtures().join("model/seg_uper_aux1").to_str().unwrap(), &LoadOptions::default())
            .unwrap();
    let image = load_image(fixtures().join("slide/image.png")).unwrap();
    let opts = |crop, stride| SlideOptions { crop, stride, scale: None };
    let e = seg.slide_logits(&image, &opts((0, 32), (16, 16))).unwrap_err().to_string();
    assert!(e.contains("crop (0, 32)"), "{e}");
    let e = seg.segment_slide(&image, &opts((16, 16), (20, 16))).unwrap_err().to_string();
    assert!(e.contains("stride of at most the crop"), "{e}");
    let cls = Pipeline::from_pretrained(fixtures().join("model/cls_single").to_str().unwrap(), &LoadOptions::default())
        .unwrap();
    assert!(cls.slide_logits(&image, &opts((32, 32), (16, 16))).is_err());
}
