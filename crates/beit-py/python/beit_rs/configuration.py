"""transformers' ``BeitConfig`` and ``Data2VecVisionConfig``: the fields of config.json as attributes, with
transformers' defaults filled in by the Rust library (which also validates them)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional, Union

from . import _native


class JsonConfig:
    """A settings object saved as one JSON file (``_file_name``) in a model directory."""

    _file_name = ""

    def to_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def to_json_string(self) -> str:
        """The JSON file's text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Writes the JSON file into ``save_directory`` (created when missing)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, self._file_name), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class BeitConfig(JsonConfig):
    """The configuration of a BEiT model: every config.json field is an attribute (``config.hidden_size``,
    ``config.id2label[0]``). ``BeitConfig(**kwargs)`` fills the fields not given with transformers' defaults."""

    model_type = "beit"
    _file_name = "config.json"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("model_type", self.model_type)
        self._set(json.loads(_native.config_from_json(json.dumps(_jsonable(kwargs)))))

    def _set(self, d: Dict[str, Any]) -> None:
        # As transformers holds them: label ids as ints (config.json spells them as strings).
        d = dict(d)
        if isinstance(d.get("id2label"), dict):
            d["id2label"] = {int(k): v for k, v in d["id2label"].items()}
        self.__dict__.update(d)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], revision: Optional[str] = None
    ) -> "BeitConfig":
        """config.json of a model directory, of a weights file's directory, or of a Hub repo id (looked up in
        huggingface_hub's cache, downloaded when missing unless HF_HUB_OFFLINE=1)."""
        text = _native.config_from_pretrained(os.fspath(pretrained_model_name_or_path), revision)
        return cls._from_json(text)

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any]) -> "BeitConfig":
        """A config from a dict of config.json's fields."""
        return cls(**config_dict)

    @classmethod
    def _from_json(cls, text: str) -> "BeitConfig":
        d = json.loads(text)
        if d.get("model_type") == Data2VecVisionConfig.model_type and cls is BeitConfig:
            cls = Data2VecVisionConfig
        obj = cls.__new__(cls)
        obj._set(d)
        return obj

    @property
    def num_labels(self) -> int:
        """The number of classes (the length of ``id2label``)."""
        return len(self.__dict__.get("id2label") or {})

    def to_dict(self) -> Dict[str, Any]:
        """config.json's fields as a dict (label ids as strings, as in the file)."""
        d = copy.deepcopy(self.__dict__)
        if isinstance(d.get("id2label"), dict):
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
        return d

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BeitConfig) and self.to_dict() == other.to_dict()


class Data2VecVisionConfig(BeitConfig):
    """transformers' ``Data2VecVisionConfig``: BEiT's fields with data2vec-vision's defaults."""

    model_type = "data2vec-vision"


def _jsonable(v: Any) -> Any:
    """Tuples and numpy scalars as JSON takes them (``image_size=(224, 224)``, ``np.int64(3)``)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v
