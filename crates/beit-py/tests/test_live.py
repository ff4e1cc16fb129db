"""Live against torch + transformers in this process (marked `live`; skipped where they are not importable):
the same checkpoints, images and calls through both libraries."""

import numpy as np
import pytest

import beit_rs
from conftest import FIXTURES, IMAGES, MODELS, TOLERANCE, max_abs_diff, read_safetensors

pytestmark = pytest.mark.live

CLASSES = [
    ("cls_single", "BeitForImageClassification"),
    ("mim", "BeitForMaskedImageModeling"),
    ("seg_uper_aux1", "BeitForSemanticSegmentation"),
    ("backbone_fpn", "BeitBackbone"),
    ("relpos_layer", "BeitModel"),
]


@pytest.mark.parametrize("case,cls", CLASSES)
def test_every_class_matches_transformers(case, cls):
    import torch
    import transformers

    d = MODELS / case
    inputs = read_safetensors(d / "inputs.safetensors")
    theirs = getattr(transformers, cls).from_pretrained(d).eval()
    ours = getattr(beit_rs, cls).from_pretrained(d)
    kwargs = {"output_hidden_states": True}
    if "bool_masked_pos" in inputs:
        kwargs["bool_masked_pos"] = inputs["bool_masked_pos"].astype(bool)
    with torch.no_grad():
        want = theirs(
            pixel_values=torch.from_numpy(inputs["pixel_values"].copy()),
            **{k: torch.from_numpy(np.asarray(v).copy()) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()},
        )
    got = ours(pixel_values=inputs["pixel_values"], **kwargs)
    for name in ("logits", "last_hidden_state", "pooler_output"):
        if getattr(want, name, None) is not None:
            assert max_abs_diff(getattr(got, name), want[name].numpy()) <= TOLERANCE, name
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert max_abs_diff(a, b.numpy()) <= TOLERANCE
    if cls == "BeitBackbone":
        for a, b in zip(got.feature_maps, want.feature_maps):
            assert max_abs_diff(a, b.numpy()) <= TOLERANCE


def test_processor_matches_transformers():
    import transformers
    from PIL import Image

    d = MODELS / "cls_single"
    theirs = transformers.BeitImageProcessor.from_pretrained(d)
    ours = beit_rs.BeitImageProcessor.from_pretrained(d)
    images = [Image.open(IMAGES / n).convert("RGB") for n in ("astronaut.png", "chelsea.png", "camera.png")]
    np.testing.assert_array_equal(ours(images).pixel_values, theirs(images, return_tensors="np")["pixel_values"])


def test_pipelines_match_transformers():
    import transformers

    images = [str(IMAGES / n) for n in ("astronaut.png", "chelsea.png", "camera.png")]
    theirs = transformers.pipeline("image-classification", model=str(MODELS / "cls_single"))(images, top_k=3)
    ours = beit_rs.pipeline("image-classification", model=MODELS / "cls_single")(images, top_k=3)
    for a, b in zip(ours, theirs):
        assert [p["label"] for p in a] == [p["label"] for p in b]
        assert max(abs(p["score"] - q["score"]) for p, q in zip(a, b)) <= TOLERANCE
    theirs = transformers.pipeline("image-segmentation", model=str(MODELS / "seg_uper_aux1"))(images[1])
    ours = beit_rs.pipeline("image-segmentation", model=MODELS / "seg_uper_aux1")(images[1])
    assert [s["label"] for s in ours] == [s["label"] for s in theirs]
    for a, b in zip(ours, theirs):
        agree = (np.asarray(a["mask"]) == np.asarray(b["mask"])).mean()
        assert agree >= 0.999, a["label"]
    theirs = transformers.pipeline("image-feature-extraction", model=str(MODELS / "cls_single"))(images[0], pool=True)
    ours = beit_rs.pipeline("image-feature-extraction", model=MODELS / "cls_single")(images[0], pool=True)
    assert max_abs_diff(ours, theirs) <= TOLERANCE


def test_data2vec_matches_transformers():
    import torch
    import transformers

    d = FIXTURES / "family" / "d2v_seg"
    x = read_safetensors(d / "inputs.safetensors")["pixel_values"]
    theirs = transformers.Data2VecVisionForSemanticSegmentation.from_pretrained(d).eval()
    with torch.no_grad():
        want = theirs(pixel_values=torch.from_numpy(x.copy())).logits.numpy()
    got = beit_rs.Data2VecVisionForSemanticSegmentation.from_pretrained(d)(x).logits
    assert max_abs_diff(got, want) <= TOLERANCE
