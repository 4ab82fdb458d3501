"""The texture stage (model/texture.py): features, fitting, the stored form, and its use by the
Predictor and the agent's Screener."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.metrics import auroc
from model.texture import N_FEATURES, TextureStage, fit_stage, texture_features


def _film(seed: int, period: float, rows: int = 1024, cols: int = 832) -> np.ndarray:
    """A film-like image: a vertical stripe texture of the given period under a smooth ramp."""
    rng = np.random.default_rng(seed)
    c = np.arange(cols, dtype=np.float32)
    r = np.arange(rows, dtype=np.float32)[:, None]
    stripes = 0.5 + 0.25 * np.sin(2 * np.pi * c / period + rng.uniform(0, 6.28))
    img = 0.6 * stripes + 0.3 * r / rows + 0.05 * rng.standard_normal((rows, cols)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def test_features_have_a_fixed_length_and_are_deterministic() -> None:
    img = _film(1, 10.0)
    a, b = texture_features(img), texture_features(img.copy())
    assert a.shape == (N_FEATURES,) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert np.isfinite(a).all()


@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (127, 3000), (3000, 90), (512, 400)])
def test_tiny_odd_and_extreme_aspect_images_give_a_full_vector(shape: tuple[int, int]) -> None:
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    f = texture_features(img)
    assert f.shape == (N_FEATURES,) and np.isfinite(f).all()


def test_constant_image_has_no_texture() -> None:
    f = texture_features(np.full((1024, 832), 0.5, np.float32))
    g = texture_features(_film(7, 9.0))
    assert f.shape == g.shape and not np.allclose(f, g)  # nothing to measure is not a film's answer


def test_features_follow_the_texture_period_and_ignore_the_film_size() -> None:
    fine, coarse = texture_features(_film(2, 6.0)), texture_features(_film(2, 20.0))
    assert not np.allclose(fine, coarse)
    # the same film at twice the matrix size is resampled to the canonical rows first
    big = np.repeat(np.repeat(_film(2, 6.0), 2, axis=0), 2, axis=1)
    assert np.abs(texture_features(big) - fine).mean() < 0.1 * np.abs(coarse - fine).mean()


def test_non_2d_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="2-D"):
        texture_features(np.zeros((4, 4, 3), np.float32))


def _problem(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, dict, dict, np.ndarray, np.ndarray]:
    """Features where feature 0 carries the latent T-score; a weak 'network' sees it noisily."""
    rng = np.random.default_rng(seed)
    t = rng.normal(-2.0, 1.0, n)
    feats = rng.normal(size=(n, N_FEATURES))
    feats[:, 0] = -t + 0.3 * rng.normal(size=n)
    label = (t < -1.0).astype(float)
    severity = np.where(label == 1, (t <= -2.5).astype(float), np.nan)
    net = {"severity_logit": (-(t + 2.5) + 3.0 * rng.normal(size=n)), "tscore": t + 1.0 * rng.normal(size=n)}
    tg = {"label": label, "severity": severity, "tscore": t}
    idx = rng.permutation(n)
    return feats, tg, net, np.sort(idx[: n * 3 // 4]), np.sort(idx[n * 3 // 4 :])


def test_fit_stage_learns_the_texture_signal_and_stacks_it_with_the_network() -> None:
    feats, tg, net, tr, va = _problem()
    stage = fit_stage(feats, tg, {k: v[va] for k, v in net.items()}, tr, va, l2=10.0)
    tex_sev, tex_t = stage.texture_outputs(feats)
    m = (tg["label"] == 1) & np.isfinite(tg["severity"])
    assert auroc(tg["severity"][m], tex_sev[m]) > 0.9
    assert np.corrcoef(tex_t, tg["tscore"])[0, 1] > 0.9
    a, b, _ = stage.stack_severity
    # the texture is the better input here: it carries more of the stacked logit's spread
    assert b > 0 and b * tex_sev[va].std() > a * net["severity_logit"][va].std()
    fused = stage.apply({k: v.astype(np.float32) for k, v in net.items()}, feats)
    assert np.array_equal(fused["network_severity_logit"], net["severity_logit"].astype(np.float32))
    assert auroc(tg["severity"][m], fused["severity_logit"][m]) > auroc(tg["severity"][m], net["severity_logit"][m])


def test_fit_stage_refuses_too_few_labels() -> None:
    feats, tg, net, tr, va = _problem(n=30)
    tg["severity"][:] = np.nan
    with pytest.raises(ValueError, match="too few"):
        fit_stage(feats, tg, {k: v[va] for k, v in net.items()}, tr, va)


def test_serving_loads_no_evaluation_or_training_code() -> None:
    """The stage fits with model.fitting: the worker's imports stop short of evaluation code."""
    import subprocess
    import sys

    upper = ("model.evaluate", "model.train", "model.report", "model.threshold", "model.cli")
    code = (
        "import sys, agent.pipeline.infer, model.texture, model.predict; "
        f"print([m for m in {upper!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stage_round_trips_through_json_and_checks_versions() -> None:
    feats, tg, net, tr, va = _problem()
    stage = fit_stage(feats, tg, {k: v[va] for k, v in net.items()}, tr, va)
    d = json.loads(json.dumps(stage.to_dict()))
    back = TextureStage.from_dict(d)
    assert np.allclose(back.texture_outputs(feats)[0], stage.texture_outputs(feats)[0])
    with pytest.raises(ValueError, match="feature version"):
        TextureStage.from_dict({**d, "feature_version": 999})
    with pytest.raises(ValueError, match="feature count"):
        TextureStage.from_dict({**d, "mean": d["mean"][:-1]})
    with pytest.raises(ValueError, match="shape"):
        stage.texture_outputs(feats[:, :-1])


@pytest.fixture(scope="module")
def textured_weights(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test checkpoint with a texture stage fitted on random features."""
    from model.checkpoint import update_metadata

    feats, tg, net, tr, va = _problem()
    stage = fit_stage(feats, tg, {k: v[va] for k, v in net.items()}, tr, va)
    # centre the stage on real film features so the fused outputs stay in range
    stage.mean = texture_features(_film(3, 9.0)).astype(np.float64)
    return update_metadata(tiny_weights, {"texture": stage.to_dict()}, tmp_path_factory.mktemp("tex") / "t.json")


def test_predictor_with_a_texture_stage_needs_the_features(textured_weights: Path, tmp_path: Path) -> None:
    from model.predict import Predictor
    from model.preprocess import preprocess

    pred = Predictor(textured_weights, device="cpu")
    assert pred.texture is not None
    film = _film(4, 9.0)
    x = preprocess(film, pred.spec)[None]
    with pytest.raises(ValueError, match="texture stage"):
        pred.predict(x, [None])
    with_tex = pred.predict(x, [None], texture_features(film)[None])[0]
    plain = Predictor(textured_weights, device="cpu")
    plain.texture = None  # the same network without the stage
    assert with_tex["t_score"] != plain.predict(x, [None])[0]["t_score"]
    # predict_file computes the features from the same decode
    from PIL import Image

    png = tmp_path / "film.png"
    Image.fromarray((film * 65535).astype(np.uint16)).save(png)
    assert np.isfinite(pred.predict_file(png)["t_score"])


def test_screener_passes_texture_features_through_the_pipeline(textured_weights: Path) -> None:
    from agent.errors import ProcessingError
    from agent.pipeline.infer import Screener

    screener = Screener(textured_weights, device="cpu", saliency=False)
    film = _film(5, 9.0)
    tex = screener.texture(film)
    assert tex is not None and tex.shape == (N_FEATURES,)
    batch = screener.preprocess(film)[None]
    findings, _ = screener.score(batch, [{"age": None, "sex": None, "bmi": None}], tex[None])
    assert np.isfinite(findings[0].t_score)
    with pytest.raises(ProcessingError, match="texture"):
        screener.score(batch, [{"age": None, "sex": None, "bmi": None}])


def test_screener_without_a_stage_computes_no_features(tiny_weights: Path) -> None:
    from agent.pipeline.infer import Screener

    assert Screener(tiny_weights, device="cpu", saliency=False).texture(_film(6, 9.0)) is None
