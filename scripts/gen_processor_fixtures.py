#!/usr/bin/env python3
"""Parity fixtures for the Rust BeitImageProcessor (crates/beit/src/processor), written under
crates/beit/tests/fixtures/processor/.

Run by hand (never by CI), in a venv with scripts/requirements.txt installed:
    python scripts/gen_processor_fixtures.py

Contents:
    images/*          small test images: skimage photographs (PNG, one JPEG q90), RGBA, LA, 16-bit gray,
                      16-bit RGB, 4-bit gray, palette (+tRNS), and a synthetic label map
    configs/*.json    preprocessor configs (as a checkpoint's preprocessor_config.json)
    pixel_values/*    transformers 4.57.6 BeitImageProcessor outputs (.npy float32, [n, 3, h, w]);
                      large ones as uint8 "levels" PNGs: the uint8 image before rescale/normalize
                      (this script asserts the float outputs are exactly the float formula applied to them)
    labels/*.npy      `labels` of preprocess(images, segmentation_maps) (int64)
    resize/*.png      raw Pillow 13 Image.resize outputs, every filter, up/down/one-axis/non-square sizes
    jpeg/*.jpg, .png  JPEG encodings (PIL's: progressive, restarts, 4:2:2, Adobe RGB, gray, CMYK, YCCK; and from the small
                      encoder below: 4:4:0, 4:1:1, 3x1, mixed factors, non-interleaved scans) and PIL's RGB decode
    torch/*.npy       post_process_semantic_segmentation and F.interpolate(bilinear) inputs/outputs
    manifest.json     what each case is
"""
import json
import os
import shutil
import struct
import zlib

import numpy as np
import PIL
import PIL.Image as Image
import skimage
import skimage.data
import torch
import transformers
from transformers import BeitImageProcessor

assert transformers.__version__ == "4.57.6", transformers.__version__
assert PIL.__version__ == "13.0.0", PIL.__version__

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "processor")


