#!/usr/bin/env python3
"""Generate the tiny torch.save fixtures for crates/beit/src/checkpoint/pickle.rs.

Run with: /work/venv/py/bin/python scripts/gen_pickle_fixtures.py
Writes into crates/beit/tests/fixtures/pickle/. Every fixture is a few KB.

Expected values go into `<fixture>.expected.tsv`: one tensor per line,
`name<TAB>dtype<TAB>shape (comma separated, empty for a scalar)<TAB>hex of the
little-endian contiguous row-major bytes`, so the Rust tests need only std to
compare.
"""
import collections
import io
import os
import zipfile

import torch
from torch import nn

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "pickle")
OUT = os.path.normpath(OUT)

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "Bool",
}


def tensor_bytes(t):
    t = t.detach().contiguous().clone()
    return bytes(t.untyped_storage())[: t.numel() * t.element_size()]


def write_expected(name, tensors):
    with open(os.path.join(OUT, name + ".expected.tsv"), "w") as f:
        for key, t in tensors:
            shape = ",".join(str(d) for d in t.shape)
            f.write(f"{key}\t{DTYPES[t.dtype]}\t{shape}\t{tensor_bytes(t).hex()}\n")


def save(name, obj, **kw):
    torch.save(obj, os.path.join(OUT, name), **kw)


class Evil:
    """torch.save pickles this as `posix.system("echo pwned > /tmp/pwned")`."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/pwned",))


class EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned > /tmp/pwned')",))


class TinyNet(nn.Module):
    """A user-defined module class (pickled by reference as `__main__.TinyNet`)."""

    def __init__(self):
        super().__init__()
        self.scale = 0.5
        self.proj = nn.Linear(2, 3, bias=False)
        self.register_buffer("persistent", torch.tensor([1.0, 2.0]))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.blocks = nn.Sequential(collections.OrderedDict([("conv_1", nn.Conv2d(1, 1, 1))]))


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)

    # 1. A flat state dict: every dtype, a transposed (non-contiguous) tensor, views
    #    with storage offsets, a stride-2 slice, a scalar, an empty tensor, a Parameter.
    base = torch.arange(20, dtype=torch.float32)
    sd = collections.OrderedDict()
    sd["f32"] = torch.randn(2, 3)
    sd["f64"] = torch.randn(2, dtype=torch.float64)
    sd["f16"] = torch.randn(3).half()
    sd["bf16"] = torch.randn(2, 2).bfloat16()
    sd["i64"] = torch.arange(5) - 2
    sd["i32"] = torch.tensor([-7, 8], dtype=torch.int32)
    sd["i16"] = torch.tensor([-300, 300], dtype=torch.int16)
    sd["i8"] = torch.tensor([-5, 5], dtype=torch.int8)
    sd["u8"] = torch.tensor([0, 255], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["transposed"] = torch.randn(3, 4).t()
    sd["view_offset"] = base[5:11].view(2, 3)
    sd["strided"] = base[1::4]
    sd["col_of_transposed"] = torch.arange(12, dtype=torch.int64).view(3, 4).t()[1:3, 1:]
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = nn.Parameter(torch.randn(2))
    assert not sd["transposed"].is_contiguous()
    assert sd["view_offset"].storage_offset() == 5
    save("state_dict.bin", sd)
    write_expected("state_dict.bin", list(sd.items()))

    # Same dict, pickle protocol 4 (FRAME, STACK_GLOBAL, MEMOIZE, SHORT_BINUNICODE).
    save("state_dict_proto4.bin", sd, pickle_protocol=4)

    # 2. A state dict nested in a training checkpoint.
    inner = nn.Linear(2, 2).state_dict()
    nested = {"state_dict": inner, "epoch": 3, "name": "ckpt", "extra": {"model": {"w": torch.ones(2)}}}
    save("nested.bin", nested)
    write_expected(
        "nested.bin",
        [("state_dict." + k, v) for k, v in inner.items()] + [("extra.model.w", torch.ones(2))],
    )

    # 3. A whole pickled nn.Module (torch.nn.modules classes only).
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm(4))
    save("module.bin", module)
    write_expected("module.bin", list(module.state_dict().items()))

    # A module with a user class: needs the caller to allow `__main__.TinyNet`.
    tiny = TinyNet()
    save("custom_module.bin", tiny)
    write_expected("custom_module.bin", list(tiny.state_dict().items()))

    # 4. Malicious pickles: loading them with torch.load(weights_only=False) runs a shell command.
    save("malicious.bin", {"w": torch.ones(1), "x": Evil()})
    save("malicious_eval.bin", {"x": EvilEval(), "w": torch.ones(1)})

    # 5. Broken files.
    with open(os.path.join(OUT, "state_dict.bin"), "rb") as f:
        good = f.read()
    with open(os.path.join(OUT, "truncated.bin"), "wb") as f:
        f.write(good[: len(good) // 2])
    with open(os.path.join(OUT, "empty.bin"), "wb") as f:
        pass

    # Bytes flipped inside data.pkl, in place (the zip CRC no longer matches).
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
        pkl = z.read(info)
    start = good.index(pkl)
    corrupted = bytearray(good)
    for off in range(10, min(len(pkl), 200), 7):
        corrupted[start + off] ^= 0x5A
    with open(os.path.join(OUT, "corrupted.bin"), "wb") as f:
        f.write(bytes(corrupted))

    # Garbage data.pkl in an otherwise valid zip (CRC correct), to reach the interpreter.
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for i in zin.infolist():
            data = zin.read(i)
            if i.filename.endswith("/data.pkl"):
                data = bytes(corrupted[start : start + len(pkl)])
            zout.writestr(i.filename, data)
    with open(os.path.join(OUT, "corrupted_pickle.bin"), "wb") as f:
        f.write(buf.getvalue())

    # 6. No tensors at all, and the legacy (pre-1.6) format.
    save("no_tensors.bin", {"epoch": 3, "lr": 0.1})
    save("legacy.bin", {"w": torch.ones(2)}, _use_new_zipfile_serialization=False)

    for name in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, name)):8d}  {name}")


if __name__ == "__main__":
    main()
