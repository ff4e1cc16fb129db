"""A small semantic-segmentation data set from real images in the repo: canvases of several handwritten digits
from data/digits, each stroke labelled with its digit and the rest background (issue 17's proof on real data).

    python scripts/make_digit_scenes.py [OUT]        # default data/digit-scenes; needs numpy and Pillow

Writes ADE20K's layout: OUT/images/{training,validation}/NNNN.png (RGB, 32x32), OUT/annotations/{training,
validation}/NNNN.png (8-bit class ids: 0 background, 1 + d for digit d) and OUT/labels.txt. The digits are split
per class in file-name order as scripts/pretrain_digits.sh does (every 5th image is held out), and validation
canvases use only held-out digits, so no validation stroke was seen in training. Seeded: the same files every run.
"""
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32        # canvas side
DIGIT = 12       # side of a digit after upscaling (bicubic) from 8x8
INK = 64         # upscaled intensity at and above which a pixel is the digit's stroke
COUNTS = {"training": 800, "validation": 200}


def load_digits():
    train, val = [], []
    for c in sorted(os.listdir(ROOT / "data/digits")):
        d = ROOT / "data/digits" / c
        if not d.is_dir():
            continue
        for i, f in enumerate(sorted(os.listdir(d))):
            img = Image.open(d / f).convert("L").resize((DIGIT, DIGIT), Image.BICUBIC)
            (val if i % 5 == 0 else train).append((int(c), np.asarray(img)))
    return train, val


def canvas(rng, digits):
    """2 to 4 digits at random places (no two strokes share a pixel), a dim random gradient behind them."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    base = rng.uniform(0, 40) + rng.uniform(-20, 20) * yy + rng.uniform(-20, 20) * xx
    rgb = np.repeat(np.clip(base, 0, 60)[..., None], 3, axis=2)
    tint = rng.uniform(0.6, 1.0, size=3)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(rng.integers(2, 5)):
        label, img = digits[rng.integers(len(digits))]
        for _ in range(20):
            y, x = rng.integers(0, SIZE - DIGIT + 1, size=2)
            stroke = img >= INK
            if not (mask[y:y + DIGIT, x:x + DIGIT][stroke]).any():
                region = rgb[y:y + DIGIT, x:x + DIGIT]
                ink = img[..., None].astype(np.float32) * tint
                region[...] = np.maximum(region, ink)
                mask[y:y + DIGIT, x:x + DIGIT][stroke] = 1 + label
                break
    noise = rng.normal(0, 6, size=rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8), mask


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "data/digit-scenes"
    train, val = load_digits()
    rng = np.random.default_rng(0)
    for split, digits in (("training", train), ("validation", val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(COUNTS[split]):
            rgb, mask = canvas(rng, digits)
            Image.fromarray(rgb, "RGB").save(out / "images" / split / f"{i:04d}.png", optimize=True)
            Image.fromarray(mask, "L").save(out / "annotations" / split / f"{i:04d}.png", optimize=True)
    (out / "labels.txt").write_text("\n".join(["background"] + [str(d) for d in range(10)]) + "\n")
    print("wrote", out, {k: v for k, v in COUNTS.items()}, "from", len(train), "training and", len(val), "held-out digits")


if __name__ == "__main__":
    main()
