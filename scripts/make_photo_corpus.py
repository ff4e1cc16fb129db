"""A corpus of ~1024x768 JPEG photos for timing the image front end (not for the repo: pass an output dir).

Sources: real photographs on this machine (the cargo registry's `image` and `jpeg-decoder` sample photos,
the rust book's photo) and the processor fixtures' natural images; each output is a random crop, rescale,
flip and colour shift of one, saved at quality 75-95, mostly 4:2:0 baseline, some 4:2:2/4:4:4, some
progressive. Deterministic (seeded).

    python scripts/make_photo_corpus.py OUT_DIR [N]
"""
import glob
import os
import random
import sys

from PIL import Image, ImageEnhance

REG = os.path.expanduser("~/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f")
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [
    f"{REG}/image-0.24.9/examples/scaledown/test.jpg",
    f"{REG}/jpeg-decoder-0.3.2/benches/large_image.jpg",
    *glob.glob(os.path.expanduser("~/.rustup/toolchains/stable-*/share/doc/rust/html/embedded-book/assets/f3.jpg")),
    *[f"{HERE}/../crates/beit/tests/fixtures/processor/images/{n}.png" for n in ("astronaut", "chelsea", "coffee")],
]


def main():
    out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 500
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    srcs = [Image.open(p).convert("RGB") for p in SOURCES if os.path.exists(p)]
    # Mostly the large real photos (the small fixtures are upscaled, so smoother than photos).
    weights = [8 if s.width >= 2000 else 1 for s in srcs]
    for i in range(n):
        src = rng.choices(srcs, weights)[0]
        w, h = (1024, 768) if rng.random() < 0.8 else (768, 1024)
        w, h = int(w * rng.uniform(0.9, 1.1)), int(h * rng.uniform(0.9, 1.1))
        # crop a box of the output's aspect, 40-100% of the source's size, then resize to (w, h)
        f = rng.uniform(0.4, 1.0)
        cw = min(src.width, int(src.height * w / h)) * f
        ch = cw * h / w
        x0, y0 = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
        im = src.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
        r = rng.random()
        kw = dict(quality=rng.randint(75, 95), subsampling=2, progressive=False)
        if r < 0.15:
            kw["progressive"] = True
        elif r < 0.22:
            kw["subsampling"] = 1
        elif r < 0.27:
            kw["subsampling"] = 0
        im.save(f"{out}/photo_{i:04d}.jpg", "JPEG", **kw)


if __name__ == "__main__":
    main()
