"""Difficulty presets of the synthetic knee-radiograph generator.

The default image is 1024 rows x 832 columns (portrait, single knee); bilateral films are
1024 x 1456 with both knees at the same scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from model.synth.acquisition import VENDOR_PROFILES
from model.synth.patient import PatientModel


@dataclass(frozen=True)
class Preset:
    """All generator parameters that are not drawn per patient or per image."""

    patient: PatientModel = field(default_factory=PatientModel)
    rows: int = 1024
    cols: int = 832
    bilateral_cols: int = 1456
    bilateral_fraction: float = 0.08  # studies imaged as one film with both knees
    two_study_fraction: float = 0.35  # patients with a second (follow-up) study
    single_side_fraction: float = 0.2  # studies with only one knee imaged
    pa_fraction: float = 0.1
    profiles: tuple[str, ...] = tuple(VENDOR_PROFILES)
    cue_gain: float = 1.0  # how strongly the bone cues follow the knee BMD
    knee_noise: float = 0.12  # extra per-knee cue noise (left and right differ a little)
    rotation_sd_deg: float = 3.0
    mag_range: tuple[float, float] = (0.92, 1.10)
    shift_fraction: float = 0.05  # SD of the joint-centre offset, fraction of the frame
    photons_range: tuple[float, float] = (700.0, 4000.0)
    kvp_range: tuple[float, float] = (58.0, 80.0)
    collimation_prob: float = 0.6
    marker_prob: float = 0.95
    text_prob: float = 0.5
    implant_prob: float = 0.02
    # retakes: the share of single-knee films (L or R, never "B") retaken in the same study (the
    # same knee, a fresh acquisition); 0 keeps every seed's files as before retakes existed
    repeat_fraction: float = 0.0
    repeat_other_view: float = 0.5  # share of retakes in the other view (AP retaken standing PA)

    def to_dict(self) -> dict:
        """JSON-safe dictionary (for dataset cards and manifests)."""
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "default": Preset(),
    "easy": Preset(
        patient=PatientModel(knee_corr=0.97, cue_noise=0.15),
        cue_gain=1.3,
        knee_noise=0.05,
        rotation_sd_deg=1.5,
        mag_range=(0.97, 1.04),
        shift_fraction=0.02,
        photons_range=(2500.0, 5000.0),
        collimation_prob=0.2,
        text_prob=0.1,
        implant_prob=0.0,
    ),
    "hard": Preset(
        patient=PatientModel(knee_corr=0.88, cue_noise=0.45, oa_rate=0.5),
        cue_gain=0.8,
        knee_noise=0.2,
        rotation_sd_deg=5.0,
        mag_range=(0.85, 1.18),
        shift_fraction=0.08,
        photons_range=(400.0, 3000.0),
        kvp_range=(55.0, 90.0),
        collimation_prob=0.8,
        text_prob=0.8,
        implant_prob=0.05,
        bilateral_fraction=0.15,
    ),
}


def get_preset(name_or_preset: str | Preset) -> Preset:
    """Resolve a preset name (``ValueError`` lists the valid names)."""
    if isinstance(name_or_preset, Preset):
        return name_or_preset
    try:
        return PRESETS[name_or_preset]
    except KeyError:
        raise ValueError(f"unknown preset {name_or_preset!r}; choose from {sorted(PRESETS)}") from None


def with_profiles(preset: Preset, profiles: tuple[str, ...]) -> Preset:
    """Copy of ``preset`` restricted to some vendor profiles (e.g. to hold one out)."""
    unknown = set(profiles) - set(VENDOR_PROFILES)
    if unknown:
        raise ValueError(f"unknown vendor profiles {sorted(unknown)}")
    return replace(preset, profiles=tuple(profiles))
