"""STR-Net inference for the worker: the only torch user in agent/.

Wraps model.predict.Predictor: preprocessing from the checkpoint's spec (the training path),
micro-batched scoring on CUDA with autocast when available, else the CPU, and Grad-CAM maps,
restricted to the bone of the assessed square (model.saliency) before anyone shows them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.domain import AlgorithmInfo, Findings, ServedModel
from agent.errors import ConfigError, ProcessingError
from agent.pipeline.decode import PrepSpec, preprocess_pixels, texture_of
from model.checkpoint import SHIPPED, UnknownThreshold
from model.predict import Predictor
from model.preprocess import crop_box
from model.saliency import restrict_to_bone

MODEL_NAME = "STR-Net"


class Screener:
    """A loaded checkpoint that turns decoded pixels into Findings."""

    def __init__(
        self,
        weights: Path | None = None,
        device: str = "auto",
        threshold: str = "served",
        saliency: bool = True,
        threads: int | None = None,
    ) -> None:
        path = Path(weights) if weights else Path(SHIPPED)
        if threads:
            torch.set_num_threads(threads)
        try:  # a probability given as text is read as one by model.checkpoint.operating_threshold
            self.predictor = Predictor(path, device=device, threshold=threshold)
        except FileNotFoundError as exc:
            raise ConfigError("worker.weights", f"checkpoint not found: {exc.filename or path}") from None
        except UnknownThreshold as exc:
            raise ConfigError("worker.threshold", f"{exc} ({path.name})") from None
        except ValueError as exc:  # corrupt file, hash mismatch
            raise ConfigError("worker.weights", f"{path}: {exc}") from None
        meta = self.predictor.meta
        self.algorithm = AlgorithmInfo(
            name=MODEL_NAME,
            version=meta.model_version or "unknown",
            checkpoint_sha256=meta.weights_sha256,
        )
        self.saliency = saliency
        self.device = self.predictor.device

    @property
    def threshold(self) -> float:
        return float(self.predictor.threshold)

    def describe(self) -> ServedModel:
        return ServedModel(
            algorithm=self.algorithm,
            threshold=self.threshold,
            thresholds=dict(self.predictor.meta.thresholds),
            tscore_coverage=float(self.predictor.tscore_coverage),
            device=str(self.device),
        )

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        return preprocess_pixels(pixels, self.predictor.spec)

    def prep_spec(self, max_pixels: int) -> PrepSpec:
        """What preparing a film for this checkpoint takes (``agent.pipeline.decode.prepare``)."""
        return PrepSpec(max_pixels, self.predictor.spec, self.predictor.texture is not None)

    def region(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """The square of a film of ``shape`` that the model assesses (source pixel coordinates)."""
        return crop_box(shape, self.predictor.spec)

    def bone_saliency(self, pixels: np.ndarray, region: tuple[int, int, int, int], saliency: np.ndarray) -> np.ndarray:
        """The Grad-CAM map of a film (over ``region``, from ``score``) kept on the estimated bone
        of that region at its own strength (divided by the whole map's maximum): what the overlay
        shows (``model.saliency.restrict_to_bone``). All zero when the map's attention is not on
        that bone more than chance (the overlay then draws no heat and says so); all NaN when no
        bone is found in the region. A few ms on the CPU at S = 256, whatever the film's size."""
        try:
            return restrict_to_bone(pixels, region, saliency)
        except ValueError as exc:
            raise ProcessingError(f"saliency failed: {exc}") from None

    def texture(self, pixels: np.ndarray) -> np.ndarray | None:
        """The film's texture features when the checkpoint has a texture stage, else None."""
        if self.predictor.texture is None:
            return None
        return texture_of(pixels)

    def score(
        self, batch: np.ndarray, clinical: Sequence[dict[str, Any]], texture: np.ndarray | None = None
    ) -> tuple[list[Findings], float]:
        """Score (N, 1, S, S) images (and their (N, F) texture features, when the checkpoint has
        a texture stage); returns the findings and the inference time in ms."""
        t0 = time.perf_counter()
        try:
            if self.saliency:  # one backbone pass for both
                raw, maps = self.predictor.predict_with_saliency(batch, list(clinical), texture)
            else:
                raw, maps = self.predictor.predict(batch, list(clinical), texture), None
        except (RuntimeError, ValueError) as exc:
            raise ProcessingError(f"inference failed: {exc}") from None
        if maps is not None and maps.ndim == 2:
            maps = maps[None]
        ms = (time.perf_counter() - t0) * 1000
        out = []
        for i, r in enumerate(raw):
            positive = r["decision"] == "bone_loss"
            low, high = r["t_score_interval"]
            out.append(
                Findings(
                    probability=float(r["probability_bone_loss"]),
                    threshold=float(r["threshold"]),
                    bone_loss=positive,
                    p_osteoporosis_given_bone_loss=float(r["p_osteoporosis_given_bone_loss"]),
                    severity=r["severity"] if positive else None,
                    t_score=float(r["t_score"]),
                    t_score_low=float(low),
                    t_score_high=float(high),
                    interval_coverage=float(r["t_score_interval_coverage"]),
                    algorithm=self.algorithm,
                    saliency=None if maps is None else maps[i],
                )
            )
        return out, ms
