#!/usr/bin/env python3
"""Statistics of BEiT's blockwise masking, for crates/beit/src/masking.rs's test.

Run with: python3 scripts/gen_masking_stats.py   (needs numpy only)
Writes crates/beit/tests/fixtures/tokenizer/masking_stats.json.

The Rust MaskingGenerator draws from our own seeded generator, not Python's `random`, so masks cannot match one
for one; instead both sides generate 20,000 masks with BEiT's pre-training settings (14x14 patches, 75 masked,
min_num_patches 16, aspect 0.3 .. 1/0.3) and compare per-mask statistics. Every statistic is the mean over masks of
a per-mask value, so its sampling error is std / sqrt(N); the file keeps each mean and std so the test can derive
its tolerance.
"""
import json
import math
import os
import random

import numpy as np

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests",
                                    "fixtures", "tokenizer", "masking_stats.json"))

# ---------------------------------------------------------------------------------------------------------------
# MaskingGenerator from microsoft/unilm, beit/masking_generator.py
# (https://github.com/microsoft/unilm/tree/master/beit, MIT License, Copyright (c) 2021 Microsoft, by Hangbo Bao).
# Copied unchanged except `np.int` (removed from numpy) -> `int` and __repr__ dropped.


class MaskingGenerator:
    def __init__(
            self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
            min_aspect=0.3, max_aspect=None):
        if not isinstance(input_size, tuple):
            input_size = (input_size, ) * 2
        self.height, self.width = input_size

        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches

        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches

        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def get_shape(self):
        return self.height, self.width

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for attempt in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)

                num_masked = mask[top: top + h, left: left + w].sum()
                # Overlap
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1

                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros(shape=self.get_shape(), dtype=int)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)

            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta

        return mask
# ---------------------------------------------------------------------------------------------------------------

# Component-size bins (4-connected blocks of masked patches): [lo, hi) in patches.
SIZE_BINS = [(1, 4), (4, 16), (16, 32), (32, 48), (48, 76)]  # never more than 75 masked


def components(mask):
    """4-connected components: list of (size, bbox_h, bbox_w)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                stack, seen[i, j] = [(i, j)], True
                size, r0, r1, c0, c1 = 0, i, i, j, j
                while stack:
                    y, x = stack.pop()
                    size += 1
                    r0, r1, c0, c1 = min(r0, y), max(r1, y), min(c0, x), max(c1, x)
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        v, u = y + dy, x + dx
                        if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                            seen[v, u] = True
                            stack.append((v, u))
                out.append((size, r1 - r0 + 1, c1 - c0 + 1))
    return out


def per_mask(mask):
    """The per-mask values whose means are compared (same definitions as masking.rs's test)."""
    comps = components(mask)
    v = {
        "masked": float(mask.sum()),
        "blocks": float(len(comps)),
        # Mean over the mask's blocks of the bounding box's height / width, and of |log(height / width)|.
        "bbox_aspect": float(np.mean([bh / bw for _, bh, bw in comps])) if comps else 0.0,
        "bbox_abs_log_aspect": float(np.mean([abs(math.log(bh / bw)) for _, bh, bw in comps])) if comps else 0.0,
        "largest_block": float(max((s for s, _, _ in comps), default=0)),
    }
    for lo, hi in SIZE_BINS:
        v[f"blocks_size_{lo}_{hi - 1}"] = float(sum(1 for s, _, _ in comps if lo <= s < hi))
    return v


def main():
    n = 20000
    random.seed(0)
    gen = MaskingGenerator((14, 14), 75, min_num_patches=16, max_num_patches=None, min_aspect=0.3, max_aspect=None)
    rows = [per_mask(gen()) for _ in range(n)]
    stats = {}
    for key in rows[0]:
        vals = np.array([r[key] for r in rows])
        stats[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1))}
    doc = {
        "source": "microsoft/unilm beit/masking_generator.py MaskingGenerator, Python random.seed(0)",
        "settings": {"height": 14, "width": 14, "num_masking_patches": 75, "min_num_patches": 16,
                     "max_num_patches": None, "min_aspect": 0.3, "max_aspect": None},
        "num_masks": n,
        "connectivity": 4,
        "stats": stats,
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    for k, s in stats.items():
        print(f"{k:28s} mean {s['mean']:8.4f} std {s['std']:8.4f}")


if __name__ == "__main__":
    main()
