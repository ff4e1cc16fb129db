#!/usr/bin/env python3
"""EXIF-orientation fixtures for the Rust image loading (crates/beit/src/processor/load.rs, exif.rs), written under
crates/beit/tests/fixtures/processor/exif/ (gen_processor_fixtures.py leaves that folder alone).

Run by hand (never by CI), in a venv with scripts/requirements.txt installed:
    python scripts/gen_exif_fixtures.py

A 64x48 crop of the chelsea fixture, stored sideways (or flipped) so that each orientation tag 1-8 turns it upright,
as JPEG (APP1 Exif) and PNG (eXIf) for every tag, lossless WebP (EXIF chunk) and uncompressed TIFF (IFD0 tag) for
some, and JPEG and PNG with the orientation only in XMP. For each image: transformers 4.57.6's `load_image` (PIL's
`exif_transpose` then `convert("RGB")`) as a PNG, and its BeitImageProcessor pixel values (.npy float32). A label
map with orientation 6 (PNG, deflate TIFF) and its `labels`: transformers does not transpose segmentation maps, but
PIL's TIFF plugin transposes TIFFs on load.
"""
import io
import json
import os
import shutil

import numpy as np
import PIL
import PIL.Image as Image
import PIL.PngImagePlugin as PngImagePlugin
import transformers
from transformers import BeitImageProcessor
from transformers.image_utils import load_image

assert transformers.__version__ == "4.57.6", transformers.__version__
assert PIL.__version__ == "13.0.0", PIL.__version__

PROC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "beit", "tests", "fixtures", "processor")
ROOT = os.path.join(PROC, "exif")
T = Image.Transpose
# exif_transpose's method per tag, and the inverse that stores the upright image so that the tag undoes it.
METHOD = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
          7: T.TRANSVERSE, 8: T.ROTATE_90}
INVERSE = {**METHOD, 6: T.ROTATE_90, 8: T.ROTATE_270}
CONFIG = {"size": {"height": 30, "width": 40}, "resample": 3, "do_center_crop": False,
          "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def stored(img, orientation):
    return img if orientation == 1 else img.transpose(INVERSE[orientation])


def exif(orientation):
    e = Image.Exif()
    e[0x0112] = orientation
    return e


def xmp(orientation):
    return (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
            f'</rdf:RDF></x:xmpmeta>')


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    path = lambda p: os.path.join(PROC, p)  # noqa: E731
    upright = Image.open(path("images/chelsea.png")).convert("RGB").crop((80, 40, 144, 88))  # 64x48
    label = Image.open(path("images/label.png")).crop((20, 10, 84, 58))  # 64x48, mode L
    with open(path("exif/config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    proc = BeitImageProcessor.from_dict(CONFIG)
    manifest = {"config": "exif/config.json", "cases": [], "label_cases": []}

    def save(name, img, fmt, **kw):
        rel = f"exif/{name}"
        img.save(path(rel), fmt, **kw)
        return rel

    written = {}  # (size, pixels) -> the expected files already written for them: lossless cases share one

    def add(name, rel):
        rgb = load_image(path(rel))
        key = (rgb.size, rgb.tobytes())
        if key not in written:
            rgb_rel, pv_rel = f"exif/{name}_rgb.png", f"exif/{name}.npy"
            rgb.save(path(rgb_rel))
            pv = proc(rgb, return_tensors="np")["pixel_values"]
            assert pv.dtype == np.float32
            np.save(path(pv_rel), pv)
            written[key] = (rgb_rel, pv_rel)
        rgb_rel, pv_rel = written[key]
        manifest["cases"].append({"image": rel, "rgb": rgb_rel, "pixel_values": pv_rel})
        return rgb

    for o in range(1, 9):
        add(f"jpeg_o{o}", save(f"jpeg_o{o}.jpg", stored(upright, o), "JPEG", quality=90, exif=exif(o)))
        rgb = add(f"png_o{o}", save(f"png_o{o}.png", stored(upright, o), "PNG", exif=exif(o)))
        assert rgb.tobytes() == upright.tobytes(), f"PNG orientation {o} did not come back upright"
    for o in (3, 6):
        add(f"webp_o{o}", save(f"webp_o{o}.webp", stored(upright, o), "WEBP", lossless=True, exif=exif(o)))
    for o in (5, 8):
        add(f"tiff_o{o}", save(f"tiff_o{o}.tif", stored(upright, o), "TIFF", exif=exif(o)))
    add("jpeg_xmp_o8", save("jpeg_xmp_o8.jpg", stored(upright, 8), "JPEG", quality=90, xmp=xmp(8).encode()))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp(7))
    rgb = add("png_xmp_o7", save("png_xmp_o7.png", stored(upright, 7), "PNG", pnginfo=info))
    assert rgb.tobytes() == upright.tobytes(), "PNG with XMP orientation did not come back upright"

    # The TIFF map is compressed: Pillow 13 memory-maps small uncompressed single-strip L/P/RGBA TIFFs opened by
    # path, and then skips the orientation while reporting the transposed size (np.array gives scrambled rows).
    for name, fmt, kw in (("label_o6.png", "PNG", {}), ("label_o6.tif", "TIFF", {"compression": "tiff_deflate"})):
        rel = save(name, stored(label, 6), fmt, exif=exif(6), **kw)
        out = proc(images=[upright], segmentation_maps=[Image.open(path(rel))], return_tensors="np")
        assert out["labels"].dtype == np.int64
        labels_rel = f"exif/{name.replace('.', '_')}_labels.npy"
        np.save(path(labels_rel), out["labels"])
        manifest["label_cases"].append({"map": rel, "labels": labels_rel})

    with open(path("exif/manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(ROOT, n)) for n in os.listdir(ROOT))
    print(f"wrote {ROOT}: {len(os.listdir(ROOT))} files, {total / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
