#!/usr/bin/env python3
"""Flax checkpoint fixtures: tiny Flax BEiT models (transformers 4.57.6's FlaxBeit* classes) with seeded random
weights, saved with save_pretrained as `flax_model.msgpack`, their Flax outputs, and what transformers' PyTorch
classes load from them, written under crates/beit/tests/fixtures/flax/<case>/.

Run by hand (never by CI), in a venv with scripts/requirements.txt and scripts/requirements-flax.txt installed:
    python scripts/gen_flax_fixtures.py

Each model case directory holds:
    config.json             save_pretrained's config
    flax_model.msgpack      save_pretrained's weights (flax.serialization.to_bytes of the params dict itself)
    inputs.safetensors      pixel_values (NCHW: the Flax classes take NCHW and transpose to NHWC themselves)
                            [, bool_masked_pos (u8)]
    outputs.safetensors     every Flax output (float32) under transformers' field names: last_hidden_state,
                            pooler_output, logits, hidden_states.N, attentions.N
    case.json               the PyTorch class the checkpoint loads into, the Flax class, the call options, the inputs
    pt_expected.json        the PyTorch state dict after transformers' Flax-to-PyTorch loading: name, shape, dtype,
                            float64 `sum` and layout-sensitive `wsum` of every tensor; `loaded_from_flax` (the names
                            filled from the Flax file) and `not_loaded` (state-dict names it left alone)
    flax_raw.json           the Flax leaves as flax.serialization.msgpack_restore reads them: '.'-joined name, shape,
                            dtype, sum, wsum, in file order

`from_pretrained(dir, from_flax=True)` is broken with transformers 4.57.6 and torch 2.x: it builds the model on the
meta device and its load_state_dict copies are no-ops, so every parameter stays `meta`. The script asserts that, then
runs the loader that from_pretrained calls (`load_flax_checkpoint_in_pytorch_model`: from_bytes, then
load_flax_weights_in_pytorch_model) on a real instance of the PyTorch class, and checks that this PyTorch model
reproduces the Flax outputs (max abs difference < 1e-4).

The `dtypes` case is not a model: a hand-made Flax state {"params": ..., "batch_stats": ...} holding every dtype the
reader supports, a numpy scalar leaf (msgpack ext type 3), a rank-3 `kernel`, and arrays split in
`__msgpack_chunked_array__` chunks (flax.serialization.MAX_CHUNK_SIZE lowered to make them at this size), converted
by transformers' load_flax_weights_in_pytorch_model into a stand-in model whose state dict has the converted names.
"""
import json
import os
import shutil

import flax
import flax.serialization
import jax
import numpy as np
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitModel,
    FlaxBeitForImageClassification,
    FlaxBeitForMaskedImageModeling,
    FlaxBeitModel,
)
from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

assert transformers.__version__ == "4.57.6", transformers.__version__

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "flax")

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
    "BeitModel": (FlaxBeitModel, BeitModel),
    "BeitForMaskedImageModeling": (FlaxBeitForMaskedImageModeling, BeitForMaskedImageModeling),
    "BeitForImageClassification": (FlaxBeitForImageClassification, BeitForImageClassification),
}

ALL = dict(output_hidden_states=True, output_attentions=True)


def randomize(params, seed):
    """Seeded random weights far from the initial ones (zeros and ones hide bugs)."""
    rng = np.random.RandomState(seed)
    flat = flatten_dict(flax.core.unfreeze(params))
    out = {}
    for key in flat:  # the model's own (deterministic) order
        shape = flat[key].shape
        noise = rng.standard_normal(shape).astype(np.float32)
        leaf = key[-1]
        if leaf == "scale":  # LayerNorm
            v = 1.0 + 0.2 * noise
        elif leaf in ("relative_position_bias_table", "position_embeddings"):
            v = 0.5 * noise
        elif leaf.startswith("lambda_"):
            v = 0.5 + 0.3 * noise
        else:
            v = 0.3 * noise
        out[key] = np.asarray(v, dtype=np.float32)
    return unflatten_dict(out)


