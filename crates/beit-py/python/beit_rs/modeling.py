"""transformers' BEiT and Data2VecVision model classes over the Rust library: ``from_pretrained``, a call with
transformers' argument names, and output objects with transformers' attribute names holding numpy arrays."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _native
from .configuration import BeitConfig
from .image_processing import BeitImageProcessor


class ModelOutput(OrderedDict):
    """transformers' ModelOutput: a dict of the outputs that are set, also readable as attributes (``None`` for a
    field that is not set) and by position (``outputs[0]``)."""

    _fields: Tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name in self._fields:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> Tuple[Any, ...]:
        """The outputs that are set, in field order."""
        return tuple(self[k] for k in self._fields if k in self)


class BeitModelOutputWithPooling(ModelOutput):
    """BeitModel's output: ``last_hidden_state`` (batch, tokens, hidden), ``pooler_output`` (batch, hidden),
    ``hidden_states`` and ``attentions`` (tuples, when asked for)."""

    _fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class ImageClassifierOutput(ModelOutput):
    """BeitForImageClassification's output: ``loss`` (with labels), ``logits`` (batch, classes), ``hidden_states``,
    ``attentions``."""

    _fields = ("loss", "logits", "hidden_states", "attentions")


class MaskedLMOutput(ModelOutput):
    """BeitForMaskedImageModeling's output: ``loss`` (with labels), ``logits`` (batch, patches, vocab_size),
    ``hidden_states``, ``attentions``."""

    _fields = ("loss", "logits", "hidden_states", "attentions")


class SemanticSegmenterOutput(ModelOutput):
    """BeitForSemanticSegmentation's output: ``loss`` (with labels), ``logits`` (batch, classes, height / 4,
    width / 4), ``hidden_states``, ``attentions``."""

    _fields = ("loss", "logits", "hidden_states", "attentions")


class BackboneOutput(ModelOutput):
    """BeitBackbone's output: ``feature_maps`` (a tuple of (batch, channels, height, width)), ``hidden_states``,
    ``attentions``."""

    _fields = ("feature_maps", "hidden_states", "attentions")


Data2VecVisionModelOutputWithPooling = BeitModelOutputWithPooling


def _dtype_name(dtype: Any) -> str:
    """"float32", np.float32, torch.float32, torch.bfloat16 and "torch.int8" all to the name the library takes."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", None) or str(dtype)
    return name.rsplit(".", 1)[-1]


def _output(cls: type, named: List[Tuple[str, np.ndarray]]) -> ModelOutput:
    """The library's named outputs (``loss``, ``logits``, ``hidden_states.3``, ...) as transformers' object."""
    fields: Dict[str, Any] = {}
    for name, array in named:
        base, _, _index = name.partition(".")
        if _index:
            fields.setdefault(base, []).append(array)
        else:
            fields[base] = array.reshape(()) if base == "loss" else array
    out = cls()
    for k in cls._fields:
        if k in fields:
            v = fields[k]
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


