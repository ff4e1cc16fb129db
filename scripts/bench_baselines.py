#!/usr/bin/env python3
"""Time BEiT's forward pass in transformers (fp32, bf16 weights, bf16 autocast), ONNX Runtime (fp32 and dynamic
int8), OpenVINO (fp32 and bf16) and `beit bench` (f32, int8, bf16) on the same config, batch sizes, image size and thread count, each engine in a process of its own (so that its peak RSS is
its own), and print one table.

    python -m venv venv/bench && venv/bench/bin/pip install -r scripts/requirements-bench.txt
    cargo build --release -p beit-cli
    venv/bench/bin/python scripts/bench_baselines.py [--config base|large|PATH] [--batch 1 8] [--image-size 224]
        [--threads 2] [--warmup 3] [--runs 10] [--rounds 1] [--beit target/release/beit] [--json-out results.json]
        [--startup]

Weights are seeded random (randn * 0.02, LayerNorm weights around 1), as in scripts/bench_transformers.py; the
config is written once as config.json and `beit bench --config` reads that same file. The ONNX exports (opset 17,
dynamic batch axis) and their quantize_dynamic versions are cached under --cache (default /tmp/beit-bench).

Engines (--engines): transformers (fp32, SDPA); torch-bf16 (model.to(torch.bfloat16), bf16 input); torch-autocast
(fp32 weights under torch.autocast("cpu", torch.bfloat16)); ort and ort-int8 (ONNX Runtime on the fp32 export and its
quantize_dynamic version); openvino and openvino-bf16 (the same fp32 export reshaped to the batch,
INFERENCE_PRECISION_HINT f32 or bf16, INFERENCE_NUM_THREADS = --threads, PERFORMANCE_HINT LATENCY); beit (`beit
bench --dtype f32` and `--dtype int8`), beit-f32, beit-int8 and beit-bf16 (one dtype each).

--startup also saves the model as a checkpoint (save_pretrained, safetensors) and times `beit classify --model DIR
IMAGE` from process start to exit (median of 5, after one untimed run that warms the page cache), next to the
forward pass alone from `beit bench --model DIR --batch-size 1`, so that "startup <= 1 s + forward" can be checked.
"""
import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# microsoft/beit-{base,large}-patch16-224's config.json (the label names do not matter for speed).
PRESETS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


ENGINES = ("transformers", "torch-bf16", "torch-autocast", "ort", "ort-int8", "openvino", "openvino-bf16", "beit",
           "beit-f32", "beit-int8", "beit-bf16")
