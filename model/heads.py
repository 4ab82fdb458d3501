"""Task heads of STR-Net: screening, severity and T-score regression."""

from __future__ import annotations

import torch
from torch import nn


class LogitHead(nn.Module):
    """A dropout plus linear layer giving one logit per image (screening or severity).

    With ``n_clinical > 0`` a linear term of the clinical inputs is added to the logit.
    """

    def __init__(self, in_dim: int, dropout: float = 0.0, n_clinical: int = 0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, 1)
        self.n_clinical = n_clinical
        self.clinical_linear = nn.Linear(n_clinical, 1, bias=False) if n_clinical else None

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(self.drop(x)).squeeze(-1)
        if self.clinical_linear is not None:
            if clinical is None:
                clinical = missing_clinical(x.shape[0], self.n_clinical, x.device, x.dtype)
            y = y + self.clinical_linear(clinical.to(x.dtype)).squeeze(-1)
        return y


class TScoreHead(nn.Module):
    """T-score regression from the routed image feature and clinical variables.

    Clinical inputs (age, sex, BMI, each with a missingness indicator, see
    ``model.config.CLINICAL_FEATURES``) are concatenated with the image feature; a two-layer MLP
    gives the estimate. A linear clinical term is added so the head stays sensible even when the
    image feature is weak.
    """

    def __init__(self, in_dim: int, n_clinical: int, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        self.n_clinical = n_clinical
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim + n_clinical, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )
        self.clinical_linear = nn.Linear(n_clinical, 1) if n_clinical > 0 else None

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
        if self.n_clinical > 0:
            if clinical is None:
                clinical = missing_clinical(x.shape[0], self.n_clinical, x.device, x.dtype)
            clinical = clinical.to(dtype=x.dtype)
            y = self.mlp(torch.cat([x, clinical], dim=-1))
            assert self.clinical_linear is not None
            y = y + self.clinical_linear(clinical)
        else:
            y = self.mlp(x)
        return y.squeeze(-1)


def missing_clinical(
    n: int, n_clinical: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Clinical inputs for ``n`` images with every variable missing (indicators set to 1)."""
    out = torch.zeros(n, n_clinical, device=device, dtype=dtype)
    out[:, 1::2] = 1.0  # the *_missing columns sit at odd positions
    return out
