"""Inference: the ``Predictor`` the agent's worker calls, and batch inference helpers.

>>> p = Predictor()                      # the shipped checkpoint, device "auto"
>>> p.predict_file("knee.dcm", {"age": 71, "sex": "F", "bmi": None})["decision"]
'bone_loss'

``predict`` takes preprocessed (N, 1, S, S) images and, when the checkpoint has a texture stage
(``model.texture``), the texture features of the same decoded films.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.calibration import apply_linear, sigmoid
from model.checkpoint import SHIPPED, load_checkpoint, operating_threshold
from model.data import clinical_vector
from model.strnet import STRNet
from model.texture import TextureStage, texture_features, texture_matrix

ClinicalInput = Sequence[dict[str, Any] | None] | np.ndarray | torch.Tensor | None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


def amp_dtype(device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype on ``device``: bf16 on CUDA where the GPU supports it (asked of
    ``torch.cuda`` unless ``bf16_supported`` says), else fp16; ``None`` (float32) elsewhere."""
    if device.type != "cuda":
        return None
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def autocast_context(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 (or fp16 on older GPUs) autocast on CUDA; a no-op elsewhere (``amp_dtype``)."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def clinical_tensor(clinical: ClinicalInput, n: int, n_features: int = 6) -> torch.Tensor:
    """Clinical inputs as an (n, 6) tensor; ``None`` or a ``None`` entry means all missing."""
    if clinical is None:
        clinical = [None] * n
    if isinstance(clinical, torch.Tensor | np.ndarray):
        arr = torch.as_tensor(np.asarray(clinical, dtype=np.float32))
        if arr.shape != (n, n_features):
            raise ValueError(f"clinical must have shape ({n}, {n_features}), got {tuple(arr.shape)}")
        return arr
    if len(clinical) != n:
        raise ValueError(f"clinical has {len(clinical)} entries for {n} images")
    rows = [clinical_vector((c or {}).get("age"), (c or {}).get("sex"), (c or {}).get("bmi")) for c in clinical]
    return torch.tensor(rows, dtype=torch.float32)


@torch.no_grad()
def infer_arrays(
    model: STRNet,
    images: np.ndarray | torch.Tensor,
    clinical: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Raw outputs for (N, S, S) or (N, 1, S, S) images: logits, T-score, per-task gates."""
    device = torch.device(device)
    model.eval()
    n = len(images)
    outs: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        # tensors stay where they are (possibly on the GPU): never round-trip them through numpy
        x = chunk.detach().float() if isinstance(chunk, torch.Tensor) else torch.as_tensor(np.asarray(chunk)).float()
        if x.ndim == 3:
            x = x[:, None]
        c = None if clinical is None else torch.as_tensor(clinical[start : start + batch_size])
        with autocast_context(device):
            out = model(x.to(device), None if c is None else c.to(device))
        for key in ("screen_logit", "severity_logit", "tscore"):
            outs.setdefault(key, []).append(out[key].float().cpu().numpy())
        for task, g in model.gate_weights.items():
            outs.setdefault(f"gate_{task}", []).append(g.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


class Predictor:
    """A loaded checkpoint ready to score preprocessed images.

    Parameters
    ----------
    weights : checkpoint metadata JSON (or its .safetensors); defaults to the shipped one.
    device : ``auto`` (CUDA if present), ``cpu`` or ``cuda``.
    threshold : ``served`` (the checkpoint's choice, conservative by default), ``point``,
        ``conservative`` or a probability.

    ``meta`` is the checkpoint's parsed metadata (``model.checkpoint.CheckpointMeta``).
    """

    def __init__(
        self,
        weights: str | Path = SHIPPED,
        device: str | torch.device = "auto",
        threshold: str | float = "served",
    ) -> None:
        self.device = resolve_device(device)
        self.model, self.meta = load_checkpoint(weights, device=self.device)
        self.temperature = self.meta.temperature
        self.tscore_q = self.meta.conformal_quantile
        self.tscore_coverage = self.meta.conformal_coverage
        self.threshold_name, self.threshold = operating_threshold(self.meta, threshold)
        self._spec: Any = None
        self.texture = TextureStage.from_dict(self.meta.texture) if self.meta.texture else None

    @property
    def spec(self) -> Any:
        """The checkpoint's ``model.preprocess.PreprocessSpec``."""
        if self._spec is None:
            from model.preprocess import PreprocessSpec

            self._spec = PreprocessSpec.from_dict(self.meta.preprocess)
        return self._spec

    @property
    def input_size(self) -> int:
        return self.meta.input_size

    def _as_batch(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(batch) if isinstance(batch, np.ndarray) else batch)
        x = x.float()
        while x.ndim < 4:
            x = x.unsqueeze(0)
        s = self.input_size
        if x.shape[1:] != (1, s, s):
            raise ValueError(f"expected images of shape (N, 1, {s}, {s}), got {tuple(x.shape)}")
        return x.to(self.device)

    def predict(
        self,
        batch: torch.Tensor | np.ndarray,
        clinical: ClinicalInput = None,
        texture: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """Score (N, 1, S, S) preprocessed images; ``clinical`` is an optional list of dicts with
        ``age``, ``sex`` ('M'/'F') and ``bmi`` (any may be None) or an (N, 6) array;
        ``texture`` the (N, F) ``model.texture.texture_features`` of the decoded films, required
        when the checkpoint has a texture stage (``self.texture``)."""
        x = self._as_batch(batch)
        c = clinical_tensor(clinical, x.shape[0]).to(self.device)
        raw = infer_arrays(self.model, x, c, batch_size=max(1, x.shape[0]), device=self.device)
        return self._results(raw, texture, x.shape[0])

    def predict_with_saliency(
        self,
        batch: torch.Tensor | np.ndarray,
        clinical: ClinicalInput = None,
        texture: np.ndarray | None = None,
    ) -> tuple[list[dict[str, Any]], np.ndarray]:
        """``predict`` and ``saliency`` (as an (N, S, S) array) from one pass of the backbone,
        the expensive part, instead of two: the same numbers on the CPU (on CUDA the map comes
        from the autocast feature map)."""
        x = self._as_batch(batch)
        c = clinical_tensor(clinical, x.shape[0]).to(self.device)
        self.model.eval()
        with torch.no_grad(), autocast_context(self.device):
            fmap = self.model.forward_features(x)
            out = self.model.forward_head(fmap, c)
        raw = {key: out[key].float().cpu().numpy() for key in ("screen_logit", "severity_logit", "tscore")}
        for task, g in self.model.gate_weights.items():
            raw[f"gate_{task}"] = g.float().cpu().numpy()
        return self._results(raw, texture, x.shape[0]), self._grad_cam(fmap, x.shape[-2:])

    def _results(self, raw: dict[str, np.ndarray], texture: np.ndarray | None, n: int) -> list[dict[str, Any]]:
        if self.texture is not None:
            if texture is None:
                raise ValueError("this checkpoint has a texture stage: pass each film's texture features")
            raw = self.texture.apply(raw, np.asarray(texture, dtype=np.float32).reshape(n, -1))
        p = sigmoid(raw["screen_logit"] / self.temperature)
        q = sigmoid(raw["severity_logit"])
        results = []
        for i in range(n):
            positive = bool(p[i] >= self.threshold)
            t = float(apply_linear(raw["tscore"][i], self.meta.tscore_calibration))
            severity = ("osteoporosis" if q[i] >= 0.5 else "osteopenia") if positive else "normal"
            results.append(
                {
                    "probability_bone_loss": float(p[i]),
                    "threshold": self.threshold,
                    "threshold_name": self.threshold_name,
                    "decision": "bone_loss" if positive else "normal",
                    "p_osteoporosis_given_bone_loss": float(q[i]),
                    "p_osteoporosis": float(p[i] * q[i]),
                    "severity": severity,
                    "t_score": t,
                    "t_score_interval": [t - self.tscore_q, t + self.tscore_q],
                    "t_score_interval_coverage": self.tscore_coverage,
                    "model_version": self.meta.model_version or "unknown",
                    "trained_on_synthetic_data": self.meta.synthetic,
                }
            )
        return results

    def saliency(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Grad-CAM of the screening logit on the last convolutional stage, upsampled to the
        input and scaled to [0, 1]: (S, S) for one image, (N, S, S) for a batch."""
        xb = self._as_batch(x)
        self.model.eval()
        with torch.no_grad():
            fmap = self.model.forward_features(xb)
        cam = self._grad_cam(fmap, xb.shape[-2:])
        return cam[0] if cam.shape[0] == 1 else cam

    def _grad_cam(self, features: torch.Tensor, size: Any) -> np.ndarray:
        """(N, S, S) Grad-CAM maps in [0, 1] from the backbone's feature map: only the head is
        run again, with gradients."""
        with torch.enable_grad():
            fmap = features.detach().float().requires_grad_(True)
            out = self.model.forward_head(fmap)
            (grad,) = torch.autograd.grad(out["screen_logit"].sum(), fmap)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * fmap).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
        lo = cam.amin(dim=(1, 2), keepdim=True)
        hi = cam.amax(dim=(1, 2), keepdim=True)
        return ((cam - lo) / (hi - lo).clamp_min(1e-8)).cpu().numpy().astype(np.float32)

    def predict_file(self, path: str | Path, clinical: dict[str, Any] | None = None) -> dict:
        """Decode, preprocess and score one file (texture features from the same decode)."""
        from model.io import read_pixels
        from model.preprocess import preprocess

        pixels = read_pixels(Path(path))
        texture = texture_features(pixels)[None] if self.texture is not None else None
        return self.predict(preprocess(pixels, self.spec)[None], [clinical], texture)[0]


def score_arrays(
    pred: Predictor,
    cache: np.ndarray,
    clinical: np.ndarray,
    paths: list[Any],
    workers: int = 2,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """The checkpoint's raw outputs for preprocessed images (training, evaluation and
    calibration): the network's, fused with the texture stage when the checkpoint has one
    (its features decoded again from ``paths``). T-scores before the linear recalibration."""
    raw = infer_arrays(pred.model, cache, clinical, 64, pred.device)
    if pred.texture is not None:
        raw = pred.texture.apply(raw, texture_matrix(paths, workers=workers, progress=progress))
    return raw
