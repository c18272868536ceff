"""The one scalar per image behind GSP's transport: its Newton solve, implicit gradient, schedule.

The transport problem of Generalized Sum Pooling (see docs/method.md) reduces to finding, for
each image, the scalar ``u`` with ``mean_i sigmoid(u + l_i) = mu`` where
``l_i = logsumexp_k(-gamma * c_ik)``.  The function is monotone in ``u`` and the root lies in
the bracket ``[logit(mu) - max l, logit(mu) - min l]``, so a safeguarded Newton iteration
converges to machine precision in a handful of steps.  The backward pass uses the implicit
function theorem: nothing from the iterations is stored.

The solve is split into parts (:func:`begin`, Newton blocks, :func:`finish`,
:func:`implicit_backward`) so that its two users, :func:`model.transport.partial_transport` and
the fused GSP layer (model/gsp_function.py), can compile them together with their own steps.
On a GPU the parts run compiled and a forward pass reads the device once (input checks and
convergence together): launches and host synchronisations, not arithmetic, set the time at
the sizes of a pooling layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from model.checks import DeferredChecks, all_finite
from model.compiling import fused

__all__ = [
    "EAGER",
    "MAX_NEWTON_STEPS",
    "NEWTON_TOLERANCE",
    "NON_FINITE_COST",
    "SATURATED_OFFSET",
    "Begun",
    "Solver",
    "begin",
    "finish",
    "implicit_backward",
    "require_valid_transport",
    "settle",
    "solver_for",
]

MAX_NEWTON_STEPS = 200
# Newton's error after a step is about the square of the step, so a step this small relative
# to u means converged.
NEWTON_TOLERANCE = 1.0e-12
NON_FINITE_COST = "cost contains NaN or infinite values"
# Large enough that sigmoid(u + l) is exactly 1 in float64 for every location: the mu = 1 case.
SATURATED_OFFSET = 1.0e4


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
    scale = NEWTON_TOLERANCE * (1 + u.abs())
    done = ((u_next - u).abs() <= scale) | (hi - lo <= scale)
    return u_next, lo, hi, done.all()


def _newton_steps(
    u: Tensor,
    lo: Tensor,
    hi: Tensor,
    log_mass: Tensor,
    low_ratio: Tensor,
    log_target: Tensor,
    count: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``count`` Newton steps; ``done`` says whether every row had converged at the last one.

    A converged row stays put: at the root the Newton step is zero and the bracket holds it.
    """
    for _ in range(count):
        u, lo, hi, done = _newton_step(u, lo, hi, log_mass, low_ratio, log_target)
    return u, lo, hi, done


def _assignment_and_log_mass(cost: Tensor, entropy_weight: float) -> tuple[Tensor, Tensor]:
    """``softmax_k(-gamma c)`` and ``l = logsumexp_k(-gamma c)`` over prototypes ``k``.

    Shifted by each location's smallest cost, so that no kernel mass can underflow whatever
    ``gamma``; reducing with ``amin`` costs far less than ``torch.logsumexp`` over a middle
    dimension on a CPU, and needs no data-dependent branch on a GPU.
    """
    nearest = cost.amin(dim=1, keepdim=True)
    # -gamma (c - min c) in one pass: gamma min c + (-gamma) c.
    kernel = torch.add(nearest * entropy_weight, cost, alpha=-entropy_weight).exp_()
    mass = kernel.sum(dim=1, keepdim=True)
    return kernel.div_(mass), (mass.log() - entropy_weight * nearest).squeeze(1)


def begin(cost: Tensor, ratio: Tensor, entropy_weight: float, steps: int) -> tuple[Tensor, ...]:
    """Assignment, the Newton start and ``steps`` Newton steps, and the input-validity flags.

    The root ``u`` of ``mean_i sigmoid(u + l_i) = mu`` is found by Newton on
    ``log mean g = log mu`` for ``mu <= 1/2`` and on ``log mean (1 - g) = log (1 - mu)`` above:
    each is nearly linear in ``u`` in its regime, so a few steps suffice.  Every iterate stays
    inside the bracket ``[logit(mu) - max l, logit(mu) - min l]``, which shrinks on each
    evaluation, and a step leaving it is replaced by bisection: convergence is guaranteed.
    """
    assignment, log_mass = _assignment_and_log_mass(cost, entropy_weight)
    log_mass = log_mass.double()
    mu = ratio.double()
    saturated = mu >= 1.0
    target = torch.where(saturated, torch.full_like(mu, 0.5), mu)
    low_ratio = target <= 0.5
    log_target = torch.where(low_ratio, torch.log(target), torch.log1p(-target))
    logit = torch.log(target) - torch.log1p(-target)
    lo = logit - log_mass.amax(dim=1)
    hi = logit - log_mass.amin(dim=1)
    u = (logit - log_mass.mean(dim=1)).clamp(lo, hi)
    u, lo, hi, done = _newton_steps(u, lo, hi, log_mass, low_ratio, log_target, steps)
    finite = all_finite(cost)
    in_range = ((ratio > 0) & (ratio <= 1)).all()
    return assignment, log_mass, u, lo, hi, low_ratio, log_target, saturated, done, finite, in_range


