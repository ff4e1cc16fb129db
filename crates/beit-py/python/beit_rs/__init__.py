"""beit_rs: BEiT (BERT Pre-Training of Image Transformers) in Rust, with Hugging Face transformers' Python API.

Change ``from transformers import ...`` to ``from beit_rs import ...``: the classes load the same checkpoints
(directories, weights files, Hub repo ids through huggingface_hub's cache) and return the same outputs, as numpy
arrays. Models release the GIL while they run and may be called from several threads at once.
"""

from ._native import __version__
from .configuration import BeitConfig, Data2VecVisionConfig
from .image_processing import BatchFeature, BeitFeatureExtractor, BeitImageProcessor
from .modeling import (
    BackboneOutput,
    BeitBackbone,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitForSemanticSegmentation,
    BeitModel,
    BeitModelOutputWithPooling,
    BeitPreTrainedModel,
    Data2VecVisionForImageClassification,
    Data2VecVisionForSemanticSegmentation,
    Data2VecVisionModel,
    Data2VecVisionModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedLMOutput,
    ModelOutput,
    SemanticSegmenterOutput,
)
from .pipelines import (
    ImageClassificationPipeline,
    ImageFeatureExtractionPipeline,
    ImageSegmentationPipeline,
    Pipeline,
    pipeline,
)

__all__ = [
    "__version__",
    "BackboneOutput",
    "BatchFeature",
    "BeitBackbone",
    "BeitConfig",
    "BeitFeatureExtractor",
    "BeitForImageClassification",
    "BeitForMaskedImageModeling",
    "BeitForSemanticSegmentation",
    "BeitImageProcessor",
    "BeitModel",
    "BeitModelOutputWithPooling",
    "BeitPreTrainedModel",
    "Data2VecVisionConfig",
    "Data2VecVisionForImageClassification",
    "Data2VecVisionForSemanticSegmentation",
    "Data2VecVisionModel",
    "Data2VecVisionModelOutputWithPooling",
    "ImageClassificationPipeline",
    "ImageClassifierOutput",
    "ImageFeatureExtractionPipeline",
    "ImageSegmentationPipeline",
    "MaskedLMOutput",
    "ModelOutput",
    "Pipeline",
    "SemanticSegmenterOutput",
    "pipeline",
]
