"""Entropy-smoothed partial optimal transport, solved exactly through one scalar per image.

The transport problem of Generalized Sum Pooling (see docs/method.md) reduces to finding, for
each image, the scalar ``u`` with ``mean_i sigmoid(u + l_i) = mu`` where
``l_i = logsumexp_k(-gamma * c_ik)``.  The function is monotone in ``u`` and the root lies in
the bracket ``[logit(mu) - max l, logit(mu) - min l]``, so a safeguarded Newton iteration
converges to machine precision in a handful of steps.  The backward pass uses the implicit
function theorem: nothing from the iterations is stored.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TransportParts",
    "TransportSolution",
    "partial_transport",
    "solve_transport",
]

_MAX_NEWTON_STEPS = 200
# Large enough that sigmoid(u + l) is exactly 1 in float64 for every location: the mu = 1 case.
_SATURATED_OFFSET = 1.0e4


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


def _newton_step(
    u: Tensor, lo: Tensor, hi: Tensor, log_mass: Tensor, low_ratio: Tensor, log_target: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One safeguarded Newton step for every row; returns ``u``, the bracket and convergence."""
    z = u[:, None] + log_mass
    # Plain float64 sums suffice: the bracket keeps max_i z_i >= logit(mu) >= min_i z_i, so
    # neither the transported nor the kept total can underflow.
    taken, kept = torch.sigmoid(z), torch.sigmoid(-z)
    taken_total, kept_total = taken.sum(dim=1), kept.sum(dim=1)
    slope_total = (taken * kept).sum(dim=1)
    n = log_mass.shape[1]
    # Both residuals are increasing in u and vanish at the root.
    residual = torch.where(
        low_ratio,
        torch.log(taken_total / n) - log_target,
        log_target - torch.log(kept_total / n),
    )
    slope = slope_total / torch.where(low_ratio, taken_total, kept_total)
    lo = torch.where(residual <= 0, u, lo)
    hi = torch.where(residual >= 0, u, hi)
    newton = u - residual / slope.clamp_min(torch.finfo(torch.float64).tiny)
    inside = (newton >= lo) & (newton <= hi)
    u_next = torch.where(inside, newton, 0.5 * (lo + hi))
    # Newton's error after a step is about the square of the step, so 1e-12 means converged.
    scale = 1.0e-12 * (1 + u.abs())
    done = ((u_next - u).abs() <= scale) | (hi - lo <= scale)
    return u_next, lo, hi, done.all()


_compiled_newton_step = None


def _step_function(device: torch.device):
    """The Newton step, fused by ``torch.compile`` on CUDA where eager launches dominate.

    On the GPU each step is a handful of tiny kernels, so launch overhead, not arithmetic, sets
    the time; compiling fuses them.  Elsewhere, or when compilation is unavailable, eager.
    """
    global _compiled_newton_step
    if device.type != "cuda" or os.environ.get("GSP_COMPILE_SOLVER", "1") == "0":
        return _newton_step
    if _compiled_newton_step is None:
        _compiled_newton_step = torch.compile(_newton_step, dynamic=True)
    return _compiled_newton_step


def _solve_offset(log_mass: Tensor, ratio: Tensor) -> tuple[Tensor, int]:
    """Root ``u`` of ``mean_i sigmoid(u + l_i) = mu`` per row, in float64, and the step count.

    Newton runs on ``log mean g = log mu`` for ``mu <= 1/2`` and on
    ``log mean (1 - g) = log (1 - mu)`` above: each is nearly linear in ``u`` in its regime, so
    a few steps suffice.  Every iterate stays inside a bracket that shrinks on each evaluation,
    and a step leaving it is replaced by bisection, so convergence is guaranteed.
    """
    log_mass_64 = log_mass.double()
    mu = ratio.double()
    saturated = mu >= 1.0
    target = torch.where(saturated, torch.full_like(mu, 0.5), mu)
    low_ratio = target <= 0.5
    log_target = torch.where(low_ratio, torch.log(target), torch.log1p(-target))
    logit = torch.log(target) - torch.log1p(-target)
    lo = logit - log_mass_64.amax(dim=1)
    hi = logit - log_mass_64.amin(dim=1)
    u = (logit - log_mass_64.mean(dim=1)).clamp(lo, hi)
    step = _step_function(log_mass.device)
    steps = 0
    while steps < _MAX_NEWTON_STEPS:
        steps += 1
        u, lo, hi, done = step(u, lo, hi, log_mass_64, low_ratio, log_target)
        if bool(done):
            break
    # mu = 1: every location sends all its mass; a large finite offset keeps backward finite.
    return torch.where(saturated, _SATURATED_OFFSET - log_mass_64.amin(dim=1), u), steps


