"""A picture of segmentation predictions beside the ground truth: one row per image, showing the image, the
true mask and the predicted mask (class ids painted with `beit segment`'s colours, background black), scaled up
without smoothing.

    python scripts/seg_grid.py OUT.png DATA PRED N      # needs numpy and Pillow

DATA is a folder in ADE20K's layout (images/validation/X.png, annotations/validation/X.png); PRED holds `beit
segment`'s X.png class maps for the same images. The first N validation images (sorted) are shown.
"""
import colorsys
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCALE = 6
PAD = 4


def class_color(c):
    """crates/beit-cli/src/segment.rs's class_color: golden-ratio hues."""
    h = math.modf(c * 0.61803398875)[0]
    s = 0.65 + 0.35 * ((c // 7) % 2)
    v = 0.95 - 0.3 * ((c // 3) % 2)
    return tuple(int(x * 255) for x in colorsys.hsv_to_rgb(h, s, v))


def paint(ids):
    out = np.zeros(ids.shape + (3,), np.uint8)
    for c in np.unique(ids):
        if c not in (0, 255):
            out[ids == c] = class_color(int(c))
    return out


def main():
    out, data, pred, n = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    names = sorted(p.name for p in (data / "images/validation").iterdir())[:n]
    rows = []
    for name in names:
        img = np.asarray(Image.open(data / "images/validation" / name).convert("RGB"))
        truth = np.asarray(Image.open(data / "annotations/validation" / name))
        guess = np.asarray(Image.open(pred / (Path(name).stem + ".png")))
        rows.append([img, paint(truth), paint(guess)])
    h, w = rows[0][0].shape[:2]
    cell_w, cell_h = w * SCALE + PAD, h * SCALE + PAD
    canvas = Image.new("RGB", (3 * cell_w + PAD, len(rows) * cell_h + PAD + 16), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(["image", "truth", "prediction"]):
        draw.text((PAD + j * cell_w, 2), title, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            tile = Image.fromarray(cell).resize((w * SCALE, h * SCALE), Image.NEAREST)
            canvas.paste(tile, (PAD + j * cell_w, 16 + PAD + i * cell_h))
    canvas.save(out, optimize=True)
    print("wrote", out)


if __name__ == "__main__":
    main()
