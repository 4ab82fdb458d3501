"""Synthetic patient and label model.

Clinical variables (age, sex, BMI) drive the DXA T-score with noise, so that they alone are only
moderately predictive (logistic AUROC about 0.70 to 0.75). A latent *knee BMD* correlates with
the DXA T-score (site discordance, ``knee_corr``) and drives each image cue with its own noise.
The WHO class follows the DXA T-score: normal T > -1.0, osteopenia -2.5 < T <= -1.0,
osteoporosis T <= -2.5. The class mix is imposed by rejection sampling on the class, which keeps
the within-class relation between clinical variables and T-score intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

NORMAL, OSTEOPENIA, OSTEOPOROSIS = 0, 1, 2

# T-score model: T = intercept + coefficients . clinical + N(0, sd). Tuned so that a clinical-only
# logistic model reaches an AUROC near 0.72 under the default class mix.
_T_INTERCEPT = 0.35
_T_AGE_PER_YEAR = -0.040
_T_FEMALE = -0.55
_T_BMI_PER_UNIT = 0.055
_T_NOISE_SD = 1.28
_T_MEAN_CENTRE = -1.7  # centre/scale used to turn T into a standard-normal-ish latent
_T_SCALE = 1.8


def who_class(t_score: float) -> int:
    """WHO category from a DXA T-score (0 normal, 1 osteopenia, 2 osteoporosis)."""
    if t_score > -1.0:
        return NORMAL
    if t_score > -2.5:
        return OSTEOPENIA
    return OSTEOPOROSIS


@dataclass(frozen=True)
class PatientModel:
    """Parameters of the patient population (part of a preset)."""

    class_mix: tuple[float, float, float] = (0.4, 0.2, 0.4)
    knee_corr: float = 0.935  # correlation of the latent knee BMD with the DXA T-score
    cue_noise: float = 0.30  # SD of each cue's own noise, in latent (z) units
    missing_sex: float = 0.03
    missing_bmi: float = 0.12
    oa_rate: float = 0.35  # fraction of patients with radiographic osteoarthritis


@dataclass
class Patient:
    """One synthetic patient; everything here is constant across the patient's images."""

    index: int
    patient_id: str
    sex: str  # "M" / "F" (true value; ``sex_recorded`` may be empty)
    age: int
    bmi: float
    height_m: float
    weight_kg: float
    t_score: float
    who: int
    knee_z: float  # latent knee BMD (standard-normal-ish, higher = denser)
    cues: dict[str, float] = field(default_factory=dict)
    oa_grade: int = 0  # 0..3, unrelated to the T-score given age and BMI
    sex_recorded: str = ""
    bmi_recorded: float | None = None

    @property
    def label(self) -> int:
        """Binary screening label: 1 = bone loss (osteopenia or osteoporosis)."""
        return int(self.who != NORMAL)

    @property
    def severity(self) -> int | None:
        """Severity among bone loss: 0 osteopenia, 1 osteoporosis, None for normal."""
        return None if self.who == NORMAL else int(self.who == OSTEOPOROSIS)


def _draw_clinical(rng: np.random.Generator) -> tuple[str, int, float, float]:
    sex = "F" if rng.random() < 0.72 else "M"
    age = int(np.clip(rng.normal(66.0, 10.5), 40, 92))
    bmi = float(np.clip(rng.lognormal(np.log(27.0), 0.18), 16.0, 50.0))
    t_mean = _T_INTERCEPT + _T_AGE_PER_YEAR * (age - 50) + _T_FEMALE * (sex == "F") + _T_BMI_PER_UNIT * (bmi - 27.0)
    t = float(np.clip(t_mean + rng.normal(0.0, _T_NOISE_SD), -5.0, 3.0))
    return sex, age, bmi, t


@lru_cache(maxsize=4)
def _natural_mix() -> tuple[float, float, float]:
    """Class frequencies of the un-resampled population (fixed-seed Monte Carlo)."""
    rng = np.random.default_rng(12345)
    counts = np.zeros(3)
    for _ in range(20000):
        counts[who_class(_draw_clinical(rng)[3])] += 1
    return tuple(float(c) for c in counts / counts.sum())  # type: ignore[return-value]


def _cues(rng: np.random.Generator, knee_z: float, noise: float) -> dict[str, float]:
    """Per-cue z-scores: each follows the knee BMD with its own independent noise."""
    names = ("cortex", "bvtv", "tb_th", "tb_sp", "horizontal", "mineral")
    return {n: float(knee_z + rng.normal(0.0, noise)) for n in names}


def sample_patient(rng: np.random.Generator, index: int, model: PatientModel) -> Patient:
    """Draw one patient; ``rng`` is the patient's own generator."""
    natural = _natural_mix()
    target = np.asarray(model.class_mix, dtype=float)
    target = target / target.sum()
    accept = target / np.maximum(np.asarray(natural), 1e-9)
    accept = accept / accept.max()
    while True:
        sex, age, bmi, t = _draw_clinical(rng)
        who = who_class(t)
        if rng.random() < accept[who]:
            break
    t_z = (t - _T_MEAN_CENTRE) / _T_SCALE
    r = float(np.clip(model.knee_corr, 0.0, 1.0))
    knee_z = r * t_z + np.sqrt(1.0 - r * r) * rng.normal()
    height = float(np.clip(rng.normal(1.64 if sex == "F" else 1.77, 0.07), 1.40, 2.00))
    weight = bmi * height * height
    # OA depends on age and BMI only, never on the T-score given those.
    oa_logit = -1.0 + 0.06 * (age - 65) + 0.08 * (bmi - 27) + np.log(model.oa_rate / 0.35 + 1e-9)
    oa = 0
    if rng.random() < 1.0 / (1.0 + np.exp(-oa_logit)):
        oa = int(rng.integers(1, 4))
    return Patient(
        index=index,
        patient_id=f"SYN{index:06d}",
        sex=sex,
        age=age,
        bmi=round(bmi, 1),
        height_m=round(height, 2),
        weight_kg=round(weight, 1),
        t_score=round(t, 2),
        who=who,
        knee_z=float(knee_z),
        cues=_cues(rng, float(knee_z), model.cue_noise),
        oa_grade=oa,
        sex_recorded="" if rng.random() < model.missing_sex else sex,
        bmi_recorded=None if rng.random() < model.missing_bmi else round(bmi, 1),
    )
