"""Checks a beit_ray.py output against the `beit` CLI on the same images: every image exactly once, and each row
equal to `beit classify` (same label, score within 1e-5) or `beit embed` (max abs difference 1e-5)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq

TOLERANCE = 1e-5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--beit", required=True, help="the beit binary")
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True, help="the image folder the job read")
    ap.add_argument("--output", required=True, help="the job's parquet folder")
    ap.add_argument("--task", choices=["classify", "embed"], default="classify")
    a = ap.parse_args()

    images = sorted(p for p in glob.glob(os.path.join(a.input, "**", "*.png"), recursive=True))
    table = pq.read_table(a.output).to_pydict()
    paths = [os.path.abspath(p) for p in table["path"]]
    dup = len(paths) - len(set(paths))
    missing = sorted(set(map(os.path.abspath, images)) - set(paths))
    print(f"rows {len(paths)}, images {len(images)}, duplicated {dup}, missing {len(missing)}")
    if dup or missing or len(paths) != len(images):
        print("FAIL: rows lost or duplicated", missing[:5])
        return 1
    row = {p: i for i, p in enumerate(paths)}

    worst = 0.0
    mismatched = 0
    with tempfile.TemporaryDirectory() as tmp:
        if a.task == "classify":
            out = subprocess.run(
                [a.beit, "classify", "--model", a.model, "--top-k", "1", "--json", *images],
                check=True, capture_output=True, text=True,
            ).stdout
            for path, preds in zip(images, json.loads(out)):
                i = row[os.path.abspath(path)]
                mismatched += table["label"][i] != preds[0]["label"]
                worst = max(worst, abs(table["score"][i] - preds[0]["score"]))
        else:
            npy = os.path.join(tmp, "embed.npy")
            subprocess.run([a.beit, "embed", "--model", a.model, "--out", npy, *images], check=True, capture_output=True)
            want = np.load(npy)
            for path, w in zip(images, want):
                got = np.asarray(table["embedding"][row[os.path.abspath(path)]], dtype=np.float32)
                worst = max(worst, float(np.abs(got - w).max()))
    print(f"label mismatches {mismatched}, max abs difference {worst:.3g} (tolerance {TOLERANCE})")
    if mismatched or worst > TOLERANCE:
        print("FAIL: rows differ from the beit CLI")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
