"""Every model fixture through the Python classes: the outputs transformers stored (max abs error <= 1e-4, as
the Rust parity suite), under transformers' attribute names."""

import json

import numpy as np
import pytest

import beit_rs
from conftest import TOLERANCE, case_dirs, max_abs_diff, read_safetensors

CASES = case_dirs("model") + case_dirs("family")


def run_case(d, **load):
    case = json.loads((d / "case.json").read_text())
    cls = getattr(beit_rs, case["class"])
    model = cls.from_pretrained(d, **load)
    assert type(model).__name__ == case["class"]
    inputs = read_safetensors(d / "inputs.safetensors")
    call = case["call"]
    out = model(
        pixel_values=inputs["pixel_values"],
        bool_masked_pos=inputs.get("bool_masked_pos"),
        head_mask=inputs.get("head_mask"),
        labels=inputs.get("labels"),
        output_hidden_states=call.get("output_hidden_states", False),
        output_attentions=call.get("output_attentions", False),
        interpolate_pos_encoding=call.get("interpolate_pos_encoding", False),
    )
    return model, out, read_safetensors(d / "outputs.safetensors")


def flat(out):
    """transformers' field names as the fixtures store them (hidden_states.3, feature_maps.0, ...)."""
    named = {}
    for k, v in out.items():
        if isinstance(v, tuple):
            named.update({f"{k}.{i}": x for i, x in enumerate(v)})
        else:
            named[k] = v.reshape(1) if k == "loss" else v
    return named


@pytest.mark.parametrize("d", CASES, ids=lambda d: d.name)
def test_fixture_outputs_match_transformers(d):
    _, out, expected = run_case(d)
    got = flat(out)
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32
        err = max_abs_diff(got[name], want)
        assert err <= TOLERANCE, f"{d.name}: {name} differs by {err}"


def test_outputs_behave_like_transformers_model_output():
    _, out, expected = run_case(case_dirs("model")[[d.name for d in case_dirs("model")].index("cls_single")])
    assert isinstance(out, beit_rs.ImageClassifierOutput)
    assert out.loss.shape == () and abs(float(out.loss) - float(expected["loss"][0])) <= TOLERANCE
    assert out.logits is out["logits"] and out[0] is out.loss and out[1] is out.logits
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.to_tuple()[0] is out.loss


def test_fields_not_asked_for_are_none_and_return_dict_false_gives_a_tuple(tmp_path):
    d = [c for c in case_dirs("model") if c.name == "relpos_layer"][0]
    model = beit_rs.BeitModel.from_pretrained(d)
    x = read_safetensors(d / "inputs.safetensors")["pixel_values"]
    out = model(x)
    assert isinstance(out, beit_rs.BeitModelOutputWithPooling)
    assert out.hidden_states is None and out.attentions is None
    assert out.last_hidden_state.shape[0] == x.shape[0] and out.pooler_output.ndim == 2
    t = model(x, return_dict=False)
    assert isinstance(t, tuple) and len(t) == 2
    np.testing.assert_array_equal(t[0], out.last_hidden_state)
    # Anything np.asarray takes: float64 and non-contiguous inputs too.
    np.testing.assert_allclose(model(np.asfortranarray(x.astype(np.float64))).last_hidden_state, out.last_hidden_state, atol=1e-6)


def test_backbone_feature_maps_are_a_tuple():
    d = [c for c in case_dirs("model") if c.name == "backbone_fpn"][0]
    _, out, expected = run_case(d)
    assert isinstance(out, beit_rs.BackboneOutput)
    assert isinstance(out.feature_maps, tuple) and len(out.feature_maps) == 4
    assert out.feature_maps[0].shape == expected["feature_maps.0"].shape


def test_int8_runs_and_stays_close():
    d = [c for c in case_dirs("model") if c.name == "cls_single"][0]
    _, out, expected = run_case(d, dtype="int8")
    assert max_abs_diff(out.logits, expected["logits"]) < 0.1
    with pytest.raises(ValueError, match="bfloat16"):
        beit_rs.BeitForImageClassification.from_pretrained(d, dtype="float16")


def test_bf16_runs_and_stays_close():
    d = [c for c in case_dirs("model") if c.name == "cls_single"][0]
    # The bound of crates/beit/tests/bf16.rs over the parity fixtures' logits (measured at most 0.0585).
    for dtype in ("bfloat16", "bf16"):
        _, out, expected = run_case(d, dtype=dtype)
        assert max_abs_diff(out.logits, expected["logits"]) < 0.08


def test_data2vec_family_picks_its_class():
    d = [c for c in case_dirs("family") if c.name == "d2v_cls"][0]
    # A BEiT class on a data2vec-vision checkpoint builds the Data2VecVision one, as transformers' Auto classes.
    model = beit_rs.BeitForImageClassification.from_pretrained(d)
    assert type(model) is beit_rs.Data2VecVisionForImageClassification
    assert isinstance(model.config, beit_rs.Data2VecVisionConfig)


def test_missing_head_is_newly_initialized_with_a_warning():
    d = [c for c in case_dirs("model") if c.name == "relpos_layer"][0]
    with pytest.warns(UserWarning, match="newly initialized"):
        model = beit_rs.BeitForImageClassification.from_pretrained(d)
    assert model(read_safetensors(d / "inputs.safetensors")["pixel_values"]).logits.ndim == 2


def test_save_pretrained_round_trips(tmp_path):
    d = [c for c in case_dirs("model") if c.name == "seg_uper_aux1"][0]
    model, _, _ = run_case(d)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    reloaded = beit_rs.BeitForSemanticSegmentation.from_pretrained(tmp_path / "saved")
    x = read_safetensors(d / "inputs.safetensors")["pixel_values"]
    np.testing.assert_array_equal(reloaded(x).logits, model(x).logits)
    assert reloaded.config.to_dict()["architectures"] == ["BeitForSemanticSegmentation"]


def test_config_from_pretrained_and_defaults(tmp_path):
    d = [c for c in case_dirs("model") if c.name == "cls_single"][0]
    c = beit_rs.BeitConfig.from_pretrained(d)
    raw = json.loads((d / "config.json").read_text())
    assert c.hidden_size == raw["hidden_size"] and c.num_labels == len(raw["id2label"])
    assert c.id2label[0] == raw["id2label"]["0"]
    assert c.to_dict()["id2label"]["0"] == raw["id2label"]["0"]
    # Defaults as transformers' BeitConfig().
    base = beit_rs.BeitConfig()
    assert (base.hidden_size, base.num_hidden_layers, base.image_size, base.patch_size) == (768, 12, 224, 16)
    assert beit_rs.BeitConfig(hidden_size=64, num_attention_heads=4).hidden_size == 64
    c.save_pretrained(tmp_path)
    assert beit_rs.BeitConfig.from_pretrained(tmp_path) == c
    with pytest.raises(ValueError, match="hidden_size"):
        beit_rs.BeitConfig(hidden_size=10, num_attention_heads=4)