def write_png(path, arr, color_type, bit_depth):
    """Minimal PNG writer for what PIL cannot write (16-bit RGB, 4-bit gray). arr: H x W [x C] ints."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    if bit_depth == 16:
        rows = arr.astype(">u2").reshape(h, w * c).view(np.uint8).reshape(h, -1)
    elif bit_depth == 8:
        rows = arr.astype(np.uint8).reshape(h, w * c)
    else:
        bits = np.unpackbits(arr.astype(np.uint8).reshape(h, w * c, 1), axis=2)[:, :, 8 - bit_depth:]
        rows = np.packbits(bits.reshape(h, -1), axis=1)
    raw = b"".join(b"\x00" + r.tobytes() for r in rows)

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)


ZIGZAG = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14,
          21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61,
          54, 47, 55, 62, 63]


def mini_jpeg(rgb, factors, interleaved=True, restart=0):
    """Baseline JPEG with any sampling factors (PIL's encoder only writes 4:4:4/4:2:2/4:2:0), fixed-length
    Huffman codes, optionally one scan per component and restart markers. rgb: H x W x 3 uint8."""
    img = np.asarray(rgb, np.float64)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    img = np.dstack([0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
                     0.5 * r - 0.418688 * g - 0.081312 * b + 128])
    h_img, w_img = img.shape[:2]
    hmax, vmax = max(f[0] for f in factors), max(f[1] for f in factors)
    mcux, mcuy = -(-w_img // (8 * hmax)), -(-h_img // (8 * vmax))
    qt = np.full(64, 6.0)
    dct = np.array([[np.sqrt((1 if k == 0 else 2) / 8) * np.cos((2 * n + 1) * k * np.pi / 16) for n in range(8)] for k in range(8)])
    planes = []
    for c, (h, v) in enumerate(factors):  # box-downsample, pad to whole MCUs
        dw, dh, fx, fy = -(-w_img * h // hmax), -(-h_img * v // vmax), hmax // h, vmax // v
        p = np.pad(img[..., c], ((0, dh * fy - h_img), (0, dw * fx - w_img)), mode="edge").reshape(dh, fy, dw, fx).mean(axis=(1, 3))
        planes.append((np.pad(p, ((0, mcuy * v * 8 - dh), (0, mcux * h * 8 - dw)), mode="edge"), dw, dh))
    seg = lambda m, d: b"\xff" + bytes([m]) + struct.pack(">H", len(d) + 2) + d  # noqa: E731
    ac_syms = [0x00, 0xF0] + [(r << 4) | s for r in range(16) for s in range(1, 11)]
    out = b"\xff\xd8" + seg(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    out += seg(0xDB, bytes([0]) + bytes(int(q) for q in qt))
    out += seg(0xC0, struct.pack(">BHHB", 8, h_img, w_img, 3) + b"".join(bytes([c + 1, (h << 4) | v, 0]) for c, (h, v) in enumerate(factors)))
    out += seg(0xC4, bytes([0x00, 0, 0, 0, 12] + [0] * 12 + list(range(12))))  # every DC symbol 4 bits
    out += seg(0xC4, bytes([0x10] + [0] * 7 + [len(ac_syms)] + [0] * 8 + ac_syms))  # every AC symbol 8 bits
    if restart:
        out += seg(0xDD, struct.pack(">H", restart))
    for sc in ([0, 1, 2],) if interleaved else ([0], [1], [2]):
        out += seg(0xDA, bytes([len(sc)]) + b"".join(bytes([c + 1, 0]) for c in sc) + bytes([0, 63, 0]))
        if len(sc) > 1:
            units = [[(c, mx * factors[c][0] + x, my * factors[c][1] + y) for c in sc for y in range(factors[c][1])
                      for x in range(factors[c][0])] for my in range(mcuy) for mx in range(mcux)]
        else:
            c = sc[0]
            units = [[(c, bx, by)] for by in range(-(-planes[c][2] // 8)) for bx in range(-(-planes[c][1] // 8))]
        bits, data, pred = [], bytearray(), {c: 0 for c in sc}

        def flush():
            bits.extend([1] * (-len(bits) % 8))
            for i in range(0, len(bits), 8):
                byte = int("".join(map(str, bits[i:i + 8])), 2)
                data.extend([byte, 0] if byte == 0xFF else [byte])
            bits.clear()

        put = lambda v, n: bits.extend((v >> i) & 1 for i in range(n - 1, -1, -1))  # noqa: E731
        for m, unit in enumerate(units):
            if restart and m and m % restart == 0:
                flush()
                data.extend([0xFF, 0xD0 + (m // restart - 1) % 8])
                pred = {c: 0 for c in sc}
            for c, bx, by in unit:
                co = np.round((dct @ (planes[c][0][by * 8:by * 8 + 8, bx * 8:bx * 8 + 8] - 128) @ dct.T).ravel() / qt).astype(int)
                co = np.clip(co, -1023, 1023)
                diff, pred[c] = co[0] - pred[c], co[0]
                s = abs(int(diff)).bit_length()
                put(s, 4)
                put(diff if diff >= 0 else diff + (1 << s) - 1, s)
                run = 0
                for k in range(1, 64):
                    v = int(co[ZIGZAG[k]])
                    if v == 0:
                        run += 1
                        continue
                    while run > 15:
                        put(ac_syms.index(0xF0), 8)
                        run -= 16
                    s = abs(v).bit_length()
                    put(ac_syms.index((run << 4) | s), 8)
                    put(v if v > 0 else v + (1 << s) - 1, s)
                    run = 0
                if run:
                    put(0, 8)
        flush()
        out += bytes(data)
    return out + b"\xff\xd9"


def rel(*parts):
    return "/".join(parts)


def main():
    # Only this script's folders: exif/ is gen_exif_fixtures.py's.
    for d in ("images", "configs", "pixel_values", "labels", "resize", "torch", "jpeg"):
        shutil.rmtree(os.path.join(ROOT, d), ignore_errors=True)
        os.makedirs(os.path.join(ROOT, d))
    path = lambda p: os.path.join(ROOT, p)  # noqa: E731
    manifest = {"processor_cases": [], "label_cases": [], "resize_cases": [], "jpeg_cases": [], "torch": {}}

    # ---- images: photographs downscaled (LANCZOS) to keep the fixtures small ----
    def photo(name, arr, size):
        Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS).save(path(f"images/{name}.png"), optimize=True)

    photo("astronaut", skimage.data.astronaut(), (256, 256))
    photo("coffee", skimage.data.coffee(), (240, 160))
    photo("chelsea", skimage.data.chelsea(), (225, 150))
    photo("camera", skimage.data.camera(), (192, 192))  # grayscale "L"
    Image.fromarray(skimage.data.coffee()).save(path("images/coffee_q90.jpg"), quality=90)  # 600x400
    Image.fromarray(skimage.data.chelsea()[40:200, 100:340]).save(path("images/chelsea_q90_444.jpg"), quality=90, subsampling=0)
    ch = skimage.data.chelsea()[60:121, 150:247]  # 97x61
    alpha = np.linspace(0, 255, ch.shape[0] * ch.shape[1]).reshape(ch.shape[:2]).astype(np.uint8)
    Image.fromarray(np.dstack([ch, alpha]), "RGBA").save(path("images/rgba.png"))
    cam = skimage.data.camera()
    Image.fromarray(np.dstack([cam[100:140, 200:250], 255 - cam[100:140, 200:250]]), "LA").save(path("images/gray_alpha.png"))
    write_png(path("images/gray16.png"), cam[150:198, 180:244].astype(np.uint16) * 4, 0, 16)  # I;16: clipped by PIL
    write_png(path("images/rgb16.png"), skimage.data.astronaut()[100:130, 200:240].astype(np.uint16) * 257 + 77, 2, 16)
    write_png(path("images/gray4.png"), cam[0:200:10, 0:250:10] >> 4, 0, 4)
    pal = Image.fromarray(skimage.data.chelsea()[::3, ::3][:80, :120]).quantize(64)
    pal.save(path("images/palette.png"), transparency=3)
    rng = np.random.default_rng(0)
    label = np.zeros((90, 120), np.uint8)
    for _ in range(40):  # blocks of classes 0..150, plus 255 "ignore" regions
        y, x = rng.integers(0, 80), rng.integers(0, 110)
        label[y:y + rng.integers(5, 30), x:x + rng.integers(5, 40)] = rng.choice([0, 1, 2, 7, 37, 149, 150, 255])
    Image.fromarray(label, "L").save(path("images/label.png"))

    # ---- processor cases ----
    configs = {
        # microsoft/beit-base-patch16-224's preprocessor_config.json
        "beit_base_224": {"do_center_crop": False, "do_normalize": True, "do_resize": True,
                          "feature_extractor_type": "BeitFeatureExtractor", "image_mean": [0.5, 0.5, 0.5],
                          "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224},
        "class_defaults": {"image_processor_type": "BeitImageProcessor"},
        "bicubic_384": {"do_center_crop": False, "resample": 3, "size": 384, "crop_size": 384},
        "imagenet_lanczos": {"size": {"height": 72, "width": 96}, "resample": 1, "crop_size": {"height": 64, "width": 80},
                             "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
        "pad_crop_hamming": {"size": {"height": 50, "width": 70}, "resample": 5, "crop_size": [64, 80]},
        "no_resize_odd_crop": {"do_resize": False, "crop_size": {"height": 37, "width": 53}, "do_normalize": False},
        "box_scalar_norm": {"size": 45, "resample": 4, "do_center_crop": False, "do_rescale": False,
                            "image_mean": 127.5, "image_std": 60, "unknown_key": [1, 2]},
        "small_all_inputs": {"size": {"height": 48, "width": 64}, "crop_size": {"height": 40, "width": 56}, "resample": 3,
                             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                             "rescale_factor": 0.00392156862745098},
        "nearest": {"size": {"height": 61, "width": 47}, "resample": 0, "do_center_crop": False},
        "seg_reduce": {"size": {"height": 48, "width": 64}, "crop_size": 40, "do_reduce_labels": True},
        "seg_nearest_legacy_key": {"size": [70, 50], "resample": 0, "do_center_crop": False, "reduce_labels": True},
    }
    for name, cfg in configs.items():
        with open(path(f"configs/{name}.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    def processor(cfg_name):
        with open(path(f"configs/{cfg_name}.json")) as f:
            return BeitImageProcessor.from_dict(json.load(f))

    def open_rgb(p):
        return Image.open(path(p)).convert("RGB")

    def add_case(name, cfg_name, images, store):
        proc = processor(cfg_name)
        pv = proc([open_rgb(p) for p in images], return_tensors="np")["pixel_values"]
        assert pv.dtype == np.float32
        entry = {"name": name, "config": rel("configs", cfg_name + ".json"), "images": images,
                 "rescale_factor": proc.rescale_factor if proc.do_rescale else None,
                 "std": list(np.broadcast_to(np.asarray(proc.image_std, np.float64), (3,))) if proc.do_normalize else None,
                 "jpeg": any(p.endswith(".jpg") for p in images)}
        if store == "npy":
            entry["pixel_values"] = rel("pixel_values", name + ".npy")
            np.save(path(entry["pixel_values"]), pv)
        else:  # uint8 levels: invert the float formula, then check it reproduces the output bit for bit
            assert len(images) == 1
            scale = proc.rescale_factor if proc.do_rescale else 1.0
            mean = np.asarray(proc.image_mean, np.float32) if proc.do_normalize else np.zeros(3, np.float32)
            std = np.asarray(proc.image_std, np.float32) if proc.do_normalize else np.ones(3, np.float32)
            chw = pv[0]
            lv = np.rint((chw * std[:, None, None] + mean[:, None, None]) / scale).astype(np.int64)
            assert lv.min() >= 0 and lv.max() <= 255
            again = ((lv.astype(np.float64) * scale).astype(np.float32) - mean[:, None, None]) / std[:, None, None]
            assert np.array_equal(again.astype(np.float32), chw), "levels do not reproduce the float output"
            entry["levels"] = rel("pixel_values", name + ".png")
            Image.fromarray(lv.astype(np.uint8).transpose(1, 2, 0), "RGB").save(path(entry["levels"]), optimize=True)
        manifest["processor_cases"].append(entry)

    add_case("beit_base_224_astronaut", "beit_base_224", ["images/astronaut.png"], "levels")
    add_case("class_defaults_coffee_jpeg", "class_defaults", ["images/coffee_q90.jpg"], "levels")
    add_case("class_defaults_coffee", "class_defaults", ["images/coffee.png"], "levels")
    add_case("bicubic_384_chelsea", "bicubic_384", ["images/chelsea.png"], "levels")
    add_case("imagenet_lanczos_camera", "imagenet_lanczos", ["images/camera.png"], "npy")
    add_case("pad_crop_hamming_rgba", "pad_crop_hamming", ["images/rgba.png"], "npy")
    add_case("no_resize_odd_crop_palette", "no_resize_odd_crop", ["images/palette.png"], "npy")
    add_case("box_scalar_norm_gray_alpha", "box_scalar_norm", ["images/gray_alpha.png"], "npy")
    add_case("nearest_astronaut", "nearest", ["images/astronaut.png"], "npy")
    add_case("small_all_inputs_batch", "small_all_inputs",
             ["images/astronaut.png", "images/coffee.png", "images/chelsea.png", "images/camera.png", "images/rgba.png",
              "images/gray_alpha.png", "images/gray16.png", "images/rgb16.png", "images/gray4.png", "images/palette.png"], "npy")
    add_case("small_jpeg_444", "small_all_inputs", ["images/chelsea_q90_444.jpg"], "npy")

    # ---- segmentation maps: `labels` (the images only need to be valid) ----
    for cfg_name in ("seg_reduce", "seg_nearest_legacy_key"):
        proc = processor(cfg_name)
        out = proc(images=[open_rgb("images/chelsea.png")], segmentation_maps=[Image.open(path("images/label.png"))],
                   return_tensors="np")
        assert out["labels"].dtype == np.int64
        np.save(path(f"labels/{cfg_name}.npy"), out["labels"])
        manifest["label_cases"].append({"config": rel("configs", cfg_name + ".json"), "map": "images/label.png",
                                        "labels": rel("labels", cfg_name + ".npy")})
    # Maps Pillow opens without expansion: a palette PNG (its indices, as Pascal VOC's masks) and 4-bit gray.
    for map_name in ("palette", "gray4"):
        proc = processor("seg_nearest_legacy_key")
        out = proc(images=[open_rgb("images/chelsea.png")], segmentation_maps=[Image.open(path(f"images/{map_name}.png"))],
                   return_tensors="np")
        np.save(path(f"labels/seg_nearest_legacy_key_{map_name}.npy"), out["labels"])
        manifest["label_cases"].append({"config": rel("configs", "seg_nearest_legacy_key.json"),
                                        "map": f"images/{map_name}.png",
                                        "labels": rel("labels", f"seg_nearest_legacy_key_{map_name}.npy")})

    # ---- raw Pillow resize: every filter; crops keep the outputs small ----
    sources = {  # name: (image, crop box (left, top, width, height))
        "astronaut_down": ("images/astronaut.png", (60, 40, 120, 100)),
        "camera_down": ("images/camera.png", (50, 30, 100, 90)),
        "astronaut_up": ("images/astronaut.png", (100, 80, 30, 24)),
        "camera_up": ("images/camera.png", (90, 60, 30, 24)),
    }
    sizes = {  # (width, height): down both (H first / V first), one axis, up, up-x-down-y (V first), 1x1
        "down": [(47, 31), (17, 23), (120, 25), (30, 100), (100, 40), (60, 90), (1, 1)],
        "up": [(67, 53), (31, 70), (75, 11), (30, 61)],
    }
    for src_name, (img_path, (x, y, w, h)) in sources.items():
        im = Image.open(path(img_path))
        im = im.crop((x, y, x + w, y + h))
        for f in range(6):
            for size in sizes[src_name.split("_")[1]]:
                out = rel("resize", f"{src_name}_f{f}_{size[0]}x{size[1]}.png")
                im.resize(size, f).save(path(out))
                manifest["resize_cases"].append({"image": img_path, "crop": [x, y, w, h], "filter": f,
                                                 "size": list(size), "expected": out})

    # ---- JPEG decoding: PIL's RGB for assorted encodings (odd sizes) ----
    src = skimage.data.chelsea()[50:111, 120:187]  # 67x61
    jpegs = {
        "progressive_420_restart": lambda p: Image.fromarray(src).save(p, quality=85, subsampling=2, progressive=True, restart_marker_blocks=2),
        "baseline_422_optimized": lambda p: Image.fromarray(src).save(p, quality=70, subsampling=1, optimize=True),
        "progressive_444": lambda p: Image.fromarray(src).save(p, quality=95, subsampling=0, progressive=True),
        "adobe_rgb": lambda p: Image.fromarray(src).save(p, quality=90, keep_rgb=True),
        "gray_progressive": lambda p: Image.fromarray(src[..., 1]).save(p, quality=80, progressive=True),
        "mini_440_restart": lambda p: open(p, "wb").write(mini_jpeg(src, [(1, 2), (1, 1), (1, 1)], restart=3)),
        "mini_411_separate_scans": lambda p: open(p, "wb").write(mini_jpeg(src, [(4, 1), (1, 1), (1, 1)], interleaved=False)),
        "mini_mixed_factors": lambda p: open(p, "wb").write(mini_jpeg(src[:29, :3], [(2, 2), (1, 2), (2, 1)])),
        "mini_3x1": lambda p: open(p, "wb").write(mini_jpeg(src, [(3, 1), (1, 1), (3, 1)], restart=1)),
    }
    # CMYK with a real black channel (K = 255 - max(R, G, B)), as PIL's CMYK mode holds it.
    rgbf = src.astype(np.float64)
    k = 255 - rgbf.max(axis=2)
    cmy = np.where(k[..., None] < 255, (255 - rgbf - k[..., None]) / np.maximum(255 - k[..., None], 1) * 255, 0)
    cmyk = Image.fromarray(np.dstack([cmy, k]).round().astype(np.uint8), "CMYK")

    def ycck(p):
        # PIL writes CMYK with an Adobe marker, transform 0. Stored components Y, Cb, Cr, K (PIL stores 255 - each
        # channel given) and the transform byte set to 2 make a YCCK file, which libjpeg converts back to CMYK.
        ycc = np.asarray(Image.fromarray(src).convert("YCbCr"))
        given = np.dstack([255 - ycc, np.asarray(cmyk)[..., 3]])
        Image.fromarray(given, "CMYK").save(p, quality=90, subsampling=1)
        data = bytearray(open(p, "rb").read())
        at = data.index(b"Adobe")
        assert data[at + 11] == 0, data[at:at + 12]
        data[at + 11] = 2
        open(p, "wb").write(bytes(data))

    jpegs["cmyk_444"] = lambda p: cmyk.save(p, quality=90)
    jpegs["cmyk_progressive_420"] = lambda p: cmyk.save(p, quality=85, subsampling=2, progressive=True)
    jpegs["ycck_422"] = ycck
    for name, save in jpegs.items():
        jp = rel("jpeg", name + ".jpg")
        save(path(jp))
        decoded = Image.open(path(jp)).convert("RGB")
        decoded.save(path(rel("jpeg", name + ".png")))
        manifest["jpeg_cases"].append({"jpeg": jp, "expected": rel("jpeg", name + ".png")})

    # ---- torch: post_process_semantic_segmentation and bilinear interpolate ----
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, 9)
    np.save(path("torch/logits.npy"), logits.numpy())

    class Out:
        pass

    o = Out()
    o.logits = logits
    proc = BeitImageProcessor()
    targets = [(20, 30), (4, 5)]
    seg = proc.post_process_semantic_segmentation(o, target_sizes=targets)
    for i, s in enumerate(seg):
        np.save(path(f"torch/seg_target_{i}.npy"), s.numpy())
    seg = proc.post_process_semantic_segmentation(o)
    np.save(path("torch/seg_none.npy"), torch.stack(seg).numpy())
    o.logits = torch.randint(0, 3, (1, 4, 6, 5)).float()  # ties: the first maximum wins
    np.save(path("torch/logits_ties.npy"), o.logits.numpy())
    np.save(path("torch/seg_ties.npy"), torch.stack(proc.post_process_semantic_segmentation(o)).numpy())
    src = torch.randn(3, 5, 6)
    np.save(path("torch/interp_src.npy"), src.numpy())
    interp = []
    for oh, ow in [(11, 13), (3, 4), (5, 6), (1, 1), (7, 2), (40, 17)]:
        for ac in (False, True):
            r = torch.nn.functional.interpolate(src[None], size=(oh, ow), mode="bilinear", align_corners=ac)[0]
            name = rel("torch", f"interp_{oh}x{ow}_{'ac' if ac else 'noac'}.npy")
            np.save(path(name), r.numpy())
            interp.append({"size": [oh, ow], "align_corners": ac, "expected": name})
    manifest["torch"] = {"logits": "torch/logits.npy", "target_sizes": targets,
                         "seg_target": [f"torch/seg_target_{i}.npy" for i in range(2)], "seg_none": "torch/seg_none.npy",
                         "logits_ties": "torch/logits_ties.npy", "seg_ties": "torch/seg_ties.npy",
                         "interp_src": "torch/interp_src.npy", "interp": interp}

    with open(path("manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(ROOT) for n in ns)
    print(f"wrote {ROOT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