# The engines that read the fp32 ONNX export.
ONNX_ENGINES = ("ort", "ort-int8", "openvino", "openvino-bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="base", help="base, large, or a transformers config.json")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every engine this many times, interleaved (engine order rotated each round), and report "
                        "the median of the rounds: this machine's speed drifts by minutes, and interleaving makes "
                        "every engine see the same drift")
    p.add_argument("--beit", default=os.path.join(ROOT, "target", "release", "beit"))
    p.add_argument("--beit-before", help="a second beit binary (an earlier build), run as engine beit-before in the "
                                         "same interleaved rounds, to show a change's effect against the same ORT runs")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "beit-bench"))
    p.add_argument("--ceiling-gflops", type=float, default=None,
                   help="the fp32 sgemm ceiling; default: measured here first (torch's MKL sgemm, 2048^3, --threads)")
    p.add_argument("--engines", default="transformers,ort,ort-int8,beit",
                   help="comma-separated subset of " + ", ".join(ENGINES))
    p.add_argument("--json-out", help="also write the results here")
    p.add_argument("--startup", action="store_true", help="also time `beit classify` start to exit")
    # Internal: run one measurement in this process and print it as JSON.
    p.add_argument("--worker", choices=["prepare", "sgemm", "transformers", "torch-bf16", "torch-autocast", "ort",
                                        "ort-int8", "openvino", "openvino-bf16"], help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name in ("image_size", "threads", "runs", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1, found {getattr(a, name)}")
    if a.warmup < 0:
        p.error(f"--warmup: must be >= 0, found {a.warmup}")
    if any(b < 1 for b in a.batch):
        p.error(f"--batch: every batch size must be at least 1, found {a.batch}")
    if a.config not in PRESETS and not os.path.isfile(a.config):
        p.error(f"--config: {a.config!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    unknown = set(a.engines.split(",")) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {sorted(unknown)}; expected {', '.join(ENGINES)}")
    return a


def cache_dir(a):
    """One directory per (config, image size): the config.json every engine reads, the exports, the checkpoint."""
    if a.config in PRESETS:
        key = a.config
    else:
        with open(a.config, "rb") as f:
            key = "cfg-" + hashlib.sha256(f.read()).hexdigest()[:12]
    d = os.path.join(a.cache, f"{key}-{a.image_size}")
    os.makedirs(d, exist_ok=True)
    return d


def peak_rss_mb():
    # VmHWM: this process's own peak, whatever ran before it in the parent.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def pixel_batch(batch, size):
    import numpy as np

    return np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)


def time_calls(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def summary(times, batch, **extra):
    med = statistics.median(times)
    return dict(images_per_s=batch / med, images_per_s_min=batch / max(times), images_per_s_max=batch / min(times),
                ms_per_batch=med * 1e3, peak_rss_mb=peak_rss_mb(), batch_size=batch, times_s=times, **extra)


# ---- workers: each runs in its own process ----

def build_torch_model(a, d, attn):
    import torch
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(0)
    config = BeitConfig.from_json_file(os.path.join(d, "config.json"))
    config._attn_implementation = attn
    model = BeitForImageClassification(config).eval()
    with torch.no_grad():
        for n, prm in model.named_parameters():
            prm.copy_(torch.randn_like(prm) * 0.02 + (1.0 if "layernorm" in n and n.endswith("weight") else 0.0))
    return model


def worker_prepare(a, d):
    """config.json, the fp32 export, its int8 version and (with --startup) a checkpoint, each made once."""
    import torch
    from transformers import BeitConfig

    torch.set_num_threads(a.threads)
    cfg_path = os.path.join(d, "config.json")
    if not os.path.exists(cfg_path):
        if a.config in PRESETS:
            config = BeitConfig(use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
                                num_labels=1000, architectures=["BeitForImageClassification"], drop_path_rate=0.1,
                                image_size=a.image_size, **PRESETS[a.config])
        else:
            config = BeitConfig.from_json_file(a.config)
            config.image_size = a.image_size
            config.architectures = ["BeitForImageClassification"]
        config.to_json_file(cfg_path)
    info_path = os.path.join(d, "export.json")
    info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    fp32, int8 = os.path.join(d, "model_fp32.onnx"), os.path.join(d, "model_int8.onnx")
    engines = a.engines.split(",")
    # int8 is quantized from the fp32 export, so either ORT engine needs it.
    if not os.path.exists(fp32) and any(e in engines for e in ONNX_ENGINES):
        x = torch.from_numpy(pixel_batch(1, a.image_size))
        for attn in ("sdpa", "eager"):  # SDPA if it exports, else the eager attention it replaces
            model = build_torch_model(a, d, attn)

            class Logits(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, pixel_values):
                    return self.m(pixel_values=pixel_values).logits

            tmp = fp32 + ".tmp"
            try:
                with torch.no_grad():
                    torch.onnx.export(Logits(model), (x,), tmp, dynamo=False, opset_version=17,
                                      input_names=["pixel_values"], output_names=["logits"],
                                      dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
            except Exception as e:  # noqa: BLE001 - report and fall back to eager attention
                print(f"torch.onnx.export with {attn} attention failed: {e}", file=sys.stderr)
                continue
            os.replace(tmp, fp32)
            info["export_attention"] = attn
            break
        else:
            raise SystemExit("torch.onnx.export failed with both sdpa and eager attention")
    if not os.path.exists(int8) and "ort-int8" in engines:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = int8 + ".tmp.onnx"
        quantize_dynamic(fp32, tmp, weight_type=QuantType.QInt8, per_channel=True)
        os.replace(tmp, int8)
    if a.startup and not os.path.exists(os.path.join(d, "checkpoint", "model.safetensors")):
        from transformers import BeitImageProcessor

        ckpt = os.path.join(d, "checkpoint")
        build_torch_model(a, d, "sdpa").save_pretrained(ckpt, safe_serialization=True)
        BeitImageProcessor(size={"height": a.image_size, "width": a.image_size}).save_pretrained(ckpt)
    with open(info_path, "w") as f:
        json.dump(info, f)
    print(json.dumps(info))


def worker_sgemm(a):
    """The ceiling: MKL's sgemm through torch on 2048^3, best of 5, at the benchmark's thread count."""
    import torch

    torch.set_num_threads(a.threads)
    n = 2048
    x, y = torch.randn(n, n), torch.randn(n, n)
    times = time_calls(lambda: x @ y, 2, 5)
    return dict(gflops=2 * n ** 3 / min(times) / 1e9, version=f"torch {torch.__version__}")


def worker_transformers(a, d, batch):
    import torch

    torch.set_num_threads(a.threads)
    model = build_torch_model(a, d, "sdpa")
    x = torch.from_numpy(pixel_batch(batch, a.image_size))
    with torch.no_grad():
        times = time_calls(lambda: model(pixel_values=x), a.warmup, a.runs)
    import transformers

    return summary(times, batch, version=f"transformers {transformers.__version__}, torch {torch.__version__}")


def worker_torch_bf16(a, d, batch, autocast):
    """bf16 in torch: the weights cast (model.to(torch.bfloat16), bf16 input), or fp32 weights under autocast."""
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    model = build_torch_model(a, d, "sdpa")
    x = torch.from_numpy(pixel_batch(batch, a.image_size))
    if autocast:
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(pixel_values=x)
    else:
        model = model.to(torch.bfloat16)
        x = x.to(torch.bfloat16)

        def call():
            return model(pixel_values=x)
    with torch.no_grad():
        times = time_calls(call, a.warmup, a.runs)
    return summary(times, batch, version=f"transformers {transformers.__version__}, torch {torch.__version__}")


def worker_openvino(a, d, batch, precision):
    """OpenVINO on the fp32 ONNX export (the one ONNX Runtime runs), reshaped to the batch."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(os.path.join(d, "model_fp32.onnx"))
    model.reshape({"pixel_values": [batch, 3, a.image_size, a.image_size]})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                 "INFERENCE_NUM_THREADS": a.threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    x = pixel_batch(batch, a.image_size)
    times = time_calls(lambda: request.infer({"pixel_values": x}), a.warmup, a.runs)
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    return summary(times, batch, version=f"openvino {ov.__version__}", inference_precision=str(got))


def worker_ort(a, d, batch, quantized):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = os.path.join(d, "model_int8.onnx" if quantized else "model_fp32.onnx")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = pixel_batch(batch, a.image_size)
    times = time_calls(lambda: sess.run(["logits"], {"pixel_values": x}), a.warmup, a.runs)
    return summary(times, batch, version=f"onnxruntime {ort.__version__}")


# ---- the driver ----

def child_env(a):
    env = dict(os.environ)
    # Every engine gets the same thread count, whatever library reads which variable.
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[k] = str(a.threads)
    return env


def cpu_stall_us():
    """Microseconds some runnable task waited for a CPU (Linux PSI), or None where the kernel lacks it."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def run_json(cmd, a):
    """Runs a measurement process; its last stdout line is a JSON object. Returns (result, error). The result gets
    cpu_stall_share: the share of the run's wall time in which some task waited for a CPU. A benchmark using every
    core alone stalls nobody, so a high share means other work was competing with it."""
    stall0, t0 = cpu_stall_us(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(a))
    stall1, wall = cpu_stall_us(), time.perf_counter() - t0
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return None, err.removeprefix("error: ")
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["cpu_stall_share"] = (stall1 - stall0) / 1e6 / wall if stall0 is not None and stall1 is not None else None
        return r, None
    except (json.JSONDecodeError, IndexError) as e:
        return None, f"unreadable output ({e}): {p.stdout[-200:]!r}"


def worker_cmd(a, kind, batch=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--config", a.config, "--image-size",
           str(a.image_size), "--threads", str(a.threads), "--warmup", str(a.warmup), "--runs", str(a.runs),
           "--cache", a.cache, "--engines", a.engines]
    if a.startup:
        cmd.append("--startup")
    if batch is not None:
        cmd += ["--worker-batch", str(batch)]
    return cmd


def beit_cmd(a, d, batch, dtype, binary=None):
    return [binary or a.beit, "bench", "--config", os.path.join(d, "config.json"), "--architecture",
            "BeitForImageClassification", "--batch-size", str(batch), "--image-size", str(a.image_size),
            "--dtype", dtype, "--warmup", str(a.warmup), "--runs", str(a.runs), "--threads", str(a.threads),
            "--ceiling-gflops", str(a.ceiling_gflops), "--json"]


def gflop_per_image(d, size):
    """The same count as `beit bench`: projections, MLP and attention matmuls per layer, patch embedding, head."""
    c = json.load(open(os.path.join(d, "config.json")))
    p = c.get("patch_size", 16)
    patches = (size // p) ** 2
    tokens = patches + 1
    h, i = c["hidden_size"], c["intermediate_size"]
    layer = 2 * tokens * (4 * h * h + 2 * h * i) + 4 * tokens * tokens * h
    labels = len(c.get("id2label", {})) or 2
    return (c["num_hidden_layers"] * layer + 2 * patches * c.get("num_channels", 3) * p * p * h + 2 * h * labels) / 1e9


def startup(a, d):
    """`beit classify` process start to exit, and the forward pass alone from `beit bench --model`."""
    ckpt = os.path.join(d, "checkpoint")
    image = os.path.join(ROOT, "crates/beit/tests/fixtures/processor/images/chelsea.png")
    if not os.path.exists(image):
        from PIL import Image
        import numpy as np

        image = os.path.join(d, "random.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image)
    cmd = [a.beit, "classify", "--model", ckpt, image]
    env = child_env(a)
    subprocess.run(cmd, capture_output=True, env=env, check=True)  # untimed: page cache, as hyperfine's warm-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - t)
    fwd, err = run_json([a.beit, "bench", "--model", ckpt, "--batch-size", "1", "--warmup", str(a.warmup), "--runs",
                         str(a.runs), "--threads", str(a.threads), "--json"], a)
    if err:
        return dict(error=err)
    start = statistics.median(times)
    forward = fwd["ms_per_batch"] / 1e3
    return dict(classify_s=start, classify_times_s=times, forward_s=forward, load_s=fwd["load_s"],
                overhead_s=start - forward, within_1s_plus_forward=start <= 1.0 + forward, image=image)


def combine_rounds(engine, dtype, batch, results, gflop, ceiling):
    """One row from an engine's rounds: the median round's figures (images/s decides), the rounds' extremes, and
    every round's images/s for the per-round ratios."""
    row = dict(engine=engine, dtype=dtype, batch=batch)
    good = [r for r, err in results if not err]
    if not good:
        row["error"] = next(err for _, err in results if err)
        return row
    good.sort(key=lambda r: r["images_per_s"])
    row.update(good[(len(good) - 1) // 2])
    row.update(images_per_s_min=min(r["images_per_s_min"] for r in good),
               images_per_s_max=max(r["images_per_s_max"] for r in good),
               peak_rss_mb=max((r["peak_rss_mb"] for r in good if r.get("peak_rss_mb")), default=None),
               rounds_images_per_s=[r["images_per_s"] for r, err in results if not err],
               ceiling_share=row["images_per_s"] * gflop / ceiling)
    return row


# (ours, theirs) pairs whose per-round ratios are printed: beit against the peers of the same number format.
RATIO_PAIRS = [
    ("f32", ("onnxruntime", "f32")), ("f32", ("openvino", "f32")), ("int8", ("onnxruntime", "int8")),
    ("bf16", ("openvino", "bf16")), ("bf16", ("torch", "bf16")), ("bf16", ("torch-autocast", "bf16")),
]


def print_round_ratios(rows):
    """beit / its peers round by round (rounds ran interleaved, so round i of each saw the same minutes)."""
    for b in sorted({r["batch"] for r in rows}):
        ref = {(q["engine"], q["dtype"]): q for q in rows if q["batch"] == b and "error" not in q}
        for engine in ("beit", "beit-before"):
            for dtype, theirs_key in RATIO_PAIRS:
                ours, theirs = ref.get((engine, dtype)), ref.get(theirs_key)
                if ours and theirs:
                    ratios = [x / y for x, y in zip(ours["rounds_images_per_s"], theirs["rounds_images_per_s"])]
                    print(f"batch {b} {engine} {dtype} / {theirs_key[0]} {theirs_key[1]} per round: "
                          + " ".join(f"{x:.2f}" for x in ratios) + f"; median {statistics.median(ratios):.2f}")


def fmt_ratio(x, base):
    return f"{x / base:.2f}" if base else "-"


def print_table(rows):
    head = ["engine", "dtype", "batch", "images/s (min-max)", "x transformers", "x ORT fp32", "x ORT int8",
            "peak RSS MB", "ceiling", "CPU stall"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["engine"], r["dtype"], str(r["batch"]), f"error: {r['error']}", "", "", "", "", "", ""])
            continue
        ref = {(q["engine"], q["dtype"]): q for q in rows if q["batch"] == r["batch"] and "error" not in q}
        ips = r["images_per_s"]
        tf, ortf, orti = (ref.get(k, {}).get("images_per_s") for k in
                          (("transformers", "f32"), ("onnxruntime", "f32"), ("onnxruntime", "int8")))
        rss = r.get("peak_rss_mb")
        lines.append([r["engine"], r["dtype"], str(r["batch"]),
                      f"{ips:.2f} ({r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f})",
                      fmt_ratio(ips, tf), fmt_ratio(ips, ortf), fmt_ratio(ips, orti) if r["dtype"] == "int8" else "",
                      f"{rss:.0f}" if rss else "-", f"{r['ceiling_share'] * 100:.1f}%",
                      "-" if r.get("cpu_stall_share") is None else f"{r['cpu_stall_share'] * 100:.0f}%"])
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    for x in [head, ["-" * w for w in widths]] + lines:
        print("  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip())


def main():
    a = parse_args()
    d = cache_dir(a)
    if a.worker == "prepare":
        return worker_prepare(a, d)
    if a.worker == "sgemm":
        print(json.dumps(worker_sgemm(a)))
        return
    if a.worker:
        b = a.worker_batch
        if a.worker == "transformers":
            r = worker_transformers(a, d, b)
        elif a.worker in ("torch-bf16", "torch-autocast"):
            r = worker_torch_bf16(a, d, b, a.worker == "torch-autocast")
        elif a.worker in ("openvino", "openvino-bf16"):
            r = worker_openvino(a, d, b, "bf16" if a.worker == "openvino-bf16" else "f32")
        else:
            r = worker_ort(a, d, b, a.worker == "ort-int8")
        print(json.dumps(r))
        return

    engines = a.engines.split(",")
    if any(e.startswith("beit") for e in engines) and not os.access(a.beit, os.X_OK):
        raise SystemExit(f"--beit: {a.beit} is not an executable (build it: cargo build --release -p beit-cli)")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    info, err = run_json(worker_cmd(a, "prepare"), a)
    if err:
        raise SystemExit(f"preparing {d} failed: {err}")
    print(f"prepared {d} in {time.perf_counter() - t0:.0f} s (export attention: {info.get('export_attention', '-')})",
          file=sys.stderr)
    gflop = gflop_per_image(d, a.image_size)
    if a.ceiling_gflops is None:
        r, err = run_json(worker_cmd(a, "sgemm"), a)
        if err:
            raise SystemExit(f"measuring the sgemm ceiling failed: {err} (or pass --ceiling-gflops)")
        a.ceiling_gflops = round(r["gflops"], 1)
        print(f"sgemm ceiling (torch MKL, 2048^3, {a.threads} threads): {a.ceiling_gflops} GFLOP/s", file=sys.stderr)
    rows = []
    for b in a.batch:
        plan = []
        if "transformers" in engines:
            plan.append(("transformers", "f32", worker_cmd(a, "transformers", b)))
        if "torch-bf16" in engines:
            plan.append(("torch", "bf16", worker_cmd(a, "torch-bf16", b)))
        if "torch-autocast" in engines:
            plan.append(("torch-autocast", "bf16", worker_cmd(a, "torch-autocast", b)))
        if "ort" in engines:
            plan.append(("onnxruntime", "f32", worker_cmd(a, "ort", b)))
        if "ort-int8" in engines:
            plan.append(("onnxruntime", "int8", worker_cmd(a, "ort-int8", b)))
        if "openvino" in engines:
            plan.append(("openvino", "f32", worker_cmd(a, "openvino", b)))
        if "openvino-bf16" in engines:
            plan.append(("openvino", "bf16", worker_cmd(a, "openvino-bf16", b)))
        beit_dtypes = [dt for dt in ("f32", "int8", "bf16")
                       if f"beit-{dt}" in engines or ("beit" in engines and dt != "bf16")]
        plan += [("beit", dtype, beit_cmd(a, d, b, dtype)) for dtype in beit_dtypes]
        if a.beit_before:
            plan += [("beit-before", dtype, beit_cmd(a, d, b, dtype, a.beit_before)) for dtype in beit_dtypes]
        per_round = {(engine, dtype): [] for engine, dtype, _ in plan}
        for i in range(a.rounds):
            shift = i % len(plan)
            for engine, dtype, cmd in plan[shift:] + plan[:shift]:
                print(f"{engine} {dtype} batch {b} (round {i + 1} of {a.rounds}) ...", file=sys.stderr, flush=True)
                per_round[(engine, dtype)].append(run_json(cmd, a))
        for engine, dtype, _ in plan:
            rows.append(combine_rounds(engine, dtype, b, per_round[(engine, dtype)], gflop, a.ceiling_gflops))
    load_after = os.getloadavg()
    print()
    rounds = f", median of {a.rounds} interleaved rounds" if a.rounds > 1 else ""
    print(f"BEiT {a.config}, {a.image_size}x{a.image_size}, {a.threads} threads, {a.warmup} warm-up + {a.runs} timed "
          f"runs (median){rounds}, {gflop:.2f} GFLOP/image, ceiling {a.ceiling_gflops:g} GFLOP/s")
    print_table(rows)
    if a.rounds > 1:
        print_round_ratios(rows)
    print("ceiling: images/s x GFLOP/image / the fp32 sgemm peak (int8 rows can exceed 100%); CPU stall: share of "
          "the run in which some task waited for a CPU (other work on the machine)")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    result = dict(config=a.config, image_size=a.image_size, threads=a.threads, warmup=a.warmup, runs=a.runs,
                  rounds=a.rounds,
                  gflop_per_image=gflop, ceiling_gflops=a.ceiling_gflops, export=info, rows=rows,
                  loadavg_before=load_before, loadavg_after=load_after, cpu=cpu_name(), python=platform.python_version())
    if a.startup:
        s = startup(a, d)
        result["startup"] = s
        if "error" in s:
            print(f"startup: error: {s['error']}")
        else:
            print(f"startup: beit classify {s['classify_s']:.3f} s (median of 5, start to exit); forward alone "
                  f"{s['forward_s']:.3f} s, load {s['load_s']:.3f} s; overhead {s['overhead_s']:.3f} s; "
                  f"startup <= 1 s + forward: {'yes' if s['within_1s_plus_forward'] else 'NO'}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.json_out}", file=sys.stderr)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    main()
