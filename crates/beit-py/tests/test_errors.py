"""Errors arrive as the Python exceptions transformers users expect, with the library's messages naming the file,
field or argument, and what was expected against what was found."""

import numpy as np
import pytest

import beit_rs
from conftest import IMAGES, MODELS


@pytest.fixture(scope="module")
def model():
    return beit_rs.BeitForImageClassification.from_pretrained(MODELS / "cls_single")


def test_missing_paths_are_file_not_found(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        beit_rs.BeitModel.from_pretrained(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        beit_rs.pipeline("image-classification", model=model)(tmp_path / "missing.png")


def test_unusable_files_are_os_errors(tmp_path, model):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="config.json"):
        beit_rs.BeitModel.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="cannot decode image"):
        beit_rs.pipeline("image-classification", model=model)(b"not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(OSError, match="empty"):
        beit_rs.BeitModel.from_pretrained(empty)


def test_wrong_arguments_are_value_errors(model):
    with pytest.raises(ValueError, match="pixel_values"):
        model(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        beit_rs.BeitModel.from_pretrained(MODELS / "cls_single", dtype="float16")
    with pytest.raises(ValueError, match="num_threads"):
        beit_rs.BeitModel.from_pretrained(MODELS / "cls_single", num_threads=0)
    with pytest.raises(ValueError, match="task"):
        beit_rs.pipeline("object-detection", model=model)
    with pytest.raises(ValueError, match="uint8"):
        model.image_processor(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="images\\[0\\]"):
        beit_rs.pipeline("image-classification", model=model)([object()])
    with pytest.raises(ValueError, match="segmentation"):
        beit_rs.pipeline("image-segmentation", model=model)(IMAGES / "chelsea.png")
    with pytest.raises(ValueError, match="labels"):
        beit_rs.BeitModel.from_pretrained(MODELS / "relpos_layer")(np.zeros((1, 3, 32, 32), np.float32), labels=[1])


def test_models_are_built_by_from_pretrained():
    with pytest.raises(TypeError, match="from_pretrained"):
        beit_rs.BeitModel(beit_rs.BeitConfig())
