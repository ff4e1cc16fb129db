"""pipeline(task, model=...) on the tiny fixture models and real photographs, against transformers' pipelines'
stored answers (crates/beit/tests/fixtures/e2e, scripts/gen_e2e_fixtures.py)."""

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

import beit_rs
from conftest import FIXTURES, IMAGES, MODELS, TOLERANCE

E2E = FIXTURES / "e2e"
EXPECTED = json.loads((E2E / "expected.json").read_text())


def test_image_classification_matches_transformers():
    pipe = beit_rs.pipeline("image-classification", model=MODELS / "cls_single")
    names = list(EXPECTED["classify"])
    # Paths, PIL images, bytes and arrays in one list.
    inputs = [IMAGES / names[0], Image.open(IMAGES / names[1]), (IMAGES / names[2]).read_bytes()]
    inputs += [str(IMAGES / n) for n in names[3:]]
    got = pipe(inputs, top_k=3)
    assert len(got) == len(names)
    for name, preds in zip(names, got):
        want = EXPECTED["classify"][name]
        assert [p["label"] for p in preds] == [w["label"] for w in want], name
        for p, w in zip(preds, want):
            assert abs(p["score"] - w["score"]) <= TOLERANCE, name
    # One image: one list; top_k past the labels is clipped, as transformers.
    one = pipe(IMAGES / "chelsea.png")
    assert isinstance(one, list) and isinstance(one[0], dict) and len(one) == 5
    assert len(pipe(IMAGES / "chelsea.png", top_k=100)) == pipe.model.config.num_labels


def test_image_segmentation_matches_transformers():
    pipe = beit_rs.pipeline("image-segmentation", model=MODELS / "seg_uper_aux1")
    id2label = pipe.model.config.id2label
    label2id = {v: k for k, v in id2label.items()}
    for name, (h, w) in EXPECTED["segment"].items():
        segments = pipe(IMAGES / name)
        seg = np.full((h, w), -1)
        for s in segments:
            assert s["score"] is None and isinstance(s["mask"], Image.Image) and s["mask"].mode == "L"
            m = np.asarray(s["mask"])
            assert m.shape == (h, w) and set(np.unique(m)) <= {0, 255}
            seg[m == 255] = label2id[s["label"]]
        assert (seg >= 0).all(), "the masks cover the image"
        want = np.asarray(Image.open(E2E / f"seg_{name.rsplit('.', 1)[0]}.png"))
        share = (seg == want).mean()
        assert share >= 0.999, f"{name}: {share:.4%} of pixels agree"


def test_segmentation_through_the_model_and_processor_agrees_with_the_pipeline():
    model = beit_rs.BeitForSemanticSegmentation.from_pretrained(MODELS / "seg_uper_aux1")
    processor = beit_rs.BeitImageProcessor.from_pretrained(MODELS / "seg_uper_aux1")
    image = Image.open(IMAGES / "chelsea.png")
    out = model(**processor(image, return_tensors="np"))
    (seg,) = processor.post_process_semantic_segmentation(out, target_sizes=[image.size[::-1]])
    np.testing.assert_array_equal(seg, model._native.segment([str(IMAGES / "chelsea.png")])[0])


def test_image_feature_extraction_matches_the_backbone():
    pipe = beit_rs.pipeline("image-feature-extraction", model=MODELS / "mim")
    tokens = pipe(IMAGES / "chelsea.png")
    want = np.load(E2E / "embed_tokens_chelsea.npy")
    got = np.asarray(tokens, dtype=np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE
    # pool=True: the pooler's output; a checkpoint whose model has none says so.
    pooled = beit_rs.pipeline("image-feature-extraction", model=MODELS / "cls_single")(IMAGES / "chelsea.png", pool=True)
    assert np.asarray(pooled).shape == (1, 32)
    d2v = beit_rs.pipeline("image-feature-extraction", model=FIXTURES / "family" / "d2v_model")
    with pytest.raises(ValueError, match="pooler"):
        d2v(np.zeros((32, 32, 3), np.uint8), pool=True)


def test_embed_equals_the_cli_path():
    model = beit_rs.BeitForImageClassification.from_pretrained(MODELS / "cls_single")
    pooled = model._native.embed([str(IMAGES / "chelsea.png"), str(IMAGES / "camera.png")])
    assert pooled.shape == (2, 32)
    feats = beit_rs.pipeline("image-feature-extraction", model=MODELS / "cls_single")(
        [IMAGES / "chelsea.png", IMAGES / "camera.png"], pool=True, return_tensors=True
    )
    np.testing.assert_allclose(np.concatenate(feats), pooled, atol=1e-5)


def test_a_model_serves_several_threads_at_once():
    pipe = beit_rs.pipeline("image-classification", model=MODELS / "cls_single", num_threads=2)
    images = [IMAGES / n for n in EXPECTED["classify"]]
    want = pipe(images)
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(pipe(images))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    assert all(r == want for r in results)


def test_the_gil_is_released_while_the_model_runs():
    model = beit_rs.BeitForImageClassification.from_pretrained(MODELS / "cls_single")
    x = np.random.default_rng(0).standard_normal((256, 3, 32, 32), dtype=np.float32)
    span = []

    def call():
        t = time.perf_counter()
        model(x)
        span.extend([t, time.perf_counter()])

    beats = []
    worker = threading.Thread(target=call)
    worker.start()
    while worker.is_alive():
        beats.append(time.perf_counter())
    worker.join()
    start, end = span
    quarter = (end - start) / 4
    # A call that held the GIL would stop this thread for its whole Rust part: no beats in its middle half.
    middle = [b for b in beats if start + quarter < b < end - quarter]
    assert len(middle) >= 10, f"{len(middle)} beats in the middle of a {end - start:.3f} s call"
