"""The per-knee rule (model/knee.py), its use by the agent (agent/pipeline/knees.py) and the
knee-level evaluation figures (model/evaluate.py), each against a hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from agent.domain import AlgorithmInfo, Findings
from agent.pipeline.knees import study_knees
from model.evaluate import compute_metrics, knee_metrics
from model.knee import combine, combine_probabilities, knee_groups, logit
from model.metrics import auroc


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_a_knee_is_a_study_and_a_side_and_a_film_of_unknown_side_is_its_own() -> None:
    studies = ["s1", "s1", "s1", "s2", "s1", "s1", "", ""]
    sides = ["L", "R", "l ", "L", None, "B", "L", "L"]
    assert knee_groups(studies, sides) == [[0, 2], [1], [3], [4], [5], [6], [7]]
    with pytest.raises(ValueError, match="lateralities"):
        knee_groups(["s1"], [])


def test_the_knee_averages_calibrated_logits_severity_logits_and_t_scores() -> None:
    knee = combine([1.2, -0.4], [0.3, -1.1], [-2.1, -2.7], threshold=0.55, half_width=0.8)
    p = sig((1.2 - 0.4) / 2)  # 0.5987
    q = sig((0.3 - 1.1) / 2)  # 0.4013
    assert knee.n_images == 2
    assert knee.probability == pytest.approx(p)
    assert knee.p_osteoporosis_given_bone_loss == pytest.approx(q)
    assert knee.t_score == pytest.approx(-2.4)
    assert (knee.t_score_low, knee.t_score_high) == pytest.approx((-3.2, -1.6))
    assert knee.bone_loss and knee.severity == "osteopenia"
    # one positive film (p 0.77) and a negative repeat (p 0.40): the knee is below 0.60
    low = combine([1.2, -0.4], [0.3, -1.1], [-2.1, -2.7], threshold=0.60, half_width=0.8)
    assert not low.bone_loss and low.severity is None
    # a film reaching the threshold exactly is positive, as one film
    assert combine([logit(0.6)], [2.0], [-3.0], 0.6, 0.5).severity == "osteoporosis"
    with pytest.raises(ValueError):
        combine([], [], [], 0.5, 0.5)


def test_from_probabilities_is_the_same_rule_on_the_logits_the_probabilities_came_from() -> None:
    temperature = 1.7
    raw = [2.4, 0.3, -0.9]
    by_logit = combine([z / temperature for z in raw], [0.5, 0.1, -0.2], [-1.0, -1.5, -2.0], 0.5, 0.7)
    by_p = combine_probabilities([sig(z / temperature) for z in raw], [sig(0.5), sig(0.1), sig(-0.2)],
                                 [-1.0, -1.5, -2.0], 0.5, 0.7)  # fmt: skip
    assert by_p.probability == pytest.approx(by_logit.probability, rel=1e-9)
    assert by_p.p_osteoporosis_given_bone_loss == pytest.approx(by_logit.p_osteoporosis_given_bone_loss, rel=1e-9)
    # a probability of exactly 0 or 1 (rounded) is clipped, never an infinite logit
    assert 0.0 < combine_probabilities([1.0, 0.0], [1.0, 0.0], [0.0, 0.0], 0.5, 0.5).probability < 1.0


ALGO = AlgorithmInfo("STR-Net", "0.3.1-test", "ab" * 32)


def film(p: float, q: float, t: float, threshold: float = 0.5) -> Findings:
    positive = p >= threshold
    return Findings(p, threshold, positive, q, ("osteoporosis" if q >= 0.5 else "osteopenia") if positive else None,
                    t, t - 0.9, t + 0.9, 0.9, ALGO)  # fmt: skip


def test_the_agent_combines_a_studys_films_by_side() -> None:
    films = [film(0.62, 0.7, -2.6), film(0.45, 0.4, -2.2), film(0.2, 0.1, -0.5), film(0.55, 0.5, -1.9)]
    knees = study_knees(["L", "L", "R", None], films)
    assert [(k.laterality, k.images) for k in knees] == [("L", (0, 1)), ("R", (2,)), (None, (3,))]
    left = knees[0]
    assert left.probability == pytest.approx(sig((logit(0.62) + logit(0.45)) / 2))  # 0.5358
    assert left.p_osteoporosis_given_bone_loss == pytest.approx(sig((logit(0.7) + logit(0.4)) / 2))
    assert left.t_score == pytest.approx(-2.4)
    assert (left.t_score_low, left.t_score_high) == pytest.approx((-3.3, -1.5))
    assert left.bone_loss and left.severity == "osteoporosis" and left.interval_coverage == 0.9
    assert not knees[1].bone_loss and knees[1].probability == pytest.approx(0.2)
    assert knees[2].bone_loss and knees[2].probability == pytest.approx(0.55)


def _meta() -> SimpleNamespace:
    return SimpleNamespace(temperature=2.0, served_threshold="conservative", thresholds={"conservative": 0.5},
                           conformal_quantile=0.9, conformal_coverage=0.9)  # fmt: skip


def test_knee_metrics_against_a_hand_computation() -> None:
    # six films, four knees: A-left (2 films), A-right, B-left (2 films), C-? (its own knee)
    studies = ["A", "A", "A", "B", "B", "C"]
    sides = ["L", "L", "R", "L", "L", ""]
    z = np.array([2.0, 0.0, -2.0, 1.0, -3.0, 0.4])  # raw screening logits; T = 2
    sev = np.array([1.0, 0.0, 0.0, -1.0, -0.4, 0.0])
    t_hat = np.array([-2.0, -3.0, 0.0, -1.5, -0.5, 1.0])
    raw = {"screen_logit": z, "severity_logit": sev, "tscore": t_hat}
    tg = {
        "label": np.array([1, 1, 0, 1, 1, 0], dtype=np.float32),
        "severity": np.array([1, 1, np.nan, 0, 0, np.nan], dtype=np.float32),
        "tscore": np.array([-2.6, -2.6, 0.3, -1.2, -1.2, 0.5], dtype=np.float32),
    }
    m = knee_metrics(raw, tg, _meta(), studies, sides)  # type: ignore[arg-type]
    # knees: p = sig(mean(z/2)): A-L sig(0.5) = 0.622, A-R sig(-1) = 0.269, B-L sig(-0.5) = 0.378, C sig(0.2) = 0.550
    p = np.array([sig(0.5), sig(-1.0), sig(-0.5), sig(0.2)])
    y = np.array([1, 0, 1, 0])
    assert m["n_knees"] == 4 and m["n_knees_several_images"] == 2
    assert m["screening_auroc_knee"] == pytest.approx(auroc(y, p)) == pytest.approx(0.75)
    # at 0.5: A-L positive (TP), B-L negative (FN), A-R negative (TN), C positive (FP)
    assert m["sensitivity_knee"] == pytest.approx(0.5) and m["specificity_knee"] == pytest.approx(0.5)
    # severity among the bone-loss knees: A-L (osteoporosis, mean logit 0.5) and B-L (osteopenia, -0.7)
    assert m["n_severity_knee"] == 2 and m["severity_auroc_knee"] == pytest.approx(1.0)
    assert len(m["severity_auroc_knee_ci"]) == 2
    # T-scores: A-L -2.5 vs -2.6, A-R 0.0 vs 0.3, B-L -1.0 vs -1.2, C 1.0 vs 0.5
    assert m["tscore_mae_knee"] == pytest.approx((0.1 + 0.3 + 0.2 + 0.5) / 4)
    t_k, t_true = np.array([-2.5, 0.0, -1.0, 1.0]), np.array([-2.6, 0.3, -1.2, 0.5])
    assert m["tscore_pearson_r_knee"] == pytest.approx(float(np.corrcoef(t_k, t_true)[0, 1]))


def test_compute_metrics_keeps_every_image_key_and_adds_the_knee_ones() -> None:
    rng = np.random.default_rng(0)
    n = 40
    y = (np.arange(n) % 2).astype(np.float32)
    raw = {
        "screen_logit": y * 2.0 + rng.normal(0, 1, n),
        "severity_logit": rng.normal(0, 1, n),
        "tscore": -2.0 * y + rng.normal(0, 0.5, n),
    }
    tg = {"label": y, "severity": np.where(y == 1, np.arange(n) % 4 == 1, np.nan).astype(np.float32),
          "tscore": (-2.0 * y + rng.normal(0, 0.3, n)).astype(np.float32)}  # fmt: skip
    clinical = rng.normal(0, 1, (n, 6)).astype(np.float32)
    patients = [f"P{i // 2}" for i in range(n)]
    intensity = {"preprocessed_mean": rng.normal(0, 1, n)}
    before = compute_metrics(raw, tg, _meta(), clinical, patients, intensity)  # type: ignore[arg-type]
    studies = [f"S{i // 4}" for i in range(n)]
    sides = ["L", "L", "R", "R"] * (n // 4)
    after = compute_metrics(raw, tg, _meta(), clinical, patients, intensity, None, studies, sides)  # type: ignore[arg-type]
    assert set(before) < set(after)
    assert set(after) - set(before) >= {"severity_auroc_knee", "severity_auroc_knee_ci", "screening_auroc_knee",
                                        "sensitivity_knee", "specificity_knee", "tscore_mae_knee",
                                        "tscore_pearson_r_knee", "n_knees"}  # fmt: skip
    assert after["n_knees"] == n // 2
    assert after["screening_auroc"] == before["screening_auroc"]


def test_with_one_film_per_knee_the_knee_figures_are_the_image_figures() -> None:
    rng = np.random.default_rng(1)
    n = 60
    y = (np.arange(n) % 3 != 0).astype(np.float32)
    raw = {"screen_logit": 1.5 * y + rng.normal(0, 1, n), "severity_logit": rng.normal(0, 1, n),
           "tscore": -2.0 * y + rng.normal(0, 0.6, n)}  # fmt: skip
    tg = {"label": y, "severity": np.where(y == 1, rng.random(n) < 0.5, np.nan).astype(np.float32),
          "tscore": (-2.0 * y + rng.normal(0, 0.4, n)).astype(np.float32)}  # fmt: skip
    studies = [f"S{i // 2}" for i in range(n)]
    sides = ["L", "R"] * (n // 2)
    m = compute_metrics(raw, tg, _meta(), rng.normal(0, 1, (n, 6)).astype(np.float32), [f"P{i}" for i in range(n)],  # type: ignore[arg-type]
                        {"preprocessed_mean": rng.normal(0, 1, n)}, None, studies, sides)  # fmt: skip
    assert m["n_knees"] == n and m["n_knees_several_images"] == 0
    for image, knee in (("screening_auroc", "screening_auroc_knee"), ("severity_auroc", "severity_auroc_knee"),
                        ("sensitivity", "sensitivity_knee"), ("specificity", "specificity_knee"),
                        ("tscore_mae", "tscore_mae_knee"), ("tscore_pearson_r", "tscore_pearson_r_knee")):  # fmt: skip
        assert m[knee] == pytest.approx(m[image]), knee
    assert m["severity_auroc_knee_ci"] == pytest.approx(m["severity_auroc_ci"])
