#!/usr/bin/env python3
"""Parity fixtures for the rest of the BEiT family: Data2VecVision (transformers 4.57.6) and timm's beit/beitv2
(timm 1.0.31), written under crates/beit/tests/fixtures/family/<case>/.

Run by hand (never by CI), in a venv with scripts/requirements.txt and timm installed:
    python scripts/gen_family_fixtures.py

Each case directory holds (as scripts/gen_model_fixtures.py):
    config.json             transformers' config (data2vec-vision, or beit beside timm weights), or timm's own
                            config.json (save_for_hf: "architecture", "num_classes", "model_args", "pretrained_cfg")
    model.safetensors       the checkpoint as its library saves it (timm: the timm state dict, timm's names)
    pytorch_model.bin       (one timm case) the same state dict as torch.save writes it
    inputs.safetensors      pixel_values [, labels]
    outputs.safetensors     every output under transformers' field names, computed by the checkpoint's own library
    case.json               the class beit-rs must build and the call options used

and timm_names.json: the hyperparameters timm.create_model(name) builds for every beit/beitv2 name, so that the Rust
name -> BeitConfig derivation is checked field by field.
"""
import json
import os
import shutil
import sys

import timm
import timm.models
import torch
import torch.nn.functional as F
import transformers
from fixture_common import pixels, randomize
from safetensors.torch import save_file
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    BeitModel,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    Data2VecVisionForSemanticSegmentation,
    Data2VecVisionModel,
)

assert transformers.__version__ == "4.57.6", transformers.__version__
assert timm.__version__ == "1.0.31", timm.__version__

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "family")

D2V_CLASSES = {
    "Data2VecVisionModel": Data2VecVisionModel,
    "Data2VecVisionForImageClassification": Data2VecVisionForImageClassification,
    "Data2VecVisionForSemanticSegmentation": Data2VecVisionForSemanticSegmentation,
}

TINY = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    image_size=32,
    patch_size=8,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
)

# The tiny timm model every timm case starts from (timm.models.beit.Beit keyword arguments).
TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)


def fresh_dir(name):
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    return out_dir


