"""Fixture for the mIoU code (crates/beit/src/train/seg_metrics.rs): small random prediction and label maps (with
255, absent classes and out-of-range ids) and what `evaluate`'s `mean_iou` gives for them.

The reference below follows the steps of huggingface/evaluate metrics/mean_iou/mean_iou.py (intersect_and_union,
total_intersect_and_union, mean_iou; the metric module lives on the Hub, which the fixture machines cannot reach):
np.histogram with bins=num_labels over range=(0, num_labels - 1), areas summed over the dataset in float64, IoU and
accuracy per class, nanmean over classes.

    python scripts/gen_seg_metric_fixtures.py
"""
import json
import os

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "beit", "tests", "fixtures", "seg_metrics")


def areas(pred, label, num_labels, ignore_index, reduce_labels):
    pred = np.array(pred)
    label = np.array(label)
    if reduce_labels:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    keep = np.not_equal(label, ignore_index)
    pred = pred[keep]
    label = label[keep]
    intersect = pred[pred == label]
    hist = lambda x: np.histogram(x, bins=num_labels, range=(0, num_labels - 1))[0]
    a_int, a_pred, a_label = hist(intersect), hist(pred), hist(label)
    return a_int, a_pred + a_label - a_int, a_pred, a_label


def mean_iou(preds, labels, num_labels, ignore_index, reduce_labels):
    tot = [np.zeros((num_labels,), dtype=np.float64) for _ in range(4)]
    for p, l in zip(preds, labels):
        for t, a in zip(tot, areas(p, l, num_labels, ignore_index, reduce_labels)):
            t += a
    inter, union, pred_area, label_area = tot
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / label_area
        all_acc = inter.sum() / label_area.sum()
    return {
        "mean_iou": float(np.nanmean(iou)),
        "mean_accuracy": float(np.nanmean(acc)),
        "overall_accuracy": float(all_acc),
        "per_category_iou": [None if np.isnan(v) else float(v) for v in iou],
        "per_category_accuracy": [None if np.isnan(v) else float(v) for v in acc],
        "area_intersect": inter.tolist(),
        "area_union": union.tolist(),
        "area_pred_label": pred_area.tolist(),
        "area_label": label_area.tolist(),
    }


def case(rng, name, num_labels, shapes, reduce_labels):
    preds, labels = [], []
    for h, w in shapes:
        # Classes num_labels-1 and (for the larger cases) 2 never appear in the labels; some predictions are out of
        # range, as an untrained model's are not but a wrong caller's could be.
        present = [c for c in range(num_labels - 1) if not (num_labels > 4 and c == 2)]
        label = rng.choice(present + [255], size=(h, w)).astype(np.int64)
        if reduce_labels:
            label = rng.choice(list(range(num_labels)) + [255], size=(h, w)).astype(np.int64)
        # In the larger cases the predictions also miss classes 2 and num_labels-1 (their IoU is NaN) and a few lie
        # out of range (num_labels + 1: no bin counts them).
        choices = present + [num_labels + 1] if num_labels > 4 else list(range(num_labels))
        other = rng.choice(choices, size=(h, w))
        pred = np.where(rng.random((h, w)) < 0.5, label, other)
        pred = np.where(pred == 255, other, pred)
        preds.append(pred.tolist())
        labels.append(label.tolist())
    ref = mean_iou(preds, labels, num_labels, 255, reduce_labels)
    return {"name": name, "num_labels": num_labels, "ignore_index": 255, "reduce_labels": reduce_labels,
            "predictions": preds, "labels": labels, "expected": ref}


def main():
    rng = np.random.default_rng(17)
    cases = [
        case(rng, "three_maps", 6, [(5, 7), (4, 4), (9, 3)], False),
        case(rng, "reduce_labels", 5, [(6, 6), (3, 8)], True),
        case(rng, "two_classes", 2, [(4, 5)], False),
    ]
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "mean_iou.json"), "w") as f:
        json.dump(cases, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
