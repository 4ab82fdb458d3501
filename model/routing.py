"""Task-aware representation routing: MMoE-style soft gates over shared expert projections.

Each task ``t`` owns a gate ``g_t(h) = softmax(W_t h / tau)`` over ``K`` experts ``e_k(h)``
(linear, LayerNorm, SiLU) and receives ``sum_k g_t,k(h) e_k(h)``. The gate weights of the last
forward pass are kept in ``last_gates`` so they can be inspected and plotted.

A per-task gradient scale lets a weakly coupled task (the T-score) train its own gate and head at
full rate while only a scaled gradient reaches the shared experts and trunk.
"""

from __future__ import annotations

import torch
from torch import nn


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""
    if scale == 1.0:
        return x
    return _GradScale.apply(x, scale)


class TaskRouter(nn.Module):
    """Soft routing of a shared feature to several tasks.

    Parameters
    ----------
    in_dim : width of the shared (neck) feature.
    expert_dim : width of each expert projection and of each task's routed feature.
    tasks : task names, in order.
    n_experts : number of shared experts.
    temperature : softmax temperature of the gates.
    grad_scales : optional per-task gradient scale into the shared experts and trunk.
    """

    def __init__(
        self,
        in_dim: int,
        expert_dim: int,
        tasks: tuple[str, ...],
        n_experts: int = 4,
        temperature: float = 1.0,
        grad_scales: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.temperature = temperature
        self.grad_scales = dict(grad_scales or {})
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, expert_dim), nn.LayerNorm(expert_dim), nn.SiLU())
            for _ in range(n_experts)
        )
        gates = {t: nn.Linear(in_dim, n_experts) for t in tasks}
        for gate in gates.values():
            nn.init.zeros_(gate.weight)  # start from uniform routing
            nn.init.zeros_(gate.bias)
        self.gates = nn.ModuleDict(gates)
        self.last_gates: dict[str, torch.Tensor] = {}

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        experts = torch.stack([e(h) for e in self.experts], dim=1)  # (B, K, D)
        out: dict[str, torch.Tensor] = {}
        gates: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            scale = self.grad_scales.get(task, 1.0)
            h_t = grad_scale(h, scale)
            e_t = grad_scale(experts, scale)
            g = torch.softmax(self.gates[task](h_t) / self.temperature, dim=-1)  # (B, K)
            gates[task] = g.detach()
            out[task] = torch.einsum("bk,bkd->bd", g, e_t)
        self.last_gates = gates
        return out
