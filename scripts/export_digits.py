#!/usr/bin/env python3
"""Exports scikit-learn's handwritten digits (load_digits: 1,797 images of 8x8, 10 classes) as an image folder:
data/digits/<class>/<index>.png, 8-bit grayscale with the 0-16 intensities scaled to 0-255.
Origin: the UCI ML "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak, 1998), as shipped by
scikit-learn (BSD-3-Clause); the data set is licensed CC BY 4.0 by the UCI repository."""
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "digits")
d = load_digits()
for i, (img, label) in enumerate(zip(d.images, d.target)):
    cls = os.path.join(out, str(label))
    os.makedirs(cls, exist_ok=True)
    Image.fromarray(np.round(img * 255.0 / 16.0).astype(np.uint8), mode="L").save(os.path.join(cls, f"{i:04d}.png"), optimize=True)
print(len(d.images), "images in", out)
