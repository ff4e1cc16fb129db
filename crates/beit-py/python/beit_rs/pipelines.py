"""transformers' ``pipeline(task, model=...)`` for image classification, image segmentation and image feature
extraction: images in (paths, PIL images, arrays, bytes, or lists of them), transformers' answers out."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .image_processing import _as_list, _sources
from .modeling import BeitPreTrainedModel, _dtype_name

# The class each task loads, as transformers' AutoModelFor<task> picks it for a BEiT checkpoint (the library turns
# each into its Data2VecVision counterpart for a data2vec-vision checkpoint).
TASKS: Dict[str, str] = {
    "image-classification": "BeitForImageClassification",
    "image-segmentation": "BeitForSemanticSegmentation",
    "image-feature-extraction": "BeitModel",
}


class Pipeline:
    """A model with its image processor, called on images. ``batch_size`` images go through the model at once."""

    task = ""

    def __init__(self, model: BeitPreTrainedModel, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected at least 1, found {batch_size}")
        self.model = model
        self.batch_size = batch_size

    @property
    def image_processor(self) -> Any:
        """The model's image processor."""
        return self.model.image_processor

    def _batches(self, images: Any) -> Any:
        items, single = _as_list(images)
        sources = _sources(items)
        chunks = [sources[i : i + self.batch_size] for i in range(0, len(sources), self.batch_size)]
        return chunks, single

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        chunks, single = self._batches(images)
        results: List[Any] = []
        for chunk in chunks:
            results.extend(self._run(chunk, **kwargs))
        return results[0] if single else results

    def _run(self, sources: List[Any], **kwargs: Any) -> List[Any]:
        raise NotImplementedError


class ImageClassificationPipeline(Pipeline):
    """``pipe(images, top_k=5)``: for each image the ``top_k`` best ``{"label", "score"}``, best first (softmax,
    or sigmoid for a multi-label or single-label config, as transformers)."""

    task = "image-classification"

    def __call__(self, images: Any, top_k: int = 5) -> Any:  # noqa: D102 (documented on the class)
        if top_k < 1:
            raise ValueError(f"top_k: expected at least 1, found {top_k}")
        return super().__call__(images, top_k=top_k)

    def _run(self, sources: List[Any], top_k: int = 5) -> List[Any]:
        preds = self.model._native.classify(sources, top_k)
        return [[{"label": label, "score": score} for label, score in p] for p in preds]


class ImageSegmentationPipeline(Pipeline):
    """``pipe(images)``: for each image one ``{"score": None, "label", "mask"}`` per class present, the mask a PIL
    image (mode "L", 255 where the class is) at the image's size, or a uint8 array when Pillow is not installed."""

    task = "image-segmentation"

    def _run(self, sources: List[Any]) -> List[Any]:
        try:
            from PIL import Image
        except ImportError:  # masks stay arrays
            Image = None
        id2label = self.model.config.id2label
        out = []
        for seg in self.model._native.segment(sources):
            segments = []
            for label in np.unique(seg):
                mask = (seg == label).astype(np.uint8) * 255
                segments.append(
                    {
                        "score": None,
                        "label": id2label.get(int(label), f"LABEL_{label}"),
                        "mask": Image.fromarray(mask) if Image is not None else mask,
                    }
                )
            out.append(segments)
        return out


class ImageFeatureExtractionPipeline(Pipeline):
    """``pipe(images, pool=False)``: for each image its tokens as nested lists (1, tokens, hidden), or with
    ``pool=True`` its pooled vector (1, hidden); ``return_tensors=True`` gives numpy arrays instead."""

    task = "image-feature-extraction"

    def __call__(self, images: Any, pool: bool = False, return_tensors: bool = False) -> Any:  # noqa: D102
        return super().__call__(images, pool=pool, return_tensors=return_tensors)

    def _run(self, sources: List[Any], pool: bool = False, return_tensors: bool = False) -> List[Any]:
        x = self.model._native.processor().preprocess(sources)
        out = self.model(pixel_values=x)
        if pool:
            if out.pooler_output is None:
                raise ValueError(
                    "No pooled output was returned. Make sure the model has a `pooler` layer when using the `pool` "
                    f"option ({self.model.config.__dict__.get('architectures')} checkpoint loaded as "
                    f"{type(self.model).__name__}, which has none)."
                )
            features = out.pooler_output
        else:
            features = out.last_hidden_state
        rows = [features[i : i + 1] for i in range(features.shape[0])]
        return rows if return_tensors else [r.tolist() for r in rows]


_PIPELINES = {
    "image-classification": ImageClassificationPipeline,
    "image-segmentation": ImageSegmentationPipeline,
    "image-feature-extraction": ImageFeatureExtractionPipeline,
}


def pipeline(
    task: str,
    model: Union[str, os.PathLike, BeitPreTrainedModel],
    revision: Optional[str] = None,
    dtype: Any = "float32",
    num_threads: Optional[int] = None,
    batch_size: int = 8,
) -> Pipeline:
    """transformers' ``pipeline``: ``task`` is "image-classification", "image-segmentation" or
    "image-feature-extraction"; ``model`` a model directory, weights file or Hub repo id (loaded as the task's
    class), or a loaded beit_rs model."""
    if task not in _PIPELINES:
        raise ValueError(f"task: {task!r} is not supported; expected one of {', '.join(_PIPELINES)}")
    from . import modeling

    if not isinstance(model, BeitPreTrainedModel):
        cls = getattr(modeling, TASKS[task])
        model = cls.from_pretrained(model, revision=revision, dtype=_dtype_name(dtype), num_threads=num_threads)
    return _PIPELINES[task](model, batch_size=batch_size)
