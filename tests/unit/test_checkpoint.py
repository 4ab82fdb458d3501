"""Checkpoint round trip (safetensors + JSON, hash verified, no pickle) and the Predictor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    read_checkpoint_meta,
    read_metadata,
    save_checkpoint,
    update_metadata,
)
from model.predict import Predictor
from model.strnet import strnet_tiny

S = 64


def _meta() -> dict:
    return {
        "model_version": "tiny-test",
        "synthetic": True,
        "preprocess": {"input_size": S},
        "temperature": 1.5,
        "thresholds": {
            "point": {"threshold": 0.6},
            "conservative": {"threshold": 0.4},
        },
        "served_threshold": "conservative",
        "conformal": {"coverage": 0.9, "quantile": 0.8, "n": 100},
    }


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = strnet_tiny(channels_last=True)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
    return save_checkpoint(m, _meta(), tmp_path / "ck" / "tiny.json")


def test_round_trip_same_outputs(ckpt: Path) -> None:
    torch.manual_seed(0)
    ref = strnet_tiny(channels_last=True)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
    ref.eval()
    model, meta = load_checkpoint(ckpt)
    assert meta.model_config["channels_last"] is True
    assert meta.preprocess == {"input_size": S}
    x = torch.randn(2, 1, S, S)
    with torch.no_grad():
        a, b = ref(x), model(x)
    for k in ("screen_logit", "severity_logit", "tscore"):
        assert torch.equal(a[k], b[k])
    # loading by the .safetensors path finds the same metadata
    _, meta2 = load_checkpoint(ckpt.with_suffix(".safetensors"))
    assert meta2.weights_sha256 == meta.weights_sha256


def test_files_are_json_and_safetensors(ckpt: Path) -> None:
    meta = json.loads(ckpt.read_text())
    assert meta["format"] == "strnet-checkpoint" and len(meta["weights_sha256"]) == 64
    raw = ckpt.with_suffix(".safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # a safetensors header, not a pickle
    assert "screen_head.fc.weight" in header


def test_tampered_weights_are_refused(ckpt: Path) -> None:
    w = ckpt.with_suffix(".safetensors")
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ckpt)


def test_bad_metadata_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError):
        read_metadata(bad)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.json")


def test_metadata_is_parsed_once_into_typed_fields(ckpt: Path) -> None:
    meta = read_checkpoint_meta(ckpt)
    assert meta == load_checkpoint(ckpt)[1]
    assert (meta.model_version, meta.synthetic, meta.served_threshold) == ("tiny-test", True, "conservative")
    assert meta.thresholds == {"point": 0.6, "conservative": 0.4}
    assert (meta.temperature, meta.conformal_quantile, meta.conformal_coverage) == (1.5, 0.8, 0.9)
    assert meta.conformal == {"coverage": 0.9, "quantile": 0.8, "n": 100} and meta.input_size == S
    assert meta.weights_file == "tiny.safetensors" and len(meta.weights_sha256) == 64
    assert meta.raw == read_metadata(ckpt)  # every key, for writers that round-trip the unknown ones
    assert meta.tscore_calibration is None and meta.texture is None and meta.target_sensitivity is None
    assert meta.train_config == {} and meta.metrics == {} and meta.training_data_sha256 is None


def test_absent_optional_metadata_takes_the_readers_defaults() -> None:
    meta = CheckpointMeta.parse(
        {"model_config": {}, "preprocess": {}, "weights_file": "w.safetensors", "weights_sha256": "ab",
         "thresholds": {"target_sensitivity": 0.86, "n_pos": 3, "point": {"threshold": 0.5}}, "conformal": None}
    )
    assert meta.model_version is None and meta.synthetic is False and meta.served_threshold == "conservative"
    assert meta.thresholds == {"point": 0.5} and meta.target_sensitivity == 0.86
    assert meta.temperature == 1.0 and meta.conformal is None and np.isnan(meta.conformal_quantile)
    assert meta.conformal_coverage == 0.9 and meta.input_size == 256


def test_missing_metadata_is_named_in_one_error(ckpt: Path) -> None:
    raw = read_metadata(ckpt)
    for key in ("model_version", "thresholds", "weights_file"):
        del raw[key]
    with pytest.raises(CheckpointError, match=r"^metadata lacks model_version, thresholds, weights_file$"):
        CheckpointMeta.parse(raw, require=("model_version", "preprocess", "thresholds"))
    with pytest.raises(CheckpointError, match="metadata 'temperature' is not a number"):
        CheckpointMeta.parse(dict(read_metadata(ckpt), temperature="warm"))
    no_version = update_metadata(ckpt, {}, ckpt.parent / "nv.json")
    raw = read_metadata(no_version)
    del raw["model_version"]
    no_version.write_text(json.dumps(raw))
    assert load_checkpoint(no_version)[1].model_version is None
    no_version.with_suffix(".safetensors").unlink()
    with pytest.raises(CheckpointError, match="metadata lacks model_version"):  # before the weights are read
        load_checkpoint(no_version, require=("model_version",))


def test_update_metadata_copies_weights(ckpt: Path, tmp_path: Path) -> None:
    out = update_metadata(ckpt, {"temperature": 2.0}, tmp_path / "site" / "cal.json")
    model, meta = load_checkpoint(out)
    assert meta.temperature == 2.0
    assert meta.weights_sha256 == read_metadata(ckpt)["weights_sha256"]


def test_predictor_outputs(ckpt: Path) -> None:
    p = Predictor(ckpt, device="cpu")
    assert p.threshold_name == "conservative" and p.threshold == 0.4
    x = np.random.default_rng(0).normal(size=(3, 1, S, S)).astype(np.float32)
    clin = [{"age": 70, "sex": "F", "bmi": 22.0}, None, {"age": None, "sex": "M"}]
    r1 = p.predict(x, clin)
    r2 = p.predict(torch.from_numpy(x), clin)
    assert r1 == r2  # deterministic in eval mode
    for r in r1:
        assert 0.0 <= r["p_osteoporosis"] <= r["probability_bone_loss"] <= 1.0
        assert r["decision"] == ("bone_loss" if r["probability_bone_loss"] >= 0.4 else "normal")
        if r["decision"] == "normal":
            assert r["severity"] == "normal"
        lo, hi = r["t_score_interval"]
        assert hi - lo == pytest.approx(1.6) and lo < r["t_score"] < hi
        assert r["trained_on_synthetic_data"] is True
    assert Predictor(ckpt, device="cpu", threshold="point").threshold == 0.6
    with pytest.raises(ValueError):
        p.predict(np.zeros((1, 1, S + 1, S + 1), np.float32))


def test_predictor_saliency(ckpt: Path) -> None:
    p = Predictor(ckpt, device="cpu")
    x = np.random.default_rng(1).normal(size=(1, 1, S, S)).astype(np.float32)
    cam = p.saliency(x)
    assert cam.shape == (S, S) and cam.min() >= 0.0 and cam.max() <= 1.0
    assert np.array_equal(cam, p.saliency(x))
    assert p.saliency(np.repeat(x, 2, axis=0)).shape == (2, S, S)


def test_predict_with_saliency_equals_predict_and_saliency_from_one_backbone_pass(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = Predictor(ckpt, device="cpu")
    x = np.random.default_rng(2).normal(size=(3, 1, S, S)).astype(np.float32)
    clin = [{"age": 70, "sex": "F", "bmi": 22.0}, None, {"age": 55, "sex": "M"}]
    expected, expected_maps = p.predict(x, clin), p.saliency(x)
    passes = []
    forward_features = p.model.forward_features
    monkeypatch.setattr(p.model, "forward_features", lambda t: passes.append(1) or forward_features(t))
    results, maps = p.predict_with_saliency(x, clin)
    assert len(passes) == 1  # predict + saliency ran it twice
    assert results == expected
    assert np.array_equal(maps, expected_maps)


def test_operating_threshold_takes_named_points_and_probabilities_only() -> None:
    from model.checkpoint import UnknownThreshold, operating_threshold

    meta = {
        "served_threshold": "conservative",
        "thresholds": {"target_sensitivity": 0.86, "n_pos": 313, "point": {"threshold": 0.5},
                       "conservative": {"threshold": 0.38}},
    }
    assert operating_threshold(meta) == ("conservative", 0.38)
    assert operating_threshold(meta, "point") == ("point", 0.5)
    assert operating_threshold(meta, 0.42) == ("custom", 0.42)
    assert operating_threshold(meta, "0.42") == ("custom", 0.42)  # worker.threshold is text
    for bad in ("target_sensitivity", "n_pos", "banana", 1.5, 0.0):  # numbers beside the points are not points
        with pytest.raises(UnknownThreshold):
            operating_threshold(meta, bad)


def test_a_threshold_the_checkpoint_lacks_is_blamed_on_worker_threshold(tiny_weights: Path, tmp_path: Path) -> None:
    from agent.errors import ConfigError
    from agent.pipeline.infer import Screener
    from model.checkpoint import update_metadata

    only_conservative = update_metadata(
        tiny_weights, {"thresholds": {"conservative": {"threshold": 0.45}}}, tmp_path / "c.json"
    )
    with pytest.raises(ConfigError) as err:
        Screener(only_conservative, device="cpu", threshold="point")
    assert err.value.setting == "worker.threshold"
