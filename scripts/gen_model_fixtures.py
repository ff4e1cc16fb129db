#!/usr/bin/env python3
"""Parity fixtures for the BEiT models: tiny BeitConfig variants with seeded random weights, their inputs and
transformers 4.57.6's outputs, written under crates/beit/tests/fixtures/model/<case>/.

Run by hand (never by CI), in a venv with scripts/requirements.txt installed:
    python scripts/gen_model_fixtures.py

Each case directory holds:
    config.json             save_pretrained's config
    model.safetensors       save_pretrained's weights (safetensors)
    pytorch_model.bin       (some cases) the same weights as save_pretrained(safe_serialization=False) writes them
    *.npy                   (some cases) the inputs as .npy, as `beit forward` reads them
    inputs.safetensors      pixel_values [, bool_masked_pos (u8), head_mask, labels]
    outputs.safetensors     every output tensor under transformers' field names
    case.json               the class and call options used
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from fixture_common import pixels, randomize
from safetensors.torch import save_file
from transformers import (
    BeitBackbone,
    BeitConfig,
    BeitForSemanticSegmentation,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitModel,
)

assert transformers.__version__ == "4.57.6", transformers.__version__

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "model")

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
    vocab_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
)

CLASSES = {
    "BeitModel": BeitModel,
    "BeitForMaskedImageModeling": BeitForMaskedImageModeling,
    "BeitForImageClassification": BeitForImageClassification,
    "BeitForSemanticSegmentation": BeitForSemanticSegmentation,
    "BeitBackbone": BeitBackbone,
}


def save_case(name, cls_name, config_kw, seed, inputs, call, save_bin=False, id2label=None, npy=False, grads=False):
    torch.manual_seed(seed)
    kw = dict(TINY)
    kw.update(config_kw)
    if id2label is not None:
        kw["id2label"] = id2label
        kw["label2id"] = {v: k for k, v in id2label.items()}
    config = BeitConfig(**kw)
    config._attn_implementation = "eager"
    model = CLASSES[cls_name](config)
    randomize(model, seed)
    model.eval()

    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if save_bin:
        model.save_pretrained(out_dir, safe_serialization=False)

    if grads:
        # One training step's gradients (dropout and drop path are 0 in TINY, so train mode is deterministic).
        model.train()
        with torch.enable_grad():
            out = model(**inputs, **call, return_dict=True)
            out.loss.backward()
        save_file(
            {f"grad.{n}": p.grad.clone().contiguous() for n, p in model.named_parameters() if p.grad is not None},
            os.path.join(out_dir, "grads.safetensors"),
        )
        model.eval()
    with torch.no_grad():
        outputs = model(**inputs, **call, return_dict=True)

    tensors = {}
    for field, value in outputs.items():
        if value is None:
            continue
        if isinstance(value, tuple):
            for i, v in enumerate(value):
                tensors[f"{field}.{i}"] = v.clone().contiguous()
        else:
            tensors[field] = value.clone().contiguous()
    if "loss" in tensors:
        tensors["loss"] = tensors["loss"].reshape(1)
    save_file(tensors, os.path.join(out_dir, "outputs.safetensors"))

    stored_inputs = {}
    for k, v in inputs.items():
        if v.dtype == torch.bool:
            v = v.to(torch.uint8)
        stored_inputs[k] = v.contiguous()
    save_file(stored_inputs, os.path.join(out_dir, "inputs.safetensors"))
    if npy:  # what `beit forward` reads, for the CLI tests and the README
        for k, v in inputs.items():
            np.save(os.path.join(out_dir, f"{k}.npy"), v.numpy())
    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump({"class": cls_name, "call": call, "inputs": sorted(inputs), "seed": seed}, f, indent=2)
    print(f"{name}: {cls_name} {sorted(tensors)}")


def mask(seed, batch, num_patches, count):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(batch, num_patches, dtype=torch.bool)
    for b in range(batch):
        m[b, torch.randperm(num_patches, generator=g)[:count]] = True
    return m


ALL = dict(output_hidden_states=True, output_attentions=True)


def main():
    torch.set_grad_enabled(False)
    os.makedirs(ROOT, exist_ok=True)

    # Per-layer relative position bias, layer scale, mean pooling (the fine-tuned classification checkpoints' shape).
    save_case(
        "relpos_layer", "BeitModel",
        dict(use_relative_position_bias=True, num_hidden_layers=3),
        1, dict(pixel_values=pixels(1, 2, 3, 32, 32)), ALL,
    )
    # Shared relative position bias, CLS pooling (layernorm on the sequence), gelu_new.
    save_case(
        "relpos_shared_cls", "BeitModel",
        dict(use_shared_relative_position_bias=True, use_mean_pooling=False, hidden_act="gelu_new"),
        2, dict(pixel_values=pixels(2, 2, 3, 32, 32)), ALL,
    )
    # Absolute position embeddings, no layer scale (lambda_1/2 absent), relu.
    save_case(
        "abspos_noscale", "BeitModel",
        dict(use_absolute_position_embeddings=True, layer_scale_init_value=0.0, hidden_act="relu"),
        3, dict(pixel_values=pixels(3, 1, 3, 32, 32)), ALL, save_bin=True,
    )
    # Absolute positions at another, non-square resolution: bicubic interpolation of the table.
    save_case(
        "abspos_interp_nonsquare", "BeitModel",
        dict(use_absolute_position_embeddings=True, image_size=32),
        4, dict(pixel_values=pixels(4, 2, 3, 48, 40)), dict(ALL, interpolate_pos_encoding=True),
    )
    # Absolute positions, square but larger input (always interpolated by transformers).
    save_case(
        "abspos_larger", "BeitModel",
        dict(use_absolute_position_embeddings=True, image_size=32),
        5, dict(pixel_values=pixels(5, 1, 3, 48, 48)), dict(output_hidden_states=True),
    )
    # Per-layer relative bias at a non-square resolution: the table is resized bilinearly to the new window.
    save_case(
        "relpos_layer_nonsquare", "BeitModel",
        dict(use_relative_position_bias=True),
        6, dict(pixel_values=pixels(6, 2, 3, 48, 64)), ALL,
    )
    # Shared relative bias, larger input with interpolate_pos_encoding, both tables (abs + rel).
    save_case(
        "relpos_shared_abspos_interp", "BeitModel",
        dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True),
        7, dict(pixel_values=pixels(7, 1, 3, 40, 56)), dict(ALL, interpolate_pos_encoding=True),
    )
    # Single channel, head_mask, silu, another layer_norm_eps.
    save_case(
        "one_channel_head_mask", "BeitModel",
        dict(num_channels=1, use_relative_position_bias=True, hidden_act="silu", layer_norm_eps=1e-6),
        8,
        dict(pixel_values=pixels(8, 2, 1, 32, 32),
             head_mask=torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]])),
        ALL,
    )
    # Masked image modeling: mask token, shared relative bias, loss on masked positions.
    m = mask(9, 2, 16, 6)
    labels = torch.randint(0, 64, (int(m.sum()),), generator=torch.Generator().manual_seed(9))
    save_case(
        "mim", "BeitForMaskedImageModeling",
        dict(use_mask_token=True, use_shared_relative_position_bias=True, use_mean_pooling=False,
             layer_scale_init_value=0.1),
        9, dict(pixel_values=pixels(9, 2, 3, 32, 32), bool_masked_pos=m, labels=labels), ALL, save_bin=True, npy=True,
    )
    # Mask token with absolute positions, no labels.
    save_case(
        "mim_abspos_nolabels", "BeitForMaskedImageModeling",
        dict(use_mask_token=True, use_absolute_position_embeddings=True),
        10, dict(pixel_values=pixels(10, 1, 3, 32, 32), bool_masked_pos=mask(10, 1, 16, 9)), {},
    )
    labels5 = {i: f"class_{i}" for i in range(5)}
    # Single-label classification with cross-entropy.
    save_case(
        "cls_single", "BeitForImageClassification",
        dict(use_relative_position_bias=True, hidden_act="gelu_python"),
        11, dict(pixel_values=pixels(11, 3, 3, 32, 32), labels=torch.tensor([0, 4, 2])), ALL,
        save_bin=True, id2label=labels5, npy=True,
    )
    # Multi-label classification: BCE with logits.
    save_case(
        "cls_multi", "BeitForImageClassification",
        dict(use_shared_relative_position_bias=True, use_mean_pooling=False,
             problem_type="multi_label_classification"),
        12,
        dict(pixel_values=pixels(12, 2, 3, 32, 32),
             labels=torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0]])),
        {}, id2label=labels5,
    )
    # Regression (num_labels == 1): MSE.
    save_case(
        "cls_regression", "BeitForImageClassification",
        dict(use_absolute_position_embeddings=True, num_labels=1),
        13, dict(pixel_values=pixels(13, 2, 3, 32, 32), labels=torch.tensor([0.5, -1.25])), {},
    )
    # Float labels with several classes and no problem_type: transformers picks multi-label.
    save_case(
        "cls_float_labels", "BeitForImageClassification",
        dict(use_relative_position_bias=True),
        14,
        dict(pixel_values=pixels(14, 2, 3, 32, 32), labels=torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),
        {}, id2label={0: "a", 1: "b", 2: "c"},
    )
    # Semantic segmentation: UperNet + FCN auxiliary head on four intermediate layers.
    seg = dict(use_relative_position_bias=True, image_size=32, auxiliary_channels=8, num_hidden_layers=4,
               out_indices=[1, 2, 3, 4], hidden_size=16, intermediate_size=24)
    seg_labels = {i: f"seg_{i}" for i in range(5)}
    g = torch.Generator().manual_seed(20)
    labels = torch.randint(0, 5, (2, 32, 32), generator=g)
    labels[:, :5, :] = 255  # ignored pixels
    save_case(
        "seg_uper_aux1", "BeitForSemanticSegmentation", seg,
        20, dict(pixel_values=pixels(20, 2, 3, 32, 32), labels=labels), ALL, id2label=seg_labels,
    )
    save_case(
        "seg_aux2_concat", "BeitForSemanticSegmentation",
        dict(seg, num_hidden_layers=6, out_indices=[2, 3, 5, 6], auxiliary_num_convs=2, auxiliary_concat_input=True,
             use_shared_relative_position_bias=True, use_relative_position_bias=False, layer_norm_eps=1e-6),
        21,
        dict(pixel_values=pixels(21, 1, 3, 32, 32),
             labels=torch.randint(0, 5, (1, 24, 20), generator=torch.Generator().manual_seed(21))),
        {}, id2label=seg_labels,
    )
    save_case(
        "seg_noaux_scales", "BeitForSemanticSegmentation",
        dict(seg, use_auxiliary_head=False, pool_scales=[1, 3, 5], image_size=48, use_absolute_position_embeddings=True,
             use_relative_position_bias=False),
        22, dict(pixel_values=pixels(22, 2, 3, 48, 48)), dict(output_hidden_states=True), id2label=seg_labels,
    )
    # Backbone: feature maps at several stages, 3-D when not reshaped, the DPT FPN, non-square inputs.
    save_case(
        "backbone_stages", "BeitBackbone",
        dict(use_relative_position_bias=True, num_hidden_layers=3, out_features=["stem", "stage1", "stage3"]),
        23, dict(pixel_values=pixels(23, 2, 3, 48, 32)), ALL,
    )
    save_case(
        "backbone_flat", "BeitBackbone",
        dict(use_absolute_position_embeddings=True, num_hidden_layers=2, out_indices=[-1], reshape_hidden_states=False),
        24, dict(pixel_values=pixels(24, 1, 3, 32, 32)), {},
    )
    save_case(
        "backbone_fpn", "BeitBackbone",
        dict(use_relative_position_bias=True, num_hidden_layers=4, out_indices=[1, 2, 3, 4], add_fpn=True,
             batch_norm_eps=1e-3, hidden_size=16, intermediate_size=24),
        25, dict(pixel_values=pixels(25, 2, 3, 32, 48)), dict(output_hidden_states=True),
    )
    # One training step: loss and the gradient of every parameter.
    save_case(
        "train_cls", "BeitForImageClassification",
        dict(use_relative_position_bias=True), 30,
        dict(pixel_values=pixels(30, 4, 3, 32, 32), labels=torch.tensor([0, 4, 2, 2])), {},
        id2label=labels5, grads=True,
    )
    save_case(
        "train_cls_shared", "BeitForImageClassification",
        dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=True, use_mean_pooling=False,
             hidden_act="gelu_new"), 31,
        dict(pixel_values=pixels(31, 3, 3, 32, 32), labels=torch.tensor([1, 0, 3])), {},
        id2label=labels5, grads=True,
    )
    # Every activation transformers names for hidden_act (one layer each).
    for i, act in enumerate([
        "gelu_10", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate", "laplace", "leaky_relu",
        "linear", "mish", "quick_gelu", "relu2", "relu6", "sigmoid", "swish", "tanh",
    ]):
        save_case(
            f"act_{act}", "BeitModel",
            dict(hidden_act=act, num_hidden_layers=1, use_relative_position_bias=True, hidden_size=16,
                 intermediate_size=24),
            100 + i, dict(pixel_values=pixels(100 + i, 1, 3, 32, 32)), {},
        )


if __name__ == "__main__":
    sys.exit(main())