def checksums(values):
    """`sum`: the float64 sum; `wsum`: the sum weighted by (row-major flat index % 7) + 1, which sees a layout."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    weights = (np.arange(flat.size) % 7 + 1).astype(np.float64)
    return {"sum": float(flat.sum()), "wsum": float((flat * weights).sum())}


def tensor_entry(name, arr):
    arr = np.asarray(arr)
    return {"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), **checksums(arr)}


def torch_entry(name, t):
    t = t.detach()
    return {
        "name": name,
        "shape": list(t.shape),
        "dtype": str(t.dtype).replace("torch.", ""),
        **checksums(t.to(torch.float64).numpy()),
    }


def flax_raw(path):
    """The leaves as flax restores them (what read_flax_msgpack returns), in file order."""
    with open(path, "rb") as f:
        state = flax.serialization.msgpack_restore(f.read())
    return [tensor_entry(".".join(k), v) for k, v in flatten_dict(state).items()]


def convert_capturing(pt_model, flax_state):
    """Runs transformers' load_flax_weights_in_pytorch_model, capturing which state-dict entries it filled."""
    captured = {}
    original = pt_model.load_state_dict

    def capture(state_dict, *args, **kwargs):
        captured.update(state_dict)
        return original(state_dict, *args, **kwargs)

    before = {k: v for k, v in pt_model.state_dict().items()}
    pt_model.load_state_dict = capture
    try:
        load_flax_weights_in_pytorch_model(pt_model, flax_state)
    finally:
        del pt_model.load_state_dict
    loaded = [k for k, v in captured.items() if v is not before[k]]
    return captured, loaded


def dump_json(path, obj):
    """Compact JSON with one tensor entry per line (the fixtures stay small and diffable)."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            items = ",\n".join("  " + json.dumps(e) for e in v)
            lines.append(f"{json.dumps(k)}: [\n{items}\n]")
        else:
            lines.append(f"{json.dumps(k)}: {json.dumps(v)}")
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")


def pixels(seed, batch, channels, height, width):
    return np.random.RandomState(seed).standard_normal((batch, channels, height, width)).astype(np.float32)


def mask(seed, batch, num_patches, count):
    rng = np.random.RandomState(seed)
    m = np.zeros((batch, num_patches), dtype=bool)
    for b in range(batch):
        m[b, rng.permutation(num_patches)[:count]] = True
    return m


def save_case(name, cls_name, config_kw, seed, inputs, call, id2label=None):
    flax_cls, pt_cls = CLASSES[cls_name]
    kw = dict(TINY)
    kw.update(config_kw)
    if id2label is not None:
        kw["id2label"] = id2label
        kw["label2id"] = {v: k for k, v in id2label.items()}
    config = BeitConfig(**kw)
    model = flax_cls(config, seed=seed)
    model.params = randomize(model.params, seed)

    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    model.save_pretrained(out_dir)  # flax_model.msgpack (to_bytes(params)) + config.json
    msgpack_path = os.path.join(out_dir, "flax_model.msgpack")

    outputs = model(**inputs, **call, return_dict=True)
    tensors = {}
    for field, value in outputs.items():
        if value is None:
            continue
        if isinstance(value, tuple):
            for i, v in enumerate(value):
                tensors[f"{field}.{i}"] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
        else:
            tensors[field] = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
    save_file(tensors, os.path.join(out_dir, "outputs.safetensors"))

    stored_inputs = {}
    for k, v in inputs.items():
        stored_inputs[k] = np.ascontiguousarray(v.astype(np.uint8) if v.dtype == bool else v)
    save_file(stored_inputs, os.path.join(out_dir, "inputs.safetensors"))
    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump(
            {"class": cls_name, "flax_class": flax_cls.__name__, "call": call, "inputs": sorted(inputs), "seed": seed},
            f,
            indent=2,
        )

    # What the PyTorch class loads from the Flax file. `from_pretrained(dir, from_flax=True)` is broken in
    # transformers 4.57.6 with torch 2.x: it builds the model on the meta device, so load_state_dict's copies are
    # no-ops and every parameter stays `meta`. Its loader, load_flax_checkpoint_in_pytorch_model (from_bytes, then
    # load_flax_weights_in_pytorch_model), is therefore run here on a real instance, as _load_from_flax would.
    broken = pt_cls.from_pretrained(out_dir, from_flax=True, attn_implementation="eager")
    assert {str(p.device) for p in broken.parameters()} == {"meta"}, "from_flax works again: use it"
    del broken
    pt_config = BeitConfig.from_pretrained(out_dir)
    pt_config._attn_implementation = "eager"
    torch.manual_seed(0)
    pt = pt_cls(pt_config).eval()
    with open(msgpack_path, "rb") as f:
        state = flax.serialization.from_bytes(flax_cls, f.read())
    captured, loaded = convert_capturing(pt, state)
    sd = pt.state_dict()
    for k in loaded:
        assert torch.equal(captured[k].to(sd[k].dtype), sd[k]), k
    raw = flax_raw(msgpack_path)
    assert len(loaded) == len(raw), f"{name}: {len(raw)} Flax leaves but {len(loaded)} loaded (unexpected keys?)"
    not_loaded = [k for k in sd if k not in set(loaded)]
    dump_json(
        os.path.join(out_dir, "pt_expected.json"),
        {
            "class": cls_name,
            "not_loaded": not_loaded,
            "loaded_from_flax": loaded,
            "tensors": [torch_entry(k, v) for k, v in sd.items()],
        },
    )
    dump_json(os.path.join(out_dir, "flax_raw.json"), {"tensors": raw})

    # The ground truth check: PyTorch, loaded from the Flax file, reproduces the Flax outputs.
    with torch.no_grad():
        pt_out = pt(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **call, return_dict=True)
    worst = 0.0
    for field, value in pt_out.items():
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            key = f"{field}.{i}" if isinstance(value, tuple) else field
            diff = float(np.abs(v.numpy() - tensors[key]).max())
            worst = max(worst, diff)
            assert diff < 1e-4, f"{name}: {key} differs from Flax by {diff}"
    print(f"{name}: {flax_cls.__name__} -> {cls_name}; outputs {sorted(tensors)}; max |pt - flax| {worst:.2e}")


class StandIn:
    """A stand-in PyTorch model for transformers' converter: a state dict with the given names and shapes."""

    base_model_prefix = "beit"

    def __init__(self, shapes):
        self.sd = {k: torch.zeros(s) for k, s in shapes.items()}
        self.loaded = None

    def state_dict(self):
        return dict(self.sd)

    def load_state_dict(self, sd):
        self.loaded = sd