def write_case(out_dir, cls_name, inputs, outputs, call, seed, **extra):
    tensors = {k: v.detach().clone().contiguous() for k, v in outputs.items()}
    if "loss" in tensors:
        tensors["loss"] = tensors["loss"].reshape(1)
    save_file(tensors, os.path.join(out_dir, "outputs.safetensors"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(out_dir, "inputs.safetensors"))
    with open(os.path.join(out_dir, "case.json"), "w") as f:
        json.dump(dict({"class": cls_name, "call": call, "inputs": sorted(inputs), "seed": seed}, **extra), f, indent=2)
    print(f"{os.path.basename(out_dir)}: {cls_name} {sorted(tensors)}")


def flatten_outputs(outputs):
    tensors = {}
    for field, value in outputs.items():
        if value is None:
            continue
        if isinstance(value, tuple):
            for i, v in enumerate(value):
                tensors[f"{field}.{i}"] = v
        else:
            tensors[field] = value
    return tensors


def save_d2v_case(name, cls_name, config_kw, seed, inputs, call, id2label=None):
    torch.manual_seed(seed)
    kw = dict(TINY)
    kw.update(config_kw)
    if id2label is not None:
        kw["id2label"] = id2label
        kw["label2id"] = {v: k for k, v in id2label.items()}
    config = Data2VecVisionConfig(**kw)
    config._attn_implementation = "eager"
    model = D2V_CLASSES[cls_name](config)
    randomize(model, seed)
    model.eval()
    out_dir = fresh_dir(name)
    model.save_pretrained(out_dir, safe_serialization=True)
    with torch.no_grad():
        outputs = model(**inputs, **call, return_dict=True)
    write_case(out_dir, cls_name, inputs, flatten_outputs(outputs), call, seed)


# --- timm ---------------------------------------------------------------------------------------------------------

def timm_to_transformers(sd, prefix="beit."):
    """The mapping beit-rs implements (crates/beit/src/checkpoint/timm.rs), here only to check in Python that the
    BeitConfig written beside the timm weights makes transformers compute what timm computes."""
    out = {}
    for k, v in sd.items():
        if "relative_position_index" in k:
            continue
        if k == "head.weight" or k == "head.bias":
            out["classifier." + k.split(".")[1]] = v
            continue
        n = k
        for a, b in [
            ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
            ("rel_pos_bias.", "encoder.relative_position_bias."),
            ("fc_norm.", "pooler.layernorm."),
        ]:
            if n.startswith(a):
                n = b + n[len(a):]
        if n == "cls_token":
            n = "embeddings.cls_token"
        elif n == "pos_embed":
            n = "embeddings.position_embeddings"
        elif n.startswith("norm."):
            n = "layernorm." + n[len("norm."):]
        elif n.startswith("blocks."):
            _, i, rest = n.split(".", 2)
            base = f"encoder.layer.{i}."
            if rest == "attn.qkv.weight":
                q, kk, vv = v.chunk(3, dim=0)
                out[prefix + base + "attention.attention.query.weight"] = q
                out[prefix + base + "attention.attention.key.weight"] = kk
                out[prefix + base + "attention.attention.value.weight"] = vv
                continue
            rest = {
                "attn.q_bias": "attention.attention.query.bias",
                "attn.v_bias": "attention.attention.value.bias",
                "attn.relative_position_bias_table": "attention.attention.relative_position_bias.relative_position_bias_table",
                "gamma_1": "lambda_1",
                "gamma_2": "lambda_2",
            }.get(rest, rest)
            for a, b in [
                ("norm1.", "layernorm_before."),
                ("norm2.", "layernorm_after."),
                ("attn.proj.", "attention.output.dense."),
                ("mlp.fc1.", "intermediate.dense."),
                ("mlp.fc2.", "output.dense."),
            ]:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            n = base + rest
        out[prefix + n] = v
    return out


def timm_outputs(model, x, cls_name, labels, output_hidden_states):
    """timm's forward, under transformers' field names for the class beit-rs loads the checkpoint as. Hidden states
    are what transformers returns: the blocks' input (embeddings) and every block's output."""
    hidden = []
    hooks = []
    if output_hidden_states:
        hooks.append(model.blocks[0].register_forward_pre_hook(lambda m, a, kw: hidden.append(a[0]), with_kwargs=True))
        for blk in model.blocks:
            hooks.append(blk.register_forward_hook(lambda m, a, o: hidden.append(o)))
    with torch.no_grad():
        feats = model.forward_features(x)
        out = {}
        if cls_name == "BeitForImageClassification":
            logits = model.forward_head(feats)
            out["logits"] = logits
            if labels is not None:
                out["loss"] = F.cross_entropy(logits, labels)
        else:
            out["last_hidden_state"] = feats
            out["pooler_output"] = model.forward_head(feats, pre_logits=True)
    for h in hooks:
        h.remove()
    for i, h in enumerate(hidden):
        out[f"hidden_states.{i}"] = h
    return out


def check_against_transformers(model, config, cls_name, x, expected):
    """The explicit BeitConfig plus the mapped weights must make transformers match timm (so the fixture's config.json
    says what timm computes)."""
    cls = {"BeitForImageClassification": BeitForImageClassification, "BeitModel": BeitModel}[cls_name]
    hf = cls(config).eval()
    sd = timm_to_transformers(model.state_dict(), "beit." if cls_name != "BeitModel" else "")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not missing and not [u for u in unexpected if not u.startswith("classifier")], (missing, unexpected)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True, return_dict=True)
    key = "logits" if cls_name == "BeitForImageClassification" else "last_hidden_state"
    err = (out[key] - expected[key]).abs().max().item()
    assert err < 1e-5, (cls_name, key, err)


