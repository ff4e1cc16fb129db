#!/usr/bin/env python3
"""Training throughput of transformers' BeitForImageClassification for the digits config
(models/digits-config.json), to set beside `beit train`'s images/s: forward + backward + AdamW step, batch 32,
16x16 inputs, 2 threads. Usage: python scripts/bench_train_torch.py [--steps 40]"""
import argparse
import json
import os
import time

import torch
from transformers import BeitConfig, BeitForImageClassification

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "digits-config.json")))
config = BeitConfig(**cfg, num_labels=10)
config._attn_implementation = "eager"
model = BeitForImageClassification(config).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
x = torch.randn(a.batch, 3, config.image_size, config.image_size)
y = torch.randint(0, 10, (a.batch,))
for i in range(5 + a.steps):
    if i == 5:
        t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y, label_smoothing=0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()
dt = time.perf_counter() - t
print(f"torch {torch.__version__}: {a.steps * a.batch / dt:.1f} training images/s (batch {a.batch})")