def dtypes_case():
    """Every supported dtype, numpy scalar leaves, chunked arrays, batch_stats, and the renaming rules."""
    name = "dtypes"
    rng = np.random.RandomState(99)
    n = lambda *s: rng.standard_normal(s)
    params = {
        "conv": {"kernel": n(2, 3, 4, 5).astype(np.float32), "bias": n(5).astype(np.float32)},
        "dense": {"kernel": n(6, 7).astype(np.float16), "bias": n(7).astype(np.float64)},
        # Dense kernel of rank 3: transformers' `.T` reverses every axis.
        "dense3": {"kernel": n(2, 3, 4).astype(np.float32)},
        "norm": {"scale": np.asarray(n(9), dtype=jax.numpy.bfloat16), "bias": n(9).astype(np.float32)},
        "embed": {"embedding": n(40, 8).astype(np.float32)},  # 1280 bytes: chunked below
        "ints": {
            "i32": rng.randint(-1000, 1000, (3, 4)).astype(np.int32),
            "i64": rng.randint(-(10**12), 10**12, (5,)).astype(np.int64),
            "u8": rng.randint(0, 256, (2, 2, 3)).astype(np.uint8),
            "flag": rng.randint(0, 2, (7,)).astype(bool),
            "empty": np.zeros((0, 3), dtype=np.float32),
        },
        "scalar": np.float32(2.5),  # a numpy scalar: msgpack ext type 3
        "cls_token": n(1, 1, 4).astype(np.float32),
        "bigbf": np.asarray(n(300), dtype=jax.numpy.bfloat16),  # 600 bytes: chunked below
    }
    state = {"params": params, "batch_stats": {"bn": {"mean": n(5).astype(np.float32), "var": rng.rand(5).astype(np.float32)}}}

    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    path = os.path.join(out_dir, "flax_model.msgpack")
    saved = flax.serialization.MAX_CHUNK_SIZE
    flax.serialization.MAX_CHUNK_SIZE = 512  # bytes: arrays over it are written as __msgpack_chunked_array__
    try:
        data = flax.serialization.to_bytes(state)
    finally:
        flax.serialization.MAX_CHUNK_SIZE = saved
    assert b"__msgpack_chunked_array__" in data
    with open(path, "wb") as f:
        f.write(data)

    with open(path, "rb") as f:
        restored = flax.serialization.from_bytes(FlaxBeitModel, f.read())
    raw = flax_raw(path)

    # Our reading of the rules, to name the stand-in's state dict; transformers' converter is then the judge.
    def guess(k, v):
        k = list(k)
        v = np.asarray(v, dtype=np.float32 if v.dtype == jax.numpy.bfloat16 else v.dtype)
        if k[-1] == "kernel" and v.ndim == 4:
            k[-1], v = "weight", v.transpose(3, 2, 0, 1)
        elif k[-1] == "kernel":
            k[-1], v = "weight", v.T
        elif k[-1] in ("scale", "embedding"):
            k[-1] = "weight"
        elif "mean" in k[-1]:
            k[-1] = "running_mean"
        elif "var" in k[-1]:
            k[-1] = "running_var"
        return ".".join(k[1:]), v.shape

    shapes = dict(guess(k, v) for k, v in flatten_dict(restored).items())
    stand_in = StandIn(shapes)
    load_flax_weights_in_pytorch_model(stand_in, restored)
    loaded = stand_in.loaded
    replaced = [k for k in loaded if loaded[k] is not stand_in.sd[k]]
    assert len(replaced) == len(raw) == len(loaded), (len(replaced), len(raw), len(loaded))
    dump_json(
        os.path.join(out_dir, "pt_expected.json"),
        {
            "class": None,
            "not_loaded": [],
            "loaded_from_flax": replaced,
            "tensors": [torch_entry(k, v) for k, v in loaded.items()],
        },
    )
    dump_json(os.path.join(out_dir, "flax_raw.json"), {"tensors": raw})
    print(f"{name}: {len(raw)} leaves, {len(data)} bytes")


