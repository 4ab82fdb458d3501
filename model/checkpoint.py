"""Checkpoints: safetensors weights plus a JSON metadata file beside them.

The JSON holds the model and training configs, the preprocessing spec, operating points,
temperature, conformal quantile, training-data hash, metrics, provenance and the sha256 of the
weights file. Loading reads JSON and safetensors only (never pickle) and verifies the hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from model import __version__

if TYPE_CHECKING:  # torch is imported where weights are read or written: reading the metadata
    import torch  # (the service's main process, which never runs the model) needs none of it

    from model.strnet import STRNet

FORMAT = "strnet-checkpoint"
FORMAT_VERSION = 1
SHIPPED = Path(__file__).resolve().parent / "weights" / "strnet-synth-v2.json"
STRUCTURE_KEYS = ("model_config", "preprocess", "weights_file", "weights_sha256")  # every checkpoint has them


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or fails its integrity check."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def metadata_path(path: str | Path) -> Path:
    """The metadata JSON of a checkpoint given either of its two files."""
    p = Path(path)
    return p.with_suffix(".json") if p.suffix == ".safetensors" else p


def save_checkpoint(model: STRNet, meta: dict[str, Any], json_path: str | Path) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json``; returns the JSON path.

    ``meta`` must hold at least ``preprocess`` (the spec as a dict); ``model_config``,
    ``format``, ``package_version``, ``weights_file`` and ``weights_sha256`` are filled in here.
    """
    from safetensors.torch import save_file

    json_path = metadata_path(json_path)
    if json_path.suffix != ".json":
        json_path = json_path.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    weights = json_path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FORMAT})
    if "preprocess" not in meta:
        raise CheckpointError("checkpoint metadata needs the preprocessing spec ('preprocess')")
    full = dict(meta)
    full.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        package_version=__version__,
        model_config=model.cfg.to_dict(),
        weights_file=weights.name,
        weights_sha256=sha256_file(weights),
        weights_bytes=weights.stat().st_size,
    )
    json_path.write_text(json.dumps(full, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return json_path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata JSON of a checkpoint (no weights are read)."""
    p = metadata_path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint metadata not found: {p}")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint metadata {p} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a {FORMAT} file")
    for key in STRUCTURE_KEYS:
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata {p} lacks '{key}'")
    return meta


class UnknownThreshold(ValueError):
    """The operating point asked for is not one the checkpoint stores."""


def named_thresholds(meta: Mapping[str, Any]) -> dict[str, float]:
    """The operating points a checkpoint's metadata stores, by name (its ``thresholds`` block also
    holds the parameters they were chosen with: target_sensitivity, confidence, n_pos, n_neg)."""
    points = meta.get("thresholds", {}) or {}
    return {k: float(v["threshold"]) for k, v in points.items() if isinstance(v, dict) and "threshold" in v}


@overload
def _number(raw: Mapping[str, Any], key: str, default: float) -> float: ...
@overload
def _number(raw: Mapping[str, Any], key: str, default: None) -> float | None: ...
def _number(raw: Mapping[str, Any], key: str, default: float | None) -> float | None:
    """``raw[key]`` as a float, ``default`` when absent or null."""
    value = raw.get(key)
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"metadata '{key}' is not a number: {value!r}") from None


def _block(raw: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """A nested object of the metadata (None when absent, null or empty)."""
    value = raw.get(key)
    return dict(value) if isinstance(value, Mapping) and value else None


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's metadata, parsed once (``parse``, ``read_checkpoint_meta``): typed fields
    for what its readers use, with the defaults applied here; ``raw`` is the whole document, for
    writers that must keep the keys this class does not know (``update_metadata`` and the
    training's save take plain dicts)."""

    weights_file: str
    weights_sha256: str
    model_config: dict[str, Any]
    preprocess: dict[str, Any]  # a model.preprocess.PreprocessSpec as a dict
    model_version: str | None  # None when the metadata names none
    synthetic: bool  # trained on synthetic data
    served_threshold: str  # the operating point served by default
    thresholds: dict[str, float]  # the named operating points (``named_thresholds``)
    target_sensitivity: float | None  # what the operating points were chosen for
    temperature: float  # of the screening logit; 1.0 when uncalibrated
    conformal: dict[str, Any] | None  # the T-score interval's block as stored
    conformal_quantile: float  # the interval's half-width; nan without a conformal block
    conformal_coverage: float  # its nominal coverage
    tscore_calibration: dict[str, Any] | None  # {"intercept", "slope"} (model.calibration.apply_linear)
    texture: dict[str, Any] | None  # the texture stage (model.texture.TextureStage.from_dict)
    train_config: dict[str, Any]  # a model.config.TrainConfig as a dict ({} when absent)
    metrics: dict[str, Any]
    training_data_sha256: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], require: Sequence[str] = ()) -> CheckpointMeta:
        """Parse metadata JSON (as loaded). ``CheckpointError("metadata lacks ...")`` names every
        key of ``require`` and of ``STRUCTURE_KEYS`` that is missing."""
        missing = [k for k in dict.fromkeys([*require, *STRUCTURE_KEYS]) if k not in raw]
        if missing:
            raise CheckpointError(f"metadata lacks {', '.join(missing)}")
        version = raw.get("model_version")
        served = raw.get("served_threshold")
        points = raw.get("thresholds")
        chosen_with = points if isinstance(points, Mapping) else {}
        conformal = raw.get("conformal")
        interval = conformal if isinstance(conformal, Mapping) else {}
        data = raw.get("training_data")
        data_sha = data.get("sha256") if isinstance(data, Mapping) else None
        return cls(
            weights_file=str(raw["weights_file"]),
            weights_sha256=str(raw["weights_sha256"]),
            model_config=dict(raw["model_config"]),
            preprocess=dict(raw["preprocess"]),
            model_version=None if version is None else str(version),
            synthetic=bool(raw.get("synthetic", False)),
            served_threshold="conservative" if served is None else str(served),
            thresholds=named_thresholds(raw),
            target_sensitivity=_number(chosen_with, "target_sensitivity", None),
            temperature=_number(raw, "temperature", 1.0),
            conformal=dict(conformal) if isinstance(conformal, Mapping) else None,
            conformal_quantile=_number(interval, "quantile", math.nan),
            conformal_coverage=_number(interval, "coverage", 0.9),
            tscore_calibration=_block(raw, "tscore_calibration"),
            texture=_block(raw, "texture"),
            train_config=_block(raw, "train_config") or {},
            metrics=_block(raw, "metrics") or {},
            training_data_sha256=None if data_sha is None else str(data_sha),
            raw=dict(raw),
        )

    @property
    def input_size(self) -> int:
        """The side of the square images the network takes."""
        return int(self.preprocess.get("input_size", 256))


