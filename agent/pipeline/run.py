"""One pass of the screening pipeline over a batch of leased jobs.

Steps return values and never touch the database: the worker turns each outcome into rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from agent.domain import Findings, LeasedJob
from agent.errors import InputRejected, ProcessingError
from agent.pipeline.infer import Screener
from agent.pipeline.load import load


@dataclass(frozen=True)
class Screened:
    job: LeasedJob
    dataset: Dataset
    pixels: np.ndarray
    findings: Findings
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    job: LeasedJob
    reason: str


@dataclass(frozen=True)
class Failed:
    job: LeasedJob
    error: str


Outcome = Screened | Rejected | Failed


def screen_batch(jobs: list[LeasedJob], spool_path: Any, screener: Screener, max_pixels: int) -> list[Outcome]:
    """Load, preprocess and score ``jobs`` together; one outcome per job, in order."""
    outcomes: dict[int, Outcome] = {}
    ready: list[tuple[LeasedJob, Any, np.ndarray, float]] = []
    textures: list[np.ndarray | None] = []
    for job in jobs:
        try:
            image = load(Path(spool_path(job.spool_path)), max_pixels)
            t0 = time.perf_counter()
            tensor = screener.preprocess(image.pixels)
            texture = screener.texture(image.pixels)
            ready.append((job, image, tensor, (time.perf_counter() - t0) * 1000))
            textures.append(texture)
        except InputRejected as exc:
            outcomes[job.job_id] = Rejected(job, exc.reason)
        except ProcessingError as exc:
            outcomes[job.job_id] = Failed(job, str(exc))
    if ready:
        batch = np.stack([t for _, _, t, _ in ready])
        try:
            features = None if textures[0] is None else np.stack(textures)  # type: ignore[arg-type]
            findings, infer_ms = screener.score(batch, [img.clinical for _, img, _, _ in ready], features)
        except ProcessingError as exc:
            for job, *_ in ready:
                outcomes[job.job_id] = Failed(job, str(exc))
        else:
            per_image = infer_ms / len(ready)
            for (job, img, _, prep_ms), f in zip(ready, findings, strict=True):
                timings = {
                    "decode": round(img.decode_ms, 1),
                    "preprocess": round(prep_ms, 1),
                    "infer": round(per_image, 1),
                }
                outcomes[job.job_id] = Screened(job, img.dataset, img.pixels, f, timings)
    return [outcomes[j.job_id] for j in jobs]
