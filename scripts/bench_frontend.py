"""The Python side of the front-end benchmark (issue 20).

    python scripts/bench_frontend.py pipeline DIR [MODEL]   # transformers' image-classification pipeline, batch 8
    python scripts/bench_frontend.py decode DIR              # Pillow Image.open(f).convert("RGB"), per image
    python scripts/bench_frontend.py resize DIR [SIZE]       # decode + resize((SIZE, SIZE), BICUBIC), per image

Torch uses 2 threads (the machine's cores); the Pillow modes are single-threaded. Prints one line of JSON.
"""
import json
import os
import sys
import time


def files(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith((".jpg", ".jpeg", ".png")))


def main():
    mode, d = sys.argv[1], sys.argv[2]
    fs = files(d)
    if mode == "pipeline":
        import torch
        from transformers import pipeline

        torch.set_num_threads(2)
        model = sys.argv[3] if len(sys.argv) > 3 else "models/beit-digits"
        t0 = time.perf_counter()
        pipe = pipeline("image-classification", model=model, batch_size=8)
        t1 = time.perf_counter()
        out = pipe(fs)
        t2 = time.perf_counter()
        print(json.dumps({"mode": mode, "images": len(fs), "load_s": t1 - t0, "call_s": t2 - t1,
                          "images_per_s": len(fs) / (t2 - t1), "first": out[0][0]["label"]}))
        return
    from PIL import Image

    size = int(sys.argv[3]) if len(sys.argv) > 3 else 224
    times = []
    for f in fs:
        t0 = time.perf_counter()
        im = Image.open(f).convert("RGB")
        if mode == "resize":
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        times.append(time.perf_counter() - t0)
    total = sum(times)
    times.sort()
    print(json.dumps({"mode": mode, "size": size if mode == "resize" else None, "images": len(fs), "total_s": total,
                      "images_per_s": len(fs) / total, "median_ms": 1e3 * times[len(times) // 2]}))


if __name__ == "__main__":
    main()