def main():
    os.makedirs(ROOT, exist_ok=True)
    # FlaxBeitModel: per-layer relative position bias, layer scale, mean pooling.
    save_case(
        "model_relpos", "BeitModel",
        dict(use_relative_position_bias=True),
        11, dict(pixel_values=pixels(11, 2, 3, 32, 32)), ALL,
    )
    # Masked image modeling: mask token, shared relative position bias, CLS pooling (final layernorm in the model).
    save_case(
        "mim_shared", "BeitForMaskedImageModeling",
        dict(use_mask_token=True, use_shared_relative_position_bias=True, use_mean_pooling=False),
        12, dict(pixel_values=pixels(12, 2, 3, 32, 32), bool_masked_pos=mask(12, 2, 16, 6)), ALL,
    )
    # Classification, absolute position embeddings, no layer scale (no lambda_1/lambda_2).
    labels = {i: f"label_{i}" for i in range(5)}
    save_case(
        "cls_abspos_noscale", "BeitForImageClassification",
        dict(use_absolute_position_embeddings=True, layer_scale_init_value=0.0),
        13, dict(pixel_values=pixels(13, 1, 3, 32, 32)), ALL, id2label=labels,
    )
    # Classification, absolute position embeddings, with layer scale, gelu_new.
    save_case(
        "cls_abspos_scale", "BeitForImageClassification",
        dict(use_absolute_position_embeddings=True, layer_scale_init_value=0.1, hidden_act="gelu_new"),
        14, dict(pixel_values=pixels(14, 1, 3, 32, 32)), ALL, id2label=labels,
    )
    dtypes_case()
    total = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs
    )
    print(f"total {total} bytes under {ROOT}")
    print(f"flax {flax.__version__} jax {jax.__version__} transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
