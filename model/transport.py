"""Entropy-smoothed partial optimal transport, solved exactly through one scalar per image.

:func:`partial_transport` is the operation GSP is built on: plan and residual for a batch of
cost matrices, differentiable w.r.t. the costs and the transport ratio.  The solve itself (the
Newton iteration on one scalar per image and its implicit gradient) is in model/solver.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from model.checks import DeferredChecks
from model.solver import Begun, settle, solver_for

__all__ = ["TransportSolution", "partial_transport", "ratio_tensor"]


class TransportSolution(tuple):
    """``(plan, residual)``: plan ``(B, m, n)``, residual ``(B, n)``; tuple-unpackable."""

    def __new__(cls, plan: Tensor, residual: Tensor) -> TransportSolution:
        return super().__new__(cls, (plan, residual))

    @property
    def plan(self) -> Tensor:
        return self[0]

    @property
    def residual(self) -> Tensor:
        return self[1]


class _Solved(NamedTuple):
    assignment: Tensor  # (B, m, n)
    z: Tensor  # (B, n) float64: u + l
    taken: Tensor  # (B, n)
    kept: Tensor  # (B, n)
    steps: int  # Newton steps run


def _solve(cost: Tensor, ratio: Tensor, entropy_weight: float) -> _Solved:
    """Solve every row to float64 precision; the input checks are read with the first
    convergence flag."""
    solver = solver_for(cost.device)
    begun = Begun(*solver.begin(cost, ratio, entropy_weight, solver.steps_per_check))
    u, steps = settle(solver, begun, ratio, DeferredChecks())
    z, taken, kept = solver.finish(u, begun.log_mass, begun.saturated, cost.dtype)
    return _Solved(begun.assignment, z, taken, kept, steps)


class _Transport(torch.autograd.Function):
    """Cost to plan factors in one pass; saves only the assignment and ``u + l`` for backward."""

    @staticmethod
    def forward(
        ctx, cost: Tensor, ratio: Tensor, entropy_weight: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        solved = _solve(cost, ratio, entropy_weight)
        ctx.save_for_backward(solved.assignment, solved.z)
        ctx.entropy_weight = entropy_weight
        ctx.ratio_dtype = ratio.dtype
        return solved.assignment, solved.taken, solved.kept

    @staticmethod
    def backward(ctx, grad_assignment, grad_taken, grad_kept):
        assignment, z = ctx.saved_tensors
        backward = solver_for(z.device).backward
        grad_cost, grad_mu = backward(
            assignment, z, grad_assignment, grad_taken, grad_kept, ctx.entropy_weight
        )
        return grad_cost, grad_mu.to(ctx.ratio_dtype), None


def ratio_tensor(transport_ratio: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """``mu`` as a ``(B,)`` floating tensor on ``device``; its range is checked on the device.

    A float becomes a fill, not a copy from the host: no transfer to wait for on a GPU.
    """
    if not isinstance(transport_ratio, Tensor):
        return torch.full((batch,), float(transport_ratio), dtype=torch.float64, device=device)
    ratio = transport_ratio.to(device)
    if not ratio.is_floating_point():
        ratio = ratio.double()
    if ratio.dim() == 0:
        ratio = ratio.expand(batch)
    if ratio.shape != (batch,):
        raise ValueError(
            f"transport_ratio must be a float or a ({batch},) tensor, "
            f"got shape {tuple(ratio.shape)}"
        )
    return ratio


def _check_inputs(cost: Tensor, transport_ratio: float | Tensor, entropy_weight: float) -> Tensor:
    """Host-side checks of shapes and types; the ratio as a ``(B,)`` tensor on the cost's device.

    Checks that need the data (finite costs, the ratio's range) are deferred to the solve.
    """
    if not isinstance(cost, Tensor) or cost.dim() != 3:
        shape = tuple(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
        raise ValueError(f"cost must be a (B, m, n) tensor, got shape {shape}")
    batch, protos, locations = cost.shape
    if batch == 0 or protos == 0 or locations == 0:
        raise ValueError(f"cost must have no empty dimension, got shape {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise TypeError(f"cost must be a floating-point tensor, got {cost.dtype}")
    if not math.isfinite(entropy_weight) or entropy_weight <= 0:
        raise ValueError(f"entropy_weight must be a positive finite number, got {entropy_weight}")
    return ratio_tensor(transport_ratio, batch, cost.device)


def partial_transport(
    cost: Tensor, transport_ratio: float | Tensor, entropy_weight: float
) -> TransportSolution:
    """Solve the entropy-smoothed partial transport of GSP exactly for a batch.

    Args:
        cost: ``(B, m, n)`` costs between ``m`` prototypes and ``n`` locations.
        transport_ratio: ``mu`` in ``(0, 1]``, a float or a ``(B,)`` tensor (differentiable).
        entropy_weight: ``gamma``, the inverse temperature of the entropy smoothing.

    Returns:
        ``(plan, residual)``: ``plan[b, k, i]`` is the mass location ``i`` sends to prototype
        ``k`` and ``residual[b, i]`` the mass it keeps; each location holds ``1/n`` in total and
        ``plan.sum((1, 2)) == mu``.  Computed in at least float32, whatever the input precision;
        ``transport_ratio = 1`` transports all of every location's mass: global average pooling.
    """
    ratio = _check_inputs(cost, transport_ratio, entropy_weight)
    work_dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        # The plan's factors: plan[b, k, i] = assignment[b, k, i] * taken[b, i] / n.
        assignment, taken, kept = _Transport.apply(
            cost.to(work_dtype), ratio, float(entropy_weight)
        )
    n = cost.shape[2]
    return TransportSolution(assignment * (taken / n)[:, None, :], kept / n)
