#!/usr/bin/env python3
"""Checks that what beit-rs saves loads in transformers: `beit convert` each fixture model to a fresh directory,
load it with from_pretrained, and compare the outputs with the fixture's (transformers' own) outputs.
Run by hand after building: python scripts/check_saved_roundtrip.py [path/to/beit]"""
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "crates", "beit", "tests", "fixtures", "model")
BEIT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "target", "release", "beit")
worst = 0.0
for case in sorted(os.listdir(FIX)):
    src = os.path.join(FIX, case)
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([BEIT, "convert", "--model", src, "--out", out], check=True, capture_output=True)
        cls = getattr(transformers, __import__("json").load(open(os.path.join(out, "config.json")))["architectures"][0])
        model = cls.from_pretrained(out, attn_implementation="eager").eval()
        inputs = load_file(os.path.join(src, "inputs.safetensors"))
        if "bool_masked_pos" in inputs:
            inputs["bool_masked_pos"] = inputs["bool_masked_pos"].bool()
        call = __import__("json").load(open(os.path.join(src, "case.json")))["call"]
        with torch.no_grad():
            got = model(**inputs, **call, return_dict=True)
        want = load_file(os.path.join(src, "outputs.safetensors"))
        for k, v in want.items():
            field, _, idx = k.partition(".")
            g = got[field][int(idx)] if idx else got[field]
            err = float((g.reshape(v.shape) - v).abs().max())
            worst = max(worst, err)
            assert err <= 1e-5, (case, k, err)
    print(f"{case:32s} ok")
print(f"every converted fixture loads in transformers {transformers.__version__}; worst output difference {worst:.2e}")
