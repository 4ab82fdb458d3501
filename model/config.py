"""Hyperparameters of STR-Net and of its training, as JSON-safe frozen dataclasses.

Both travel inside the checkpoint metadata (``to_dict``/``from_dict``), so a checkpoint can be
rebuilt without any code-side defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")

#: Names of the clinical inputs of the T-score head, in order (see ``data.clinical_features``).
CLINICAL_FEATURES: tuple[str, ...] = (
    "age_z",
    "age_missing",
    "sex_male",
    "sex_missing",
    "bmi_z",
    "bmi_missing",
)


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, turning lists back into tuples and ignoring unknown keys."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in known:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _to_dict(obj: Any) -> dict[str, Any]:
    out = asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of STR-Net (see ``model/strnet.py``)."""

    in_chans: int = 1
    stem_channels: int = 24
    stage_channels: tuple[int, ...] = (32, 64, 128, 192)
    stage_depths: tuple[int, ...] = (1, 1, 2, 1)
    neck_dim: int = 128
    n_experts: int = 4
    expert_dim: int = 96
    gate_temperature: float = 1.0
    dropout: float = 0.2
    n_clinical: int = len(CLINICAL_FEATURES)
    tscore_hidden: int = 64
    #: the severity head also sees the clinical inputs (age, sex, BMI carry T-score information)
    severity_clinical: bool = True
    #: gradient from the T-score task into the shared trunk is multiplied by this (weak coupling)
    tscore_trunk_grad_scale: float = 0.5
    channels_last: bool = False

    def __post_init__(self) -> None:
        if len(self.stage_channels) != len(self.stage_depths):
            raise ValueError("stage_channels and stage_depths must have the same length")
        if self.n_experts < 1:
            raise ValueError("n_experts must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, loss weights, augmentation and operating-point settings."""

    seed: int = 20260427
    epochs: int = 12
    #: the batch on the CPU (and any device but CUDA)
    batch_size: int = 32
    #: the peak learning rate at ``batch_size``
    lr: float = 2e-3
    #: the batch on CUDA (0: ``batch_size``); the learning rate is scaled to it by the square
    #: root of the ratio (``model.train.effective_batch``)
    cuda_batch_size: int = 128
    weight_decay: float = 0.02
    warmup_epochs: float = 1.0
    patience: int = 4
    val_fraction: float = 0.2
    #: probability of hiding each image's clinical variables in training (robust to absence)
    clinical_dropout: float = 0.15
    #: stop after this many minutes of training (0: no limit); recorded in the metadata if hit
    time_budget_min: float = 0.0
    # loss weights: screening BCE, severity BCE (bone-loss cases only), T-score Huber
    w_screen: float = 1.0
    w_severity: float = 1.0
    w_tscore: float = 0.5
    huber_delta: float = 1.0
    # augmentation (applied on cached tensors, batched)
    aug_hflip: float = 0.5
    aug_vflip: float = 0.0
    #: share of images that get the resampling affine (the rest keep their exact pixels, so
    #: the model also sees unsmoothed texture as at inference)
    aug_affine_p: float = 0.5
    aug_rotate_deg: float = 8.0
    aug_scale: float = 0.08
    aug_translate: float = 0.04
    aug_gamma: float = 0.15
    aug_contrast: float = 0.15
    aug_brightness: float = 0.05
    aug_noise: float = 0.0
    # operating point, calibration, conformal
    target_sensitivity: float = 0.86
    lower_bound_confidence: float = 0.95
    served_threshold: str = "conservative"
    conformal_coverage: float = 0.90
    #: fit the texture stage (model/texture.py) after the network; its L2 penalty
    texture: bool = True
    texture_l2: float = 30.0
    num_threads: int = 2
    cache_dtype: str = "float16"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.served_threshold not in ("conservative", "point"):
            raise ValueError("served_threshold must be 'conservative' or 'point'")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must lie in (0, 1)")
        if self.batch_size < 1 or self.cuda_batch_size < 0:
            raise ValueError("batch_size must be >= 1 and cuda_batch_size >= 0")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)
