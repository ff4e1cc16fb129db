"""Tiny Hugging Face datasets stored as parquet, for crates/beit/src/train/parquet.rs and the CLI tests.

Writes crates/beit/tests/fixtures/parquet/:
  classification/          datasets' own writer (the Hub's layout: data/{train,validation}-00000-of-00001.parquet,
                           ClassLabel names in the `huggingface` schema metadata, README.md with dataset_info)
  classification_readme/   plain pyarrow, no metadata, `img` column, train/0000.parquet + test/0000.parquet (the
                           layout of the Hub's refs/convert/parquet), names only in README.md's dataset_info
  unnamed.parquet          one file, no names anywhere (classes "0".."n-1")
  segmentation_train/      datasets' writer: 6 + 3 rows of colour bands with 8-bit masks, to train on
  segmentation/            datasets' writer: image + annotation (8-bit L, palette P and 16-bit masks), train and
                           validation, an extra scene_category column, id2label.json
  bad_label/, no_image/    errors: a label beyond the names, no image column
  expected.json            what each should read as: labels, class names, image and mask sizes and sums (as PIL
                           decodes them)

Run from the repository root: venv/py/bin/python scripts/gen_parquet_fixtures.py (pins: scripts/requirements.txt).
"""
import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "crates/beit/tests/fixtures/parquet")
DIGITS = os.path.join(ROOT, "data/digits")
NAMES = ["zero", "one", "two"]


def digit_png(d, i):
    files = sorted(os.listdir(os.path.join(DIGITS, str(d))))
    with open(os.path.join(DIGITS, str(d), files[i]), "rb") as f:
        return files[i], f.read()