def finish(
    u: Tensor, log_mass: Tensor, saturated: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``z = u + l`` and the transported and kept fractions ``sigmoid(z)``, ``sigmoid(-z)``."""
    # mu = 1: every location sends all its mass; a large finite offset keeps backward finite.
    offset = torch.where(saturated, SATURATED_OFFSET - log_mass.amin(dim=1), u)
    z = offset[:, None] + log_mass
    return z, torch.sigmoid(z).to(dtype), torch.sigmoid(-z).to(dtype)


def implicit_backward(
    assignment: Tensor,
    z: Tensor,
    grad_assignment: Tensor | None,
    grad_taken: Tensor | None,
    grad_kept: Tensor | None,
    entropy_weight: float,
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. the cost and ``mu`` given those w.r.t. assignment, taken and kept.

    By the implicit function theorem, with ``g = sigmoid(u(l, mu) + l)`` and
    ``s_i = g_i (1 - g_i)``: ``du/dl_i = -s_i / sum_j s_j`` and ``du/dmu = n / sum_j s_j``;
    ``d l_i / d s_ik = A_ik`` and the softmax contributes ``A (G - <A, G>)``.
    """
    grad_g = torch.zeros_like(z)
    if grad_taken is not None:
        grad_g = grad_g + grad_taken.double()
    if grad_kept is not None:
        grad_g = grad_g - grad_kept.double()
    # log s_i in the log domain, so that mu -> 1 keeps its limit share softmax(-l).
    log_s = -F.softplus(-z) - F.softplus(z)
    share = torch.softmax(log_s, dim=1)
    projected = (share * grad_g).sum(dim=1, keepdim=True)
    grad_l = log_s.exp() * (grad_g - projected)
    grad_mu = z.shape[1] * projected.squeeze(1)
    grad_scores = assignment * grad_l.to(assignment.dtype)[:, None, :]
    if grad_assignment is not None:
        inner = (assignment * grad_assignment).sum(dim=1, keepdim=True)
        grad_scores = grad_scores + assignment * (grad_assignment - inner)
    return grad_scores * (-entropy_weight), grad_mu


class Solver(NamedTuple):
    """The solver's parts and how many Newton steps run between two convergence checks."""

    begin: Callable
    newton: Callable
    finish: Callable
    backward: Callable
    steps_per_check: int


EAGER = Solver(begin, _newton_steps, finish, implicit_backward, steps_per_check=1)
# On a GPU a convergence check stalls the launch queue, so Newton runs in blocks between checks;
# 8 steps cover every case measured (2 to 8 from the start above).
_GPU_STEPS_PER_CHECK = 8


def solver_for(device: torch.device) -> Solver:
    """On CUDA, where launches and syncs set the time: fused parts, blocks of Newton steps.

    On a CPU arithmetic dominates and a check costs nothing: eager, checked after each step.
    """
    steps = _GPU_STEPS_PER_CHECK if device.type == "cuda" else 1
    return Solver(
        fused(EAGER.begin, device),
        fused(EAGER.newton, device),
        fused(EAGER.finish, device),
        fused(EAGER.backward, device),
        steps_per_check=steps,
    )


class Begun(NamedTuple):
    """What :func:`begin` returns: the solver's state after the first block, and its flags."""

    assignment: Tensor  # (B, m, n)
    log_mass: Tensor  # (B, n) float64
    u: Tensor
    lo: Tensor
    hi: Tensor
    low_ratio: Tensor
    log_target: Tensor
    saturated: Tensor
    done: Tensor  # every row converged at the block's last step
    finite: Tensor  # the costs hold no NaN or infinity
    in_range: Tensor  # every ratio lies in (0, 1]


def require_valid_transport(
    checks: DeferredChecks, finite: Tensor, in_range: Tensor, ratio: Tensor
) -> None:
    """Record the transport's input checks: finite costs, every ratio in (0, 1]."""
    checks.require(finite, NON_FINITE_COST)
    checks.require(
        in_range,
        lambda: f"transport_ratio must lie in (0, 1], got {ratio.detach().cpu().tolist()}",
    )


def settle(
    solver: Solver, begun: Begun, ratio: Tensor, checks: DeferredChecks
) -> tuple[Tensor, int]:
    """Read the input checks with the first block's convergence flag (one host sync), then run
    further blocks until every row has converged (rare); returns ``u`` and the steps run."""
    require_valid_transport(checks, begun.finite, begun.in_range, ratio)
    (converged,) = checks.verify(begun.done)
    block = solver.steps_per_check
    u, lo, hi, steps = begun.u, begun.lo, begun.hi, block
    while not converged and steps < MAX_NEWTON_STEPS:
        u, lo, hi, done = solver.newton(
            u, lo, hi, begun.log_mass, begun.low_ratio, begun.log_target, block
        )
        steps += block
        converged = bool(done)
    return u, steps
