"""Hub repo ids resolve through huggingface_hub's cache layout (offline here: HF_HUB_OFFLINE=1, HF_HUB_CACHE set),
for the model classes, the config, the processor and the pipelines alike."""

import shutil

import numpy as np
import pytest

import beit_rs
from conftest import IMAGES, MODELS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--tiny-org--tiny-beit" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(MODELS / "cls_single" / f, snapshot / f)
    (tmp_path / "models--tiny-org--tiny-beit" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-beit" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_repo_ids_load_from_the_cache(hub_cache):
    local = beit_rs.BeitForImageClassification.from_pretrained(MODELS / "cls_single")
    hub = beit_rs.BeitForImageClassification.from_pretrained("tiny-org/tiny-beit")
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(hub(x).logits, local(x).logits)
    assert beit_rs.BeitConfig.from_pretrained("tiny-org/tiny-beit") == local.config
    assert beit_rs.BeitImageProcessor.from_pretrained("tiny-org/tiny-beit").to_dict()["size"] == {"height": 32, "width": 32}
    pipe = beit_rs.pipeline("image-classification", model="tiny-org/tiny-beit", revision=COMMIT)
    assert pipe(IMAGES / "chelsea.png") == beit_rs.pipeline("image-classification", model=local)(IMAGES / "chelsea.png")


def test_a_repo_missing_from_the_offline_cache_is_an_os_error(hub_cache):
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        beit_rs.BeitModel.from_pretrained("tiny-org/absent")
