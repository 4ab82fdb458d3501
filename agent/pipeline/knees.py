"""A study's knees from its films' findings: the one combination rule of model/knee.py, applied
to what the agent records per film (calibrated probabilities, whose logits are the calibrated
logits; T-scores and their conformal interval)."""

from __future__ import annotations

from collections.abc import Sequence

from agent.domain import Findings, KneeFindings
from model.knee import combine_probabilities, knee_groups, side_of


def study_knees(lateralities: Sequence[str | None], findings: Sequence[Findings]) -> list[KneeFindings]:
    """The knees of one study's screened films (``lateralities[i]`` of ``findings[i]``), in order
    of each knee's first film. A film of unknown side (or "B") is a knee of its own; a knee of one
    film carries that film's figures as recorded. The films of one knee were decided at one
    threshold; if a threshold changed between them, the highest."""
    if len(lateralities) != len(findings):
        raise ValueError(f"{len(lateralities)} lateralities but {len(findings)} findings")
    out = []
    for group in knee_groups(["study"] * len(findings), list(lateralities)):
        films = [findings[i] for i in group]
        if len(films) == 1:  # a knee of one film is that film (the rule agrees, up to rounding)
            out.append(_one(side_of(lateralities[group[0]]), group[0], films[0]))
            continue
        half = max((f.t_score_high - f.t_score_low) / 2.0 for f in films)
        threshold = max(f.threshold for f in films)
        knee = combine_probabilities(
            [f.probability for f in films],
            [f.p_osteoporosis_given_bone_loss for f in films],
            [f.t_score for f in films],
            threshold,
            half,
        )
        out.append(
            KneeFindings(
                laterality=side_of(lateralities[group[0]]),
                images=tuple(group),
                probability=knee.probability,
                threshold=knee.threshold,
                bone_loss=knee.bone_loss,
                p_osteoporosis_given_bone_loss=knee.p_osteoporosis_given_bone_loss,
                severity=knee.severity,
                t_score=knee.t_score,
                t_score_low=knee.t_score_low,
                t_score_high=knee.t_score_high,
                interval_coverage=films[0].interval_coverage,
            )
        )
    return out


def _one(side: str | None, index: int, f: Findings) -> KneeFindings:
    return KneeFindings(side, (index,), f.probability, f.threshold, f.bone_loss, f.p_osteoporosis_given_bone_loss,
                        f.severity if f.bone_loss else None, f.t_score, f.t_score_low, f.t_score_high,
                        f.interval_coverage)  # fmt: skip
