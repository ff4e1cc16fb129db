"""Sliding-window segmentation fixtures: mmseg's `slide_inference` (mmseg/models/segmentors/encoder_decoder.py,
v1.x) written out in numpy over transformers' BeitForSemanticSegmentation on each crop.

Run by hand in a venv from scripts/requirements.txt, from the repository root:
    python scripts/gen_slide_fixtures.py
Writes crates/beit/tests/fixtures/slide/: image.png (a 40x56 crop of a processor fixture photo) and, per case,
<name>.npy with the mean logits [classes, 40, 56] and cases.json with the crop and stride.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BeitForSemanticSegmentation

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "crates/beit/tests/fixtures/model/seg_uper_aux1"
OUT = ROOT / "crates/beit/tests/fixtures/slide"
CASES = {
    # crop = the model's image_size: 2 x 3 windows overlapping both ways.
    "crop32_stride16": ((32, 32), (16, 16), None),
    # a stride larger than the overlap needs, uneven per axis.
    "crop32_stride24x20": ((32, 32), (24, 20), None),
    # mmseg's keep-ratio Resize first (img_scale as (long, short) edge bounds), logits resized back: down...
    "scale48x34_crop32_stride16": ((32, 32), (16, 16), (48, 34)),
    # ...and up.
    "scale84x60_crop32_stride20x24": ((32, 32), (20, 24), (84, 60)),
}


def rescale_size(w, h, scale):
    """mmcv.rescale_size((w, h), scale) with a (long, short) edge bound."""
    long, short = max(scale), min(scale)
    f = min(long / max(h, w), short / min(h, w))
    return int(w * f + 0.5), int(h * f + 0.5)


def normalize(rgb, cfg):
    """BeitImageProcessor's rescale and normalize without resizing: float64 rescale, then float32."""
    x = (rgb.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    mean = np.array(cfg["image_mean"], dtype=np.float32)
    std = np.array(cfg["image_std"], dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def slide(model, img, crop, stride, num_classes):
    """mmseg's slide_inference on one image [3, H, W]."""
    h_crop, w_crop = crop
    h_stride, w_stride = stride
    _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = np.zeros((num_classes, h_img, w_img), dtype=np.float32)
    count = np.zeros((1, h_img, w_img), dtype=np.float32)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_img = torch.from_numpy(np.ascontiguousarray(img[:, y1:y2, x1:x2]))[None]
            with torch.no_grad():
                logits = model(pixel_values=crop_img).logits
                # encode_decode resizes the decode head's output to the crop's size.
                logits = F.interpolate(logits, size=crop_img.shape[2:], mode="bilinear", align_corners=False)
            preds[:, y1:y2, x1:x2] += logits[0].numpy()
            count[:, y1:y2, x1:x2] += 1
    return preds / count


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    src = Image.open(ROOT / "crates/beit/tests/fixtures/processor/images/astronaut.png").convert("RGB")
    image = src.crop((100, 60, 156, 100))  # 56 wide, 40 high
    image.save(OUT / "image.png")
    rgb = np.asarray(Image.open(OUT / "image.png").convert("RGB"))
    cfg = json.loads((MODEL / "preprocessor_config.json").read_text())
    model = BeitForSemanticSegmentation.from_pretrained(MODEL).eval()
    cases = {}
    for name, (crop, stride, scale) in CASES.items():
        if scale is None:
            logits = slide(model, normalize(rgb, cfg), crop, stride, model.config.num_labels)
        else:
            # mmseg's Resize (here with the processor's Pillow filter), then the logits back to the image's size.
            w, h = rescale_size(rgb.shape[1], rgb.shape[0], scale)
            scaled = np.asarray(Image.fromarray(rgb).resize((w, h), resample=cfg["resample"]))
            logits = slide(model, normalize(scaled, cfg), crop, stride, model.config.num_labels)
            logits = F.interpolate(torch.from_numpy(logits)[None], size=rgb.shape[:2], mode="bilinear",
                                   align_corners=False)[0].numpy()
        np.save(OUT / f"{name}.npy", logits.astype(np.float32))
        cases[name] = {"crop": list(crop), "stride": list(stride), "scale": scale and list(scale),
                       "shape": list(logits.shape)}
    (OUT / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    print("wrote", OUT, {k: v["shape"] for k, v in cases.items()})


if __name__ == "__main__":
    main()
