"""STR-Net: a shared residual trunk, a neck, task-aware routing and three heads.

File order follows timm: blocks (imported from ``backbone``, ``routing``, ``heads``), the model,
then factory functions. Constructors take hyperparameters only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.backbone import ResidualBackbone
from model.config import ModelConfig
from model.heads import LogitHead, TScoreHead
from model.routing import TaskRouter

TASKS: tuple[str, ...] = ("screen", "severity", "tscore")


class STRNet(nn.Module):
    """Multi-task bone-loss model.

    ``forward(x, clinical)`` takes images (B, 1, S, S) and optional clinical inputs (B, 6) and
    returns a dict with ``screen_logit`` (bone loss vs normal), ``severity_logit`` (osteoporosis
    vs osteopenia, meaningful for bone-loss cases), ``tscore`` (estimated DXA T-score) and
    ``features`` (the pooled trunk features). P(osteoporosis) = P(bone loss) x
    P(osteoporosis | bone loss), so it never exceeds P(bone loss).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResidualBackbone(
            cfg.in_chans, cfg.stem_channels, cfg.stage_channels, cfg.stage_depths
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.Sequential(
            nn.Linear(self.backbone.num_features, cfg.neck_dim),
            nn.LayerNorm(cfg.neck_dim),
            nn.SiLU(),
            nn.Dropout(cfg.dropout),
        )
        self.router = TaskRouter(
            cfg.neck_dim,
            cfg.expert_dim,
            TASKS,
            n_experts=cfg.n_experts,
            temperature=cfg.gate_temperature,
            grad_scales={"tscore": cfg.tscore_trunk_grad_scale},
        )
        self.screen_head = LogitHead(cfg.expert_dim, cfg.dropout)
        self.severity_head = LogitHead(
            cfg.expert_dim, cfg.dropout, cfg.n_clinical if cfg.severity_clinical else 0
        )
        self.tscore_head = TScoreHead(cfg.expert_dim, cfg.n_clinical, cfg.tscore_hidden)
        if cfg.channels_last:
            # Module.to takes memory_format at run time; torch's overloads do not declare it
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map (used by Grad-CAM)."""
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward_head(
        self, fmap: torch.Tensor, clinical: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        feats = self.pool(fmap).flatten(1).float()
        routed = self.router(self.neck(feats))
        return {
            "screen_logit": self.screen_head(routed["screen"]),
            "severity_logit": self.severity_head(routed["severity"], clinical),
            "tscore": self.tscore_head(routed["tscore"], clinical),
            "features": feats,
        }

    def forward(
        self, x: torch.Tensor, clinical: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x), clinical)

    @property
    def gate_weights(self) -> dict[str, torch.Tensor]:
        """Per-task gate weights (B, K) of the last forward pass."""
        return self.router.last_gates


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def strnet_base(**overrides: Any) -> STRNet:
    """The shipped configuration (about 1.5 M parameters)."""
    return STRNet(ModelConfig(**overrides))


def strnet_small(**overrides: Any) -> STRNet:
    """A narrower variant for quick experiments."""
    kw: dict[str, Any] = dict(
        stem_channels=16, stage_channels=(24, 48, 96, 160), stage_depths=(1, 1, 1, 1)
    )
    kw.update(overrides)
    return STRNet(ModelConfig(**kw))


def strnet_tiny(**overrides: Any) -> STRNet:
    """A tiny variant for unit tests (a few thousand parameters)."""
    kw: dict[str, Any] = dict(
        stem_channels=4,
        stage_channels=(8, 16),
        stage_depths=(1, 1),
        neck_dim=16,
        n_experts=2,
        expert_dim=8,
        tscore_hidden=8,
        dropout=0.0,
    )
    kw.update(overrides)
    return STRNet(ModelConfig(**kw))


def build_model(cfg: ModelConfig | dict[str, Any]) -> STRNet:
    """Build STR-Net from a config object or its ``to_dict()`` form."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return STRNet(cfg)
