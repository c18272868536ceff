"""GSP's transport and pooling as two hand-written Triton kernels: one program per image.

On a GPU the compiled layer (model/gsp_function.py) is bound by the host: Inductor emits about
34 kernels per forward + backward, each launched from Python behind Dynamo's guards. Here,
after the cosines (one matrix product), the forward is one kernel (costs, assignment, the
Newton solve run to convergence inside the kernel, plan, weights, histogram, the pooled vector
and the input checks) and the backward is one more (pooling and implicit-function gradients,
see model/solver.py). Selected with ``GSP_KERNEL=triton`` (model/gsp_function.py) until a GPU
measurement makes it the default. Without a GPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them on any machine, and Triton's
compiler checks that they build for real GPUs (tests/test_gsp_triton.py).

Everything inside the kernels is float64, as in the solver; the outputs have the inputs'
precision (at least float32).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.solver import MAX_NEWTON_STEPS, NEWTON_TOLERANCE, SATURATED_OFFSET

__all__ = ["MAX_LOCATIONS", "Solved", "Upstream", "transport_backward", "transport_forward"]

# One program holds a row of locations in registers; beyond this a feature map uses the
# compiled path.
MAX_LOCATIONS = 2048
# The forward kernel's Newton solve stops and saturates as model/solver.py's does.
_SOLVER_CONSTANTS = {
    "MAX_STEPS": MAX_NEWTON_STEPS,
    "TOLERANCE": NEWTON_TOLERANCE,
    "SATURATED_OFFSET": SATURATED_OFFSET,
}
# Elements of one (prototypes x locations) tile: the backward keeps about eight float64 tiles
# live, which must fit a program's registers (8192 spills hundreds of bytes per thread; the
# compile test in tests/test_gsp_triton.py checks).
_TILE = 1024
# The pooled vector's loop over channels keeps two tiles live: it can take larger ones.
_FEATURE_TILE = 4096


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _unary_row(unary_ptr, row, cols, n, HAS_UNARY: tl.constexpr):
    """A row's unary costs in float64; zeros without them."""
    unary = tl.zeros_like(cols).to(tl.float64)
    if HAS_UNARY:
        unary = tl.load(unary_ptr + row * n + cols, mask=cols < n, other=0.0).to(tl.float64)
    return unary


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _cosine_tile(cosine_ptr, k, cols, n, inside):
    """A (prototypes x locations) tile of cosines in float64; masked entries 0."""
    cosine = tl.load(cosine_ptr + k[:, None] * n + cols[None, :], mask=inside, other=0.0)
    return cosine.to(tl.float64)


@triton.jit
def _feature_tile(projected_ptr, channels, cols, n, inside):
    """A (channels x locations) tile of projected features in float64; masked entries 0."""
    offsets = channels[:, None] * n + cols[None, :]
    return tl.load(projected_ptr + offsets, mask=inside, other=0.0).to(tl.float64)


@triton.jit
def _cost_of(cosine, unary):
    """``sqrt(max(2 - 2 cos, 1e-12)) + unary``. A GPU's maximum drops NaN, so the forward
    checks the cosines themselves for NaN and infinity."""
    return tl.sqrt(tl.maximum(2.0 - 2.0 * cosine, 1e-12)) + unary[None, :]


@triton.jit
def _costs(cosine_ptr, k, cols, n, inside, unary):
    """A tile of costs in float64 (masked entries: sqrt 2)."""
    return _cost_of(_cosine_tile(cosine_ptr, k, cols, n, inside), unary)