class BeitPreTrainedModel:
    """What every model class shares: ``from_pretrained``, the call, ``config``, ``save_pretrained``.

    Concurrency: a model never changes once loaded, so several Python threads may call one model at once. Each
    call releases the GIL while the model runs, on ``num_threads`` threads of its own when loaded with them,
    otherwise on the process-wide pool (sized by ``RAYON_NUM_THREADS``, default: the physical cores)."""

    _architecture = "BeitModel"
    _output_class: type = BeitModelOutputWithPooling

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"{type(self).__name__} is built by {type(self).__name__}.from_pretrained(name_or_path): beit_rs loads "
            "checkpoints and does not initialize weights from a config"
        )

    @classmethod
    def _wrap(cls, native: Any) -> "BeitPreTrainedModel":
        model = object.__new__(cls)
        model._native = native
        model.config = BeitConfig._from_json(native.config_json())
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        revision: Optional[str] = None,
        dtype: Any = "float32",
        num_threads: Optional[int] = None,
    ) -> "BeitPreTrainedModel":
        """Loads a checkpoint as this class: a model directory (config.json with model.safetensors,
        pytorch_model.bin, flax_model.msgpack or their sharded forms; timm's beit checkpoints too), a weights file
        beside its config.json, or a Hub repo id, looked up in huggingface_hub's cache and downloaded when missing
        (``revision``: branch, tag or commit; HF_HUB_OFFLINE, HF_HOME, HF_TOKEN honoured).

        ``dtype``: "float32" (weights packed once for the CPU kernels), "int8" (dynamic quantization of the
        encoder's Linear layers) or "bfloat16" (``torch.bfloat16`` too: the encoder's Linear layers in bf16 with f32
        accumulation). ``num_threads``: the threads this model's calls run on (default: the process-wide
        pool). A head absent from the checkpoint is newly initialized, with a warning, as in transformers."""
        native = _native.Model.load(
            os.fspath(pretrained_model_name_or_path), cls._architecture, revision, _dtype_name(dtype), num_threads
        )
        missing = native.newly_initialized
        if missing:
            warnings.warn(
                f"Some weights of {native.architecture} were not initialized from the model checkpoint at "
                f"{os.fspath(pretrained_model_name_or_path)} and are newly initialized: {missing}",
                stacklevel=2,
            )
        return _CLASSES.get(native.architecture, cls)._wrap(native)

    def __call__(
        self,
        pixel_values: Any,
        bool_masked_pos: Optional[Any] = None,
        head_mask: Optional[Any] = None,
        labels: Optional[Any] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
    ) -> Any:
        """Runs the model on ``pixel_values`` (batch, channels, height, width) float32 (numpy, or anything
        ``np.asarray`` takes: a CPU torch tensor too). ``bool_masked_pos`` (batch, patches), ``head_mask``
        ([layers,] heads) and ``labels`` as transformers takes them. Returns the class's output object, or its
        tuple with ``return_dict=False``."""
        x = np.asarray(pixel_values, dtype=np.float32)
        if labels is not None:
            labels = np.asarray(labels)
            labels = labels.astype(np.int64 if labels.dtype.kind in "iub" else np.float32, copy=False)
        named = self._native.forward(
            x,
            None if bool_masked_pos is None else np.asarray(bool_masked_pos).astype(np.uint8, copy=False),
            labels,
            None if head_mask is None else np.asarray(head_mask, dtype=np.float32),
            bool(self.config.__dict__.get("output_hidden_states") if output_hidden_states is None else output_hidden_states),
            bool(self.config.__dict__.get("output_attentions") if output_attentions is None else output_attentions),
            interpolate_pos_encoding,
        )
        out = _output(self._output_class, named)
        return out.to_tuple() if return_dict is False else out

    forward = __call__

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Writes config.json and model.safetensors (transformers' names, loadable by transformers)."""
        self._native.save_pretrained(os.fspath(save_directory))

    @property
    def image_processor(self) -> BeitImageProcessor:
        """The checkpoint's image processor (transformers' defaults when it has no preprocessor_config.json)."""
        return BeitImageProcessor._from_native(self._native.processor())

    def __repr__(self) -> str:
        return f"{type(self).__name__}.from_pretrained({str(self._native.model_dir)!r})"


class BeitModel(BeitPreTrainedModel):
    """The bare BEiT encoder: ``last_hidden_state`` and ``pooler_output``."""

    _architecture = "BeitModel"
    _output_class = BeitModelOutputWithPooling


class BeitForImageClassification(BeitPreTrainedModel):
    """BEiT with a linear classifier on the pooled output: ``logits`` (batch, num_labels)."""

    _architecture = "BeitForImageClassification"
    _output_class = ImageClassifierOutput


class BeitForMaskedImageModeling(BeitPreTrainedModel):
    """BEiT's pre-training model: visual-token ``logits`` for every patch; ``bool_masked_pos`` says which patches
    the mask token replaces."""

    _architecture = "BeitForMaskedImageModeling"
    _output_class = MaskedLMOutput


class BeitForSemanticSegmentation(BeitPreTrainedModel):
    """BEiT with UperNet (and an optional FCN auxiliary head): per-pixel class ``logits`` at a quarter of the
    input's size; ``image_processor.post_process_semantic_segmentation`` turns them into class maps."""

    _architecture = "BeitForSemanticSegmentation"
    _output_class = SemanticSegmenterOutput


class BeitBackbone(BeitPreTrainedModel):
    """BEiT as a backbone: ``feature_maps`` of the stages config.out_features names (through the FPN when
    config.add_fpn)."""

    _architecture = "BeitBackbone"
    _output_class = BackboneOutput


class Data2VecVisionModel(BeitModel):
    """transformers' Data2VecVisionModel: BEiT's encoder under the ``data2vec_vision.`` prefix (no pooler)."""

    _architecture = "Data2VecVisionModel"


class Data2VecVisionForImageClassification(BeitForImageClassification):
    """transformers' Data2VecVisionForImageClassification."""

    _architecture = "Data2VecVisionForImageClassification"


class Data2VecVisionForSemanticSegmentation(BeitForSemanticSegmentation):
    """transformers' Data2VecVisionForSemanticSegmentation."""

    _architecture = "Data2VecVisionForSemanticSegmentation"


# The class a load built, by its transformers name: the family comes from the checkpoint (a BEiT class on a
# data2vec-vision checkpoint builds the Data2VecVision one, as the library does).
_CLASSES: Dict[str, type] = {
    c._architecture: c
    for c in (
        BeitModel,
        BeitForImageClassification,
        BeitForMaskedImageModeling,
        BeitForSemanticSegmentation,
        BeitBackbone,
        Data2VecVisionModel,
        Data2VecVisionForImageClassification,
        Data2VecVisionForSemanticSegmentation,
    )
}