def _implicit_backward(z: Tensor, grad_g: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``g = sigmoid(u(l, mu) + l)`` w.r.t. ``l`` and ``mu`` given ``dL/dg``.

    By the implicit function theorem, with ``s_i = g_i (1 - g_i)``:
    ``du/dl_i = -s_i / sum_j s_j`` and ``du/dmu = n / sum_j s_j``.
    """
    n = z.shape[1]
    # log s_i in the log domain, so that mu -> 1 keeps its limit share softmax(-l).
    log_s = -F.softplus(-z) - F.softplus(z)
    share = torch.softmax(log_s, dim=1)
    projected = (share * grad_g).sum(dim=1, keepdim=True)
    return log_s.exp() * (grad_g - projected), n * projected.squeeze(1)


# Below this total kernel mass a location's terms may underflow: take the max-shifted path.
_UNSHIFTED_MIN_MASS = 1.0e-30


def _assignment_and_log_mass(cost: Tensor, entropy_weight: float) -> tuple[Tensor, Tensor]:
    """``softmax_k(-gamma c)`` and ``l = logsumexp_k(-gamma c)`` with as few passes as possible.

    Usually no location's kernel mass underflows and plain exponentials suffice (three passes
    over the costs); otherwise the max-shifted softmax is used, and ``l`` is read off it at its
    largest entry (``l = max s - log max A``), which cannot underflow.
    """
    kernel = cost.mul(-entropy_weight).exp_()
    mass = kernel.sum(dim=1)
    if bool(mass.amin() > _UNSHIFTED_MIN_MASS):
        return kernel.div_(mass[:, None, :]), mass.log()
    scores = cost * (-entropy_weight)
    assignment = torch.softmax(scores, dim=1)
    largest, best = assignment.max(dim=1, keepdim=True)
    return assignment, (scores.gather(1, best) - largest.log()).squeeze(1)


class _Transport(torch.autograd.Function):
    """Cost to plan factors in one pass; saves only the assignment and ``u + l`` for backward."""

    @staticmethod
    def forward(
        ctx, cost: Tensor, ratio: Tensor, entropy_weight: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        assignment, log_mass = _assignment_and_log_mass(cost, entropy_weight)
        offset, _ = _solve_offset(log_mass, ratio)
        z = offset[:, None] + log_mass.double()
        ctx.save_for_backward(assignment, z)
        ctx.entropy_weight = entropy_weight
        ctx.ratio_dtype = ratio.dtype
        taken = torch.sigmoid(z).to(cost.dtype)
        kept = torch.sigmoid(-z).to(cost.dtype)
        return assignment, taken, kept

    @staticmethod
    def backward(ctx, grad_assignment, grad_taken, grad_kept):
        assignment, z = ctx.saved_tensors
        grad_g = torch.zeros_like(z)
        if grad_taken is not None:
            grad_g = grad_g + grad_taken.double()
        if grad_kept is not None:
            grad_g = grad_g - grad_kept.double()
        grad_l, grad_mu = _implicit_backward(z, grad_g)
        # d l_i / d s_ik = A_ik; the softmax contributes A (G - <A, G>).
        grad_scores = assignment * grad_l.to(assignment.dtype)[:, None, :]
        if grad_assignment is not None:
            inner = (assignment * grad_assignment).sum(dim=1, keepdim=True)
            grad_scores = grad_scores + assignment * (grad_assignment - inner)
        grad_cost = grad_scores * (-ctx.entropy_weight)
        return grad_cost, grad_mu.to(ctx.ratio_dtype), None


def _check_inputs(cost: Tensor, transport_ratio: float | Tensor, entropy_weight: float) -> Tensor:
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
    if isinstance(transport_ratio, Tensor):
        ratio = transport_ratio.to(cost.device)
        if not ratio.is_floating_point():
            ratio = ratio.double()
    else:
        ratio = torch.tensor(float(transport_ratio), dtype=torch.float64, device=cost.device)
    if ratio.dim() == 0:
        ratio = ratio.expand(batch)
    if ratio.shape != (batch,):
        raise ValueError(
            f"transport_ratio must be a float or a ({batch},) tensor, "
            f"got shape {tuple(ratio.shape)}"
        )
    # One device synchronisation for both checks; a NaN or inf anywhere shows in the sum.
    finite, in_range = torch.stack(
        [torch.isfinite(cost.sum()), ((ratio > 0) & (ratio <= 1)).all()]
    ).tolist()
    if not finite:
        raise ValueError("cost contains NaN or infinite values")
    if not in_range:
        raise ValueError(f"transport_ratio must lie in (0, 1], got {ratio.detach().cpu().tolist()}")
    return ratio


class TransportParts(NamedTuple):
    """The factors of the plan: ``plan[b, k, i] = assignment[b, k, i] * taken[b, i] / n``."""

    assignment: Tensor  # (B, m, n): softmax over prototypes of -gamma * cost
    taken: Tensor  # (B, n): fraction g_i of location i's mass that is transported
    kept: Tensor  # (B, n): 1 - g_i, computed without cancellation


def solve_transport(
    cost: Tensor, transport_ratio: float | Tensor, entropy_weight: float
) -> TransportParts:
    """Solve the transport and return its factors; see :func:`partial_transport`.

    Poolings use the factors directly so that ``transport_ratio = 1`` gives weights of exactly 1.
    """
    ratio = _check_inputs(cost, transport_ratio, entropy_weight)
    work_dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        return TransportParts(*_Transport.apply(cost.to(work_dtype), ratio, float(entropy_weight)))


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
        ``plan.sum((1, 2)) == mu``.  Computed in at least float32, whatever the input precision.
    """
    parts = solve_transport(cost, transport_ratio, entropy_weight)
    n = cost.shape[2]
    return TransportSolution(parts.assignment * (parts.taken / n)[:, None, :], parts.kept / n)