def as_jpeg(png, size):
    """An RGB JPEG of a digit (upscaled, tinted), so that both PNG and JPEG decoding are exercised."""
    im = PILImage.open(io.BytesIO(png)).convert("RGB").resize(size, PILImage.BILINEAR)
    a = np.asarray(im).astype(np.int32)
    a[..., 0] = np.clip(a[..., 0] + 40, 0, 255)
    buf = io.BytesIO()
    PILImage.fromarray(a.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def rgb_sum(data):
    return int(np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"), dtype=np.int64).sum())


def size(data):
    return list(PILImage.open(io.BytesIO(data)).size)


def classification_rows(split):
    """(name, bytes, label) for a split: 4 rows per class in train, 2 in validation, every third a JPEG."""
    per, start = (4, 0) if split == "train" else (2, 10)
    rows = []
    for k in range(per):
        for label in range(len(NAMES)):
            name, png = digit_png(label, start + k)
            if (k + label) % 3 == 0:
                rows.append((name.replace(".png", ".jpg"), as_jpeg(png, (12, 10)), label))
            else:
                rows.append((name, png, label))
    return rows


def expected_split(rows):
    return {
        "labels": [r[2] for r in rows],
        "sizes": [size(r[1]) for r in rows],
        "sums": [rgb_sum(r[1]) for r in rows],
    }


def image_struct(rows):
    """The Arrow type datasets gives an Image feature: struct<bytes: binary, path: string>."""
    return pa.array(
        [{"bytes": b, "path": n} for n, b, _ in rows],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )


def write_readme(path, column, names):
    """The dataset card's YAML as push_to_hub writes it (names under class_label)."""
    lines = ["---", "dataset_info:", "  features:", f"  - name: {column}", "    dtype: image", "  - name: label",
             "    dtype:", "      class_label:", "        names:"]
    lines += [f"          '{i}': {n}" for i, n in enumerate(names)]
    lines += ["  splits:", "  - name: train", "    num_examples: 12", "---", "", "# A tiny test dataset", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def classification(expected):
    d = os.path.join(OUT, "classification")
    features = Features({"image": Image(), "label": ClassLabel(names=NAMES)})
    exp = {"classes": NAMES}
    for split in ["train", "validation"]:
        rows = classification_rows(split)
        ds = Dataset.from_dict(
            {"image": [{"bytes": b, "path": n} for n, b, _ in rows], "label": [r[2] for r in rows]}, features=features
        )
        os.makedirs(os.path.join(d, "data"), exist_ok=True)
        ds.to_parquet(os.path.join(d, "data", f"{split}-00000-of-00001.parquet"))
        exp[split] = expected_split(rows)
    write_readme(os.path.join(d, "README.md"), "image", NAMES)
    expected["classification"] = exp

    # No schema metadata: the names come from README.md; `img` as CIFAR-10 calls it; test as the validation split.
    d = os.path.join(OUT, "classification_readme")
    names = ["nought", "uno", "deux"]
    exp = {"classes": names}
    for split, src in [("train", "train"), ("test", "validation")]:
        rows = classification_rows(src)
        table = pa.table({"img": image_struct(rows), "label": pa.array([r[2] for r in rows], pa.int64())})
        os.makedirs(os.path.join(d, split), exist_ok=True)
        pq.write_table(table, os.path.join(d, split, "0000.parquet"))
        exp["validation" if split == "test" else split] = expected_split(rows)
    write_readme(os.path.join(d, "README.md"), "img", names)
    expected["classification_readme"] = exp

    # One file, no names: classes are the label values. gzip, to read a codec besides snappy.
    rows = classification_rows("validation")
    table = pa.table({"image": image_struct(rows), "label": pa.array([r[2] for r in rows], pa.int64())})
    pq.write_table(table, os.path.join(OUT, "unnamed.parquet"), compression="gzip")
    expected["unnamed"] = {"classes": ["0", "1", "2"], "train": expected_split(rows)}

    # Errors: a label beyond the three names; no image column.
    rows = classification_rows("validation")[:3]
    labels = [0, 5, 1]
    ds = Dataset.from_dict(
        {"image": [{"bytes": b, "path": n} for n, b, _ in rows], "label": [0, 1, 1]}, features=features
    )
    table = ds.data.table.set_column(1, pa.field("label", pa.int64()), pa.array(labels, pa.int64()))
    table = table.replace_schema_metadata(ds.data.table.schema.metadata)
    os.makedirs(os.path.join(OUT, "bad_label/data"), exist_ok=True)
    pq.write_table(table, os.path.join(OUT, "bad_label/data/train-00000-of-00001.parquet"))
    os.makedirs(os.path.join(OUT, "no_image"), exist_ok=True)
    pq.write_table(
        pa.table({"pixels": pa.array([b for _, b, _ in rows]), "label": pa.array([0, 1, 1], pa.int64())}),
        os.path.join(OUT, "no_image/train.parquet"),
    )


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def segmentation(expected):
    rng = np.random.default_rng(17)
    d = os.path.join(OUT, "segmentation")
    os.makedirs(os.path.join(d, "data"), exist_ok=True)
    features = Features({"image": Image(), "annotation": Image(), "scene_category": Value("int64")})
    exp = {"classes": ["background", "wall", "floor", "sky", "tree"]}
    for split, n in [("train", 4), ("validation", 2)]:
        images, masks, rows = [], [], []
        for i in range(n):
            w, h = 12 + 2 * i, 10 + i
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            m = rng.integers(0, 5, (h, w), dtype=np.uint8)
            m[0, 0] = 255  # the ignored id passes through
            im = PILImage.fromarray(img)
            ib = png_bytes(im) if i % 2 == 0 else None
            if ib is None:
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                ib = buf.getvalue()
            kind = ["L", "P", "I;16", "L"][i % 4]
            if kind == "L":
                mb = png_bytes(PILImage.fromarray(m))
            elif kind == "P":
                p = PILImage.frombytes("P", (w, h), m.tobytes())
                p.putpalette([v for c in range(256) for v in (c * 40 % 256, c * 90 % 256, c * 7 % 256)])
                mb = png_bytes(p)
            else:
                m16 = (m.astype(np.uint16) + 300 * (m == 4)).astype(np.uint16)  # ids above 255 need 16 bits
                m = m16
                mb = png_bytes(PILImage.fromarray(m16))
            images.append({"bytes": ib, "path": f"{split}_{i}.png"})
            masks.append({"bytes": mb, "path": f"{split}_{i}_seg.png"})
            rows.append(
                {
                    "size": [w, h],
                    "image_sum": rgb_sum(ib),
                    "mask_sum": int(np.asarray(PILImage.open(io.BytesIO(mb)), dtype=np.int64).sum()),
                    "mask_max": int(np.asarray(PILImage.open(io.BytesIO(mb))).max()),
                    "mask_first_row": [int(v) for v in np.asarray(PILImage.open(io.BytesIO(mb)))[0]],
                    "kind": kind,
                }
            )
        ds = Dataset.from_dict(
            {"image": images, "annotation": masks, "scene_category": list(range(n))}, features=features
        )
        ds.to_parquet(os.path.join(d, "data", f"{split}-00000-of-00001.parquet"))
        exp[split] = rows
    with open(os.path.join(d, "id2label.json"), "w") as f:
        json.dump({str(i): n for i, n in enumerate(exp["classes"])}, f)
    # An RGB mask: an error naming the row.
    rgb = {"bytes": png_bytes(PILImage.new("RGB", (4, 4))), "path": "rgb.png"}
    ds = Dataset.from_dict({"image": [rgb], "annotation": [rgb]}, features=Features({"image": Image(), "annotation": Image()}))
    os.makedirs(os.path.join(OUT, "rgb_mask"), exist_ok=True)
    ds.to_parquet(os.path.join(OUT, "rgb_mask/train.parquet"))
    expected["segmentation"] = exp


def segmentation_train():
    """segmentation_train/: a small set to train on (beit-cli's parquet test): three vertical colour bands,
    classes 0-2, a few ignored pixels; 6 training and 3 validation rows, 8-bit masks."""
    d = os.path.join(OUT, "segmentation_train")
    os.makedirs(os.path.join(d, "data"), exist_ok=True)
    features = Features({"image": Image(), "annotation": Image()})
    colors = np.array([[200, 30, 40], [40, 180, 50], [30, 60, 190]], dtype=np.uint8)
    for split, n in [("train", 6), ("validation", 3)]:
        images, masks = [], []
        for i in range(n):
            w, h = 18 + 2 * i, 14 + i
            m = ((np.arange(w)[None, :] + i) * 3 // w % 3).repeat(h, 0).astype(np.uint8)
            m[0, :2] = 255
            img = colors[np.minimum(m, 2)]
            images.append({"bytes": png_bytes(PILImage.fromarray(img)), "path": f"{split}_{i}.png"})
            masks.append({"bytes": png_bytes(PILImage.fromarray(m)), "path": f"{split}_{i}_seg.png"})
        Dataset.from_dict({"image": images, "annotation": masks}, features=features).to_parquet(
            os.path.join(d, "data", f"{split}-00000-of-00001.parquet"))
    with open(os.path.join(d, "id2label.json"), "w") as f:
        json.dump({"0": "red", "1": "green", "2": "blue"}, f)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    expected = {}
    classification(expected)
    segmentation(expected)
    segmentation_train()
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total} bytes")


if __name__ == "__main__":
    main()
