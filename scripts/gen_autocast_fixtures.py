#!/usr/bin/env python3
"""One training step of the train_cls fixture's model under torch.autocast("cpu", dtype=torch.bfloat16), as
transformers 4.57.6 and torch compute it: the loss and every parameter's gradient, written beside the fixture's f32
ones as crates/beit/tests/fixtures/model/train_cls/autocast.safetensors (`loss`, `grad.NAME`).

`beit train --precision bf16` is checked against it (crates/beit/tests/train_step.rs). Run by hand (never by CI), in
a venv with scripts/requirements.txt installed, after scripts/gen_model_fixtures.py:
    python scripts/gen_autocast_fixtures.py
"""
import os

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import BeitForImageClassification

assert transformers.__version__ == "4.57.6", transformers.__version__

CASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "model",
                    "train_cls")


def main():
    model = BeitForImageClassification.from_pretrained(CASE, attn_implementation="eager").train()
    inputs = load_file(os.path.join(CASE, "inputs.safetensors"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"], return_dict=True)
    out.loss.backward()
    tensors = {"loss": out.loss.detach().float().reshape(1)}
    tensors.update({f"grad.{n}": p.grad.float().contiguous() for n, p in model.named_parameters() if p.grad is not None})
    save_file(tensors, os.path.join(CASE, "autocast.safetensors"))
    print(f"train_cls autocast: loss {tensors['loss'].item():.6f}, {len(tensors) - 1} gradients")


if __name__ == "__main__":
    main()
