"""BeitImageProcessor against transformers' stored pixel values and labels, and post_process_semantic_segmentation
against torch's interpolate + argmax (crates/beit/tests/fixtures/processor)."""

import json

import numpy as np
import pytest
from PIL import Image

import beit_rs
from conftest import FIXTURES

PROC = FIXTURES / "processor"
MANIFEST = json.loads((PROC / "manifest.json").read_text())


def expected_pixel_values(case, processor):
    if "pixel_values" in case:
        return np.load(PROC / case["pixel_values"])
    # uint8 levels before rescale and normalize, turned into values as transformers does (the generator checked it).
    lv = np.asarray(Image.open(PROC / case["levels"]).convert("RGB")).astype(np.float64)
    x = (lv * processor.rescale_factor).astype(np.float32)
    x = (x - np.float32(processor.image_mean)) / np.float32(processor.image_std)
    return x.astype(np.float32).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("case", MANIFEST["processor_cases"], ids=lambda c: c["name"])
def test_pixel_values_match_transformers(case):
    processor = beit_rs.BeitImageProcessor.from_dict(json.loads((PROC / case["config"]).read_text()))
    images = [PROC / p for p in case["images"]]
    got = processor(images, return_tensors="np")["pixel_values"]
    want = expected_pixel_values(case, processor)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_inputs_of_every_kind_agree():
    processor = beit_rs.BeitImageProcessor.from_dict(json.loads((PROC / "configs/beit_base_224.json").read_text()))
    path = PROC / "images/astronaut.png"
    pil = Image.open(path)
    by_path = processor(str(path)).pixel_values
    for other in (path, path.read_bytes(), pil, np.asarray(pil.convert("RGB")), np.asarray(pil.convert("RGB")).transpose(2, 0, 1)):
        np.testing.assert_array_equal(processor(other).pixel_values, by_path)
    assert by_path.shape == (1, 3, 224, 224)
    # A grayscale array is RGB with three equal channels, as PIL's convert("RGB").
    gray = np.asarray(pil.convert("L"))
    np.testing.assert_array_equal(processor(gray).pixel_values, processor(pil.convert("L")).pixel_values)


def test_call_overrides_settings_for_one_call():
    processor = beit_rs.BeitImageProcessor()
    assert processor.size == {"height": 256, "width": 256} and processor.crop_size == {"height": 224, "width": 224}
    img = np.zeros((40, 60, 3), np.uint8)
    assert processor(img).pixel_values.shape == (1, 3, 224, 224)
    assert processor(img, do_resize=False, do_center_crop=False).pixel_values.shape == (1, 3, 40, 60)


@pytest.mark.parametrize("case", MANIFEST["label_cases"], ids=lambda c: c["config"])
def test_labels_match_transformers(case):
    processor = beit_rs.BeitImageProcessor.from_dict(json.loads((PROC / case["config"]).read_text()))
    out = processor(PROC / "images/astronaut.png", segmentation_maps=PROC / case["map"])
    want = np.load(PROC / case["labels"])
    assert out.labels.dtype == np.int64
    np.testing.assert_array_equal(out.labels, want.reshape(out.labels.shape))
    # The map as an array gives the same labels.
    as_array = processor(PROC / "images/astronaut.png", segmentation_maps=np.asarray(Image.open(PROC / case["map"])))
    np.testing.assert_array_equal(as_array.labels, out.labels)


def test_post_process_semantic_segmentation_matches_torch():
    t = MANIFEST["torch"]
    logits = np.load(PROC / t["logits"])
    processor = beit_rs.BeitImageProcessor()
    maps = processor.post_process_semantic_segmentation(logits, target_sizes=t["target_sizes"])
    for got, want in zip(maps, t["seg_target"]):
        np.testing.assert_array_equal(got, np.load(PROC / want))
    plain = processor.post_process_semantic_segmentation(logits)
    np.testing.assert_array_equal(np.stack(plain), np.load(PROC / t["seg_none"]).reshape(np.stack(plain).shape))


def test_from_pretrained_save_pretrained_round_trip(tmp_path):
    d = FIXTURES / "model" / "cls_single"
    p = beit_rs.BeitImageProcessor.from_pretrained(d)
    raw = json.loads((d / "preprocessor_config.json").read_text())
    assert p.to_dict()["size"] == raw["size"]
    p.save_pretrained(tmp_path)
    again = beit_rs.BeitImageProcessor.from_pretrained(tmp_path)
    img = PROC / "images/chelsea.png"
    np.testing.assert_array_equal(again(img).pixel_values, p(img).pixel_values)
    with pytest.raises(OSError, match="preprocessor_config.json"):
        beit_rs.BeitImageProcessor.from_pretrained(FIXTURES / "model" / "relpos_layer")
