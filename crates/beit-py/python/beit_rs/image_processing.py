"""transformers' ``BeitImageProcessor``: resize, center crop, rescale and normalize exactly as its slow (PIL-based)
implementation does, run by the Rust library; and the images a pipeline or processor takes."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from .configuration import JsonConfig

ImageInput = Any
"""A path (str or os.PathLike), encoded bytes, a PIL image, or a uint8 array (height, width[, channels]) or
(channels, height, width)."""


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "convert")


def _as_list(images: Any) -> Tuple[List[Any], bool]:
    """The images as a list, and whether a single one was given."""
    if isinstance(images, (list, tuple)):
        return list(images), False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False
    return [images], True


def _pixels(a: np.ndarray, what: str) -> np.ndarray:
    """A uint8 image array as (height, width, 3) RGB, as PIL's ``convert("RGB")`` sees it."""
    if a.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixel values (0-255), found an array of {a.dtype}")
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # channels first, as transformers infers it
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)  # grayscale: L -> RGB repeats the value
    elif a.ndim == 3 and a.shape[-1] == 4:
        a = a[:, :, :3]  # RGBA -> RGB drops alpha
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{what}: expected (height, width), (height, width, 1|3|4) or (1|3, height, width), found shape {a.shape}")
    return np.ascontiguousarray(a)


def _source(x: Any, what: str) -> Any:
    """One image as the native module takes it: a path, bytes, or (height, width, 3) uint8 RGB pixels."""
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if _is_pil(x):
        from PIL import ImageOps  # Pillow is there: x is one of its images

        # As transformers' load_image: upright by the EXIF orientation, then RGB.
        return np.asarray(ImageOps.exif_transpose(x).convert("RGB"))
    return _pixels(np.asarray(x), what)


def _sources(images: Sequence[Any], name: str = "images") -> List[Any]:
    return [_source(x, f"{name}[{i}]") for i, x in enumerate(images)]


def _map_source(x: Any, what: str) -> Any:
    """One segmentation map: a path, bytes, or (height, width) uint8 class ids."""
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    a = np.asarray(x)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{what}: expected class ids 0-255, found {a.min()}..{a.max()}")
        a = a.astype(np.uint8)
    return np.ascontiguousarray(a)


class BatchFeature(dict):
    """The processor's output: a dict (``pixel_values``, ``labels``) whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _tensors(d: Dict[str, np.ndarray], return_tensors: Optional[str]) -> BatchFeature:
    if return_tensors in (None, "np"):
        return BatchFeature(d)
    if return_tensors == "pt":
        import torch  # only when the caller asked for torch tensors

        return BatchFeature({k: torch.from_numpy(v) for k, v in d.items()})
    raise ValueError(f'return_tensors: expected "np", "pt" or None, found {return_tensors!r}')


# transformers' BeitImageProcessor defaults, for to_dict and the attributes (the Rust library applies the same).
_DEFAULTS: Dict[str, Any] = {
    "do_resize": True,
    "size": {"height": 256, "width": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_reduce_labels": False,
}


class BeitImageProcessor(JsonConfig):
    """transformers' BeitImageProcessor: ``processor(images, segmentation_maps=None, return_tensors="np")`` gives
    ``pixel_values`` (batch, 3, height, width) float32 and, with maps, ``labels`` (batch, height, width) int64,
    equal to transformers' own. Settings are attributes (``processor.size``, ``processor.image_mean``)."""

    model_input_names = ["pixel_values"]
    _file_name = "preprocessor_config.json"

    def __init__(self, **kwargs: Any) -> None:
        self._init(_native.Processor.from_json(json.dumps(kwargs)), kwargs)

    def _init(self, native: Any, config: Dict[str, Any]) -> None:
        self._native = native
        self._config = {k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")}
        for k, v in self.to_dict().items():
            setattr(self, k, v)

    @classmethod
    def _from_native(cls, native: Any) -> "BeitImageProcessor":
        obj = cls.__new__(cls)
        config: Dict[str, Any] = {}
        if native.source is not None:
            with open(native.source, encoding="utf-8") as f:
                config = json.load(f)
        obj._init(native, config)
        return obj

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], revision: Optional[str] = None
    ) -> "BeitImageProcessor":
        """preprocessor_config.json of a model directory, a weights file's directory or a Hub repo id (a directory
        without one is an ``OSError``, as in transformers)."""
        return cls._from_native(_native.Processor.from_pretrained(os.fspath(pretrained_model_name_or_path), revision))

    @classmethod
    def from_dict(cls, image_processor_dict: Dict[str, Any]) -> "BeitImageProcessor":
        """A processor from preprocessor_config.json's fields."""
        return cls(**image_processor_dict)

    def to_dict(self) -> Dict[str, Any]:
        """The settings, as preprocessor_config.json holds them."""
        d = {**_DEFAULTS, **self._config}
        d["image_processor_type"] = "BeitImageProcessor"
        return d

    def __call__(
        self,
        images: ImageInput,
        segmentation_maps: Optional[Any] = None,
        return_tensors: Optional[str] = "np",
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocesses an image or a list of them (and their segmentation maps). Keyword arguments override the
        settings for this call (``do_resize=False``, ``size={"height": 384, "width": 384}``, ...)."""
        native = _native.Processor.from_json(json.dumps({**self.to_dict(), **kwargs})) if kwargs else self._native
        items, _ = _as_list(images)
        out = {"pixel_values": native.preprocess(_sources(items))}
        if segmentation_maps is not None:
            maps, _ = _as_list(segmentation_maps)
            if len(maps) != len(items):
                raise ValueError(f"segmentation_maps: expected {len(items)} (one per image), found {len(maps)}")
            out["labels"] = native.preprocess_segmentation_maps(
                [_map_source(m, f"segmentation_maps[{i}]") for i, m in enumerate(maps)]
            )
        return _tensors(out, return_tensors)

    preprocess = __call__

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Optional[Sequence[Tuple[int, int]]] = None
    ) -> List[np.ndarray]:
        """Class maps (height, width) int64, one per image, from a segmentation model's output (or its logits);
        upsampled to ``target_sizes[i] = (height, width)`` first when given, as transformers does."""
        logits = getattr(outputs, "logits", outputs)
        logits = np.ascontiguousarray(np.asarray(logits, dtype=np.float32))
        sizes = None if target_sizes is None else [(int(h), int(w)) for h, w in target_sizes]
        return self._native.post_process_semantic_segmentation(logits, sizes)


BeitFeatureExtractor = BeitImageProcessor
