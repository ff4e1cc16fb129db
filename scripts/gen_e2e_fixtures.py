#!/usr/bin/env python3
"""End-to-end expectations for `beit classify | segment | embed` on real photographs, from transformers 4.57.6:
adds preprocessor_config.json to the tiny fixture models (cls_single, seg_uper_aux1, mim) and writes what
transformers' pipelines answer into crates/beit/tests/fixtures/e2e/. Run after gen_model_fixtures.py."""
import json
import os

import numpy as np
import torch
from PIL import Image
from transformers import (
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitForSemanticSegmentation,
    BeitImageProcessor,
    pipeline,
)

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "crates", "beit", "tests", "fixtures")
IMAGES = ["astronaut.png", "chelsea.png", "coffee_q90.jpg", "camera.png", "rgba.png"]
OUT = os.path.join(FIX, "e2e")
os.makedirs(OUT, exist_ok=True)


def processor(model_dir, **kw):
    p = BeitImageProcessor(**kw)
    p.save_pretrained(model_dir)
    return p


def load(name):
    return Image.open(os.path.join(FIX, "processor", "images", name))


torch.set_grad_enabled(False)
expected = {}

cls_dir = os.path.join(FIX, "model", "cls_single")
proc = processor(cls_dir, size={"height": 32, "width": 32}, do_center_crop=False, resample=2)
model = BeitForImageClassification.from_pretrained(cls_dir).eval()
clf = pipeline("image-classification", model=model, image_processor=proc)
expected["classify"] = {name: clf(load(name).convert("RGB"), top_k=3) for name in IMAGES}

seg_dir = os.path.join(FIX, "model", "seg_uper_aux1")
proc = processor(seg_dir, size={"height": 32, "width": 32}, do_center_crop=False)  # bicubic, the default
model = BeitForSemanticSegmentation.from_pretrained(seg_dir).eval()
segmentation = {}
for name in IMAGES[:3]:
    img = load(name).convert("RGB")
    out = model(**proc(img, return_tensors="pt"))
    seg = proc.post_process_semantic_segmentation(out, target_sizes=[img.size[::-1]])[0]
    arr = seg.numpy().astype(np.uint8)
    Image.fromarray(arr).save(os.path.join(OUT, f"seg_{os.path.splitext(name)[0]}.png"))
    segmentation[name] = list(arr.shape)
expected["segment"] = segmentation

mim_dir = os.path.join(FIX, "model", "mim")
proc = processor(mim_dir, size={"height": 32, "width": 32}, do_center_crop=False, resample=3)
model = BeitForMaskedImageModeling.from_pretrained(mim_dir).eval()
img = load("chelsea.png").convert("RGB")
hidden = model.beit(**proc(img, return_tensors="pt")).last_hidden_state
np.save(os.path.join(OUT, "embed_tokens_chelsea.npy"), hidden.numpy())

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
print(json.dumps(expected["classify"]["astronaut.png"]))
