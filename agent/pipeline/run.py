"""One pass of the screening pipeline over a batch of leased jobs: load, preprocess (both in the
decode processes for a batch of compressed films: pipeline/decode.py), score, build each screened
image's overlay.

Steps return values and never touch the database: the worker turns each outcome into rows. Every
error becomes a reason here through ``agent.errors.reason_of``: no element value is ever in one.
``screen_and_report`` runs wherever the worker screens (its screening process, or its thread);
what it returns is picklable and small (findings and the encoded overlay, no pixels).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from agent.dicom_values import read_positive_int, value_of
from agent.domain import Findings, LeasedJob
from agent.errors import BuildError, ProcessingError, reason_of
from agent.pipeline.decode import DecodePool, Refused, prepare
from agent.reporting.builder import BuiltOverlay, blank_source, build_overlay_bytes

if TYPE_CHECKING:  # torch: only where the model runs (the screening process)
    from agent.pipeline.infer import Screener


@dataclass(frozen=True)
class Screened:
    job: LeasedJob
    dataset: Dataset
    pixels: np.ndarray
    findings: Findings
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    """Not screenable (SKIPPED); ``reason`` names no element value."""

    job: LeasedJob
    reason: str


@dataclass(frozen=True)
class Failed:
    """Failed (retried, then DEAD); ``error`` names no element value."""

    job: LeasedJob
    error: str


@dataclass(frozen=True)
class Finished:
    """Screened, and its overlay built (None: overlays are off): what the worker records."""

    job: LeasedJob
    findings: Findings  # without the saliency map (it is in the overlay)
    timings_ms: dict[str, float]
    overlay: BuiltOverlay | None


Outcome = Screened | Rejected | Failed
Recordable = Finished | Rejected | Failed


def screen_batch(
    jobs: list[LeasedJob],
    spool_path: Callable[[str], Path],
    screener: Screener,
    max_pixels: int,
    decoder: DecodePool | None = None,
) -> list[Outcome]:
    """Load, preprocess and score ``jobs`` together; one outcome per job, in order. With
    ``decoder``, a batch's compressed films are decoded and preprocessed in its processes."""
    outcomes: dict[int, Outcome] = {}
    ready: list[tuple[LeasedJob, Any, np.ndarray, float]] = []
    textures: list[np.ndarray | None] = []
    how = screener.prep_spec(max_pixels)
    paths = [Path(spool_path(job.spool_path)) for job in jobs]
    if decoder is None:
        prepared = [prepare(p, how) for p in paths]
    else:
        prepared = decoder.prepare_all(paths, how, lambda p: prepare(p, how))
    for job, done in zip(jobs, prepared, strict=True):
        if isinstance(done, Refused):
            outcomes[job.job_id] = Rejected(job, done.reason) if done.rejected else Failed(job, done.reason)
            continue
        ready.append((job, done.image, done.tensor, done.prep_ms))
        textures.append(done.texture)
    if ready:
        batch = np.stack([t for _, _, t, _ in ready])
        try:
            features = None if textures[0] is None else np.stack(textures)  # type: ignore[arg-type]
            findings, infer_ms = screener.score(batch, [img.clinical for _, img, _, _ in ready], features)
        except ProcessingError as exc:
            for job, *_ in ready:
                outcomes[job.job_id] = Failed(job, reason_of(exc))
        else:
            per_image = infer_ms / len(ready)
            for (job, img, _, prep_ms), f in zip(ready, findings, strict=True):
                timings = {
                    "decode": round(img.decode_ms, 1),
                    "preprocess": round(prep_ms, 1),
                    "infer": round(per_image, 1),
                }
                region = screener.region(img.pixels.shape)
                saliency = f.saliency
                if saliency is not None:  # the map the overlay shows: on the bone of the region
                    t0 = time.perf_counter()
                    try:
                        saliency = screener.bone_saliency(img.pixels, region, saliency)
                    except ProcessingError as exc:
                        outcomes[job.job_id] = Failed(job, reason_of(exc))
                        continue
                    timings["saliency"] = round((time.perf_counter() - t0) * 1000, 1)
                f = replace(f, region=region, saliency=saliency)
                outcomes[job.job_id] = Screened(job, img.dataset, img.pixels, f, timings)
    return [outcomes[j.job_id] for j in jobs]


def finish(screened: Screened, overlay: bool) -> Finished | Failed:
    """Build a screened image's overlay (unless ``overlay`` is off) and let go of its pixels."""
    built = None
    t0 = time.perf_counter()
    if overlay:
        number = read_positive_int(value_of(screened.dataset, "InstanceNumber")) or 1
        try:
            built = build_overlay_bytes(screened.dataset, screened.pixels, screened.findings, number)
        except BuildError as exc:  # its message is already a reason (no element value)
            return Failed(screened.job, reason_of(exc))
    timings = {**screened.timings_ms, "report": round((time.perf_counter() - t0) * 1000, 1)}
    return Finished(screened.job, replace(screened.findings, saliency=None), timings, built)


def screen_and_report(
    jobs: list[LeasedJob],
    paths: dict[str, Path],
    screener: Screener,
    max_pixels: int,
    overlay: bool,
    decoder: DecodePool | None = None,
) -> list[Recordable]:
    """``screen_batch`` then ``finish``: one recordable outcome per job, in order. ``paths``: each
    job's spool entry (``job.spool_path``) as an absolute path."""
    outcomes = screen_batch(jobs, paths.__getitem__, screener, max_pixels, decoder)
    return [finish(o, overlay) if isinstance(o, Screened) else o for o in outcomes]


def warm_up(screener: Screener, overlay: bool) -> None:
    """Run the whole per-image path once on a blank image: the first inference, Grad-CAM, font
    load and highdicom build of a process cost about a second, paid here instead of by the first
    study. Raises what the path raises."""
    size = screener.predictor.input_size
    blank = np.zeros((1, 1, size, size), np.float32)
    texture = screener.texture(np.zeros((64, 48), np.float32))
    features = None if texture is None else texture[None]
    findings, _ = screener.score(blank, [{"age": None, "sex": None, "bmi": None}], features)
    if findings[0].saliency is not None:  # scipy's import and the first bone estimate
        screener.bone_saliency(np.zeros((64, 48), np.float32), screener.region((64, 48)), findings[0].saliency)
    if overlay:
        build_overlay_bytes(blank_source(), np.zeros((64, 48), np.float32), findings[0], 1)
