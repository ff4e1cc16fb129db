"""Type stubs of the Rust extension module (crates/beit-py/src/lib.rs). Use the classes of ``beit_rs`` instead:
this module is their engine."""

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

# A path, encoded bytes, or an (height, width, 3) uint8 RGB array.
_Image = Union[str, os.PathLike, bytes, npt.NDArray[np.uint8]]

def resolve(name_or_path: str, revision: Optional[str] = None) -> str:
    """The model directory a path or Hub repo id names."""

def config_from_pretrained(name_or_path: str, revision: Optional[str] = None) -> str:
    """config.json of a model, completed with transformers' defaults, as JSON."""

def config_from_json(text: str) -> str:
    """A config's JSON validated and completed with transformers' defaults."""

def global_num_threads() -> int:
    """The threads of the process-wide pool."""

class Model:
    """A loaded model of any class with its image processor."""

    @staticmethod
    def load(
        name_or_path: str,
        architecture: Optional[str] = None,
        revision: Optional[str] = None,
        dtype: str = "float32",
        num_threads: Optional[int] = None,
    ) -> "Model": ...
    @property
    def architecture(self) -> str: ...
    @property
    def newly_initialized(self) -> List[str]: ...
    @property
    def model_dir(self) -> str: ...
    def config_json(self) -> str: ...
    def processor(self) -> "Processor": ...
    def forward(
        self,
        pixel_values: npt.NDArray[np.float32],
        bool_masked_pos: Optional[npt.NDArray[np.uint8]] = None,
        labels: Optional[Union[npt.NDArray[np.int64], npt.NDArray[np.float32]]] = None,
        head_mask: Optional[npt.NDArray[np.float32]] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> List[Tuple[str, npt.NDArray[np.float32]]]: ...
    def classify(self, images: Sequence[_Image], top_k: int) -> List[List[Tuple[str, float]]]: ...
    def segment(self, images: Sequence[_Image]) -> List[npt.NDArray[np.int64]]: ...
    def embed(self, images: Sequence[_Image], tokens: bool = False) -> npt.NDArray[np.float32]: ...
    def save_pretrained(self, save_directory: str) -> None: ...

class Processor:
    """transformers' BeitImageProcessor."""

    @staticmethod
    def from_pretrained(name_or_path: str, revision: Optional[str] = None) -> "Processor": ...
    @staticmethod
    def from_json(text: str) -> "Processor": ...
    @property
    def source(self) -> Optional[str]: ...
    def preprocess(self, images: Sequence[_Image]) -> npt.NDArray[np.float32]: ...
    def preprocess_segmentation_maps(
        self, maps: Sequence[Union[str, os.PathLike, bytes, npt.NDArray[np.uint8]]]
    ) -> npt.NDArray[np.int64]: ...
    def post_process_semantic_segmentation(
        self, logits: npt.NDArray[np.float32], target_sizes: Optional[Sequence[Tuple[int, int]]] = None
    ) -> List[npt.NDArray[np.int64]]: ...
