"""Manifests, patient-level splits, a cached torch Dataset and batched augmentation.

A manifest is a CSV with at least ``path`` (relative to the manifest's folder, DICOM or PNG),
``patient_id`` and ``label``; ``severity``, ``t_score``, ``age``, ``sex`` and ``bmi`` may be empty;
``mask_path`` (the generator's label mask, same folder rule) is read when present.
Every image goes through ``model.preprocess.preprocess_file`` (the one decode + preprocessing
path shared with serving), once: the results are cached in memory, so later epochs never decode.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from model.config import TrainConfig

AGE_CENTRE, AGE_SCALE = 65.0, 12.0
BMI_CENTRE, BMI_SCALE = 27.0, 5.0


def _num(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest; unknown numbers are NaN, unknown sex is ''."""

    path: Path
    patient_id: str
    label: float
    severity: float
    t_score: float
    age: float
    sex: str
    bmi: float
    laterality: str = ""
    study_instance_uid: str = ""
    sop_instance_uid: str = ""
    profile: str = ""
    mask_path: Path | None = None  # the generator's label mask (0 background, 1 cortex, 2 trabecular)


def read_manifest(csv_path: str | Path) -> list[ManifestRow]:
    """Read a manifest CSV; paths are resolved against the manifest's folder."""
    csv_path = Path(csv_path)
    base = csv_path.resolve().parent
    rows: list[ManifestRow] = []
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "patient_id"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"manifest {csv_path} lacks columns {sorted(missing)}")
        for rec in reader:
            p = Path(rec["path"])
            mask = Path(rec["mask_path"]) if rec.get("mask_path") else None
            rows.append(
                ManifestRow(
                    path=p if p.is_absolute() else base / p,
                    patient_id=rec["patient_id"],
                    label=_num(rec.get("label")),
                    severity=_num(rec.get("severity")),
                    t_score=_num(rec.get("t_score")),
                    age=_num(rec.get("age")),
                    sex=(rec.get("sex") or "").strip().upper()[:1],
                    bmi=_num(rec.get("bmi")),
                    laterality=rec.get("laterality", "") or "",
                    study_instance_uid=rec.get("study_instance_uid", "") or "",
                    sop_instance_uid=rec.get("sop_instance_uid", "") or "",
                    profile=rec.get("profile", "") or "",
                    mask_path=None if mask is None else (mask if mask.is_absolute() else base / mask),
                )
            )
    if not rows:
        raise ValueError(f"manifest {csv_path} has no rows")
    return rows


def read_manifests(paths: list[str | Path] | tuple[str | Path, ...]) -> list[ManifestRow]:
    """Read and concatenate several manifests. With more than one, each patient id gets the
    manifest's folder name as a prefix, since independently generated sets reuse ids."""
    if len(paths) == 1:
        return read_manifest(paths[0])
    rows: list[ManifestRow] = []
    for p in paths:
        tag = Path(p).resolve().parent.name
        rows += [replace(r, patient_id=f"{tag}:{r.patient_id}") for r in read_manifest(p)]
    return rows


def clinical_vector(age: float | None, sex: str | None, bmi: float | None) -> list[float]:
    """Clinical inputs in ``model.config.CLINICAL_FEATURES`` order (z-scores, 0/1 flags)."""
    age_ok = age is not None and math.isfinite(age)
    bmi_ok = bmi is not None and math.isfinite(bmi)
    s = (sex or "").strip().upper()[:1]
    return [
        (float(age) - AGE_CENTRE) / AGE_SCALE if age_ok else 0.0,  # type: ignore[arg-type]
        0.0 if age_ok else 1.0,
        1.0 if s == "M" else 0.0,
        0.0 if s in ("M", "F") else 1.0,
        (float(bmi) - BMI_CENTRE) / BMI_SCALE if bmi_ok else 0.0,  # type: ignore[arg-type]
        0.0 if bmi_ok else 1.0,
    ]


def clinical_features(rows: list[ManifestRow]) -> np.ndarray:
    """(N, 6) float32 clinical inputs of the rows."""
    return np.asarray([clinical_vector(r.age, r.sex, r.bmi) for r in rows], dtype=np.float32)


def targets(rows: list[ManifestRow]) -> dict[str, np.ndarray]:
    """Label, severity and T-score arrays (NaN where unknown)."""
    return {
        "label": np.asarray([r.label for r in rows], dtype=np.float32),
        "severity": np.asarray([r.severity for r in rows], dtype=np.float32),
        "tscore": np.asarray([r.t_score for r in rows], dtype=np.float32),
    }


