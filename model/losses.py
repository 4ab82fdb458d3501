"""Multi-task loss: BCE (screening), masked BCE (severity, bone-loss cases only), masked Huber
(T-score, where known). Weights come from ``TrainConfig``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import TrainConfig


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over entries where ``mask`` is true; 0 (with a graph) if none."""
    m = mask.to(logits.dtype)
    per = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return (per * m).sum() / m.sum().clamp_min(1.0)


def masked_huber(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, delta: float = 1.0
) -> torch.Tensor:
    """Mean Huber loss over entries where ``mask`` is true (NaN targets are ignored)."""
    m = mask & torch.isfinite(target)
    safe = torch.where(m, target, torch.zeros_like(target)).to(pred.dtype)
    per = F.huber_loss(pred, safe, reduction="none", delta=delta)
    mf = m.to(pred.dtype)
    return (per * mf).sum() / mf.sum().clamp_min(1.0)


def strnet_loss(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], cfg: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the three task losses.

    ``batch`` holds ``label`` (0/1 float), ``severity`` (0/1, NaN when unknown), ``tscore``
    (NaN when unknown).
    """
    label = batch["label"].float()
    sev = batch["severity"].float()
    tsc = batch["tscore"].float()
    l_screen = F.binary_cross_entropy_with_logits(out["screen_logit"].float(), label)
    sev_mask = (label > 0.5) & torch.isfinite(sev)
    l_sev = masked_bce(out["severity_logit"].float(), torch.nan_to_num(sev), sev_mask)
    l_t = masked_huber(out["tscore"].float(), tsc, torch.isfinite(tsc), cfg.huber_delta)
    total = cfg.w_screen * l_screen + cfg.w_severity * l_sev + cfg.w_tscore * l_t
    parts = {
        "screen": l_screen.item(),
        "severity": l_sev.item(),
        "tscore": l_t.item(),
    }
    return total, parts
