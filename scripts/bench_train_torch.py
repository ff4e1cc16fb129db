#!/usr/bin/env python3
"""Training throughput of transformers' BEiT, to set beside `beit train`'s images/s: forward + backward + AdamW
step on a synthetic batch, after 5 warm-up steps, on 2 threads.

    python scripts/bench_train_torch.py [--steps 40]          # classification, the digits config, batch 32, 16x16
    python scripts/bench_train_torch.py --task semantic-segmentation --config runs/seg/last/config.json \\
        --batch 8 --image-size 32                              # the config `beit train` saved, same batch and size
    python scripts/bench_train_torch.py --config base --batch 8 --image-size 224 --autocast   # bf16 autocast

--config takes a config.json (models/digits-config.json by default; a trained checkpoint's config keeps its head
and labels) or `base` (microsoft/beit-base-patch16-224's shape). Prints one line; --json prints one JSON object.
"""
import argparse
import contextlib
import json
import os
import time

import torch
from transformers import BeitConfig, BeitForImageClassification, BeitForSemanticSegmentation

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
p = argparse.ArgumentParser()
p.add_argument("--task", choices=["image-classification", "semantic-segmentation"], default="image-classification")
p.add_argument("--config", default=os.path.join(ROOT, "models", "digits-config.json"))
p.add_argument("--image-size", type=int, default=None, help="default: the config's image_size")
p.add_argument("--num-labels", type=int, default=None, help="default: the config's labels, else 10")
p.add_argument("--steps", type=int, default=40)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--autocast", action="store_true", help="torch.autocast('cpu', dtype=torch.bfloat16)")
p.add_argument("--json", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
if a.config == "base":
    cfg = dict(use_mean_pooling=True, use_relative_position_bias=True, layer_scale_init_value=0.1, drop_path_rate=0.1)
else:
    cfg = json.load(open(a.config))
    for k in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
config = BeitConfig(**cfg)
if a.num_labels is not None or not cfg.get("id2label"):
    n = a.num_labels or 10
    config.id2label = {i: str(i) for i in range(n)}
    config.label2id = {str(i): i for i in range(n)}
if a.image_size is not None:
    config.image_size = a.image_size
size = config.image_size
config._attn_implementation = "sdpa" if a.config == "base" else "eager"
labels = config.num_labels
if a.task == "semantic-segmentation":
    model = BeitForSemanticSegmentation(config).train()
    y = torch.randint(0, labels, (a.batch, size, size))
else:
    model = BeitForImageClassification(config).train()
    y = torch.randint(0, labels, (a.batch,))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
x = torch.randn(a.batch, 3, size, size)
amp = torch.autocast("cpu", dtype=torch.bfloat16) if a.autocast else contextlib.nullcontext()
for i in range(5 + a.steps):
    if i == 5:
        t = time.perf_counter()
    with amp:
        if a.task == "semantic-segmentation":
            loss = model(pixel_values=x, labels=y).loss
        else:
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y, label_smoothing=0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()
dt = time.perf_counter() - t
ips = a.steps * a.batch / dt
if a.json:
    print(json.dumps({"task": a.task, "images_per_s": ips, "batch": a.batch, "image_size": size,
                      "autocast": a.autocast, "torch": torch.__version__, "threads": a.threads}))
else:
    print(f"torch {torch.__version__}: {ips:.1f} training images/s ({a.task}, batch {a.batch}, {size}x{size}"
          f"{', bf16 autocast' if a.autocast else ''})")
