"""Which STR-Net checkpoint is served, and installing a new one.

``strnet model install PATH`` verifies the checkpoint (weights hash, metadata, the weights load
into the architecture), copies it under ``data_dir/models/<version>/`` and points
``data_dir/models/current`` at it. A running worker notices the pointer change before its next
batch and swaps models; results carry the version that produced them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.errors import ConfigError
from model.checkpoint import (
    SHIPPED,
    CheckpointMeta,
    UnknownThreshold,
    load_checkpoint,
    metadata_path,
    operating_threshold,
    read_checkpoint_meta,
)

REQUIRED = ("model_version", "preprocess", "thresholds", "weights_sha256")  # what a served model needs


def pointer(settings: Settings) -> Path:
    return settings.data_dir / "models" / "current"


def served_weights(settings: Settings) -> Path:
    """worker.weights when set, else the installed model, else the shipped checkpoint."""
    if settings.worker.weights:
        return Path(settings.worker.weights)
    p = pointer(settings)
    if p.is_file():
        return p.parent / p.read_text(encoding="utf-8").strip()
    return Path(SHIPPED)


def verify(path: Path) -> CheckpointMeta:
    """Load and check a checkpoint; ConfigError names the file and the problem."""
    try:  # the metadata ("metadata lacks ...") is checked before the weights are read
        _, meta = load_checkpoint(path, device="cpu", verify=True, require=REQUIRED)
    except FileNotFoundError as exc:
        raise ConfigError("model", f"{path}: file not found ({exc.filename})") from None
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ConfigError("model", f"{path}: {exc}") from None
    return meta


def install(settings: Settings, path: Path) -> CheckpointMeta:
    """Verify ``path`` and make it the served model; returns its metadata."""
    meta = verify(path)
    src_json = metadata_path(path)
    version = str(meta.model_version)
    if not version.replace("-", "").replace(".", "").replace("_", "").isalnum():
        raise ConfigError("model", f"model_version {version!r} is not a safe folder name")
    target = settings.data_dir / "models" / version
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src_json, target / src_json.name)
    shutil.copy2(src_json.parent / meta.weights_file, target / meta.weights_file)
    verify(target / src_json.name)  # the copy is what will be served
    p = pointer(settings)
    tmp = p.with_name("current.part")
    tmp.write_text(f"{version}/{src_json.name}\n", encoding="utf-8")
    os.replace(tmp, p)
    return meta


def served_threshold(meta: CheckpointMeta, setting: str) -> tuple[str, float]:
    """(name, value) of the operating point ``worker.threshold`` picks in this checkpoint."""
    try:
        return operating_threshold(meta, setting)
    except UnknownThreshold as exc:
        raise ConfigError("worker.threshold", str(exc)) from None


def describe(path: Path) -> dict[str, Any]:
    """What ``strnet model info`` prints about a checkpoint."""
    meta = read_checkpoint_meta(path)
    return {
        "weights": str(metadata_path(path)),
        "model_version": meta.model_version,
        "weights_sha256": meta.weights_sha256,
        "trained_on_synthetic_data": meta.synthetic,
        "served_threshold": meta.served_threshold,
        "thresholds": dict(meta.thresholds),
        "target_sensitivity": meta.target_sensitivity,
        "temperature": meta.temperature,
        "conformal": meta.conformal,
        "preprocess": meta.preprocess,
    }
