"""Images/s of beit_rs from Python against transformers in the same process and against `beit bench`, on one
checkpoint (e.g. BEiT-base 224 with random weights), a seeded random pixel batch, batch sizes 1 and 8.

    RAYON_NUM_THREADS=2 python bench.py --model DIR --beit target/release/beit --threads 2

RAYON_NUM_THREADS should equal --threads, as `beit bench --threads` sets it (candle's matmul reads it). The
transformers column needs torch and transformers importable (skipped otherwise). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import numpy as np

import beit_rs


def timed(fn, x, warmup: int, runs: int) -> tuple:
    """(median, best) images/s of fn(x) over `runs` calls after `warmup` untimed ones. On a shared machine the
    best run is the one least slowed by others."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return x.shape[0] / statistics.median(times), x.shape[0] / min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--beit", default=None, help="the beit binary, for the `beit bench` column")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    a = ap.parse_args()

    ours = beit_rs.BeitForImageClassification.from_pretrained(a.model, num_threads=a.threads)
    try:
        import torch
        import transformers

        torch.set_num_threads(a.threads)
        theirs = transformers.BeitForImageClassification.from_pretrained(a.model).eval()
    except ImportError:
        theirs = None

    rows = []
    for b in a.batch_sizes:
        x = np.random.default_rng(0).standard_normal((b, 3, a.image_size, a.image_size), dtype=np.float32)
        row = {"batch": b, "beit_rs": timed(lambda v: ours(pixel_values=v), x, a.warmup, a.runs)}
        if theirs is not None:
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                row["transformers"] = timed(lambda v: theirs(pixel_values=v), xt, a.warmup, a.runs)
        if a.beit:
            out = subprocess.run(
                [a.beit, "bench", "--model", a.model, "--batch-size", str(b), "--threads", str(a.threads),
                 "--warmup", str(a.warmup), "--runs", str(a.runs), "--json"],
                check=True, capture_output=True, text=True,
            ).stdout
            bench = json.loads(out)
            row["beit bench"] = (bench["images_per_s"], bench["images_per_s_max"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    cols = [c for c in ("beit_rs", "transformers", "beit bench") if c in rows[0]]
    print(f"\n| batch | {' | '.join(c + ' img/s median (best)' for c in cols)} | beit_rs / beit bench | beit_rs / transformers |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        ratio = lambda c: f"{r['beit_rs'][0] / r[c][0]:.3f} ({r['beit_rs'][1] / r[c][1]:.3f})" if c in r else "-"  # noqa: E731
        cells = " | ".join(f"{r[c][0]:.2f} ({r[c][1]:.2f})" for c in cols)
        print(f"| {r['batch']} | {cells} | {ratio('beit bench')} | {ratio('transformers')} |")


if __name__ == "__main__":
    main()
