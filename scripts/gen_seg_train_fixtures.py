#!/usr/bin/env python3
"""Gradient-parity fixture for BeitForSemanticSegmentation in training mode (BatchNorm on the batch's statistics),
written under crates/beit/tests/fixtures/model/train_seg/ for crates/beit/tests/seg_train_step.rs.

Run by hand (never by CI), in a venv with scripts/requirements.txt installed:
    python scripts/gen_seg_train_fixtures.py

The directory holds:
    config.json             save_pretrained's config
    model.safetensors       the weights before the step (BatchNorm running statistics included)
    inputs.safetensors      pixel_values (2, 3, 32, 32), labels (2, 32, 32) int64 with 255 (ignored) pixels
    outputs.safetensors     loss (1,)
    grads.safetensors       grad.<name> for every parameter torch gives a gradient
    no_grad.json            the parameters torch leaves without one (the last encoder layer: transformers' features
                            are hidden_states[i - 1] for i in out_indices, so the last layer feeds nothing)
    running.safetensors     every BatchNorm's running_mean, running_var and num_batches_tracked after the forward
"""
import json
import os
import shutil
import sys

import torch
import transformers
from fixture_common import pixels, randomize
from safetensors.torch import save_file
from transformers import BeitConfig, BeitForSemanticSegmentation

assert transformers.__version__ == "4.57.6", transformers.__version__

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "model",
                   "train_seg")
SEED = 40


def main():
    torch.manual_seed(SEED)
    labels3 = {i: f"seg_{i}" for i in range(3)}
    config = BeitConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=32,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        use_relative_position_bias=True,
        out_indices=[1, 2, 3, 4],
        use_auxiliary_head=True,
        auxiliary_loss_weight=0.4,
        auxiliary_channels=8,
        auxiliary_num_convs=2,
        auxiliary_concat_input=True,
        id2label=labels3,
        label2id={v: k for k, v in labels3.items()},
    )
    config._attn_implementation = "eager"
    model = BeitForSemanticSegmentation(config)
    randomize(model, SEED)  # BatchNorm running statistics included, away from 0 and 1
    bn_buffers = [n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    assert len(bn_buffers) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    model.save_pretrained(OUT, safe_serialization=True)

    g = torch.Generator().manual_seed(SEED)
    pixel_values = pixels(SEED, 2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 32, 32), generator=g)
    labels[0, :4, :] = 255  # ignored rows
    labels[1, :, 27:] = 255  # ignored columns
    save_file({"pixel_values": pixel_values.contiguous(), "labels": labels.contiguous()},
              os.path.join(OUT, "inputs.safetensors"))

    # Dropout and drop path are 0: train mode differs from eval only by BatchNorm.
    model.train()
    out = model(pixel_values=pixel_values, labels=labels, return_dict=True)
    out.loss.backward()
    save_file({"loss": out.loss.detach().reshape(1).contiguous()}, os.path.join(OUT, "outputs.safetensors"))
    grads = {f"grad.{n}": p.grad.clone().contiguous() for n, p in model.named_parameters() if p.grad is not None}
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    save_file(grads, os.path.join(OUT, "grads.safetensors"))
    with open(os.path.join(OUT, "no_grad.json"), "w") as f:
        json.dump(no_grad, f, indent=1)
    running = {n: b.clone().contiguous() for n, b in model.named_buffers()
               if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    save_file(running, os.path.join(OUT, "running.safetensors"))
    print(f"train_seg: loss {out.loss.item():.6f}, {len(grads)} gradients, {len(no_grad)} parameters without one, "
          f"{len(running)} BatchNorm buffers")


if __name__ == "__main__":
    sys.exit(main())
