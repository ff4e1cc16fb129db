#!/usr/bin/env python3
"""Make a BEiT-base-sized model with random weights (config of microsoft/beit-base-patch16-224) and time
transformers on it, so that `beit forward` can be timed on the same files.

    python scripts/bench_transformers.py --out /tmp/beit-base [--batch 1 8] [--threads 2]
writes /tmp/beit-base/{config.json, model.safetensors, pixel_values_b{N}.npy} and prints images/s.
"""
import argparse
import os
import time

import numpy as np
import torch
from transformers import BeitConfig, BeitForImageClassification

p = argparse.ArgumentParser()
p.add_argument("--out", default="/tmp/beit-base")
p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--image-size", type=int, default=224)
p.add_argument("--runs", type=int, default=5)
p.add_argument("--attn", default="sdpa")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

# microsoft/beit-base-patch16-224's config.json
config = BeitConfig(
    use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1, num_labels=1000,
    architectures=["BeitForImageClassification"], drop_path_rate=0.1,
)
config._attn_implementation = a.attn
model = BeitForImageClassification(config).eval()
with torch.no_grad():
    for n, prm in model.named_parameters():
        prm.copy_(torch.randn_like(prm) * 0.02 + (1.0 if "layernorm" in n and n.endswith("weight") else 0.0))
if not os.path.exists(os.path.join(a.out, "model.safetensors")):
    model.save_pretrained(a.out)
for b in a.batch:
    x = torch.randn(b, 3, a.image_size, a.image_size)
    np.save(os.path.join(a.out, f"pixel_values_b{b}.npy"), x.numpy())
    with torch.no_grad():
        model(pixel_values=x)
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            model(pixel_values=x)
            times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    print(f"transformers {torch.__version__} {a.attn} batch {b}: {med:.3f} s/batch, {b / med:.2f} images/s")