def patient_split(
    rows: list[ManifestRow], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split image indices into train / validation by patient, stratified by whether the
    patient has any bone-loss image; all films of a patient (bilateral, repeats) stay together."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_patient[r.patient_id].append(i)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    train: list[int] = []
    for positive in (False, True):
        pids = sorted(
            p for p, idx in by_patient.items() if any(rows[i].label == 1 for i in idx) == positive
        )
        rng.shuffle(pids)
        n_val = int(round(len(pids) * val_fraction))
        for k, pid in enumerate(pids):
            (val if k < n_val else train).extend(by_patient[pid])
    return np.asarray(sorted(train)), np.asarray(sorted(val))


def _preprocess_one(args: tuple[str, dict[str, Any]]) -> np.ndarray:
    from model.preprocess import PreprocessSpec, preprocess_file

    path, spec_dict = args
    out = preprocess_file(Path(path), PreprocessSpec.from_dict(spec_dict))
    return np.asarray(out, dtype=np.float32)[0]


def _preprocess_with_stats(args: tuple[str, dict[str, Any]]) -> tuple[np.ndarray, float]:
    """Decode and preprocess (the same two steps as ``preprocess_file``) and also return the
    global mean of the decoded pixels, for the intensity-only baseline."""
    from model.io import read_pixels
    from model.preprocess import PreprocessSpec, preprocess

    path, spec_dict = args
    pixels = read_pixels(Path(path))
    out = preprocess(pixels, PreprocessSpec.from_dict(spec_dict))
    return np.asarray(out, dtype=np.float32)[0], float(np.mean(pixels))


def build_cache(
    rows: list[ManifestRow],
    spec: Any,
    workers: int = 2,
    dtype: str = "float16",
    progress: bool = True,
    with_stats: bool = False,
) -> Any:
    """Decode and preprocess every image once: an (N, S, S) array (float16 by default).

    With ``with_stats`` returns ``(cache, {"decoded_mean": (N,) array})``.
    """
    from tqdm import tqdm

    jobs = [(str(r.path), spec.to_dict()) for r in rows]
    size = int(spec.input_size)
    cache = np.empty((len(rows), size, size), dtype=np.dtype(dtype))
    means = np.zeros(len(rows), dtype=np.float64)
    fn = _preprocess_with_stats if with_stats else _preprocess_one
    bar = tqdm(total=len(jobs), desc="decode+preprocess", unit="img", disable=not progress)

    def put(i: int, res: Any) -> None:
        if with_stats:
            cache[i], means[i] = res
        else:
            cache[i] = res
        bar.update()

    if workers <= 1:
        for i, job in enumerate(jobs):
            put(i, fn(job))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for i, res in enumerate(pool.map(fn, jobs, chunksize=8)):
                put(i, res)
    bar.close()
    return (cache, {"decoded_mean": means}) if with_stats else cache


def data_hash(rows: list[ManifestRow], cache: np.ndarray) -> str:
    """sha256 over the labels/clinical values of the rows and the preprocessed pixels."""
    h = hashlib.sha256()
    for r in rows:
        h.update(
            f"{r.path.name}|{r.patient_id}|{r.label}|{r.severity}|{r.t_score}|{r.age}|{r.sex}|"
            f"{r.bmi}\n".encode()
        )
    h.update(np.ascontiguousarray(cache).tobytes())
    return h.hexdigest()


class RadiographDataset(Dataset):
    """Images of a manifest with targets and clinical inputs, preprocessed once and cached.

    Items are dicts: ``image`` (1, S, S) float32, ``label``, ``severity``, ``tscore`` (NaN when
    unknown) and ``clinical`` (6,). Pass ``cache`` (from ``build_cache``) to skip decoding.
    """

    def __init__(self, rows: list[ManifestRow], spec: Any, cache: np.ndarray | None = None):
        self.rows = rows
        self.spec = spec
        size = int(spec.input_size)
        self.cache = cache if cache is not None else np.zeros((len(rows), size, size), np.float16)
        self._done = np.full(len(rows), cache is not None)
        self.targets = targets(rows)
        self.clinical = clinical_features(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> np.ndarray:
        if not self._done[i]:
            self.cache[i] = _preprocess_one((str(self.rows[i].path), self.spec.to_dict()))
            self._done[i] = True
        return self.cache[i]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": torch.from_numpy(self.image(i).astype(np.float32))[None],
            "label": torch.tensor(self.targets["label"][i]),
            "severity": torch.tensor(self.targets["severity"][i]),
            "tscore": torch.tensor(self.targets["tscore"][i]),
            "clinical": torch.from_numpy(self.clinical[i]),
        }


def augment_batch(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random flips, a small affine (rotation, scale, translation) and intensity jitter
    (gamma-like, contrast, brightness, noise) applied per image to a (B, 1, S, S) batch.

    The random numbers come from ``gen`` (a CPU generator) whatever the device of ``x``, so a
    batch already on the GPU is augmented there with the same draws as on the CPU."""
    b = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    flip_h = torch.rand(b, generator=gen) < cfg.aug_hflip
    flip_v = torch.rand(b, generator=gen) < cfg.aug_vflip
    keep = (torch.rand(b, generator=gen) >= cfg.aug_affine_p).float()  # 1: no resampling
    ang = u(-cfg.aug_rotate_deg, cfg.aug_rotate_deg) * math.pi / 180.0 * (1 - keep)
    scale = 1.0 + (u(1.0 - cfg.aug_scale, 1.0 + cfg.aug_scale) - 1.0) * (1 - keep)
    sx = torch.where(flip_h, -1.0, 1.0) / scale
    sy = torch.where(flip_v, -1.0, 1.0) / scale
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta[:, 0, 2] = u(-cfg.aug_translate, cfg.aug_translate) * 2 * (1 - keep)
    theta[:, 1, 2] = u(-cfg.aug_translate, cfg.aug_translate) * 2 * (1 - keep)
    grid = F.affine_grid(theta.to(device=dev, dtype=x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # intensity jitter around each image's own mean, so the range of the spec is kept
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    z = (x - mean) / std
    gamma = u(-cfg.aug_gamma, cfg.aug_gamma).view(b, 1, 1, 1).to(dev)
    z = z + gamma * torch.tanh(z)  # a monotone bend of the mid-tones (|gamma| < 1)
    contrast = u(1.0 - cfg.aug_contrast, 1.0 + cfg.aug_contrast).view(b, 1, 1, 1).to(dev)
    bright = u(-cfg.aug_brightness, cfg.aug_brightness).view(b, 1, 1, 1).to(dev)
    x = mean + bright + z * std * contrast
    if cfg.aug_noise > 0:
        x = x + cfg.aug_noise * std * torch.randn(x.shape, generator=gen).to(dev)
    return x
