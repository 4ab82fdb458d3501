"""Per-knee decisions: the screened films of one knee in one study combined into one result.

A knee is (study, laterality): every screened film of that side in that study (repeats, AP and
PA, standing and supine; laterals are not screened, the agent skips them at ingest). A film whose
laterality is unknown (or "B", both knees) is a knee of its own: it cannot be told which bone it
shows, so it is never averaged with another.

The rule (``combine``): the knee's probability of bone loss is the sigmoid of the mean of its
films' calibrated (temperature-scaled) screening logits, its P(osteoporosis | bone loss) the
sigmoid of the mean severity logit, its T-score the mean of the films' (recalibrated) T-scores
with the checkpoint's conformal half-width around it; the knee is positive when its probability
reaches the served threshold. A study is positive when one of its knees is.

Why the mean of logits: repeats of one knee share the bone, so what differs between them is the
acquisition (positioning, exposure, processing, projection). Averaging the films' evidence on the
logit scale cancels part of that acquisition noise and keeps the bone's signal, which every film
carries; a maximum would instead pick the film whose noise happened to point towards bone loss
(its false-positive rate grows with the number of repeats). The mean of the logits never exceeds
the largest, so a positive knee has at least one positive film. The half-width stays the
single-film conformal quantile: conservative for a mean of films whose errors share the bone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: lateralities that name one knee; any other value (None, "", "B") makes the film its own knee
SIDES = ("L", "R")
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before their logit


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def logit(p: float) -> float:
    """The logit of a probability (clipped away from 0 and 1): a calibrated probability's logit
    is the temperature-scaled screening logit it came from."""
    p = min(max(float(p), _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


def knee_groups(studies: Sequence[str], lateralities: Sequence[str | None]) -> list[list[int]]:
    """Indices of the films of each knee, in order of each knee's first film. A film with an
    empty study or a laterality outside ``SIDES`` is a knee of its own."""
    if len(studies) != len(lateralities):
        raise ValueError(f"{len(studies)} studies but {len(lateralities)} lateralities")
    groups: dict[tuple[str, str] | int, list[int]] = {}
    for i, (study, side) in enumerate(zip(studies, lateralities, strict=True)):
        s = (side or "").strip().upper()
        key: tuple[str, str] | int = (study, s) if study and s in SIDES else i
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def side_of(laterality: str | None) -> str | None:
    """"L" or "R" when the value names one knee, else None."""
    s = (laterality or "").strip().upper()
    return s if s in SIDES else None


@dataclass(frozen=True)
class Knee:
    """One knee's combined result."""

    n_images: int
    probability: float  # P(bone loss), sigmoid of the mean calibrated screening logit
    p_osteoporosis_given_bone_loss: float  # sigmoid of the mean severity logit
    t_score: float  # mean of the films' T-scores
    t_score_low: float  # t_score - half_width
    t_score_high: float  # t_score + half_width
    threshold: float
    bone_loss: bool  # probability >= threshold
    severity: str | None  # "osteopenia" | "osteoporosis" when bone_loss, else None


def combine(
    screen_logits: Sequence[float],
    severity_logits: Sequence[float],
    t_scores: Sequence[float],
    threshold: float,
    half_width: float,
) -> Knee:
    """One knee from its films' calibrated screening logits, severity logits and T-scores."""
    n = len(screen_logits)
    if n == 0 or len(severity_logits) != n or len(t_scores) != n:
        raise ValueError("a knee needs one screening logit, severity logit and T-score per film, at least one film")
    p = _sigmoid(math.fsum(float(z) for z in screen_logits) / n)
    q = _sigmoid(math.fsum(float(z) for z in severity_logits) / n)
    t = math.fsum(float(v) for v in t_scores) / n
    positive = p >= threshold
    severity = ("osteoporosis" if q >= 0.5 else "osteopenia") if positive else None
    return Knee(n, p, q, t, t - half_width, t + half_width, float(threshold), positive, severity)


def combine_probabilities(
    probabilities: Sequence[float],
    p_osteoporosis_given_bone_loss: Sequence[float],
    t_scores: Sequence[float],
    threshold: float,
    half_width: float,
) -> Knee:
    """``combine`` from what the agent records per film: the calibrated probabilities, whose
    logits are the calibrated logits (P(bone loss) = sigmoid(logit / T))."""
    return combine(
        [logit(p) for p in probabilities],
        [logit(q) for q in p_osteoporosis_given_bone_loss],
        t_scores,
        threshold,
        half_width,
    )