def save_timm_case(name, cls_name, timm_kw, beit_kw, seed, batch, labels=None, call=None, index_buffers=False):
    """A timm.models.beit.Beit state dict (timm's names) beside an explicit transformers BeitConfig: a tiny model
    matches no timm model name."""
    call = call or {}
    torch.manual_seed(seed)
    model = timm.models.beit.Beit(**dict(TIMM_TINY, **timm_kw))
    randomize(model, seed)
    model.eval()
    out_dir = fresh_dir(name)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if index_buffers:
        # Original (unilm) checkpoints carry the relative_position_index buffers: loaders must ignore them.
        for mod_name, mod in model.named_modules():
            if getattr(mod, "relative_position_index", None) is not None:
                sd[(mod_name + "." if mod_name else "") + "relative_position_index"] = mod.relative_position_index.clone()
    save_file(sd, os.path.join(out_dir, "model.safetensors"))

    num_classes = timm_kw.get("num_classes", 1000)
    kw = dict(
        hidden_size=TIMM_TINY["embed_dim"],
        num_hidden_layers=TIMM_TINY["depth"],
        num_attention_heads=TIMM_TINY["num_heads"],
        intermediate_size=int(TIMM_TINY["embed_dim"] * timm_kw.get("mlp_ratio", TIMM_TINY["mlp_ratio"])),
        image_size=TIMM_TINY["img_size"],
        patch_size=TIMM_TINY["patch_size"],
        layer_norm_eps=1e-6,  # timm's LayerNorm
        hidden_act="gelu",
        drop_path_rate=0.0,
        id2label={i: f"timm_{i}" for i in range(num_classes)},
        label2id={f"timm_{i}": i for i in range(num_classes)},
        architectures=[cls_name],
    )
    kw.update(beit_kw)
    config = BeitConfig(**kw)
    config.save_pretrained(out_dir)

    x = pixels(seed, batch, 3, 32, 32)
    inputs = {"pixel_values": x}
    if labels is not None:
        inputs["labels"] = labels
    outputs = timm_outputs(model, x, cls_name, labels, call.get("output_hidden_states", False))
    config._attn_implementation = "eager"
    check_against_transformers(model, config, cls_name, x, outputs)
    write_case(out_dir, cls_name, inputs, outputs, call, seed, timm_kwargs=dict(TIMM_TINY, **timm_kw))


def save_timm_hub_case(name, cls_name, arch, timm_kw, seed, batch, labels=None, call=None, label_names=None, both=False):
    """timm.create_model(arch, **timm_kw) saved as timm saves for the Hub (save_for_hf): timm's own config.json with
    "architecture" and the "model_args" that shrink it, and no model_type."""
    call = call or {}
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **dict(TIMM_TINY, **timm_kw))
    randomize(model, seed)
    model.eval()
    out_dir = fresh_dir(name)
    timm.models.save_for_hf(
        model, out_dir, safe_serialization="both" if both else True,
        model_config={"label_names": label_names} if label_names else None,
    )
    # timm reads it back as it wrote it.
    again = timm.create_model("local-dir:" + out_dir, pretrained=True).eval()
    x = pixels(seed, batch, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.forward_features(x), model.forward_features(x))
    inputs = {"pixel_values": x}
    if labels is not None:
        inputs["labels"] = labels
    outputs = timm_outputs(model, x, cls_name, labels, call.get("output_hidden_states", False))
    write_case(out_dir, cls_name, inputs, outputs, call, seed, timm_architecture=arch)


# The beit/beitv2 architectures timm registers (beit3 is another model).
TIMM_NAMES = [
    "beit_base_patch16_224",
    "beit_base_patch16_384",
    "beit_large_patch16_224",
    "beit_large_patch16_384",
    "beit_large_patch16_512",
    "beitv2_base_patch16_224",
    "beitv2_large_patch16_224",
]


def timm_hyperparameters(model):
    blk = model.blocks[0]
    norm = model.fc_norm if isinstance(model.norm, torch.nn.Identity) else model.norm
    return dict(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features,
        patch_size=list(model.patch_embed.patch_size),
        image_size=list(model.patch_embed.img_size),
        num_channels=model.in_chans,
        use_absolute_position_embeddings=model.pos_embed is not None,
        use_relative_position_bias=blk.attn.relative_position_bias_table is not None,
        use_shared_relative_position_bias=model.rel_pos_bias is not None,
        layer_scale_init_value=float(blk.gamma_1[0]) if blk.gamma_1 is not None else 0.0,
        layer_norm_eps=norm.eps,
        use_mean_pooling=model.global_pool == "avg" and not isinstance(model.fc_norm, torch.nn.Identity),
        qkv_bias=blk.attn.q_bias is not None,
        hidden_act=type(blk.mlp.act).__name__,
        num_labels=model.num_classes,
    )


