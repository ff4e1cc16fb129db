"""Shared helpers: the Rust crates' fixtures (transformers' stored outputs) and a small safetensors reader, so
that the suite needs numpy and Pillow only."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "crates" / "beit" / "tests" / "fixtures"
MODELS = FIXTURES / "model"
IMAGES = FIXTURES / "processor" / "images"
# Parity tolerance of the Rust suite (crates/beit/tests/parity.rs).
TOLERANCE = 1e-4

_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
    """{name: array} of a .safetensors file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


def case_dirs(kind):
    return sorted(p for p in (FIXTURES / kind).iterdir() if (p / "case.json").is_file())


def max_abs_diff(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max()) if a.size else 0.0


def _live_available():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


LIVE = _live_available()


def pytest_collection_modifyitems(config, items):
    if LIVE:
        return
    skip = pytest.mark.skip(reason="torch and transformers are not importable here")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)