@triton.jit
def _forward_kernel(
    cosine_ptr, unary_ptr, ratio_ptr, gamma_ptr, projected_ptr,
    weights_ptr, plan_ptr, histogram_ptr, embedding_ptr, log_mass_ptr, offset_ptr, flags_ptr,
    m, n, d,
    HAS_UNARY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_STEPS: tl.constexpr, TOLERANCE: tl.constexpr, SATURATED_OFFSET: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < n
    cosine_ptr += row * m * n
    plan_ptr += row * m * n
    gamma = tl.load(gamma_ptr)
    unary = _unary_row(unary_ptr, row, cols, n, HAS_UNARY)

    # Pass 1: each location's nearest prototype and kernel mass, as an online softmax over
    # prototypes (shifted by the running minimum, so no mass underflows whatever gamma).
    nearest = tl.full((BLOCK_N,), float("inf"), dtype=tl.float64)
    mass = tl.zeros((BLOCK_N,), dtype=tl.float64)
    bad_cosines = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for start in range(0, m, BLOCK_M):
        k = start + tl.arange(0, BLOCK_M)
        real = (k < m)[:, None]
        inside = real & valid[None, :]
        cosine = _cosine_tile(cosine_ptr, k, cols, n, inside)
        bad_cosines += tl.sum((inside & ~_finite(cosine)).to(tl.int32), axis=0)
        cost = _cost_of(cosine, unary)
        tile_nearest = tl.min(tl.where(real, cost, float("inf")), axis=0)
        shifted = tl.minimum(nearest, tile_nearest)
        kernel = tl.where(real, tl.exp(gamma * (shifted[None, :] - cost)), 0.0)
        mass = mass * tl.exp(gamma * (shifted - nearest)) + tl.sum(kernel, axis=0)
        nearest = shifted
    log_mass = tl.log(mass) - gamma * nearest

    # The root u of mean_i sigmoid(u + l_i) = mu: model/solver.py's safeguarded Newton, run
    # until converged here instead of in blocks between host checks.
    mu = tl.load(ratio_ptr + row).to(tl.float64)
    saturated = mu >= 1.0
    target = tl.where(saturated, 0.5, mu)
    low_ratio = target <= 0.5
    log_target = tl.where(low_ratio, tl.log(target), tl.log(1.0 - target))
    logit = tl.log(target) - tl.log(1.0 - target)
    lowest = tl.min(tl.where(valid, log_mass, float("inf")), axis=0)
    lo = logit - tl.max(tl.where(valid, log_mass, -float("inf")), axis=0)
    hi = logit - lowest
    u = tl.minimum(tl.maximum(logit - tl.sum(tl.where(valid, log_mass, 0.0), axis=0) / n, lo), hi)
    steps = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    while (steps < MAX_STEPS) & (done == 0):
        z = u + log_mass
        taken = tl.where(valid, _sigmoid(z), 0.0)
        kept = tl.where(valid, _sigmoid(-z), 0.0)
        taken_total = tl.sum(taken, axis=0)
        kept_total = tl.sum(kept, axis=0)
        residual = tl.where(
            low_ratio,
            tl.log(taken_total / n) - log_target,
            log_target - tl.log(kept_total / n),
        )
        slope = tl.sum(taken * kept, axis=0) / tl.where(low_ratio, taken_total, kept_total)
        lo = tl.where(residual <= 0, u, lo)
        hi = tl.where(residual >= 0, u, hi)
        # A zero slope (underflow) sends the step outside the bracket: bisection.
        newton = tl.where(slope > 0, u - residual / slope, lo - 1.0)
        u_next = tl.where((newton >= lo) & (newton <= hi), newton, 0.5 * (lo + hi))
        scale = TOLERANCE * (1.0 + tl.abs(u))
        done = ((tl.abs(u_next - u) <= scale) | (hi - lo <= scale)).to(tl.int32)
        u = u_next
        steps += 1

    # mu = 1: every location sends all its mass; a large finite offset keeps backward finite.
    offset = tl.where(saturated, SATURATED_OFFSET - lowest, u)
    taken = tl.where(valid, _sigmoid(offset + log_mass), 0.0)
    weights = taken / mu
    tl.store(weights_ptr + row * n + cols, weights, mask=valid)
    tl.store(log_mass_ptr + row * n + cols, log_mass, mask=valid)
    tl.store(offset_ptr + row, offset)

    # The pooled vector mean_i w_i z_i, over the channels in blocks.
    projected_ptr += row * d * n
    for start in range(0, d, BLOCK_D):
        channels = start + tl.arange(0, BLOCK_D)
        inside = (channels < d)[:, None] & valid[None, :]
        features = _feature_tile(projected_ptr, channels, cols, n, inside)
        pooled = tl.sum(features * weights[None, :], axis=1) / n
        tl.store(embedding_ptr + row * d + channels, pooled, mask=channels < d)

    # Pass 2: the plan A_ki g_i / n and the histogram sum_i plan_ki / mu.
    for start in range(0, m, BLOCK_M):
        k = start + tl.arange(0, BLOCK_M)
        inside = (k < m)[:, None] & valid[None, :]
        cost = _costs(cosine_ptr, k, cols, n, inside, unary)
        assignment = tl.exp(gamma * (nearest[None, :] - cost)) / mass[None, :]
        plan = tl.where(inside, assignment * (taken / n)[None, :], 0.0)
        tl.store(plan_ptr + k[:, None] * n + cols[None, :], plan, mask=inside)
        tl.store(histogram_ptr + row * m + k, tl.sum(plan, axis=1) / mu, mask=k < m)

    # The input checks: finite cosines (features and prototypes), finite unary costs, mu in (0, 1].
    finite_cosines = tl.sum(bad_cosines, axis=0) == 0
    finite_unary = tl.sum((valid & ~_finite(unary)).to(tl.int32), axis=0) == 0
    in_range = (mu > 0) & (mu <= 1)
    tl.store(flags_ptr + row * 3, finite_cosines.to(tl.int32))
    tl.store(flags_ptr + row * 3 + 1, finite_unary.to(tl.int32))
    tl.store(flags_ptr + row * 3 + 2, in_range.to(tl.int32))


@triton.jit
def _backward_kernel(
    cosine_ptr, unary_ptr, ratio_ptr, gamma_ptr, log_mass_ptr, offset_ptr, projected_ptr,
    grad_weights_ptr, grad_plan_ptr, grad_histogram_ptr, grad_embedding_ptr,
    grad_cosine_ptr, grad_unary_ptr, grad_ratio_ptr, grad_projected_ptr,
    m, n, d,
    HAS_UNARY: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_PLAN: tl.constexpr,
    HAS_GRAD_HISTOGRAM: tl.constexpr, HAS_GRAD_EMBEDDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < n
    cosine_ptr += row * m * n
    grad_plan_ptr += row * m * n
    grad_cosine_ptr += row * m * n
    gamma = tl.load(gamma_ptr)
    unary = _unary_row(unary_ptr, row, cols, n, HAS_UNARY)
    log_mass = tl.load(log_mass_ptr + row * n + cols, mask=valid, other=0.0)
    z = tl.load(offset_ptr + row) + log_mass
    mu = tl.load(ratio_ptr + row).to(tl.float64)
    taken = tl.where(valid, _sigmoid(z), 0.0)
    grad_weights = tl.zeros((BLOCK_N,), dtype=tl.float64)
    if HAS_GRAD_WEIGHTS:
        grad_weights += tl.load(grad_weights_ptr + row * n + cols, mask=valid, other=0.0)

    # Pass 0, through the pooled vector mean_i w_i z_i: to the weights, and to the features.
    if HAS_GRAD_EMBEDDING:
        projected_ptr += row * d * n
        grad_projected_ptr += row * d * n
        for start in range(0, d, BLOCK_D):
            channels = start + tl.arange(0, BLOCK_D)
            inside = (channels < d)[:, None] & valid[None, :]
            features = _feature_tile(projected_ptr, channels, cols, n, inside)
            grad_pooled = tl.load(grad_embedding_ptr + row * d + channels, mask=channels < d)
            grad_pooled = grad_pooled.to(tl.float64)[:, None] / n
            grad_weights += tl.sum(features * grad_pooled, axis=0)
            tl.store(
                grad_projected_ptr + channels[:, None] * n + cols[None, :],
                grad_pooled * (taken / mu)[None, :],
                mask=inside,
            )

    # Pass 1: sum_k G_ki A_ki for the plan's gradient G and the histogram's h (G_ki = h_k / mu).
    plan_share = tl.zeros((BLOCK_N,), dtype=tl.float64)
    histogram_share = tl.zeros((BLOCK_N,), dtype=tl.float64)
    if HAS_GRAD_PLAN or HAS_GRAD_HISTOGRAM:
        for start in range(0, m, BLOCK_M):
            k = start + tl.arange(0, BLOCK_M)
            inside = (k < m)[:, None] & valid[None, :]
            cost = _costs(cosine_ptr, k, cols, n, inside, unary)
            assignment = tl.where(inside, tl.exp(-gamma * cost - log_mass[None, :]), 0.0)
            if HAS_GRAD_PLAN:
                grad_plan = tl.load(
                    grad_plan_ptr + k[:, None] * n + cols[None, :], mask=inside, other=0.0
                )
                plan_share += tl.sum(grad_plan.to(tl.float64) * assignment, axis=0)
            if HAS_GRAD_HISTOGRAM:
                grad_histogram = tl.load(grad_histogram_ptr + row * m + k, mask=k < m, other=0.0)
                histogram_share += tl.sum(
                    grad_histogram.to(tl.float64)[:, None] * assignment, axis=0
                )
    through_plan = plan_share + histogram_share / mu
    grad_taken = grad_weights / mu + through_plan / n
    grad_ratio = -tl.sum(taken * (grad_weights + histogram_share / n), axis=0) / (mu * mu)

    # The transport by the implicit function theorem, s_i = g_i (1 - g_i) in the log domain.
    log_s = tl.where(valid, -_softplus(-z) - _softplus(z), -float("inf"))
    share = tl.exp(log_s - tl.max(log_s, axis=0))
    share = share / tl.sum(share, axis=0)
    projected = tl.sum(share * grad_taken, axis=0)
    grad_log_mass = tl.exp(log_s) * (grad_taken - projected)
    grad_ratio += n * projected
    inner = taken / n * through_plan

    # Pass 2: d/d cost of log_mass (the assignment A) and of the plan through A (softmax).
    grad_unary = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for start in range(0, m, BLOCK_M):
        k = start + tl.arange(0, BLOCK_M)
        inside = (k < m)[:, None] & valid[None, :]
        cosine = _cosine_tile(cosine_ptr, k, cols, n, inside)
        squared = 2.0 - 2.0 * cosine
        cost = _cost_of(cosine, unary)
        assignment = tl.where(inside, tl.exp(-gamma * cost - log_mass[None, :]), 0.0)
        grad_assignment = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        if HAS_GRAD_PLAN:
            grad_plan = tl.load(
                grad_plan_ptr + k[:, None] * n + cols[None, :], mask=inside, other=0.0
            )
            grad_assignment += grad_plan.to(tl.float64)
        if HAS_GRAD_HISTOGRAM:
            grad_histogram = tl.load(grad_histogram_ptr + row * m + k, mask=k < m, other=0.0)
            grad_assignment += grad_histogram.to(tl.float64)[:, None] / mu
        grad_assignment = grad_assignment * (taken / n)[None, :]
        grad_scores = assignment * (grad_log_mass[None, :] + grad_assignment - inner[None, :])
        grad_cost = tl.where(inside, -gamma * grad_scores, 0.0)
        grad_unary += tl.sum(grad_cost, axis=0)
        # d sqrt(2 - 2 cos) / d cos, zero where the clamp at 1e-12 holds.
        slope = tl.where(squared > 1e-12, -1.0 / tl.sqrt(tl.maximum(squared, 1e-12)), 0.0)
        tl.store(grad_cosine_ptr + k[:, None] * n + cols[None, :], grad_cost * slope, mask=inside)
    if HAS_UNARY:
        tl.store(grad_unary_ptr + row * n + cols, grad_unary, mask=valid)
    tl.store(grad_ratio_ptr + row, grad_ratio)


class Solved(NamedTuple):
    """What :func:`transport_forward` returns; ``log_mass`` and ``offset`` feed the backward."""

    weights: Tensor  # (B, n): g / mu
    plan: Tensor  # (B, m, n)
    embedding: Tensor  # (B, d): mean_i w_i z_i
    histogram: Tensor  # (B, m)
    log_mass: Tensor  # (B, n) float64: l = logsumexp_k(-gamma c)
    offset: Tensor  # (B,) float64: z = offset + l
    finite_cosines: Tensor  # 0-dim bool: no NaN or infinity in the cosines
    finite_unary: Tensor  # 0-dim bool: no NaN or infinity in the unary costs
    in_range: Tensor  # 0-dim bool: every ratio lies in (0, 1]


class Upstream(NamedTuple):
    """Gradients w.r.t. :class:`Solved`'s outputs; None for an output that was not used."""

    weights: Tensor | None
    plan: Tensor | None
    embedding: Tensor | None
    histogram: Tensor | None


class Blocks(NamedTuple):
    """Tile sizes and warps of one program: prototypes, locations and channels per tile."""

    m: int
    n: int
    d: int
    warps: int


def _blocks(m: int, n: int, d: int) -> Blocks:
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(triton.next_power_of_2(m), _TILE // block_n))
    block_d = max(1, min(triton.next_power_of_2(d), _FEATURE_TILE // block_n))
    return Blocks(block_m, block_n, block_d, 4 if block_n <= 512 else 8)


@functools.lru_cache(maxsize=64)
def _gamma(entropy_weight: float, device: torch.device) -> Tensor:
    """``gamma`` as a float64 tensor (a float argument would reach the kernel as float32),
    made once per value and device rather than filled on every call."""
    with torch.inference_mode(False):
        return torch.full((1,), float(entropy_weight), dtype=torch.float64, device=device)


def _or(tensor: Tensor | None, stand_in: Tensor) -> Tensor:
    """A kernel argument that its constexpr flag leaves unread when ``tensor`` is None."""
    return stand_in if tensor is None else tensor.contiguous()


def transport_forward(
    cosine: Tensor, unary: Tensor | None, ratio: Tensor, projected: Tensor, entropy_weight: float
) -> Solved:
    """Solve GSP's transport for cosines ``(B, m, n)`` (costs ``sqrt(2 - 2 cos) + unary``) and
    pool the projected features ``(B, d, n)`` with its weights.

    ``unary`` ``(B, n)`` or None; ``ratio`` ``(B,)``. The transport's outputs have the cosines'
    precision and the pooled vector the features', each at least float32.
    """
    batch, m, n = cosine.shape
    d = projected.shape[1]
    if n > MAX_LOCATIONS:
        raise ValueError(f"the Triton kernels take at most {MAX_LOCATIONS} locations, got {n}")
    dtype = torch.promote_types(cosine.dtype, torch.float32)
    device = cosine.device
    cosine, projected = cosine.contiguous(), projected.contiguous()
    weights = torch.empty(batch, n, dtype=dtype, device=device)
    plan = torch.empty(batch, m, n, dtype=dtype, device=device)
    histogram = torch.empty(batch, m, dtype=dtype, device=device)
    embedding_dtype = torch.promote_types(projected.dtype, torch.float32)
    embedding = torch.empty(batch, d, dtype=embedding_dtype, device=device)
    log_mass = torch.empty(batch, n, dtype=torch.float64, device=device)
    offset = torch.empty(batch, dtype=torch.float64, device=device)
    flags = torch.empty(batch, 3, dtype=torch.int32, device=device)
    blocks = _blocks(m, n, d)
    _forward_kernel[(batch,)](
        cosine, _or(unary, cosine), ratio.contiguous(), _gamma(entropy_weight, device), projected,
        weights, plan, histogram, embedding, log_mass, offset, flags,
        m, n, d,
        HAS_UNARY=unary is not None, BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d,
        **_SOLVER_CONSTANTS, num_warps=blocks.warps,
    )  # fmt: skip
    return Solved(weights, plan, embedding, histogram, log_mass, offset, *flags.all(dim=0))


def transport_backward(
    cosine: Tensor,
    unary: Tensor | None,
    ratio: Tensor,
    projected: Tensor,
    log_mass: Tensor,
    offset: Tensor,
    upstream: Upstream,
    entropy_weight: float,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Gradients w.r.t. the cosines, the projected features through the pooled vector (None
    without an embedding gradient), the unary cost (None without one) and the ratio (float64);
    ``log_mass`` and ``offset`` are the forward's (:class:`Solved`)."""
    batch, m, n = cosine.shape
    d = projected.shape[1]
    device = cosine.device
    cosine, projected = cosine.contiguous(), projected.contiguous()
    grad_cosine = torch.empty(
        batch, m, n, dtype=torch.promote_types(cosine.dtype, torch.float32), device=device
    )
    grad_unary = None if unary is None else torch.empty(batch, n, dtype=unary.dtype, device=device)
    grad_ratio = torch.empty(batch, dtype=torch.float64, device=device)
    grad_projected = None
    if upstream.embedding is not None:
        grad_projected = torch.empty_like(projected, memory_format=torch.contiguous_format)
    blocks = _blocks(m, n, d)
    _backward_kernel[(batch,)](
        cosine, _or(unary, cosine), ratio.contiguous(), _gamma(entropy_weight, device),
        log_mass, offset, projected,
        _or(upstream.weights, cosine), _or(upstream.plan, cosine),
        _or(upstream.histogram, cosine), _or(upstream.embedding, cosine),
        grad_cosine, _or(grad_unary, cosine), grad_ratio, _or(grad_projected, cosine),
        m, n, d,
        HAS_UNARY=unary is not None, HAS_GRAD_WEIGHTS=upstream.weights is not None,
        HAS_GRAD_PLAN=upstream.plan is not None,
        HAS_GRAD_HISTOGRAM=upstream.histogram is not None,
        HAS_GRAD_EMBEDDING=upstream.embedding is not None,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, num_warps=blocks.warps,
    )  # fmt: skip
    return grad_cosine, grad_projected, grad_unary, grad_ratio