def save_timm_names():
    names = []
    for arch in TIMM_NAMES:
        model = timm.create_model(arch, pretrained=False)
        names.append(dict(name=arch, **timm_hyperparameters(model)))
        del model
    # Every pretrained tag: the architecture it builds and its class count (the head's rows).
    tags = []
    for tagged in timm.list_pretrained("beit*"):
        arch = tagged.split(".")[0]
        if arch not in TIMM_NAMES:
            continue
        cfg = timm.models.get_pretrained_cfg(tagged)
        tags.append(dict(name=tagged, architecture=arch, num_labels=cfg.num_classes))
    with open(os.path.join(ROOT, "timm_names.json"), "w") as f:
        json.dump({"timm_version": timm.__version__, "architectures": names, "pretrained": tags}, f, indent=1)
    print(f"timm_names.json: {len(names)} architectures, {len(tags)} pretrained tags")


def main():
    torch.set_grad_enabled(False)
    os.makedirs(ROOT, exist_ok=True)

    # Data2VecVisionModel: no pooler (add_pooling_layer defaults to False), per-layer relative bias, mean pooling.
    save_d2v_case(
        "d2v_model", "Data2VecVisionModel",
        dict(use_relative_position_bias=True),
        301, dict(pixel_values=pixels(301, 2, 3, 32, 32)), dict(output_hidden_states=True, output_attentions=True),
    )
    # Classification: shared relative bias, CLS pooling, cross-entropy on labels.
    save_d2v_case(
        "d2v_cls", "Data2VecVisionForImageClassification",
        dict(use_shared_relative_position_bias=True, use_mean_pooling=False, layer_norm_eps=1e-6),
        302, dict(pixel_values=pixels(302, 1, 3, 32, 32), labels=torch.tensor([2])),
        dict(output_hidden_states=True), id2label={0: "a", 1: "b", 2: "c"},
    )
    # Semantic segmentation with data2vec's default out_indices [3, 5, 7, 11]: 12 layers of width 8.
    g = torch.Generator().manual_seed(303)
    labels = torch.randint(0, 4, (1, 32, 32), generator=g)
    labels[:, :4, :] = 255  # ignored pixels
    save_d2v_case(
        "d2v_seg", "Data2VecVisionForSemanticSegmentation",
        dict(hidden_size=8, num_attention_heads=2, intermediate_size=12, num_hidden_layers=12, auxiliary_channels=4,
             use_relative_position_bias=True, use_absolute_position_embeddings=True),
        303, dict(pixel_values=pixels(303, 1, 3, 32, 32), labels=labels), {},
        id2label={i: f"seg_{i}" for i in range(4)},
    )

    # timm: per-layer relative bias, layer scale (init_values), mean pooling with fc_norm; cross-entropy on labels.
    save_timm_case(
        "timm_relpos_mean", "BeitForImageClassification",
        dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, num_classes=5, global_pool="avg"),
        dict(use_relative_position_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True),
        311, 2, labels=torch.tensor([4, 1]), call=dict(output_hidden_states=True),
    )
    # timm: absolute positions, no layer scale, CLS pooling (`norm` on the sequence), loaded as BeitModel.
    save_timm_case(
        "timm_abspos_cls", "BeitModel",
        dict(use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=None, num_classes=5, global_pool="token"),
        dict(use_absolute_position_embeddings=True, layer_scale_init_value=0.0, use_mean_pooling=False),
        312, 1, call=dict(output_hidden_states=True),
    )
    # timm: shared relative bias (rel_pos_bias), layer scale, another MLP width, old index buffers present.
    save_timm_case(
        "timm_shared_relpos", "BeitForImageClassification",
        dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1,
             num_classes=3, mlp_ratio=3.0),
        dict(use_shared_relative_position_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True),
        313, 1, index_buffers=True,
    )
    # timm's own config.json (save_for_hf), beit_base_patch16_224 shrunk by model_args; safetensors and .bin.
    save_timm_hub_case(
        "timm_hub_beit", "BeitForImageClassification", "beit_base_patch16_224",
        dict(num_classes=3), 314, 1, labels=torch.tensor([1]), call=dict(output_hidden_states=True),
        label_names=["cat", "dog", "bird"], both=True,
    )
    # timm's config.json for beitv2 without a head (num_classes 0), token pooling, absolute + shared relative.
    save_timm_hub_case(
        "timm_hub_beitv2_nohead", "BeitModel", "beitv2_base_patch16_224",
        dict(num_classes=0, global_pool="token", use_abs_pos_emb=True, use_rel_pos_bias=False,
             use_shared_rel_pos_bias=True),
        315, 1,
    )

    save_timm_names()


if __name__ == "__main__":
    sys.exit(main())
