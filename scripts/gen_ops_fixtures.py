#!/usr/bin/env python3
"""torch's outputs for the primitives beit-rs writes itself (crates/beit/src/ops.rs, nn.rs):
bilinear and bicubic interpolation, adaptive average pooling, ConvTranspose2d, MaxPool2d.
Writes crates/beit/tests/fixtures/ops.safetensors. Run by hand: python scripts/gen_ops_fixtures.py"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "ops.safetensors")
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 7, 10, generator=g)
t = {"x": x}
for h, w in [(14, 20), (3, 4), (7, 10), (11, 5), (1, 1)]:
    for ac in (False, True):
        t[f"bilinear_{h}x{w}_{int(ac)}"] = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=ac)
    t[f"bicubic_{h}x{w}"] = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
for h, w in [(1, 1), (2, 3), (3, 3), (6, 6), (7, 10), (9, 13)]:
    t[f"adaptive_avg_{h}x{w}"] = F.adaptive_avg_pool2d(x, (h, w))
t["max_pool_2"] = F.max_pool2d(x, 2, 2)
wt = torch.randn(3, 4, 2, 2, generator=g)
bias = torch.randn(4, generator=g)
t["conv_transpose_w"] = wt
t["conv_transpose_b"] = bias
t["conv_transpose"] = F.conv_transpose2d(x, wt, bias, stride=2)
save_file({k: v.contiguous() for k, v in t.items()}, OUT)
print(OUT, len(t))