def read_checkpoint_meta(path: str | Path, require: Sequence[str] = ()) -> CheckpointMeta:
    """The parsed metadata of a checkpoint (no weights are read); ``require``: keys beyond
    ``STRUCTURE_KEYS`` the caller needs (``CheckpointError`` names those missing)."""
    return CheckpointMeta.parse(read_metadata(path), require)


def operating_threshold(
    meta: CheckpointMeta | Mapping[str, Any], threshold: str | float = "served"
) -> tuple[str, float]:
    """(name, value) of the operating point: a probability as given (a number, or its text, as
    in ``worker.threshold``: ``custom``), or a named one the checkpoint stores (``served`` = the
    checkpoint's choice, conservative by default). ``meta`` is parsed metadata or its JSON."""
    if isinstance(threshold, str):
        try:
            threshold = float(threshold)
        except ValueError:
            pass
    if isinstance(threshold, int | float):
        if not 0.0 < float(threshold) < 1.0:
            raise UnknownThreshold(f"a threshold is a probability between 0 and 1, not {threshold}")
        return "custom", float(threshold)
    if isinstance(meta, CheckpointMeta):
        served, points = meta.served_threshold, meta.thresholds
    else:
        served, points = meta.get("served_threshold", "conservative"), named_thresholds(meta)
    name = served if threshold == "served" else threshold
    if name not in points:
        raise UnknownThreshold(f"checkpoint has no '{name}' threshold")
    return str(name), points[name]


def load_checkpoint(
    path: str | Path = SHIPPED,
    device: str | torch.device = "cpu",
    verify: bool = True,
    require: Sequence[str] = (),
) -> tuple[STRNet, CheckpointMeta]:
    """Build the model from its metadata and load the weights; returns ``(model, metadata)``.

    The model is in eval mode. Raises ``CheckpointError`` if the metadata lacks a key of
    ``require`` (checked before the weights are read), if the weights' sha256 differs from the
    one recorded, or if the tensors do not match the architecture.
    """
    from safetensors.torch import load_file

    from model.strnet import build_model

    meta = read_checkpoint_meta(path, require)
    weights = metadata_path(path).parent / meta.weights_file
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights}")
    if verify:
        digest = sha256_file(weights)
        if digest != meta.weights_sha256:
            raise CheckpointError(f"weights {weights} sha256 {digest} differs from the recorded {meta.weights_sha256}")
    model = build_model(meta.model_config)
    state = load_file(str(weights), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not match the architecture: {exc}") from exc
    model.to(device).eval()
    return model, meta


def update_metadata(path: str | Path, changes: dict[str, Any], out: str | Path) -> Path:
    """Copy a checkpoint to ``out`` with metadata ``changes`` (weights bytes unchanged)."""
    meta = read_metadata(path)
    src = metadata_path(path).parent / meta["weights_file"]
    out_json = metadata_path(out)
    if out_json.suffix != ".json":
        out_json = out_json.with_suffix(".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    dst = out_json.with_suffix(".safetensors")
    if src.resolve() != dst.resolve():
        dst.write_bytes(src.read_bytes())
    meta.update(changes)
    meta["weights_file"] = dst.name
    meta["weights_sha256"] = sha256_file(dst)
    out_json.write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return out_json
