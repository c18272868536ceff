"""Independent reference for the GSP transport: the fixed-point iteration of the official code.

``p = q / (1 + s a)``, ``s = mu / sum(p a)`` with ``a_i = sum_k exp(-gamma c_ik)``, in float64.
The layer never runs it (model/solver.py solves the same problem exactly); it lives in the package
so that the tests (exactness, gradients) and bench/gsp_layer.py (speed, accuracy at 100 steps)
measure against one baseline without either importing the other.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fixed_point_transport(
    cost: Tensor, transport_ratio: float | Tensor, entropy_weight: float, iterations: int
) -> tuple[Tensor, Tensor]:
    """Plan and residual after ``iterations`` fixed-point steps; differentiable by autograd."""
    batch, _, n = cost.shape
    kernel = torch.exp(-entropy_weight * cost)
    mass = kernel.sum(dim=1)
    ratio = torch.as_tensor(transport_ratio, dtype=cost.dtype, device=cost.device).expand(batch)
    location_mass = torch.full((batch, n), 1.0 / n, dtype=cost.dtype, device=cost.device)
    scale = torch.ones(batch, dtype=cost.dtype, device=cost.device)
    residual = location_mass
    for _ in range(iterations):
        residual = location_mass / (1 + scale[:, None] * mass)
        scale = ratio / (residual * mass).sum(dim=1)
    plan = (location_mass - residual)[:, None, :] * kernel / mass[:, None, :]
    return plan, residual


def converged_fixed_point(
    cost: Tensor, transport_ratio: float | Tensor, entropy_weight: float, tol: float = 1e-16
) -> tuple[Tensor, Tensor]:
    """The fixed point run in float64 until the scale stops changing (or 200,000 steps)."""
    cost = cost.double()
    batch, _, n = cost.shape
    ratio = torch.as_tensor(transport_ratio, dtype=torch.float64).expand(batch)
    kernel = torch.exp(-entropy_weight * cost)
    mass = kernel.sum(dim=1)
    location_mass = torch.full((batch, n), 1.0 / n, dtype=torch.float64)
    scale = torch.ones(batch, dtype=torch.float64)
    for _ in range(200_000):
        residual = location_mass / (1 + scale[:, None] * mass)
        new_scale = ratio / (residual * mass).sum(dim=1)
        change = ((new_scale - scale).abs() / new_scale).max()
        scale = new_scale
        if change <= tol:
            break
    residual = location_mass / (1 + scale[:, None] * mass)
    plan = (location_mass - residual)[:, None, :] * kernel / mass[:, None, :]
    return plan, residual
