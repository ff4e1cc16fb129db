"""Classify or embed an image collection with beit_rs on a Ray cluster (Ray Data).

    read_images(input) -> map_batches(BeitPredictor, compute=ActorPoolStrategy(size=...), batch_size=..., num_cpus=...) -> write_parquet

Each actor loads the model once and runs it on `--threads` threads of its own (set it equal to `--num-cpus`, the
CPUs Ray reserves per actor, so that actors do not oversubscribe a node). Rows: `path`, and `label` and `score`
(classify) or `embedding` (embed, the pooled vector `beit embed` writes).

    python beit_ray.py --address auto --model models/beit-digits --input data/digits --output /tmp/out --task classify
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict

import numpy as np
import ray

import beit_rs


class BeitPredictor:
    """A Ray Data actor: one beit_rs pipeline per actor, called on each batch."""

    def __init__(self, model: str, task: str, threads: int, pid_dir: str | None = None) -> None:
        self.task = task
        kind = "image-classification" if task == "classify" else "image-feature-extraction"
        self.pipe = beit_rs.pipeline(kind, model=model, num_threads=threads, batch_size=1 << 30)
        self.pid_dir = pid_dir
        if pid_dir:  # lets the driver of a fault-injection run find (and kill) this actor's process
            os.makedirs(pid_dir, exist_ok=True)
            open(os.path.join(pid_dir, f"actor-{os.getpid()}"), "w").close()

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        images = list(batch["image"])
        out: Dict[str, Any] = {"path": batch["path"]}
        if self.task == "classify":
            preds = self.pipe(images, top_k=1)
            out["label"] = np.array([p[0]["label"] for p in preds])
            out["score"] = np.array([p[0]["score"] for p in preds], dtype=np.float32)
        else:
            feats = self.pipe(images, pool=True, return_tensors=True)
            out["embedding"] = list(np.concatenate(feats))
        if self.pid_dir:
            open(os.path.join(self.pid_dir, f"batch-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=None, help='a running cluster ("auto", "ray://host:10001"); default: start one in-process')
    ap.add_argument("--model", required=True, help="model directory or Hub repo id, readable on every node")
    ap.add_argument("--input", required=True, help="image folder (or files) readable on every node (local, s3://, gs://)")
    ap.add_argument("--output", required=True, help="parquet folder")
    ap.add_argument("--task", choices=["classify", "embed"], default="classify")
    ap.add_argument("--concurrency", type=int, default=2, help="actors (model replicas)")
    ap.add_argument("--num-cpus", type=float, default=1, help="CPUs Ray reserves per actor")
    ap.add_argument("--threads", type=int, default=None, help="beit_rs threads per actor (default: --num-cpus)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per model call")
    ap.add_argument("--io-cpus", type=float, default=1, help="CPUs Ray reserves per read or write task")
    ap.add_argument("--pid-dir", default=None, help="actors record their pids and batches here (fault-injection runs)")
    a = ap.parse_args()

    ray.init(address=a.address, log_to_driver=False)
    ds = ray.data.read_images(a.input, mode="RGB", include_paths=True, num_cpus=a.io_cpus)
    ds = ds.map_batches(
        BeitPredictor,
        fn_constructor_kwargs={
            "model": a.model,
            "task": a.task,
            "threads": a.threads or max(1, int(a.num_cpus)),
            "pid_dir": a.pid_dir,
        },
        compute=ray.data.ActorPoolStrategy(size=a.concurrency),
        batch_size=a.batch_size,
        num_cpus=a.num_cpus,
        batch_format="numpy",
        # A killed or crashed actor is restarted and its batch retried.
        max_restarts=-1,
        max_task_retries=-1,
    )
    start = time.perf_counter()
    ds.write_parquet(a.output, ray_remote_args={"num_cpus": a.io_cpus})
    seconds = time.perf_counter() - start
    rows = ray.data.read_parquet(a.output).count()
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    print(json.dumps({"rows": rows, "seconds": round(seconds, 3), "images_per_s": round(rows / seconds, 1), "nodes": nodes}))


if __name__ == "__main__":
    main()
