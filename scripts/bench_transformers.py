#!/usr/bin/env python3
"""Make a BEiT-base-sized model with random weights (config of microsoft/beit-base-patch16-224) and time
transformers on it, so that `beit forward` can be timed on the same files.

    python scripts/bench_transformers.py --out /tmp/beit-base [--batch 1 8] [--threads 2]
writes /tmp/beit-base/{config.json, model.safetensors, pixel_values_b{N}.npy} and prints images/s.
"""
import argparse
import contextlib
import os
import time

import numpy as np
import torch
from transformers import BeitConfig, BeitForImageClassification, BeitForSemanticSegmentation

p = argparse.ArgumentParser()
p.add_argument("--out", default="/tmp/beit-base")
p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--image-size", type=int, default=224)
p.add_argument("--runs", type=int, default=5)
p.add_argument("--attn", default="sdpa")
p.add_argument("--task", choices=["classification", "segmentation"], default="classification")
p.add_argument("--dtype", choices=["fp32", "bf16", "autocast"], default="fp32",
               help="bf16: weights and input cast (model.to(torch.bfloat16)); autocast: torch.autocast('cpu', bf16)")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

# microsoft/beit-base-patch16-224's config.json
config = BeitConfig(
    use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1, num_labels=1000,
    architectures=["BeitForImageClassification"], drop_path_rate=0.1,
)
if a.task == "segmentation":
    # microsoft/beit-base-finetuned-ade-640-640's config.json
    config = BeitConfig(
        use_relative_position_bias=True, image_size=640, out_indices=[3, 5, 7, 11], num_labels=150,
        auxiliary_channels=256, use_auxiliary_head=True, architectures=["BeitForSemanticSegmentation"],
    )
config._attn_implementation = a.attn
model = (BeitForImageClassification if a.task == "classification" else BeitForSemanticSegmentation)(config).eval()
with torch.no_grad():
    for n, prm in model.named_parameters():
        prm.copy_(torch.randn_like(prm) * 0.02 + (1.0 if "layernorm" in n and n.endswith("weight") else 0.0))
if not os.path.exists(os.path.join(a.out, "model.safetensors")):
    model.save_pretrained(a.out)
if a.dtype == "bf16":
    model = model.to(torch.bfloat16)
amp = torch.autocast("cpu", dtype=torch.bfloat16) if a.dtype == "autocast" else contextlib.nullcontext()
for b in a.batch:
    x = torch.randn(b, 3, a.image_size, a.image_size)
    np.save(os.path.join(a.out, f"pixel_values_b{b}.npy"), x.numpy())
    if a.dtype == "bf16":
        x = x.to(torch.bfloat16)
    with torch.no_grad(), amp:
        model(pixel_values=x)
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            model(pixel_values=x)
            times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB; transformers {torch.__version__} {a.attn} {a.dtype} {a.task} batch {b}: {med:.3f} s/batch, {b / med:.2f} images/s")
